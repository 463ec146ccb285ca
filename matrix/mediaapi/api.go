// Package mediaapi serves the Matrix media endpoints (legacy /_matrix/media/*,
// authenticated /_matrix/client/v1/media/*, async uploads) for one site, on
// top of the shared storage. It depends only on net/http, storage and the
// matrix protocol packages, so it runs under Caddy, under plain net/http and
// in tests alike.
package mediaapi

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Defaults used when a SiteConfig field is zero.
const (
	DefaultMaxUploadSize      int64 = 100 << 20
	DefaultMaxPendingUploads        = 5
	DefaultPendingExpiry            = 24 * time.Hour
	DefaultDownloadTimeout          = 20 * time.Second
	DefaultMaxDownloadTimeout       = 60 * time.Second
)

// SiteConfig is the configuration of one site: one Matrix server name.
type SiteConfig struct {
	// ServerName is the Matrix server name used in mxc URIs. Required.
	ServerName string
	// MaxUploadSize is the largest upload in bytes. Default 100 MiB.
	MaxUploadSize int64
	// MaxPendingUploads is how many unexpired /create IDs one user may hold.
	// Default 5; negative means unlimited.
	MaxPendingUploads int
	// PendingExpiry is how long a /create ID stays valid. Default 24h.
	PendingExpiry time.Duration
	// MaxDownloadTimeout caps timeout_ms on downloads of pending media.
	// Default 60s.
	MaxDownloadTimeout time.Duration
	// FreezeLegacy makes the unauthenticated legacy download endpoints answer
	// 404 M_NOT_FOUND for media created at or after FreezeSince (all media when
	// FreezeSince is zero). Default false.
	FreezeLegacy bool
	// FreezeSince is the freeze cut-off; zero means every media item.
	FreezeSince time.Time
}

// Repository is the state every site shares: the stores, the hot metadata
// cache, the waiters for pending uploads and the metrics. Build one with
// NewRepository and share it between sites.
type Repository struct {
	blobs   storage.BlobStore
	meta    storage.MetadataStore
	metrics *Metrics
	logger  *zap.Logger
	// further unexported fields: media cache, pending waiters
}

// RepositoryOptions configures NewRepository.
type RepositoryOptions struct {
	// Datastore names the blob store in blob records. Default "default".
	Datastore string
	// MediaCacheSize is how many ready media rows are kept in memory so that
	// downloads need no database round trip. Default 65536.
	MediaCacheSize int
	// Logger receives structured logs. Default: a no-op logger.
	Logger *zap.Logger
	// Metrics receives counters; default: a fresh NewMetrics().
	Metrics *Metrics
}

// Site serves the media API of one server name. It implements http.Handler;
// requests whose path is not a media path (see IsMediaPath) are not for it.
type Site struct {
	cfg  SiteConfig
	repo *Repository
	auth auth.Authenticator
}

// NewSite builds a site on a shared repository, validating and defaulting cfg.
// authn checks access tokens (whoami against the site's homeserver).
func NewSite(cfg SiteConfig, repo *Repository, authn auth.Authenticator) (*Site, error) {
	panic("skeleton: replaced by the real implementation")
}

// ServeHTTP serves one media request and always writes a response: Matrix JSON
// errors for anything that fails.
func (s *Site) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	panic("skeleton: replaced by the real implementation")
}

// IsMediaPath reports whether the path (as in r.URL.Path) belongs to the media
// API: /_matrix/media/, /_matrix/client/v1/media/, the MSC3916 unstable client
// prefix and /_matrix/federation/v1/media/. Everything else goes to the next
// handler (the operator's reverse_proxy).
func IsMediaPath(path string) bool {
	panic("skeleton: replaced by the real implementation")
}

// NewRepository builds the shared repository on the given stores.
func NewRepository(blobs storage.BlobStore, meta storage.MetadataStore, opts RepositoryOptions) (*Repository, error) {
	panic("skeleton: replaced by the real implementation")
}

// Metrics holds the Prometheus collectors of the media API. One Metrics lives
// as long as the shared repository, so counters survive config reloads.
type Metrics struct{}

// NewMetrics creates the collectors (caddy_matrix_media_*), unregistered.
func NewMetrics() *Metrics { return &Metrics{} }

// Collectors returns every collector, for registration with a registry.
func (m *Metrics) Collectors() []prometheus.Collector { return nil }
