package mediaapi

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeRemote serves remote media from a map, counting fetches.
type fakeRemote struct {
	mu    sync.Mutex
	media map[string][]byte // "server/id" -> bytes
	err   error
	calls atomic.Int64
	gate  chan struct{}
}

func (f *fakeRemote) Download(_ context.Context, server, id string, _ time.Duration) (RemoteMedia, error) {
	f.calls.Add(1)
	if f.gate != nil {
		<-f.gate
	}
	if f.err != nil {
		return RemoteMedia{}, f.err
	}
	f.mu.Lock()
	b, ok := f.media[server+"/"+id]
	f.mu.Unlock()
	if !ok {
		return RemoteMedia{}, fmt.Errorf("remote said 404: %w", ErrRemoteNotFound)
	}
	return RemoteMedia{ContentType: "image/jpeg", ContentDisposition: `inline; filename="remote.jpg"`, Size: int64(len(b)),
		Body: io.NopCloser(bytes.NewReader(b))}, nil
}

func remoteEnv(t *testing.T) (*env, *fakeRemote) {
	t.Helper()
	fr := &fakeRemote{media: map[string][]byte{}}
	g, err := newTestGenerator()
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(c *SiteConfig, o *RepositoryOptions) {
		c.Remote = fr
		o.Thumbnailer = g
		o.MaxRemoteSize = 1 << 20
	})
	return e, fr
}

func TestRemoteDownloadCachedOnce(t *testing.T) {
	e, fr := remoteEnv(t)
	photo := testJPEG(t, 640, 480)
	fr.media["other.test/abc"] = photo
	fr.gate = make(chan struct{})
	const n = 20
	var wg sync.WaitGroup
	codes := make([]int, n)
	bodies := make([][]byte, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/other.test/abc", token: "alice"})
			codes[i], bodies[i] = rec.Code, rec.Body.Bytes()
		}()
	}
	for fr.calls.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	close(fr.gate)
	wg.Wait()
	for i := range codes {
		if codes[i] != 200 || !bytes.Equal(bodies[i], photo) {
			t.Fatalf("request %d: %d, %d bytes", i, codes[i], len(bodies[i]))
		}
	}
	if c := fr.calls.Load(); c != 1 {
		t.Fatalf("%d fetches for %d concurrent first requests, want 1", c, n)
	}
	// Later requests, the legacy endpoint and a thumbnail need no fetch.
	rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/other.test/abc"})
	if rec.Code != 200 || rec.Header().Get("Content-Disposition") != "inline; filename=remote.jpg" {
		t.Fatalf("legacy: %d %q", rec.Code, rec.Header().Get("Content-Disposition"))
	}
	rec = e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/other.test/abc?width=96&height=96&method=crop", token: "alice"})
	if w, h, _ := decodedSize(t, rec); rec.Code != 200 || w != 96 || h != 96 {
		t.Fatalf("remote thumbnail: %d %dx%d", rec.Code, w, h)
	}
	if c := fr.calls.Load(); c != 1 {
		t.Fatalf("%d fetches, want still 1", c)
	}
	m, err := e.meta.GetMedia(context.Background(), "other.test", "abc")
	if err != nil || !m.Remote || m.Filename != "remote.jpg" || m.ContentType != "image/jpeg" || m.UserID != "" {
		t.Fatalf("remote row %+v %v", m, err)
	}
	// The same bytes uploaded locally share the blob.
	e.upload("alice", photo, "image/jpeg", "")
	refs, err := e.meta.CountBlobReferences(context.Background(), m.SHA256)
	if err != nil || refs != 2 {
		t.Fatalf("references to the shared blob: %d %v, want 2 (remote + local media)", refs, err)
	}
}

func TestRemoteErrors(t *testing.T) {
	e, fr := remoteEnv(t)
	fr.media["other.test/big"] = bytes.Repeat([]byte("x"), 2<<20)
	tests := []struct {
		name, path string
		err        error
		status     int
		code       string
	}{
		{"not found", "/_matrix/client/v1/media/download/other.test/nope", nil, 404, "M_NOT_FOUND"},
		{"too large", "/_matrix/client/v1/media/download/other.test/big", nil, 502, "M_TOO_LARGE"},
		{"unavailable", "/_matrix/client/v1/media/download/other.test/x", fmt.Errorf("dial: %w", ErrRemoteUnavailable), 502, "M_UNKNOWN"},
		{"not yet uploaded", "/_matrix/client/v1/media/download/other.test/x", fmt.Errorf("504: %w", ErrRemoteNotYetUploaded), 504, "M_NOT_YET_UPLOADED"},
		{"legacy allow_remote=false", "/_matrix/media/v3/download/other.test/x?allow_remote=false", nil, 404, "M_NOT_FOUND"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fr.err = tc.err
			before := fr.calls.Load()
			expectError(t, e.do(req{method: "GET", path: tc.path, token: "alice"}), tc.status, tc.code)
			if tc.name == "legacy allow_remote=false" && fr.calls.Load() != before {
				t.Fatal("allow_remote=false fetched")
			}
		})
	}
	// Nothing was recorded for failed fetches.
	if _, err := e.meta.GetMedia(context.Background(), "other.test", "big"); err == nil {
		t.Fatal("a too-large remote media was recorded")
	}
}

func TestRemoteFirstDownloadStreams(t *testing.T) {
	e, fr := remoteEnv(t)
	body := bytes.Repeat([]byte("streamed "), 50000)
	fr.media["other.test/s"] = body
	// The first request streams; a concurrent one waits for the stored copy.
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/other.test/s", token: "alice"})
	if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), body) || rec.Header().Get("Content-Length") != fmt.Sprint(len(body)) ||
		rec.Header().Get("Content-Disposition") != "inline; filename=remote.jpg" || rec.Header().Get("Content-Security-Policy") == "" {
		t.Fatalf("streamed: %d, %d bytes, headers %v", rec.Code, rec.Body.Len(), rec.Header())
	}
	// The store finishes on its own after the response (flush, row).
	waitFor(t, func() bool {
		m, err := e.meta.GetMedia(context.Background(), "other.test", "s")
		return err == nil && m.Size == int64(len(body))
	})
	// Served from the cache now, with an ETag.
	rec = e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/other.test/s", token: "alice"})
	if rec.Code != 200 || rec.Header().Get("Etag") == "" || fr.calls.Load() != 1 {
		t.Fatalf("cached: %d etag %q, %d fetches", rec.Code, rec.Header().Get("Etag"), fr.calls.Load())
	}
}

// unsizedRemote serves a body of unknown length.
type unsizedRemote struct{ body []byte }

func (u unsizedRemote) Download(context.Context, string, string, time.Duration) (RemoteMedia, error) {
	return RemoteMedia{ContentType: "application/octet-stream", Size: -1, Body: io.NopCloser(bytes.NewReader(u.body))}, nil
}

func TestRemoteStreamTooLargeCutsTheConnection(t *testing.T) {
	e := newEnv(t, func(c *SiteConfig, o *RepositoryOptions) {
		c.Remote = unsizedRemote{body: bytes.Repeat([]byte("x"), 3<<20)}
		o.MaxRemoteSize = 1 << 20
	})
	defer func() {
		if v := recover(); v != http.ErrAbortHandler {
			t.Fatalf("recovered %v, want http.ErrAbortHandler (the response must be cut, not completed)", v)
		}
		if _, err := e.meta.GetMedia(context.Background(), "other.test", "big"); err == nil {
			t.Fatal("a too-large remote media was recorded")
		}
	}()
	e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/other.test/big", token: "alice"})
	t.Fatal("the handler returned normally")
}

// thumbRemote is a fakeRemote that also makes thumbnails.
type thumbRemote struct {
	*fakeRemote
	thumb      []byte
	thumbErr   error
	thumbCalls atomic.Int64
	lastParams string
}

func (t *thumbRemote) Thumbnail(_ context.Context, server, id string, w, h int, method string, animated bool, _ time.Duration) (RemoteMedia, error) {
	t.thumbCalls.Add(1)
	t.lastParams = fmt.Sprintf("%s/%s %dx%d %s %v", server, id, w, h, method, animated)
	if t.thumbErr != nil {
		return RemoteMedia{}, t.thumbErr
	}
	return RemoteMedia{ContentType: "image/jpeg", Size: int64(len(t.thumb)), Body: io.NopCloser(bytes.NewReader(t.thumb))}, nil
}

func TestRemoteThumbnailsFetchedFromTheRemote(t *testing.T) {
	tr := &thumbRemote{fakeRemote: &fakeRemote{media: map[string][]byte{}}, thumb: testJPEG(t, 96, 96)}
	tr.media["other.test/pic"] = testJPEG(t, 800, 600)
	g, err := newTestGenerator()
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(c *SiteConfig, o *RepositoryOptions) {
		c.Remote = tr
		o.Thumbnailer = g
		o.Thumbnails = ThumbnailPolicy{FetchRemote: true}
	})
	path := "/_matrix/client/v1/media/thumbnail/other.test/pic?width=90&height=90&method=crop"
	for i := 0; i < 2; i++ {
		rec := e.do(req{method: "GET", path: path, token: "alice"})
		if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), tr.thumb) || rec.Header().Get("Content-Type") != "image/jpeg" {
			t.Fatalf("request %d: %d, %d bytes", i, rec.Code, rec.Body.Len())
		}
	}
	if tr.thumbCalls.Load() != 1 || tr.calls.Load() != 0 || tr.lastParams != "other.test/pic 96x96 crop false" {
		t.Fatalf("%d thumbnail fetches (%s), %d original fetches; want 1 (normalised to 96x96 crop) and 0", tr.thumbCalls.Load(), tr.lastParams, tr.calls.Load())
	}
	// The internal cache row cannot be named by a request.
	expectError(t, e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/other.test/pic~96x96~crop~s", token: "alice"}), 400, "M_INVALID_PARAM")

	// A remote that cannot thumbnail: the original is fetched and thumbnailed here.
	tr.thumbErr = fmt.Errorf("400: %w", ErrRemoteUnavailable)
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/other.test/pic?width=320&height=240", token: "alice"})
	if w, h, _ := decodedSize(t, rec); rec.Code != 200 || w != 320 || h != 240 || tr.calls.Load() != 1 {
		t.Fatalf("fallback: %d %dx%d, %d original fetches", rec.Code, w, h, tr.calls.Load())
	}
}
