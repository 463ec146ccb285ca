package importtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Pipeline is an end-to-end import test: a real source, what the import
// must make of each of its items, and the exact report it must give.
type Pipeline struct {
	// Open opens the source; every run opens it afresh and closes it.
	Open func(t testing.TB) importer.Source
	// Filter selects the source's items.
	Filter importer.Filter
	// Expects lists every item the source lists for Filter.
	Expects []Expect
	// Counts is the exact report of an import into an empty target. The
	// Expects must agree with it.
	Counts importer.Counts
	// Seeds are the seeds of the interrupted imports Check runs; none: no
	// interruption.
	Seeds []uint64
}

// Check runs the pipeline against a fresh target of backend:
//
//  1. An import into the empty target gives exactly Counts, lists every
//     item that is not imported as a problem of its kind, and leaves the
//     target as CheckImported wants.
//  2. A second import finds every imported item AlreadyPresent without
//     reading its bytes, reports the same problems, gives nothing but the
//     mismatched items to the sink, and changes nothing: rows, blob
//     records, quarantines, files (not even their times) and objects.
//  3. For each of Seeds, a fresh target is interrupted at random points
//     (see interrupt), then imported into to completion: it ends as
//     CheckImported wants, identical to the uninterrupted target.
func (p Pipeline) Check(t *testing.T, backend Backend) {
	t.Helper()
	p.checkExpects(t)
	hashes := hashesOf(p.Expects)
	tg := backend.Open(t)
	rep, _, _ := p.run(t, tg.Sink, nil, importer.Options{})
	p.checkReport(t, "first import", rep, p.Counts)
	CheckImported(t, tg, p.Expects)

	want := tg.Snapshot(t, hashes...)
	p.checkSecondRun(t, tg, want)

	for _, seed := range p.Seeds {
		t.Run(fmt.Sprint("interrupted/seed", seed), func(t *testing.T) {
			tg := backend.Open(t)
			p.interrupt(t, tg, rand.New(rand.NewPCG(seed, 0x1a2b)))
			rep, _, _ := p.run(t, tg.Sink, nil, importer.Options{})
			final := p.Counts
			final.AlreadyPresent = rep.AlreadyPresent
			final.Imported -= rep.AlreadyPresent
			p.checkReport(t, "import after interruptions", rep, final)
			CheckImported(t, tg, p.Expects)
			mixed := p.mixedContent()
			if diff := withoutPlacement(want, mixed).Diff(withoutPlacement(tg.Snapshot(t, hashes...), mixed)); diff != "" {
				t.Errorf("the interrupted import ends other than an uninterrupted one:\n%s", diff)
			}
		})
	}
}

// mixedContent returns the content shared by local and remote imported
// items: which datastore stores it depends on which item comes first.
func (p Pipeline) mixedContent() map[string]bool {
	kinds := map[string]map[bool]bool{}
	for _, e := range p.Expects {
		if e.imported() {
			sha := SHA256(e.Body)
			if kinds[sha] == nil {
				kinds[sha] = map[bool]bool{}
			}
			kinds[sha][e.Item.Remote] = true
		}
	}
	out := map[string]bool{}
	for sha, k := range kinds {
		if len(k) == 2 {
			out[sha] = true
		}
	}
	return out
}

// anyStore stands for the datastore of content in either of them.
const anyStore = "(either)"

// withoutPlacement returns a copy of st in which the content of mixed is
// in no particular datastore: its rows name anyStore, its blob records
// are listed under anyStore, and its files (named by their hash) under
// the directory index anyStore.
func withoutPlacement(st State, mixed map[string]bool) State {
	out := State{Rows: map[storage.MediaRef]storage.Media{}, Blobs: map[string][]storage.BlobRecord{},
		Quarantines: st.Quarantines, Files: map[string]FileInfo{}, Objects: st.Objects}
	for ref, m := range st.Rows {
		if mixed[m.SHA256] {
			m.Datastore = anyStore
		}
		out.Rows[ref] = m
	}
	for name, recs := range st.Blobs {
		for _, r := range recs {
			if mixed[r.SHA256] {
				r.Datastore = anyStore
				out.Blobs[anyStore] = append(out.Blobs[anyStore], r)
			} else {
				out.Blobs[name] = append(out.Blobs[name], r)
			}
		}
	}
	for p, fi := range st.Files {
		if mixed[path.Base(p)] {
			_, rest, _ := strings.Cut(p, "/")
			p = anyStore + "/" + rest
		}
		out.Files[p] = fi
	}
	return out
}

// checkExpects fails the test when Expects disagree with Counts or name an
// item twice.
func (p Pipeline) checkExpects(t *testing.T) {
	t.Helper()
	var c importer.Counts
	seen := map[storage.MediaRef]bool{}
	for _, e := range p.Expects {
		if seen[e.Item.Ref()] {
			t.Fatalf("expectations list %v twice", e.Item.Ref())
		}
		seen[e.Item.Ref()] = true
		switch e.Problem {
		case "":
			c.Imported++
		case importer.ProblemMissing:
			c.Missing++
		case importer.ProblemMismatch:
			c.Mismatched++
		case importer.ProblemConflict:
			c.Conflicts++
		case importer.ProblemInvalid:
			c.Invalid++
		case importer.ProblemFailed:
			c.Failed++
		default:
			t.Fatalf("unknown problem kind %q", e.Problem)
		}
	}
	if c != p.Counts {
		t.Fatalf("the expectations count %+v, the pipeline says %+v", c, p.Counts)
	}
}

// checkReport compares a report with the counts it must give, and its
// problems with the expectations.
func (p Pipeline) checkReport(t *testing.T, what string, rep importer.Report, want importer.Counts) {
	t.Helper()
	if rep.Counts != want {
		t.Errorf("%s counts %+v, want %+v\n%s", what, rep.Counts, want, rep)
	}
	if rep.Totals.Items != int64(len(p.Expects)) {
		t.Errorf("%s: the source announced %d items, want %d", what, rep.Totals.Items, len(p.Expects))
	}
	var wantBytes int64
	wantProblems := map[storage.MediaRef]importer.ProblemKind{}
	for _, e := range p.Expects {
		if e.imported() {
			wantBytes += int64(len(e.Body))
		} else {
			wantProblems[e.Item.Ref()] = e.Problem
		}
	}
	if rep.Imported == p.Counts.Imported && rep.ImportedBytes != wantBytes {
		t.Errorf("%s: imported %d bytes, want %d", what, rep.ImportedBytes, wantBytes)
	}
	got := map[storage.MediaRef]importer.ProblemKind{}
	for _, pr := range rep.Problems {
		if _, dup := got[pr.Ref]; dup {
			t.Errorf("%s: %v reported twice", what, pr.Ref)
		}
		got[pr.Ref] = pr.Kind
		if w, ok := wantProblems[pr.Ref]; !ok || w != pr.Kind {
			t.Errorf("%s: problem %s %v (%s), want %q", what, pr.Kind, pr.Ref, pr.Error, w)
		}
	}
	for ref, kind := range wantProblems {
		if _, ok := got[ref]; !ok {
			t.Errorf("%s: %v (%s) not reported", what, ref, kind)
		}
	}
	if rep.MoreProblems != 0 {
		t.Errorf("%s: %d unlisted problems", what, rep.MoreProblems)
	}
}

// checkSecondRun imports again into tg, which holds want, and checks that
// nothing changes.
func (p Pipeline) checkSecondRun(t *testing.T, tg *Target, want State) {
	t.Helper()
	sink := &recordingSink{Sink: tg.Sink}
	rep, opens, _ := p.run(t, sink, nil, importer.Options{})
	again := p.Counts
	again.AlreadyPresent, again.Imported = p.Counts.Imported, 0
	p.checkReport(t, "second import", rep, again)
	kinds := map[storage.MediaRef]importer.ProblemKind{}
	for _, e := range p.Expects {
		kinds[e.Item.Ref()] = e.Problem
		if e.imported() && opens[e.Item.Ref()] != 0 {
			t.Errorf("second import read the bytes of %v, which it already holds", e.Item.Ref())
		}
	}
	for _, ref := range sink.puts() {
		if kinds[ref] != importer.ProblemMismatch {
			t.Errorf("second import gave %v to the sink", ref)
		}
	}
	after := tg.Snapshot(t, hashesOf(p.Expects)...)
	if diff := want.Diff(after); diff != "" {
		t.Errorf("second import changed the target:\n%s", diff)
	}
	if touched := want.Touched(after); len(touched) > 0 {
		t.Errorf("second import rewrote files %v", touched)
	}
}

// interrupt runs three broken imports into tg: one cancelled while it
// reads the n-th opened item (n at random among the items a first import
// reads, after a random number of its bytes), one stopped by a deadline
// after a random delay, and one cancelled again at a random read. Each
// uses a random number of workers and lookup batch size.
func (p Pipeline) interrupt(t *testing.T, tg *Target, rng *rand.Rand) {
	t.Helper()
	options := func() importer.Options {
		return importer.Options{Workers: 1 + rng.IntN(4), LookupBatch: 1 + rng.IntN(8)}
	}
	read := p.Counts.Imported
	at, offset := 1+rng.Int64N(max(read, 1)), rng.Int64N(4096)
	rep, _, err := p.run(t, tg.Sink, &cancelPoint{open: at, offset: offset}, options())
	if read > 0 && !errors.Is(err, context.Canceled) {
		t.Errorf("import cancelled at the %d. open: %v", at, err)
	}
	t.Logf("cancelled at byte %d of the %d. open: %+v", offset, at, rep.Counts)

	delay := time.Duration(rng.IntN(40_000)) * time.Microsecond
	rep, _, err = p.run(t, tg.Sink, &cancelPoint{after: delay}, options())
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("import with a deadline: %v", err)
	}
	t.Logf("deadline after %v: %+v, %v", delay, rep.Counts, err)

	at, offset = 1+rng.Int64N(max(read, 1)), rng.Int64N(64)
	rep, _, err = p.run(t, tg.Sink, &cancelPoint{open: at, offset: offset}, options())
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("second import cancelled at the %d. open: %v", at, err)
	}
	t.Logf("cancelled at byte %d of the %d. open: %+v, %v", offset, at, rep.Counts, err)
}

// cancelPoint says where an import is interrupted: after a delay, or
// while it reads the open-th item it opens (counting from 1), after offset
// of its bytes.
type cancelPoint struct {
	after        time.Duration
	open, offset int64
}

// run imports from a freshly opened source into sink with p's filter
// (interrupted at cp, unless nil) and returns the report, how often each
// item's bytes were opened, and Run's error. An error other than the
// interruption's fails the test.
func (p Pipeline) run(t *testing.T, sink importer.Sink, cp *cancelPoint, opts importer.Options) (importer.Report, map[storage.MediaRef]int, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if cp != nil && cp.after > 0 {
		ctx, cancel = context.WithTimeout(ctx, cp.after)
		defer cancel()
	}
	src := &hookedSource{Source: p.Open(t), opens: map[storage.MediaRef]int{}}
	if cp != nil && cp.open > 0 {
		src.cancelAt, src.offset, src.cancel = cp.open, cp.offset, cancel
	}
	defer func() {
		if err := src.Close(); err != nil {
			t.Errorf("closing the source: %v", err)
		}
	}()
	opts.Filter = p.Filter
	rep, err := importer.Run(ctx, src, sink, opts)
	if err != nil && cp == nil {
		t.Fatalf("import: %v\n%s", err, rep)
	}
	return rep, src.openCounts(), err
}

// hookedSource counts the opens of a source's items and cancels the import
// in the middle of the cancelAt-th opened item (0: never).
type hookedSource struct {
	importer.Source
	cancelAt, offset int64
	cancel           context.CancelFunc

	n     atomic.Int64
	mu    sync.Mutex
	opens map[storage.MediaRef]int
}

// Walk implements importer.Source, hooking each item's Open.
func (s *hookedSource) Walk(ctx context.Context, f importer.Filter, fn func(importer.Item) error) error {
	return s.Source.Walk(ctx, f, func(it importer.Item) error {
		if open := it.Open; open != nil {
			ref := it.Ref()
			it.Open = func(ctx context.Context) (io.ReadCloser, error) { return s.open(ctx, ref, open) }
		}
		return fn(it)
	})
}

// open counts an open and opens the item, through a cancelling reader when
// it is the cancelAt-th.
func (s *hookedSource) open(ctx context.Context, ref storage.MediaRef, open func(context.Context) (io.ReadCloser, error)) (io.ReadCloser, error) {
	s.mu.Lock()
	s.opens[ref]++
	s.mu.Unlock()
	rc, err := open(ctx)
	if err != nil || s.cancelAt == 0 || s.n.Add(1) != s.cancelAt {
		return rc, err
	}
	return &cancellingReader{ReadCloser: rc, left: s.offset, cancel: s.cancel}, nil
}

// openCounts returns how often each item was opened.
func (s *hookedSource) openCounts() map[storage.MediaRef]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[storage.MediaRef]int, len(s.opens))
	for k, v := range s.opens {
		out[k] = v
	}
	return out
}

// cancellingReader passes left bytes through (or the body, when it is
// shorter), then cancels the import and fails like a read interrupted by
// it.
type cancellingReader struct {
	io.ReadCloser
	left   int64
	cancel context.CancelFunc
}

// Read implements io.Reader.
func (c *cancellingReader) Read(p []byte) (int, error) {
	if c.left <= 0 {
		c.cancel()
		return 0, context.Canceled
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.ReadCloser.Read(p)
	c.left -= int64(n)
	if errors.Is(err, io.EOF) {
		// A body shorter than the offset is interrupted at its end.
		c.cancel()
		return n, context.Canceled
	}
	return n, err
}

// recordingSink records the refs given to Put.
type recordingSink struct {
	importer.Sink
	mu  sync.Mutex
	put []storage.MediaRef
}

// Put implements importer.Sink.
func (r *recordingSink) Put(ctx context.Context, it importer.Item, body io.Reader) (importer.Outcome, error) {
	r.mu.Lock()
	r.put = append(r.put, it.Ref())
	r.mu.Unlock()
	return r.Sink.Put(ctx, it, body)
}

// puts returns the refs given to Put so far.
func (r *recordingSink) puts() []storage.MediaRef {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.put)
}
