package mediaapi

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/cluster"
)

// TestAsyncUploadFlow follows Complement's TestAsyncUpload.
func TestAsyncUploadFlow(t *testing.T) {
	e := newEnv(t)
	rec := e.do(req{method: "POST", path: "/_matrix/media/v1/create", token: "alice"})
	if rec.Code != 200 {
		t.Fatalf("create: %d %s", rec.Code, rec.Body.String())
	}
	var created struct {
		ContentURI      string `json:"content_uri"`
		UnusedExpiresAt int64  `json:"unused_expires_at"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &created); err != nil {
		t.Fatal(err)
	}
	if want := e.clock.Now().Add(DefaultPendingExpiry).UnixMilli(); created.UnusedExpiresAt != want {
		t.Fatalf("unused_expires_at = %d, want %d", created.UnusedExpiresAt, want)
	}
	id := mediaIDFromURI(t, rec, testServer)
	m, err := e.sql.GetMedia(context.Background(), testServer, id)
	if err != nil || m.State != storage.StatePending || m.UserID != "@alice:test" {
		t.Fatalf("pending row %+v %v", m, err)
	}

	legacy := "/_matrix/media/v3/download/test/" + id
	rec = e.do(req{method: "GET", path: legacy + "?timeout_ms=100"})
	expectError(t, rec, 504, "M_NOT_YET_UPLOADED")
	rec = e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id + "?timeout_ms=0", token: "alice"})
	expectError(t, rec, 504, "M_NOT_YET_UPLOADED")

	png := bytes.Repeat([]byte{0x89, 'P', 'N', 'G'}, 500)
	put := "/_matrix/media/v3/upload/test/" + id + "?filename=test.png"
	rec = e.do(req{method: "PUT", path: put, token: "alice", body: png, header: map[string]string{"Content-Type": "image/png"}})
	if rec.Code != 200 || rec.Body.String() != "{}" {
		t.Fatalf("PUT: %d %s", rec.Code, rec.Body.String())
	}
	expectCORS(t, rec.Header())
	// Second PUT with an empty body (and a JSON content type, as Complement's
	// client sends): 409 before the body is considered.
	rec = e.do(req{method: "PUT", path: "/_matrix/media/v3/upload/test/" + id, token: "alice",
		header: map[string]string{"Content-Type": "application/json"}})
	expectError(t, rec, 409, "M_CANNOT_OVERWRITE_MEDIA")

	for _, p := range []string{legacy, "/_matrix/client/v1/media/download/test/" + id} {
		rec = e.do(req{method: "GET", path: p, token: "alice"})
		if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), png) || rec.Header().Get("Content-Type") != "image/png" ||
			rec.Header().Get("Content-Disposition") != "inline; filename=test.png" {
			t.Fatalf("%s: %d %q %q", p, rec.Code, rec.Header().Get("Content-Type"), rec.Header().Get("Content-Disposition"))
		}
	}
	m, err = e.sql.GetMedia(context.Background(), testServer, id)
	if err != nil || m.State != storage.StateReady || m.Size != int64(len(png)) || m.Filename != "test.png" {
		t.Fatalf("completed row %+v %v", m, err)
	}

	// The unstable MSC2246 paths work the same way.
	rec = e.do(req{method: "POST", path: "/_matrix/media/unstable/fi.mau.msc2246/create", token: "alice", body: []byte("{}")})
	if rec.Code != 200 {
		t.Fatalf("unstable create: %d", rec.Code)
	}
	id2 := mediaIDFromURI(t, rec, testServer)
	rec = e.do(req{method: "PUT", path: "/_matrix/media/unstable/fi.mau.msc2246/upload/test/" + id2, token: "alice", body: []byte("u")})
	if rec.Code != 200 {
		t.Fatalf("unstable PUT: %d %s", rec.Code, rec.Body.String())
	}
	rec = e.do(req{method: "PUT", path: "/_matrix/media/r0/upload/test/" + id2, token: "alice", body: []byte("u")})
	expectError(t, rec, 409, "M_CANNOT_OVERWRITE_MEDIA")
}

func TestWaiterWokenByPut(t *testing.T) {
	// The coordinator's fallback wake-up is off and the timeout is an
	// hour, so only the PUT's notification can deliver the content.
	e := newEnv(t, func(c *SiteConfig, o *RepositoryOptions) {
		c.MaxDownloadTimeout = time.Hour
		o.Cluster = cluster.NewLocal(-1)
	})
	id := e.create("alice")
	key := mediaKey{testServer, id}

	got := make(chan *httptest.ResponseRecorder, 1)
	go func() {
		got <- e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id + "?timeout_ms=3600000", token: "bob"})
	}()
	for e.repo.waits.waiting(key) == 0 {
		time.Sleep(time.Millisecond)
	}
	if v := gaugeValue(e.repo.metrics.waiting); v != 1 {
		t.Fatalf("waiting gauge = %v", v)
	}
	rec := e.do(req{method: "PUT", path: "/_matrix/media/v3/upload/test/" + id, token: "alice", body: []byte("late bytes"),
		header: map[string]string{"Content-Type": "text/plain"}})
	if rec.Code != 200 {
		t.Fatalf("PUT: %d %s", rec.Code, rec.Body.String())
	}
	// The PUT woke the waiter (the fallback is off, so nothing else
	// could): the download completes, and leaves no subscription behind.
	var dl *httptest.ResponseRecorder
	select {
	case dl = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting download was not woken by the PUT")
	}
	if n := e.repo.waits.waiting(key); n != 0 {
		t.Fatalf("%d subscriptions left after the download returned", n)
	}
	if dl.Code != 200 || dl.Body.String() != "late bytes" || dl.Header().Get("Content-Type") != "text/plain" {
		t.Fatalf("waiting download: %d %q", dl.Code, dl.Body.String())
	}
	if n := e.repo.waits.waiting(key); n != 0 {
		t.Fatalf("%d waiters left", n)
	}
	if v := gaugeValue(e.repo.metrics.waiting); v != 0 {
		t.Fatalf("waiting gauge = %v after the wait", v)
	}
}

// TestWaiterFindsUploadByAnotherInstance completes a pending item behind
// the repository's back, as another instance would, in two ways: with a
// notification through the shared coordinator (the waiter wakes at once,
// the fallback being off), and with the notification lost (the
// coordinator's fallback wake-up finds it).
func TestWaiterFindsUploadByAnotherInstance(t *testing.T) {
	for _, tc := range []struct {
		name     string
		fallback time.Duration
		publish  bool
	}{
		{"notified", -1, true},
		{"notification lost", 20 * time.Millisecond, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			shared := cluster.NewLocal(tc.fallback)
			e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) { o.Cluster = shared })
			waitForOtherInstance(t, e, func(id string) {
				if tc.publish {
					if err := shared.Publish(context.Background(), mediaTopic(mediaKey{testServer, id})); err != nil {
						t.Error(err)
					}
				}
			})
		})
	}
}

// waitForOtherInstance starts a waiting download of a new pending item,
// completes the item directly in the stores, calls completed and checks
// that the download answers with the content.
func waitForOtherInstance(t *testing.T, e *env, completed func(id string)) {
	id := e.create("alice")
	key := mediaKey{testServer, id}
	got := make(chan *httptest.ResponseRecorder, 1)
	go func() {
		got <- e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id + "?timeout_ms=60000"})
	}()
	for e.repo.waits.waiting(key) == 0 {
		time.Sleep(time.Millisecond)
	}
	// Complete the item directly in the stores, as another instance would:
	// no in-process notification.
	res, err := storage.IngestTo(context.Background(), e.repo.stores, e.meta, storage.KindLocal, bytes.NewReader([]byte("other instance")),
		storage.PutOptions{ExpectedSize: 14})
	if err != nil {
		t.Fatal(err)
	}
	err = e.sql.CompletePending(context.Background(), storage.Media{ServerName: testServer, MediaID: id, UserID: "@alice:test",
		SHA256: res.SHA256, Size: res.Size, ContentType: "text/plain", UploadedAt: e.clock.Now()})
	if err != nil {
		t.Fatal(err)
	}
	completed(id)
	var dl *httptest.ResponseRecorder
	select {
	case dl = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting download did not notice the upload")
	}
	if dl.Code != 200 || dl.Body.String() != "other instance" {
		t.Fatalf("download: %d %q", dl.Code, dl.Body.String())
	}
}

func TestWaiterStopsWhenClientLeaves(t *testing.T) {
	e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) { o.Cluster = cluster.NewLocal(-1) })
	id := e.create("alice")
	key := mediaKey{testServer, id}
	ctx, cancel := context.WithCancel(context.Background())
	hr := httptest.NewRequest("GET", "http://media.test/_matrix/media/v3/download/test/"+id+"?timeout_ms=60000", nil).WithContext(ctx)
	done := make(chan struct{})
	go func() {
		e.site.ServeHTTP(httptest.NewRecorder(), hr)
		close(done)
	}()
	for e.repo.waits.waiting(key) == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	<-done
	if n := e.repo.waits.waiting(key); n != 0 {
		t.Fatalf("%d waiters left", n)
	}
	if v := counterValue(e.repo.metrics.counter(epDownload, statusClientGone)); v != 1 {
		t.Fatalf("499 counter = %v", v)
	}
}

func TestPutErrors(t *testing.T) {
	e := newEnv(t)
	id := e.create("alice")
	put := func(token, path string, body []byte) *httptest.ResponseRecorder {
		return e.do(req{method: "PUT", path: path, token: token, body: body})
	}
	p := "/_matrix/media/v3/upload/test/" + id

	expectError(t, put("alice", "/_matrix/media/v3/upload/other.server/"+id, []byte("x")), 404, "M_NOT_FOUND")
	expectError(t, put("alice", "/_matrix/media/v3/upload/test/unknownid", []byte("x")), 404, "M_NOT_FOUND")
	expectError(t, put("bob", p, []byte("x")), 403, "M_FORBIDDEN")

	// A PUT in progress holds the media ID.
	key := mediaKey{testServer, id}
	if !e.repo.waits.tryLockPut(key) {
		t.Fatal("lock taken")
	}
	expectError(t, put("alice", p, []byte("x")), 409, "M_CANNOT_OVERWRITE_MEDIA")
	// The lock is checked before the owner, as Synapse does.
	expectError(t, put("bob", p, []byte("x")), 409, "M_CANNOT_OVERWRITE_MEDIA")
	e.repo.waits.unlockPut(key)

	// Validation errors come after the ownership checks and keep the ID
	// usable.
	rec := e.do(req{method: "PUT", path: p + "?filename=%01", token: "alice", body: []byte("x")})
	expectError(t, rec, 400, "M_INVALID_PARAM")

	if rec := put("alice", p, []byte("ok")); rec.Code != 200 {
		t.Fatalf("PUT: %d %s", rec.Code, rec.Body.String())
	}
	// Already uploaded: the other user still gets 403, the owner 409.
	expectError(t, put("bob", p, nil), 403, "M_FORBIDDEN")
	expectError(t, put("alice", p, nil), 409, "M_CANNOT_OVERWRITE_MEDIA")
	// A media ID made by a plain upload cannot be PUT to either.
	up := e.upload("alice", []byte("plain"), "", "")
	expectError(t, put("alice", "/_matrix/media/v3/upload/test/"+up, []byte("x")), 409, "M_CANNOT_OVERWRITE_MEDIA")

	// Expired.
	id2 := e.create("alice")
	e.clock.Advance(DefaultPendingExpiry)
	expectError(t, put("alice", "/_matrix/media/v3/upload/test/"+id2, []byte("x")), 404, "M_NOT_FOUND")
	// Expiry is checked before the request's own parameters.
	expectError(t, put("alice", "/_matrix/media/v3/upload/test/"+id2+"?filename=%01", []byte("x")), 404, "M_NOT_FOUND")
	rec = e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id2 + "?timeout_ms=10000"})
	expectError(t, rec, 404, "M_NOT_FOUND")
	m, err := e.sql.GetMedia(context.Background(), testServer, id2)
	if err != nil || m.State != storage.StatePending {
		t.Fatalf("expired row changed: %+v %v", m, err)
	}
}

func TestCreateLimit(t *testing.T) {
	e := newEnv(t, func(c *SiteConfig, _ *RepositoryOptions) {
		c.MaxPendingUploads = 3
		c.PendingExpiry = time.Hour
	})
	start := e.clock.Now()
	for i := 0; i < 3; i++ {
		e.create("alice")
		e.clock.Advance(10 * time.Minute)
	}
	// Now start+30m; the oldest expires at start+1h: 30 minutes to wait.
	rec := e.do(req{method: "POST", path: "/_matrix/media/v1/create", token: "alice"})
	expectError(t, rec, 429, "M_LIMIT_EXCEEDED")
	if got := rec.Header().Get("Retry-After"); got != "1800" {
		t.Fatalf("Retry-After = %q, want 1800", got)
	}
	var b map[string]any
	_ = json.Unmarshal(rec.Body.Bytes(), &b)
	if b["retry_after_ms"] != float64(1800000) {
		t.Fatalf("retry_after_ms = %v", b["retry_after_ms"])
	}
	// Another user is not affected.
	e.create("bob")
	// Once the oldest has expired, its slot is free again.
	e.clock.Set(start.Add(time.Hour))
	e.create("alice")
	rec = e.do(req{method: "POST", path: "/_matrix/media/v1/create", token: "alice"})
	expectError(t, rec, 429, "M_LIMIT_EXCEEDED")
	if got, _ := strconv.Atoi(rec.Header().Get("Retry-After")); got != 600 {
		t.Fatalf("Retry-After = %d, want 600", got)
	}

	unlimited := newEnv(t, func(c *SiteConfig, _ *RepositoryOptions) { c.MaxPendingUploads = -1 })
	for i := 0; i < 20; i++ {
		unlimited.create("alice")
	}
}

func TestDownloadTimeoutParam(t *testing.T) {
	e := newEnv(t, func(c *SiteConfig, _ *RepositoryOptions) { c.MaxDownloadTimeout = 30 * time.Second })
	for _, v := range []string{"abc", "-1", "1.5", "", "1e3", "%zz", "--5"} {
		rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/x?timeout_ms=" + v})
		expectError(t, rec, 400, "M_INVALID_PARAM")
	}
	tests := []struct {
		q    string
		want time.Duration
	}{
		{"", 20 * time.Second},
		{"?timeout_ms=0", 0},
		{"?timeout_ms=1500", 1500 * time.Millisecond},
		{"?timeout_ms=30000", 30 * time.Second},
		{"?timeout_ms=30001", 30 * time.Second},
		{"?timeout_ms=99999999999999999999999", 30 * time.Second},
		{"?fi.mau.msc2246.timeout_ms=7", 7 * time.Millisecond},
		{"?timeout_ms=5&fi.mau.msc2246.timeout_ms=7", 5 * time.Millisecond},
	}
	for _, tc := range tests {
		q := tc.q
		if q != "" {
			q = q[1:]
		}
		got, merr := e.site.downloadTimeout(q)
		if merr != nil || got != tc.want {
			t.Errorf("%q: %s %v, want %s", tc.q, got, merr, tc.want)
		}
	}
}

func TestFreezeLegacy(t *testing.T) {
	e := newEnv(t)
	id := e.upload("alice", []byte("before"), "", "")
	frozenAll, err := NewSite(SiteConfig{ServerName: testServer, FreezeLegacy: true}, e.repo, e.site.auth)
	if err != nil {
		t.Fatal(err)
	}
	cutoff := e.clock.Now().Add(time.Minute)
	frozenLater, err := NewSite(SiteConfig{ServerName: testServer, FreezeLegacy: true, FreezeSince: cutoff}, e.repo, e.site.auth)
	if err != nil {
		t.Fatal(err)
	}
	e.clock.Advance(2 * time.Minute)
	id2 := e.upload("alice", []byte("after"), "", "")
	pending := e.create("alice")

	legacy := func(id string) string { return "/_matrix/media/v3/download/test/" + id }
	expectError(t, serve(frozenAll, req{method: "GET", path: legacy(id)}), 404, "M_NOT_FOUND")
	expectError(t, serve(frozenAll, req{method: "GET", path: legacy(pending) + "?timeout_ms=0"}), 404, "M_NOT_FOUND")
	if rec := serve(frozenLater, req{method: "GET", path: legacy(id)}); rec.Code != 200 || rec.Body.String() != "before" {
		t.Fatalf("media from before the freeze: %d", rec.Code)
	}
	expectError(t, serve(frozenLater, req{method: "GET", path: legacy(id2)}), 404, "M_NOT_FOUND")
	// Authenticated downloads are never frozen.
	for _, s := range []*Site{frozenAll, frozenLater} {
		rec := serve(s, req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id2, token: "alice"})
		if rec.Code != 200 || rec.Body.String() != "after" {
			t.Fatalf("v1 download on a frozen site: %d", rec.Code)
		}
	}
}

func TestRunPendingExpiry(t *testing.T) {
	e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) { o.PendingCleanupInterval = time.Millisecond })
	expired := e.create("alice")
	e.clock.Advance(time.Hour)
	alive := e.create("alice")
	// Now the first one is past its expiry, the second has a minute left.
	e.clock.Advance(DefaultPendingExpiry - time.Minute)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		e.repo.RunPendingExpiry(ctx)
		close(done)
	}()
	for {
		_, err := e.sql.GetMedia(context.Background(), testServer, expired)
		if err != nil {
			break
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	<-done
	if m, err := e.sql.GetMedia(context.Background(), testServer, alive); err != nil || m.State != storage.StatePending {
		t.Fatalf("unexpired pending row: %+v %v", m, err)
	}
	rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + expired})
	expectError(t, rec, 404, "M_NOT_FOUND")
}
