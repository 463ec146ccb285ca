package mediaadmin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// DefaultHomeserverTimeout bounds each request the SiteAPI makes to the
// homeserver when SiteConfig.Client is not set.
const DefaultHomeserverTimeout = 30 * time.Second

// AdminChecker decides whether an authenticated user is a media admin
// (auth.AdminPolicy implements it).
type AdminChecker interface {
	// IsAdmin reports whether user, who presented token, is a media admin.
	// Errors wrap auth.ErrHomeserverUnavailable, auth.ErrHomeserverTimeout
	// or auth.ErrUnknownToken.
	IsAdmin(ctx context.Context, user auth.User, token string) (bool, error)
}

// SiteConfig configures the admin API of one site.
type SiteConfig struct {
	// ServerName is the site's Matrix server name: its media are local,
	// every other server name's are remote copies. Required.
	ServerName string
	// Auth resolves access tokens. Required.
	Auth auth.Authenticator
	// Admins decides who may call the admin API. Required.
	Admins AdminChecker
	// HomeserverURL is the homeserver's client-server base URL (e.g.
	// http://127.0.0.1:8008), asked for a room's media (room quarantine),
	// for profile avatars (keep_profiles) and display names (statistics),
	// always with the caller's token. Default: none; room quarantine then
	// answers 501, keep_profiles=true fails and display names are null.
	HomeserverURL string
	// Client makes the homeserver requests. Default: a client with a
	// DefaultHomeserverTimeout (30s) timeout.
	Client *http.Client
	// Service performs the operations. Required.
	Service *Service
	// Logger logs failures. Default: the Service's logger.
	Logger *zap.Logger
	// Export writes the archives of the export endpoints (see
	// exportPrefix). Default: none; those endpoints then answer 404
	// M_UNRECOGNIZED.
	Export ExportFunc
	// AllowUserExport lets every user of the site export their own media
	// (GET /_matrix_media/v1/export/user/{their own ID}); media admins may
	// always export any local user and the whole server. Default false.
	AllowUserExport bool
}

// SiteAPI answers Synapse's media admin API for one site (the paths
// IsAdminPath accepts). It is an http.Handler, safe for concurrent use.
//
// Callers must present an access token (Authorization: Bearer, or the
// access_token query parameter) of a media admin: missing, 401
// M_MISSING_TOKEN; unknown, 401 M_UNKNOWN_TOKEN; a guest, 403
// M_GUEST_ACCESS_FORBIDDEN; anyone else who is not an admin, 403 M_FORBIDDEN
// "You are not a server admin".
//
// Endpoints, under /_synapse/admin/v1/ (bodies as Synapse documents them;
// request bodies are ignored):
//
//	POST   media/quarantine/{server}/{id}    {}; 404 M_NOT_FOUND for missing or pending media
//	POST   media/unquarantine/{server}/{id}  {}; lifts the quarantine of the content, for every copy
//	POST   user/{userId}/media/quarantine     {"num_quarantined": n} (the user's unprotected items)
//	POST   room/{roomId}/media/quarantine     {"num_quarantined": n}, from the homeserver's room media
//	POST   quarantine_media/{roomId}          list; 501 M_UNRECOGNIZED when it has none, 502/504
//	                                          when it fails, 403 when it refuses the caller
//	POST   media/protect/{id}                 {}; local media; 404 when missing
//	POST   media/unprotect/{id}               {}
//	GET    media/{server}/{id}                {"media_info": {...}}, local or cached remote; 404
//	DELETE media/{server}/{id}                {"deleted_media": [id], "total": 1}; 400 M_UNKNOWN
//	                                          "Can only delete local media" for another server
//	POST   media/delete, media/{server}/delete
//	                                          ?before_ts=&size_gt=&keep_profiles= -> deleted_media, total
//	POST   purge_media_cache?before_ts=       {"deleted": n}
//	GET    users/{userId}/media               {"media": [...], "total": n, "next_token": m}
//	DELETE users/{userId}/media               {"deleted_media": [...], "total": n}; 400 M_UNKNOWN
//	                                          "Can only look up local users" for another server
//	GET    statistics/users/media             {"users": [...], "total": n, "next_token": m}
//
// The module's own export endpoints are answered too (ZIP archives of
// package mediaarchive's format, streamed; see exportPrefix):
//
//	GET /_matrix_media/v1/export/user/{userId}       a local user's media: media admins, or the
//	                                                 user themself with SiteConfig.AllowUserExport
//	GET /_matrix_media/v1/export/server/{serverName} the site's local media: media admins only
//
// Query parameters are checked with Synapse's rules: a missing required
// integer is 400 M_MISSING_PARAM; a malformed or negative integer, an
// unknown order_by or dir, a before_ts before 1971 (probably seconds), a
// boolean other than true/false, 400 M_INVALID_PARAM. Another method on one
// of these paths is 405 M_UNRECOGNIZED; OPTIONS is a CORS preflight (204).
//
// Differences from Synapse, where this module cannot know what Synapse
// knows: users/{userId}/media of a user without media answers an empty
// list (Synapse: 404 "Unknown user"); keep_profiles keeps only media that
// are the global profile avatar of a user whose media are being deleted
// (per-room avatars and room avatars are not detected); statistics'
// search_term matches a substring of the user ID, not display names, and
// order_by=displayname orders by user ID; quarantine, unquarantine,
// protect and unprotect of unknown media answer 404 (Synapse: 200, since
// quarantine here is by content, which unknown media lack); authenticated
// is always null.
type SiteAPI struct {
	cfg     SiteConfig
	svc     *Service
	hs      homeserver
	logger  *zap.Logger
	metrics *Metrics
}

// NewSiteAPI checks cfg and returns the site's admin API.
func NewSiteAPI(cfg SiteConfig) (*SiteAPI, error) {
	if cfg.Auth == nil || cfg.Admins == nil || cfg.Service == nil {
		return nil, errors.New("creating media admin API: Auth, Admins and Service are required")
	}
	if !matrix.ValidServerName(cfg.ServerName) {
		return nil, fmt.Errorf("creating media admin API: invalid server name %q", cfg.ServerName)
	}
	a := &SiteAPI{cfg: cfg, svc: cfg.Service, logger: cfg.Logger, metrics: cfg.Service.metrics}
	if a.logger == nil {
		a.logger = cfg.Service.logger
	}
	a.hs.client = cfg.Client
	if a.hs.client == nil {
		a.hs.client = &http.Client{Timeout: DefaultHomeserverTimeout}
	}
	if cfg.HomeserverURL != "" {
		base := strings.TrimRight(cfg.HomeserverURL, "/")
		if !strings.HasPrefix(base, "http://") && !strings.HasPrefix(base, "https://") {
			return nil, fmt.Errorf("creating media admin API: homeserver url %q is not http(s)", cfg.HomeserverURL)
		}
		a.hs.base = base
	}
	return a, nil
}

// IsAdminPath reports whether the API answers path (see the package
// functions IsAdminPath and IsExportPath).
func (a *SiteAPI) IsAdminPath(path string) bool { return IsAdminPath(path) || IsExportPath(path) }

// caller is an authenticated admin making a request.
type caller struct {
	user  auth.User
	token string
}

// actor is who the logs name as having asked.
func (c caller) actor() string { return c.user.UserID }

// handler performs one endpoint: it returns the JSON body of a 200, or an
// error that writeError turns into the response.
type handler func(ctx context.Context, r *http.Request, rt route, c caller) (any, error)

// handlers maps each endpoint to its handler.
func (a *SiteAPI) handler(ep endpoint) handler {
	switch ep {
	case epQuarantineMedia:
		return a.quarantineMedia
	case epUnquarantine:
		return a.unquarantineMedia
	case epQuarantineUser:
		return a.quarantineUser
	case epQuarantineRoom:
		return a.quarantineRoom
	case epProtect:
		return a.protect
	case epUnprotect:
		return a.unprotect
	case epMediaInfo:
		return a.mediaInfo
	case epDeleteMedia:
		return a.deleteMedia
	case epDeleteOld:
		return a.deleteOld
	case epPurgeRemote:
		return a.purgeRemote
	case epListUserMedia:
		return a.listUserMedia
	case epDeleteUserMedia:
		return a.deleteUserMedia
	case epUsage:
		return a.usage
	}
	return nil
}

// ServeHTTP answers one admin API request.
func (a *SiteAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	setCORS(w.Header())
	if r.Method == http.MethodOptions {
		// CORS preflight of browser-based admin consoles.
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if ert, ok := parseExportRoute(r.URL.EscapedPath()); ok {
		a.serveExport(w, r, ert)
		return
	}
	rt, ok := parseRoute(r.Method, r.URL.EscapedPath())
	if !ok {
		a.finish(w, r, epUnknown, nil, matrix.Unrecognized("Unrecognized request"))
		return
	}
	if rt.ep == epMethodNotAllowed {
		a.finish(w, r, rt.ep, nil, matrix.MethodNotAllowed("Unrecognized request"))
		return
	}
	c, err := a.authenticate(r)
	if err != nil {
		a.finish(w, r, rt.ep, nil, err)
		return
	}
	body, err := a.handler(rt.ep)(r.Context(), r, rt, c)
	a.finish(w, r, rt.ep, body, err)
}

// authenticate checks that the request comes from a media admin.
func (a *SiteAPI) authenticate(r *http.Request) (caller, error) {
	c, admin, err := a.identify(r)
	if err != nil {
		return caller{}, err
	}
	if !admin {
		return caller{}, matrix.Forbidden("You are not a server admin")
	}
	return c, nil
}

// identify authenticates the request's user, who must present an access
// token and not be a guest, and tells whether they are a media admin.
func (a *SiteAPI) identify(r *http.Request) (caller, bool, error) {
	creds := auth.RequestCredentials(r)
	if creds.Token == "" {
		return caller{}, false, matrix.MissingToken("Missing access token")
	}
	user, err := a.cfg.Auth.Authenticate(r.Context(), creds)
	if err != nil {
		return caller{}, false, fmt.Errorf("authenticating: %w", err)
	}
	if user.IsGuest {
		return caller{}, false, matrix.GuestAccessForbidden("Guest access not allowed")
	}
	admin, err := a.cfg.Admins.IsAdmin(r.Context(), user, creds.Token)
	if err != nil {
		return caller{}, false, fmt.Errorf("checking admin status: %w", err)
	}
	return caller{user: user, token: creds.Token}, admin, nil
}

// finish writes the response: body as JSON with 200, or err mapped by
// toMatrixError; and counts it.
func (a *SiteAPI) finish(w http.ResponseWriter, r *http.Request, ep endpoint, body any, err error) {
	status := http.StatusOK
	if err == nil {
		b, merr := json.Marshal(body)
		if merr != nil {
			err = fmt.Errorf("encoding response: %w", merr)
		} else {
			h := w.Header()
			h.Set("Content-Type", "application/json")
			h.Set("Content-Length", strconv.Itoa(len(b)))
			w.WriteHeader(status)
			_, _ = w.Write(b)
		}
	}
	if err != nil {
		status = a.writeError(w, r, ep, err)
	}
	a.metrics.request(string(ep), status)
}

// statusClientGone is counted when the client went away before an answer
// (nginx's convention).
const statusClientGone = 499

// writeError is the one place where errors become responses: a
// *matrix.Error as it is, storage and homeserver failures by their kind,
// anything else as a logged 500. It returns the status counted.
func (a *SiteAPI) writeError(w http.ResponseWriter, r *http.Request, ep endpoint, err error) int {
	var (
		me   *matrix.Error
		open *auth.CircuitOpenError
	)
	switch {
	case errors.As(err, &me):
	case errors.Is(err, storage.ErrNotFound):
		me = matrix.NotFound("Unknown media")
	case errors.Is(err, auth.ErrUnknownToken):
		me = matrix.UnknownToken("Unrecognised access token")
	case errors.Is(err, auth.ErrForbidden):
		me = matrix.Forbidden("The application service may not act as this user")
	case errors.Is(err, ErrExportBusy):
		me = matrix.LimitExceeded("Too many media exports are running; try again later", exportRetryAfter)
	case errors.As(err, &open):
		w.Header().Set("Retry-After", strconv.Itoa(int(open.RetryAfter/time.Second)+1))
		me = matrix.Unknown(http.StatusBadGateway, "The homeserver is failing; access tokens cannot be checked for now")
	case r.Context().Err() != nil:
		// The client went away; nobody reads the answer.
		me = matrix.Unknown(statusClientGone, "Request cancelled")
	case errors.Is(err, auth.ErrHomeserverTimeout):
		a.logger.Warn("homeserver timed out", zap.String("endpoint", string(ep)), zap.Error(err))
		me = matrix.Unknown(http.StatusGatewayTimeout, "Timed out waiting for the homeserver")
	case errors.Is(err, auth.ErrHomeserverUnavailable):
		a.logger.Warn("homeserver failed", zap.String("endpoint", string(ep)), zap.Error(err))
		me = matrix.Unknown(http.StatusBadGateway, "The homeserver could not be reached or failed")
	case errors.Is(err, storage.ErrUnavailable):
		a.logger.Error("media storage unavailable", zap.String("endpoint", string(ep)), zap.Error(err))
		w.Header().Set("Retry-After", "5")
		me = matrix.Unknown(http.StatusServiceUnavailable, "Media storage is unavailable, try again later")
	default:
		a.logger.Error("media admin request failed", zap.String("endpoint", string(ep)),
			zap.String("server_name", a.cfg.ServerName), zap.Error(err))
		me = matrix.Unknown(http.StatusInternalServerError, "Internal server error")
	}
	matrix.WriteError(w, me)
	return me.Status
}

// setCORS adds the CORS headers Synapse sends on every response, which
// browser-based admin consoles need.
func setCORS(h http.Header) {
	h.Set("Access-Control-Allow-Origin", "*")
	h.Set("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS")
	h.Set("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization, Date")
}
