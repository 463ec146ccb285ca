// Package auth checks Matrix access tokens: against a homeserver (whoami),
// through a bounded cache shared by every site, against appservice
// registrations and against per-site admin secrets.
package auth

import (
	"context"
	"crypto/sha256"
	"errors"
)

// User is the identity behind an access token.
type User struct {
	// UserID is the full Matrix user ID, e.g. @alice:example.org.
	UserID string
	// DeviceID is the device of the token, when the homeserver says.
	DeviceID string
	// IsGuest is true for guest accounts.
	IsGuest bool
	// AppserviceID is the id of the appservice registration whose as_token
	// was presented; empty for ordinary users.
	AppserviceID string
	// IsAdmin is true when the token is known to act as a media admin
	// without asking anyone (a site's shared admin secret). Other admins are
	// found by an AdminChecker.
	IsAdmin bool
}

// Credentials are what a request presents to authenticate.
type Credentials struct {
	// Token is the access token (Authorization: Bearer, or access_token).
	Token string
	// AssertedUserID is the user_id query parameter: an appservice acting
	// as one of its users. Ignored for tokens that are not as_tokens.
	AssertedUserID string
	// Gate, when set, rations homeserver checks of tokens the cache does
	// not know for the client presenting them (failed checks per client
	// IP). Default: none, every unknown token is checked.
	Gate CheckGate
}

// Errors returned by Authenticator implementations (wrapped with %w).
var (
	// ErrUnknownToken: the homeserver rejected the token (401 M_UNKNOWN_TOKEN).
	ErrUnknownToken = errors.New("unknown access token")
	// ErrForbidden: the token is valid but may not act as the asserted user
	// (403 M_FORBIDDEN), e.g. an appservice asserting a user outside its
	// namespaces.
	ErrForbidden = errors.New("forbidden")
	// ErrHomeserverUnavailable: the homeserver could not be reached or failed
	// (becomes 502).
	ErrHomeserverUnavailable = errors.New("homeserver unavailable")
	// ErrHomeserverTimeout: the homeserver did not answer in time (becomes 504).
	ErrHomeserverTimeout = errors.New("homeserver timed out")
)

// Authenticator resolves credentials to a user.
type Authenticator interface {
	// Authenticate returns the user the credentials act as, or an error
	// wrapping one of the errors above.
	Authenticate(ctx context.Context, c Credentials) (User, error)
}

// TokenChecker asks a homeserver who owns a token (one round trip, no
// caching). Whoami implements it.
type TokenChecker interface {
	// CheckToken returns the owner of token, or an error wrapping
	// ErrUnknownToken, ErrHomeserverUnavailable or ErrHomeserverTimeout.
	CheckToken(ctx context.Context, token string) (User, error)
}

// TokenHash is the SHA-256 of an access token. Caches, logs, metrics and
// invalidation messages carry this, never the token itself.
type TokenHash [sha256.Size]byte

// HashToken returns the TokenHash of token.
func HashToken(token string) TokenHash { return sha256.Sum256([]byte(token)) }

// Invalidation names cached tokens to drop. Exactly one of Token and UserID
// is set.
type Invalidation struct {
	// Homeserver is the cache namespace of the homeserver that issued the
	// tokens (its normalised base URL).
	Homeserver string
	// Token, when non-zero, is the hash of one token to drop.
	Token TokenHash
	// UserID, when set, drops every token of that user.
	UserID string
}

// Publisher spreads invalidations to other instances sharing the cache's
// tokens (e.g. over Redis pub/sub). Publish must not block for long; an error
// is logged and the local invalidation still happens.
type Publisher interface {
	Publish(ctx context.Context, inv Invalidation) error
}
