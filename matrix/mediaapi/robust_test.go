package mediaapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"
)

// panickyThumbnailer panics in Generate while panicking is set, after the
// gate (when set) opens; otherwise it generates with a real generator.
type panickyThumbnailer struct {
	g         *thumbnails.Generator
	panicking atomic.Bool
	gate      chan struct{}
	calls     atomic.Int64
}

func (p *panickyThumbnailer) Generate(ctx context.Context, src []byte, req thumbnails.Request) (thumbnails.Result, error) {
	p.calls.Add(1)
	if p.gate != nil {
		<-p.gate
	}
	if p.panicking.Load() {
		var m map[string]int
		//lint:ignore SA5000 the test needs a real runtime panic
		m["boom"]++ // a real runtime panic: assignment to entry in nil map
	}
	return p.g.Generate(ctx, src, req)
}

func (p *panickyThumbnailer) Stats() thumbnails.Stats { return p.g.Stats() }

// observedLogger returns a logger writing JSON lines to buf.
func observedLogger(buf *syncBuffer) *zap.Logger {
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	return zap.New(zapcore.NewCore(enc, buf, zapcore.DebugLevel))
}

// A panic in a generation is recovered: the requests coalesced on it get
// 500 M_UNKNOWN, the panic is logged with its stack and counted, and the
// next request generates anew.
func TestThumbnailPanicFailsOnlyItsRequests(t *testing.T) {
	g, err := thumbnails.New(thumbnails.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	pt := &panickyThumbnailer{g: g, gate: make(chan struct{})}
	pt.panicking.Store(true)
	logs := &syncBuffer{}
	e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Thumbnailer = pt
		o.Logger = observedLogger(logs)
	})
	joined := make(chan struct{}, 2)
	e.repo.hooks.thumbnailJoined = func() { joined <- struct{}{} }
	id := e.upload("alice", testJPEG(t, 400, 300), "image/jpeg", "")
	path := "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=96&height=96&method=crop"

	recs := make([]*httptest.ResponseRecorder, 2)
	var wg sync.WaitGroup
	for i := range recs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			recs[i] = e.do(req{method: "GET", path: path, token: "alice"})
		}()
	}
	<-joined
	<-joined // both requests wait on the one generation
	close(pt.gate)
	wg.Wait()
	for _, rec := range recs {
		expectError(t, rec, 500, "M_UNKNOWN")
	}
	if c := pt.calls.Load(); c != 1 {
		t.Fatalf("%d generations, want 1 shared by both requests", c)
	}
	if got := counterValue(e.repo.metrics.panics.WithLabelValues("thumbnail")); got != 1 {
		t.Fatalf("panics_total{where=thumbnail} = %v, want 1", got)
	}
	var found bool
	for _, line := range strings.Split(logs.String(), "\n") {
		var entry map[string]any
		if json.Unmarshal([]byte(line), &entry) != nil || entry["msg"] != "panic recovered" {
			continue
		}
		found = true
		if entry["level"] != "error" || entry["where"] != "thumbnail" ||
			!strings.Contains(entry["stack"].(string), "panickyThumbnailer") ||
			!strings.Contains(entry["panic"].(string), "nil map") {
			t.Fatalf("panic log entry %v", entry)
		}
	}
	if !found {
		t.Fatalf("no panic log entry in %s", logs.String())
	}

	// The process lives on and the key is free: the next request generates.
	pt.panicking.Store(false)
	e.repo.hooks.thumbnailJoined = nil
	if rec := e.do(req{method: "GET", path: path, token: "alice"}); rec.Code != 200 {
		t.Fatalf("after the panic: %d %s", rec.Code, rec.Body)
	}
}

// A panic in background work (pre-generation) is recovered and counted.
func TestPregenerationPanicRecovered(t *testing.T) {
	g, err := thumbnails.New(thumbnails.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	pt := &panickyThumbnailer{g: g}
	pt.panicking.Store(true)
	e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Thumbnailer = pt
		o.Thumbnails = ThumbnailPolicy{Pregenerate: true}
	})
	// Go itself recovers what the work does not.
	done := make(chan struct{})
	if !e.repo.Go("test_job", func() { defer close(done); panic("job") }) {
		t.Fatal("Go refused work")
	}
	<-done
	e.upload("alice", testJPEG(t, 400, 300), "image/jpeg", "")
	if err := e.repo.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := counterValue(e.repo.metrics.panics.WithLabelValues("test_job")); got != 1 {
		t.Fatalf("panics_total{where=test_job} = %v, want 1", got)
	}
	if got := counterValue(e.repo.metrics.panics.WithLabelValues("thumbnail")); got != 1 {
		t.Fatalf("panics_total{where=thumbnail} = %v, want 1", got)
	}
	if got := counterValue(e.repo.metrics.panics.WithLabelValues("thumbnail_pregeneration")); got != 0 {
		t.Fatalf("panics_total{where=thumbnail_pregeneration} = %v, want 0 (the generation's own recovery caught it)", got)
	}
}

// countingStore wraps a blob store: it counts Opens and, while stall is set,
// returns readers that block until closed.
type countingStore struct {
	storage.BlobStore
	opens  atomic.Int64
	stall  atomic.Bool
	closed chan struct{} // receives one value per stalled reader closed
}

func (c *countingStore) Open(ctx context.Context, sha string) (storage.Blob, error) {
	c.opens.Add(1)
	b, err := c.BlobStore.Open(ctx, sha)
	if err != nil || !c.stall.Load() {
		return b, err
	}
	b.Content.Close()
	return storage.Blob{Content: &stalledReader{done: make(chan struct{}), closed: c.closed}, Size: b.Size}, nil
}

// stalledReader blocks every Read until Close, as a network body whose
// server stopped sending does.
type stalledReader struct {
	once   sync.Once
	done   chan struct{}
	closed chan struct{}
}

func (s *stalledReader) Read([]byte) (int, error) {
	<-s.done
	return 0, errors.New("read on closed body")
}

func (s *stalledReader) Seek(int64, int) (int64, error) { return 0, nil }

func (s *stalledReader) Close() error {
	s.once.Do(func() {
		close(s.done)
		if s.closed != nil {
			s.closed <- struct{}{}
		}
	})
	return nil
}

// countingEnv is an env whose only datastore is a countingStore.
func countingEnv(t *testing.T, opts ...envOption) (*env, *countingStore) {
	t.Helper()
	var cs *countingStore
	e := newEnvWithStores(t, func(dir string) []storage.Datastore {
		fs, err := filestore.New(dir + "/counted")
		if err != nil {
			t.Fatal(err)
		}
		cs = &countingStore{BlobStore: fs, closed: make(chan struct{}, 16)}
		return []storage.Datastore{{Name: "counted", Store: cs,
			Kinds: []storage.Kind{storage.KindLocal, storage.KindRemote, storage.KindThumbnails}}}
	}, opts...)
	return e, cs
}

// Thumbnail sources are admitted into a memory budget before they are read:
// a generation that does not fit gets 429 M_LIMIT_EXCEEDED with
// Retry-After without reading anything.
func TestThumbnailSourceMemoryBudget(t *testing.T) {
	g, err := thumbnails.New(thumbnails.Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	ct := &countingThumbnailer{g: g}
	src1, src2 := testJPEG(t, 400, 300), testJPEG(t, 410, 300)
	e, cs := countingEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Thumbnailer = ct
		o.ThumbnailMemory = int64(len(src1) + len(src2) - 1) // one fits, not both
	})
	e.repo.thumbMemoryWait = 0
	joined := make(chan struct{}, 1)
	id1 := e.upload("alice", src1, "image/jpeg", "")
	id2 := e.upload("alice", src2, "image/jpeg", "")
	ct.gate = make(chan struct{})
	e.repo.hooks.thumbnailJoined = func() { joined <- struct{}{} }

	first := make(chan *httptest.ResponseRecorder)
	go func() {
		first <- e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id1 + "?width=96&height=96&method=crop", token: "alice"})
	}()
	<-joined
	for ct.calls.Load() == 0 { // the first source is read and held
		runtimeGosched()
	}
	opens := cs.opens.Load()
	e.repo.hooks.thumbnailJoined = nil
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id2 + "?width=96&height=96&method=crop", token: "alice"})
	expectError(t, rec, 429, "M_LIMIT_EXCEEDED")
	if ra := rec.Header().Get("Retry-After"); ra == "" {
		t.Fatal("429 without Retry-After")
	}
	var body struct {
		RetryAfterMS int64 `json:"retry_after_ms"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.RetryAfterMS <= 0 {
		t.Fatalf("body %s: %v", rec.Body, err)
	}
	if got := cs.opens.Load(); got != opens {
		t.Fatalf("the refused source was opened (%d opens, want %d)", got, opens)
	}
	close(ct.gate)
	if rec := <-first; rec.Code != 200 {
		t.Fatalf("first: %d %s", rec.Code, rec.Body)
	}
	// The budget is free again.
	if rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id2 + "?width=96&height=96&method=crop", token: "alice"}); rec.Code != 200 {
		t.Fatalf("second after the first finished: %d %s", rec.Code, rec.Body)
	}
	assertBudgetFree(t, e.repo)
}

// A source larger than the whole budget is still thumbnailed (alone).
func TestThumbnailSourceLargerThanBudget(t *testing.T) {
	g, err := thumbnails.New(thumbnails.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Thumbnailer = &countingThumbnailer{g: g}
		o.ThumbnailMemory = 1000
	})
	id := e.upload("alice", testJPEG(t, 400, 300), "image/jpeg", "")
	if rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=96&height=96&method=crop", token: "alice"}); rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
}

// A source whose read stalls fails the generation at its deadline (504),
// closes the reader, and frees the key: the next request starts anew.
func TestThumbnailStalledSourceHitsDeadline(t *testing.T) {
	g, err := thumbnails.New(thumbnails.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	ct := &countingThumbnailer{g: g}
	e, cs := countingEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Thumbnailer = ct
		o.ThumbnailTimeout = 50 * time.Millisecond
	})
	id := e.upload("alice", testJPEG(t, 400, 300), "image/jpeg", "")
	path := "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=96&height=96&method=crop"
	cs.stall.Store(true)
	rec := e.do(req{method: "GET", path: path, token: "alice"})
	expectError(t, rec, 504, "M_UNKNOWN")
	<-cs.closed // the stalled reader was closed
	if c := ct.calls.Load(); c != 0 {
		t.Fatalf("%d generations from a source never read", c)
	}
	cs.stall.Store(false)
	e.repo.thumbTimeout = time.Minute
	if rec := e.do(req{method: "GET", path: path, token: "alice"}); rec.Code != 200 {
		t.Fatalf("after the stall: %d %s", rec.Code, rec.Body)
	}
	assertBudgetFree(t, e.repo)
}

// Drain waits for background work: pre-generation started by an upload
// finishes (its thumbnails are recorded) before Drain returns, and no new
// background work starts afterwards.
func TestDrainWaitsForPregeneration(t *testing.T) {
	g, err := thumbnails.New(thumbnails.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	ct := &countingThumbnailer{g: g, gate: make(chan struct{})}
	e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Thumbnailer = ct
		o.Thumbnails = ThumbnailPolicy{Pregenerate: true, Sizes: []ThumbnailSize{{96, 96, thumbnails.MethodCrop}}}
	})
	id := e.upload("alice", testJPEG(t, 400, 300), "image/jpeg", "")
	for ct.calls.Load() == 0 {
		runtimeGosched()
	}
	drained := make(chan error, 1)
	go func() { drained <- e.repo.Drain(context.Background()) }()
	// A bounded Drain gives up while the generation is held.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	if err := e.repo.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("bounded Drain with a held generation: %v", err)
	}
	cancel()
	select {
	case err := <-drained:
		t.Fatalf("Drain returned (%v) while pre-generation was running", err)
	default:
	}
	close(ct.gate)
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	k := storage.ThumbnailKey{ServerName: testServer, MediaID: id, Width: 96, Height: 96, Method: "crop"}
	if _, err := e.sql.GetThumbnail(context.Background(), k); err != nil {
		t.Fatalf("pre-generated thumbnail not recorded before Drain returned: %v", err)
	}
	if e.repo.Go("after_drain", func() { t.Error("work started after Drain") }) {
		t.Fatal("Go accepted work after Drain")
	}
	calls := ct.calls.Load()
	e.upload("alice", testJPEG(t, 300, 300), "image/jpeg", "")
	if ct.calls.Load() != calls {
		t.Fatal("pre-generation started after Drain")
	}
}

// goFinish always finishes: with fn's error, with ErrPanicked after a panic,
// and with ErrShuttingDown when draining.
func TestGoFinishAlwaysFinishes(t *testing.T) {
	e := newEnv(t)
	finished := make(chan error, 1)
	finish := func(err error) { finished <- err }
	want := errors.New("fetch failed")
	e.repo.goFinish("remote_fetch", func() error { return want }, finish)
	if err := <-finished; err != want {
		t.Fatalf("error %v, want %v", err, want)
	}
	e.repo.goFinish("remote_fetch", func() error { panic("remote") }, finish)
	if err := <-finished; !errors.Is(err, ErrPanicked) {
		t.Fatalf("after a panic: %v, want ErrPanicked", err)
	}
	if err := e.repo.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := counterValue(e.repo.metrics.panics.WithLabelValues("remote_fetch")); got != 1 {
		t.Fatalf("panics_total{where=remote_fetch} = %v, want 1", got)
	}
	e.repo.goFinish("remote_fetch", func() error { t.Error("ran while draining"); return nil }, finish)
	if err := <-finished; !errors.Is(err, ErrShuttingDown) {
		t.Fatalf("while draining: %v, want ErrShuttingDown", err)
	}
}

// assertBudgetFree fails unless the whole thumbnail source budget is free
// (every admitted source gave its room back).
func assertBudgetFree(t *testing.T, r *Repository) {
	t.Helper()
	if !r.thumbMemory.TryAcquire(r.thumbMemoryCap) {
		t.Fatal("the thumbnail source budget is still partly held")
	}
	r.thumbMemory.Release(r.thumbMemoryCap)
}
