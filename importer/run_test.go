package importer_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// memSink is an in-memory importer.Sink for the tests of Run: it keeps what
// was put, checks bodies like a real sink, and records its calls.
type memSink struct {
	mu          sync.Mutex
	held        map[storage.MediaRef]importer.Present
	quarantined map[string]string
	puts        []storage.MediaRef
	lookups     int
	lookupErr   error
	// inPut and maxInPut measure Put's concurrency; block, when set, is
	// waited for inside each Put.
	inPut, maxInPut atomic.Int32
	block           chan struct{}
}

func newMemSink() *memSink {
	return &memSink{held: map[storage.MediaRef]importer.Present{}, quarantined: map[string]string{}}
}

func (s *memSink) Lookup(ctx context.Context, refs []storage.MediaRef) (map[storage.MediaRef]importer.Present, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lookups++
	if s.lookupErr != nil {
		return nil, s.lookupErr
	}
	out := map[storage.MediaRef]importer.Present{}
	for _, r := range refs {
		if p, ok := s.held[r]; ok {
			out[r] = p
		}
	}
	return out, nil
}

func (s *memSink) Put(ctx context.Context, it importer.Item, body io.Reader) (importer.Outcome, error) {
	n := s.inPut.Add(1)
	defer s.inPut.Add(-1)
	for {
		m := s.maxInPut.Load()
		if n <= m || s.maxInPut.CompareAndSwap(m, n) {
			break
		}
	}
	if s.block != nil {
		select {
		case <-s.block:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	b, err := io.ReadAll(body)
	if err != nil {
		return 0, fmt.Errorf("reading body: %w", err)
	}
	sha := importtest.SHA256(b)
	if it.SHA256 != "" && it.SHA256 != sha {
		return 0, importer.ErrHashMismatch
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.puts = append(s.puts, it.Ref())
	if p, ok := s.held[it.Ref()]; ok {
		if p.SHA256 == sha {
			return importer.AlreadyPresent, nil
		}
		return 0, importer.ErrConflict
	}
	s.held[it.Ref()] = importer.Present{SHA256: sha, Size: int64(len(b))}
	return importer.Imported, nil
}

func (s *memSink) Quarantine(ctx context.Context, sha256, by string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.quarantined[sha256] = by
	return nil
}

func ref(id string) storage.MediaRef { return storage.MediaRef{ServerName: "example.org", MediaID: id} }

// problems maps each reported problem's media ID to its kind.
func problems(rep importer.Report) map[string]importer.ProblemKind {
	out := map[string]importer.ProblemKind{}
	for _, p := range rep.Problems {
		out[p.Ref.MediaID] = p.Kind
	}
	return out
}

func TestRunOutcomes(t *testing.T) {
	ctx := context.Background()
	body := func(s string) []byte { return []byte(strings.Repeat(s, 100)) }
	fresh := importtest.New("example.org", "fresh", body("a"))
	same := importtest.New("example.org", "same", body("b"))
	other := importtest.New("example.org", "other", body("c"))
	sizeOnly := importtest.New("example.org", "sizeonly", body("d"))
	sizeOnly.SHA256 = ""
	sizeDiffers := importtest.New("example.org", "sizediffers", body("e"))
	sizeDiffers.SHA256 = ""
	unknown := importtest.New("example.org", "unknown", body("f"))
	unknown.SHA256, unknown.Size = "", -1
	deleted := importtest.New("example.org", "deleted", body("g"))
	pending := importtest.New("example.org", "pending", body("h"))
	missing := importtest.New("example.org", "missing", body("i"))
	missing.Missing = true
	missingQ := importtest.New("example.org", "missingq", body("j"))
	missingQ.Missing, missingQ.QuarantinedBy = true, "@mod:example.org"
	mismatch := importtest.New("example.org", "mismatch", body("k"))
	mismatch.Body = body("K")
	short := importtest.New("example.org", "short", body("l"))
	short.Size++
	long := importtest.New("example.org", "long", body("m"))
	long.Size--
	long.SHA256 = ""
	badID := importtest.New("example.org", "bad=id", body("n"))
	badServer := importtest.New("example.org:99999", "badserver", body("o"))
	badHash := importtest.New("example.org", "badhash", body("p"))
	badHash.SHA256 = strings.ToUpper(badHash.SHA256)
	broken := importtest.New("example.org", "broken", body("q"))
	noSize := importtest.New("example.org", "nosize", body("r"))
	noSize.Size = -1

	src := &importtest.Source{
		Media: []importtest.Media{fresh, same, other, sizeOnly, sizeDiffers, unknown, deleted, pending, missing, missingQ,
			mismatch, short, long, badID, badServer, badHash, broken, noSize},
		Fault: func(r storage.MediaRef) importtest.Fault {
			if r.MediaID == "broken" {
				return importtest.FailOpen
			}
			return importtest.NoFault
		},
	}
	held := map[storage.MediaRef]importer.Present{
		same.Ref():        {SHA256: same.SHA256, Size: same.Size},
		other.Ref():       {SHA256: importtest.SHA256([]byte("else")), Size: 4},
		sizeOnly.Ref():    {SHA256: importtest.SHA256(sizeOnly.Body), Size: sizeOnly.Size},
		sizeDiffers.Ref(): {SHA256: importtest.SHA256([]byte("else")), Size: 4},
		unknown.Ref():     {SHA256: importtest.SHA256(unknown.Body), Size: 100},
		deleted.Ref():     {Deleted: true},
		pending.Ref():     {},
	}
	wantKinds := map[string]importer.ProblemKind{
		"other": importer.ProblemConflict, "sizediffers": importer.ProblemConflict,
		"deleted": importer.ProblemConflict, "pending": importer.ProblemConflict,
		"missing": importer.ProblemMissing, "missingq": importer.ProblemMissing,
		"mismatch": importer.ProblemMismatch, "short": importer.ProblemMismatch, "long": importer.ProblemMismatch,
		"bad=id": importer.ProblemInvalid, "badserver": importer.ProblemInvalid, "badhash": importer.ProblemInvalid,
		"broken": importer.ProblemFailed,
	}

	for _, dry := range []bool{false, true} {
		t.Run(fmt.Sprintf("dry=%v", dry), func(t *testing.T) {
			sink := newMemSink()
			for r, p := range held {
				sink.held[r] = p
			}
			var calls []importer.Progress
			rep, err := importer.Run(ctx, src, sink, importer.Options{DryRun: dry, LookupBatch: 5, Workers: 3,
				Progress: func(p importer.Progress) { calls = append(calls, p) }})
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			want := importer.Counts{Imported: 2, AlreadyPresent: 3, Missing: 2, Mismatched: 3, Conflicts: 4, Invalid: 3, Failed: 1}
			if rep.Counts != want {
				t.Errorf("counts %+v, want %+v\n%s", rep.Counts, want, rep)
			}
			if rep.ImportedBytes != 200 || rep.DryRun != dry || rep.Source != "importtest" || rep.Totals.Items != int64(len(src.Media)) {
				t.Errorf("report %+v", rep)
			}
			if got := problems(rep); !equalMaps(got, wantKinds) {
				t.Errorf("problems %v, want %v", got, wantKinds)
			}
			if rep.OK() {
				t.Errorf("OK() with mismatches, conflicts and failures")
			}
			// Items decided by their recorded hash or size are never read.
			for _, m := range []importtest.Media{same, other, sizeOnly, sizeDiffers, deleted, pending, badID, badServer, badHash} {
				if n := src.Opens(m.Ref()); n != 0 {
					t.Errorf("%s opened %d times", m.MediaID, n)
				}
			}
			if dry {
				if len(sink.puts) != 0 || len(sink.quarantined) != 0 {
					t.Errorf("dry run wrote: puts %v, quarantined %v", sink.puts, sink.quarantined)
				}
			} else {
				slices.SortFunc(sink.puts, func(a, b storage.MediaRef) int { return strings.Compare(a.MediaID, b.MediaID) })
				// Puts that reached the sink: the imported items, the one
				// only its bytes could decide, and the ones whose bytes
				// the verifier stopped.
				wantPuts := []storage.MediaRef{ref("fresh"), ref("nosize"), ref("unknown")}
				if !slices.Equal(sink.puts, wantPuts) {
					t.Errorf("puts %v, want %v", sink.puts, wantPuts)
				}
				for _, m := range []importtest.Media{fresh, noSize} {
					if p := sink.held[m.Ref()]; p.SHA256 != importtest.SHA256(m.Body) {
						t.Errorf("%s stored as %+v", m.MediaID, p)
					}
				}
				for _, m := range []importtest.Media{mismatch, short, long} {
					if _, ok := sink.held[m.Ref()]; ok {
						t.Errorf("%s stored despite its mismatch", m.MediaID)
					}
				}
				if by := sink.quarantined[missingQ.SHA256]; by != "@mod:example.org" || len(sink.quarantined) != 1 {
					t.Errorf("quarantined %v", sink.quarantined)
				}
			}
			if len(calls) == 0 || !calls[len(calls)-1].Final || calls[len(calls)-1].Counts != want {
				t.Fatalf("progress calls %+v", calls)
			}
			for i, p := range calls[:len(calls)-1] {
				if p.Final || p.Total() > calls[i+1].Total() || p.Bytes > calls[i+1].Bytes {
					t.Errorf("progress %d not monotone: %+v then %+v", i, p, calls[i+1])
				}
			}
			if f, ok := calls[len(calls)-1].Fraction(); !ok || f < 0.99 {
				t.Errorf("final fraction %v, %v", f, ok)
			}
		})
	}
}

func equalMaps[K comparable, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// TestRunRerun checks that a second run of the same source finds every
// item present and reads nothing.
func TestRunRerun(t *testing.T) {
	ctx := context.Background()
	src := &importtest.Source{}
	for i := range 50 {
		src.Media = append(src.Media, importtest.New("example.org", fmt.Sprintf("m%03d", i), []byte(strings.Repeat("x", i))))
	}
	sink := newMemSink()
	rep, err := importer.Run(ctx, src, sink, importer.Options{LookupBatch: 7})
	if err != nil || rep.Imported != 50 || rep.Total() != 50 {
		t.Fatalf("first run: %v\n%s", err, rep)
	}
	puts := len(sink.puts)
	rep, err = importer.Run(ctx, src, sink, importer.Options{LookupBatch: 7})
	if err != nil || rep.AlreadyPresent != 50 || rep.Total() != 50 || len(sink.puts) != puts {
		t.Fatalf("second run: %v, %d puts\n%s", err, len(sink.puts)-puts, rep)
	}
	for _, m := range src.Media {
		if n := src.Opens(m.Ref()); n != 1 {
			t.Errorf("%s opened %d times over two runs", m.MediaID, n)
		}
	}
	if !strings.Contains(rep.String(), "already present:       50") {
		t.Errorf("report text:\n%s", rep)
	}
}

// TestRunWorkers checks that at most Workers items are stored at once.
func TestRunWorkers(t *testing.T) {
	src := &importtest.Source{}
	for i := range 40 {
		src.Media = append(src.Media, importtest.New("example.org", fmt.Sprintf("m%03d", i), []byte{byte(i)}))
	}
	sink := newMemSink()
	sink.block = make(chan struct{})
	go func() {
		// Let the pool fill up, then release the Puts one by one.
		for range 40 {
			time.Sleep(time.Millisecond)
			sink.block <- struct{}{}
		}
	}()
	rep, err := importer.Run(context.Background(), src, sink, importer.Options{Workers: 3, LookupBatch: 4})
	if err != nil || rep.Imported != 40 {
		t.Fatalf("Run: %v\n%s", err, rep)
	}
	if m := sink.maxInPut.Load(); m != 3 {
		t.Errorf("at most %d Puts at once, want 3", m)
	}
}

// TestRunCancel cancels a run while Puts are blocked: it returns promptly
// with ctx's error and a partial report.
func TestRunCancel(t *testing.T) {
	src := &importtest.Source{}
	for i := range 100 {
		src.Media = append(src.Media, importtest.New("example.org", fmt.Sprintf("m%03d", i), []byte{byte(i)}))
	}
	sink := newMemSink()
	sink.block = make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for range 10 {
			sink.block <- struct{}{}
		}
		cancel()
	}()
	done := make(chan struct{})
	var rep importer.Report
	var err error
	go func() {
		defer close(done)
		rep, err = importer.Run(ctx, src, sink, importer.Options{Workers: 2, LookupBatch: 8})
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancellation")
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Run error %v, want context.Canceled", err)
	}
	if rep.Imported < 10 || rep.Imported > 12 || rep.Total() != rep.Imported {
		t.Errorf("partial report after 10 Puts: %+v", rep.Counts)
	}
}

// TestRunStops checks that errors of the source's Walk and of the sink's
// Lookup stop the run and are returned.
func TestRunStops(t *testing.T) {
	src := &importtest.Source{Media: []importtest.Media{importtest.New("example.org", "a", []byte("a"))}}
	sink := newMemSink()
	sink.lookupErr = errors.New("database down")
	rep, err := importer.Run(context.Background(), src, sink, importer.Options{})
	if err == nil || !strings.Contains(err.Error(), "database down") || rep.Total() != 0 {
		t.Errorf("Lookup failure: %v, %+v", err, rep.Counts)
	}
	walkErr := errors.New("cursor lost")
	rep, err = importer.Run(context.Background(), failingWalk{src, walkErr}, newMemSink(), importer.Options{})
	if !errors.Is(err, walkErr) || rep.Total() != 0 {
		t.Errorf("Walk failure: %v, %+v", err, rep.Counts)
	}
}

// failingWalk lists its source's items, then fails.
type failingWalk struct {
	*importtest.Source
	err error
}

func (f failingWalk) Walk(ctx context.Context, flt importer.Filter, fn func(importer.Item) error) error {
	if err := f.Source.Walk(ctx, flt, fn); err != nil {
		return err
	}
	return f.err
}

// TestRunProblemCap checks that the report lists the first MaxProblems
// problems and counts the rest.
func TestRunProblemCap(t *testing.T) {
	src := &importtest.Source{}
	for i := range importer.MaxProblems + 5 {
		src.Media = append(src.Media, importtest.New("example.org", fmt.Sprintf("bad.%d", i), nil))
	}
	rep, err := importer.Run(context.Background(), src, newMemSink(), importer.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Invalid != importer.MaxProblems+5 || len(rep.Problems) != importer.MaxProblems || rep.MoreProblems != 5 {
		t.Errorf("invalid %d, problems %d, more %d", rep.Invalid, len(rep.Problems), rep.MoreProblems)
	}
	if !rep.OK() {
		t.Errorf("invalid IDs alone make the report not OK")
	}
	if !strings.Contains(rep.String(), "... and 5 more") || !strings.Contains(rep.String(), "invalid  mxc://example.org/bad.0: media ID") {
		t.Errorf("report text:\n%s", rep)
	}
}

// TestRunFilter checks that the filter reaches the source.
func TestRunFilter(t *testing.T) {
	local := importtest.New("example.org", "local", []byte("l"))
	otherLocal := importtest.New("other.example", "local", []byte("o"))
	remote := importtest.New("remote.example", "remote", []byte("r"))
	remote.Remote = true
	src := &importtest.Source{Media: []importtest.Media{local, otherLocal, remote}}
	for _, tt := range []struct {
		f    importer.Filter
		want []storage.MediaRef
	}{
		{importer.Filter{}, []storage.MediaRef{local.Ref(), otherLocal.Ref()}},
		{importer.Filter{ServerNames: []string{"example.org"}}, []storage.MediaRef{local.Ref()}},
		{importer.Filter{ServerNames: []string{"example.org"}, IncludeRemote: true}, []storage.MediaRef{local.Ref(), remote.Ref()}},
	} {
		sink := newMemSink()
		if _, err := importer.Run(context.Background(), src, sink, importer.Options{Workers: 1, Filter: tt.f}); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(sink.puts, tt.want) {
			t.Errorf("filter %+v stored %v, want %v", tt.f, sink.puts, tt.want)
		}
	}
}

func TestProgressETA(t *testing.T) {
	for _, tt := range []struct {
		p      importer.Progress
		want   time.Duration
		wantOK bool
	}{
		{importer.Progress{Totals: importer.Totals{Items: 10, Bytes: 1000}, Bytes: 250, Elapsed: time.Minute}, 3 * time.Minute, true},
		{importer.Progress{Totals: importer.Totals{Items: 10, Bytes: -1}, Counts: importer.Counts{Imported: 5}, Elapsed: time.Minute}, time.Minute, true},
		{importer.Progress{Totals: importer.Totals{Items: -1, Bytes: -1}, Elapsed: time.Minute}, 0, false},
		{importer.Progress{Totals: importer.Totals{Items: 10, Bytes: 1000}, Elapsed: time.Minute}, 0, false},
		{importer.Progress{Totals: importer.Totals{Items: 10, Bytes: 1000}, Bytes: 1000, Elapsed: time.Minute}, 0, true},
	} {
		got, ok := tt.p.ETA()
		if got != tt.want || ok != tt.wantOK {
			t.Errorf("ETA of %+v = %v, %v; want %v, %v", tt.p, got, ok, tt.want, tt.wantOK)
		}
	}
}

// TestVerifier checks the bodies a verifier lets through and the ones it
// stops, through a sink that reads in small pieces.
func TestVerifier(t *testing.T) {
	body := bytes.Repeat([]byte("abcdefghij"), 1000)
	for _, tt := range []struct {
		name string
		got  []byte
		size int64
		sha  string
		ok   bool
	}{
		{"exact", body, int64(len(body)), importtest.SHA256(body), true},
		{"size only", body, int64(len(body)), "", true},
		{"hash only", body, -1, importtest.SHA256(body), true},
		{"neither", body, -1, "", true},
		{"empty", nil, 0, importtest.SHA256(nil), true},
		{"short", body[:len(body)-1], int64(len(body)), "", false},
		{"long", append(slices.Clone(body), 'x'), int64(len(body)), "", false},
		{"other bytes", bytes.ToUpper(body), int64(len(body)), importtest.SHA256(bytes.ToLower(body)), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			m := importtest.New("example.org", "v", tt.got)
			m.Size, m.SHA256 = tt.size, tt.sha
			sink := newMemSink()
			rep, err := importer.Run(context.Background(), &importtest.Source{Media: []importtest.Media{m}}, sink, importer.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if tt.ok != (rep.Imported == 1) || !tt.ok && rep.Mismatched != 1 {
				t.Errorf("counts %+v (ok %v)", rep.Counts, tt.ok)
			}
			if _, stored := sink.held[m.Ref()]; stored != tt.ok {
				t.Errorf("stored %v", stored)
			}
		})
	}
}

// noOpen lists its source's items without a way to open them.
type noOpen struct{ *importtest.Source }

func (n noOpen) Walk(ctx context.Context, f importer.Filter, fn func(importer.Item) error) error {
	return n.Source.Walk(ctx, f, func(it importer.Item) error {
		it.Open = nil
		return fn(it)
	})
}

func TestRunWithoutOpen(t *testing.T) {
	src := noOpen{&importtest.Source{Media: []importtest.Media{importtest.New("example.org", "a", []byte("a"))}}}
	sink := newMemSink()
	rep, err := importer.Run(context.Background(), src, sink, importer.Options{})
	if err != nil || rep.Invalid != 1 || rep.Total() != 1 || sink.lookups != 0 {
		t.Errorf("Run: %v, %+v, %d lookups", err, rep.Counts, sink.lookups)
	}
}
