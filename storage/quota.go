package storage

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Per-user usage and quotas.
//
// A metadata store that implements QuotaStore keeps, for every user ID, the
// bytes and files of the local media rows that user uploaded (Media.UserID
// set, Media.Remote false), in the same transaction as the rows: InsertMedia,
// CompletePending and their Limited forms add, DeleteMedia subtracts. Every
// row counts at its size, also when its blob is shared with other rows
// (deduplicated): a user cannot slip under a quota by uploading content that
// is already stored. Pending (not yet uploaded) rows count nothing. Imports
// (InsertMedia) count like uploads. RecountUsage rebuilds the counters from
// the rows, for repairs.
//
// The Limited forms check UploadLimits in the same transaction, so that
// concurrent uploads of one user, on one instance or on several sharing the
// database, can never together exceed a limit: of two uploads racing for the
// last bytes of a quota, one is refused.

// ErrQuotaExceeded is what a *QuotaExceededError is (errors.Is).
var ErrQuotaExceeded = errors.New("quota exceeded")

// QuotaLimit names the limit an upload would exceed.
type QuotaLimit string

// Limits of QuotaExceededError.
const (
	// LimitBytes is UploadLimits.MaxBytes: bytes stored in all.
	LimitBytes QuotaLimit = "bytes"
	// LimitFiles is UploadLimits.MaxFiles: files stored in all.
	LimitFiles QuotaLimit = "files"
	// LimitWindowBytes is WindowLimit.MaxBytes: bytes uploaded within a
	// rolling window.
	LimitWindowBytes QuotaLimit = "window_bytes"
	// LimitWindowFiles is WindowLimit.MaxFiles: files uploaded within a
	// rolling window.
	LimitWindowFiles QuotaLimit = "window_files"
)

// QuotaExceededError reports the limit an insertion would have exceeded;
// nothing was written.
type QuotaExceededError struct {
	// Limit is the limit exceeded.
	Limit QuotaLimit
	// Window is the rolling window of a window limit (0 otherwise).
	Window time.Duration
	// Used is what the user had (bytes or files) before this item, Adding
	// what the item would add, and Max the limit.
	Used, Adding, Max int64
}

// Error implements error.
func (e *QuotaExceededError) Error() string {
	what := "bytes"
	if e.Limit == LimitFiles || e.Limit == LimitWindowFiles {
		what = "files"
	}
	if e.Window > 0 {
		return fmt.Sprintf("quota exceeded: %d %s uploaded in the last %s, %d more would exceed %d", e.Used, what, e.Window, e.Adding, e.Max)
	}
	return fmt.Sprintf("quota exceeded: %d %s stored, %d more would exceed %d", e.Used, what, e.Adding, e.Max)
}

// Is makes errors.Is(err, ErrQuotaExceeded) true.
func (e *QuotaExceededError) Is(target error) bool { return target == ErrQuotaExceeded }

// UploadLimits bound what one user may store, checked by the Limited
// methods of QuotaStore. A field of 0 or less is no bound (what a config
// value of 0 means is the policy layer's business, not the store's).
type UploadLimits struct {
	// MaxBytes bounds the bytes of the user's media rows, this one
	// included.
	MaxBytes int64
	// MaxFiles bounds the number of the user's media rows, this one
	// included.
	MaxFiles int64
	// Windows bound what the user uploaded within rolling windows ending
	// at Now (rows whose UploadedAt, or CreatedAt when that is zero, is
	// at or after Now minus the window; deleted rows no longer count).
	Windows []WindowLimit
	// Now ends the rolling windows; the zero time means time.Now().
	Now time.Time
}

// WindowLimit bounds uploads within a rolling window (as Synapse's
// media_upload_limits).
type WindowLimit struct {
	// Window is the length of the window (> 0).
	Window time.Duration
	// MaxBytes and MaxFiles bound the bytes and files uploaded within it;
	// 0 or less is no bound.
	MaxBytes, MaxFiles int64
}

// UserUsage is what one user stores.
type UserUsage struct {
	// UserID is the user.
	UserID string
	// Bytes and Files count the user's local media rows (see the package
	// doc above).
	Bytes, Files int64
}

// QuotaStore is the MetadataStore capability of per-user usage counters and
// quota-checked insertion. The SQL store implements it.
type QuotaStore interface {
	// InsertMediaLimited is InsertMedia that first checks lim for
	// m.UserID in the same transaction; an item that would exceed a limit
	// gives a *QuotaExceededError and writes nothing. An item that does
	// not count (remote, or without a user ID) is inserted unchecked.
	InsertMediaLimited(ctx context.Context, m Media, lim UploadLimits) error
	// CompletePendingLimited is CompletePending checked the same way.
	CompletePendingLimited(ctx context.Context, m Media, lim UploadLimits) error
	// UserUsage returns the counters of userID (zero counters for a user
	// with none).
	UserUsage(ctx context.Context, userID string) (UserUsage, error)
	// UploadedSince sums the bytes and files of userID's media rows
	// uploaded at or after since (the rolling-window measure).
	UploadedSince(ctx context.Context, userID string, since time.Time) (bytes, files int64, err error)
	// TopUsage lists up to limit users with the most bytes stored, most
	// first (ties by user ID), skipping users with nothing.
	TopUsage(ctx context.Context, limit int) ([]UserUsage, error)
	// RecountUsage rebuilds the counters of userID (every user when empty)
	// from the media rows and returns how many users' counters changed.
	RecountUsage(ctx context.Context, userID string) (changed int64, err error)
}
