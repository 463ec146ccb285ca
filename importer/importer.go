// Package importer brings media from another media repository (Synapse,
// Dendrite, matrix-media-repo, or an archive written by package
// mediaarchive) into this module's stores, keeping every mxc:// URI
// working: server name, media ID, uploader, name, type, creation time,
// quarantine and protection are carried over.
//
// An import is a pipeline: a Source lists Items (metadata read from the
// source's database, bytes opened lazily from its files or objects), Run
// asks the Sink which of them are already stored, and the Sink stores the
// rest. Nothing is written for an item that is already present, so an
// import interrupted at any point is resumed by running it again, and a
// second full run changes nothing. StoreSink writes into this module's
// stores; the caddymodule package has a Sink that goes through a running
// Caddy's admin API to a StoreSink there. Package importtest has an
// in-memory Source for tests.
//
// Write order (the storage package's contract): the blob is stored and its
// SHA-256 checked against the source's recorded hash first; a quarantine
// carried over is recorded next (by hash, so the bytes are refused before
// any row points at them); the media row comes last. A crash between the
// steps leaves at most an unreferenced blob, which the garbage collector
// removes after its grace period, or a quarantine record for bytes that are
// quarantined at the source anyway.
package importer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Errors a Source or Sink reports for one item. Run counts them in the
// Report instead of stopping.
var (
	// ErrMissing reports that the source has a row for the item but not its
	// bytes (a missing file or object).
	ErrMissing = errors.New("source content missing")
	// ErrHashMismatch reports that the bytes read from the source do not
	// hash to the SHA-256 the source recorded for them.
	ErrHashMismatch = errors.New("content does not match the source's recorded SHA-256")
	// ErrConflict reports that the target already holds a different media
	// item (other bytes) under the same server name and media ID, or that
	// the ID was deleted there and is never issued again.
	ErrConflict = errors.New("media ID already used by other content")
	// ErrInvalid reports an item that cannot be stored as it is: a server
	// name or media ID the module does not accept, a recorded hash that is
	// not a SHA-256, a negative size (other than -1), or (for Run) no way
	// to open its bytes. See ValidateItem.
	ErrInvalid = errors.New("invalid media item")
)

// Item is one media item read from a source.
type Item struct {
	// ServerName and MediaID form the item's mxc:// URI; they are kept as
	// they are.
	ServerName string
	MediaID    string
	// Remote is true for a cached copy of another server's media.
	Remote bool
	// UserID is the uploader of local media; empty when unknown or remote.
	UserID string
	// ContentType and Filename are as uploaded; Filename may be empty.
	ContentType string
	Filename    string
	// CreatedAt is when the item was uploaded (or cached, for remote media).
	CreatedAt time.Time
	// Size is the length the source recorded, or -1 when unknown. A body of
	// another length is reported as a mismatch.
	Size int64
	// SHA256 is the lowercase hex SHA-256 the source recorded, or empty
	// when it records none.
	SHA256 string
	// QuarantinedBy is set when the source quarantined the item: who did
	// (a user ID, or a short description such as "imported from synapse"
	// when the source does not record it).
	QuarantinedBy string
	// Protected items are never quarantined.
	Protected bool
	// Open opens the item's bytes. A missing file or object gives an error
	// wrapping ErrMissing.
	Open func(ctx context.Context) (io.ReadCloser, error)
}

// Ref returns the item's server name and media ID.
func (it Item) Ref() storage.MediaRef {
	return storage.MediaRef{ServerName: it.ServerName, MediaID: it.MediaID}
}

// ValidateItem checks the metadata a Sink relies on before storing an item
// (Open is not its concern: a Sink is given the bytes): its server name and
// media ID are valid (matrix.ValidServerName, matrix.ValidMediaID), a
// recorded SHA256 is a lowercase hex SHA-256 and Size is -1 or more. The
// error wraps ErrInvalid.
func ValidateItem(it Item) error {
	var why string
	switch {
	case !matrix.ValidServerName(it.ServerName):
		why = fmt.Sprintf("server name %q is not valid", it.ServerName)
	case !matrix.ValidMediaID(it.MediaID):
		why = fmt.Sprintf("media ID %q is not valid (want 1 to %d of [A-Za-z0-9_-])", it.MediaID, matrix.MaxMediaIDLength)
	case it.SHA256 != "" && !storage.ValidSHA256(it.SHA256):
		why = fmt.Sprintf("recorded hash %q is not a lowercase hex SHA-256", it.SHA256)
	case it.Size < -1:
		why = fmt.Sprintf("recorded size %d is negative", it.Size)
	default:
		return nil
	}
	return fmt.Errorf("%s: %w", why, ErrInvalid)
}

// Filter selects which items a Source lists.
type Filter struct {
	// ServerNames, when not empty, keeps only local media of these server
	// names (remote media is selected by IncludeRemote alone).
	ServerNames []string
	// IncludeRemote also lists the source's remote media cache.
	IncludeRemote bool
}

// Totals is what a source holds for a filter, for progress and ETA.
type Totals struct {
	// Items and Bytes count the selected items and their recorded sizes;
	// -1 when the source cannot tell cheaply.
	Items, Bytes int64
}

// Source lists the media of another media repository. Implementations
// read their database read-only and never change the source.
type Source interface {
	// Name describes the source in progress lines and reports, e.g.
	// "synapse (postgres, /var/lib/synapse/media_store)".
	Name() string
	// Totals counts what Walk will list for f.
	Totals(ctx context.Context, f Filter) (Totals, error)
	// Walk calls fn for every item selected by f, one call at a time, in a
	// stable order, and stops at fn's first error, returning it. It must not hold the whole
	// listing in memory (stream from a cursor, or page by key).
	Walk(ctx context.Context, f Filter, fn func(Item) error) error
	// Close releases the source's database connections.
	Close() error
}

// Outcome is what storing one item did.
type Outcome int

// Outcomes of Sink.Put.
const (
	// Imported: the item was stored (its blob may have been deduplicated).
	Imported Outcome = iota
	// AlreadyPresent: the same item with the same bytes was already stored.
	AlreadyPresent
)

// Present is what the target already holds for a media ref. Run compares
// it with the source's item: the same SHA256 (or, when the source records
// no hash, the same Size) means the item is already imported; anything
// else, a pending or a deleted ID, is a conflict.
type Present struct {
	// SHA256 of its content; empty for a pending (not yet uploaded) item
	// and for a deleted ID.
	SHA256 string
	// Size of its content in bytes; 0 for a pending item or a deleted ID.
	Size int64
	// Deleted is true for a deleted ID that is never issued again.
	Deleted bool
}

// Sink is where imported media goes: this module's stores directly
// (StoreSink) or a running Caddy through its admin API.
type Sink interface {
	// Lookup reports which of refs the target already holds (media rows in
	// any state, and deleted IDs); refs it does not hold are absent from
	// the map. An error means the target could not be asked, and stops the
	// run.
	Lookup(ctx context.Context, refs []storage.MediaRef) (map[storage.MediaRef]Present, error)
	// Put stores it with the bytes read from body, checking them against
	// it.SHA256 and it.Size when set (ErrHashMismatch, and nothing is
	// referenced). A ref already holding the same bytes gives
	// AlreadyPresent; other bytes, or a deleted ID, give ErrConflict; an
	// item ValidateItem refuses gives ErrInvalid. A carried-over quarantine
	// (it.QuarantinedBy) is recorded before the media row (see the package
	// doc). Put must not keep body after it returns.
	Put(ctx context.Context, it Item, body io.Reader) (Outcome, error)
	// Quarantine records the quarantine of content that could not be
	// imported (its bytes are missing at the source), so that it stays
	// refused here. sha256 is the source's recorded hash.
	Quarantine(ctx context.Context, sha256, by string) error
}

// ErrFileUnreachable is a FileSink's answer when it cannot read the
// source's file itself (another machine or container, no permission, or
// the path no longer names the file that was opened). Run then sends the
// bytes through Put, for that item and every later one.
var ErrFileUnreachable = errors.New("the target cannot read the source's file itself")

// FileSink is a Sink that can read an item's bytes from the source's own
// file: a Caddy on the same machine opens the file and reads it directly
// instead of receiving its bytes over a socket, which saves a copy of every
// byte on each side. Run uses it for items whose Open returns an *os.File.
type FileSink interface {
	Sink
	// PutFile is Put with the bytes of f, a regular file the source opened
	// (at its start); the target reads the same file itself and makes sure
	// it is the same file (not merely the same path). It returns an error
	// wrapping ErrFileUnreachable, having stored nothing, when it cannot.
	// PutFile must not keep f after it returns.
	PutFile(ctx context.Context, it Item, f *os.File) (Outcome, error)
}
