package mediaapi

import (
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"
)

// Metrics holds the Prometheus collectors of the media API. One Metrics lives
// as long as the shared repository, so counters survive config reloads.
//
// Collectors:
//
//	caddy_matrix_media_requests_total{endpoint,code}         counter
//	caddy_matrix_media_request_duration_seconds{endpoint}    histogram
//	caddy_matrix_media_upload_bytes_total                    counter
//	caddy_matrix_media_download_bytes_total                  counter
//	caddy_matrix_media_dedup_hits_total                      counter
//	caddy_matrix_media_pending_uploads_waiting               gauge
//	caddy_matrix_media_download_redirects_total              counter
//	caddy_matrix_media_datastore_bytes_total{datastore,direction}  counter (in: new blobs written by uploads, out: download bodies)
//	caddy_matrix_media_datastore_operations_total{datastore,op,result}  counter (object-store requests; result ok|error)
//	caddy_matrix_media_datastore_operation_duration_seconds{datastore,op}  histogram
//	caddy_matrix_media_panics_total{where}                   counter (recovered panics; where: thumbnail, thumbnail_pregeneration, pending_expiry, ...)
//	caddy_matrix_media_admission_rejections_total{reason}    counter (429s of admission bounds: remote_total, remote_server)
//	caddy_matrix_media_remote_fetches_in_flight              gauge
//	caddy_matrix_media_cluster_waits_total{work}             counter (times work found its cluster lock held, by another instance or request, and waited; work: remote, thumbnail)
//	caddy_matrix_media_access_flushed_total{kind}            counter (last-access times written in batches; kind: media, thumbnail)
//	caddy_matrix_media_access_flush_errors_total             counter (failed access batches, retried at the next flush)
//	caddy_matrix_media_access_dropped_total                  counter (reads not recorded because the access buffer was full)
//
// endpoint is one of unknown, upload, create, upload_put, download, config,
// options, thumbnail, federation_download, federation_thumbnail,
// preview_url, usage; code is the HTTP status (499 when the client went away before an
// answer), so label cardinality is bounded.
type Metrics struct {
	requests      *prometheus.CounterVec
	duration      *prometheus.HistogramVec
	uploadBytes   prometheus.Counter
	downloadBytes prometheus.Counter
	dedupHits     prometheus.Counter
	waiting       prometheus.Gauge
	redirects     prometheus.Counter
	storeBytes    *prometheus.CounterVec
	storeOps      *prometheus.CounterVec
	storeLatency  *prometheus.HistogramVec
	thumbLatency  prometheus.Histogram
	thumbRejected *prometheus.CounterVec
	thumbRunning  prometheus.Gauge
	thumbQueued   prometheus.Gauge
	fedVerify     *prometheus.CounterVec
	remoteFetches *prometheus.CounterVec
	remoteBytes   prometheus.Counter
	remoteLatency prometheus.Histogram
	panics        *prometheus.CounterVec
	admission     *prometheus.CounterVec
	remoteRunning prometheus.Gauge
	clusterWaits  *prometheus.CounterVec
	// accessFlushed, accessFlushErrors and accessDropped count the batched
	// last-access tracking (access.go).
	accessFlushed     *prometheus.CounterVec
	accessFlushErrors prometheus.Counter
	accessDropped     prometheus.Counter
	// limitRejections counts requests refused by quotas and rate limits,
	// per site (LimitRejected).
	limitRejections *prometheus.CounterVec

	// durationBy and counters resolve label values once, so that observing a
	// request allocates nothing.
	durationBy [numEndpoints]prometheus.Observer
	counters   [numEndpoints][maxStatus]atomic.Pointer[counterBox]
}

// maxStatus bounds the status codes that get a cached counter.
const maxStatus = 600

type counterBox struct{ c prometheus.Counter }

// statusClientGone is recorded when the client disconnected before being
// answered (nginx's convention).
const statusClientGone = 499

// NewMetrics creates the collectors (caddy_matrix_media_*), unregistered.
func NewMetrics() *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "requests_total",
			Help: "Media API requests by endpoint and HTTP status code.",
		}, []string{"endpoint", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "request_duration_seconds",
			Help:    "Time to serve media API requests, by endpoint.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"endpoint"}),
		uploadBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "upload_bytes_total",
			Help: "Bytes of media content received in successful uploads.",
		}),
		downloadBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "download_bytes_total",
			Help: "Bytes of media content sent in download bodies.",
		}),
		dedupHits: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "dedup_hits_total",
			Help: "Uploads whose content was already stored (no new blob written).",
		}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "pending_uploads_waiting",
			Help: "Downloads currently waiting for an asynchronous upload to complete.",
		}),
		redirects: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "download_redirects_total",
			Help: "Downloads answered with a redirect to a presigned datastore URL.",
		}),
		storeBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "datastore_bytes_total",
			Help: "Media bytes written to (in) and served from (out) each datastore.",
		}, []string{"datastore", "direction"}),
		storeOps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "datastore_operations_total",
			Help: "Object-store requests by datastore, operation and result (ok or error).",
		}, []string{"datastore", "op", "result"}),
		storeLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "datastore_operation_duration_seconds",
			Help:    "Time of object-store requests (for reads: until the body was closed).",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"datastore", "op"}),
		thumbLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "thumbnail_generation_seconds",
			Help:    "Time to generate a thumbnail (decode, resize, encode), waiting for a worker included.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}),
		thumbRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "thumbnail_rejections_total",
			Help: "Thumbnail requests not answered by a generated thumbnail, by reason: unsupported, too_large, busy, error, original (the source itself was small enough).",
		}, []string{"reason"}),
		thumbRunning: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "thumbnail_workers_busy",
			Help: "Thumbnail generations holding a worker.",
		}),
		thumbQueued: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "thumbnail_queue_depth",
			Help: "Thumbnail generations waiting for a worker.",
		}),
		fedVerify: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "federation_verification_failures_total",
			Help: "Inbound federation media requests refused, by reason: missing, malformed, wrong_destination, no_key, bad_signature, error.",
		}, []string{"reason"}),
		remoteFetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "remote_fetches_total",
			Help: "Fetches of remote media over federation, by result: ok, not_found, not_yet_uploaded, too_large, unavailable, error.",
		}, []string{"result"}),
		remoteBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "remote_fetch_bytes_total",
			Help: "Bytes of remote media fetched over federation.",
		}),
		remoteLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "remote_fetch_duration_seconds",
			Help:    "Time to fetch and store remote media.",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300},
		}),
		panics: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "panics_total",
			Help: "Panics recovered in media work, by where they happened.",
		}, []string{"where"}),
		admission: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "admission_rejections_total",
			Help: "Requests refused with 429 because a bound on work in progress was reached, by reason: remote_total (remote fetches in flight), remote_server (remote fetches in flight from one server).",
		}, []string{"reason"}),
		remoteRunning: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "remote_fetches_in_flight",
			Help: "Remote media fetches in progress (admitted and not yet recorded or failed).",
		}),
		clusterWaits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "cluster_waits_total",
			Help: "Times a piece of work found its cluster-wide lock held (the work is being done by another instance) and waited for it, by work: remote (fetch of a remote media item), thumbnail (generation).",
		}, []string{"work"}),
		accessFlushed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "access_flushed_total",
			Help: "Last-access times written to the database in batches, by kind: media, thumbnail (one per item read since the previous flush).",
		}, []string{"kind"}),
		accessFlushErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "access_flush_errors_total",
			Help: "Batches of last-access times that failed to be written (their reads are retried at the next flush).",
		}),
		accessDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "access_dropped_total",
			Help: "Reads whose last-access time was not recorded because the in-memory access buffer was full.",
		}),
		limitRejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "limit_rejections_total",
			Help: "Requests refused by a quota or a rate limit, by site (server_name) and reason (see the README's fair-use section for the reasons).",
		}, []string{"server_name", "reason"}),
	}
	for ep := endpoint(0); ep < numEndpoints; ep++ {
		m.durationBy[ep] = m.duration.WithLabelValues(endpointNames[ep])
	}
	return m
}

// Collectors returns every collector, for registration with a registry.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.duration, m.uploadBytes, m.downloadBytes, m.dedupHits, m.waiting,
		m.redirects, m.storeBytes, m.storeOps, m.storeLatency,
		m.thumbLatency, m.thumbRejected, m.thumbRunning, m.thumbQueued, m.fedVerify,
		m.remoteFetches, m.remoteBytes, m.remoteLatency, m.panics, m.admission, m.remoteRunning, m.clusterWaits,
		m.accessFlushed, m.accessFlushErrors, m.accessDropped, m.limitRejections}
}

// LimitRejected counts one request of the site serverName refused by a
// quota or rate limit. Reasons are short fixed names: quota_bytes,
// quota_files, quota_window_bytes, quota_window_files, quota_pending,
// quota_upload_size for quotas; rate_<class>_<ip|user> (for example
// rate_upload_ip, rate_download_bytes_user) and rate_failed_auth_ip for
// rate limits. Never a user ID or address: those would make a label per
// user.
func (m *Metrics) LimitRejected(serverName, reason string) {
	m.limitRejections.WithLabelValues(serverName, reason).Inc()
}

// remoteFetch records one remote fetch.
func (m *Metrics) remoteFetch(result string, n int64, d time.Duration) {
	m.remoteFetches.WithLabelValues(result).Inc()
	m.remoteBytes.Add(float64(n))
	m.remoteLatency.Observe(d.Seconds())
}

// clusterWait counts one wait for a cluster lock held elsewhere.
func (m *Metrics) clusterWait(work string) { m.clusterWaits.WithLabelValues(work).Inc() }

// admissionRejected counts a request refused by an admission bound.
func (m *Metrics) admissionRejected(reason string) { m.admission.WithLabelValues(reason).Inc() }

// federationVerifyFailed counts a refused inbound federation request.
func (m *Metrics) federationVerifyFailed(reason string) { m.fedVerify.WithLabelValues(reason).Inc() }

// thumbnailGenerated records one successful generation.
func (m *Metrics) thumbnailGenerated(d time.Duration) { m.thumbLatency.Observe(d.Seconds()) }

// thumbnailRejected counts a request answered otherwise than by a generated
// thumbnail.
func (m *Metrics) thumbnailRejected(reason string) { m.thumbRejected.WithLabelValues(reason).Inc() }

// thumbnailLoad records the generator's load.
func (m *Metrics) thumbnailLoad(s thumbnails.Stats) {
	m.thumbRunning.Set(float64(s.Running))
	m.thumbQueued.Set(float64(s.Queued))
}

// datastoreBytes is the byte counter of a datastore in one direction.
func (m *Metrics) datastoreBytes(datastore, direction string) prometheus.Counter {
	return m.storeBytes.WithLabelValues(datastore, direction)
}

// StoreObserver returns what an object store of the named datastore reports
// its requests to (it implements s3store.Observer).
func (m *Metrics) StoreObserver(datastore string) *StoreObserver {
	return &StoreObserver{m: m, datastore: datastore}
}

// StoreObserver records object-store requests of one datastore.
type StoreObserver struct {
	m         *Metrics
	datastore string
}

// ObserveS3 records one request: its operation, duration and error.
func (o *StoreObserver) ObserveS3(op string, dur time.Duration, _ int64, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	o.m.storeOps.WithLabelValues(o.datastore, op, result).Inc()
	o.m.storeLatency.WithLabelValues(o.datastore, op).Observe(dur.Seconds())
}

// observe records one finished request.
func (m *Metrics) observe(ep endpoint, status int, start time.Time) {
	m.durationBy[ep].Observe(time.Since(start).Seconds())
	m.counter(ep, status).Inc()
}

// counter returns the request counter of (ep, status).
func (m *Metrics) counter(ep endpoint, status int) prometheus.Counter {
	if status < 0 || status >= maxStatus {
		return m.requests.WithLabelValues(endpointNames[ep], strconv.Itoa(status))
	}
	slot := &m.counters[ep][status]
	if b := slot.Load(); b != nil {
		return b.c
	}
	b := &counterBox{c: m.requests.WithLabelValues(endpointNames[ep], strconv.Itoa(status))}
	// Losing a race stores an equivalent box for the same child.
	slot.Store(b)
	return b.c
}
