package caddymodule

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaadmin"
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
// body when they fail; they never reach the next handler. So are the media
// paths of Synapse's admin API (quarantine, protect, delete, purge, user
// media, statistics: see matrix/mediaadmin), for the site's media admins;
// the rest of /_synapse/admin/ goes to the next handler like any other path.
// So are the module's media exports, GET /_matrix_media/v1/export/user/{userId}
// and /_matrix_media/v1/export/server/{serverName} (ZIP archives, see
// package mediaarchive), for media admins and, with allow_user_export, for
// users exporting their own media.
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

	// Appservices are appservice registrations given inline. A request
	// bearing an appservice's as_token is authenticated without asking the
	// homeserver, as the appservice's sender or, with the user_id query
	// parameter, as a user in its namespaces (403 M_FORBIDDEN otherwise).
	// Default: none.
	Appservices []AppserviceConfig `json:"appservices,omitempty"`

	// AppserviceRegistrations are paths of appservice registration files
	// (the YAML files given to the homeserver), read at provision time.
	// Default: none.
	AppserviceRegistrations []string `json:"appservice_registrations,omitempty"`

	// Admins are the Matrix user IDs of media admins. Admins are not held to
	// max_pending_uploads and may use the media admin endpoints. Default:
	// none.
	Admins []string `json:"admins,omitempty"`

	// DetectHomeserverAdmins also makes the homeserver's admins media
	// admins, found with Synapse's admin API (cached for token_cache_ttl).
	// Homeservers without it (Dendrite) yield no admins. Default false.
	DetectHomeserverAdmins bool `json:"detect_homeserver_admins,omitempty"`

	// AdminTokens are shared secrets that authenticate as a media admin
	// without any homeserver call, for automation. Placeholders {env.*} and
	// {file.*} are resolved (keep secrets out of the config that way).
	// Default: none.
	AdminTokens []AdminTokenConfig `json:"admin_tokens,omitempty"`

	// AllowUserExport lets every user of the site download an archive of
	// their own media (GET /_matrix_media/v1/export/user/{their user ID});
	// media admins may always export any local user and the whole server.
	// Default false.
	AllowUserExport bool `json:"allow_user_export,omitempty"`

	// SigningKey is the path of this site's federation signing key file
	// (Synapse format "ed25519 <id> <seed>", or Dendrite's PEM; create one
	// with "caddy matrix-media generate-key" and add it to the homeserver's
	// key file with "caddy matrix-media merge-key" so that the homeserver
	// publishes it). With it, the site fetches remote media over federation
	// (signed as server_name) and serves its media to other servers on
	// /_matrix/federation/v1/media/*. Default: none (no federation).
	// Placeholders {env.*} and {file.*} are resolved.
	SigningKey string `json:"signing_key,omitempty"`

	// Quotas are per-user quotas of this site (see QuotaConfig in
	// quotas.go and the README's "Fair use: quotas"). Default: none.
	Quotas *QuotaConfig `json:"quotas,omitempty"`
	// RateLimits are the site's rate limits per client IP, per user and
	// (federation) per remote server (see RateLimitsConfig for the classes
	// and their defaults). Default: none.
	RateLimits *RateLimitsConfig `json:"rate_limits,omitempty"`

	site *mediaapi.Site
	// clientIP passes Caddy's client_ip to the media API (rate limits on).
	clientIP bool
	// admin answers Synapse's media admin API for this site (nil when the
	// metadata store cannot administer media).
	admin  *mediaadmin.SiteAPI
	logout *auth.LogoutProxy
	res    *resources
	fed    *federation.MediaClient
}

// AppserviceConfig is one appservice registration given in the config.
type AppserviceConfig struct {
	// ID is the registration's unique id. Required.
	ID string `json:"id,omitempty"`
	// ASToken is the token the appservice uses with the homeserver.
	// Required. Placeholders {env.*} and {file.*} are resolved.
	ASToken string `json:"as_token,omitempty"`
	// SenderLocalpart is the localpart of the appservice's own user.
	// Required.
	SenderLocalpart string `json:"sender_localpart,omitempty"`
	// UserNamespaces are regular expressions of the user IDs the appservice
	// may act as (matched from the start of the ID, as Synapse does).
	// Default: none (only the sender).
	UserNamespaces []string `json:"user_namespaces,omitempty"`
}

// AdminTokenConfig is one shared admin secret.
type AdminTokenConfig struct {
	// Token is the secret, at least 32 characters. Required. Placeholders
	// {env.*} and {file.*} are resolved.
	Token string `json:"token,omitempty"`
	// UserID is the user the token acts as, recorded as the uploader of
	// what it uploads. Default @media-admin:<server_name>.
	UserID string `json:"user_id,omitempty"`
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

	hsClient := &http.Client{Transport: app.transport, Timeout: timeout}
	whoami, err := auth.NewWhoami(homeserver, hsClient)
	if err != nil {
		return fmt.Errorf("homeserver: %w", err)
	}
	authn, admins, err := h.provisionAuth(ctx, app, homeserver, whoami, hsClient)
	if err != nil {
		return err
	}
	h.logout, err = auth.NewLogoutProxy(homeserver, hsClient, authn, ctx.Logger())
	if err != nil {
		return fmt.Errorf("homeserver: %w", err)
	}
	fedCfg, remote, fedClient, err := h.provisionFederation(app, ctx.Logger())
	if err != nil {
		return err
	}
	h.fed = fedClient
	maxUpload := h.MaxUploadSize
	if maxUpload == 0 {
		maxUpload = app.MaxUploadSize
	}
	rateLimits, err := h.RateLimits.build(app.limiter())
	if err != nil {
		return err
	}
	h.clientIP = rateLimits != nil
	logRateLimits(ctx.Logger(), h.ServerName, rateLimits, app.auth.bus != nil)
	site, err := mediaapi.NewSite(mediaapi.SiteConfig{
		ServerName:         h.ServerName,
		MaxUploadSize:      maxUpload,
		MaxPendingUploads:  h.MaxPendingUploads,
		PendingExpiry:      time.Duration(h.PendingExpiry),
		MaxDownloadTimeout: time.Duration(h.MaxDownloadTimeout),
		FreezeLegacy:       h.FreezeLegacy,
		FreezeSince:        h.FreezeSince,
		Admins:             admins,
		Federation:         fedCfg,
		Remote:             remote,
		Previews:           previewerOf(app),
		Quotas:             h.Quotas.mediaQuotas(),
		RateLimits:         rateLimits,
	}, app.res.repo, authn)
	if err != nil {
		return fmt.Errorf("configuring media site %s: %w", h.ServerName, err)
	}
	h.site = site
	h.res = app.res
	if app.res.admin != nil {
		h.admin, err = mediaadmin.NewSiteAPI(mediaadmin.SiteConfig{
			ServerName:      h.ServerName,
			Auth:            authn,
			Admins:          admins,
			HomeserverURL:   homeserver,
			Client:          hsClient,
			Service:         app.res.admin,
			Logger:          ctx.Logger().Named("admin"),
			Export:          app.res.export,
			AllowUserExport: h.AllowUserExport,
		})
		if err != nil {
			return fmt.Errorf("configuring the media admin API of %s: %w", h.ServerName, err)
		}
	}
	return nil
}

// provisionAuth builds the site's authenticator (admin secrets, appservices,
// then the app's shared token cache in front of whoami) and admin policy.
func (h *Handler) provisionAuth(ctx caddy.Context, app *App, homeserver string, whoami *auth.Whoami, client *http.Client) (*auth.SiteAuthenticator, *auth.AdminPolicy, error) {
	repl := caddy.NewReplacer()
	var regs []auth.Registration
	for i, a := range h.Appservices {
		tok, err := repl.ReplaceOrErr(a.ASToken, true, true)
		if err != nil {
			return nil, nil, fmt.Errorf("appservice %d: as_token: resolving placeholders: %w", i+1, err)
		}
		reg := auth.Registration{ID: a.ID, ASToken: tok, SenderLocalpart: a.SenderLocalpart}
		for _, ns := range a.UserNamespaces {
			reg.UserNamespaces = append(reg.UserNamespaces, auth.Namespace{Regex: ns})
		}
		regs = append(regs, reg)
	}
	for _, path := range h.AppserviceRegistrations {
		p, err := repl.ReplaceOrErr(path, true, true)
		if err != nil {
			return nil, nil, fmt.Errorf("appservice registration: resolving placeholders: %w", err)
		}
		reg, err := auth.LoadRegistration(p)
		if err != nil {
			return nil, nil, fmt.Errorf("appservice registration %s: %w", p, err)
		}
		regs = append(regs, reg)
	}
	var appservices auth.AppserviceAuthenticator
	if len(regs) > 0 {
		as, err := auth.NewAppservices(h.ServerName, regs)
		if err != nil {
			return nil, nil, fmt.Errorf("appservices: %w", err)
		}
		appservices = as
	}
	var tokens []auth.AdminToken
	for i, t := range h.AdminTokens {
		secret, err := repl.ReplaceOrErr(t.Token, true, true)
		if err != nil {
			return nil, nil, fmt.Errorf("admin token %d: resolving placeholders: %w", i+1, err)
		}
		user := t.UserID
		if user == "" {
			user = "@media-admin:" + h.ServerName
		}
		tokens = append(tokens, auth.AdminToken{Secret: secret, UserID: user})
	}
	cache := app.auth.cache
	authn, err := auth.NewSiteAuthenticator(auth.SiteOptions{
		Homeserver:  homeserverKey(homeserver),
		Checker:     whoami,
		Cache:       cache,
		Breaker:     cache.Breaker(homeserverKey(homeserver), app.breakerOptions()),
		Appservices: appservices,
		AdminTokens: tokens,
	})
	if err != nil {
		return nil, nil, err
	}
	admins, err := auth.NewAdminPolicy(auth.AdminOptions{
		Admins:                 h.Admins,
		DetectHomeserverAdmins: h.DetectHomeserverAdmins,
		HomeserverURL:          homeserver,
		Client:                 client,
		CacheTTL:               time.Duration(app.TokenCacheTTL),
		Logger:                 ctx.Logger(),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("admins: %w", err)
	}
	return authn, admins, nil
}

// homeserverKey names a homeserver in the shared token cache: its URL without
// a trailing slash, so that two spellings of one homeserver share entries.
func homeserverKey(u string) string { return strings.TrimRight(u, "/") }

// ServeHTTP serves media requests and the media paths of Synapse's admin
// API, and passes every other request to next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if h.admin != nil && (mediaadmin.IsAdminPath(r.URL.EscapedPath()) || mediaadmin.IsExportPath(r.URL.EscapedPath())) {
		return h.serveAdmin(w, r)
	}
	if !mediaapi.IsMediaPath(r.URL.Path) {
		if r.Method == http.MethodPost && auth.LogoutPath(r.URL.Path) != auth.NotLogout {
			// Logouts go to the homeserver through this handler, which drops
			// the token from the cache once the homeserver confirmed.
			h.logout.ServeHTTP(w, r)
			return nil
		}
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
	if strings.HasPrefix(r.URL.Path, "/_matrix/federation/") {
		// X-Matrix signs the request-target as sent: undo rewrites.
		if orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok && orig.RequestURI != "" {
			r.RequestURI = orig.RequestURI
		}
	}
	if h.clientIP {
		r = withClientIP(r)
	}
	h.site.ServeHTTP(w, r)
	return nil
}

// withClientIP passes Caddy's client_ip (the connection's address, or the
// forwarded one from a trusted proxy) to the media API.
func withClientIP(r *http.Request) *http.Request {
	s, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return r
	}
	return r.WithContext(mediaapi.WithClientIP(r.Context(), ip))
}

// serveAdmin answers one request of Synapse's media admin API (the rest of
// /_synapse/admin/ goes to the homeserver) or of the media exports.
func (h *Handler) serveAdmin(w http.ResponseWriter, r *http.Request) error {
	if !h.res.acquire() {
		w.Header().Set("Retry-After", "1")
		matrix.WriteError(w, matrix.Unknown(http.StatusServiceUnavailable, "media repository is reloading, retry"))
		return nil
	}
	defer h.res.release()
	h.admin.ServeHTTP(w, r)
	return nil
}

// previewerOf is the app's previewer as a mediaapi.Previewer (a nil
// interface, not a typed nil, when previews are off).
func previewerOf(app *App) mediaapi.Previewer {
	if app.previewer == nil {
		return nil
	}
	return app.previewer
}

// Cleanup retires the site (its server name stops being local to the shared
// repository unless the config that replaces this one serves it too: that
// config registered it before this cleanup) and closes its idle federation
// connections.
func (h *Handler) Cleanup() error {
	if h.site != nil {
		h.site.Close()
	}
	if h.fed != nil {
		h.fed.CloseIdleConnections()
	}
	return nil
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
