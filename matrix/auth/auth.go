// Package auth checks Matrix access tokens against a homeserver.
package auth

import (
	"context"
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
}

// Errors returned by Authenticator implementations (wrapped with %w).
var (
	// ErrUnknownToken: the homeserver rejected the token (401 M_UNKNOWN_TOKEN).
	ErrUnknownToken = errors.New("unknown access token")
	// ErrHomeserverUnavailable: the homeserver could not be reached or failed
	// (becomes 502).
	ErrHomeserverUnavailable = errors.New("homeserver unavailable")
	// ErrHomeserverTimeout: the homeserver did not answer in time (becomes 504).
	ErrHomeserverTimeout = errors.New("homeserver timed out")
)

// Authenticator resolves an access token to a user.
type Authenticator interface {
	// Authenticate returns the user owning token, or an error wrapping one of
	// the errors above.
	Authenticate(ctx context.Context, token string) (User, error)
}
