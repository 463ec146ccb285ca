package storage

import (
	"context"
	"time"
)

// This file declares the optional capabilities that operators' control needs
// (takedown, deletion, retention, usage, background jobs). They are separate
// interfaces, discovered with a type assertion on the MetadataStore, so that
// the core interface stays small; storage/sqlstore implements all of them
// and storage/metatest checks them on SQLite and PostgreSQL.
//
// Deletion keeps the order of the storage contract, backwards: media rows
// (and the thumbnails that cascade with them) are deleted first, in one
// transaction; the blobs they referenced are then removed through
// BlobCollector.DeleteUnreferencedBlob, which deletes a record (and its
// bytes) only while nothing references it and nothing claimed it within the
// grace period. A crash between the two steps leaves unreferenced blobs,
// which the garbage collector (storage/gc) removes; never a row without its
// blob.

// MediaRef names one media item.
type MediaRef struct {
	ServerName string
	MediaID    string
}

// Quarantine records that content (a blob hash) must not be served.
// Quarantine is by content, not by media item: every media row whose blob
// has the hash is quarantined, including rows created later, unless the row
// is protected (Media.Protected).
type Quarantine struct {
	// SHA256 is the quarantined content's hash.
	SHA256 string
	// By names who quarantined it (a user ID, or an operator's label).
	By string
	// At is when it was quarantined.
	At time.Time
}

// MediaOrder is a sort key of ListUserMedia. Ties are always broken by
// MediaID ascending, whatever the direction.
type MediaOrder string

// Sort keys of ListUserMedia.
const (
	OrderMediaID       MediaOrder = "media_id"
	OrderFilename      MediaOrder = "filename"
	OrderCreated       MediaOrder = "created"
	OrderLastAccess    MediaOrder = "last_access"
	OrderSize          MediaOrder = "size"
	OrderContentType   MediaOrder = "content_type"
	OrderQuarantinedBy MediaOrder = "quarantined_by"
	OrderProtected     MediaOrder = "protected"
)

// UserMediaQuery selects a page of one user's media on one server name.
type UserMediaQuery struct {
	// ServerName and UserID select the media (local media only: remote
	// media have no user). Both required.
	ServerName string
	UserID     string
	// OrderBy is the sort key; empty means OrderCreated.
	OrderBy MediaOrder
	// Descending reverses the sort key (not the MediaID tie-break).
	Descending bool
	// Offset skips that many rows; Limit bounds the page (<= 0: nothing).
	Offset, Limit int
}

// UsageOrder is a sort key of ListUsage. Ties are broken by user ID
// ascending.
type UsageOrder string

// Sort keys of ListUsage.
const (
	UsageByUserID UsageOrder = "user_id"
	UsageByBytes  UsageOrder = "bytes"
	UsageByCount  UsageOrder = "count"
)

// UsageQuery selects a page of per-user usage on one server name.
type UsageQuery struct {
	// ServerName selects the server's local media. Required.
	ServerName string
	// CreatedFrom and CreatedUntil, when not zero, count only media created
	// at or after / at or before them.
	CreatedFrom, CreatedUntil time.Time
	// UserIDContains, when not empty, keeps only users whose ID contains it
	// (case-insensitive substring).
	UserIDContains string
	// OrderBy is the sort key; empty means UsageByUserID.
	OrderBy UsageOrder
	// Descending reverses the sort key.
	Descending bool
	// Offset skips that many users; Limit bounds the page (<= 0: nothing).
	Offset, Limit int
}

// Usage is one user's ready local media on one server name.
type Usage struct {
	UserID string
	// Count is how many ready media items the user created; Bytes their
	// total size (each item counted, even when items share a blob).
	Count, Bytes int64
}

// OldMediaQuery selects media whose last access (or creation, when never
// accessed) is before a time, for deletion by age.
type OldMediaQuery struct {
	// ServerName selects media of one server name; empty means any.
	ServerName string
	// Remote selects cached remote media (true) or local media (false).
	Remote bool
	// Before: last access (or creation when never accessed) strictly before
	// it. Required.
	Before time.Time
	// SizeGreaterThan keeps only media larger than it (bytes).
	SizeGreaterThan int64
	// IncludeQuarantined and IncludeProtected also select quarantined and
	// protected media (both excluded by default).
	IncludeQuarantined, IncludeProtected bool
	// After continues a listing: only media whose (ServerName, MediaID)
	// sorts after it. Results are ordered by (ServerName, MediaID).
	After MediaRef
	// Limit bounds the page (<= 0: nothing).
	Limit int
}

// DeletedMedia describes what DeleteMedia removed.
type DeletedMedia struct {
	// Media are the deleted rows, as they were.
	Media []Media
	// Thumbnails counts the thumbnails deleted with them.
	Thumbnails int
	// Blobs are the distinct hashes the deleted rows and thumbnails
	// referenced. Some may still be referenced by other rows; the caller
	// offers each to BlobCollector.DeleteUnreferencedBlob.
	Blobs []string
}

// Access is one read of a media item or thumbnail, for batched last-access
// tracking.
type Access struct {
	MediaRef
	// At is when it was read.
	At time.Time
}

// MediaAdmin is implemented by metadata stores that support takedown,
// deletion and usage reporting. Media rows returned by GetMedia and by the
// methods below fill Media.Protected, Media.LastAccessAt and
// Media.QuarantinedBy/QuarantinedAt.
type MediaAdmin interface {
	// QuarantineContent quarantines the content sha256 (which need not be
	// recorded: content can be quarantined before it is uploaded again). A
	// hash already quarantined keeps its first record and gives false.
	QuarantineContent(ctx context.Context, q Quarantine) (bool, error)
	// UnquarantineContent lifts the quarantine of sha256 and reports
	// whether there was one.
	UnquarantineContent(ctx context.Context, sha256 string) (bool, error)
	// GetQuarantine returns the quarantine of sha256, or ErrNotFound.
	GetQuarantine(ctx context.Context, sha256 string) (Quarantine, error)
	// SetProtected sets the protected flag of a media item (protected media
	// are never quarantined), or fails with ErrNotFound.
	SetProtected(ctx context.Context, ref MediaRef, protected bool) error
	// ListMediaByHash returns up to limit ready media rows (of any server
	// name, local or remote) whose blob is sha256, ordered by (ServerName,
	// MediaID) after the given ref.
	ListMediaByHash(ctx context.Context, sha256 string, after MediaRef, limit int) ([]Media, error)
	// ListUserMedia returns a page of the user's ready media and how many
	// ready media the user has in all.
	ListUserMedia(ctx context.Context, q UserMediaQuery) (page []Media, total int64, err error)
	// ListUsage returns a page of per-user usage and how many users match
	// the query in all.
	ListUsage(ctx context.Context, q UsageQuery) (page []Usage, total int64, err error)
	// ListOldMedia returns a page of ready media selected by q, ordered by
	// (ServerName, MediaID).
	ListOldMedia(ctx context.Context, q OldMediaQuery) ([]Media, error)
	// DeleteMedia deletes the given media rows (in any state) and their
	// thumbnails in one transaction; missing rows are skipped. With
	// tombstone, each deleted ID is remembered so that InsertMedia and
	// CreatePending refuse it (ErrConflict) from then on: a deleted media ID
	// is never issued again.
	DeleteMedia(ctx context.Context, refs []MediaRef, tombstone bool, at time.Time) (DeletedMedia, error)
	// RecordAccess moves the last-access time of each media item forward to
	// At (never backwards), in one transaction; unknown items are skipped.
	RecordAccess(ctx context.Context, accesses []Access) error
	// RecordThumbnailAccess does the same for the thumbnails of the given
	// media items: every thumbnail of an item shares its last-access time.
	RecordThumbnailAccess(ctx context.Context, accesses []Access) error
}

// RemoteCacheEntry is one cached remote media item in last-access order.
type RemoteCacheEntry struct {
	MediaRef
	// Size is the item's length in bytes.
	Size int64
	// LastAccess is its last access, or its creation when never accessed.
	LastAccess time.Time
}

// Retainer is implemented by metadata stores that support retention: the
// queries that find what ages out. Deletion itself goes through
// MediaAdmin.DeleteMedia and BlobCollector.
type Retainer interface {
	// RemoteCacheSize returns how many ready remote media rows exist and
	// their total size in bytes.
	RemoteCacheSize(ctx context.Context) (count, bytes int64, err error)
	// ListRemoteLRU returns up to limit ready remote media, least recently
	// accessed first (last access, or creation when never accessed; ties by
	// (ServerName, MediaID)), excluding protected ones.
	ListRemoteLRU(ctx context.Context, limit int) ([]RemoteCacheEntry, error)
	// DeleteThumbnailsNotAccessedSince deletes up to limit thumbnails whose
	// media item was last accessed (or, never accessed, whose thumbnail was
	// created) before cutoff, and returns the distinct blob hashes they
	// referenced.
	DeleteThumbnailsNotAccessedSince(ctx context.Context, cutoff time.Time, limit int) (deleted int, blobs []string, err error)
}

// JobState is the state of a background job.
type JobState string

// Job states.
const (
	JobRunning   JobState = "running"
	JobDone      JobState = "done"
	JobFailed    JobState = "failed"
	JobCancelled JobState = "cancelled"
)

// Job is a background job whose progress survives restarts: whoever holds
// its lease runs it, saving its cursor and counters as it goes, and a job
// whose holder died (lease expired) is taken over and resumed from its
// cursor by another runner.
type Job struct {
	// ID is unique; chosen by the creator.
	ID string
	// Kind names what the job does (e.g. "purge_remote"); Params are its
	// parameters, opaque to the store (JSON by convention).
	Kind   string
	Params []byte
	// State is JobRunning until the job ends.
	State JobState
	// Cursor is where to resume, opaque to the store.
	Cursor string
	// Items and Bytes count what the job has done so far.
	Items, Bytes int64
	// Error is why a failed job failed.
	Error string
	// RequestedBy names who started it.
	RequestedBy string
	// CreatedAt, UpdatedAt and FinishedAt (zero until it ends) are set by
	// the caller on CreateJob and UpdateJob.
	CreatedAt, UpdatedAt, FinishedAt time.Time
	// Owner holds the lease until LeaseUntil (both managed by the store).
	Owner      string
	LeaseUntil time.Time
}

// JobStore is implemented by metadata stores that keep background jobs.
type JobStore interface {
	// CreateJob stores a new job (State JobRunning, no owner). An existing
	// ID gives ErrConflict.
	CreateJob(ctx context.Context, j Job) error
	// GetJob returns a job or ErrNotFound.
	GetJob(ctx context.Context, id string) (Job, error)
	// ListJobs returns up to limit jobs, newest first.
	ListJobs(ctx context.Context, limit int) ([]Job, error)
	// ClaimJob gives owner the lease of a running job until until, if no
	// one holds it or its lease expired before now. It reports whether the
	// lease was taken (false for unknown or finished jobs).
	ClaimJob(ctx context.Context, id, owner string, now, until time.Time) (bool, error)
	// ListClaimableJobs returns running jobs whose lease is free or expired
	// before now, oldest first.
	ListClaimableJobs(ctx context.Context, now time.Time) ([]Job, error)
	// UpdateJob saves j's State, Cursor, Items, Bytes, Error, UpdatedAt and
	// FinishedAt and extends the lease to until, only if owner still holds
	// the lease; otherwise ErrConflict (the job was taken over, or
	// cancelled). A finished state releases the lease.
	UpdateJob(ctx context.Context, j Job, owner string, until time.Time) error
	// CancelJob marks a running job cancelled, whoever holds it; its holder
	// notices at its next UpdateJob (ErrConflict). It reports whether a
	// running job was cancelled.
	CancelJob(ctx context.Context, id string, at time.Time) (bool, error)
}

// MediaPresence is what a metadata store holds under one media ref: a
// media row (in any state) or a deleted ID's tombstone.
type MediaPresence struct {
	// State is the row's state; empty for a tombstone.
	State MediaState
	// SHA256 and Size are the row's content; empty and 0 while pending and
	// for a tombstone.
	SHA256 string
	Size   int64
	// Deleted is true for an ID deleted with a tombstone (see
	// MediaAdmin.DeleteMedia), which is never issued again.
	Deleted bool
}

// MediaLookup is implemented by metadata stores that look many media refs
// up at once, tombstones included (GetMedia answers ErrNotFound for a
// deleted ID). Imports use it to skip what is already stored.
type MediaLookup interface {
	// LookupMedia returns what the store holds for each of refs; refs
	// holding nothing are absent from the map. A ref with both a row and a
	// tombstone is reported by its row.
	LookupMedia(ctx context.Context, refs []MediaRef) (map[MediaRef]MediaPresence, error)
}
