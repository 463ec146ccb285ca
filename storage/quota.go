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
// For the rolling windows the store also keeps, in the same transactions,
// each user's upload history by minute (WindowResolution): bytes and files
// per user and minute. A window sums one entry per minute rather than one
// per upload, and reads the rows themselves only for the part of its first
// minute that lies inside it, and only when the decision depends on it, so
// that decisions stay exact to the millisecond. The history reaches back
// at most MaxWindow; PruneUploadHistory trims what no window needs.
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

// MaxWindow is the longest rolling window a store measures (a leap year).
const MaxWindow = 366 * 24 * time.Hour

// WindowResolution is the width of the time buckets in which a store keeps
// the uploads of each user for the rolling windows (see QuotaStore).
const WindowResolution = time.Minute

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
	// Window is the length of the window (> 0, at most MaxWindow).
	Window time.Duration
	// MaxBytes and MaxFiles bound the bytes and files uploaded within it;
	// 0 or less is no bound.
	MaxBytes, MaxFiles int64
}

// WindowUsage is what a user uploaded within one rolling window.
type WindowUsage struct {
	// Bytes and Files sum the user's counted rows uploaded within the
	// window.
	Bytes, Files int64
}

// Headroom is what one more upload of a user may add under UploadLimits.
type Headroom struct {
	// Bytes is the most bytes the upload may have before the tightest
	// byte limit; -1 when no byte limit applies.
	Bytes int64
	// Tight is the byte limit that sets Bytes (Limit, Window, Used and
	// Max; Adding is left zero), for the refusal of a body of unknown
	// length that passes Bytes.
	Tight QuotaExceededError
}

// Validate rejects windows of no length or longer than MaxWindow.
func (lim UploadLimits) Validate() error {
	for _, w := range lim.Windows {
		if w.Window <= 0 || w.Window > MaxWindow {
			return fmt.Errorf("invalid upload limits: window of %s (must be positive and at most %s)", w.Window, MaxWindow)
		}
	}
	return nil
}

// bounded reports whether the window bounds anything.
func (w WindowLimit) bounded() bool { return w.MaxBytes > 0 || w.MaxFiles > 0 }

// Check decides whether one more file of size bytes (negative: a body of
// unknown length) fits lim, given what the user stores before it (stored)
// and what the user uploaded within each of lim.Windows (windows[i] for
// lim.Windows[i]; windows that bound nothing are not looked at). It is the
// one place quota decisions are made: the stores check with it in the
// row's transaction and callers with it before a body is read.
//
// Limits are checked in order: stored bytes, stored files, then each window
// in order, bytes before files; the first one exceeded gives a
// *QuotaExceededError. A body of unknown length is refused only when a byte
// limit has nothing left; otherwise Headroom says how far it may go.
func (lim UploadLimits) Check(size int64, stored UserUsage, windows []WindowUsage) (Headroom, error) {
	h := Headroom{Bytes: -1}
	var over *QuotaExceededError
	consider := func(limit QuotaLimit, window time.Duration, used, maxv int64) {
		if maxv <= 0 || over != nil {
			return
		}
		if limit == LimitFiles || limit == LimitWindowFiles {
			if used+1 > maxv {
				over = &QuotaExceededError{Limit: limit, Window: window, Used: used, Adding: 1, Max: maxv}
			}
			return
		}
		left := maxv - used
		switch {
		case size >= 0 && size > left:
			over = &QuotaExceededError{Limit: limit, Window: window, Used: used, Adding: size, Max: maxv}
		case size < 0 && left <= 0:
			over = &QuotaExceededError{Limit: limit, Window: window, Used: used, Adding: 1, Max: maxv}
		case h.Bytes < 0 || left < h.Bytes:
			h.Bytes = left
			h.Tight = QuotaExceededError{Limit: limit, Window: window, Used: used, Max: maxv}
		}
	}
	consider(LimitBytes, 0, stored.Bytes, lim.MaxBytes)
	consider(LimitFiles, 0, stored.Files, lim.MaxFiles)
	for i, w := range lim.Windows {
		if !w.bounded() || i >= len(windows) {
			continue
		}
		consider(LimitWindowBytes, w.Window, windows[i].Bytes, w.MaxBytes)
		consider(LimitWindowFiles, w.Window, windows[i].Files, w.MaxFiles)
	}
	if over != nil {
		return Headroom{}, over
	}
	return h, nil
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
	// CheckUpload checks, without writing, whether one more upload of
	// size bytes (negative: unknown) by userID fits lim (UploadLimits.Check
	// on what the user stores and uploaded within the windows), and
	// returns its Headroom. Headroom.Bytes is exact when it is below
	// maxSize (the most the upload may have anyway; 0 or less: unbounded)
	// and at least maxSize otherwise. The decision is repeated by the
	// Limited methods when the row is written; this one lets a caller
	// refuse before reading a body.
	CheckUpload(ctx context.Context, userID string, lim UploadLimits, size, maxSize int64) (Headroom, error)
	// UploadedSince sums the bytes and files of userID's media rows
	// uploaded at or after since (the rolling-window measure; since at
	// most MaxWindow ago is exact, older rows may have been forgotten by
	// PruneUploadHistory).
	UploadedSince(ctx context.Context, userID string, since time.Time) (bytes, files int64, err error)
	// PruneUploadHistory forgets the per-user upload history of the
	// rolling windows before before (rounded down to WindowResolution),
	// which no window ending now or later needs when before is at least
	// the longest window ago; it returns how many history entries went.
	PruneUploadHistory(ctx context.Context, before time.Time) (int64, error)
	// TopUsage lists up to limit users with the most bytes stored, most
	// first (ties by user ID), skipping users with nothing.
	TopUsage(ctx context.Context, limit int) ([]UserUsage, error)
	// RecountUsage rebuilds the counters and the upload history of userID
	// (every user when empty) from the media rows and returns how many
	// users' counters, or history within MaxWindow of now, changed.
	RecountUsage(ctx context.Context, userID string) (changed int64, err error)
}
