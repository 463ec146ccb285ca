package mediaadmin

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Actions counted by caddy_matrix_media_admin_media_total.
const (
	actionQuarantined   = "quarantined"
	actionUnquarantined = "unquarantined"
	actionProtected     = "protected"
	actionUnprotected   = "unprotected"
)

// Reasons of deletions (the reason label, and the log field).
const (
	reasonAdmin       = "admin"
	reasonOldLocal    = "old_local"
	reasonUserMedia   = "user_media"
	reasonPurgeRemote = "purge_remote"
)

// Metrics holds the Prometheus collectors of the media admin service and
// API. One Metrics should live as long as the shared resources, so that
// counters survive config reloads. A nil *Metrics counts nothing.
//
// Collectors:
//
//	caddy_matrix_media_admin_requests_total{endpoint,code}  counter (admin API requests; endpoint is a route name or "unknown")
//	caddy_matrix_media_admin_media_total{action}            counter (media items quarantined, unquarantined, protected, unprotected)
//	caddy_matrix_media_admin_deleted_media_total{reason}    counter (media rows deleted; reason: admin, old_local, user_media, purge_remote)
//	caddy_matrix_media_admin_deleted_bytes_total{reason}    counter (bytes of blobs deleted with them)
type Metrics struct {
	requests     *prometheus.CounterVec
	media        *prometheus.CounterVec
	deletedMedia *prometheus.CounterVec
	deletedBytes *prometheus.CounterVec
}

// NewMetrics creates the collectors, unregistered.
func NewMetrics() *Metrics {
	return &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "admin_requests_total",
			Help: "Media admin API requests by endpoint and HTTP status code.",
		}, []string{"endpoint", "code"}),
		media: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "admin_media_total",
			Help: "Media items quarantined, unquarantined, protected or unprotected by operators.",
		}, []string{"action"}),
		deletedMedia: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "admin_deleted_media_total",
			Help: "Media items deleted by operators' requests, by reason.",
		}, []string{"reason"}),
		deletedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "admin_deleted_bytes_total",
			Help: "Bytes of blobs deleted by operators' requests, by reason.",
		}, []string{"reason"}),
	}
}

// Collectors returns every collector, for registration.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.media, m.deletedMedia, m.deletedBytes}
}

func (m *Metrics) count(action string, n int) {
	if m != nil && n > 0 {
		m.media.WithLabelValues(action).Add(float64(n))
	}
}

func (m *Metrics) deleted(reason string, n int, bytes int64) {
	if m == nil {
		return
	}
	if n > 0 {
		m.deletedMedia.WithLabelValues(reason).Add(float64(n))
	}
	if bytes > 0 {
		m.deletedBytes.WithLabelValues(reason).Add(float64(bytes))
	}
}

func (m *Metrics) request(endpoint string, status int) {
	if m != nil {
		m.requests.WithLabelValues(endpoint, strconv.Itoa(status)).Inc()
	}
}
