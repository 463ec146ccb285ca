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
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"

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

	res       *resources
	poolKey   string
	transport *http.Transport
	logger    *zap.Logger
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
	DSN string `json:"dsn,omitempty"`
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

	key := settings.key()
	val, reused, err := resourcePool.LoadOrNew(key, func() (caddy.Destructor, error) {
		return openResources(ctx, settings, a.logger)
	})
	if err != nil {
		return fmt.Errorf("opening matrix_media stores: %w", err)
	}
	a.res = val.(*resources)
	a.poolKey = key
	a.logger.Info("matrix_media storage ready",
		zap.String("database_driver", settings.driver),
		zap.String("storage_path", settings.storagePath),
		zap.Bool("reused", reused))

	if err := registerCollectors(ctx.GetMetricsRegistry(), a.res.metrics.Collectors()); err != nil {
		return err
	}
	a.transport = newHomeserverTransport()
	return nil
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
	switch driver {
	case DriverSQLite:
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

	s.mediaCacheSize = a.MediaCacheSize
	if s.mediaCacheSize == 0 {
		s.mediaCacheSize = DefaultMediaCacheSize
	}
	if s.mediaCacheSize < 0 {
		return s, fmt.Errorf("media_cache_size must not be negative, got %d", s.mediaCacheSize)
	}
	return s, nil
}

// Start implements caddy.App. Everything the app needs is ready once
// Provision returns (apps start in no fixed order, and sites may serve before
// this runs), so there is nothing left to start.
func (a *App) Start() error { return nil }

// Stop implements caddy.App. The shared stores are released in Cleanup, after
// the new config (on a reload) has taken them over.
func (a *App) Stop() error { return nil }

// Cleanup releases this config's reference to the shared stores; the last
// reference closes them. It is safe after a failed or partial Provision.
func (a *App) Cleanup() error {
	if a.transport != nil {
		a.transport.CloseIdleConnections()
	}
	if a.res == nil {
		return nil
	}
	a.res = nil
	if _, err := resourcePool.Delete(a.poolKey); err != nil {
		return fmt.Errorf("releasing matrix_media stores: %w", err)
	}
	return nil
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
