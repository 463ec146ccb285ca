// Package mediaapi serves the Matrix media endpoints (legacy /_matrix/media/*,
// authenticated /_matrix/client/v1/media/*, async uploads) for one site, on
// top of the shared storage. It depends only on net/http, storage and the
// matrix protocol packages, so it runs under Caddy, under plain net/http and
// in tests alike.
//
// Endpoints served:
//
//	POST /_matrix/media/{v3,r0,v1}/upload                     upload
//	POST /_matrix/media/v1/create                             create (async upload)
//	POST /_matrix/media/unstable/fi.mau.msc2246/create
//	PUT  /_matrix/media/{v3,r0}/upload/{serverName}/{mediaId} async upload content
//	PUT  /_matrix/media/unstable/fi.mau.msc2246/upload/{serverName}/{mediaId}
//	GET  /_matrix/media/{v3,r0,v1}/download/{serverName}/{mediaId}[/{fileName}]   (no auth)
//	GET  /_matrix/client/v1/media/download/{serverName}/{mediaId}[/{fileName}]     (auth, guests ok)
//	GET  /_matrix/media/{v3,r0,v1}/config, /_matrix/client/v1/media/config
//	GET  /_matrix/media/{v3,r0,v1}/thumbnail/{serverName}/{mediaId}            (no auth)
//	GET  /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}              (auth, guests ok)
//	GET  /_matrix/media/{v3,r0,v1}/preview_url, /_matrix/client/v1/media/preview_url (auth)
//	GET  /_matrix/client/v1/media/usage, /_matrix/media/unstable/org.matrix.msc4034/usage (auth; MSC4034)
//	GET  /_matrix/federation/v1/media/{download,thumbnail}/{mediaId}            (X-Matrix)
//
// (HEAD is accepted wherever GET is on client endpoints; the MSC3916 unstable
// prefixes are aliases.) Media of every server name served by a site of the
// same Repository is local: served from the shared store under the
// requesting site's rules. Media of other server names is fetched over
// federation when the site has a RemoteFetcher, within the repository's
// bounds on fetches in flight (429 M_LIMIT_EXCEEDED beyond them). Thumbnails, previews and the
// federation endpoints answer 404 M_UNRECOGNIZED when their part is not
// configured, like any unknown media path.
//
// Takedown: when the metadata store supports it (storage.MediaAdmin),
// media whose content (blob SHA-256) is quarantined and that is not
// protected is refused on every path with 404 M_NOT_FOUND: downloads,
// thumbnails (already stored ones too; optionally answered with
// RepositoryOptions.QuarantinePlaceholder), federation, sibling sites' media
// and remote media, cached or fetched now (a fetched copy is stored, then
// refused; a first download streamed while it is stored holds back its last
// byte until the content is known, and is cut if it is quarantined). The
// check is Media.Refused on the row the one resolver returns (resolve.go);
// GetMedia brings the quarantine with the row, so it costs no query. An
// upload (POST, or PUT of a /create ID) of quarantined content is refused
// with 403 M_FORBIDDEN before any row refers to it. Rows are cached in
// memory, so whoever quarantines, unquarantines, protects or deletes must
// tell the repository at once: ForgetContent(sha256) after a quarantine
// change, Forget(server, id) after a protection change or deletion (the
// admin layer, matrix/mediaadmin, does). This invalidates this process's
// cache only; other instances sharing the database keep a stale row until
// it is evicted (issue 15).
//
// Quotas: a site's per-user quota rules (SiteConfig.Quotas) are enforced on
// uploads before, while and after the body is read (quota.go); the usage
// endpoint answers what the caller stores and config advertises the
// caller's limits.
//
// Rate limits (SiteConfig.RateLimits, ratelimit.go): token buckets per
// client IP (WithClientIP; IPv6 per /64) and per user, per class (uploads,
// downloads, thumbnails, previews, remote fetches, upload and download
// bytes, failed token checks), answered with 429 M_LIMIT_EXCEEDED and
// Retry-After. Unknown tokens are refused per IP before the homeserver is
// asked once the IP's failed_auth bucket is empty (auth.CheckGate).
//
// Last access: downloads and thumbnail reads are noted in memory and
// written in batches (RunAccessFlush, every AccessFlushInterval, default
// 30 s; FlushAccess), never one database write per read (access.go).
package mediaapi

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/semaphore"
	"golang.org/x/sync/singleflight"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/capped"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/cluster"
	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"
)

// Defaults used when a SiteConfig field is zero.
const (
	DefaultMaxUploadSize      int64 = 100 << 20
	DefaultMaxPendingUploads        = 5
	DefaultPendingExpiry            = 24 * time.Hour
	DefaultDownloadTimeout          = 20 * time.Second
	DefaultMaxDownloadTimeout       = 60 * time.Second
)

// Defaults used when a RepositoryOptions field is zero.
const (
	// DefaultDatastore is the name of the datastore the Caddy layer creates
	// when none is configured (and the name earlier versions recorded).
	DefaultDatastore = "default"
	// DefaultMediaCacheSize is how many ready media rows are cached.
	DefaultMediaCacheSize = 65536
	// DefaultPendingCleanupInterval is how often RunPendingExpiry deletes
	// expired pending media.
	DefaultPendingCleanupInterval = 5 * time.Minute
	// DefaultThumbnailMemory is how many bytes of thumbnail sources are held
	// in memory at once.
	DefaultThumbnailMemory int64 = 256 << 20
	// DefaultThumbnailTimeout bounds one thumbnail generation.
	DefaultThumbnailTimeout = time.Minute
	// DefaultMaxRemoteFetches bounds the remote fetches in flight.
	DefaultMaxRemoteFetches = 64
	// DefaultMaxRemoteFetchesPerServer bounds the remote fetches in flight
	// from one remote server.
	DefaultMaxRemoteFetchesPerServer = 16
	// DefaultAccessFlushInterval is how often RunAccessFlush writes the
	// reads noted since the last flush.
	DefaultAccessFlushInterval = 30 * time.Second
	// DefaultAccessBufferSize is how many media items (and, separately,
	// how many items' thumbnails) have a read noted in memory at most
	// between two flushes.
	DefaultAccessBufferSize = 65536
)

// thumbnailMemoryWait is how long a thumbnail generation waits for room in
// the source memory budget before it is refused with 429.
const thumbnailMemoryWait = time.Second

// SiteConfig is the configuration of one site: one Matrix server name.
type SiteConfig struct {
	// ServerName is the Matrix server name used in mxc URIs. Required.
	ServerName string
	// MaxUploadSize is the largest upload in bytes. Default 100 MiB.
	MaxUploadSize int64
	// Federation enables the federation media endpoints. Default: off
	// (they answer 404 M_UNRECOGNIZED).
	Federation *FederationConfig

	// Remote fetches media of other servers for this site's users (signed
	// as this site). Default: none (remote media is 404 M_NOT_FOUND).
	Remote RemoteFetcher

	// Previews makes URL previews (preview_url). Default: none (the
	// endpoint answers 404 M_UNRECOGNIZED).
	Previews Previewer

	// Admins decides who is a media admin; admins are not held to
	// MaxPendingUploads. Default: nobody (except tokens that are admin
	// secrets).
	Admins AdminChecker

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

	// Quotas are the site's per-user quotas (quota.go). Default: none.
	// Rules need a metadata store that keeps usage (storage.QuotaStore).
	Quotas QuotaConfig
	// RateLimits are the site's rate limits (ratelimit.go). Default: none.
	RateLimits *RateLimits
}

// Repository is the state every site shares: the stores, the hot metadata
// cache, the waiters for pending uploads and the metrics. Build one with
// NewRepository and share it between sites.
type Repository struct {
	stores    *storage.Datastores
	meta      storage.MetadataStore
	metrics   *Metrics
	logger    *zap.Logger
	redirects map[string]RedirectPolicy
	// autoRedirects holds the decisions of the automatic policies among
	// redirects (see autoredirect.go); redirectGuard and
	// redirectCheckInterval are their RepositoryOptions.
	autoRedirects         map[string]*autoRedirect
	redirectGuard         federation.Guard
	redirectCheckInterval time.Duration
	// copyBufs holds *[]byte buffers of copyBufSize for downloads of content
	// that is not a file.
	copyBufs sync.Pool

	// thumbs generates thumbnails; nil disables the thumbnail endpoints.
	thumbs         Thumbnailer
	thumbPolicy    ThumbnailPolicy
	thumbMaxSource int64
	// thumbCache holds stored thumbnail rows (nil when the media cache is
	// disabled); thumbFlights coalesces generations; pregen bounds
	// background pre-generation to one upload at a time.
	thumbCache   *mediaCache
	thumbFlights singleflight.Group
	// thumbPending are generated thumbnails answered from memory while
	// they are stored (storeLater).
	thumbPending pendingThumbnails
	pregen       chan struct{}
	// thumbMemory admits thumbnail sources (their size in bytes, at most
	// thumbMemoryCap) before they are read; thumbMemoryWait is how long a
	// source waits for room; thumbTimeout bounds one generation.
	thumbMemory     *semaphore.Weighted
	thumbMemoryCap  int64
	thumbMemoryWait time.Duration
	thumbTimeout    time.Duration

	// bg counts the work running outside of requests (see Go and Drain).
	bg backgroundWork

	// previews caches URL previews; previewFlights coalesces them. Both
	// are keyed by the requesting site's server name and the URL
	// (previewKey): a preview's og:image is media of the site that made it.
	previews       *capped.Map[string, []byte]
	previewFlights singleflight.Group

	// locals are the server names of the sites built on the repository.
	locals localNames

	// remoteFlights are the fetches of remote media in progress, keyed by
	// server/id: one fetch per item, others wait for it; a flight ends
	// once its row is visible. remotePerServer counts them by remote
	// server; maxFetches and maxFetchesPerServer bound both counts.
	// remoteMaxSize bounds what is stored of one.
	remoteMu            sync.Mutex
	remoteFlights       map[string]*remoteFlight
	remotePerServer     map[string]int
	maxFetches          int
	maxFetchesPerServer int
	remoteMaxSize       int64

	// hooks are called at points of the remote path, for tests.
	hooks testHooks

	// quotas is the metadata store's usage capability (nil when it has
	// none: then no site may have quota rules and the usage endpoint
	// answers 404 M_UNRECOGNIZED); quotaSites are the sites with rules.
	quotas     storage.QuotaStore
	quotaSites quotaSites

	// admin is the metadata store's takedown capability; nil when the
	// store has none (then nothing is quarantined and no access is
	// recorded).
	admin storage.MediaAdmin
	// access notes reads for batched last-access tracking (access.go);
	// nil when admin is nil.
	access *accessRecorder
	// accessFlushInterval is how often RunAccessFlush flushes access.
	accessFlushInterval time.Duration
	// placeholder, when not nil, answers thumbnail requests of quarantined
	// media instead of 404 (placeholderEntry describes it).
	placeholder      []byte
	placeholderEntry *mediaEntry

	cleanupInterval time.Duration
	// cache holds ready media rows; nil when disabled.
	cache *mediaCache
	// cacheGen counts cache invalidations (Forget, ForgetContent), so that
	// a row read before one is not cached after it (cachePut).
	cacheGen atomic.Uint64
	// waits counts the downloads waiting for a pending upload and
	// serializes PUTs of one media ID in this process.
	waits waitRegistry
	// cluster coordinates this repository with the other instances sharing
	// its database: wake-ups of waiting downloads, and one remote fetch,
	// one thumbnail generation and one pending-expiry sweep at a time.
	cluster cluster.Coordinator
	// now is the clock; tests replace it.
	now func() time.Time
}

// RepositoryOptions configures NewRepository.
type RepositoryOptions struct {
	// Redirects, keyed by datastore name, answer downloads of media stored
	// in that datastore with a 307 redirect to a presigned URL, where the
	// datastore's store can presign (storage.Presigner). Default: none.
	Redirects map[string]RedirectPolicy
	// RedirectCheckInterval is how often RunRedirectChecks checks the
	// automatic redirect policies again. Default 10 minutes.
	RedirectCheckInterval time.Duration
	// RedirectGuard decides which hosts of presigned URLs automatic redirect
	// policies accept as reachable by clients. Default (the zero Guard):
	// public addresses only.
	RedirectGuard federation.Guard
	// MediaCacheSize is how many ready media rows are kept in memory so that
	// downloads need no database round trip. Default 65536; negative disables
	// the cache.
	MediaCacheSize int
	// Logger receives structured logs. Default: a no-op logger.
	Logger *zap.Logger
	// Cluster coordinates the instances sharing the metadata database
	// (cluster.Postgres); the repository does not close it. Default: a
	// cluster.Local of its own, for a single instance.
	Cluster cluster.Coordinator
	// Metrics receives counters; default: a fresh NewMetrics().
	Metrics *Metrics
	// PendingCleanupInterval is how often RunPendingExpiry deletes expired
	// pending media. Default 5 minutes.
	PendingCleanupInterval time.Duration
	// Thumbnailer generates thumbnails. Default: none, and the thumbnail
	// endpoints answer 404 M_UNRECOGNIZED.
	Thumbnailer Thumbnailer
	// Thumbnails decides which thumbnail sizes exist. Zero fields take
	// their defaults.
	Thumbnails ThumbnailPolicy
	// ThumbnailMaxSourceBytes is the largest media thumbnailed (larger ones
	// get 413). Default thumbnails.DefaultMaxSourceBytes (64 MiB).
	ThumbnailMaxSourceBytes int64
	// ThumbnailMemory bounds the bytes of thumbnail sources held in memory
	// at once, across all generations: a source is admitted (by its size,
	// or the whole budget when it is larger) before it is read, and one that
	// does not fit within a second gets 429 M_LIMIT_EXCEEDED with
	// Retry-After. Default DefaultThumbnailMemory (256 MiB).
	ThumbnailMemory int64
	// ThumbnailTimeout bounds one thumbnail generation: reading the source,
	// waiting for a worker, generating and storing. A generation past it
	// fails with 504 (a libvips operation already running is not
	// interrupted; the pixel limits bound it). Default
	// DefaultThumbnailTimeout (1 minute).
	ThumbnailTimeout time.Duration
	// MaxRemoteSize is the largest remote media cached (larger ones get
	// 502 M_TOO_LARGE). Default DefaultMaxUploadSize (100 MiB).
	MaxRemoteSize int64
	// MaxRemoteFetches bounds the fetches of remote media (and remote
	// thumbnails) in flight, from every remote server together; a request
	// that would start one more gets 429 M_LIMIT_EXCEEDED with Retry-After.
	// Requests for an item already being fetched wait for that fetch and
	// are not counted. Default 64.
	MaxRemoteFetches int
	// MaxRemoteFetchesPerServer bounds the fetches in flight from one
	// remote server, likewise. Default 16.
	MaxRemoteFetchesPerServer int
	// AccessFlushInterval is how often RunAccessFlush writes the last
	// access times of the media and thumbnails read since its previous
	// flush, in one batch each (reads are noted in memory, never written
	// one by one). Default DefaultAccessFlushInterval (30 seconds): a crash
	// loses at most that much access history, a clean shutdown none.
	AccessFlushInterval time.Duration
	// AccessBufferSize bounds how many media items (and, separately, how
	// many items' thumbnails) have a read noted between two flushes; once
	// full, a flush starts early and reads of further items are dropped
	// until it ran (counted in caddy_matrix_media_access_dropped_total).
	// Default DefaultAccessBufferSize (65536, a few MiB).
	AccessBufferSize int
	// QuarantinePlaceholder, when not empty, is an image served (200, with
	// QuarantinePlaceholderType) for thumbnail requests of quarantined
	// media, instead of 404 M_NOT_FOUND. Downloads and federation requests
	// of quarantined media always answer 404. Default: none.
	QuarantinePlaceholder []byte
	// QuarantinePlaceholderType is the Content-Type of
	// QuarantinePlaceholder, an image/ type. Required with it.
	QuarantinePlaceholderType string
}

// testHooks are called at points of the remote path where tests need to
// order events; nil hooks are skipped.
type testHooks struct {
	// missed is called when a remote item was not found cached, before
	// its flight is looked for.
	missed func(key string)
	// joined is called once a request joined (leader false) or started
	// (leader true) a flight.
	joined func(key string, leader bool)
	// beforeRecord is called when a fetched item is stored, before its row
	// is recorded.
	beforeRecord func(server, id string)
	// thumbnailJoined is called once a request joined a thumbnail
	// generation.
	thumbnailJoined func()
	// thumbnailMissed is called when a request found no thumbnail, before
	// it starts or joins a generation.
	thumbnailMissed func()
	// thumbnailStoring is called on the background goroutine that stores
	// an answered thumbnail, before it stores it.
	thumbnailStoring func()
	// uploadReceived is called when an upload's body is stored, before its
	// row is written.
	uploadReceived func()
}

// RedirectPolicy configures presigned download redirects for a datastore.
type RedirectPolicy struct {
	// Lifetime of each presigned URL. Required.
	Lifetime time.Duration
	// CDNBaseURL, when set, replaces the scheme, host and leading path of
	// the presigned URLs. Default: none.
	CDNBaseURL *url.URL
	// Auto redirects only while the datastore passes the checks of
	// autoredirect.go (https URLs on public addresses, a bucket CORS rule
	// that lets any origin GET), re-checked by RunRedirectChecks; until the
	// first check, and whenever they fail, downloads are streamed. Default
	// false: always redirect.
	Auto bool
}

// NewRepository builds the shared repository on the given stores.
func NewRepository(stores *storage.Datastores, meta storage.MetadataStore, opts RepositoryOptions) (*Repository, error) {
	if stores == nil || meta == nil {
		return nil, errors.New("building repository: both datastores and a metadata store are required")
	}
	for name, p := range opts.Redirects {
		if _, ok := stores.Get(name); !ok {
			return nil, fmt.Errorf("building repository: redirect policy for unknown datastore %q", name)
		}
		if p.Lifetime <= 0 {
			return nil, fmt.Errorf("building repository: redirect lifetime of datastore %q must be positive", name)
		}
	}
	if opts.MaxRemoteFetches < 0 || opts.MaxRemoteFetchesPerServer < 0 {
		return nil, fmt.Errorf("building repository: negative remote fetch bound %d/%d", opts.MaxRemoteFetches, opts.MaxRemoteFetchesPerServer)
	}
	if opts.RedirectCheckInterval < 0 {
		return nil, fmt.Errorf("building repository: negative redirect check interval %s", opts.RedirectCheckInterval)
	}
	if opts.PendingCleanupInterval < 0 {
		return nil, fmt.Errorf("building repository: negative pending cleanup interval %s", opts.PendingCleanupInterval)
	}
	r := &Repository{
		stores:          stores,
		meta:            meta,
		metrics:         opts.Metrics,
		logger:          opts.Logger,
		redirects:       opts.Redirects,
		redirectGuard:   opts.RedirectGuard,
		cleanupInterval: opts.PendingCleanupInterval,
		now:             time.Now,
		cluster:         opts.Cluster,
	}
	if r.cluster == nil {
		r.cluster = cluster.NewLocal(0)
	}
	// The clock is read through r.now, which tests replace.
	r.previews = newPreviewCache(func() time.Time { return r.now() })
	if r.metrics == nil {
		r.metrics = NewMetrics()
	}
	if r.logger == nil {
		r.logger = zap.NewNop()
	}
	if r.cleanupInterval == 0 {
		r.cleanupInterval = DefaultPendingCleanupInterval
	}
	r.redirectCheckInterval = cmp.Or(opts.RedirectCheckInterval, DefaultRedirectCheckInterval)
	for name, p := range opts.Redirects {
		if p.Auto {
			if r.autoRedirects == nil {
				r.autoRedirects = map[string]*autoRedirect{}
			}
			r.autoRedirects[name] = &autoRedirect{}
		}
	}
	size := opts.MediaCacheSize
	if size == 0 {
		size = DefaultMediaCacheSize
	}
	if size > 0 {
		r.cache = newMediaCache(size)
		r.thumbCache = newMediaCache(max(size/4, 16))
	}
	r.copyBufs.New = func() any { b := make([]byte, copyBufSize); return &b }
	r.thumbs = opts.Thumbnailer
	r.thumbPolicy = opts.Thumbnails
	if len(r.thumbPolicy.Sizes) == 0 {
		r.thumbPolicy.Sizes = DefaultThumbnailSizes
	}
	for _, sz := range r.thumbPolicy.Sizes {
		if sz.Width < 1 || sz.Height < 1 || (sz.Method != thumbnails.MethodCrop && sz.Method != thumbnails.MethodScale) {
			return nil, fmt.Errorf("building repository: invalid thumbnail size %dx%d %s", sz.Width, sz.Height, sz.Method)
		}
	}
	if r.thumbPolicy.MaxDynamic <= 0 {
		r.thumbPolicy.MaxDynamic = DefaultMaxDynamicThumbnail
	}
	r.thumbMaxSource = opts.ThumbnailMaxSourceBytes
	if r.thumbMaxSource <= 0 {
		r.thumbMaxSource = thumbnails.DefaultMaxSourceBytes
	}
	r.pregen = make(chan struct{}, 1)
	r.thumbMemoryCap = opts.ThumbnailMemory
	if r.thumbMemoryCap <= 0 {
		r.thumbMemoryCap = DefaultThumbnailMemory
	}
	r.thumbMemory = semaphore.NewWeighted(r.thumbMemoryCap)
	r.thumbMemoryWait = thumbnailMemoryWait
	r.thumbTimeout = opts.ThumbnailTimeout
	if r.thumbTimeout <= 0 {
		r.thumbTimeout = DefaultThumbnailTimeout
	}
	r.remoteFlights = make(map[string]*remoteFlight)
	r.remotePerServer = make(map[string]int)
	r.maxFetches = cmp.Or(opts.MaxRemoteFetches, DefaultMaxRemoteFetches)
	r.maxFetchesPerServer = cmp.Or(opts.MaxRemoteFetchesPerServer, DefaultMaxRemoteFetchesPerServer)
	r.remoteMaxSize = opts.MaxRemoteSize
	if r.remoteMaxSize <= 0 {
		r.remoteMaxSize = DefaultMaxUploadSize
	}
	r.waits.init()
	if qs, ok := meta.(storage.QuotaStore); ok {
		r.quotas = qs
	}
	if admin, ok := meta.(storage.MediaAdmin); ok {
		r.admin = admin
		r.access = newAccessRecorder(cmp.Or(opts.AccessBufferSize, DefaultAccessBufferSize))
	}
	r.accessFlushInterval = cmp.Or(opts.AccessFlushInterval, DefaultAccessFlushInterval)
	switch {
	case opts.AccessFlushInterval < 0:
		return nil, fmt.Errorf("building repository: negative access flush interval %s", opts.AccessFlushInterval)
	case opts.AccessBufferSize < 0:
		return nil, fmt.Errorf("building repository: negative access buffer size %d", opts.AccessBufferSize)
	}
	if len(opts.QuarantinePlaceholder) > 0 {
		if !strings.HasPrefix(opts.QuarantinePlaceholderType, "image/") || checkContentType(opts.QuarantinePlaceholderType) != nil {
			return nil, fmt.Errorf("building repository: quarantine placeholder type %q is not an image type", opts.QuarantinePlaceholderType)
		}
		r.placeholder = opts.QuarantinePlaceholder
		r.placeholderEntry = newPlaceholderEntry(opts.QuarantinePlaceholder, opts.QuarantinePlaceholderType)
	}
	// Invalidations made by other instances (their admin API) reach this
	// one's caches; the registration lives as long as the coordinator.
	r.cluster.Handle(forgetTopicPrefix, r.applyForget)
	return r, nil
}

// Metrics returns the repository's metrics.
func (r *Repository) Metrics() *Metrics { return r.metrics }

// Forget drops a media item and its thumbnails from the in-memory caches,
// so that the next request reads the store again, here and (through the
// cluster coordinator) on every instance sharing the database. Call it
// after deleting or changing a media row behind the repository's back
// (admin deletion, protection).
func (r *Repository) Forget(serverName, mediaID string) {
	r.forget(serverName, mediaID)
	r.publish(context.Background(), forgetMediaTopic(serverName, mediaID))
}

// forget is Forget in this process only.
func (r *Repository) forget(serverName, mediaID string) {
	prefix := mediaID + "/"
	r.thumbPending.removeIf(func(k mediaKey, _ *mediaEntry) bool {
		return k.server == serverName && strings.HasPrefix(k.id, prefix)
	})
	if r.cache == nil {
		return
	}
	r.cacheGen.Add(1)
	r.cache.remove(mediaKey{serverName, mediaID})
	r.thumbCache.removeIf(func(k mediaKey, _ *mediaEntry) bool {
		return k.server == serverName && strings.HasPrefix(k.id, prefix)
	})
}

// ForgetContent drops from the in-memory caches every media item whose
// content is the blob sha256, and their thumbnails, so that the next request
// reads their rows again (with the content's quarantine as it now is). Call
// it after quarantining or unquarantining content, or deleting a blob's
// media. It looks at the cache itself rather than the store's list of the
// hash's rows, so that it also drops rows the store no longer lists (deleted
// meanwhile); it never fails, the error is for callers' interfaces. Like
// Forget it reaches every instance sharing the database.
func (r *Repository) ForgetContent(ctx context.Context, sha256 string) error {
	if sha256 == "" {
		return nil
	}
	r.forgetContent(sha256)
	r.publish(ctx, forgetContentTopic(sha256))
	return nil
}

// forgetContent is ForgetContent in this process only.
func (r *Repository) forgetContent(sha256 string) {
	r.thumbPending.removeIf(func(_ mediaKey, e *mediaEntry) bool { return e.m.SHA256 == sha256 })
	if r.cache == nil {
		return
	}
	r.cacheGen.Add(1)
	items := make(map[mediaKey]struct{})
	r.cache.removeIf(func(k mediaKey, e *mediaEntry) bool {
		if e.m.SHA256 != sha256 {
			return false
		}
		items[k] = struct{}{}
		return true
	})
	r.thumbCache.removeIf(func(k mediaKey, e *mediaEntry) bool {
		if e.m.SHA256 == sha256 {
			return true
		}
		id, _, _ := strings.Cut(k.id, "/")
		_, ok := items[mediaKey{k.server, id}]
		return ok
	})
}

// RunPendingExpiry deletes expired pending media (reserved by /create and
// never uploaded), and the per-user upload history no rolling window reaches
// any more (pruneUploadHistory), once right away and then every
// PendingCleanupInterval, until ctx is done. Of the instances sharing the
// database, one sweeps at a time (the cluster lock pendingExpiryLock); the
// others skip that round. It blocks; run it in its own goroutine for as long as the
// repository lives, e.g. from the Caddy layer's shared-resource constructor
// with a context cancelled in the matching destructor:
//
//	ctx, stop := context.WithCancel(context.Background())
//	repo.Go("pending_expiry", func() { repo.RunPendingExpiry(ctx) })
//	// ... on teardown: stop(), repo.Drain(...), then close the stores.
//
// A pass that panics is recovered (logged, counted in
// caddy_matrix_media_panics_total{where="pending_expiry"}) and the loop goes
// on.
//
// Downloads waiting on a deleted item notice it on their next store check and
// answer 404 M_NOT_FOUND.
func (r *Repository) RunPendingExpiry(ctx context.Context) {
	t := time.NewTicker(r.cleanupInterval)
	defer t.Stop()
	for {
		_ = r.safely("pending_expiry", func() error {
			// One instance of the cluster sweeps at a time; the others skip
			// this round.
			lock, ok, err := r.cluster.TryLock(ctx, pendingExpiryLock)
			switch {
			case err != nil && ctx.Err() == nil:
				r.logger.Warn("cluster lock of the pending-expiry sweep unavailable; sweeping anyway", zap.Error(err))
			case err != nil:
				return nil
			case !ok:
				return nil
			default:
				defer lock.Release()
			}
			n, err := r.meta.DeleteExpiredPending(ctx, r.now())
			switch {
			case err != nil && ctx.Err() == nil:
				r.logger.Error("deleting expired pending media", zap.Error(err))
			case n > 0:
				r.logger.Info("deleted expired pending media", zap.Int64("count", n))
			}
			r.pruneUploadHistory(ctx)
			return nil
		})
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// AdminChecker tells whether a user is a media admin (auth.AdminPolicy
// implements it).
type AdminChecker interface {
	IsAdmin(ctx context.Context, user auth.User, token string) (bool, error)
}

// Site serves the media API of one server name. It implements http.Handler;
// requests whose path is not a media path (see IsMediaPath) are not for it.
type Site struct {
	cfg  SiteConfig
	repo *Repository
	auth auth.Authenticator

	// Precomputed per-site values.
	configBody   []byte
	mxcPrefix    string
	downloadWait time.Duration
	maxPending   int
	// quota is the validated quota policy (nil: no quotas).
	quota *quotaPolicy
	// rate are the site's rate limits; nil when there are none.
	rate *siteLimits
	// closeOnce unregisters the server name once (Close).
	closeOnce sync.Once
}

// NewSite builds a site on a shared repository, validating and defaulting cfg.
// authn checks access tokens (whoami against the site's homeserver). The
// site's server name becomes local to the repository (its media is served by
// every site of it) until Close.
func NewSite(cfg SiteConfig, repo *Repository, authn auth.Authenticator) (*Site, error) {
	if repo == nil {
		return nil, errors.New("building site: no repository")
	}
	if authn == nil {
		return nil, errors.New("building site: no authenticator")
	}
	if !matrix.ValidServerName(cfg.ServerName) {
		return nil, fmt.Errorf("building site: invalid server name %q", cfg.ServerName)
	}
	switch {
	case cfg.MaxUploadSize < 0:
		return nil, fmt.Errorf("building site: negative max upload size %d", cfg.MaxUploadSize)
	case cfg.PendingExpiry < 0:
		return nil, fmt.Errorf("building site: negative pending expiry %s", cfg.PendingExpiry)
	case cfg.MaxDownloadTimeout < 0:
		return nil, fmt.Errorf("building site: negative max download timeout %s", cfg.MaxDownloadTimeout)
	}
	if cfg.MaxUploadSize == 0 {
		cfg.MaxUploadSize = DefaultMaxUploadSize
	}
	if cfg.MaxPendingUploads == 0 {
		cfg.MaxPendingUploads = DefaultMaxPendingUploads
	}
	if cfg.PendingExpiry == 0 {
		cfg.PendingExpiry = DefaultPendingExpiry
	}
	if cfg.MaxDownloadTimeout == 0 {
		cfg.MaxDownloadTimeout = DefaultMaxDownloadTimeout
	}
	quota, err := newQuotaPolicy(cfg.Quotas)
	switch {
	case err != nil:
		return nil, fmt.Errorf("building site: %w", err)
	case quota != nil && repo.quotas == nil:
		return nil, errors.New("building site: quotas need a metadata store that keeps per-user usage (the SQL store)")
	}
	s := &Site{
		cfg:          cfg,
		repo:         repo,
		auth:         authn,
		configBody:   []byte(`{"m.upload.size":` + strconv.FormatInt(cfg.MaxUploadSize, 10) + `}`),
		mxcPrefix:    "mxc://" + cfg.ServerName + "/",
		downloadWait: min(DefaultDownloadTimeout, cfg.MaxDownloadTimeout),
		maxPending:   max(cfg.MaxPendingUploads, 0),
		quota:        quota,
	}
	if s.rate, err = newSiteLimits(cfg.ServerName, cfg.RateLimits); err != nil {
		return nil, fmt.Errorf("building site: %w", err)
	}
	repo.locals.register(cfg.ServerName)
	if quota != nil {
		repo.quotaSites.add(s)
	}
	return s, nil
}

// Config returns the site's configuration with defaults applied.
func (s *Site) Config() SiteConfig { return s.cfg }

// IsMediaPath reports whether the path (as in r.URL.Path) belongs to the media
// API: /_matrix/media/, /_matrix/client/v1/media/, the MSC3916 unstable client
// prefix and /_matrix/federation/v1/media/ (plus its MSC3916 unstable
// prefix). Everything else goes to the next handler (the operator's
// reverse_proxy).
func IsMediaPath(path string) bool {
	for _, p := range mediaPrefixes {
		if len(path) >= len(p) && path[:len(p)] == p {
			return true
		}
	}
	return false
}

var mediaPrefixes = [...]string{
	prefixLegacy,
	prefixClientV1,
	prefixClientUnstable,
	prefixFederationV1,
	prefixFederationUnstable,
}

// ServeHTTP serves one media request and always writes a response: Matrix JSON
// errors for anything that fails.
func (s *Site) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	h := w.Header()
	setCORS(h)

	if r.Method == http.MethodOptions {
		// CORS preflight: no auth, no endpoint logic.
		w.WriteHeader(http.StatusNoContent)
		s.repo.metrics.observe(epOptions, http.StatusNoContent, start)
		return
	}

	rt := parseRoute(r.URL.EscapedPath())
	// A response cut mid-body (panic(http.ErrAbortHandler): the client
	// left, or the source failed) is still counted: 499 when the client
	// went away, else 500.
	defer func() {
		if v := recover(); v != nil {
			st := http.StatusInternalServerError
			if r.Context().Err() != nil {
				st = statusClientGone
			}
			s.repo.metrics.observe(rt.ep, st, start)
			panic(v)
		}
	}()
	var status int
	switch {
	case rt.ep == epUnknown:
		status = writeErr(w, matrix.Unrecognized("Unrecognized request"))
	case !rt.allows(r.Method):
		h["Allow"] = allowHeaders[rt.ep]
		status = writeErr(w, matrix.MethodNotAllowed("Method "+r.Method+" not allowed on this endpoint"))
	default:
		if rt.ep == epUpload || rt.ep == epCreate || rt.ep == epUploadPut {
			// Early refusals of requests with a body; the lingering read
			// runs after the request was counted (deferred).
			var finish func()
			w, r, finish = guardBody(w, r)
			defer finish()
		}
		switch rt.ep {
		case epUpload:
			status = s.serveUpload(w, r)
		case epCreate:
			status = s.serveCreate(w, r)
		case epUploadPut:
			status = s.servePut(w, r, &rt)
		case epDownload:
			status = s.serveDownload(w, r, &rt)
		case epConfig:
			status = s.serveConfig(w, r)
		case epThumbnail:
			status = s.serveThumbnail(w, r, &rt)
		case epFedDownload, epFedThumbnail:
			status = s.serveFederation(w, r, &rt)
		case epPreview:
			status = s.servePreview(w, r)
		case epUsage:
			status = s.serveUsage(w, r)
		}
	}
	s.repo.metrics.observe(rt.ep, status, start)
	if ce := s.repo.logger.Check(zapcore.DebugLevel, "media request"); ce != nil {
		ce.Write(
			zap.String("method", r.Method),
			zap.String("endpoint", endpointNames[rt.ep]),
			zap.Int("status", status),
			zap.Duration("duration", time.Since(start)),
		)
	}
}

// writeErr writes a Matrix error and returns its status, for metrics.
func writeErr(w http.ResponseWriter, e *matrix.Error) int {
	matrix.WriteError(w, e)
	return e.Status
}

// writeJSON writes a 200 JSON body.
func writeJSON(w http.ResponseWriter, body []byte) int {
	h := w.Header()
	h["Content-Type"] = hdrJSON
	h["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
	return http.StatusOK
}

// internalError logs err and answers 500 M_UNKNOWN without exposing it; an
// error wrapping storage.ErrUnavailable (a database or datastore that cannot
// be reached) answers 503 with Retry-After instead, since the request may
// succeed later.
func (s *Site) internalError(w http.ResponseWriter, msg string, err error) int {
	s.repo.logger.Error(msg, zap.String("server_name", s.cfg.ServerName), zap.Error(err))
	if errors.Is(err, storage.ErrUnavailable) {
		return writeErr(w, storageUnavailable(w))
	}
	return writeErr(w, matrix.Unknown(http.StatusInternalServerError, "Internal server error"))
}

// storageUnavailable sets Retry-After and returns the 503 error of a request
// that failed because a store was unreachable.
func storageUnavailable(w http.ResponseWriter) *matrix.Error {
	w.Header().Set("Retry-After", "5")
	return matrix.Unknown(http.StatusServiceUnavailable, "Media storage is unavailable, try again later")
}

// authenticate checks the request's access token. On failure it writes the
// error response and returns its status; on success the status is 0. Guests
// are refused with 403 M_GUEST_ACCESS_FORBIDDEN unless guestOK.
func (s *Site) authenticate(w http.ResponseWriter, r *http.Request, guestOK bool) (auth.User, int) {
	creds := auth.RequestCredentials(r)
	if creds.Token == "" {
		return auth.User{}, writeErr(w, matrix.MissingToken("Missing access token"))
	}
	if s.rate != nil {
		creds.Gate = s.checkGate(r)
	}
	user, err := s.auth.Authenticate(r.Context(), creds)
	if err != nil {
		var open *auth.CircuitOpenError
		var failed *auth.FailedChecksError
		switch {
		case errors.As(err, &failed):
			return auth.User{}, s.failedChecks(w, failed)
		case errors.Is(err, auth.ErrUnknownToken):
			return auth.User{}, writeErr(w, matrix.UnknownToken("Unrecognised access token"))
		case errors.Is(err, auth.ErrForbidden):
			return auth.User{}, writeErr(w, matrix.Forbidden("The application service may not act as this user"))
		case errors.As(err, &open):
			w.Header().Set("Retry-After", strconv.Itoa(int(open.RetryAfter/time.Second)+1))
			return auth.User{}, writeErr(w, matrix.Unknown(http.StatusBadGateway, "The homeserver is failing; access tokens cannot be checked for now"))
		case errors.Is(err, auth.ErrHomeserverTimeout):
			s.repo.logger.Warn("homeserver timed out checking an access token", zap.Error(err))
			return auth.User{}, writeErr(w, matrix.Unknown(http.StatusGatewayTimeout, "Timed out checking the access token with the homeserver"))
		default:
			if r.Context().Err() == nil {
				s.repo.logger.Warn("homeserver failed checking an access token", zap.Error(err))
			}
			return auth.User{}, writeErr(w, matrix.Unknown(http.StatusBadGateway, "Could not check the access token with the homeserver"))
		}
	}
	if user.IsGuest && !guestOK {
		return auth.User{}, writeErr(w, matrix.GuestAccessForbidden("Guest access is not allowed on this endpoint"))
	}
	return user, 0
}

// serveConfig answers GET config with {"m.upload.size": MaxUploadSize};
// on a site with quotas, the caller's rule decides m.upload.size and adds
// its storage limits (configBodyFor).
func (s *Site) serveConfig(w http.ResponseWriter, r *http.Request) int {
	user, st := s.authenticate(w, r, false)
	if st != 0 {
		return st
	}
	return writeJSON(w, s.configBodyFor(s.quotaFor(r, user)))
}
