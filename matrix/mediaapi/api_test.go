package mediaapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"mime"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

func TestIsMediaPath(t *testing.T) {
	yes := []string{
		"/_matrix/media/v3/upload", "/_matrix/media/unknown", "/_matrix/client/v1/media/config",
		"/_matrix/client/unstable/org.matrix.msc3916/media/download/a/b",
		"/_matrix/federation/v1/media/download/x", "/_matrix/federation/unstable/org.matrix.msc3916.v2/media/thumbnail/x",
	}
	no := []string{
		"/", "/_matrix/media", "/_matrix/client/v3/account/whoami", "/_matrix/client/v1/mediax/config",
		"/_matrix/federation/v1/send/1", "/_matrix/key/v2/server", "/_matrix/client/v1/media",
	}
	for _, p := range yes {
		if !IsMediaPath(p) {
			t.Errorf("IsMediaPath(%q) = false", p)
		}
	}
	for _, p := range no {
		if IsMediaPath(p) {
			t.Errorf("IsMediaPath(%q) = true", p)
		}
	}
}

func TestNewSiteValidation(t *testing.T) {
	e := newEnv(t)
	a := stubAuth{}
	bad := []SiteConfig{
		{},
		{ServerName: "bad name"},
		{ServerName: "x", MaxUploadSize: -1},
		{ServerName: "x", PendingExpiry: -1},
		{ServerName: "x", MaxDownloadTimeout: -1},
	}
	for _, c := range bad {
		if _, err := NewSite(c, e.repo, a); err == nil {
			t.Errorf("NewSite(%+v) succeeded", c)
		}
	}
	if _, err := NewSite(SiteConfig{ServerName: "x"}, nil, a); err == nil {
		t.Error("NewSite without repository succeeded")
	}
	if _, err := NewSite(SiteConfig{ServerName: "x"}, e.repo, nil); err == nil {
		t.Error("NewSite without authenticator succeeded")
	}
	s, err := NewSite(SiteConfig{ServerName: "x", MaxDownloadTimeout: 5 * time.Second}, e.repo, a)
	if err != nil {
		t.Fatal(err)
	}
	c := s.Config()
	if c.MaxUploadSize != DefaultMaxUploadSize || c.MaxPendingUploads != DefaultMaxPendingUploads ||
		c.PendingExpiry != DefaultPendingExpiry || c.MaxDownloadTimeout != 5*time.Second {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if s.downloadWait != 5*time.Second {
		t.Fatalf("default wait %s not capped by MaxDownloadTimeout", s.downloadWait)
	}
	if _, err := NewRepository(nil, e.meta, RepositoryOptions{}); err == nil {
		t.Error("NewRepository without blob store succeeded")
	}
}

func TestUnknownEndpointsAndMethods(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		method, path string
		token        string
		status       int
		code         string
		allow        string
	}{
		{"GET", "/_matrix/media/unknown", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/v3/unknown", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/v3/unknown", "alice", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/v4/config", "alice", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/v3", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/v3/", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/v3/download/test", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/v3/download/test/a/b/c", "", 404, "M_UNRECOGNIZED", ""},
		{"POST", "/_matrix/media/v3/create", "alice", 404, "M_UNRECOGNIZED", ""},
		{"PUT", "/_matrix/media/v1/upload/test/abc", "alice", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/v3/thumbnail/test/abc?width=32&height=32", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/v3/preview_url?url=http://x", "alice", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/client/v1/media/thumbnail/test/abc", "alice", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/client/v1/media/preview_url", "alice", 404, "M_UNRECOGNIZED", ""},
		{"POST", "/_matrix/client/v1/media/upload", "alice", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/federation/v1/media/download/abc", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/abc", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/unstable/fi.mau.msc2246/other", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/unstable/other/create", "", 404, "M_UNRECOGNIZED", ""},
		{"GET", "/_matrix/media/%76%33/config", "alice", 404, "M_UNRECOGNIZED", ""},
		{"PATCH", "/_matrix/media/v3/upload", "", 405, "M_UNRECOGNIZED", "POST, OPTIONS"},
		{"GET", "/_matrix/media/v3/upload", "alice", 405, "M_UNRECOGNIZED", "POST, OPTIONS"},
		{"GET", "/_matrix/media/v1/create", "", 405, "M_UNRECOGNIZED", "POST, OPTIONS"},
		{"POST", "/_matrix/media/v3/upload/test/abc", "alice", 405, "M_UNRECOGNIZED", "PUT, OPTIONS"},
		{"POST", "/_matrix/media/v3/download/test/abc", "", 405, "M_UNRECOGNIZED", "GET, HEAD, OPTIONS"},
		{"DELETE", "/_matrix/client/v1/media/download/test/abc/f", "alice", 405, "M_UNRECOGNIZED", "GET, HEAD, OPTIONS"},
		{"PUT", "/_matrix/client/v1/media/config", "", 405, "M_UNRECOGNIZED", "GET, HEAD, OPTIONS"},
	}
	for _, tc := range tests {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			rec := e.do(req{method: tc.method, path: tc.path, token: tc.token})
			expectError(t, rec, tc.status, tc.code)
			if got := rec.Header().Get("Allow"); got != tc.allow {
				t.Fatalf("Allow = %q, want %q", got, tc.allow)
			}
		})
	}
}

func TestOptions(t *testing.T) {
	e := newEnv(t)
	for _, p := range []string{
		"/_matrix/media/v3/upload", "/_matrix/media/unknown", "/_matrix/client/v1/media/download/test/abc",
		"/_matrix/media/v3/download/..%2F/x", "/_matrix/federation/v1/media/download/x",
	} {
		rec := e.do(req{method: "OPTIONS", path: p})
		if rec.Code != http.StatusNoContent {
			t.Fatalf("OPTIONS %s: %d %s", p, rec.Code, rec.Body.String())
		}
		if rec.Body.Len() != 0 {
			t.Fatalf("OPTIONS %s wrote a body", p)
		}
		expectCORS(t, rec.Header())
	}
}

func TestAuthentication(t *testing.T) {
	e := newEnv(t)
	id := e.upload("alice", []byte("hello"), "text/plain", "")
	pending := e.create("alice")
	dl := "/_matrix/client/v1/media/download/test/" + id
	authed := []struct{ method, path string }{
		{"POST", "/_matrix/media/v3/upload"},
		{"POST", "/_matrix/media/r0/upload"},
		{"POST", "/_matrix/media/v1/create"},
		{"POST", "/_matrix/media/unstable/fi.mau.msc2246/create"},
		{"PUT", "/_matrix/media/v3/upload/test/" + pending},
		{"PUT", "/_matrix/media/unstable/fi.mau.msc2246/upload/test/" + pending},
		{"GET", "/_matrix/media/v3/config"},
		{"GET", "/_matrix/media/r0/config"},
		{"GET", "/_matrix/client/v1/media/config"},
		{"GET", "/_matrix/client/unstable/org.matrix.msc3916/media/config"},
		{"GET", dl},
		{"GET", dl + "/name.txt"},
		{"HEAD", dl},
		{"GET", "/_matrix/client/unstable/org.matrix.msc3916/media/download/test/" + id},
		// Auth comes before path validation (Complement TestContentCSAPIMediaV1).
		{"GET", "/_matrix/client/v1/media/download/test/" + url.PathEscape("mxc://test/"+id)},
		{"GET", "/_matrix/client/v1/media/download/bad%20server/..%2F..%2Fetc"},
		{"PUT", "/_matrix/media/v3/upload/other.server/%00"},
	}
	for _, tc := range authed {
		t.Run("missing "+tc.method+" "+tc.path, func(t *testing.T) {
			rec := e.do(req{method: tc.method, path: tc.path, body: []byte("x")})
			if tc.method == "HEAD" {
				if rec.Code != 401 {
					t.Fatalf("status %d", rec.Code)
				}
				return
			}
			expectError(t, rec, 401, "M_MISSING_TOKEN")
		})
		t.Run("unknown "+tc.method+" "+tc.path, func(t *testing.T) {
			rec := e.do(req{method: tc.method, path: tc.path, token: "mallory", body: []byte("x")})
			if tc.method == "HEAD" {
				if rec.Code != 401 {
					t.Fatalf("status %d", rec.Code)
				}
				return
			}
			expectError(t, rec, 401, "M_UNKNOWN_TOKEN")
		})
	}

	// Guests: no upload, create, PUT or config; downloads are fine.
	for _, tc := range authed[:10] {
		rec := e.do(req{method: tc.method, path: tc.path, token: "guest", body: []byte("x")})
		expectError(t, rec, 403, "M_GUEST_ACCESS_FORBIDDEN")
	}
	rec := e.do(req{method: "GET", path: dl, token: "guest"})
	if rec.Code != 200 || rec.Body.String() != "hello" {
		t.Fatalf("guest download: %d %q", rec.Code, rec.Body.String())
	}

	// Legacy downloads need no token; an invalid one is ignored.
	for _, tok := range []string{"", "mallory"} {
		rec = e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id, token: tok})
		if rec.Code != 200 || rec.Body.String() != "hello" {
			t.Fatalf("legacy download with token %q: %d %q", tok, rec.Code, rec.Body.String())
		}
	}

	// access_token in the query (SyTest); the header wins.
	rec = e.do(req{method: "GET", path: "/_matrix/media/v3/config?access_token=alice"})
	if rec.Code != 200 {
		t.Fatalf("query token: %d %s", rec.Code, rec.Body.String())
	}
	rec = e.do(req{method: "GET", path: "/_matrix/media/v3/config?access_token=alice", token: "mallory"})
	expectError(t, rec, 401, "M_UNKNOWN_TOKEN")
	// A non-Bearer Authorization header is no token.
	rec = e.do(req{method: "GET", path: "/_matrix/media/v3/config", header: map[string]string{"Authorization": "Basic YWxpY2U6eA=="}})
	expectError(t, rec, 401, "M_MISSING_TOKEN")
	// The scheme is case-insensitive.
	rec = e.do(req{method: "GET", path: "/_matrix/media/v3/config", header: map[string]string{"Authorization": "bearer alice"}})
	if rec.Code != 200 {
		t.Fatalf("lower-case bearer: %d", rec.Code)
	}
}

func TestAuthenticationHomeserverFailures(t *testing.T) {
	e := newEnv(t)
	// A homeserver that is not listening.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	whoami, err := auth.NewWhoami("http://"+addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	cache, err := auth.NewTokenCache(auth.CacheOptions{})
	if err != nil {
		t.Fatal(err)
	}
	down, err := auth.NewSiteAuthenticator(auth.SiteOptions{Homeserver: "http://" + addr, Checker: whoami, Cache: cache})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		authn  auth.Authenticator
		status int
	}{
		{"down", down, 502},
		{"unavailable", stubAuth{err: auth.ErrHomeserverUnavailable}, 502},
		{"timeout", stubAuth{err: auth.ErrHomeserverTimeout}, 504},
		{"other error", stubAuth{err: context.Canceled}, 502},
		{"circuit open", stubAuth{err: &auth.CircuitOpenError{RetryAfter: 3 * time.Second}}, 502},
		{"forbidden appservice user", stubAuth{err: fmt.Errorf("x: %w", auth.ErrForbidden)}, 403},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			site, err := NewSite(SiteConfig{ServerName: testServer}, e.repo, tc.authn)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{"/_matrix/media/v3/config", "/_matrix/client/v1/media/download/test/abc", "/_matrix/media/v3/upload"} {
				method := "GET"
				if strings.HasSuffix(p, "upload") {
					method = "POST"
				}
				rec := serve(site, req{method: method, path: p, token: "alice", body: []byte("x")})
				code := "M_UNKNOWN"
				if tc.status == 403 {
					code = "M_FORBIDDEN"
				}
				expectError(t, rec, tc.status, code)
				if tc.name == "circuit open" && rec.Header().Get("Retry-After") != "4" {
					t.Errorf("%s: Retry-After = %q, want 4", p, rec.Header().Get("Retry-After"))
				}
			}
		})
	}
}

func TestConfig(t *testing.T) {
	e := newEnv(t, func(c *SiteConfig, _ *RepositoryOptions) { c.MaxUploadSize = 12345 })
	for _, p := range []string{"/_matrix/media/v3/config", "/_matrix/media/r0/config", "/_matrix/media/v1/config",
		"/_matrix/client/v1/media/config", "/_matrix/client/unstable/org.matrix.msc3916/media/config"} {
		rec := e.do(req{method: "GET", path: p, token: "alice"})
		if rec.Code != 200 {
			t.Fatalf("%s: %d", p, rec.Code)
		}
		var b map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil {
			t.Fatal(err)
		}
		if b["m.upload.size"] != float64(12345) || len(b) != 1 {
			t.Fatalf("%s: body %s", p, rec.Body.String())
		}
		if rec.Header().Get("Content-Type") != "application/json" {
			t.Fatalf("Content-Type %q", rec.Header().Get("Content-Type"))
		}
		expectCORS(t, rec.Header())
	}
}

func TestUploadAndDownload(t *testing.T) {
	e := newEnv(t)
	content := []byte("Hello World!")
	rec := e.do(req{method: "POST", path: "/_matrix/media/v3/upload?filename=hello.txt", token: "alice", body: content,
		header: map[string]string{"Content-Type": "text/plain; charset=utf-8"}})
	if rec.Code != 200 {
		t.Fatalf("upload: %d %s", rec.Code, rec.Body.String())
	}
	expectCORS(t, rec.Header())
	id := mediaIDFromURI(t, rec, testServer)

	m, err := e.sql.GetMedia(context.Background(), testServer, id)
	if err != nil {
		t.Fatal(err)
	}
	if m.State != storage.StateReady || m.UserID != "@alice:test" || m.ContentType != "text/plain; charset=utf-8" ||
		m.Filename != "hello.txt" || m.Size != int64(len(content)) || m.SHA256 == "" || m.UploadedAt.IsZero() {
		t.Fatalf("stored row %+v", m)
	}

	for _, tc := range []struct {
		path, token, cache string
	}{
		{"/_matrix/media/v3/download/test/" + id, "", "public, max-age=31536000, immutable"},
		{"/_matrix/media/r0/download/test/" + id, "", "public, max-age=31536000, immutable"},
		{"/_matrix/media/v1/download/test/" + id, "", "public, max-age=31536000, immutable"},
		{"/_matrix/media/v3/download/test/" + id + "?allow_remote=false", "", "public, max-age=31536000, immutable"},
		{"/_matrix/client/v1/media/download/test/" + id, "alice", "private, max-age=31536000, immutable"},
		{"/_matrix/client/unstable/org.matrix.msc3916/media/download/test/" + id, "bob", "private, max-age=31536000, immutable"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			rec := e.do(req{method: "GET", path: tc.path, token: tc.token})
			if rec.Code != 200 {
				t.Fatalf("status %d %s", rec.Code, rec.Body.String())
			}
			if !bytes.Equal(rec.Body.Bytes(), content) {
				t.Fatalf("body %q", rec.Body.String())
			}
			want := map[string]string{
				"Content-Type":                 "text/plain; charset=utf-8",
				"Content-Length":               "12",
				"Content-Disposition":          "inline; filename=hello.txt",
				"Content-Security-Policy":      "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; object-src 'self';",
				"X-Content-Security-Policy":    "sandbox;",
				"Cross-Origin-Resource-Policy": "cross-origin",
				"X-Content-Type-Options":       "nosniff",
				"Referrer-Policy":              "no-referrer",
				"X-Robots-Tag":                 "noindex, nofollow, noarchive, noimageindex",
				"Cache-Control":                tc.cache,
				"ETag":                         `"` + m.SHA256 + `"`,
				"Accept-Ranges":                "bytes",
				"Last-Modified":                m.UploadedAt.UTC().Format(http.TimeFormat),
			}
			for k, v := range want {
				if got := rec.Header().Get(k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			expectCORS(t, rec.Header())
		})
	}
}

func TestZeroByteUpload(t *testing.T) {
	e := newEnv(t)
	id := e.upload("alice", []byte{}, "", "")
	rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id})
	if rec.Code != 200 || rec.Body.Len() != 0 || rec.Header().Get("Content-Length") != "0" {
		t.Fatalf("zero-byte download: %d len=%d cl=%q", rec.Code, rec.Body.Len(), rec.Header().Get("Content-Length"))
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/octet-stream" {
		t.Fatalf("default Content-Type %q", ct)
	}
	if cd := rec.Header().Get("Content-Disposition"); cd != "attachment" {
		t.Fatalf("Content-Disposition %q", cd)
	}
	// Also without any body at all.
	hr, _ := http.NewRequest("POST", "http://media.test/_matrix/media/v3/upload", nil)
	hr.Header.Set("Authorization", "Bearer alice")
	rec2 := httptestRecorder(e.site, hr)
	if rec2.Code != 200 {
		t.Fatalf("nil body upload: %d %s", rec2.Code, rec2.Body.String())
	}
	// Range on empty content is unsatisfiable.
	rec = e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id, header: map[string]string{"Range": "bytes=0-"}})
	expectError(t, rec, 416, "M_UNKNOWN")
	if cr := rec.Header().Get("Content-Range"); cr != "bytes */0" {
		t.Fatalf("Content-Range %q", cr)
	}
}

func TestContentTypeEchoedExactly(t *testing.T) {
	e := newEnv(t)
	for _, ct := range []string{"img/png", "Text/Plain; charset=utf-8", "image/png", "application/x-weird+thing; a=\"b c\""} {
		id := e.upload("alice", []byte("data for "+ct), ct, "")
		for _, p := range []string{"/_matrix/media/v3/download/test/" + id, "/_matrix/client/v1/media/download/test/" + id} {
			rec := e.do(req{method: "GET", path: p, token: "alice"})
			if rec.Code != 200 || rec.Header().Get("Content-Type") != ct {
				t.Fatalf("%s: %d Content-Type %q, want %q", p, rec.Code, rec.Header().Get("Content-Type"), ct)
			}
		}
	}
}

func TestUploadValidation(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name   string
		path   string
		ct     string
		status int
		code   string
	}{
		{"long content type", "/_matrix/media/v3/upload", "a/" + strings.Repeat("b", 254), 400, "M_INVALID_PARAM"},
		{"control in content type", "/_matrix/media/v3/upload", "text/plain\x01", 400, "M_INVALID_PARAM"},
		{"non-ascii content type", "/_matrix/media/v3/upload", "text/plän", 400, "M_INVALID_PARAM"},
		{"invalid utf-8 filename", "/_matrix/media/v3/upload?filename=%FF", "", 400, "M_INVALID_PARAM"},
		{"control in filename", "/_matrix/media/v3/upload?filename=a%01b", "", 400, "M_INVALID_PARAM"},
		{"nul in filename", "/_matrix/media/v3/upload?filename=a%00b", "", 400, "M_INVALID_PARAM"},
		{"bad escape in filename", "/_matrix/media/v3/upload?filename=%zz", "", 400, "M_INVALID_PARAM"},
		{"long filename", "/_matrix/media/v3/upload?filename=" + strings.Repeat("a", 256), "", 400, "M_INVALID_PARAM"},
		{"max filename", "/_matrix/media/v3/upload?filename=" + strings.Repeat("a", 255), "", 200, ""},
		{"max content type", "/_matrix/media/v3/upload", "a/" + strings.Repeat("b", 253), 200, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := req{method: "POST", path: tc.path, token: "alice", body: []byte("x")}
			if tc.ct != "" {
				r.header = map[string]string{"Content-Type": tc.ct}
			}
			rec := e.do(r)
			if tc.status == 200 {
				if rec.Code != 200 {
					t.Fatalf("status %d %s", rec.Code, rec.Body.String())
				}
				return
			}
			expectError(t, rec, tc.status, tc.code)
		})
	}

	// Fewer bytes than announced.
	hr, _ := http.NewRequest("POST", "http://media.test/_matrix/media/v3/upload", strings.NewReader("short"))
	hr.ContentLength = 10
	hr.Header.Set("Authorization", "Bearer alice")
	rec := httptestRecorder(e.site, hr)
	expectError(t, rec, 400, "M_UNKNOWN")
}

func TestUploadTooLarge(t *testing.T) {
	e := newEnv(t, func(c *SiteConfig, _ *RepositoryOptions) { c.MaxUploadSize = 1000 })
	big := bytes.Repeat([]byte("x"), 1001)
	// By Content-Length: refused before reading.
	rec := e.do(req{method: "POST", path: "/_matrix/media/v3/upload", token: "alice", body: big})
	expectError(t, rec, 413, "M_TOO_LARGE")
	// By a chunked stream: refused while reading.
	rec = e.do(req{method: "POST", path: "/_matrix/media/v3/upload", token: "alice", body: big, chunked: true})
	expectError(t, rec, 413, "M_TOO_LARGE")
	if files := e.blobFiles(); len(files) != 0 {
		t.Fatalf("files stored after refused uploads: %v", files)
	}
	// Exactly the limit is fine, chunked too.
	rec = e.do(req{method: "POST", path: "/_matrix/media/v3/upload", token: "alice", body: big[:1000], chunked: true})
	if rec.Code != 200 {
		t.Fatalf("upload at the limit: %d %s", rec.Code, rec.Body.String())
	}
	// PUT too.
	id := e.create("alice")
	rec = e.do(req{method: "PUT", path: "/_matrix/media/v3/upload/test/" + id, token: "alice", body: big})
	expectError(t, rec, 413, "M_TOO_LARGE")
	rec = e.do(req{method: "PUT", path: "/_matrix/media/v3/upload/test/" + id, token: "alice", body: big, chunked: true})
	expectError(t, rec, 413, "M_TOO_LARGE")
	if n := len(e.blobFiles()); n != 1 {
		t.Fatalf("%d blob files, want 1", n)
	}
	m, err := e.sql.GetMedia(context.Background(), testServer, id)
	if err != nil || m.State != storage.StatePending {
		t.Fatalf("pending row after refused PUTs: %+v %v", m, err)
	}
}

func TestBadPaths(t *testing.T) {
	e := newEnv(t)
	id := e.upload("alice", []byte("x"), "", "")
	tests := []string{
		"/_matrix/media/v3/download/test/..",
		"/_matrix/media/v3/download/../" + id,
		"/_matrix/media/v3/download/test/.",
		"/_matrix/media/v3/download/test/%2E%2E",
		"/_matrix/media/v3/download/test%2F..%2F..%2Fetc/" + id,
		"/_matrix/media/v3/download/test/a%2Fb",
		"/_matrix/media/v3/download/test/a%00b",
		"/_matrix/media/v3/download/te%00st/" + id,
		"/_matrix/media/v3/download/test/" + id + "/a%2Fb",
		"/_matrix/media/v3/download/test/" + id + "/a%00b",
		"/_matrix/media/v3/download/test/" + id + "/..",
		"/_matrix/media/v3/download/test/" + id + "/a%01b",
		"/_matrix/media/v3/download/test/" + id + "/%FF",
		"/_matrix/media/v3/download/bad%20name/" + id,
		"/_matrix/media/v3/download/bad_name/" + id,
		"/_matrix/media/v3/download/test:99999999/" + id,
		"/_matrix/media/v3/download/%5B%3A%3A1/" + id,
		"/_matrix/media/v3/download//" + id,
		"/_matrix/media/v3/download/test/",
		"/_matrix/media/v3/download/test/a.b",
		"/_matrix/media/v3/download/test/" + strings.Repeat("a", 256),
		"/_matrix/client/v1/media/download/test/a%2Fb",
		"/_matrix/client/v1/media/download/test/" + url.PathEscape("mxc://test/"+id),
	}
	for _, p := range tests {
		t.Run(p, func(t *testing.T) {
			rec := e.do(req{method: "GET", path: p, token: "alice"})
			expectError(t, rec, 400, "M_INVALID_PARAM")
		})
	}
	for _, p := range []string{"/_matrix/media/v3/upload/test/a%2Fb", "/_matrix/media/v3/upload/..%2Ftest/abc", "/_matrix/media/v3/upload/test/.."} {
		rec := e.do(req{method: "PUT", path: p, token: "alice", body: []byte("x")})
		expectError(t, rec, 400, "M_INVALID_PARAM")
	}
	// Invalid escapes cannot arrive through net/http (the request line is
	// rejected), but a RawPath set by an intermediary can: still 400.
	hr := httptest.NewRequest("GET", "http://media.test/_matrix/media/v3/download/test/x", nil)
	hr.URL.RawPath = "/_matrix/media/v3/download/test/%zz"
	hr.URL.Path = "/_matrix/media/v3/download/test/%zz"
	rec := httptestRecorder(e.site, hr)
	expectError(t, rec, 400, "M_INVALID_PARAM")
}

func TestDownloadNotFound(t *testing.T) {
	e := newEnv(t)
	id := e.upload("alice", []byte("x"), "", "")
	for _, p := range []string{
		"/_matrix/media/v3/download/test/doesnotexist",
		"/_matrix/media/v3/download/other.server/" + id,
		"/_matrix/media/v3/download/other.server:8448/" + id + "?allow_remote=true",
		"/_matrix/client/v1/media/download/test/doesnotexist/file.png",
		"/_matrix/client/v1/media/download/[::1]:8448/" + id,
	} {
		rec := e.do(req{method: "GET", path: p, token: "alice"})
		expectError(t, rec, 404, "M_NOT_FOUND")
	}
}

func TestFilenames(t *testing.T) {
	e := newEnv(t)
	names := []string{"ascii", "name with spaces", "name;with;semicolons", `"quoted"`, `back\slash`,
		"🐔", "☕", "%41", "a'b", strings.Repeat("ünïcødé ☃ ", 12)}
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			id := e.upload("alice", []byte("file "+name), "image/png", "?filename="+url.QueryEscape(name))
			check := func(path, token, want string) {
				t.Helper()
				rec := e.do(req{method: "GET", path: path, token: token})
				if rec.Code != 200 {
					t.Fatalf("%s: %d %s", path, rec.Code, rec.Body.String())
				}
				cd := rec.Header().Get("Content-Disposition")
				disp, params, err := mime.ParseMediaType(cd)
				if err != nil {
					t.Fatalf("%s: ParseMediaType(%q): %v", path, cd, err)
				}
				if disp != "inline" || params["filename"] != want {
					t.Fatalf("%s: %q parsed as %q %q, want inline %q", path, cd, disp, params["filename"], want)
				}
			}
			check("/_matrix/media/v3/download/test/"+id, "", name)
			check("/_matrix/client/v1/media/download/test/"+id, "alice", name)
			for _, override := range []string{"file.png", "☕", name} {
				check("/_matrix/media/v3/download/test/"+id+"/"+url.PathEscape(override), "", override)
				check("/_matrix/client/v1/media/download/test/"+id+"/"+url.PathEscape(override), "alice", override)
			}
		})
	}
	// No file name: no filename parameter; an empty trailing segment is none.
	id := e.upload("alice", []byte("anon"), "text/plain", "")
	for _, p := range []string{"/_matrix/media/v3/download/test/" + id, "/_matrix/media/v3/download/test/" + id + "/"} {
		rec := e.do(req{method: "GET", path: p})
		if cd := rec.Header().Get("Content-Disposition"); rec.Code != 200 || cd != "inline" {
			t.Fatalf("%s: %d Content-Disposition %q", p, rec.Code, cd)
		}
	}
}

func TestInlineVersusAttachment(t *testing.T) {
	e := newEnv(t)
	tests := []struct{ ct, disp string }{
		{"image/png", "inline"},
		{"Text/Plain; charset=utf-8", "inline"},
		{"video/mp4", "inline"},
		{"image/svg+xml", "attachment"},
		{"image/svg", "attachment"},
		{"text/html", "attachment"},
		{"text/javascript", "attachment"},
		{"application/octet-stream", "attachment"},
	}
	for _, tc := range tests {
		id := e.upload("alice", []byte("content of "+tc.ct), tc.ct, "?filename=f")
		for _, p := range []string{"/_matrix/media/v3/download/test/" + id, "/_matrix/client/v1/media/download/test/" + id + "/other"} {
			rec := e.do(req{method: "GET", path: p, token: "alice"})
			disp, _, err := mime.ParseMediaType(rec.Header().Get("Content-Disposition"))
			if err != nil || disp != tc.disp {
				t.Errorf("%s (%s): disposition %q (%v), want %q", tc.ct, p, disp, err, tc.disp)
			}
		}
	}
}

func TestRange(t *testing.T) {
	e := newEnv(t)
	content := []byte("0123456789abcdefghij") // 20 bytes
	id := e.upload("alice", content, "text/plain", "")
	path := "/_matrix/media/v3/download/test/" + id
	etag := e.do(req{method: "GET", path: path}).Header().Get("ETag")
	tests := []struct {
		name, rng, ifRange string
		status             int
		body               string
		contentRange       string
	}{
		{"closed", "bytes=2-5", "", 206, "2345", "bytes 2-5/20"},
		{"open", "bytes=15-", "", 206, "fghij", "bytes 15-19/20"},
		{"suffix", "bytes=-3", "", 206, "hij", "bytes 17-19/20"},
		{"suffix longer than content", "bytes=-50", "", 206, string(content), "bytes 0-19/20"},
		{"end past size", "bytes=18-100", "", 206, "ij", "bytes 18-19/20"},
		{"single byte", "bytes=0-0", "", 206, "0", "bytes 0-0/20"},
		{"whole", "bytes=0-", "", 206, string(content), "bytes 0-19/20"},
		{"unit case", "Bytes=1-1", "", 206, "1", "bytes 1-1/20"},
		{"if-range match", "bytes=1-2", etag, 206, "12", "bytes 1-2/20"},
		{"if-range mismatch", "bytes=1-2", `"other"`, 200, string(content), ""},
		{"if-range weak", "bytes=1-2", "W/" + etag, 200, string(content), ""},
		{"multi", "bytes=0-1,3-4", "", 200, string(content), ""},
		{"malformed", "bytes=abc", "", 200, string(content), ""},
		{"reversed", "bytes=5-2", "", 200, string(content), ""},
		{"other unit", "items=0-1", "", 200, string(content), ""},
		{"negative", "bytes=--1", "", 200, string(content), ""},
		{"overflow", "bytes=0-99999999999999999999", "", 200, string(content), ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := map[string]string{"Range": tc.rng}
			if tc.ifRange != "" {
				h["If-Range"] = tc.ifRange
			}
			rec := e.do(req{method: "GET", path: path, header: h})
			if rec.Code != tc.status || rec.Body.String() != tc.body {
				t.Fatalf("got %d %q, want %d %q", rec.Code, rec.Body.String(), tc.status, tc.body)
			}
			if got := rec.Header().Get("Content-Range"); got != tc.contentRange {
				t.Fatalf("Content-Range %q, want %q", got, tc.contentRange)
			}
			if got := rec.Header().Get("Content-Length"); got != strconv.Itoa(len(tc.body)) {
				t.Fatalf("Content-Length %q, body %d", got, len(tc.body))
			}
		})
	}
	for _, rng := range []string{"bytes=20-", "bytes=100-200", "bytes=-0"} {
		rec := e.do(req{method: "GET", path: path, header: map[string]string{"Range": rng}})
		expectError(t, rec, 416, "M_UNKNOWN")
		if got := rec.Header().Get("Content-Range"); got != "bytes */20" {
			t.Fatalf("%s: Content-Range %q", rng, got)
		}
	}
}

func TestHead(t *testing.T) {
	e := newEnv(t)
	id := e.upload("alice", []byte("head body"), "image/png", "?filename=a.png")
	for _, tc := range []struct{ path, token string }{
		{"/_matrix/media/v3/download/test/" + id, ""},
		{"/_matrix/client/v1/media/download/test/" + id + "/b.png", "alice"},
	} {
		rec := e.do(req{method: "HEAD", path: tc.path, token: tc.token})
		if rec.Code != 200 || rec.Body.Len() != 0 {
			t.Fatalf("HEAD %s: %d body %d", tc.path, rec.Code, rec.Body.Len())
		}
		if rec.Header().Get("Content-Length") != "9" || rec.Header().Get("Content-Type") != "image/png" ||
			rec.Header().Get("ETag") == "" || !strings.HasPrefix(rec.Header().Get("Content-Disposition"), "inline; filename=") {
			t.Fatalf("HEAD %s headers %v", tc.path, rec.Header())
		}
	}
	rec := e.do(req{method: "HEAD", path: "/_matrix/media/v3/download/test/" + id, header: map[string]string{"Range": "bytes=1-2"}})
	if rec.Code != 206 || rec.Body.Len() != 0 || rec.Header().Get("Content-Length") != "2" {
		t.Fatalf("HEAD range: %d %d %q", rec.Code, rec.Body.Len(), rec.Header().Get("Content-Length"))
	}
}

func TestConditionalRequests(t *testing.T) {
	e := newEnv(t)
	id := e.upload("alice", []byte("cache me"), "text/plain", "")
	path := "/_matrix/client/v1/media/download/test/" + id
	first := e.do(req{method: "GET", path: path, token: "alice"})
	etag := first.Header().Get("ETag")
	lastMod := first.Header().Get("Last-Modified")
	if len(etag) != 66 {
		t.Fatalf("ETag %q", etag)
	}
	tests := []struct {
		name   string
		header map[string]string
		status int
	}{
		{"exact", map[string]string{"If-None-Match": etag}, 304},
		{"weak", map[string]string{"If-None-Match": "W/" + etag}, 304},
		{"list", map[string]string{"If-None-Match": `"a", ` + etag + `, "b"`}, 304},
		{"star", map[string]string{"If-None-Match": "*"}, 304},
		{"other", map[string]string{"If-None-Match": `"nope"`}, 200},
		{"ims equal", map[string]string{"If-Modified-Since": lastMod}, 304},
		{"ims old", map[string]string{"If-Modified-Since": "Mon, 02 Jan 2006 15:04:05 GMT"}, 200},
		{"inm wins over ims", map[string]string{"If-None-Match": `"nope"`, "If-Modified-Since": lastMod}, 200},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := e.do(req{method: "GET", path: path, token: "alice", header: tc.header})
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d", rec.Code, tc.status)
			}
			if tc.status == 304 {
				if rec.Body.Len() != 0 || rec.Header().Get("ETag") != etag {
					t.Fatalf("304 body %d ETag %q", rec.Body.Len(), rec.Header().Get("ETag"))
				}
				expectCORS(t, rec.Header())
			} else if rec.Body.String() != "cache me" {
				t.Fatalf("body %q", rec.Body.String())
			}
		})
	}
	// Auth comes first.
	rec := e.do(req{method: "GET", path: path, header: map[string]string{"If-None-Match": etag}})
	expectError(t, rec, 401, "M_MISSING_TOKEN")
}

func TestDedup(t *testing.T) {
	e := newEnv(t)
	other, err := NewSite(SiteConfig{ServerName: "other.example:8448"}, e.repo, e.site.auth)
	if err != nil {
		t.Fatal(err)
	}
	content := bytes.Repeat([]byte("dedup me please "), 10000) // 160 KB, over the prefix size
	id1 := e.upload("alice", content, "application/octet-stream", "")
	id2 := e.upload("bob", content, "image/png", "?filename=copy.png")
	rec := serve(other, req{method: "POST", path: "/_matrix/media/v3/upload", token: "alice", body: content})
	if rec.Code != 200 {
		t.Fatalf("upload on second site: %d %s", rec.Code, rec.Body.String())
	}
	id3 := mediaIDFromURI(t, rec, "other.example:8448")
	// Chunked (no prefix lookup possible) still dedups in the store.
	rec = e.do(req{method: "POST", path: "/_matrix/media/v3/upload", token: "alice", body: content, chunked: true})
	if rec.Code != 200 {
		t.Fatalf("chunked upload: %d", rec.Code)
	}

	files := e.blobFiles()
	if len(files) != 1 {
		t.Fatalf("%d blob files, want 1: %v", len(files), files)
	}
	m1, err := e.sql.GetMedia(context.Background(), testServer, id1)
	if err != nil {
		t.Fatal(err)
	}
	m3, err := e.sql.GetMedia(context.Background(), "other.example:8448", id3)
	if err != nil {
		t.Fatal(err)
	}
	if m1.SHA256 != m3.SHA256 {
		t.Fatal("different hashes for the same bytes")
	}
	n, err := e.sql.CountBlobReferences(context.Background(), m1.SHA256)
	if err != nil || n != 4 {
		t.Fatalf("references = %d (%v), want 4", n, err)
	}
	// Each media keeps its own metadata.
	rec = e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id2})
	if rec.Header().Get("Content-Type") != "image/png" || !bytes.Equal(rec.Body.Bytes(), content) {
		t.Fatalf("dedup'd download: %q %d bytes", rec.Header().Get("Content-Type"), rec.Body.Len())
	}
	rec = serve(other, req{method: "GET", path: "/_matrix/media/v3/download/other.example:8448/" + id3})
	if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), content) {
		t.Fatalf("second site download: %d", rec.Code)
	}
	// Media of one site is served by the other from the shared store
	// (sibling sites; TestSiblingSites covers the rest).
	rec = serve(other, req{method: "GET", path: "/_matrix/media/v3/download/test/" + id1})
	if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), content) {
		t.Fatalf("sibling site download: %d", rec.Code)
	}
}

// httptestRecorder serves a prepared request.
func httptestRecorder(h http.Handler, r *http.Request) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r)
	return rec
}
