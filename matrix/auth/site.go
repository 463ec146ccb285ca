package auth

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// AppserviceAuthenticator resolves appservice tokens (Appservices implements
// it).
type AppserviceAuthenticator interface {
	// Authenticate returns isAppservice false when c.Token is not an
	// appservice's as_token; otherwise the user the appservice acts as, or
	// an error wrapping ErrForbidden.
	Authenticate(c Credentials) (user User, isAppservice bool, err error)
}

// AdminToken is a shared secret that authenticates as a media admin without
// any homeserver call (for automation).
type AdminToken struct {
	// Secret is the token value presented as a bearer token. At least 32
	// characters.
	Secret string
	// UserID is the user the token acts as (recorded as the uploader of what
	// it uploads): a valid user ID (matrix.SplitUserID).
	UserID string
}

// MinAdminTokenLength is the shortest accepted AdminToken.Secret.
const MinAdminTokenLength = 32

// SiteOptions configure a SiteAuthenticator.
type SiteOptions struct {
	// Homeserver names the homeserver in the cache (its normalised URL).
	// Required.
	Homeserver string
	// Checker asks the homeserver about tokens (Whoami). Required.
	Checker TokenChecker
	// Cache caches homeserver answers. Required.
	Cache *TokenCache
	// Breaker is the homeserver's circuit breaker. Default: none.
	Breaker *Breaker
	// Appservices resolves appservice tokens first. Default: none.
	Appservices AppserviceAuthenticator
	// AdminTokens are shared admin secrets. Default: none.
	AdminTokens []AdminToken
}

// SiteAuthenticator is the Authenticator of one site: admin secrets first,
// then appservice tokens (no homeserver call), then the token cache in front
// of the homeserver.
type SiteAuthenticator struct {
	homeserver  string
	checker     TokenChecker
	cache       *TokenCache
	breaker     *Breaker
	appservices AppserviceAuthenticator
	adminTokens []adminToken
}

// adminToken is an AdminToken with its secret hashed, so that comparing costs
// the same whatever the presented token shares with it.
type adminToken struct {
	hash   TokenHash
	userID string
}

// NewSiteAuthenticator checks opts and returns the authenticator.
func NewSiteAuthenticator(opts SiteOptions) (*SiteAuthenticator, error) {
	if opts.Homeserver == "" || opts.Checker == nil || opts.Cache == nil {
		return nil, errors.New("creating site authenticator: homeserver, checker and cache are required")
	}
	s := &SiteAuthenticator{
		homeserver:  opts.Homeserver,
		checker:     opts.Checker,
		cache:       opts.Cache,
		breaker:     opts.Breaker,
		appservices: opts.Appservices,
	}
	for i, t := range opts.AdminTokens {
		if len(t.Secret) < MinAdminTokenLength {
			return nil, fmt.Errorf("creating site authenticator: admin token %d is shorter than %d characters", i+1, MinAdminTokenLength)
		}
		if !validTokenChars(t.Secret) {
			return nil, fmt.Errorf("creating site authenticator: admin token %d has characters not allowed in a bearer token", i+1)
		}
		if _, _, err := matrix.SplitUserID(t.UserID); err != nil {
			return nil, fmt.Errorf("creating site authenticator: admin token %d: user %q is not a Matrix user ID: %w", i+1, t.UserID, err)
		}
		s.adminTokens = append(s.adminTokens, adminToken{hash: HashToken(t.Secret), userID: t.UserID})
	}
	return s, nil
}

// Authenticate implements Authenticator.
func (s *SiteAuthenticator) Authenticate(ctx context.Context, c Credentials) (User, error) {
	if len(s.adminTokens) > 0 {
		h := HashToken(c.Token)
		for _, t := range s.adminTokens {
			if subtle.ConstantTimeCompare(h[:], t.hash[:]) == 1 {
				return User{UserID: t.userID, IsAdmin: true}, nil
			}
		}
	}
	if s.appservices != nil {
		u, isAS, err := s.appservices.Authenticate(c)
		if isAS || err != nil {
			return u, err
		}
	}
	return s.cache.Check(ctx, s.homeserver, c.Token, s.checker, s.breaker, c.Gate)
}

// Logout records that the homeserver confirmed the logout of token (all:
// of every token of its owner, userID, when known) and invalidates the cache
// here and, through the cache's publisher, on other instances.
func (s *SiteAuthenticator) Logout(ctx context.Context, token, userID string, all bool) {
	s.cache.Invalidate(ctx, Invalidation{Homeserver: s.homeserver, Token: HashToken(token)})
	if all && userID != "" {
		s.cache.Invalidate(ctx, Invalidation{Homeserver: s.homeserver, UserID: userID})
	}
}

// Interface guard.
var _ Authenticator = (*SiteAuthenticator)(nil)
