// Package migrate moves blobs from one datastore to another, verified and
// resumable.
//
// Each blob recorded in the source datastore is copied into the target, its
// SHA-256 and size checked against its record, its record switched to the
// target in one atomic update (MetadataStore.MoveBlob), and only then deleted
// from the source, after an optional grace period. At every moment the record
// names a datastore that holds the bytes, so downloads keep working during a
// migration, and a crash or cancellation leaves at most an unreferenced copy.
// Blobs are found by paging through the source's records, so running Run
// again after an interruption continues with the blobs still left.
//
// Pages are processed one after the other: once every blob of a page has
// been moved or has failed, Run reports a checkpoint (Options.OnCheckpoint),
// the SHA-256 after which a resumed run may start (Options.After). Resuming
// there skips only blobs that failed before; redoing the page after it is
// harmless, since a blob already moved is no longer listed in the source and
// a blob copied but not switched is copied again onto the same content.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Progress is the state of a migration.
type Progress struct {
	// From and To name the source and target datastores.
	From, To string
	// TotalBlobs and TotalBytes are what the source held when the migration
	// started.
	TotalBlobs int64
	// DoneBlobs counts the blobs moved to the target.
	DoneBlobs int64
	// FailedBlobs counts the blobs left in the source because of an error
	// (missing or corrupt source bytes, failed writes).
	FailedBlobs int64
	// TotalBytes is the size of the blobs the source held at the start.
	TotalBytes int64
	// DoneBytes is the size of the blobs moved.
	DoneBytes int64
	// Started is when the migration started; Finished when it ended (zero
	// while running).
	Started, Finished time.Time
	// Running is true until Run returns.
	Running bool
	// LastError describes the most recent failure, empty when none.
	LastError string
}

// Options tunes Run. The zero value is usable.
type Options struct {
	// Concurrency is how many blobs are copied at once; default 2.
	Concurrency int
	// BatchSize is how many blob records are listed per query; default 500.
	BatchSize int
	// OnProgress, when not nil, is called after each blob (moved or failed)
	// with the current progress. Calls are serialized and must return
	// quickly.
	OnProgress func(Progress)
	// Logger receives failures and a summary; default: no logging.
	Logger *zap.Logger
	// DeleteGrace is how long after switching a blob's record the source copy
	// is kept, so that downloads already reading it can finish; default 0.
	// Deletions wait in a queue and do not slow the copying. Copies whose
	// grace has not passed when the migration is cancelled are left in the
	// source (unreferenced) and logged.
	DeleteGrace time.Duration
	// After, when set, starts the listing after this SHA-256: a checkpoint
	// of an earlier run (OnCheckpoint), so that a resumed migration does
	// not retry the blobs that failed before it. Default "": every blob.
	After string
	// OnCheckpoint, when not nil, is called after every page of records
	// whose blobs have all been moved or have failed, with the SHA-256 to
	// resume after and the progress. An error stops Run, which returns it
	// wrapped (a persisted job uses it to stop once it has lost its lease).
	// Calls are not concurrent with each other.
	OnCheckpoint func(after string, p Progress) error
}

// Run moves every blob recorded in datastore from to datastore to and
// returns the final progress. Failures of single blobs are counted in
// Progress (FailedBlobs, LastError) and logged, and the blob stays in the
// source; Run then continues. Run fails when from equals to, a name is not in
// stores, or the records cannot be listed. Cancelling ctx stops it promptly:
// it returns the progress so far and an error wrapping ctx's error, and a
// later Run continues with the blobs left.
func Run(ctx context.Context, meta storage.MetadataStore, stores *storage.Datastores, from, to string, opts Options) (Progress, error) {
	if from == to {
		return Progress{}, fmt.Errorf("migrating blobs: source and target are both %q", from)
	}
	src, ok := stores.Get(from)
	if !ok {
		return Progress{}, fmt.Errorf("migrating blobs: unknown source datastore %q", from)
	}
	dst, ok := stores.Get(to)
	if !ok {
		return Progress{}, fmt.Errorf("migrating blobs: unknown target datastore %q", to)
	}
	if opts.Concurrency <= 0 {
		opts.Concurrency = 2
	}
	if opts.BatchSize <= 0 {
		opts.BatchSize = 500
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	count, size, err := meta.CountBlobs(ctx, from)
	if err != nil {
		return Progress{}, fmt.Errorf("migrating blobs from %s to %s: %w", from, to, err)
	}

	m := &migration{
		meta: meta, from: from, to: to, src: src, dst: dst, opts: opts,
		log: opts.Logger.With(zap.String("from", from), zap.String("to", to)),
		progress: Progress{
			From: from, To: to, TotalBlobs: count, TotalBytes: size,
			Started: time.Now(), Running: true,
		},
		deletes: newDeleteQueue(),
	}
	m.log.Info("migrating blobs", zap.Int64("blobs", count), zap.Int64("bytes", size))

	deleterDone := make(chan struct{})
	go func() {
		defer close(deleterDone)
		m.runDeleter(ctx)
	}()
	jobs := make(chan pageItem)
	var wg sync.WaitGroup
	for range opts.Concurrency {
		wg.Go(func() {
			for it := range jobs {
				m.migrateBlob(ctx, it.rec)
				it.page.Done()
			}
		})
	}
	listErr := m.list(ctx, jobs)
	wg.Wait()
	m.deletes.close()
	<-deleterDone

	m.mu.Lock()
	m.progress.Running = false
	m.progress.Finished = time.Now()
	p := m.progress
	m.mu.Unlock()
	fields := []zap.Field{zap.Int64("moved", p.DoneBlobs), zap.Int64("moved_bytes", p.DoneBytes),
		zap.Int64("failed", p.FailedBlobs), zap.Duration("took", p.Finished.Sub(p.Started))}
	switch {
	case listErr != nil:
		m.log.Error("blob migration stopped", append(fields, zap.Error(listErr))...)
		return p, fmt.Errorf("migrating blobs from %s to %s: %w", from, to, listErr)
	case ctx.Err() != nil:
		m.log.Info("blob migration cancelled", fields...)
		return p, fmt.Errorf("migrating blobs from %s to %s: %w", from, to, ctx.Err())
	}
	m.log.Info("blob migration finished", fields...)
	return p, nil
}

// migration is the state of one Run.
type migration struct {
	meta     storage.MetadataStore
	from, to string
	src, dst storage.BlobStore
	opts     Options
	log      *zap.Logger
	deletes  *deleteQueue

	// mu guards progress and serializes OnProgress calls.
	mu       sync.Mutex
	progress Progress
}

// pageItem is a blob record to migrate, with the page it belongs to (Done
// once the blob is moved or has failed).
type pageItem struct {
	rec  storage.BlobRecord
	page *sync.WaitGroup
}

// list sends every blob record of the source after opts.After to jobs, a
// page at a time, waits for each page to be done and reports its checkpoint,
// and closes jobs. It stops early, without error, when ctx is done; it stops
// with the checkpoint's error when OnCheckpoint fails.
func (m *migration) list(ctx context.Context, jobs chan<- pageItem) error {
	defer close(jobs)
	after := m.opts.After
	for {
		page, err := m.meta.ListBlobs(ctx, m.from, after, m.opts.BatchSize)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("listing blobs: %w", err)
		}
		var pending sync.WaitGroup
		for _, rec := range page {
			pending.Add(1)
			select {
			case jobs <- pageItem{rec: rec, page: &pending}:
			case <-ctx.Done():
				pending.Done()
				pending.Wait()
				return nil
			}
		}
		pending.Wait()
		if ctx.Err() != nil {
			return nil
		}
		if len(page) > 0 {
			after = page[len(page)-1].SHA256
			if err := m.checkpoint(after); err != nil {
				return err
			}
		}
		if len(page) < m.opts.BatchSize {
			return nil
		}
	}
}

// checkpoint reports that every blob up to after is done.
func (m *migration) checkpoint(after string) error {
	if m.opts.OnCheckpoint == nil {
		return nil
	}
	m.mu.Lock()
	p := m.progress
	m.mu.Unlock()
	if err := m.opts.OnCheckpoint(after, p); err != nil {
		return fmt.Errorf("saving the checkpoint: %w", err)
	}
	return nil
}

// migrateBlob copies one blob, verifies the copy, switches the record and
// queues the source copy for deletion. A blob interrupted by cancellation is
// neither counted nor changed.
func (m *migration) migrateBlob(ctx context.Context, rec storage.BlobRecord) {
	if ctx.Err() != nil {
		return
	}
	blob, err := m.src.Open(ctx, rec.SHA256)
	if err != nil {
		if ctx.Err() == nil {
			m.fail(rec, fmt.Errorf("opening source copy: %w", err))
		}
		return
	}
	res, err := m.dst.Put(ctx, blob.Content, storage.PutOptions{ExpectedSize: rec.Size})
	blob.Content.Close()
	if err != nil {
		if ctx.Err() == nil {
			m.fail(rec, fmt.Errorf("copying to target: %w", err))
		}
		return
	}
	if res.SHA256 != rec.SHA256 || res.Size != rec.Size {
		if !res.Existed {
			if err := m.dst.Delete(context.WithoutCancel(ctx), res.SHA256); err != nil {
				m.log.Warn("deleting bad copy", zap.String("sha256", res.SHA256), zap.Error(err))
			}
		}
		m.fail(rec, fmt.Errorf("verifying copy: source bytes have sha256 %s and size %d, record says %s and %d",
			res.SHA256, res.Size, rec.SHA256, rec.Size))
		return
	}
	// The copy is verified: switch the record even if ctx was just
	// cancelled, so that the work is not left half done.
	if err := m.meta.MoveBlob(context.WithoutCancel(ctx), rec.SHA256, m.from, m.to); err != nil {
		// The record changed meanwhile (moved or removed by someone else):
		// leave both copies alone.
		m.fail(rec, fmt.Errorf("switching record: %w", err))
		return
	}
	m.update(func(p *Progress) {
		p.DoneBlobs++
		p.DoneBytes += rec.Size
	})
	m.deletes.push(pendingDelete{rec: rec, at: time.Now().Add(m.opts.DeleteGrace)})
}

// fail counts rec as failed.
func (m *migration) fail(rec storage.BlobRecord, err error) {
	m.log.Warn("blob not migrated", zap.String("sha256", rec.SHA256), zap.Int64("size", rec.Size), zap.Error(err))
	msg := fmt.Sprintf("blob %s: %v", rec.SHA256, err)
	m.update(func(p *Progress) {
		p.FailedBlobs++
		p.LastError = msg
	})
}

// update changes the progress and reports it.
func (m *migration) update(f func(p *Progress)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	f(&m.progress)
	if m.opts.OnProgress != nil {
		m.opts.OnProgress(m.progress)
	}
}

// runDeleter deletes the queued source copies once their grace has passed,
// until the queue is closed and empty. After ctx is done, copies still in
// their grace are left behind and logged.
func (m *migration) runDeleter(ctx context.Context) {
	for {
		d, ok := m.deletes.next()
		if !ok {
			return
		}
		if wait := time.Until(d.at); wait > 0 {
			timer := time.NewTimer(wait)
			select {
			case <-timer.C:
			case <-ctx.Done():
				timer.Stop()
				m.log.Warn("migration cancelled during the delete grace: unreferenced source copy left behind",
					zap.String("sha256", d.rec.SHA256))
				continue
			}
		}
		m.deleteSource(context.WithoutCancel(ctx), d.rec)
	}
}

// deleteSource deletes the source copy of a moved blob after checking that
// the target still holds it. Should the target copy have vanished (a
// concurrent ingest may delete a copy it wrote itself after seeing the old
// record), the record is switched back to the source, which still holds the
// bytes, and the blob counts as failed.
func (m *migration) deleteSource(ctx context.Context, rec storage.BlobRecord) {
	if _, err := m.dst.Stat(ctx, rec.SHA256); err != nil {
		if !errors.Is(err, storage.ErrNotFound) {
			m.log.Warn("checking target copy; source copy kept", zap.String("sha256", rec.SHA256), zap.Error(err))
			return
		}
		err = errors.New("target copy vanished after the record was switched")
		if merr := m.meta.MoveBlob(ctx, rec.SHA256, m.to, m.from); merr != nil {
			err = fmt.Errorf("%w; switching the record back: %w", err, merr)
		}
		m.log.Error("blob migration undone", zap.String("sha256", rec.SHA256), zap.Error(err))
		msg := fmt.Sprintf("blob %s: %v", rec.SHA256, err)
		m.update(func(p *Progress) {
			p.DoneBlobs--
			p.DoneBytes -= rec.Size
			p.FailedBlobs++
			p.LastError = msg
		})
		return
	}
	if err := m.src.Delete(ctx, rec.SHA256); err != nil {
		m.log.Warn("deleting source copy; unreferenced copy left behind", zap.String("sha256", rec.SHA256), zap.Error(err))
	}
}

// pendingDelete is a source copy to delete at a given time.
type pendingDelete struct {
	rec storage.BlobRecord
	at  time.Time
}

// deleteQueue is an unbounded FIFO of pending deletions, so that the grace
// period never holds up the copying.
type deleteQueue struct {
	mu     sync.Mutex
	items  []pendingDelete
	closed bool
	// wake is signalled (capacity 1) after a push or close.
	wake chan struct{}
}

func newDeleteQueue() *deleteQueue {
	return &deleteQueue{wake: make(chan struct{}, 1)}
}

// push appends d.
func (q *deleteQueue) push(d pendingDelete) {
	q.mu.Lock()
	q.items = append(q.items, d)
	q.mu.Unlock()
	q.signal()
}

// close marks the end of the pushes.
func (q *deleteQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.signal()
}

func (q *deleteQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// next returns the oldest item, waiting for one; ok is false once the queue
// is closed and empty.
func (q *deleteQueue) next() (d pendingDelete, ok bool) {
	for {
		q.mu.Lock()
		if len(q.items) > 0 {
			d = q.items[0]
			q.items[0] = pendingDelete{}
			q.items = q.items[1:]
			q.mu.Unlock()
			return d, true
		}
		closed := q.closed
		q.mu.Unlock()
		if closed {
			return pendingDelete{}, false
		}
		<-q.wake
	}
}
