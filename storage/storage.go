// Package storage defines the two stores behind the media repository: a
// content-addressed BlobStore that holds bytes, and a MetadataStore that holds
// what is known about each media item and each blob. Implementations live in
// sub-packages (filestore, sqlstore); conformance suites that every
// implementation must pass live in blobtest and metatest.
//
// The contract that keeps data safe is the order of writes: a blob is made
// durable (fsync + atomic rename, or a completed object) before any metadata
// row points at it. A crash between the two leaves at most an unreferenced
// blob, never a row without its bytes.
//
// Unreferenced blobs are removed by the garbage collector in storage/gc, in
// the reverse order (record, then bytes, in one transaction of the metadata
// store; see BlobCollector). Every blob an upload is about to reference is
// claimed first (IngestTo: TouchBlob of a deduplication candidate, then
// RecordBlob of the result), and the collector only takes blobs whose last
// claim is older than its grace period; the package doc of storage/gc states
// the whole protocol.
package storage

import (
	"context"
	"errors"
	"io"
	"time"
)

// Errors shared by all stores. Implementations wrap them with %w; callers test
// with errors.Is.
var (
	// ErrNotFound reports that a blob or a metadata row does not exist.
	ErrNotFound = errors.New("not found")
	// ErrTooLarge reports that a body exceeded the size limit given to Put.
	ErrTooLarge = errors.New("body exceeds size limit")
	// ErrSizeMismatch reports that a body was not exactly as long as announced.
	ErrSizeMismatch = errors.New("body length differs from the announced length")
	// ErrHashMismatch reports that a body did not hash to the SHA-256 it was
	// expected to have (PutOptions.ExpectedSHA256).
	ErrHashMismatch = errors.New("body does not hash to the expected SHA-256")
	// ErrConflict reports that a row with the same key already exists, or that a
	// pending media item was already completed.
	ErrConflict = errors.New("conflict")
	// ErrLimitExceeded reports that a user already has as many pending uploads
	// as allowed.
	ErrLimitExceeded = errors.New("limit exceeded")
	// ErrQuarantined reports that a media row was not written because its
	// content is quarantined (see Media.RefuseQuarantined).
	ErrQuarantined = errors.New("content is quarantined")
)

// PrefixSize is how many leading bytes of a blob form its prefix hash, which is
// used to find a likely duplicate before the whole body has been read.
const PrefixSize = 64 << 10

// PutOptions tunes BlobStore.Put.
type PutOptions struct {
	// MaxSize is the largest body accepted; 0 or less means no limit. A longer
	// body makes Put fail with ErrTooLarge and keep nothing.
	MaxSize int64
	// ExpectedSize, when 0 or more, is the exact length the body must have
	// (from Content-Length); -1 means unknown. A body of another length makes Put
	// fail with ErrSizeMismatch and keep nothing.
	ExpectedSize int64
	// ExpectedSHA256, when not empty, is the lowercase hex SHA-256 the body
	// must hash to (a hash recorded elsewhere, such as an import source's). A
	// body that hashes to anything else makes Put fail with ErrHashMismatch
	// and keep nothing: the check is made once the body has been read and
	// before the blob is put in place, so wrong bytes never become a blob.
	// A value that is not a valid hash therefore matches no body. Empty (the
	// default) means no expectation.
	ExpectedSHA256 string
	// Candidate is the hash of a stored blob that probably holds the same bytes
	// (same size and prefix). The store then compares the incoming bytes with it
	// instead of writing them, and only writes from the first byte that differs,
	// so storing a duplicate costs a hash and a read, never a write. Empty means
	// no candidate.
	Candidate string
}

// PutResult describes a stored blob.
type PutResult struct {
	// SHA256 is the lowercase hex SHA-256 of the content: the blob's address.
	SHA256 string
	// Size is the content length in bytes.
	Size int64
	// PrefixSHA256 is the lowercase hex SHA-256 of the first PrefixSize bytes
	// (or of the whole body when it is shorter).
	PrefixSHA256 string
	// Existed is true when a blob with this hash was already stored and the
	// incoming bytes were discarded.
	Existed bool
}

// Blob is an opened blob.
type Blob struct {
	// Content reads the blob. For the file store it is the *os.File itself, so
	// that io.Copy to a network connection can use sendfile. The caller closes
	// it.
	Content io.ReadSeekCloser
	// Size is the content length in bytes.
	Size int64
}

// BlobStore keeps immutable blobs addressed by the hex SHA-256 of their
// content. Implementations are safe for concurrent use.
type BlobStore interface {
	// Put streams r into the store while hashing it. The blob becomes visible
	// under its hash only once it is complete and durable; on any error nothing
	// is kept. If a blob with the same hash already exists the new bytes are
	// dropped and PutResult.Existed is true.
	Put(ctx context.Context, r io.Reader, opts PutOptions) (PutResult, error)
	// Open returns the blob with the given hash, or an error wrapping
	// ErrNotFound.
	Open(ctx context.Context, sha256 string) (Blob, error)
	// Stat returns the size of the blob, or an error wrapping ErrNotFound.
	Stat(ctx context.Context, sha256 string) (int64, error)
	// Delete removes the blob. Deleting a missing blob is not an error.
	Delete(ctx context.Context, sha256 string) error
	// Close releases the store's resources.
	Close() error
}

// ThumbnailKey identifies a generated thumbnail: which media item, at which
// size, by which method, animated or not, in which requested format. Width and
// Height are the (normalised) requested box, not the thumbnail's own size.
type ThumbnailKey struct {
	// ServerName and MediaID name the media item.
	ServerName string
	MediaID    string
	// Width and Height are the requested box, after normalisation.
	Width  int
	Height int
	// Method is "crop" or "scale".
	Method string
	// Animated tells whether an animated thumbnail was asked for.
	Animated bool
	// Format is the requested output format: "" for automatic (JPEG, or
	// PNG when the source has transparency, WebP when animated), or a
	// format the client accepts, e.g. "webp".
	Format string
}

// Thumbnail is a generated thumbnail, stored as a blob like any content.
type Thumbnail struct {
	ThumbnailKey
	// ContentType is the thumbnail's type, e.g. "image/jpeg".
	ContentType string
	// SHA256 is the address of the thumbnail's blob.
	SHA256 string
	// Size is the thumbnail's length in bytes.
	Size int64
	// ActualWidth and ActualHeight are the thumbnail's own dimensions.
	ActualWidth, ActualHeight int
	// Datastore holds the blob (set by GetThumbnail; ignored on writes).
	Datastore string
	// CreatedAt is when it was generated.
	CreatedAt time.Time
}

// MediaState tells whether a media item has its content.
type MediaState string

// Media states.
const (
	// StatePending is a media ID reserved by /create whose content has not been
	// uploaded yet.
	StatePending MediaState = "pending"
	// StateReady is a media item with content.
	StateReady MediaState = "ready"
)

// Media is one media item, addressed by mxc://ServerName/MediaID.
type Media struct {
	// ServerName is the Matrix server name in the mxc URI.
	ServerName string
	// MediaID is the media ID in the mxc URI ([A-Za-z0-9_-]).
	MediaID string
	// State is StatePending or StateReady.
	State MediaState
	// UserID is the Matrix user who created or uploaded the item; empty for
	// remote media.
	UserID string
	// SHA256 is the address of the content blob; empty while pending.
	SHA256 string
	// Size is the content length in bytes; 0 while pending.
	Size int64
	// ContentType is the Content-Type exactly as uploaded.
	ContentType string
	// Filename is the file name given at upload, empty when none was given.
	Filename string
	// CreatedAt is when the item was created (upload, or /create).
	CreatedAt time.Time
	// UploadedAt is when the content arrived; zero while pending.
	UploadedAt time.Time
	// ExpiresAt is when a pending item expires unless uploaded; zero for ready
	// items.
	ExpiresAt time.Time
	// Remote is true for media cached from another server.
	Remote bool
	// Datastore names the datastore holding the content blob, taken from the
	// blob's record. GetMedia sets it for ready items; it is empty while
	// pending, and ignored on writes.
	Datastore string
	// Protected media are never quarantined (MediaAdmin.SetProtected);
	// InsertMedia stores it.
	Protected bool
	// LastAccessAt is the last recorded read (MediaAdmin.RecordAccess);
	// zero when never read. Ignored on writes.
	LastAccessAt time.Time
	// QuarantinedBy and QuarantinedAt come from the quarantine of the
	// item's content (MediaAdmin.QuarantineContent), whether or not the item
	// is protected; empty/zero when its content is not quarantined. Ignored
	// on writes. An item is refused when QuarantinedBy is set and it is not
	// Protected (see Refused).
	QuarantinedBy string
	QuarantinedAt time.Time
	// RefuseQuarantined is read on writes only (InsertMedia,
	// CompletePending and their limited forms, see UsageStore): when set,
	// a store that keeps quarantines (MediaAdmin) checks in the write's own
	// transaction whether the content (SHA256) is quarantined, whether or
	// not the item is protected, and if so writes nothing and fails with
	// an error wrapping ErrQuarantined. Default false: no check.
	RefuseQuarantined bool
}

// Refused reports whether the item's content is quarantined and the item is
// not protected from that.
func (m *Media) Refused() bool { return m.QuarantinedBy != "" && !m.Protected }

// Blob metadata recorded for each stored blob.
type BlobRecord struct {
	// SHA256 is the blob's address.
	SHA256 string
	// Size is the content length in bytes.
	Size int64
	// PrefixSHA256 is the hash of the first PrefixSize bytes.
	PrefixSHA256 string
	// Datastore names the blob store holding the bytes.
	Datastore string
	// CreatedAt is when the blob was first stored.
	CreatedAt time.Time
}

// MetadataStore keeps media and blob metadata. Implementations are safe for
// concurrent use and keep their schema up to date themselves (migrations run
// when the store is opened).
type MetadataStore interface {
	// RecordBlob records a blob; recording an already known hash keeps the
	// first record and only claims it anew (see BlobCollector.TouchBlob) at
	// b.CreatedAt, or now when that is zero. It returns the record as it
	// stands after the call, read in the same statement: b when it was new,
	// otherwise the first record (whose Datastore may differ from
	// b.Datastore), so callers need no GetBlob after it.
	RecordBlob(ctx context.Context, b BlobRecord) (BlobRecord, error)
	// GetBlob returns the record of a blob, or ErrNotFound.
	GetBlob(ctx context.Context, sha256 string) (BlobRecord, error)
	// FindBlobByPrefix returns a blob of the given size whose prefix hash
	// matches, or ErrNotFound. It is a hint for dedup, not a proof of equality.
	FindBlobByPrefix(ctx context.Context, size int64, prefixSHA256 string) (BlobRecord, error)
	// CountBlobReferences returns how many media rows reference the blob.
	CountBlobReferences(ctx context.Context, sha256 string) (int64, error)
	// ListBlobs returns up to limit records of blobs held by datastore whose
	// hash sorts after afterSHA256 (empty: from the start), ordered by hash
	// ascending. Paging with the last hash of each page visits every blob once.
	ListBlobs(ctx context.Context, datastore string, afterSHA256 string, limit int) ([]BlobRecord, error)
	// CountBlobs returns how many blobs datastore holds and their total size
	// in bytes.
	CountBlobs(ctx context.Context, datastore string) (count int64, bytes int64, err error)
	// MoveBlob atomically changes the datastore of a blob's record from from
	// to to. It fails with ErrNotFound when no record of sha256 names from.
	MoveBlob(ctx context.Context, sha256, from, to string) error

	// InsertMedia stores a ready media item. An existing (ServerName, MediaID)
	// gives ErrConflict.
	InsertMedia(ctx context.Context, m Media) error
	// GetMedia returns a media item in any state, or ErrNotFound. For a ready
	// item Datastore is the datastore of its blob record.
	GetMedia(ctx context.Context, serverName, mediaID string) (Media, error)
	// CreatePending reserves a media ID for m.UserID with m.ExpiresAt. It fails
	// with ErrLimitExceeded when that user already holds maxPending pending,
	// unexpired IDs on that server (maxPending <= 0: no limit), and with
	// ErrConflict when the ID exists.
	CreatePending(ctx context.Context, m Media, maxPending int) error
	// OldestPendingExpiry returns the earliest ExpiresAt among the user's
	// unexpired pending items, or ErrNotFound when there are none.
	OldestPendingExpiry(ctx context.Context, serverName, userID string, now time.Time) (time.Time, error)
	// CompletePending gives a pending item its content: SHA256, Size,
	// ContentType, Filename and UploadedAt are taken from m. It succeeds only
	// if the item is pending, belongs to m.UserID and has not expired at
	// m.UploadedAt; otherwise ErrNotFound (missing or expired) or ErrConflict
	// (already ready, or another user's).
	CompletePending(ctx context.Context, m Media) error
	// DeleteExpiredPending removes pending items that expired before now and
	// returns how many were removed.
	DeleteExpiredPending(ctx context.Context, now time.Time) (int64, error)

	// InsertThumbnail records a generated thumbnail. Its blob must be
	// recorded first, and its media item must exist. An existing key (the
	// same thumbnail generated concurrently elsewhere) gives ErrConflict.
	InsertThumbnail(ctx context.Context, t Thumbnail) error
	// GetThumbnail returns the thumbnail with key k, with Datastore filled
	// from its blob record, or ErrNotFound.
	GetThumbnail(ctx context.Context, k ThumbnailKey) (Thumbnail, error)

	// Close releases the store's resources.
	Close() error
}

// CapacityReporter is a BlobStore that knows the space it has left (a
// file store: its filesystem's free and total bytes).
type CapacityReporter interface {
	Capacity() (free, size uint64, err error)
}

// CORSRule is one rule of a bucket's cross-origin resource sharing
// configuration: the origins that may make requests, the methods and the
// request headers they may use.
type CORSRule struct {
	AllowedOrigins, AllowedMethods, AllowedHeaders []string
}

// CORSReporter is a BlobStore whose content browsers may fetch directly
// (an S3 bucket, through presigned URLs) and that can read its bucket's
// CORS configuration. A bucket without one gives ErrNotFound.
type CORSReporter interface {
	BucketCORS(ctx context.Context) ([]CORSRule, error)
}
