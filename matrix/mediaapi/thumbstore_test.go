package mediaapi

import (
	"bytes"
	"context"
	"errors"
	"net/http/httptest"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// thumbPath is the client thumbnail path of id with the query q.
func thumbPath(id, q string) string { return "/_matrix/client/v1/media/thumbnail/test/" + id + "?" + q }

// holdStores makes the repository's background thumbnail stores wait until
// the returned function is called; started receives one value per store
// that began.
func holdStores(e *env) (started chan struct{}, release func()) {
	started = make(chan struct{}, 16)
	gate := make(chan struct{})
	e.repo.hooks.thumbnailStoring = func() {
		started <- struct{}{}
		<-gate
	}
	var once sync.Once
	return started, func() { once.Do(func() { close(gate) }) }
}

// waitStarted waits for a background store to begin.
func waitStarted(t *testing.T, started chan struct{}) {
	t.Helper()
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("no background thumbnail store began within 30s")
	}
}

// storedThumbnail returns the recorded row of the 320x240 scale thumbnail of
// id, and whether its blob is in the thumbnail datastore.
func storedThumbnail(t *testing.T, e *env, id string) (storage.Thumbnail, error, bool) {
	t.Helper()
	th, err := e.sql.GetThumbnail(context.Background(), storage.ThumbnailKey{ServerName: testServer, MediaID: id,
		Width: 320, Height: 240, Method: "scale"})
	if err != nil {
		return th, err, false
	}
	_, store := e.repo.stores.ForKind(storage.KindThumbnails)
	_, serr := store.Stat(context.Background(), th.SHA256)
	return th, nil, serr == nil
}

// A cold thumbnail is answered before it is stored; requests meanwhile get
// the same bytes without generating again; once stored, the row and the blob
// hold exactly the bytes that were answered.
func TestThumbnailAnsweredBeforeStored(t *testing.T) {
	e, ct := thumbEnv(t, ThumbnailPolicy{})
	id := e.upload("alice", testJPEG(t, 1200, 900), "image/jpeg", "")
	started, release := holdStores(e)
	defer release()

	first := e.do(req{method: "GET", path: thumbPath(id, "width=320&height=240"), token: "alice"})
	if first.Code != 200 || first.Header().Get("Content-Type") != "image/jpeg" {
		t.Fatalf("cold thumbnail: %d %s", first.Code, first.Body)
	}
	if w, h, format := decodedSize(t, first); w != 320 || h != 240 || format != "jpeg" {
		t.Fatalf("cold thumbnail is %dx%d %s", w, h, format)
	}
	waitStarted(t, started) // the store began and is held: the answer did not wait for it
	if _, err, _ := storedThumbnail(t, e, id); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("thumbnail recorded while its store is held: %v", err)
	}
	body := first.Body.Bytes()
	if got, want := first.Header().Get("Etag"), `"`+hashOf(body)+`"`; got != want {
		t.Fatalf("ETag %s, want %s", got, want)
	}
	if first.Header().Get("Content-Length") != "" && first.Header().Get("Content-Length") != strconv.Itoa(len(body)) {
		t.Fatalf("Content-Length %s for %d bytes", first.Header().Get("Content-Length"), len(body))
	}

	tests := []struct {
		name, method, query string
		wantBody            bool
	}{
		{"same size", "GET", "width=320&height=240", true},
		{"normalised to the same size", "GET", "width=300&height=200", true},
		{"HEAD", "HEAD", "width=320&height=240", false},
	}
	for _, tc := range tests {
		t.Run("pending "+tc.name, func(t *testing.T) {
			rec := e.do(req{method: tc.method, path: thumbPath(id, tc.query), token: "alice"})
			if rec.Code != 200 || rec.Header().Get("Etag") != first.Header().Get("Etag") {
				t.Fatalf("%d, ETag %q", rec.Code, rec.Header().Get("Etag"))
			}
			if tc.wantBody && !bytes.Equal(rec.Body.Bytes(), body) {
				t.Fatal("different bytes while pending")
			}
			if !tc.wantBody && rec.Body.Len() != 0 {
				t.Fatalf("HEAD has a %d-byte body", rec.Body.Len())
			}
		})
	}
	if n := ct.calls.Load(); n != 1 {
		t.Fatalf("%d generations while pending, want 1", n)
	}
	if n, b := e.repo.thumbPending.size(); n != 1 || b != int64(len(body)) {
		t.Fatalf("pending %d thumbnails, %d bytes; want 1, %d", n, b, len(body))
	}

	release()
	waitThumbnailsStored(t, e.repo)
	th, err, blob := storedThumbnail(t, e, id)
	if err != nil || th.SHA256 != hashOf(body) || th.Size != int64(len(body)) || th.ContentType != "image/jpeg" ||
		th.ActualWidth != 320 || th.ActualHeight != 240 || !blob {
		t.Fatalf("stored %+v, %v, blob %v; want the answered %d bytes", th, err, blob, len(body))
	}
	if n, b := e.repo.thumbPending.size(); n != 0 || b != 0 {
		t.Fatalf("after storing: %d pending, %d bytes", n, b)
	}
	// Served from the store now, still the same bytes, no new generation.
	e.repo.thumbCache.removeIf(func(mediaKey, *mediaEntry) bool { return true })
	if rec := e.do(req{method: "GET", path: thumbPath(id, "width=320&height=240"), token: "alice"}); rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), body) {
		t.Fatalf("stored thumbnail: %d, same bytes %v", rec.Code, bytes.Equal(rec.Body.Bytes(), body))
	}
	if n := ct.calls.Load(); n != 1 {
		t.Fatalf("%d generations, want 1", n)
	}
}

// With the backlog full, a thumbnail is stored before it is answered, so the
// bytes held in memory never exceed the limit.
func TestThumbnailStoreBacklogBounded(t *testing.T) {
	e, _ := thumbEnv(t, ThumbnailPolicy{})
	ids := []string{
		e.upload("alice", testJPEG(t, 1200, 900), "image/jpeg", ""),
		e.upload("alice", testJPEG(t, 1000, 750), "image/jpeg", ""),
		e.upload("alice", testJPEG(t, 800, 600), "image/jpeg", ""),
	}
	started, release := holdStores(e)
	defer release()
	// Room for the first thumbnail only (each is about 3.2 KB).
	const limit = 5000
	e.repo.thumbPending.limit = limit
	tests := []struct {
		name         string
		id           string
		wantRecorded bool
	}{
		{"first fits and is answered before stored", ids[0], false},
		{"second is stored first", ids[1], true},
		{"third is stored first", ids[2], true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := e.do(req{method: "GET", path: thumbPath(tc.id, "width=320&height=240"), token: "alice"})
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			th, err, blob := storedThumbnail(t, e, tc.id)
			if recorded := err == nil && blob && th.SHA256 == hashOf(rec.Body.Bytes()); recorded != tc.wantRecorded {
				t.Fatalf("recorded when answered: %v (%+v, %v, blob %v), want %v", recorded, th, err, blob, tc.wantRecorded)
			}
			if _, b := e.repo.thumbPending.size(); b > limit {
				t.Fatalf("%d bytes pending, limit %d", b, limit)
			}
		})
	}
	waitStarted(t, started)
	if len(started) != 0 {
		t.Fatalf("%d more background stores, want 1", len(started))
	}
	release()
	waitThumbnailsStored(t, e.repo)
	if _, err, blob := storedThumbnail(t, e, ids[0]); err != nil || !blob {
		t.Fatalf("first thumbnail not stored: %v, blob %v", err, blob)
	}
}

// A request that found no thumbnail and starts its generation after another
// request's generation ended uses that thumbnail instead of generating
// again, whether it is still being stored or already stored.
func TestThumbnailLateRequestGeneratesOnce(t *testing.T) {
	for _, stored := range []bool{false, true} {
		name := map[bool]string{false: "while storing", true: "after storing"}[stored]
		t.Run(name, func(t *testing.T) {
			e, ct := thumbEnv(t, ThumbnailPolicy{})
			id := e.upload("alice", testJPEG(t, 1200, 900), "image/jpeg", "")
			_, release := holdStores(e)
			defer release()
			missed, goOn := make(chan struct{}), make(chan struct{})
			var first atomic.Bool
			e.repo.hooks.thumbnailMissed = func() {
				if first.CompareAndSwap(false, true) { // holds the first request only
					close(missed)
					<-goOn
				}
			}
			late := make(chan *httptest.ResponseRecorder)
			go func() { late <- e.do(req{method: "GET", path: thumbPath(id, "width=320&height=240"), token: "alice"}) }()
			<-missed
			rec := e.do(req{method: "GET", path: thumbPath(id, "width=320&height=240"), token: "alice"})
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			if stored {
				release()
				waitThumbnailsStored(t, e.repo)
			}
			close(goOn)
			lrec := <-late
			if lrec.Code != 200 || !bytes.Equal(lrec.Body.Bytes(), rec.Body.Bytes()) {
				t.Fatalf("late request: %d, same bytes %v", lrec.Code, bytes.Equal(lrec.Body.Bytes(), rec.Body.Bytes()))
			}
			if n := ct.calls.Load(); n != 1 {
				t.Fatalf("%d generations, want 1", n)
			}
		})
	}
}

// Drain waits for thumbnails still being stored; after it, a thumbnail is
// stored before it is answered.
func TestDrainWaitsForThumbnailStores(t *testing.T) {
	e, _ := thumbEnv(t, ThumbnailPolicy{})
	id := e.upload("alice", testJPEG(t, 1200, 900), "image/jpeg", "")
	id2 := e.upload("alice", testJPEG(t, 1000, 750), "image/jpeg", "")
	started, release := holdStores(e)
	defer release()
	if rec := e.do(req{method: "GET", path: thumbPath(id, "width=320&height=240"), token: "alice"}); rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	waitStarted(t, started)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := e.repo.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain with a held store: %v, want DeadlineExceeded", err)
	}
	release()
	if err := e.repo.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err, blob := storedThumbnail(t, e, id); err != nil || !blob {
		t.Fatalf("thumbnail not stored when Drain returned: %v, blob %v", err, blob)
	}
	// Draining: no background store, the answer comes after storing.
	if rec := e.do(req{method: "GET", path: thumbPath(id2, "width=320&height=240"), token: "alice"}); rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if _, err, blob := storedThumbnail(t, e, id2); err != nil || !blob {
		t.Fatalf("thumbnail answered while draining is not stored: %v, blob %v", err, blob)
	}
}

// A failed background store leaves nothing pending and nothing recorded: the
// next request generates the thumbnail again.
func TestThumbnailStoreFailureRegenerates(t *testing.T) {
	e, ct := thumbEnv(t, ThumbnailPolicy{})
	id := e.upload("alice", testJPEG(t, 1200, 900), "image/jpeg", "")
	e.repo.hooks.thumbnailStoring = func() { e.meta.failThumbnails.Store(true) }
	rec := e.do(req{method: "GET", path: thumbPath(id, "width=320&height=240"), token: "alice"})
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	waitThumbnailsStored(t, e.repo)
	if _, err, _ := storedThumbnail(t, e, id); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("after a failed store: %v, want not recorded", err)
	}
	e.repo.hooks.thumbnailStoring = nil
	e.meta.failThumbnails.Store(false)
	rec = e.do(req{method: "GET", path: thumbPath(id, "width=320&height=240"), token: "alice"})
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	if n := ct.calls.Load(); n != 2 {
		t.Fatalf("%d generations, want 2", n)
	}
	waitThumbnailsStored(t, e.repo)
	if _, err, blob := storedThumbnail(t, e, id); err != nil || !blob {
		t.Fatalf("second generation not stored: %v, blob %v", err, blob)
	}
}
