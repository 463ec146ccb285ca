package mediaapi

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// accessTimes maps "server/id" to the time of each access of a batch.
func accessTimes(batch []storage.Access) map[string]time.Time {
	m := make(map[string]time.Time, len(batch))
	for _, a := range batch {
		m[a.ServerName+"/"+a.MediaID] = a.At
	}
	return m
}

// TestAccessRecorderBound: the recorder keeps the latest time per item,
// never an earlier one, and at most max items per kind.
func TestAccessRecorderBound(t *testing.T) {
	a := newAccessRecorder(2)
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	k1, k2, k3 := mediaKey{"s", "1"}, mediaKey{"s", "2"}, mediaKey{"s", "3"}
	for _, n := range []struct {
		k     mediaKey
		at    time.Time
		thumb bool
		kept  bool
	}{
		{k1, t0.Add(time.Minute), false, true},
		{k1, t0, false, true}, // earlier: ignored, not dropped
		{k1, t0.Add(time.Minute + time.Millisecond), false, true},
		{k2, t0, false, true}, // fills the media map
		{k3, t0, false, false},
		{k1, t0.Add(2 * time.Minute), false, true}, // known items still move
		{k3, t0, true, true},                       // thumbnails have their own bound
	} {
		if got := a.note(n.k, n.at, n.thumb); got != n.kept {
			t.Fatalf("note(%v, %v, %v) = %v, want %v", n.k, n.at, n.thumb, got, n.kept)
		}
	}
	if len(a.full) != 1 {
		t.Fatal("a full buffer did not ask for a flush")
	}
	media, thumbs := a.take()
	if len(media) != 2 || !media[k1].Equal(t0.Add(2*time.Minute)) || !media[k2].Equal(t0) || len(thumbs) != 1 {
		t.Fatalf("taken %v %v", media, thumbs)
	}
	if m, th := a.pending(); m != 0 || th != 0 {
		t.Fatalf("%d+%d pending after take", m, th)
	}
	// A failed batch goes back, merged with newer reads and bounded.
	a.note(k1, t0.Add(3*time.Minute), false)
	a.note(k3, t0, false)
	if dropped := a.putBack(media, thumbs); dropped != 1 {
		t.Fatalf("put back dropped %d, want 1 (k2: the map is full)", dropped)
	}
	media, _ = a.take()
	if len(media) != 2 || !media[k1].Equal(t0.Add(3*time.Minute)) {
		t.Fatalf("after put back: %v", media)
	}
}

// accessEnv is a thumbnailing env on a store that records access.
func accessEnv(t *testing.T, opts ...envOption) (*env, *adminMeta) {
	t.Helper()
	g, err := newTestGenerator()
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, append([]envOption{func(_ *SiteConfig, o *RepositoryOptions) { o.Thumbnailer = g }}, opts...)...)
	return e, e.needAdmin()
}

// TestAccessRecorderTakeWhileNoting: take never hands out a map that note
// still writes into, also when a kind had nothing to take (the race
// detector catches a shared map).
func TestAccessRecorderTakeWhileNoting(t *testing.T) {
	a := newAccessRecorder(1 << 16)
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 2000 {
			a.note(mediaKey{"s", strconv.Itoa(i)}, t0, i%2 == 0)
		}
	}()
	taken := 0
	for {
		media, thumbs := a.take()
		taken += len(media) + len(thumbs)
		select {
		case <-done:
			media, thumbs = a.take()
			if taken += len(media) + len(thumbs); taken != 2000 {
				t.Fatalf("took %d reads, want 2000", taken)
			}
			return
		default:
		}
	}
}

// TestAccessBatched: reads are written only by a flush, one batch per kind
// with the latest time of each item, and the recorded time never moves
// backwards.
func TestAccessBatched(t *testing.T) {
	e, admin := accessEnv(t)
	ctx := context.Background()
	id1 := e.upload("alice", testJPEG(t, 320, 240), "image/jpeg", "")
	id2 := e.upload("alice", []byte("plain"), "text/plain", "")
	for range 5 {
		e.clock.Advance(time.Minute)
		for _, path := range []string{
			"/_matrix/client/v1/media/download/test/" + id1,
			"/_matrix/media/v3/download/test/" + id2,
			"/_matrix/client/v1/media/thumbnail/test/" + id1 + "?width=96&height=96",
		} {
			if rec := e.do(req{method: "GET", path: path, token: "alice"}); rec.Code != 200 {
				t.Fatalf("%s: %d", path, rec.Code)
			}
		}
	}
	if media, thumbs := admin.batches(); len(media)+len(thumbs) != 0 {
		t.Fatalf("%d+%d access writes before any flush, want none", len(media), len(thumbs))
	}
	last := e.clock.Now()
	if err := e.repo.FlushAccess(ctx); err != nil {
		t.Fatal(err)
	}
	media, thumbs := admin.batches()
	if len(media) != 1 || len(thumbs) != 1 {
		t.Fatalf("%d media and %d thumbnail batches, want one each", len(media), len(thumbs))
	}
	if got := accessTimes(media[0]); len(got) != 2 || !got["test/"+id1].Equal(last) || !got["test/"+id2].Equal(last) {
		t.Fatalf("media batch %v, want both items at %v", got, last)
	}
	if got := accessTimes(thumbs[0]); len(got) != 1 || !got["test/"+id1].Equal(last) {
		t.Fatalf("thumbnail batch %v", got)
	}
	for _, id := range []string{id1, id2} {
		if m, err := e.sql.GetMedia(ctx, testServer, id); err != nil || !m.LastAccessAt.Equal(last) {
			t.Fatalf("stored last access of %s: %v, %v; want %v", id, m.LastAccessAt, err, last)
		}
	}
	// Nothing read since: a flush writes nothing.
	if err := e.repo.FlushAccess(ctx); err != nil {
		t.Fatal(err)
	}
	if media, thumbs := admin.batches(); len(media) != 1 || len(thumbs) != 1 {
		t.Fatalf("an empty flush wrote: %d, %d batches", len(media), len(thumbs))
	}
	if got := counterValue(e.repo.metrics.accessFlushed.WithLabelValues("media")); got != 2 {
		t.Fatalf("access_flushed_total{kind=media} = %v, want 2", got)
	}

	// Never backwards: in memory (a later read then an earlier one) ...
	path := "/_matrix/client/v1/media/download/test/" + id1
	e.clock.Set(last.Add(2 * time.Minute))
	e.do(req{method: "GET", path: path, token: "alice"})
	e.clock.Set(last.Add(time.Minute))
	e.do(req{method: "GET", path: path, token: "alice"})
	if err := e.repo.FlushAccess(ctx); err != nil {
		t.Fatal(err)
	}
	media, _ = admin.batches()
	if got := accessTimes(media[len(media)-1]); !got["test/"+id1].Equal(last.Add(2 * time.Minute)) {
		t.Fatalf("batch %v, want the later read", got)
	}
	// ... and in the store (a clock that went back).
	e.clock.Set(last.Add(-time.Hour))
	e.do(req{method: "GET", path: path, token: "alice"})
	if err := e.repo.FlushAccess(ctx); err != nil {
		t.Fatal(err)
	}
	if m, err := e.sql.GetMedia(ctx, testServer, id1); err != nil || !m.LastAccessAt.Equal(last.Add(2*time.Minute)) {
		t.Fatalf("stored last access %v, %v; want %v", m.LastAccessAt, err, last.Add(2*time.Minute))
	}
}

// TestAccessFlushOnShutdown: RunAccessFlush flushes once more when
// stopped, and Drain writes what was read after that.
func TestAccessFlushOnShutdown(t *testing.T) {
	e, admin := accessEnv(t, func(_ *SiteConfig, o *RepositoryOptions) { o.AccessFlushInterval = time.Hour })
	id := e.upload("alice", []byte("read at shutdown"), "text/plain", "")
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	if !e.repo.Go("access_flush", func() { defer close(done); e.repo.RunAccessFlush(ctx) }) {
		t.Fatal("not started")
	}
	path := "/_matrix/client/v1/media/download/test/" + id
	if rec := e.do(req{method: "GET", path: path, token: "alice"}); rec.Code != 200 {
		t.Fatalf("download: %d", rec.Code)
	}
	if media, _ := admin.batches(); len(media) != 0 {
		t.Fatal("written before the interval")
	}
	stop()
	<-done
	media, _ := admin.batches()
	if len(media) != 1 || len(media[0]) != 1 || media[0][0].MediaID != id {
		t.Fatalf("batches after stop: %v", media)
	}
	// A request still in flight after the loop stopped.
	e.clock.Advance(time.Minute)
	if rec := e.do(req{method: "GET", path: path, token: "alice"}); rec.Code != 200 {
		t.Fatalf("download: %d", rec.Code)
	}
	if err := e.repo.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	media, _ = admin.batches()
	if len(media) != 2 || !media[1][0].At.Equal(e.clock.Now()) {
		t.Fatalf("batches after Drain: %v", media)
	}
}

// TestAccessBufferFullFlushesEarly: a full buffer drops reads of further
// items (counted) and makes the loop flush before its interval.
func TestAccessBufferFullFlushesEarly(t *testing.T) {
	e, admin := accessEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.AccessFlushInterval = time.Hour
		o.AccessBufferSize = 2
	})
	var ids []string
	for _, s := range []string{"one", "two", "three"} {
		ids = append(ids, e.upload("alice", []byte(s), "text/plain", ""))
	}
	for _, id := range ids {
		e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"})
	}
	if got := counterValue(e.repo.metrics.accessDropped); got != 1 {
		t.Fatalf("access_dropped_total = %v, want 1", got)
	}
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	go e.repo.RunAccessFlush(ctx)
	// The full buffer's signal wakes the loop at once, not in an hour.
	waitFor(t, func() bool { media, _ := admin.batches(); return len(media) == 1 })
	media, _ := admin.batches()
	if got := accessTimes(media[0]); len(got) != 2 {
		t.Fatalf("early batch %v, want the first two items", got)
	}
}

// TestAccessFlushErrorRetried: a failed batch is counted and its reads are
// written by the next flush.
func TestAccessFlushErrorRetried(t *testing.T) {
	e, admin := accessEnv(t)
	id := e.upload("alice", []byte("retried"), "text/plain", "")
	e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"})
	admin.mu.Lock()
	admin.failAccess = errors.New("database down")
	admin.mu.Unlock()
	if err := e.repo.FlushAccess(context.Background()); err == nil {
		t.Fatal("flush succeeded against a failing store")
	}
	if got := counterValue(e.repo.metrics.accessFlushErrors); got != 1 {
		t.Fatalf("access_flush_errors_total = %v, want 1", got)
	}
	admin.mu.Lock()
	admin.failAccess = nil
	admin.mu.Unlock()
	if err := e.repo.FlushAccess(context.Background()); err != nil {
		t.Fatal(err)
	}
	media, _ := admin.batches()
	if len(media) != 2 || len(media[1]) != 1 || media[1][0].MediaID != id {
		t.Fatalf("batches %v, want the failed one written again", media)
	}
	if m, err := e.sql.GetMedia(context.Background(), testServer, id); err != nil || !m.LastAccessAt.Equal(e.clock.Now()) {
		t.Fatalf("stored last access %v, %v", m.LastAccessAt, err)
	}
}
