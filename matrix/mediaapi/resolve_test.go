package mediaapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// TestSiblingSites: media of every site of a repository is local to all of
// them, served from the shared store under the requesting site's rules.
func TestSiblingSites(t *testing.T) {
	e, fr := remoteEnv(t)
	photo := testJPEG(t, 640, 480)
	id := e.upload("alice", photo, "image/jpeg", "")
	// Site b.test shares the repository; its remote fetcher must never be
	// asked for media of site "test".
	b, err := NewSite(SiteConfig{ServerName: "b.test", Remote: fr, FreezeLegacy: true}, e.repo, e.site.auth)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, tc := range []struct {
		name, path, token string
		status            int
	}{
		{"authenticated download", "/_matrix/client/v1/media/download/test/" + id, "alice", 200},
		{"authenticated download, file name", "/_matrix/client/v1/media/download/test/" + id + "/x.jpg", "alice", 200},
		{"authenticated thumbnail", "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=96&height=96&method=crop", "alice", 200},
		{"no token", "/_matrix/client/v1/media/download/test/" + id, "", 401},
		// b.test freezes its legacy endpoints: its rules apply, not test's.
		{"legacy download frozen by b", "/_matrix/media/v3/download/test/" + id, "", 404},
		{"legacy thumbnail frozen by b", "/_matrix/media/v3/thumbnail/test/" + id + "?width=96&height=96", "", 404},
		{"unknown sibling media", "/_matrix/client/v1/media/download/test/nope", "alice", 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := serve(b, req{method: "GET", path: tc.path, token: tc.token})
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d: %.200s", rec.Code, tc.status, rec.Body.String())
			}
			if tc.status == 200 && strings.Contains(tc.path, "/download/") && !bytes.Equal(rec.Body.Bytes(), photo) {
				t.Fatalf("body differs (%d bytes)", rec.Body.Len())
			}
			if tc.status == 200 && strings.Contains(tc.path, "/thumbnail/") {
				if w, h, _ := decodedSize(t, rec); w != 96 || h != 96 {
					t.Fatalf("thumbnail %dx%d", w, h)
				}
			}
		})
	}
	// Site test (no freeze) serves its legacy endpoint.
	if rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id}); rec.Code != 200 {
		t.Fatalf("own legacy download: %d", rec.Code)
	}
	if n := fr.calls.Load(); n != 0 {
		t.Fatalf("%d remote fetches for sibling media, want 0", n)
	}
	// Federation serves only the site's own media: b.test has no
	// federation here, and test's media is not b's.
	if _, err := e.meta.GetMedia(context.Background(), "b.test", id); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("a row was recorded under b.test: %v", err)
	}
}

// TestSiteCloseUnregisters: a site's server name is local while a site
// holds it (a reload registers it twice for a while), and remote after.
func TestSiteCloseUnregisters(t *testing.T) {
	e := newEnv(t)
	if !e.repo.IsLocal(testServer) || e.repo.IsLocal("c.test") {
		t.Fatal("wrong local names after NewSite")
	}
	old, err := NewSite(SiteConfig{ServerName: "c.test"}, e.repo, e.site.auth)
	if err != nil {
		t.Fatal(err)
	}
	reloaded, err := NewSite(SiteConfig{ServerName: "c.test"}, e.repo, e.site.auth)
	if err != nil {
		t.Fatal(err)
	}
	old.Close()
	old.Close() // idempotent
	if !e.repo.IsLocal("c.test") {
		t.Fatal("c.test stopped being local while the reloaded site holds it")
	}
	reloaded.Close()
	if e.repo.IsLocal("c.test") {
		t.Fatal("c.test is still local after its last site closed")
	}
	// Its media is remote now: site test has no fetcher, so 404.
	expectError(t, e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/c.test/abc", token: "alice"}), 404, "M_NOT_FOUND")
}

// TestPreviewCacheIsPerSite: a site never gets a cached preview whose
// og:image is another site's media.
func TestPreviewCacheIsPerSite(t *testing.T) {
	srv, hits := previewSite(t)
	e := previewEnv(t, true)
	b, err := NewSite(SiteConfig{ServerName: "b.test", Previews: e.site.cfg.Previews}, e.repo, e.site.auth)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	path := "/_matrix/client/v1/media/preview_url?url=" + url.QueryEscape(srv.URL+"/test.html")
	image := func(h http.Handler, server string) string {
		t.Helper()
		rec := serve(h, req{method: "GET", path: path, token: "alice"})
		var got map[string]any
		if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &got) != nil {
			t.Fatalf("%s: %d %.200s", server, rec.Code, rec.Body.String())
		}
		mxc, _ := got["og:image"].(string)
		if !strings.HasPrefix(mxc, "mxc://"+server+"/") {
			t.Fatalf("preview for %s has og:image %q", server, mxc)
		}
		return mxc
	}
	image(e.site, testServer)
	mxc := image(b, "b.test")
	image(e.site, testServer) // cached
	if n := hits.Load(); n != 2 {
		t.Fatalf("page fetched %d times, want 2 (once per site)", n)
	}
	dl := serve(b, req{method: "GET", path: "/_matrix/client/v1/media/download/" + strings.TrimPrefix(mxc, "mxc://"), token: "alice"})
	if dl.Code != 200 || dl.Header().Get("Content-Type") != "image/png" {
		t.Fatalf("b's preview image: %d", dl.Code)
	}
}

// blockingRemote blocks every Download until release is closed, counting
// calls in flight per server.
type blockingRemote struct {
	release  chan struct{}
	mu       sync.Mutex
	inFlight map[string]int
	maxTotal int
	maxPer   int
	total    int
	started  atomic.Int64
}

func (b *blockingRemote) Download(ctx context.Context, server, id string, _ time.Duration) (RemoteMedia, error) {
	b.mu.Lock()
	b.inFlight[server]++
	b.total++
	b.maxTotal = max(b.maxTotal, b.total)
	b.maxPer = max(b.maxPer, b.inFlight[server])
	b.mu.Unlock()
	b.started.Add(1)
	<-b.release
	b.mu.Lock()
	b.inFlight[server]--
	b.total--
	b.mu.Unlock()
	body := []byte("media " + server + "/" + id)
	return RemoteMedia{ContentType: "text/plain", Size: int64(len(body)), Body: io.NopCloser(bytes.NewReader(body))}, nil
}

// TestRemoteFetchAdmission: a burst of 500 distinct unauthenticated legacy
// remote requests starts at most the bounded number of fetches (and of
// fetch goroutines); the rest get 429 M_LIMIT_EXCEEDED with Retry-After at
// once.
func TestRemoteFetchAdmission(t *testing.T) {
	br := &blockingRemote{release: make(chan struct{}), inFlight: map[string]int{}}
	e := newEnv(t, func(c *SiteConfig, o *RepositoryOptions) {
		c.Remote = br
		o.MaxRemoteFetches = 6
		o.MaxRemoteFetchesPerServer = 4
	})
	const n = 500
	baseGoroutines := runtime.NumGoroutine()
	var rejected atomic.Int64
	var wg sync.WaitGroup
	codes := make([]int, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			server := "a.remote"
			if i%2 == 1 {
				server = "b.remote"
			}
			rec := e.do(req{method: "GET", path: fmt.Sprintf("/_matrix/media/v3/download/%s/m%d", server, i)})
			codes[i] = rec.Code
			if rec.Code == http.StatusTooManyRequests {
				var body struct {
					ErrCode      string `json:"errcode"`
					RetryAfterMS int64  `json:"retry_after_ms"`
				}
				if json.Unmarshal(rec.Body.Bytes(), &body) != nil || body.ErrCode != "M_LIMIT_EXCEEDED" || body.RetryAfterMS != 1000 ||
					rec.Header().Get("Retry-After") != "1" {
					t.Errorf("429 answer: %s, Retry-After %q", rec.Body, rec.Header().Get("Retry-After"))
				}
				rejected.Add(1)
			}
		}()
	}
	// Every request is either refused or waiting on a started fetch.
	waitFor(t, func() bool { return rejected.Load()+br.started.Load() == n })
	started := br.started.Load()
	if started != 6 {
		t.Fatalf("%d fetches started, want 6 (the total bound)", started)
	}
	br.mu.Lock()
	maxTotal, maxPer := br.maxTotal, br.maxPer
	br.mu.Unlock()
	if maxTotal > 6 || maxPer > 4 {
		t.Fatalf("fetches in flight: %d in total, %d from one server; bounds 6 and 4", maxTotal, maxPer)
	}
	if g := gaugeValue(e.repo.metrics.remoteRunning); g != 6 {
		t.Fatalf("remote_fetches_in_flight = %v, want 6", g)
	}
	// Goroutines left: the waiting requests and their fetches (6 each), not
	// one per request.
	if extra := runtime.NumGoroutine() - baseGoroutines; extra > 2*6+20 {
		t.Fatalf("%d goroutines more than before the burst", extra)
	}
	total := counterValue(e.repo.metrics.admission.WithLabelValues("remote_total")) +
		counterValue(e.repo.metrics.admission.WithLabelValues("remote_server"))
	if total != float64(n-6) {
		t.Fatalf("admission rejections counted %v, want %d", total, n-6)
	}
	close(br.release)
	wg.Wait()
	ok := 0
	for _, c := range codes {
		if c == 200 {
			ok++
		}
	}
	if ok != 6 {
		t.Fatalf("%d requests served, want 6", ok)
	}
	if g := gaugeValue(e.repo.metrics.remoteRunning); g != 0 {
		t.Fatalf("remote_fetches_in_flight = %v after the burst, want 0", g)
	}
}

// TestFreezeBeforeFetch: a legacy request the freeze refuses fetches and
// stores nothing.
func TestFreezeBeforeFetch(t *testing.T) {
	fr := &fakeRemote{media: map[string][]byte{"other.test/abc": []byte("remote bytes")}}
	g, err := newTestGenerator()
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, func(c *SiteConfig, o *RepositoryOptions) {
		c.Remote = fr
		c.FreezeLegacy = true
		o.Thumbnailer = g
	})
	for _, path := range []string{
		"/_matrix/media/v3/download/other.test/abc",
		"/_matrix/media/v3/thumbnail/other.test/abc?width=32&height=32",
	} {
		expectError(t, e.do(req{method: "GET", path: path}), 404, "M_NOT_FOUND")
	}
	if n := fr.calls.Load(); n != 0 {
		t.Fatalf("%d fetches for frozen legacy requests, want 0", n)
	}
	if _, err := e.meta.GetMedia(context.Background(), "other.test", "abc"); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("frozen request recorded a row: %v", err)
	}
	// An authenticated request fetches it.
	if rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/other.test/abc", token: "alice"}); rec.Code != 200 {
		t.Fatalf("authenticated: %d", rec.Code)
	}
}

// TestFreezeSinceLetsOlderRemoteThrough: with a cut-off in the future, new
// remote media is not frozen yet.
func TestFreezeSinceLetsOlderRemoteThrough(t *testing.T) {
	fr := &fakeRemote{media: map[string][]byte{"other.test/abc": []byte("remote bytes")}}
	e := newEnv(t, func(c *SiteConfig, o *RepositoryOptions) {
		c.Remote = fr
		c.FreezeLegacy = true
		c.FreezeSince = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	})
	if rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/other.test/abc"}); rec.Code != 200 || fr.calls.Load() != 1 {
		t.Fatalf("legacy before the cut-off: %d, %d fetches", rec.Code, fr.calls.Load())
	}
}

// TestRemoteCoalescingWindows: requests arriving while the first fetch is
// being recorded, or whose lookup missed just before the fetch ended, make
// no second fetch.
func TestRemoteCoalescingWindows(t *testing.T) {
	e, fr := remoteEnv(t)
	body := bytes.Repeat([]byte("window "), 1000)
	fr.media["other.test/w"] = body
	recordGate := make(chan struct{})
	atRecord := make(chan struct{}, 1)
	e.repo.hooks.beforeRecord = func(string, string) {
		atRecord <- struct{}{}
		<-recordGate
	}
	var misses atomic.Int64
	missGate := make(chan struct{})
	atMiss := make(chan struct{}, 1)
	e.repo.hooks.missed = func(string) {
		if misses.Add(1) == 2 {
			atMiss <- struct{}{}
			<-missGate
		}
	}
	path := "/_matrix/client/v1/media/download/other.test/w"
	// The first request streams the body; the store then stops before
	// recording the row (the response ends once it is recorded, when the
	// store can quarantine, so it runs on its own goroutine).
	first := make(chan *httptest.ResponseRecorder, 1)
	go func() { first <- e.do(req{method: "GET", path: path, token: "alice"}) }()
	<-atRecord
	// Second request: its lookup misses (no row yet) ...
	second := make(chan *int, 1)
	go func() {
		rec := e.do(req{method: "GET", path: path, token: "alice"})
		code := rec.Code
		if !bytes.Equal(rec.Body.Bytes(), body) {
			code = -1
		}
		second <- &code
	}()
	<-atMiss
	// ... then the first fetch records its row and ends ...
	close(recordGate)
	waitFor(t, func() bool { return gaugeValue(e.repo.metrics.remoteRunning) == 0 })
	// ... and only then does the second request look for a flight.
	close(missGate)
	if code := <-second; *code != 200 {
		t.Fatalf("second: %d", *code)
	}
	if rec := <-first; rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), body) {
		t.Fatalf("first: %d, %d bytes", rec.Code, rec.Body.Len())
	}
	// Third request arriving while a recording is in progress joins it.
	fr.media["other.test/w2"] = body
	recordGate2 := make(chan struct{})
	e.repo.hooks.missed = nil
	e.repo.hooks.beforeRecord = func(string, string) {
		atRecord <- struct{}{}
		<-recordGate2
	}
	joined := make(chan bool, 4)
	e.repo.hooks.joined = func(_ string, leader bool) { joined <- leader }
	path2 := "/_matrix/client/v1/media/download/other.test/w2"
	go func() { first <- e.do(req{method: "GET", path: path2, token: "alice"}) }()
	<-joined // the first request led
	<-atRecord
	go func() {
		rec := e.do(req{method: "GET", path: path2, token: "alice"})
		code := rec.Code
		second <- &code
	}()
	if leader := <-joined; leader {
		t.Fatal("a request during the recording led a new fetch")
	}
	close(recordGate2)
	if code := <-second; *code != 200 {
		t.Fatalf("request during the recording: %d", *code)
	}
	if rec := <-first; rec.Code != 200 {
		t.Fatalf("first of w2: %d", rec.Code)
	}
	if n := fr.calls.Load(); n != 2 {
		t.Fatalf("%d fetches for two items, want 2", n)
	}
}

// TestRemoteContentTypeChecked: a remote Content-Type that an upload could
// not have is stored and served as application/octet-stream.
func TestRemoteContentTypeChecked(t *testing.T) {
	for _, ct := range []string{"text/html\r\nX-Evil: 1", strings.Repeat("a", 300), "image/png\x7f"} {
		rm := &typedRemote{ct: ct, body: []byte("bytes")}
		e := newEnv(t, func(c *SiteConfig, _ *RepositoryOptions) { c.Remote = rm })
		for _, path := range []string{"/_matrix/client/v1/media/download/other.test/t", "/_matrix/media/v3/download/other.test/t"} {
			rec := e.do(req{method: "GET", path: path, token: "alice"})
			if rec.Code != 200 || rec.Header().Get("Content-Type") != "application/octet-stream" ||
				!strings.HasPrefix(rec.Header().Get("Content-Disposition"), "attachment") {
				t.Fatalf("%q %s: %d %q %q", ct, path, rec.Code, rec.Header().Get("Content-Type"), rec.Header().Get("Content-Disposition"))
			}
		}
		m, err := e.meta.GetMedia(context.Background(), "other.test", "t")
		if err != nil || m.ContentType != "application/octet-stream" {
			t.Fatalf("%q: stored %q %v", ct, m.ContentType, err)
		}
	}
}

// typedRemote serves one body with a given Content-Type.
type typedRemote struct {
	ct   string
	body []byte
	size int64 // announced size; 0 means len(body)
	err  error // read error after the body, instead of EOF
	read atomic.Int64
}

func (tr *typedRemote) Download(context.Context, string, string, time.Duration) (RemoteMedia, error) {
	size := tr.size
	if size == 0 {
		size = int64(len(tr.body))
	}
	var r io.Reader = bytes.NewReader(tr.body)
	if tr.err != nil {
		r = io.MultiReader(r, errReader{tr.err})
	}
	return RemoteMedia{ContentType: tr.ct, Size: size, Body: io.NopCloser(&countingReader{r: r, n: &tr.read})}, nil
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// TestRemoteDeclaredTooLarge: an announced size over max_remote_size is
// 502 M_TOO_LARGE before any byte is read or sent.
func TestRemoteDeclaredTooLarge(t *testing.T) {
	for _, path := range []string{"/_matrix/client/v1/media/download/other.test/big", "/_matrix/media/v3/download/other.test/big",
		"/_matrix/client/v1/media/thumbnail/other.test/big?width=32&height=32"} {
		rm := &typedRemote{ct: "image/png", body: []byte("x"), size: 2 << 20}
		g, err := newTestGenerator()
		if err != nil {
			t.Fatal(err)
		}
		e := newEnv(t, func(c *SiteConfig, o *RepositoryOptions) {
			c.Remote = rm
			o.MaxRemoteSize = 1 << 20
			o.Thumbnailer = g
		})
		expectError(t, e.do(req{method: "GET", path: path, token: "alice"}), 502, "M_TOO_LARGE")
		if n := rm.read.Load(); n != 0 {
			t.Fatalf("%s: %d bytes read", path, n)
		}
	}
}

// TestRemoteTruncatedNeverSucceeds: a body shorter than announced, or
// failing midway, cuts the streamed response (or, when it ends within the
// head read before streaming to check the quarantine, is answered 502) and
// records nothing.
func TestRemoteTruncatedNeverSucceeds(t *testing.T) {
	for _, tc := range []struct {
		name string
		rm   *typedRemote
		// headOnly: the body ends within its head (the first
		// storage.PrefixSize bytes), read before the response starts when
		// the store can quarantine.
		headOnly bool
	}{
		{"short of its announced size", &typedRemote{ct: "image/png", body: bytes.Repeat([]byte("x"), 1000), size: 5000}, true},
		{"short after its head", &typedRemote{ct: "image/png", body: bytes.Repeat([]byte("x"), 100<<10), size: 200 << 10}, false},
		{"longer than announced", &typedRemote{ct: "image/png", body: bytes.Repeat([]byte("x"), 5000), size: 1000}, false},
		{"read error", &typedRemote{ct: "image/png", body: bytes.Repeat([]byte("x"), 1000), size: -1,
			err: fmt.Errorf("cut: %w", ErrRemoteUnavailable)}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(c *SiteConfig, _ *RepositoryOptions) { c.Remote = tc.rm })
			path := "/_matrix/client/v1/media/download/other.test/t"
			if tc.headOnly && e.admin != nil {
				rec := e.do(req{method: "GET", path: path, token: "alice"})
				expectError(t, rec, 502, "M_UNKNOWN")
			} else {
				func() {
					defer func() {
						if v := recover(); v != http.ErrAbortHandler {
							t.Fatalf("recovered %v, want http.ErrAbortHandler", v)
						}
					}()
					e.do(req{method: "GET", path: path, token: "alice"})
				}()
			}
			waitFor(t, func() bool { return gaugeValue(e.repo.metrics.remoteRunning) == 0 })
			if _, err := e.meta.GetMedia(context.Background(), "other.test", "t"); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("a truncated fetch was recorded: %v", err)
			}
			// Waiting (non-streamed) requests get an error, not media.
			rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/other.test/t"})
			if rec.Code != 502 {
				t.Fatalf("legacy retry: %d", rec.Code)
			}
		})
	}
}

// failingStore serves blobs whose content fails after half of it.
type failingStore struct{ storage.BlobStore }

func (f failingStore) Open(ctx context.Context, sha string) (storage.Blob, error) {
	b, err := f.BlobStore.Open(ctx, sha)
	if err != nil {
		return b, err
	}
	return storage.Blob{Content: &halfReader{ReadSeekCloser: b.Content, left: b.Size / 2}, Size: b.Size}, nil
}

type halfReader struct {
	io.ReadSeekCloser
	left int64
}

func (h *halfReader) Read(p []byte) (int, error) {
	if h.left <= 0 {
		return 0, errors.New("disk read error")
	}
	if int64(len(p)) > h.left {
		p = p[:h.left]
	}
	n, err := h.ReadSeekCloser.Read(p)
	h.left -= int64(n)
	return n, err
}

// TestDownloadCopyErrorAborts: a read error in the middle of a download cuts
// the response instead of ending it as if complete.
func TestDownloadCopyErrorAborts(t *testing.T) {
	e := newEnv(t)
	content := bytes.Repeat([]byte("abcdefgh"), 80000) // over the pipelined threshold
	for _, c := range [][]byte{content, content[:1000]} {
		id := e.upload("alice", c, "application/octet-stream", "")
		flaky := failingStore{e.blobs}
		stores, err := storage.NewDatastores(storage.Datastore{Name: DefaultDatastore, Store: flaky, Kinds: []storage.Kind{storage.KindLocal}})
		if err != nil {
			t.Fatal(err)
		}
		saved := e.repo.stores
		e.repo.stores = stores
		func() {
			defer func() {
				e.repo.stores = saved
				if v := recover(); v != http.ErrAbortHandler {
					t.Fatalf("%d bytes: recovered %v, want http.ErrAbortHandler", len(c), v)
				}
			}()
			e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"})
		}()
	}
}
