package storage

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// removeBlobTimeout bounds the deletion of one blob's bytes, during which the
// metadata store holds a lock that writers of that blob (on SQLite: all
// writers) wait for.
const removeBlobTimeout = 30 * time.Second

// maxRemoveBlobWorkers bounds how many blobs RemoveMedia deletes at once,
// whatever the metadata store's ConcurrentCollector asks for.
const maxRemoveBlobWorkers = 16

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
	// RowsDeleted, when set, is called with the deleted media rows as soon
	// as their deletion is committed, before any blob is deleted, so that
	// a caller can record them (a job's counters) even if it dies while
	// the blobs are deleted. An error stops RemoveMedia there: the blobs
	// are left to the garbage collector.
	RowsDeleted func(media []Media) error
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
// Each blob is deleted in its own transaction. Those transactions mostly
// wait (a round trip per statement, the commit's flush, the datastore's
// delete), so when meta is a ConcurrentCollector (PostgreSQL) a few of
// them run at once, as many as it says (at most maxRemoveBlobWorkers); they
// touch distinct blobs, and each starts only after the rows are deleted.
// Otherwise (SQLite, one writer) they run one after the other.
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
	if opts.RowsDeleted != nil && len(del.Media) > 0 {
		if err := opts.RowsDeleted(del.Media); err != nil {
			return out, fmt.Errorf("removing media: after the rows were deleted: %w", err)
		}
	}
	outcomes := deleteBlobs(ctx, coll, stores, del.Blobs, now().Add(-opts.Grace), collectConcurrency(meta))
	return summarize(ctx, out, len(del.Media), outcomes)
}

// blobState is what became of one blob RemoveMedia offered for deletion.
type blobState int

const (
	// blobUntried: not offered (the context ended, or the database or a
	// datastore was found unavailable first).
	blobUntried blobState = iota
	// blobDeleted: record and bytes deleted.
	blobDeleted
	// blobKept: still referenced, claimed within the grace, or gone already.
	blobKept
	// blobFailed: the deletion failed; the record (and bytes) stay.
	blobFailed
)

// blobOutcome is what became of one blob, with its size when deleted and
// the error when failed.
type blobOutcome struct {
	state blobState
	size  int64
	err   error
}

// collectConcurrency is how many blob deletions RemoveMedia runs at once on
// meta: what meta's ConcurrentCollector says, bounded to
// [1, maxRemoveBlobWorkers]; 1 without it.
func collectConcurrency(meta MetadataStore) int {
	c, ok := meta.(ConcurrentCollector)
	if !ok {
		return 1
	}
	return min(max(c.CollectConcurrency(), 1), maxRemoveBlobWorkers)
}

// deleteBlobs offers each hash to DeleteUnreferencedBlob, up to workers at a
// time, each in its own transaction, and returns the outcome of each, in the
// order of hashes. It starts no further deletion once ctx has ended or one
// failed with ErrUnavailable; those left are blobUntried.
func deleteBlobs(ctx context.Context, coll BlobCollector, stores *Datastores, hashes []string, cutoff time.Time, workers int) []blobOutcome {
	out := make([]blobOutcome, len(hashes))
	var (
		next atomic.Int64
		stop atomic.Bool
		wg   sync.WaitGroup
	)
	for range min(workers, len(hashes)) {
		wg.Go(func() {
			for !stop.Load() && ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= len(hashes) {
					return
				}
				out[i] = deleteBlob(ctx, coll, stores, hashes[i], cutoff)
				if errors.Is(out[i].err, ErrUnavailable) {
					// The database or the datastore is down: stop rather
					// than fail on every blob.
					stop.Store(true)
				}
			}
		})
	}
	wg.Wait()
	return out
}

// deleteBlob deletes the record and then, before the deletion commits, the
// bytes of one blob, if it is unreferenced and last claimed before cutoff.
func deleteBlob(ctx context.Context, coll BlobCollector, stores *Datastores, sha string, cutoff time.Time) blobOutcome {
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
		return blobOutcome{state: blobFailed, err: err}
	case deleted:
		return blobOutcome{state: blobDeleted, size: size}
	default:
		return blobOutcome{state: blobKept}
	}
}

// summarize adds the blob outcomes to out (every blob not deleted counts as
// kept) and returns the error RemoveMedia reports: the database or a
// datastore unavailable, else the context's end before every blob was
// offered, else the first failed blob (in hash order).
func summarize(ctx context.Context, out Removed, rows int, outcomes []blobOutcome) (Removed, error) {
	var (
		failed, untried    int
		first, unavailable error
	)
	for _, o := range outcomes {
		switch o.state {
		case blobDeleted:
			out.Blobs++
			out.Bytes += o.size
			continue
		case blobFailed:
			failed++
			if first == nil {
				first = o.err
			}
			if unavailable == nil && errors.Is(o.err, ErrUnavailable) {
				unavailable = o.err
			}
		case blobUntried:
			untried++
		}
		out.KeptBlobs++
	}
	switch {
	case unavailable != nil:
		return out, fmt.Errorf("removing media: %d row(s) deleted, their blobs left to the garbage collector: %w", rows, unavailable)
	case untried > 0:
		return out, fmt.Errorf("removing media: %d row(s) deleted, stopped before %d of their blobs (left to the garbage collector): %w",
			rows, untried, context.Cause(ctx))
	case first != nil:
		return out, fmt.Errorf("removing media: %d row(s) deleted, %d blob(s) failed (left to the garbage collector), first: %w", rows, failed, first)
	}
	return out, nil
}
