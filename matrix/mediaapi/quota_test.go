package mediaapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testmeta"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// withQuotas sets the site's quota config.
func withQuotas(q QuotaConfig) envOption {
	return func(c *SiteConfig, _ *RepositoryOptions) { c.Quotas = q }
}

// rejections is the limit_rejections_total count of reason on the test site.
func (e *env) rejections(reason string) float64 {
	var m dto.Metric
	if err := e.repo.metrics.limitRejections.WithLabelValues(testServer, reason).Write(&m); err != nil {
		e.t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// usage asks the usage endpoint for token's usage.
func (e *env) usage(token string) (used, files int64) {
	e.t.Helper()
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/usage", token: token})
	if rec.Code != 200 {
		e.t.Fatalf("usage: %d %s", rec.Code, rec.Body.String())
	}
	var b map[string]int64
	if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil {
		e.t.Fatal(err)
	}
	if b["m.storage.used"] != b["org.matrix.msc4034.storage.used"] || b["m.storage.files"] != b["org.matrix.msc4034.storage.files"] {
		e.t.Fatalf("unstable aliases differ: %s", rec.Body.String())
	}
	return b["m.storage.used"], b["m.storage.files"]
}

// readRecorder is a request body that records whether it was read.
type readRecorder struct {
	r    io.Reader
	read atomic.Bool
}

func (b *readRecorder) Read(p []byte) (int, error) {
	b.read.Store(true)
	return b.r.Read(p)
}

func (b *readRecorder) Close() error { return nil }

// uploadRecorded POSTs body with its Content-Length through a body that
// records reads.
func (e *env) uploadRecorded(token string, body []byte) (*httptest.ResponseRecorder, bool) {
	rb := &readRecorder{r: bytes.NewReader(body)}
	hr := httptest.NewRequest("POST", "http://media.test/_matrix/media/v3/upload", nil)
	hr.Body = rb
	hr.ContentLength = int64(len(body))
	hr.Header.Set("Authorization", "Bearer "+token)
	rec := httptest.NewRecorder()
	e.site.ServeHTTP(rec, hr)
	return rec, rb.read.Load()
}

func uploadReq(token string, body []byte, chunked bool) req {
	return req{method: "POST", path: "/_matrix/media/v3/upload", token: token, body: body, chunked: chunked}
}

// mediaRows lists alice's ready media rows.
func (e *env) mediaRows(user string) []storage.Media {
	e.t.Helper()
	page, _, err := e.needAdmin().ListUserMedia(context.Background(), storage.UserMediaQuery{ServerName: testServer, UserID: user, Limit: 1000})
	if err != nil {
		e.t.Fatal(err)
	}
	return page
}

// opener opens the metadata store of a test env (nil: SQLite).
type opener = func(testing.TB) *sqlstore.Store

// TestQuotaBackends runs the quota tests on SQLite and PostgreSQL.
func TestQuotaBackends(t *testing.T) {
	tests := []struct {
		name string
		run  func(t *testing.T, open opener)
	}{
		{"BytesBoundary", quotaBytesBoundary},
		{"ChunkedOver", quotaChunkedOver},
		{"FilesAndDedup", quotaFilesAndDedup},
		{"Windows", quotaWindows},
		{"DeletionRestores", quotaDeletionRestores},
		{"Put", quotaPut},
		{"Race", quotaRace},
	}
	for _, b := range testmeta.Backends {
		t.Run(b.Name, func(t *testing.T) {
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) { tt.run(t, b.Open) })
			}
		})
	}
}

func quotaBytesBoundary(t *testing.T, open opener) {
	{
		e := newEnvOn(t, open, nil, withQuotas(QuotaConfig{Rules: []QuotaRule{
			{Users: "@bob:*", MaxBytes: 1},
			{Users: "@*:test", MaxBytes: 100},
		}}))
		e.upload("alice", bytes.Repeat([]byte("a"), 60), "", "")
		rec, _ := e.uploadRecorded("alice", bytes.Repeat([]byte("b"), 40))
		if rec.Code != 200 {
			t.Fatalf("upload exactly at the limit: %d %s", rec.Code, rec.Body.String())
		}
		if used, files := e.usage("alice"); used != 100 || files != 2 {
			t.Fatalf("usage = %d bytes, %d files; want 100, 2", used, files)
		}
		rec, read := e.uploadRecorded("alice", []byte("c"))
		expectError(t, rec, 403, "M_FORBIDDEN")
		if read {
			t.Fatal("the body of an upload refused by its Content-Length was read")
		}
		if !strings.Contains(rec.Body.String(), "quota") {
			t.Fatalf("message does not say quota: %s", rec.Body.String())
		}
		if got := e.rejections("quota_bytes"); got != 1 {
			t.Fatalf("quota_bytes rejections = %v, want 1", got)
		}
		// The first matching rule applies: bob's is 1 byte.
		rec = e.do(uploadReq("bob", []byte("xy"), false))
		expectError(t, rec, 403, "M_FORBIDDEN")
		// An empty upload still fits a full quota.
		rec = e.do(uploadReq("alice", []byte{}, false))
		if rec.Code != 200 {
			t.Fatalf("empty upload at the limit: %d %s", rec.Code, rec.Body.String())
		}
		if used, files := e.usage("alice"); used != 100 || files != 3 {
			t.Fatalf("usage = %d, %d; want 100, 3", used, files)
		}
	}
}

// TestQuotaZeroIsNoLimit proves that 0 (and absent) limits never refuse an
// upload (matrix-media-repo's maxBytes: 0 refused every upload with 500).
func TestQuotaZeroIsNoLimit(t *testing.T) {
	e := newEnv(t, withQuotas(QuotaConfig{Rules: []QuotaRule{
		{Users: "*", MaxBytes: 0, MaxFiles: 0, MaxPending: 0, MaxUploadSize: 0, Windows: []QuotaWindow{{Window: time.Hour}}},
	}}))
	for i, r := range []req{
		uploadReq("alice", bytes.Repeat([]byte("z"), 1000), false),
		uploadReq("alice", bytes.Repeat([]byte("y"), 5000), true),
		uploadReq("alice", nil, false),
	} {
		if rec := e.do(r); rec.Code != 200 {
			t.Fatalf("upload %d: %d %s", i, rec.Code, rec.Body.String())
		}
	}
	id := e.create("alice")
	rec := e.do(req{method: "PUT", path: "/_matrix/media/v3/upload/test/" + id, token: "alice", body: []byte("put")})
	if rec.Code != 200 {
		t.Fatalf("put: %d %s", rec.Code, rec.Body.String())
	}
	rec = e.do(req{method: "GET", path: "/_matrix/client/v1/media/config", token: "alice"})
	if got := rec.Body.String(); got != `{"m.upload.size":1048576}` {
		t.Fatalf("config = %s", got)
	}
}

func quotaChunkedOver(t *testing.T, open opener) {
	e := newEnvOn(t, open, nil, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "@alice:test", MaxBytes: 100}}}))
	rec := e.do(uploadReq("alice", bytes.Repeat([]byte("q"), 101), true))
	expectError(t, rec, 403, "M_FORBIDDEN")
	if files := e.blobFiles(); len(files) != 0 {
		t.Fatalf("blobs left after a refused streamed upload: %v", files)
	}
	if rows := e.mediaRows("@alice:test"); len(rows) != 0 {
		t.Fatalf("rows after a refused upload: %+v", rows)
	}
	if got := e.rejections("quota_bytes"); got != 1 {
		t.Fatalf("quota_bytes = %v", got)
	}
	// Exactly the bytes left, streamed, fits.
	if rec := e.do(uploadReq("alice", bytes.Repeat([]byte("q"), 100), true)); rec.Code != 200 {
		t.Fatalf("streamed upload of exactly the quota: %d %s", rec.Code, rec.Body.String())
	}
	// Nothing left: a streamed body is refused unread.
	expectError(t, e.do(uploadReq("alice", []byte("x"), true)), 403, "M_FORBIDDEN")
	// The site's size limit still answers 413 when it is the tighter one.
	e2 := newEnvOn(t, open, nil, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxBytes: 10 << 20}}}))
	expectError(t, e2.do(uploadReq("alice", bytes.Repeat([]byte("q"), 1<<20+1), true)), 413, "M_TOO_LARGE")
}

func quotaFilesAndDedup(t *testing.T, open opener) {
	e := newEnvOn(t, open, nil, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxFiles: 3, MaxBytes: 250}}}))
	same := bytes.Repeat([]byte("d"), 100)
	e.upload("alice", same, "", "")
	// The same bytes again count in full: 200 of 250.
	e.upload("alice", same, "", "")
	if used, files := e.usage("alice"); used != 200 || files != 2 {
		t.Fatalf("usage after a duplicate = %d, %d; want 200, 2", used, files)
	}
	// A third copy would be 300 > 250, dedup or not.
	expectError(t, e.do(uploadReq("alice", same, false)), 403, "M_FORBIDDEN")
	e.upload("alice", []byte("small"), "", "")
	rec := e.do(uploadReq("alice", []byte("s"), false))
	expectError(t, rec, 403, "M_FORBIDDEN")
	if !strings.Contains(rec.Body.String(), "3 stored files") {
		t.Fatalf("files message: %s", rec.Body.String())
	}
	if e.rejections("quota_files") != 1 || e.rejections("quota_bytes") != 1 {
		t.Fatalf("rejections files %v bytes %v", e.rejections("quota_files"), e.rejections("quota_bytes"))
	}
	// Bob has his own counters.
	e.upload("bob", same, "", "")
}

func quotaWindows(t *testing.T, open opener) {
	e := newEnvOn(t, open, nil, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", Windows: []QuotaWindow{
		{Window: time.Hour, MaxBytes: 100},
		{Window: 24 * time.Hour, MaxFiles: 3},
	}}}}))
	e.upload("alice", bytes.Repeat([]byte("w"), 100), "", "")
	rec := e.do(uploadReq("alice", []byte("1"), false))
	expectError(t, rec, 403, "M_FORBIDDEN")
	if !strings.Contains(rec.Body.String(), "per hour") {
		t.Fatalf("window message: %s", rec.Body.String())
	}
	// Streamed: the window leaves nothing, refused unread.
	expectError(t, e.do(uploadReq("alice", []byte("1"), true)), 403, "M_FORBIDDEN")
	e.clock.Advance(time.Hour + time.Second)
	e.upload("alice", bytes.Repeat([]byte("v"), 60), "", "")
	// 60 of 100 this hour: a streamed 41 bytes is cut at the bound.
	expectError(t, e.do(uploadReq("alice", bytes.Repeat([]byte("u"), 41), true)), 403, "M_FORBIDDEN")
	e.upload("alice", bytes.Repeat([]byte("u"), 40), "", "")
	// Three files in the day.
	e.clock.Advance(2 * time.Hour)
	rec = e.do(uploadReq("alice", []byte("4"), false))
	expectError(t, rec, 403, "M_FORBIDDEN")
	if !strings.Contains(rec.Body.String(), "3 files per day") {
		t.Fatalf("window files message: %s", rec.Body.String())
	}
	if e.rejections("quota_window_bytes") != 3 || e.rejections("quota_window_files") != 1 {
		t.Fatalf("rejections: window bytes %v, files %v", e.rejections("quota_window_bytes"), e.rejections("quota_window_files"))
	}
	e.clock.Advance(24 * time.Hour)
	e.upload("alice", []byte("4"), "", "")
}

func quotaDeletionRestores(t *testing.T, open opener) {
	e := newEnvOn(t, open, nil, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxBytes: 100}}}))
	id := e.upload("alice", bytes.Repeat([]byte("x"), 100), "", "")
	expectError(t, e.do(uploadReq("alice", []byte("y"), false)), 403, "M_FORBIDDEN")
	if _, err := e.needAdmin().DeleteMedia(context.Background(), []storage.MediaRef{{ServerName: testServer, MediaID: id}}, false, e.clock.Now()); err != nil {
		t.Fatal(err)
	}
	e.repo.Forget(testServer, id)
	if used, files := e.usage("alice"); used != 0 || files != 0 {
		t.Fatalf("usage after deletion = %d, %d", used, files)
	}
	e.upload("alice", bytes.Repeat([]byte("y"), 100), "", "")
}

func TestQuotaUserLimitExceeded(t *testing.T) {
	for _, upgrade := range []bool{true, false} {
		e := newEnv(t, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxBytes: 10, InfoURI: "https://example.org/plans", CanUpgrade: upgrade}}}))
		rec := e.do(uploadReq("alice", bytes.Repeat([]byte("x"), 11), false))
		expectError(t, rec, 403, "M_USER_LIMIT_EXCEEDED")
		var b map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil {
			t.Fatal(err)
		}
		if b["info_uri"] != "https://example.org/plans" || b["can_upgrade"] != upgrade || b["soft_limit"] != upgrade {
			t.Fatalf("body = %s", rec.Body.String())
		}
	}
}

// exemptAdmins says that alice is a media admin.
type exemptAdmins struct{}

func (exemptAdmins) IsAdmin(_ context.Context, u auth.User, _ string) (bool, error) {
	return u.UserID == "@alice:test", nil
}

func TestQuotaExemptions(t *testing.T) {
	rules := []QuotaRule{{Users: "*", MaxBytes: 1, MaxUploadSize: 5}}
	t.Run("admins", func(t *testing.T) {
		e := newEnv(t, withQuotas(QuotaConfig{Rules: rules, ExemptAdmins: true}), func(c *SiteConfig, _ *RepositoryOptions) { c.Admins = exemptAdmins{} })
		e.upload("alice", bytes.Repeat([]byte("a"), 100), "", "")
		expectError(t, e.do(uploadReq("bob", []byte("bb"), false)), 403, "M_FORBIDDEN")
	})
	t.Run("admins not exempt", func(t *testing.T) {
		e := newEnv(t, withQuotas(QuotaConfig{Rules: rules}), func(c *SiteConfig, _ *RepositoryOptions) { c.Admins = exemptAdmins{} })
		expectError(t, e.do(uploadReq("alice", []byte("aa"), false)), 403, "M_FORBIDDEN")
	})
	t.Run("appservices", func(t *testing.T) {
		for _, exempt := range []bool{true, false} {
			e := newEnv(t)
			repoQuotas := e.repo.quotas
			site, err := NewSite(SiteConfig{ServerName: "as.test", Quotas: QuotaConfig{Rules: rules, ExemptAppservices: exempt}}, e.repo,
				stubAuth{user: auth.User{UserID: "@bridge_x:as.test", AppserviceID: "bridge"}})
			if err != nil {
				t.Fatal(err)
			}
			if repoQuotas == nil {
				t.Fatal("no quota store")
			}
			rec := serve(site, uploadReq("as_token", []byte("12345678"), false))
			if exempt && rec.Code != 200 {
				t.Fatalf("exempt appservice: %d %s", rec.Code, rec.Body.String())
			}
			if !exempt {
				expectError(t, rec, 413, "M_TOO_LARGE")
			}
		}
	})
}

func TestQuotaUploadSizeAndPending(t *testing.T) {
	e := newEnv(t, withQuotas(QuotaConfig{Rules: []QuotaRule{
		{Users: "@bob:test", MaxUploadSize: 2 << 20, MaxPending: -1},
		{Users: "*", MaxUploadSize: 10, MaxPending: 1, MaxBytes: 1000, MaxFiles: 7},
	}}))
	expectError(t, e.do(uploadReq("alice", bytes.Repeat([]byte("x"), 11), false)), 413, "M_TOO_LARGE")
	expectError(t, e.do(uploadReq("alice", bytes.Repeat([]byte("x"), 11), true)), 413, "M_TOO_LARGE")
	e.upload("alice", bytes.Repeat([]byte("x"), 10), "", "")
	if got := e.rejections("quota_upload_size"); got != 2 {
		t.Fatalf("quota_upload_size = %v", got)
	}
	// Bob's rule allows more than the site's 1 MiB.
	e.upload("bob", bytes.Repeat([]byte("x"), 1<<20+1), "", "")
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/config", token: "alice"})
	want := `{"m.upload.size":10,"m.storage.size":1000,"org.matrix.msc4034.storage.size":1000,"m.storage.max_files":7,"org.matrix.msc4034.storage.max_files":7}`
	if rec.Code != 200 || rec.Body.String() != want {
		t.Fatalf("config = %d %s", rec.Code, rec.Body.String())
	}
	rec = e.do(req{method: "GET", path: "/_matrix/media/v3/config", token: "bob"})
	if rec.Body.String() != `{"m.upload.size":2097152}` {
		t.Fatalf("bob's config = %s", rec.Body.String())
	}
	e.create("alice")
	rec = e.do(req{method: "POST", path: "/_matrix/media/v1/create", token: "alice", body: []byte("{}")})
	expectError(t, rec, 429, "M_LIMIT_EXCEEDED")
	if got := e.rejections("quota_pending"); got != 1 {
		t.Fatalf("quota_pending = %v", got)
	}
	// -1: bob has no pending limit (the site's is 5).
	for range 7 {
		e.create("bob")
	}
}

// TestQuotaCreateRefusedWhenFull checks that /create is refused, as an
// upload would be, when the user's files are used up, and allowed while an
// empty file would still fit.
func TestQuotaCreateRefusedWhenFull(t *testing.T) {
	e := newEnv(t, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxFiles: 1, MaxBytes: 10}}}))
	e.upload("alice", bytes.Repeat([]byte("x"), 10), "", "")
	rec := e.do(req{method: "POST", path: "/_matrix/media/v1/create", token: "alice", body: []byte("{}")})
	expectError(t, rec, 403, "M_FORBIDDEN")
	if !strings.Contains(rec.Body.String(), "files") {
		t.Fatalf("refusal does not name the files limit: %s", rec.Body.String())
	}
	if got := e.rejections("quota_files"); got != 1 {
		t.Fatalf("quota_files = %v, want 1", got)
	}
	// Bob's bytes are used up but not his files: an empty upload still
	// fits, so he may reserve an ID.
	e = newEnv(t, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxFiles: 5, MaxBytes: 10}}}))
	e.upload("bob", bytes.Repeat([]byte("y"), 10), "", "")
	e.create("bob")
}

func quotaPut(t *testing.T, open opener) {
	e := newEnvOn(t, open, nil, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxBytes: 50}}}))
	id := e.create("alice")
	path := "/_matrix/media/v3/upload/test/" + id
	expectError(t, e.do(req{method: "PUT", path: path, token: "alice", body: bytes.Repeat([]byte("p"), 51)}), 403, "M_FORBIDDEN")
	expectError(t, e.do(req{method: "PUT", path: path, token: "alice", body: bytes.Repeat([]byte("p"), 51), chunked: true}), 403, "M_FORBIDDEN")
	if files := e.blobFiles(); len(files) != 0 {
		t.Fatalf("blobs left: %v", files)
	}
	if rec := e.do(req{method: "PUT", path: path, token: "alice", body: bytes.Repeat([]byte("p"), 50)}); rec.Code != 200 {
		t.Fatalf("put at the limit: %d %s", rec.Code, rec.Body.String())
	}
	if used, files := e.usage("alice"); used != 50 || files != 1 {
		t.Fatalf("usage = %d, %d", used, files)
	}
}

// TestQuotaRace has two uploads pass the early check together and race for
// the last bytes of the quota: the row's transaction lets one in.
func quotaRace(t *testing.T, open opener) {
	for _, tc := range []struct {
		name          string
		put, twoRepos bool
	}{{"upload", false, false}, {"put", true, false}, {"upload, two instances", false, true}, {"put, two instances", true, true}} {
		e := newEnvOn(t, open, nil, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxBytes: 100}}}))
		var arrived sync.WaitGroup
		arrived.Add(2)
		hook := func() {
			arrived.Done()
			arrived.Wait()
		}
		e.repo.hooks.uploadReceived = hook
		sites := [2]*Site{e.site, e.site}
		if tc.twoRepos {
			// A second instance: its own repository (caches, waiters, PUT
			// locks) on the same database and datastores.
			repo2, err := NewRepository(e.repo.stores, e.repo.meta, RepositoryOptions{})
			if err != nil {
				t.Fatal(err)
			}
			repo2.now, repo2.quotas, repo2.hooks.uploadReceived = e.clock.Now, e.sql, hook
			if sites[1], err = NewSite(e.site.cfg, repo2, e.site.auth); err != nil {
				t.Fatal(err)
			}
		}
		reqs := [2]req{uploadReq("alice", bytes.Repeat([]byte("1"), 60), false), uploadReq("alice", bytes.Repeat([]byte("2"), 60), false)}
		if tc.put {
			for i := range reqs {
				reqs[i] = req{method: "PUT", path: "/_matrix/media/v3/upload/test/" + e.create("alice"), token: "alice", body: reqs[i].body}
			}
		}
		var codes [2]int
		var wg sync.WaitGroup
		for i := range 2 {
			wg.Go(func() { codes[i] = serve(sites[i], reqs[i]).Code })
		}
		wg.Wait()
		if !(codes[0] == 200 && codes[1] == 403 || codes[0] == 403 && codes[1] == 200) {
			t.Fatalf("%s: codes %v, want one 200 and one 403", tc.name, codes)
		}
		if used, files := e.usage("alice"); used != 60 || files != 1 {
			t.Fatalf("%s: usage = %d, %d", tc.name, used, files)
		}
	}
}

func TestUsageEndpoint(t *testing.T) {
	e := newEnv(t)
	e.upload("alice", []byte("hello"), "", "")
	e.upload("alice", []byte("hello"), "", "")
	for _, p := range []string{"/_matrix/client/v1/media/usage", "/_matrix/media/unstable/org.matrix.msc4034/usage"} {
		rec := e.do(req{method: "GET", path: p, token: "alice"})
		want := `{"m.storage.used":10,"m.storage.files":2,"org.matrix.msc4034.storage.used":10,"org.matrix.msc4034.storage.files":2}`
		if rec.Code != 200 || rec.Body.String() != want || rec.Header().Get("Content-Type") != "application/json" {
			t.Fatalf("%s: %d %s", p, rec.Code, rec.Body.String())
		}
		expectError(t, e.do(req{method: "GET", path: p}), 401, "M_MISSING_TOKEN")
		expectError(t, e.do(req{method: "GET", path: p, token: "guest"}), 403, "M_GUEST_ACCESS_FORBIDDEN")
		expectError(t, e.do(req{method: "POST", path: p, token: "alice"}), 405, "M_UNRECOGNIZED")
	}
	if used, files := e.usage("bob"); used != 0 || files != 0 {
		t.Fatalf("bob: %d %d", used, files)
	}
	for _, p := range []string{"/_matrix/media/v3/usage", "/_matrix/client/v1/media/usage/x", "/_matrix/media/unstable/org.matrix.msc4034/usage/x"} {
		expectError(t, e.do(req{method: "GET", path: p, token: "alice"}), 404, "M_UNRECOGNIZED")
	}
	// Without usage counters the endpoint is unknown.
	e.repo.quotas = nil
	expectError(t, e.do(req{method: "GET", path: "/_matrix/client/v1/media/usage", token: "alice"}), 404, "M_UNRECOGNIZED")
}

func TestQuotaConfigValidation(t *testing.T) {
	e := newEnv(t)
	for _, q := range []QuotaConfig{
		{Rules: []QuotaRule{{Users: ""}}},
		{Rules: []QuotaRule{{Users: "@a b:x"}}},
		{Rules: []QuotaRule{{Users: "*", MaxBytes: -1}}},
		{Rules: []QuotaRule{{Users: "*", MaxFiles: -1}}},
		{Rules: []QuotaRule{{Users: "*", MaxPending: -2}}},
		{Rules: []QuotaRule{{Users: "*", MaxUploadSize: -1}}},
		{Rules: []QuotaRule{{Users: "*", Windows: []QuotaWindow{{Window: 0, MaxBytes: 1}}}}},
		{Rules: []QuotaRule{{Users: "*", Windows: []QuotaWindow{{Window: storage.MaxWindow + time.Hour, MaxBytes: 1}}}}},
		{Rules: []QuotaRule{{Users: "*", Windows: []QuotaWindow{{Window: time.Hour, MaxFiles: -1}}}}},
		{Rules: []QuotaRule{{Users: "*", CanUpgrade: true}}},
		{Rules: []QuotaRule{{Users: "*", InfoURI: "example.org/plans"}}},
		{Rules: []QuotaRule{{Users: "*", InfoURI: "javascript:alert(1)"}}},
	} {
		if _, err := NewSite(SiteConfig{ServerName: "v.test", Quotas: q}, e.repo, stubAuth{}); err == nil {
			t.Errorf("accepted %+v", q)
		}
	}
	e.repo.quotas = nil
	if _, err := NewSite(SiteConfig{ServerName: "v.test", Quotas: QuotaConfig{Rules: []QuotaRule{{Users: "*"}}}}, e.repo, stubAuth{}); err == nil {
		t.Error("quotas accepted without a usage store")
	}
}

func TestUserQuotaReport(t *testing.T) {
	e := newEnv(t, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "@alice:*", MaxBytes: 1000, Windows: []QuotaWindow{{Window: time.Hour, MaxFiles: 5}}}}}))
	e.upload("alice", []byte("12345"), "", "")
	rep, err := e.repo.UserQuota(context.Background(), "@alice:test")
	if err != nil {
		t.Fatal(err)
	}
	if rep.Bytes != 5 || rep.Files != 1 || len(rep.Sites) != 1 {
		t.Fatalf("report %+v", rep)
	}
	s := rep.Sites[0]
	if s.ServerName != testServer || s.Rule != 1 || s.MaxBytes != 1000 || len(s.Windows) != 1 || s.Windows[0].UsedFiles != 1 || s.Windows[0].UsedBytes != 5 {
		t.Fatalf("site report %+v", s)
	}
	rep, err = e.repo.UserQuota(context.Background(), "@bob:test")
	if err != nil || rep.Sites[0].Rule != 0 {
		t.Fatalf("bob: %+v %v", rep, err)
	}
	e.site.Close()
	if rep, _ := e.repo.UserQuota(context.Background(), "@alice:test"); len(rep.Sites) != 0 {
		t.Fatalf("closed site still reported: %+v", rep.Sites)
	}
}

var _ http.Handler = (*Site)(nil)

// BenchmarkUploadQuota uploads distinct 100 KiB bodies on SQLite without
// quotas and with a rule whose limits are never reached (stored bytes and
// files, one rolling window), side by side.
func BenchmarkUploadQuota(b *testing.B) {
	for _, tc := range []struct {
		name string
		q    QuotaConfig
	}{
		{"off", QuotaConfig{}},
		{"on", QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxBytes: 1 << 50, MaxFiles: 1 << 40,
			Windows: []QuotaWindow{{Window: time.Hour, MaxBytes: 1 << 50, MaxFiles: 1 << 40}}}}}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			e := newEnv(b, withQuotas(tc.q))
			body := bytes.Repeat([]byte("q"), 100<<10)
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			n := 0
			for b.Loop() {
				n++
				copy(body, strconv.Itoa(n)+"/")
				hr := httptest.NewRequest("POST", "http://media.test/_matrix/media/v3/upload", bytes.NewReader(body))
				hr.Header.Set("Authorization", "Bearer alice")
				rec := httptest.NewRecorder()
				e.site.ServeHTTP(rec, hr)
				if rec.Code != 200 {
					b.Fatalf("upload: %d %s", rec.Code, rec.Body)
				}
			}
		})
	}
}

// TestQuotaRaceTwoStores races two uploads for the last bytes of a quota
// through two instances that share nothing but the database and the
// datastore: two repositories on two store objects (two connection pools;
// for SQLite, two handles on one file).
func TestQuotaRaceTwoStores(t *testing.T) {
	for _, backend := range []string{"sqlite", "postgres"} {
		t.Run(backend, func(t *testing.T) {
			var open func() *sqlstore.Store
			switch backend {
			case "sqlite":
				path := filepath.Join(t.TempDir(), "shared.db")
				open = func() *sqlstore.Store {
					s, err := sqlstore.OpenSQLite(context.Background(), path)
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { _ = s.Close() })
					return s
				}
			default:
				dsn := testpg.DSN(t)
				open = func() *sqlstore.Store {
					s, err := sqlstore.OpenPostgres(context.Background(), dsn)
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { _ = s.Close() })
					return s
				}
			}
			first := open()
			e := newEnvOn(t, func(testing.TB) *sqlstore.Store { return first }, nil,
				withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", MaxBytes: 100, Windows: []QuotaWindow{{Window: time.Hour, MaxFiles: 1}}}}}))
			second := open()
			repo2, err := NewRepository(e.repo.stores, second, RepositoryOptions{})
			if err != nil {
				t.Fatal(err)
			}
			repo2.now = e.clock.Now
			site2, err := NewSite(e.site.cfg, repo2, e.site.auth)
			if err != nil {
				t.Fatal(err)
			}
			var arrived sync.WaitGroup
			arrived.Add(2)
			hook := func() {
				arrived.Done()
				arrived.Wait()
			}
			e.repo.hooks.uploadReceived, repo2.hooks.uploadReceived = hook, hook
			sites := [2]*Site{e.site, site2}
			var codes [2]int
			var wg sync.WaitGroup
			for i := range 2 {
				wg.Go(func() {
					codes[i] = serve(sites[i], uploadReq("alice", bytes.Repeat([]byte{byte('a' + i)}, 50), false)).Code
				})
			}
			wg.Wait()
			// 50 + 50 fits the bytes, but the window allows one file.
			if !(codes[0] == 200 && codes[1] == 403 || codes[0] == 403 && codes[1] == 200) {
				t.Fatalf("codes %v, want one 200 and one 403", codes)
			}
			if used, files := e.usage("alice"); used != 50 || files != 1 {
				t.Fatalf("usage = %d, %d", used, files)
			}
		})
	}
}

// TestUploadHistoryPruned checks the expiry pass's pruning of the rolling
// windows' history: what the site's longest window (or a day, when that is
// shorter) still reaches stays, the rest goes.
func TestUploadHistoryPruned(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, withQuotas(QuotaConfig{Rules: []QuotaRule{{Users: "*", Windows: []QuotaWindow{{Window: 2 * time.Hour, MaxFiles: 100}}}}}))
	res, err := storage.IngestTo(ctx, e.repo.stores, e.meta, storage.KindLocal, bytes.NewReader([]byte("history")), storage.PutOptions{ExpectedSize: 7})
	if err != nil {
		t.Fatal(err)
	}
	now := e.clock.Now()
	for i, age := range []time.Duration{72 * time.Hour, 23 * time.Hour, time.Hour} {
		at := now.Add(-age)
		if err := e.sql.InsertMedia(ctx, storage.Media{ServerName: testServer, MediaID: fmt.Sprintf("hist%d", i), UserID: "@alice:test",
			SHA256: res.SHA256, Size: res.Size, ContentType: "text/plain", CreatedAt: at, UploadedAt: at}); err != nil {
			t.Fatal(err)
		}
	}
	since := func(age time.Duration) int64 {
		t.Helper()
		_, files, err := e.sql.UploadedSince(ctx, "@alice:test", now.Add(-age).Truncate(time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		return files
	}
	if got := since(96 * time.Hour); got != 3 {
		t.Fatalf("before pruning: %d files in 4 days, want 3", got)
	}
	e.repo.pruneUploadHistory(ctx)
	if got := since(96 * time.Hour); got != 2 {
		t.Fatalf("after pruning: %d files in 4 days, want 2 (the 3-day-old upload's minute pruned, a day kept)", got)
	}
	if got := since(2 * time.Hour); got != 1 {
		t.Fatalf("after pruning: %d files in the window, want 1", got)
	}
}
