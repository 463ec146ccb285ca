package storage

import (
	"context"
	"time"
)

// StoredBlob is one blob found by listing a blob store.
type StoredBlob struct {
	// SHA256 is the blob's address.
	SHA256 string
	// Size is its length in bytes.
	Size int64
	// ModTime is when the store last wrote it (file modification time,
	// object LastModified).
	ModTime time.Time
}

// Lister is implemented by blob stores that can enumerate their blobs, which
// the garbage collector needs to find bytes that no blob record names (left
// by a crash between the blob write and RecordBlob).
type Lister interface {
	// List calls fn for every complete blob in the store, in no particular
	// order; uploads in progress (temp files, multipart uploads) are not
	// blobs and are not listed. A blob added or deleted during the walk may
	// or may not be listed. An error from fn stops the walk and is returned.
	List(ctx context.Context, fn func(StoredBlob) error) error
}

// BlobCollector is implemented by metadata stores that support orphan
// garbage collection (package storage/gc). Its methods are the only ways blob
// records disappear, and each deletes the bytes inside the same database
// transaction that removes (or proves the absence of) the record, so that a
// concurrent RecordBlob or TouchBlob of the same hash waits for the whole
// deletion and then sees that the record is gone. See the package doc of
// storage/gc for the protocol.
type BlobCollector interface {
	// TouchBlob marks the recorded blob as in use at at (its last-claim time),
	// which keeps the collector away from it for the grace period. It reports
	// false when no record of sha256 exists. A claim never moves backwards.
	TouchBlob(ctx context.Context, sha256 string, at time.Time) (bool, error)
	// ListUnreferencedBlobs returns up to limit records, ordered by hash and
	// after afterSHA256, that no media row and no thumbnail references and
	// whose last claim (RecordBlob or TouchBlob) is before cutoff. It is a
	// hint: DeleteUnreferencedBlob checks again.
	ListUnreferencedBlobs(ctx context.Context, cutoff time.Time, afterSHA256 string, limit int) ([]BlobRecord, error)
	// DeleteUnreferencedBlob deletes the record of sha256 if it is still
	// unreferenced and last claimed before cutoff, calls deleteBytes with the
	// deleted record while the deletion is not yet committed, and commits
	// only if deleteBytes succeeds. It reports whether the record was deleted;
	// a record that is referenced, claimed since, or missing gives false and
	// a nil error, and deleteBytes is not called.
	DeleteUnreferencedBlob(ctx context.Context, sha256 string, cutoff time.Time, deleteBytes func(context.Context, BlobRecord) error) (bool, error)
	// DeleteUnrecordedBlob calls deleteBytes if no record of sha256 exists,
	// while holding the database lock that RecordBlob of that hash needs, so
	// that no record of it can be created until deleteBytes has returned. It
	// reports whether deleteBytes was called and succeeded; a record that
	// exists gives false and a nil error.
	DeleteUnrecordedBlob(ctx context.Context, sha256 string, deleteBytes func(context.Context) error) (bool, error)
	// LockCollector takes the collector lock, which at most one collector of
	// the database holds at a time (a PostgreSQL session advisory lock; for
	// SQLite, which one process uses, a lock of the store handle). It returns
	// acquired false at once, without error, when another holder has it.
	// release gives it back and must be called once when acquired.
	LockCollector(ctx context.Context) (release func(), acquired bool, err error)
}

// ConcurrentCollector is implemented by BlobCollectors on which several
// DeleteUnreferencedBlob calls run in parallel (each on its own database
// connection), so that deleting many blobs gains from overlapping their
// round trips, commits and datastore deletes. Without it, callers delete
// one blob at a time.
type ConcurrentCollector interface {
	// CollectConcurrency is how many DeleteUnreferencedBlob calls are worth
	// running at once.
	CollectConcurrency() int
}
