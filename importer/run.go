package importer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Defaults of Options.
const (
	// DefaultWorkers is how many items are read and stored at once.
	DefaultWorkers = 4
	// DefaultLookupBatch is how many items one Sink.Lookup asks about.
	DefaultLookupBatch = 256
	// progressInterval is the shortest time between two Progress calls.
	progressInterval = 250 * time.Millisecond
)

// Options tunes Run.
type Options struct {
	// Filter selects the source's items.
	Filter Filter
	// DryRun reads and verifies every item that would be imported but
	// writes nothing: no Sink.Put, no Sink.Quarantine.
	DryRun bool
	// Workers is how many items are read and stored at once; default
	// DefaultWorkers (4).
	Workers int
	// LookupBatch is how many items one Sink.Lookup asks about; default
	// DefaultLookupBatch (256).
	LookupBatch int
	// Progress, when set, is called with a snapshot at most every 250 ms
	// while the run goes on, and once at its end (Progress.Final). Calls
	// never overlap.
	Progress func(Progress)
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// withDefaults fills the zero fields of o.
func (o Options) withDefaults() Options {
	if o.Workers <= 0 {
		o.Workers = DefaultWorkers
	}
	if o.LookupBatch <= 0 {
		o.LookupBatch = DefaultLookupBatch
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// Run imports the items src lists for opts.Filter into sink:
//
//  1. Walk the source; an item ValidateItem refuses (or without Open) is
//     counted Invalid and goes no further.
//  2. Ask the sink, per batch of opts.LookupBatch items, which are present.
//     A present item is AlreadyPresent without reading its bytes when the
//     source's recorded SHA-256 equals the stored one (or, when the source
//     records no hash, its recorded size equals the stored size), and a
//     Conflict when they differ or the ID is pending or deleted there.
//  3. The other items go to opts.Workers workers, each of which opens an
//     item and streams it into Sink.Put, which checks the recorded hash and
//     size as it stores the bytes (its contract); the recorded size is also
//     checked on the way, so that an overlong body stops at once. A dry run
//     only reads the bytes and checks their hash and size. An item whose
//     bytes are missing but whose source quarantined it (with a recorded
//     hash) has its quarantine recorded with Sink.Quarantine.
//
// A problem with one item is counted in the Report and never stops the
// run; an error of the source's Walk or of the sink's Lookup does, and is
// returned with the partial report. Cancelling ctx stops the run promptly
// and returns the partial report with ctx.Err(); an item interrupted in the
// middle is not counted (running the import again completes it).
func Run(ctx context.Context, src Source, sink Sink, opts Options) (Report, error) {
	opts = opts.withDefaults()
	r := &run{src: src, sink: sink, opts: opts, start: opts.Now()}
	r.rep.Source, r.rep.DryRun = src.Name(), opts.DryRun
	totals, err := src.Totals(ctx, opts.Filter)
	if err != nil {
		if ctx.Err() != nil {
			return r.report(), ctx.Err()
		}
		return r.report(), fmt.Errorf("counting the items of %s: %w", r.rep.Source, err)
	}
	r.rep.Totals = totals
	stop := r.reportProgress()
	err = r.pipeline(ctx)
	stop()
	return r.report(), err
}

// run is the state of one Run.
type run struct {
	src   Source
	sink  Sink
	opts  Options
	start time.Time

	// bytes counts Progress.Bytes; updated by workers as they read.
	bytes atomic.Int64
	// streamOnly is set once a FileSink could not read a source file
	// itself: later items are sent through Put without asking again.
	streamOnly atomic.Bool

	mu  sync.Mutex
	rep Report
}

// task is an item whose bytes must be read, and what the target holds
// under its ref (nil: nothing).
type task struct {
	item    Item
	present *Present
}

// pipeline walks the source, looks items up per batch and feeds the
// workers; it returns when every worker is done.
func (r *run) pipeline(parent context.Context) error {
	ctx, cancel := context.WithCancel(parent)
	defer cancel()
	work := make(chan task, r.opts.Workers)
	var wg sync.WaitGroup
	for range r.opts.Workers {
		wg.Go(func() {
			for t := range work {
				r.store(ctx, t)
			}
		})
	}

	batch := make([]Item, 0, r.opts.LookupBatch)
	flush := func() error {
		tasks, err := r.lookup(ctx, batch)
		batch = batch[:0]
		if err != nil {
			return err
		}
		for _, t := range tasks {
			select {
			case work <- t:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	err := r.src.Walk(ctx, r.opts.Filter, func(it Item) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := validate(it); err != nil {
			r.fail(it, ProblemInvalid, err, max(it.Size, 0))
			return nil
		}
		batch = append(batch, it)
		if len(batch) == cap(batch) {
			return flush()
		}
		return nil
	})
	if err == nil && len(batch) > 0 {
		err = flush()
	}
	if err != nil {
		// Stop the workers too: the run is over.
		cancel()
	}
	close(work)
	wg.Wait()
	if err := parent.Err(); err != nil {
		return err
	}
	if err != nil {
		return fmt.Errorf("importing from %s: %w", r.rep.Source, err)
	}
	return nil
}

// validate is ValidateItem, and the item's bytes can be opened.
func validate(it Item) error {
	if it.Open == nil {
		return fmt.Errorf("the source gives no way to read its bytes: %w", ErrInvalid)
	}
	return ValidateItem(it)
}

// errNeedBytes tells lookup that only the item's bytes can tell whether
// the target holds it.
var errNeedBytes = errors.New("the source records neither hash nor size")

// lookup asks the sink about a batch of valid items. Items it holds are
// finished here (AlreadyPresent or a conflict, see compare); the others are
// returned as tasks for the workers.
func (r *run) lookup(ctx context.Context, batch []Item) ([]task, error) {
	refs := make([]storage.MediaRef, len(batch))
	for i, it := range batch {
		refs[i] = it.Ref()
	}
	present, err := r.sink.Lookup(ctx, refs)
	if err != nil {
		return nil, fmt.Errorf("looking up %d items at the target: %w", len(refs), err)
	}
	tasks := make([]task, 0, len(batch))
	for _, it := range batch {
		p, ok := present[it.Ref()]
		if !ok {
			tasks = append(tasks, task{item: it})
			continue
		}
		switch err := compare(it, p); {
		case err == nil:
			r.finish(AlreadyPresent, 0, p.Size)
		case errors.Is(err, errNeedBytes):
			tasks = append(tasks, task{item: it, present: &p})
		default:
			r.fail(it, ProblemConflict, err, max(it.Size, 0))
		}
	}
	return tasks, nil
}

// compare tells whether what the target holds is the item: nil when it is,
// an error wrapping ErrConflict when it is not, errNeedBytes when only the
// bytes can tell.
func compare(it Item, p Present) error {
	switch {
	case p.Deleted:
		return fmt.Errorf("the ID was deleted at the target and is never issued again: %w", ErrConflict)
	case p.SHA256 == "":
		return fmt.Errorf("the ID is reserved at the target by an upload that has not completed: %w", ErrConflict)
	case it.SHA256 != "" && it.SHA256 == p.SHA256:
		return nil
	case it.SHA256 != "":
		return fmt.Errorf("the target holds other content under the ID (sha256 %s, source %s): %w", p.SHA256, it.SHA256, ErrConflict)
	case it.Size >= 0 && it.Size == p.Size:
		return nil
	case it.Size >= 0:
		return fmt.Errorf("the target holds other content under the ID (%d bytes, source %d): %w", p.Size, it.Size, ErrConflict)
	default:
		return errNeedBytes
	}
}

// store reads one item and stores it (or, in a dry run, verifies it), and
// counts the outcome. An item interrupted by ctx is not counted.
func (r *run) store(ctx context.Context, t task) {
	if ctx.Err() != nil {
		return
	}
	it := t.item
	rc, err := it.Open(ctx)
	if err != nil {
		r.failItem(ctx, it, fmt.Errorf("opening the source's bytes: %w", err), 0)
		return
	}
	defer rc.Close()
	if done := r.storeFile(ctx, it, rc); done {
		return
	}
	body := &countingReader{r: rc, n: &r.bytes}
	var out Outcome
	var v *verifier
	if r.opts.DryRun {
		v = newVerifier(body, it.SHA256, it.Size)
		out, err = check(v, t.present)
	} else {
		// The sink hashes the bytes as it stores them and checks the
		// recorded hash before anything refers to them (Sink.Put); hashing
		// them here as well would double the work of every import.
		v = newSizeVerifier(body, it.Size)
		out, err = r.sink.Put(ctx, it, v)
		if v.err != nil && errors.Is(v.err, ErrHashMismatch) {
			// The sink may report the reader's error in its own way (a
			// remote sink sees a broken upload).
			err = v.err
		}
	}
	if err != nil {
		r.failItem(ctx, it, err, v.n)
		return
	}
	r.finish(out, v.n, max(it.Size-v.n, 0))
}

// storeFile has a FileSink read the item's file itself, when the sink is
// one, rc is a file and no earlier item was refused; done is false when
// the item is still to be sent through Put (rc is then at its start).
func (r *run) storeFile(ctx context.Context, it Item, rc io.ReadCloser) (done bool) {
	fs, ok := r.sink.(FileSink)
	f, isFile := rc.(*os.File)
	if !ok || !isFile || r.opts.DryRun || r.streamOnly.Load() {
		return false
	}
	out, err := fs.PutFile(ctx, it, f)
	if errors.Is(err, ErrFileUnreachable) {
		r.streamOnly.Store(true)
		r.mu.Lock()
		if r.rep.StreamedBecause == "" {
			r.rep.StreamedBecause = err.Error()
		}
		r.mu.Unlock()
		if _, serr := f.Seek(0, io.SeekStart); serr != nil {
			r.failItem(ctx, it, fmt.Errorf("rewinding the source's file: %w", serr), 0)
			return true
		}
		return false
	}
	if err != nil {
		r.failItem(ctx, it, err, 0)
		return true
	}
	size := it.Size
	if fi, serr := f.Stat(); serr == nil {
		size = fi.Size()
	}
	r.mu.Lock()
	r.rep.ReadByTarget++
	r.mu.Unlock()
	r.bytes.Add(size)
	r.finish(out, size, max(it.Size-size, 0))
	return true
}

// check is the dry run of Sink.Put: it reads the item to its end through
// its verifier and compares its hash with what the target holds, if
// anything.
func check(v *verifier, present *Present) (Outcome, error) {
	if _, err := io.Copy(io.Discard, v); err != nil {
		return 0, fmt.Errorf("reading the source's bytes: %w", err)
	}
	switch {
	case present == nil:
		return Imported, nil
	case present.SHA256 == v.sum():
		return AlreadyPresent, nil
	default:
		return 0, fmt.Errorf("the target holds other content under the ID (sha256 %s, source %s): %w", present.SHA256, v.sum(), ErrConflict)
	}
}

// failItem counts an item that could not be stored (read bytes of it were
// read), unless ctx was cancelled meanwhile (then the item is
// left for the next run). A missing item that the source quarantined has
// its quarantine recorded, so the bytes stay refused if they ever come
// back.
func (r *run) failItem(ctx context.Context, it Item, err error, read int64) {
	if ctx.Err() != nil {
		return
	}
	kind := problemKind(err)
	if kind == ProblemMissing && it.QuarantinedBy != "" && it.SHA256 != "" && !r.opts.DryRun {
		if qerr := r.sink.Quarantine(ctx, it.SHA256, it.QuarantinedBy); qerr != nil {
			if ctx.Err() != nil {
				return
			}
			kind, err = ProblemFailed, fmt.Errorf("%w; recording its quarantine failed: %w", err, qerr)
		} else {
			err = fmt.Errorf("%w (its quarantine was recorded)", err)
		}
	}
	r.fail(it, kind, err, max(it.Size-read, 0))
}

// finish counts an item stored (or found present) with size bytes;
// unreadBytes are its bytes that were not read (for progress).
func (r *run) finish(out Outcome, size, unreadBytes int64) {
	r.bytes.Add(unreadBytes)
	r.mu.Lock()
	defer r.mu.Unlock()
	switch out {
	case Imported:
		r.rep.Imported++
		r.rep.ImportedBytes += size
	case AlreadyPresent:
		r.rep.AlreadyPresent++
	}
}

// fail counts an item that was not imported and lists the problem.
// unreadBytes are its bytes that were not read (for progress).
func (r *run) fail(it Item, kind ProblemKind, err error, unreadBytes int64) {
	r.bytes.Add(unreadBytes)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.rep.count(kind)
	if len(r.rep.Problems) >= MaxProblems {
		r.rep.MoreProblems++
		return
	}
	r.rep.Problems = append(r.rep.Problems, Problem{Ref: it.Ref(), Kind: kind, Error: err.Error()})
}

// report returns a copy of the report so far.
func (r *run) report() Report {
	r.mu.Lock()
	defer r.mu.Unlock()
	rep := r.rep
	rep.Problems = append([]Problem(nil), r.rep.Problems...)
	rep.Elapsed = r.opts.Now().Sub(r.start)
	return rep
}

// progress returns a snapshot for Options.Progress.
func (r *run) progress(final bool) Progress {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Progress{
		Source:  r.rep.Source,
		Totals:  r.rep.Totals,
		Counts:  r.rep.Counts,
		Bytes:   r.bytes.Load(),
		Elapsed: r.opts.Now().Sub(r.start),
		Final:   final,
	}
}

// reportProgress calls Options.Progress every progressInterval until the
// returned stop is called; stop makes the final call.
func (r *run) reportProgress() (stop func()) {
	if r.opts.Progress == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(progressInterval)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				r.opts.Progress(r.progress(false))
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
		r.opts.Progress(r.progress(true))
	}
}

// countingReader adds the bytes read through it to n.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

// Read implements io.Reader.
func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}
