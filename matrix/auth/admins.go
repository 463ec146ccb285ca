package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/capped"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// Defaults of AdminOptions.
const (
	// DefaultAdminCacheTTL is the default AdminOptions.CacheTTL.
	DefaultAdminCacheTTL = 5 * time.Minute
	// DefaultAdminCheckTimeout bounds one admin API round trip, whatever
	// AdminOptions.Client allows.
	DefaultAdminCheckTimeout = 10 * time.Second
)

// maxAdminCacheEntries bounds the admin answers cached by one AdminPolicy.
const maxAdminCacheEntries = 10000

// maxAdminBody bounds how much of an admin API answer is read.
const maxAdminBody = 64 << 10

// synapseAdminPath is the prefix of Synapse's "is this user an admin" API;
// the URL-escaped user ID and "/admin" follow.
const synapseAdminPath = "/_synapse/admin/v1/users/"

// AdminOptions configure an AdminPolicy.
type AdminOptions struct {
	// Admins are full Matrix user IDs (e.g. @alice:example.org) that are
	// media admins. Default: none.
	Admins []string
	// DetectHomeserverAdmins makes homeserver admins media admins too,
	// found through Synapse's admin API (GET
	// /_synapse/admin/v1/users/{userId}/admin, called with the user's own
	// token). Homeservers without that API (Dendrite, Conduit, or an admin
	// API not exposed by the reverse proxy) simply yield no admins. Default
	// false.
	DetectHomeserverAdmins bool
	// HomeserverURL is the homeserver's client-server base URL (e.g.
	// http://127.0.0.1:8008). Required when DetectHomeserverAdmins is set.
	HomeserverURL string
	// Client performs the admin API requests. Default: a client with a
	// DefaultAdminCheckTimeout (10s) timeout.
	Client *http.Client
	// CacheTTL is how long an answer about one user is reused, and how long
	// a homeserver found to lack the admin API is not asked. Default
	// DefaultAdminCacheTTL (5m).
	CacheTTL time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Logger logs that the homeserver lacks the admin API (once). Default:
	// no logs.
	Logger *zap.Logger
}

// AdminPolicy decides who is a media admin: users whose token is an admin
// secret (User.IsAdmin), the configured Admins, and optionally homeserver
// admins. It is safe for concurrent use.
type AdminPolicy struct {
	static  map[string]bool
	detect  bool
	baseURL string
	client  *http.Client
	ttl     time.Duration
	now     func() time.Time
	logger  *zap.Logger

	group singleflight.Group

	// answers caches whether a user is a homeserver admin, for ttl, at
	// most maxAdminCacheEntries, least recently used evicted.
	answers *capped.Map[string, bool]

	mu          sync.Mutex
	noAPIUntil  time.Time
	loggedNoAPI bool
}

// NewAdminPolicy checks opts and returns the policy.
func NewAdminPolicy(opts AdminOptions) (*AdminPolicy, error) {
	p := &AdminPolicy{
		static: make(map[string]bool, len(opts.Admins)),
		detect: opts.DetectHomeserverAdmins,
		client: opts.Client,
		ttl:    opts.CacheTTL,
		now:    opts.Now,
		logger: opts.Logger,
	}
	for _, id := range opts.Admins {
		if _, _, err := matrix.SplitUserID(id); err != nil {
			return nil, fmt.Errorf("creating admin policy: admin %q is not a Matrix user ID: %w", id, err)
		}
		p.static[id] = true
	}
	if p.ttl < 0 {
		return nil, fmt.Errorf("creating admin policy: negative cache ttl %s", p.ttl)
	}
	if p.ttl == 0 {
		p.ttl = DefaultAdminCacheTTL
	}
	if p.now == nil {
		p.now = time.Now
	}
	p.answers = capped.New(capped.Options[string, bool]{Max: maxAdminCacheEntries, Now: p.now})
	if p.logger == nil {
		p.logger = zap.NewNop()
	}
	if p.client == nil {
		p.client = &http.Client{Timeout: DefaultAdminCheckTimeout}
	}
	if p.detect {
		base, err := parseHomeserverURL(opts.HomeserverURL)
		if err != nil {
			return nil, fmt.Errorf("creating admin policy: %w", err)
		}
		p.baseURL = base
	}
	return p, nil
}

// parseHomeserverURL checks a homeserver base URL and returns it without a
// trailing slash.
func parseHomeserverURL(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("parsing homeserver url: %w", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("parsing homeserver url: scheme must be http or https, got %q", u.Scheme)
	}
	if u.Host == "" {
		return "", errors.New("parsing homeserver url: no host")
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return "", errors.New("parsing homeserver url: must not have a query, fragment or user info")
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// IsAdmin reports whether user is a media admin. token is the user's access
// token, used only to ask the homeserver (when DetectHomeserverAdmins is set
// and the answer is not cached). Guests and appservice users are never
// detected through the homeserver. Answers are cached per user ID for
// CacheTTL, and concurrent questions about one user share a single request.
// A homeserver that cannot be reached or fails gives an error wrapping
// ErrHomeserverUnavailable or ErrHomeserverTimeout, which is not cached.
// Errors never contain the token.
func (p *AdminPolicy) IsAdmin(ctx context.Context, user User, token string) (bool, error) {
	if user.IsAdmin || p.static[user.UserID] {
		return true, nil
	}
	if !p.detect || user.IsGuest || user.AppserviceID != "" || user.UserID == "" || token == "" {
		return false, nil
	}
	if !validTokenChars(token) {
		return false, fmt.Errorf("checking admin status: malformed token: %w", ErrUnknownToken)
	}
	if admin, ok := p.cached(user.UserID); ok {
		return admin, nil
	}
	ch := p.group.DoChan(user.UserID, func() (any, error) {
		// A cached answer may have arrived since the check above.
		if admin, ok := p.cached(user.UserID); ok {
			return admin, nil
		}
		// The request outlives the caller that started it: others may be
		// waiting on it. DefaultAdminCheckTimeout bounds it.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), DefaultAdminCheckTimeout)
		defer cancel()
		return p.ask(rctx, user.UserID, token)
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			return false, res.Err
		}
		return res.Val.(bool), nil
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return false, fmt.Errorf("checking admin status: %w: %w", ErrHomeserverTimeout, ctx.Err())
		}
		return false, fmt.Errorf("checking admin status: %w", ctx.Err())
	}
}

// cached returns the cached answer about userID, or ok false when there is
// none: nothing cached, expired, or the homeserver is known to lack the
// admin API (then the answer is false, ok true).
func (p *AdminPolicy) cached(userID string) (admin, ok bool) {
	if admin, found := p.answers.Get(userID); found {
		return admin, true
	}
	now := p.now()
	p.mu.Lock()
	defer p.mu.Unlock()
	if now.Before(p.noAPIUntil) {
		return false, true
	}
	return false, false
}

// store caches an answer about userID for the cache TTL, dropping the least
// recently used answer when the cache is full.
func (p *AdminPolicy) store(userID string, admin bool) {
	p.answers.PutTTL(userID, admin, p.ttl)
}

// markNoAPI remembers for one TTL that the homeserver has no admin API and
// logs it the first time.
func (p *AdminPolicy) markNoAPI(status int, errcode string) {
	p.mu.Lock()
	p.noAPIUntil = p.now().Add(p.ttl)
	first := !p.loggedNoAPI
	p.loggedNoAPI = true
	p.mu.Unlock()
	if first {
		p.logger.Info("homeserver has no Synapse admin API; homeserver admins are not media admins",
			zap.String("homeserver", p.baseURL),
			zap.Int("status", status),
			zap.String("errcode", errcode),
			zap.Duration("retry_after", p.ttl))
	}
}

// adminResponse is the body of a successful admin API answer.
type adminResponse struct {
	Admin *bool `json:"admin"`
}

// ask makes one admin API request and caches what it learns.
func (p *AdminPolicy) ask(ctx context.Context, userID, token string) (bool, error) {
	u := p.baseURL + synapseAdminPath + url.PathEscape(userID) + "/admin"
	a, err := GetHomeserver(ctx, p.client, u, token, maxAdminBody, "admin api")
	if err != nil {
		return false, err
	}
	switch {
	case a.Status == http.StatusOK:
		var ar adminResponse
		if err := json.Unmarshal(a.Body, &ar); err != nil {
			return false, fmt.Errorf("decoding admin api response: %w: %w", ErrHomeserverUnavailable, err)
		}
		if ar.Admin == nil {
			return false, fmt.Errorf("decoding admin api response: no admin field: %w", ErrHomeserverUnavailable)
		}
		p.store(userID, *ar.Admin)
		return *ar.Admin, nil
	case a.NoSuchAPI():
		// No such API: Dendrite, Conduit, or /_synapse not proxied.
		p.markNoAPI(a.Status, a.ErrCode)
		return false, nil
	case a.Status == http.StatusForbidden,
		a.Status == http.StatusNotFound,
		a.Status == http.StatusBadRequest:
		// 403: the requester is not a homeserver admin (Synapse checks the
		// requester, who is the user). 404 M_NOT_FOUND / 400: the
		// homeserver does not know the user as a local one.
		p.store(userID, false)
		return false, nil
	case a.Status == http.StatusUnauthorized:
		// The token stopped working since it was authenticated; say no, but
		// do not remember it for the user, whose other tokens may work.
		return false, nil
	default:
		return false, fmt.Errorf("checking admin status: homeserver answered %d: %w", a.Status, ErrHomeserverUnavailable)
	}
}
