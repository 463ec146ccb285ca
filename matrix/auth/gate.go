package auth

import (
	"context"
	"errors"
	"strconv"
	"time"
)

// CheckGate rations the homeserver checks of tokens the cache does not know,
// for one client (normally one client IP): every distinct unknown token
// would otherwise cost a homeserver call. The gate is asked before a new
// check is started and told about every token the homeserver rejected.
// Tokens found in the cache (valid or rejected) and checks already in
// flight for the same token pass without asking it.
type CheckGate interface {
	// AllowCheck reports whether a token may be checked with the
	// homeserver now; when not, retryAfter says when it may.
	AllowCheck(ctx context.Context) (ok bool, retryAfter time.Duration)
	// CheckFailed records one token the homeserver rejected.
	CheckFailed(ctx context.Context)
}

// ErrTooManyFailedChecks is wrapped by the error of a check refused by the
// request's CheckGate; the error is a *FailedChecksError.
var ErrTooManyFailedChecks = errors.New("too many failed access token checks")

// FailedChecksError is returned (wrapping ErrTooManyFailedChecks) when a
// CheckGate refused to have a token checked: the client presented too many
// unknown tokens lately. No homeserver call was made.
type FailedChecksError struct {
	// RetryAfter is when the gate would allow a check again.
	RetryAfter time.Duration
}

func (e *FailedChecksError) Error() string {
	return "checking access token: " + ErrTooManyFailedChecks.Error() + ", retry after " + strconv.FormatFloat(e.RetryAfter.Seconds(), 'f', 3, 64) + "s"
}

// Unwrap makes errors.Is(err, ErrTooManyFailedChecks) hold.
func (e *FailedChecksError) Unwrap() error { return ErrTooManyFailedChecks }
