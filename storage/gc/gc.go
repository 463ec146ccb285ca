// Package gc removes blobs that nothing references: bytes in a datastore
// that no blob record names (a crash between the blob write and RecordBlob),
// and blob records that no media row and no thumbnail references (failed
// uploads, thumbnails of deleted media, content of deleted media) together
// with their bytes. It knows neither Matrix nor Caddy: it works on a
// storage.MetadataStore that implements storage.BlobCollector and on the
// configured storage.Datastores, whose stores implement storage.Lister.
//
// # Protocol
//
// The storage contract writes bytes before any record points at them, and a
// record before any media row or thumbnail points at it (the foreign keys of
// storage/sqlstore enforce the second step). Collecting runs the same chain
// backwards, and must never remove a blob that an upload in progress is about
// to reference. It is safe because of four rules:
//
//  1. Grace. A record is a candidate only if its last claim is older than
//     the grace period, and bytes without a record only if the store wrote
//     them longer ago than that. Every upload claims the blob it returns
//     (storage.IngestTo: RecordBlob moves the claim of an existing record
//     forward), and a deduplicating upload claims its candidate (TouchBlob)
//     before reading it. So between the claim and the media row insert, which
//     follows at once, the blob is not a candidate. The grace period must
//     exceed that gap (milliseconds) plus the clock skew between instances;
//     a grace of 0 is only safe with no uploads running.
//  2. One transaction per blob. A record is deleted by one conditional
//     DELETE (unreferenced and claimed before the cutoff), and its bytes are
//     deleted before that transaction commits; a failed byte deletion rolls
//     the record back. Bytes without a record are deleted inside a
//     transaction that holds the lock RecordBlob of that hash needs. Writers
//     naming the blob (a claim, a record, a media row) therefore wait for the
//     whole deletion and then see it gone: a claim reports the record
//     missing, a media insert fails on the foreign key. A media row committed
//     before the DELETE makes it delete nothing (or fail on the foreign key,
//     which counts as "referenced").
//  3. Fall back, do not fail. A deduplicating upload whose candidate was
//     collected between its lookup and its claim writes the body in full
//     instead. An upload that relied on bytes it did not write checks them
//     after its claim (which, by rule 2, is ordered after any deletion): if
//     they are gone and it wrote a copy of its own, the record is pointed at
//     that copy; otherwise the upload fails with storage.ErrUnavailable (a
//     retryable 503), never with a media row pointing at missing bytes. That
//     last case needs the collector to delete bytes without a record in the
//     instant an upload of the same bytes found them, which only happens to
//     crash leftovers.
//  4. One collector at a time. A run takes the store's collector lock (a
//     PostgreSQL advisory lock when several instances share the database)
//     and is skipped when another holds it. The lock saves duplicate work;
//     rules 1–3 keep data safe even without it.
//
// Bytes held in one datastore while their record names another (a crash
// during a datastore migration, or during IngestTo's removal of a duplicate
// copy) are left alone: a migration in progress looks exactly like that.
package gc

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// DefaultGrace is the grace period used when Options.Grace is negative.
const DefaultGrace = time.Hour

// pageSize is how many unreferenced records one query lists.
const pageSize = 500

// deleteTimeout bounds the deletion of one blob's bytes, during which the
// metadata store holds a lock that writers of that blob (on SQLite: all
// writers) wait for.
const deleteTimeout = 30 * time.Second

// Options tune one collection run.
type Options struct {
	// Grace is how old a blob's last claim (records) or its write (bytes
	// without a record) must be before it is collected. 0 collects at once
	// (only safe when no upload runs); negative means DefaultGrace.
	Grace time.Duration
	// DryRun counts what would be removed without removing anything.
	DryRun bool
}

// Report describes one run.
type Report struct {
	// DryRun is true when nothing was removed on purpose.
	DryRun bool `json:"dry_run"`
	// Skipped is true when another collector held the lock: nothing was
	// examined.
	Skipped bool `json:"skipped"`
	// Records and RecordBytes count the unreferenced blob records removed
	// with their bytes (or that would be, in a dry run).
	Records     int64 `json:"records"`
	RecordBytes int64 `json:"record_bytes"`
	// Unrecorded and UnrecordedBytes count the blobs removed from a
	// datastore because no record named them.
	Unrecorded      int64 `json:"unrecorded"`
	UnrecordedBytes int64 `json:"unrecorded_bytes"`
	// Errors counts blobs that could not be examined or removed; the run
	// goes on with the next one.
	Errors int64 `json:"errors"`
	// Duration is how long the run took.
	Duration time.Duration `json:"duration_ns"`
}

// Blobs returns how many blobs the run removed (or would remove).
func (r Report) Blobs() int64 { return r.Records + r.Unrecorded }

// Bytes returns how many bytes the run freed (or would free).
func (r Report) Bytes() int64 { return r.RecordBytes + r.UnrecordedBytes }

// Collector collects unreferenced blobs of one metadata store and its
// datastores. It is safe for concurrent use; concurrent runs on one database
// are serialized by the collector lock (the later ones are skipped).
type Collector struct {
	meta   storage.MetadataStore
	coll   storage.BlobCollector
	stores *storage.Datastores
	now    func() time.Time
}

// New returns a collector. meta must implement storage.BlobCollector. now is
// the clock (nil: time.Now); cutoffs are now minus the grace period.
func New(meta storage.MetadataStore, stores *storage.Datastores, now func() time.Time) (*Collector, error) {
	coll, ok := meta.(storage.BlobCollector)
	if !ok {
		return nil, fmt.Errorf("garbage collection: metadata store %T cannot collect blobs", meta)
	}
	if now == nil {
		now = time.Now
	}
	return &Collector{meta: meta, coll: coll, stores: stores, now: now}, nil
}

// Run collects once: unreferenced records first, then bytes without a
// record in every datastore that can list its blobs. Errors about single
// blobs are counted and the run goes on; the returned error is the first of
// them (or the one that stopped the run, such as a lock failure or ctx
// ending).
func (c *Collector) Run(ctx context.Context, opts Options) (rep Report, err error) {
	start := c.now()
	rep.DryRun = opts.DryRun
	defer func() { rep.Duration = c.now().Sub(start) }()
	grace := opts.Grace
	if grace < 0 {
		grace = DefaultGrace
	}
	release, ok, err := c.coll.LockCollector(ctx)
	if err != nil {
		return rep, fmt.Errorf("garbage collection: %w", err)
	}
	if !ok {
		rep.Skipped = true
		return rep, nil
	}
	defer release()

	cutoff := start.Add(-grace)
	var first error
	fail := func(err error) {
		rep.Errors++
		if first == nil {
			first = err
		}
	}
	if err := c.collectRecords(ctx, cutoff, opts.DryRun, &rep, fail); err != nil {
		return rep, fmt.Errorf("garbage collection: %w", err)
	}
	for _, name := range c.stores.Names() {
		if err := c.collectUnrecorded(ctx, name, cutoff, opts.DryRun, &rep, fail); err != nil {
			if ctx.Err() != nil {
				return rep, fmt.Errorf("garbage collection: %w", err)
			}
			// A datastore that cannot be listed (unreachable) does not stop
			// the others.
			fail(fmt.Errorf("datastore %s: %w", name, err))
		}
	}
	if first != nil {
		return rep, fmt.Errorf("garbage collection: %d blob(s) failed, first: %w", rep.Errors, first)
	}
	return rep, nil
}

// collectRecords removes unreferenced records claimed before cutoff, with
// their bytes. It returns an error only when the run must stop.
func (c *Collector) collectRecords(ctx context.Context, cutoff time.Time, dryRun bool, rep *Report, fail func(error)) error {
	after := ""
	for {
		page, err := c.coll.ListUnreferencedBlobs(ctx, cutoff, after, pageSize)
		if err != nil {
			return err
		}
		for _, b := range page {
			if err := ctx.Err(); err != nil {
				return err
			}
			if dryRun {
				rep.Records++
				rep.RecordBytes += b.Size
				continue
			}
			var size int64
			deleted, err := c.coll.DeleteUnreferencedBlob(ctx, b.SHA256, cutoff, func(ctx context.Context, rec storage.BlobRecord) error {
				store, ok := c.stores.Get(rec.Datastore)
				if !ok {
					return fmt.Errorf("blob %s is recorded in unknown datastore %q", rec.SHA256, rec.Datastore)
				}
				size = rec.Size
				ctx, cancel := context.WithTimeout(ctx, deleteTimeout)
				defer cancel()
				if err := store.Delete(ctx, rec.SHA256); err != nil {
					return fmt.Errorf("deleting bytes from datastore %s: %w", rec.Datastore, err)
				}
				return nil
			})
			switch {
			case errors.Is(err, storage.ErrUnavailable):
				// The database or the datastore is down: stop, rather than
				// holding locks while failing on every blob.
				return err
			case err != nil:
				fail(err)
			case deleted:
				rep.Records++
				rep.RecordBytes += size
			}
		}
		if len(page) < pageSize {
			return nil
		}
		after = page[len(page)-1].SHA256
	}
}

// collectUnrecorded removes the blobs of datastore name that were written
// before cutoff and that no record names. A store that cannot list its blobs
// is skipped.
func (c *Collector) collectUnrecorded(ctx context.Context, name string, cutoff time.Time, dryRun bool, rep *Report, fail func(error)) error {
	store, _ := c.stores.Get(name)
	lister, ok := store.(storage.Lister)
	if !ok {
		return nil
	}
	return lister.List(ctx, func(sb storage.StoredBlob) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !sb.ModTime.Before(cutoff) {
			return nil
		}
		_, err := c.meta.GetBlob(ctx, sb.SHA256)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, storage.ErrUnavailable):
			// The database is down: stop instead of listing the whole
			// datastore and failing on every blob.
			return fmt.Errorf("looking up the record of blob %s: %w", sb.SHA256, err)
		case !errors.Is(err, storage.ErrNotFound):
			fail(fmt.Errorf("looking up the record of blob %s: %w", sb.SHA256, err))
			return nil
		}
		if dryRun {
			rep.Unrecorded++
			rep.UnrecordedBytes += sb.Size
			return nil
		}
		done, err := c.coll.DeleteUnrecordedBlob(ctx, sb.SHA256, func(ctx context.Context) error {
			ctx, cancel := context.WithTimeout(ctx, deleteTimeout)
			defer cancel()
			if err := store.Delete(ctx, sb.SHA256); err != nil {
				return fmt.Errorf("deleting unrecorded bytes from datastore %s: %w", name, err)
			}
			return nil
		})
		switch {
		case errors.Is(err, storage.ErrUnavailable):
			return err
		case err != nil:
			fail(err)
		case done:
			rep.Unrecorded++
			rep.UnrecordedBytes += sb.Size
		}
		return nil
	})
}
