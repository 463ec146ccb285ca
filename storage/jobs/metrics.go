package jobs

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics count the jobs of a runner. The caller registers Collectors with
// its registry; a nil *Metrics counts nothing.
type Metrics struct {
	jobsCreated  *prometheus.CounterVec
	runsStarted  *prometheus.CounterVec
	runsFinished *prometheus.CounterVec
	itemsRemoved *prometheus.CounterVec
	bytesRemoved *prometheus.CounterVec
	errorsTotal  *prometheus.CounterVec
	runDuration  *prometheus.HistogramVec
}

// NewMetrics creates the collectors, named caddy_matrix_media_job_*.
func NewMetrics() *Metrics {
	opts := func(name, help string) prometheus.CounterOpts {
		return prometheus.CounterOpts{Namespace: "caddy", Subsystem: "matrix_media", Name: name, Help: help}
	}
	return &Metrics{
		jobsCreated: prometheus.NewCounterVec(opts("jobs_created_total",
			"Background jobs created, by kind."), []string{"kind"}),
		runsStarted: prometheus.NewCounterVec(opts("job_runs_started_total",
			"Runs of background jobs started on this instance, by kind and how (new, or resumed after a restart or a dead holder)."),
			[]string{"kind", "how"}),
		runsFinished: prometheus.NewCounterVec(opts("job_runs_finished_total",
			"Runs of background jobs ended on this instance, by kind and outcome (done, failed, cancelled, interrupted: stopped to be resumed, lost: taken over by another instance)."),
			[]string{"kind", "outcome"}),
		itemsRemoved: prometheus.NewCounterVec(opts("job_items_removed_total",
			"Items (media, thumbnails) removed by background jobs, by kind; for kind migrate, blobs moved."), []string{"kind"}),
		bytesRemoved: prometheus.NewCounterVec(opts("job_bytes_removed_total",
			"Bytes removed by background jobs, by kind; for kind migrate, bytes moved."), []string{"kind"}),
		errorsTotal: prometheus.NewCounterVec(opts("job_errors_total",
			"Failed background jobs and failed job store operations (lease renewals, claims, final writes), by kind (empty when not tied to a job)."),
			[]string{"kind"}),
		runDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "job_run_duration_seconds",
			Help:    "Duration of runs of background jobs on this instance, by kind.",
			Buckets: prometheus.ExponentialBuckets(0.01, 4, 12),
		}, []string{"kind"}),
	}
}

// Collectors lists the metrics for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.jobsCreated, m.runsStarted, m.runsFinished, m.itemsRemoved, m.bytesRemoved, m.errorsTotal, m.runDuration}
}

// created counts a job created by Start.
func (m *Metrics) created(kind string) {
	if m != nil {
		m.jobsCreated.WithLabelValues(kind).Inc()
	}
}

// started counts a run starting.
func (m *Metrics) started(kind string, resumed bool) {
	if m == nil {
		return
	}
	how := "new"
	if resumed {
		how = "resumed"
	}
	m.runsStarted.WithLabelValues(kind, how).Inc()
}

// finished counts a run ending with outcome after d.
func (m *Metrics) finished(kind, outcome string, d time.Duration) {
	if m == nil {
		return
	}
	m.runsFinished.WithLabelValues(kind, outcome).Inc()
	m.runDuration.WithLabelValues(kind).Observe(d.Seconds())
}

// add counts removed items and bytes.
func (m *Metrics) add(kind string, items, bytes int64) {
	if m == nil {
		return
	}
	if items > 0 {
		m.itemsRemoved.WithLabelValues(kind).Add(float64(items))
	}
	if bytes > 0 {
		m.bytesRemoved.WithLabelValues(kind).Add(float64(bytes))
	}
}

// failed counts a failed job.
func (m *Metrics) failed(kind string) {
	if m != nil {
		m.errorsTotal.WithLabelValues(kind).Inc()
	}
}

// storeError counts a failed store operation.
func (m *Metrics) storeError(kind string) {
	if m != nil {
		m.errorsTotal.WithLabelValues(kind).Inc()
	}
}
