package caddymodule

import (
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// DefaultHomeserverTimeout is the default Handler.HomeserverTimeout.
const DefaultHomeserverTimeout = 10 * time.Second

// Handler serves the Matrix media API of one server name: uploads (plain and
// asynchronous), downloads, and the media config endpoint, on both the
// authenticated /_matrix/client/v1/media/ paths and the legacy /_matrix/media/
// paths. Access tokens are checked by asking the homeserver (whoami).
//
// Requests whose path is not a media path pass to the next handler untouched,
// so the handler sits naturally in front of a reverse_proxy to the homeserver:
//
//	example.org {
//		matrix_media {
//			server_name example.org
//			homeserver http://127.0.0.1:8008
//		}
//		reverse_proxy 127.0.0.1:8008
//	}
//
// Media requests are always answered by this handler, with a Matrix JSON error
// body when they fail; they never reach the next handler.
//
// Content and metadata live in the matrix_media app, shared by all sites; the
// app is created with its defaults when the config does not set it.
type Handler struct {
	// ServerName is the Matrix server name of this site, as it appears in
	// mxc://<server_name>/<media_id> URIs (usually the domain part of the
	// user IDs, which need not be the host serving the API). Required.
	ServerName string `json:"server_name,omitempty"`

	// Homeserver is the base URL of the homeserver's client-server API, used
	// to check access tokens (GET /_matrix/client/v3/account/whoami), e.g.
	// "http://127.0.0.1:8008". Required. Placeholders {env.*} and {file.*}
	// are resolved.
	Homeserver string `json:"homeserver,omitempty"`

	// HomeserverTimeout bounds one access-token check against the
	// homeserver; a homeserver that does not answer in time gives the client
	// 504. Default 10s.
	HomeserverTimeout caddy.Duration `json:"homeserver_timeout,omitempty"`

	// MaxUploadSize is the largest upload accepted, in bytes; larger uploads
	// get 413 M_TOO_LARGE. It is also what the media config endpoint
	// advertises as m.upload.size. Default: the app's max_upload_size
	// (itself 100 MiB by default).
	MaxUploadSize int64 `json:"max_upload_size,omitempty"`

	// MaxPendingUploads is how many media IDs reserved with /create (and not
	// yet uploaded nor expired) one user may hold at once; more get 429
	// M_LIMIT_EXCEEDED. Default 5; -1 means no limit.
	MaxPendingUploads int `json:"max_pending_uploads,omitempty"`

	// PendingExpiry is how long a media ID reserved with /create stays
	// valid without content. Default 24h.
	PendingExpiry caddy.Duration `json:"pending_expiry,omitempty"`

	// MaxDownloadTimeout caps the timeout_ms a client may ask for when it
	// downloads media that is reserved but not uploaded yet. Default 60s.
	MaxDownloadTimeout caddy.Duration `json:"max_download_timeout,omitempty"`

	// FreezeLegacy makes the unauthenticated legacy download and thumbnail
	// endpoints (/_matrix/media/v3/download, /thumbnail) answer 404
	// M_NOT_FOUND for media created at or after FreezeSince, as the Matrix
	// spec recommends since v1.11. Default false.
	FreezeLegacy bool `json:"freeze_legacy,omitempty"`

	// FreezeSince is the freeze cut-off as an RFC 3339 time, e.g.
	// "2024-09-01T00:00:00Z"; only meaningful with FreezeLegacy. Default:
	// unset, which freezes every media item.
	FreezeSince time.Time `json:"freeze_since,omitzero"`

	site *mediaapi.Site
	res  *resources
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.matrix_media",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision validates the configuration, finds (or creates with defaults) the
// matrix_media app and builds the site on the app's shared repository.
func (h *Handler) Provision(ctx caddy.Context) error {
	if h.ServerName == "" {
		return errors.New("server_name is required: the Matrix server name used in mxc:// URIs of this site")
	}
	if !matrix.ValidServerName(h.ServerName) {
		return fmt.Errorf("server_name %q is not a valid Matrix server name", h.ServerName)
	}
	if h.Homeserver == "" {
		return errors.New("homeserver is required: the base URL of the homeserver's client-server API, e.g. http://127.0.0.1:8008")
	}
	homeserver, err := caddy.NewReplacer().ReplaceOrErr(h.Homeserver, true, true)
	if err != nil {
		return fmt.Errorf("homeserver: resolving placeholders: %w", err)
	}
	if !h.FreezeSince.IsZero() && !h.FreezeLegacy {
		return errors.New("freeze_since is set but freeze_legacy is not enabled")
	}
	timeout := time.Duration(h.HomeserverTimeout)
	switch {
	case timeout == 0:
		timeout = DefaultHomeserverTimeout
	case timeout < 0:
		return fmt.Errorf("homeserver_timeout must be positive, got %s", timeout)
	}
	for _, d := range []struct {
		name string
		val  caddy.Duration
	}{{"pending_expiry", h.PendingExpiry}, {"max_download_timeout", h.MaxDownloadTimeout}} {
		if d.val < 0 {
			return fmt.Errorf("%s must not be negative, got %s", d.name, time.Duration(d.val))
		}
	}
	if h.MaxUploadSize < 0 {
		return fmt.Errorf("max_upload_size must not be negative, got %d", h.MaxUploadSize)
	}

	appIface, err := ctx.App("matrix_media")
	if err != nil {
		return fmt.Errorf("loading matrix_media app: %w", err)
	}
	app, ok := appIface.(*App)
	if !ok || app.res == nil {
		return errors.New("loading matrix_media app: app is not provisioned")
	}

	authn, err := auth.NewWhoami(homeserver, &http.Client{Transport: app.transport, Timeout: timeout})
	if err != nil {
		return fmt.Errorf("homeserver: %w", err)
	}
	maxUpload := h.MaxUploadSize
	if maxUpload == 0 {
		maxUpload = app.MaxUploadSize
	}
	site, err := mediaapi.NewSite(mediaapi.SiteConfig{
		ServerName:         h.ServerName,
		MaxUploadSize:      maxUpload,
		MaxPendingUploads:  h.MaxPendingUploads,
		PendingExpiry:      time.Duration(h.PendingExpiry),
		MaxDownloadTimeout: time.Duration(h.MaxDownloadTimeout),
		FreezeLegacy:       h.FreezeLegacy,
		FreezeSince:        h.FreezeSince,
	}, app.res.repo, authn)
	if err != nil {
		return fmt.Errorf("configuring media site %s: %w", h.ServerName, err)
	}
	h.site = site
	h.res = app.res
	return nil
}

// ServeHTTP serves media requests and passes every other request to next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if !mediaapi.IsMediaPath(r.URL.Path) {
		return next.ServeHTTP(w, r)
	}
	if !h.res.acquire() {
		// Only reachable by a request that arrived at a config being unloaded
		// after its stores were released; the client retries on the new one.
		w.Header().Set("Retry-After", "1")
		matrix.WriteError(w, matrix.Unknown(http.StatusServiceUnavailable, "media repository is reloading, retry"))
		return nil
	}
	defer h.res.release()
	h.site.ServeHTTP(w, r)
	return nil
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
