// Package caddymodule plugs the Matrix media repository into Caddy. It
// registers two modules and their Caddyfile syntax:
//
//   - the matrix_media app (global option "matrix_media"), which owns the state
//     every site shares: the metadata database, the blob store, the in-memory
//     media cache, the HTTP client for homeserver calls and the metrics;
//   - the http.handlers.matrix_media handler (directive "matrix_media"), one
//     per site, which serves the Matrix media endpoints for one server name
//     and passes every other request to the next handler, normally a
//     reverse_proxy to the homeserver.
//
// All media logic lives in matrix/mediaapi; this package only adapts its
// configuration and lifecycle to Caddy's.
package caddymodule

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/preview"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/retention"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(App{})
}

// Defaults of the app's configuration.
const (
	// DefaultMediaCacheSize is the default App.MediaCacheSize.
	DefaultMediaCacheSize = 65536
	// DefaultMaxUploadSize is the default App.MaxUploadSize: 100 MiB.
	DefaultMaxUploadSize int64 = mediaapi.DefaultMaxUploadSize
)

// Database drivers accepted in Database.Driver.
const (
	DriverSQLite   = "sqlite"
	DriverPostgres = "postgres"
)

// App is the matrix_media app: the storage and state shared by every site that
// serves Matrix media in this Caddy instance. Sites themselves are configured
// with the http.handlers.matrix_media handler; the app needs no configuration
// at all when its defaults suit (an SQLite database and a blob directory under
// Caddy's data directory).
//
// The stores are kept across config reloads as long as the database, the
// storage path and the media cache size stay the same, so a reload neither
// reconnects to the database nor empties the media cache, and requests in
// flight during a reload complete normally.
//
// The database DSN and the storage path may contain the global placeholders
// {env.NAME} and {file./path/to/secret}; they are resolved when the config is
// loaded, so secrets need not appear in the JSON config (avoid the Caddyfile's
// parse-time {$NAME} form for secrets: its value is written into the config).
type App struct {
	// Database selects the metadata database. Default: SQLite, in the file
	// matrix_media/media.db under Caddy's data directory.
	Database *Database `json:"database,omitempty"`

	// Datastores are where media content is kept: local directories and S3
	// buckets, each taking some kinds of media (uploads, remote media,
	// thumbnails). Default: one file datastore named "default" at
	// StoragePath taking every kind. Cannot be combined with StoragePath.
	Datastores []DatastoreConfig `json:"datastores,omitempty"`

	// StoragePath is the directory holding media content (content-addressed
	// blobs, each stored once however often it is uploaded). Default:
	// matrix_media/media under Caddy's data directory.
	StoragePath string `json:"storage_path,omitempty"`

	// MediaCacheSize is how many media records are kept in memory, so that
	// downloads of popular media cost no database round trip. Default 65536.
	MediaCacheSize int `json:"media_cache_size,omitempty"`

	// MaxUploadSize is the largest upload accepted, in bytes, for sites that do
	// not set their own max_upload_size. Default 104857600 (100 MiB).
	MaxUploadSize int64 `json:"max_upload_size,omitempty"`

	// TokenCacheSize bounds how many access tokens (valid and rejected) are
	// cached, for all sites together; the least recently used is evicted
	// beyond it. An entry takes about 200 bytes. Default 100000.
	TokenCacheSize int `json:"token_cache_size,omitempty"`

	// RateLimitKeys bounds how many rate-limit buckets (one per client IP
	// or user, per class and site) are kept in memory when redis is not
	// set; beyond it the least recently used is forgotten (that key starts
	// again with a full bucket). A bucket takes about 100-200 bytes.
	// Default 100000.
	RateLimitKeys int `json:"rate_limit_keys,omitempty"`

	// TokenCacheTTL is how long a valid access token is trusted without
	// asking the homeserver again. Logouts through the matrix_media
	// handler invalidate tokens at once (on every instance sharing Redis),
	// but a token revoked another way (an admin deactivating a user, a
	// logout sent straight to the homeserver) keeps working for media until
	// its entry expires: shorter is safer, longer saves homeserver calls.
	// Default 5m.
	TokenCacheTTL caddy.Duration `json:"token_cache_ttl,omitempty"`

	// TokenNegativeTTL is how long a token the homeserver rejected is
	// rejected without asking again. Default 30s.
	TokenNegativeTTL caddy.Duration `json:"token_negative_ttl,omitempty"`

	// Redis is the URL of a Redis server (redis://[user:password@]host:port/db
	// or rediss:// for TLS) shared by several Caddy instances: token
	// invalidations (logouts) are published there so that every instance
	// drops the token. Default: none, invalidations stay in this process.
	// Placeholders {env.*} and {file.*} are resolved.
	Redis string `json:"redis,omitempty"`

	// BreakerThreshold is how many consecutive failed token checks against
	// one homeserver (unreachable, 5xx, timeout) open its circuit breaker:
	// while open, requests needing a homeserver call get 502 at once.
	// Default 5.
	BreakerThreshold int `json:"breaker_threshold,omitempty"`

	// BreakerCooldown is how long an open breaker refuses calls before one
	// probe call is let through. Default 10s.
	BreakerCooldown caddy.Duration `json:"breaker_cooldown,omitempty"`

	// Thumbnails configures thumbnail generation. Default: on, with the
	// spec's suggested sizes.
	Thumbnails *ThumbnailsConfig `json:"thumbnails,omitempty"`

	// Previews configures URL previews (preview_url). Default: on, through
	// an SSRF guard.
	Previews *PreviewsConfig `json:"previews,omitempty"`

	// Federation holds the app-wide federation settings (trusted CAs,
	// allowed private networks, remote size limit). Sites federate when
	// their handler has a signing_key.
	Federation *FederationConfig `json:"federation,omitempty"`

	// GC configures the background collector of orphan blobs. Default: every
	// hour, blobs unreferenced for an hour.
	GC *GCConfig `json:"gc,omitempty"`

	// Retention says what ages out: remote media by age or beyond a byte
	// budget, thumbnails by age. Default: nothing ages out.
	Retention *RetentionConfig `json:"retention,omitempty"`

	// Jobs times the persisted background jobs (remote media purges,
	// retention): how long an instance holds a job without renewing it,
	// and how often instances look for jobs to resume. Default: a lease of
	// 1m, polled every 30s.
	Jobs *JobsConfig `json:"jobs,omitempty"`

	res *resources
	// live is res while this config holds it, for readers on other
	// goroutines (the admin API) that may run while Cleanup releases it.
	// A pointer, set once in Provision, because the App struct is copied.
	live    *atomic.Pointer[resources]
	auth    *authState
	poolKey string
	// gcPolicy is this config's orphan collector policy, applied in Start.
	gcPolicy  gcPolicy
	previewer *preview.Previewer
	transport *http.Transport
	logger    *zap.Logger

	// retentionPolicy is this config's retention policy, applied in Start.
	retentionPolicy retention.Policy
}

// Database names the metadata database.
type Database struct {
	// Driver is "sqlite" or "postgres". Default "sqlite".
	Driver string `json:"driver,omitempty"`

	// DSN locates the database. For SQLite it is the path of the database
	// file (created if missing); for PostgreSQL it is a connection string in
	// URL or key=value form, e.g.
	// "postgres://media:{env.MEDIA_DB_PASSWORD}@127.0.0.1/media?sslmode=disable".
	// Default for SQLite: matrix_media/media.db under Caddy's data directory;
	// required for PostgreSQL. Placeholders {env.*} and {file.*} are resolved.
	//
	// An SQLite database serves one Caddy process: it is locked (the file
	// <dsn>.instance-lock, which holds the process ID) from provisioning
	// until its store is closed, and a second process configured with it
	// fails to provision, naming the holder. Config reloads of the same
	// process share the lock. Several instances need PostgreSQL.
	DSN string `json:"dsn,omitempty"`

	// Synchronous is SQLite's commit durability: "full" (the default: the
	// write-ahead log is fsynced at every commit, so an answered upload's
	// row survives a power loss or kernel crash, as its blob does) or
	// "normal" (the log is fsynced only at checkpoints: a committed row
	// survives a crash of Caddy, but after a power loss the last commits
	// may be lost and their blobs, synced before, collected as orphans;
	// one disk flush less per write). SQLite only; PostgreSQL's durability
	// is the server's synchronous_commit.
	Synchronous string `json:"synchronous,omitempty"`
}

// SQLite commit durability settings (Database.Synchronous).
const (
	SynchronousNormal = "normal"
	SynchronousFull   = "full"
)

// checkSynchronous checks a Database.Synchronous value for driver: empty,
// or normal/full with SQLite.
func checkSynchronous(driver, v string) error {
	switch v {
	case "":
		return nil
	case SynchronousNormal, SynchronousFull:
		if driver != DriverSQLite {
			return errors.New("synchronous applies to sqlite only (PostgreSQL's is the server's synchronous_commit)")
		}
		return nil
	}
	return fmt.Errorf("unknown synchronous %q (want %q or %q)", v, SynchronousNormal, SynchronousFull)
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "matrix_media",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision resolves the configuration, opens (or reuses, after a reload) the
// shared stores and registers the metrics with this config's registry.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	settings, err := a.resolveSettings(caddy.NewReplacer())
	if err != nil {
		return err
	}
	if a.MaxUploadSize == 0 {
		a.MaxUploadSize = DefaultMaxUploadSize
	}
	if a.MaxUploadSize < 0 {
		return fmt.Errorf("max_upload_size must not be negative, got %d", a.MaxUploadSize)
	}

	if a.Federation != nil && a.Federation.MaxRemoteSize < 0 {
		return fmt.Errorf("federation: max_remote_size must not be negative, got %d", a.Federation.MaxRemoteSize)
	}
	settings.maxRemoteSize = a.remoteMaxSize()
	if f := a.Federation; f != nil {
		if f.MaxFetches < 0 || f.MaxFetchesPerServer < 0 {
			return fmt.Errorf("federation: max_fetches and max_fetches_per_server must not be negative")
		}
		settings.maxFetches, settings.maxFetchesPerServer = f.MaxFetches, f.MaxFetchesPerServer
	}
	if a.gcPolicy, err = gcPolicyOf(a.GC); err != nil {
		return err
	}
	if a.retentionPolicy, err = retentionPolicyOf(a.Retention); err != nil {
		return err
	}
	if settings.jobs, err = jobTimingsOf(a.Jobs); err != nil {
		return err
	}
	key := settings.key()
	val, reused, err := resourcePool.LoadOrNew(key, func() (caddy.Destructor, error) {
		return openResources(ctx, settings, a.logger)
	})
	if err != nil {
		return fmt.Errorf("opening matrix_media stores: %w", err)
	}
	a.res = val.(*resources)
	a.live = new(atomic.Pointer[resources])
	a.live.Store(a.res)
	a.poolKey = key
	a.logger.Info("matrix_media storage ready",
		zap.String("database_driver", settings.driver),
		zap.Strings("datastores", settings.datastoreNames()),
		zap.Bool("reused", reused))

	if err := registerCollectors(ctx.GetMetricsRegistry(), a.res.metrics.Collectors()); err != nil {
		return err
	}
	if err := registerCollectors(ctx.GetMetricsRegistry(), a.res.gc.metrics.collectors()); err != nil {
		return err
	}
	if err := registerCollectors(ctx.GetMetricsRegistry(), a.res.jobs.metrics.Collectors()); err != nil {
		return err
	}
	if err := registerCollectors(ctx.GetMetricsRegistry(), a.res.adminMetrics.Collectors()); err != nil {
		return err
	}
	if err := registerCollectors(ctx.GetMetricsRegistry(), a.res.clusterMetrics.collectors); err != nil {
		return err
	}
	if err := registerCollectors(ctx.GetMetricsRegistry(), a.res.capacityMetrics); err != nil {
		return err
	}

	if err := a.provisionAuth(ctx); err != nil {
		return err
	}
	if err := registerCollectors(ctx.GetMetricsRegistry(), a.auth.metrics.Collectors()); err != nil {
		return err
	}
	if err := a.provisionLimiter(ctx); err != nil {
		return err
	}
	if a.previewer, err = newPreviewer(a.Previews); err != nil {
		return err
	}
	a.transport = newHomeserverTransport()
	return nil
}

// provisionAuth validates the token-cache settings and acquires the shared
// token cache (and Redis bus).
func (a *App) provisionAuth(ctx caddy.Context) error {
	for _, c := range []struct {
		name string
		val  int64
	}{
		{"token_cache_size", int64(a.TokenCacheSize)},
		{"token_cache_ttl", int64(a.TokenCacheTTL)},
		{"token_negative_ttl", int64(a.TokenNegativeTTL)},
		{"breaker_threshold", int64(a.BreakerThreshold)},
		{"breaker_cooldown", int64(a.BreakerCooldown)},
	} {
		if c.val < 0 {
			return fmt.Errorf("%s must not be negative", c.name)
		}
	}
	size := a.TokenCacheSize
	if size == 0 {
		size = auth.DefaultTokenCacheSize
	}
	redisURL, err := caddy.NewReplacer().ReplaceOrErr(a.Redis, true, true)
	if err != nil {
		return fmt.Errorf("redis: resolving placeholders: %w", err)
	}
	st, err := acquireAuthState(ctx, size, time.Duration(a.TokenCacheTTL), time.Duration(a.TokenNegativeTTL), redisURL, a.logger)
	if err != nil {
		return err
	}
	a.auth = st
	if redisURL != "" {
		a.logger.Info("token invalidations shared through redis")
	}
	return nil
}

// breakerOptions are the circuit-breaker settings for homeserver calls.
func (a *App) breakerOptions() auth.BreakerOptions {
	return auth.BreakerOptions{Threshold: a.BreakerThreshold, Cooldown: time.Duration(a.BreakerCooldown)}
}

// resolveSettings applies defaults, resolves placeholders and validates the
// store settings. Errors never include the DSN, which may hold a password.
func (a *App) resolveSettings(repl *caddy.Replacer) (storeSettings, error) {
	var s storeSettings
	driver, dsn := DriverSQLite, ""
	if a.Database != nil {
		if a.Database.Driver != "" {
			driver = a.Database.Driver
		}
		dsn = a.Database.DSN
	}
	s.driver = driver
	if a.Database != nil {
		if err := checkSynchronous(driver, a.Database.Synchronous); err != nil {
			return s, fmt.Errorf("database: %w", err)
		}
	}
	switch driver {
	case DriverSQLite:
		s.sqliteFullSync = a.Database == nil || a.Database.Synchronous != SynchronousNormal
		if dsn == "" {
			dsn = filepath.Join(caddy.AppDataDir(), "matrix_media", "media.db")
		}
	case DriverPostgres:
		if dsn == "" {
			return s, errors.New("database: a dsn is required for the postgres driver")
		}
	default:
		return s, fmt.Errorf("database: unknown driver %q (want %q or %q)", driver, DriverSQLite, DriverPostgres)
	}
	resolved, err := repl.ReplaceOrErr(dsn, true, true)
	if err != nil {
		// The error names the placeholder, not its value.
		return s, fmt.Errorf("database: resolving dsn placeholders: %w", err)
	}
	if driver == DriverSQLite {
		if resolved, err = absPath(resolved); err != nil {
			return s, fmt.Errorf("database: %w", err)
		}
	}
	s.dsn = resolved

	if s.thumbnails, err = resolveThumbnails(a.Thumbnails); err != nil {
		return s, err
	}
	if len(a.Datastores) > 0 {
		if a.StoragePath != "" {
			return s, errors.New("storage_path and datastores cannot be combined: declare the directory as a file datastore")
		}
		if s.datastores, err = resolveDatastores(a.Datastores, repl); err != nil {
			return s, err
		}
		s.storagePath = ""
		return s.withCacheSize(a.MediaCacheSize)
	}
	storagePath := a.StoragePath
	if storagePath == "" {
		storagePath = filepath.Join(caddy.AppDataDir(), "matrix_media", "media")
	}
	if storagePath, err = repl.ReplaceOrErr(storagePath, true, true); err != nil {
		return s, fmt.Errorf("storage_path: resolving placeholders: %w", err)
	}
	if s.storagePath, err = absPath(storagePath); err != nil {
		return s, fmt.Errorf("storage_path: %w", err)
	}
	s.datastores = defaultDatastores(s.storagePath)
	return s.withCacheSize(a.MediaCacheSize)
}

// withCacheSize sets the media cache size, with its default.
func (s storeSettings) withCacheSize(n int) (storeSettings, error) {
	switch {
	case n == 0:
		s.mediaCacheSize = DefaultMediaCacheSize
	case n < 0:
		return s, fmt.Errorf("media_cache_size must not be negative, got %d", n)
	default:
		s.mediaCacheSize = n
	}
	return s, nil
}

// Start implements caddy.App. Everything requests need is ready once
// Provision returns (apps start in no fixed order, and sites may serve before
// this runs). Start only hands the orphan collector and the retention
// scheduler this config's policies: here, once the whole config has
// provisioned, so that a reload that fails in Provision leaves the running
// config's policies in place.
func (a *App) Start() error {
	a.res.gc.configure(a.gcPolicy)
	a.res.jobs.retention.SetGrace(a.gcPolicy.grace)
	a.res.jobs.retention.SetPolicy(a.retentionPolicy)
	return nil
}

// Stop implements caddy.App. The shared stores are released in Cleanup, after
// the new config (on a reload) has taken them over.
func (a *App) Stop() error { return nil }

// Cleanup releases this config's reference to the shared stores; the last
// reference closes them. It is safe after a failed or partial Provision.
func (a *App) Cleanup() error {
	if a.transport != nil {
		a.transport.CloseIdleConnections()
	}
	var authErr error
	if a.auth != nil {
		authErr = a.auth.release()
		a.auth = nil
	}
	if authErr != nil {
		authErr = fmt.Errorf("releasing matrix_media token cache: %w", authErr)
	}
	if a.res == nil {
		return authErr
	}
	if a.live != nil {
		a.live.Store(nil)
	}
	a.res = nil
	if _, err := resourcePool.Delete(a.poolKey); err != nil {
		return errors.Join(authErr, fmt.Errorf("releasing matrix_media stores: %w", err))
	}
	return authErr
}

// newHomeserverTransport returns the transport shared by every site's
// homeserver client (whoami calls). Sites wrap it in their own http.Client to
// apply their own timeout.
func newHomeserverTransport() *http.Transport {
	return &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// registerCollectors registers cs with reg. A collector that is already
// registered (the same one, from an earlier Provision against the same
// registry) is not an error.
func registerCollectors(reg prometheus.Registerer, cs []prometheus.Collector) error {
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				continue
			}
			return fmt.Errorf("registering matrix_media metrics: %w", err)
		}
	}
	return nil
}

// Interface guards.
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
