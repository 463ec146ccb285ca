package storage

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// removeBlobTimeout bounds the deletion of one blob's bytes, during which the
// metadata store holds a lock that writers of that blob (on SQLite: all
// writers) wait for.
const removeBlobTimeout = 30 * time.Second

// RemoveOptions tune RemoveMedia.
type RemoveOptions struct {
	// Tombstone remembers each deleted media ID so that it is never issued
	// again (local media). Remote cache purges leave it false.
	Tombstone bool
	// Grace keeps blobs claimed (recorded, or reused by a deduplicating
	// upload) less than Grace ago: an upload may be about to reference them.
	// They are left to the garbage collector (storage/gc). It must exceed
	// the gap between an upload's claim and its media row (milliseconds)
	// plus the clock skew between instances; 0 deletes at once, which is
	// only safe with no uploads running.
	Grace time.Duration
	// Now is the clock (nil: time.Now); the deletion time and the grace
	// cutoff come from it.
	Now func() time.Time
}

// Removed describes what RemoveMedia removed.
type Removed struct {
	// Media are the deleted media rows, as they were.
	Media []Media
	// Thumbnails counts the thumbnails deleted with them.
	Thumbnails int
	// Blobs counts the blobs (records and bytes) removed, and Bytes their
	// total size.
	Blobs int
	Bytes int64
	// KeptBlobs counts the blobs the deleted rows referenced that were kept:
	// still referenced by other media or thumbnails (deduplication), claimed
	// within the grace period, or already gone. The garbage collector
	// removes those that become unreferenced.
	KeptBlobs int
}

// RemoveMedia deletes media items and their thumbnails, then the blobs that
// nothing references any more, from whichever datastore holds each. It is the
// one deletion path for media: admin deletions, purges and retention.
//
// The order is the storage contract's, backwards (see the package doc and
// storage/gc): first the rows, in one transaction of
// MediaAdmin.DeleteMedia (thumbnails cascade; with opts.Tombstone the IDs
// are remembered); then, for each blob hash those rows and thumbnails
// referenced, BlobCollector.DeleteUnreferencedBlob with the cutoff now
// minus opts.Grace, which deletes the record and, before committing, the
// bytes from the datastore named in the record, only while no media row or
// thumbnail references the blob and nothing claimed it since the cutoff.
// Blobs still shared with other media, or claimed within the grace, are
// kept. A crash or an error after the rows are deleted leaves only
// unreferenced blobs, which the garbage collector removes; never a row
// without its bytes.
//
// meta must implement MediaAdmin and BlobCollector. Once the rows are
// deleted, a failing blob does not stop the others (except when the
// database or a datastore is unavailable); the returned error then reports
// it along with what was removed. Errors of the metadata store or a
// datastore that wrap ErrUnavailable stay wrapped.
func RemoveMedia(ctx context.Context, meta MetadataStore, stores *Datastores, refs []MediaRef, opts RemoveOptions) (Removed, error) {
	admin, ok := meta.(MediaAdmin)
	if !ok {
		return Removed{}, fmt.Errorf("removing media: metadata store %T cannot delete media", meta)
	}
	coll, ok := meta.(BlobCollector)
	if !ok {
		return Removed{}, fmt.Errorf("removing media: metadata store %T cannot collect blobs", meta)
	}
	if stores == nil {
		return Removed{}, errors.New("removing media: no datastores")
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	del, err := admin.DeleteMedia(ctx, refs, opts.Tombstone, now())
	if err != nil {
		return Removed{}, fmt.Errorf("removing media: %w", err)
	}
	out := Removed{Media: del.Media, Thumbnails: del.Thumbnails}
	cutoff := now().Add(-opts.Grace)
	var (
		failed int
		first  error
	)
	for i, sha := range del.Blobs {
		if err := ctx.Err(); err != nil {
			out.KeptBlobs += len(del.Blobs) - i
			return out, fmt.Errorf("removing media: %d row(s) deleted, stopped before their blobs (left to the garbage collector): %w", len(del.Media), err)
		}
		var size int64
		deleted, err := coll.DeleteUnreferencedBlob(ctx, sha, cutoff, func(ctx context.Context, rec BlobRecord) error {
			store, ok := stores.Get(rec.Datastore)
			if !ok {
				return fmt.Errorf("blob %s is recorded in unknown datastore %q", rec.SHA256, rec.Datastore)
			}
			ctx, cancel := context.WithTimeout(ctx, removeBlobTimeout)
			defer cancel()
			if err := store.Delete(ctx, rec.SHA256); err != nil {
				return fmt.Errorf("deleting bytes from datastore %s: %w", rec.Datastore, err)
			}
			size = rec.Size
			return nil
		})
		switch {
		case err != nil:
			out.KeptBlobs++
			failed++
			if first == nil {
				first = err
			}
			if errors.Is(err, ErrUnavailable) {
				// The database or the datastore is down: stop rather than
				// fail on every blob.
				out.KeptBlobs += len(del.Blobs) - i - 1
				return out, fmt.Errorf("removing media: %d row(s) deleted, their blobs left to the garbage collector: %w", len(del.Media), err)
			}
		case deleted:
			out.Blobs++
			out.Bytes += size
		default:
			out.KeptBlobs++
		}
	}
	if first != nil {
		return out, fmt.Errorf("removing media: %d row(s) deleted, %d blob(s) failed (left to the garbage collector), first: %w", len(del.Media), failed, first)
	}
	return out, nil
}
