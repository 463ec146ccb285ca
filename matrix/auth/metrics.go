package auth

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics holds the Prometheus collectors of token checking. One Metrics lives
// as long as the token cache, so counters survive config reloads.
//
// Collectors:
//
//	caddy_matrix_media_token_cache_requests_total{result}     counter (hit, negative_hit, miss)
//	caddy_matrix_media_token_cache_evictions_total            counter
//	caddy_matrix_media_token_cache_entries                    gauge
//	caddy_matrix_media_token_invalidations_total{kind,source} counter (kind token|user|purge, source local|remote)
//	caddy_matrix_media_whoami_duration_seconds{result}        histogram (ok, unknown_token, unavailable, timeout)
//	caddy_matrix_media_whoami_rejected_total                  counter (not attempted: breaker open)
//
// Every method is safe on a nil *Metrics (no metrics).
type Metrics struct {
	hits, negativeHits, misses prometheus.Counter
	requests                   *prometheus.CounterVec
	evictions                  prometheus.Counter
	entries                    prometheus.Gauge
	invalidations              *prometheus.CounterVec
	whoamiDuration             *prometheus.HistogramVec
	whoamiOK, whoamiUnknown    prometheus.Observer
	whoamiUnavailable          prometheus.Observer
	whoamiTimeout              prometheus.Observer
	rejected                   prometheus.Counter
}

// NewMetrics creates the collectors, unregistered.
func NewMetrics() *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "token_cache_requests_total",
			Help: "Access-token cache lookups by result: hit (valid token), negative_hit (rejected token), miss.",
		}, []string{"result"}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "token_cache_evictions_total",
			Help: "Access-token cache entries evicted because the cache was full.",
		}),
		entries: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "token_cache_entries",
			Help: "Access tokens currently cached (valid and rejected).",
		}),
		invalidations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "token_invalidations_total",
			Help: "Access-token cache invalidations by kind (token, user, purge) and source (local logout, remote instance).",
		}, []string{"kind", "source"}),
		whoamiDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "whoami_duration_seconds",
			Help:    "Time of access-token checks against the homeserver, by result.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"result"}),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "whoami_rejected_total",
			Help: "Access-token checks not attempted because the homeserver's circuit breaker was open.",
		}),
	}
	m.hits = m.requests.WithLabelValues("hit")
	m.negativeHits = m.requests.WithLabelValues("negative_hit")
	m.misses = m.requests.WithLabelValues("miss")
	m.whoamiOK = m.whoamiDuration.WithLabelValues("ok")
	m.whoamiUnknown = m.whoamiDuration.WithLabelValues("unknown_token")
	m.whoamiUnavailable = m.whoamiDuration.WithLabelValues("unavailable")
	m.whoamiTimeout = m.whoamiDuration.WithLabelValues("timeout")
	return m
}

// Collectors returns every collector, for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.evictions, m.entries, m.invalidations, m.whoamiDuration, m.rejected}
}

func (m *Metrics) hit(valid bool) {
	if m == nil {
		return
	}
	if valid {
		m.hits.Inc()
	} else {
		m.negativeHits.Inc()
	}
}

func (m *Metrics) miss() {
	if m != nil {
		m.misses.Inc()
	}
}

func (m *Metrics) evicted() {
	if m != nil {
		m.evictions.Inc()
	}
}

func (m *Metrics) setEntries(n int) {
	if m != nil {
		m.entries.Set(float64(n))
	}
}

func (m *Metrics) invalidated(kind, source string) {
	if m != nil {
		m.invalidations.WithLabelValues(kind, source).Inc()
	}
}

func (m *Metrics) whoamiRejected() {
	if m != nil {
		m.rejected.Inc()
	}
}

func (m *Metrics) whoami(d time.Duration, err error) {
	if m == nil {
		return
	}
	o := m.whoamiOK
	switch {
	case err == nil:
	case errors.Is(err, ErrUnknownToken):
		o = m.whoamiUnknown
	case errors.Is(err, ErrHomeserverTimeout):
		o = m.whoamiTimeout
	default:
		o = m.whoamiUnavailable
	}
	o.Observe(d.Seconds())
}
