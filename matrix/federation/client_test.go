package federation

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

const testOrigin = "origin.test"

// seenRequest is what the fake remote recorded about one request.
type seenRequest struct {
	path, rawQuery, requestURI, host, sni, auth string
	query                                       url.Values
}

// fakeRemote is an httptest TLS server standing in for a remote
// homeserver. Its handler can be swapped during a test.
type fakeRemote struct {
	srv  *httptest.Server
	name string // server name: "127.0.0.1:port"

	mu      sync.Mutex
	handler http.HandlerFunc
	seen    []seenRequest
}

func newFakeRemote(t *testing.T, h http.HandlerFunc) *fakeRemote {
	t.Helper()
	f := &fakeRemote{handler: h}
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sr := seenRequest{
			path: r.URL.Path, rawQuery: r.URL.RawQuery, requestURI: r.RequestURI,
			host: r.Host, auth: r.Header.Get("Authorization"), query: r.URL.Query(),
		}
		if r.TLS != nil {
			sr.sni = r.TLS.ServerName
		}
		f.mu.Lock()
		f.seen = append(f.seen, sr)
		h := f.handler
		f.mu.Unlock()
		h(w, r)
	}))
	f.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	f.srv.StartTLS()
	t.Cleanup(f.srv.Close)
	f.name = f.srv.Listener.Addr().String()
	return f
}

func (f *fakeRemote) setHandler(h http.HandlerFunc) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.handler = h
}

func (f *fakeRemote) requests() []seenRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]seenRequest(nil), f.seen...)
}

// testKey is one signing key shared by the tests.
var testKey = func() xmatrix.SigningKey {
	k, err := xmatrix.GenerateSigningKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}()

// loopbackGuard allows loopback addresses only (besides public ones).
func loopbackGuard() Guard {
	return Guard{AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}}
}

// newTestMediaClient builds a MediaClient trusting f's certificate; mod
// may adjust the options.
func newTestMediaClient(t *testing.T, f *fakeRemote, mod func(*ClientOptions)) *MediaClient {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(f.srv.Certificate())
	opts := ClientOptions{
		Origin:    testOrigin,
		Key:       testKey,
		Guard:     loopbackGuard(),
		TLSConfig: &tls.Config{RootCAs: pool},
	}
	if mod != nil {
		mod(&opts)
	}
	c, err := NewMediaClient(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// verifyXMatrix checks the X-Matrix header of a recorded request against
// testKey, the test origin and destination.
func verifyXMatrix(sr seenRequest, destination string) error {
	a, err := xmatrix.ParseAuthorization(sr.auth)
	if err != nil {
		return err
	}
	if a.Origin != testOrigin || a.Destination != destination || a.KeyID != testKey.ID {
		return fmt.Errorf("header origin=%q destination=%q key=%q", a.Origin, a.Destination, a.KeyID)
	}
	obj := map[string]any{
		"method":      "GET",
		"uri":         sr.requestURI,
		"origin":      a.Origin,
		"destination": a.Destination,
		"signatures":  map[string]any{a.Origin: map[string]any{a.KeyID: a.Signature}},
	}
	return xmatrix.VerifyJSON(obj, testOrigin, testKey.ID, testKey.Public())
}

// serveMultipart answers with the federation multipart form.
func serveMultipart(ct, cd, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		_ = WriteMediaResponse(w, ct, cd, strings.NewReader(body), int64(len(body)))
	}
}

// serveError answers with a status and raw body.
func serveError(status int, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(body, "{") {
			w.Header().Set("Content-Type", "application/json")
		}
		w.WriteHeader(status)
		io.WriteString(w, body)
	}
}

func readAll(t *testing.T, m Media) string {
	t.Helper()
	defer m.Body.Close()
	b, err := io.ReadAll(m.Body)
	if err != nil {
		t.Fatalf("reading body: %v", err)
	}
	return string(b)
}

func TestMediaClientDownloadMultipart(t *testing.T) {
	f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/_matrix/federation/v1/media/download/abcDEF_-1" {
			http.NotFound(w, r)
			return
		}
		serveMultipart("text/plain", `inline; filename="a.txt"`, "hello media")(w, r)
	})
	// "example.com" is in the httptest certificate; the resolver maps it
	// to the loopback server (explicit port: no well-known, no SRV).
	_, port, _ := net.SplitHostPort(f.name)
	named := "example.com:" + port
	resolver := &Resolver{Lookup: LookupFuncs{LookupIPAddr: func(_ context.Context, host string) ([]net.IPAddr, error) {
		if host != "example.com" {
			return nil, fmt.Errorf("unexpected lookup %q", host)
		}
		return []net.IPAddr{{IP: net.ParseIP("127.0.0.1")}}, nil
	}}}

	tests := []struct {
		name   string
		server string
		sni    string
	}{
		{"ip literal", f.name, ""},
		{"host name", named, "example.com"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var results []string
			var bytesSeen int64
			c := newTestMediaClient(t, f, func(o *ClientOptions) {
				o.Resolver = resolver
				o.Observer = func(result string, n int64, _ time.Duration) {
					results = append(results, result)
					bytesSeen = n
				}
			})
			before := len(f.requests())
			m, err := c.Download(context.Background(), tc.server, "abcDEF_-1", 3*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if m.ContentType != "text/plain" || m.ContentDisposition != `inline; filename="a.txt"` || m.Size != int64(len("hello media")) {
				t.Errorf("media = %+v", m)
			}
			if got := readAll(t, m); got != "hello media" {
				t.Errorf("body = %q", got)
			}
			reqs := f.requests()[before:]
			if len(reqs) != 1 {
				t.Fatalf("got %d requests, want 1", len(reqs))
			}
			sr := reqs[0]
			if sr.requestURI != "/_matrix/federation/v1/media/download/abcDEF_-1?timeout_ms=3000" {
				t.Errorf("request URI = %q", sr.requestURI)
			}
			if sr.host != tc.server {
				t.Errorf("Host = %q, want %q", sr.host, tc.server)
			}
			if sr.sni != tc.sni {
				t.Errorf("SNI = %q, want %q", sr.sni, tc.sni)
			}
			if err := verifyXMatrix(sr, tc.server); err != nil {
				t.Errorf("X-Matrix: %v", err)
			}
			if len(results) != 1 || results[0] != ResultOK || bytesSeen != int64(len("hello media")) {
				t.Errorf("observer got %v / %d bytes", results, bytesSeen)
			}
		})
	}
}

func TestMediaClientXMatrixRejectsTamperedURI(t *testing.T) {
	// The verification helper must be able to fail: a signature checked
	// against another URI does not verify.
	f := newFakeRemote(t, serveMultipart("text/plain", "", "x"))
	c := newTestMediaClient(t, f, nil)
	m, err := c.Download(context.Background(), f.name, "abc", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, m)
	sr := f.requests()[0]
	if err := verifyXMatrix(sr, f.name); err != nil {
		t.Fatalf("genuine request: %v", err)
	}
	sr.requestURI += "&x=1"
	if err := verifyXMatrix(sr, f.name); err == nil {
		t.Fatal("tampered URI verified")
	}
	sr.requestURI = f.requests()[0].requestURI
	if err := verifyXMatrix(sr, "other.test"); err == nil {
		t.Fatal("wrong destination verified")
	}
}

func TestMediaClientDownloadLocation(t *testing.T) {
	var f *fakeRemote
	f = newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/_matrix/federation/v1/media/download/loc1":
			_ = WriteMediaRedirect(w, f.srv.URL+"/cdn/first")
		case "/cdn/first":
			http.Redirect(w, r, "/cdn/second", http.StatusFound)
		case "/cdn/second":
			w.Header().Set("Content-Type", "image/png")
			w.Header().Set("Content-Disposition", "inline")
			io.WriteString(w, "PNGDATA")
		default:
			http.NotFound(w, r)
		}
	})
	c := newTestMediaClient(t, f, nil)
	m, err := c.Download(context.Background(), f.name, "loc1", 0)
	if err != nil {
		t.Fatal(err)
	}
	if m.ContentType != "image/png" || m.ContentDisposition != "inline" || m.Size != 7 {
		t.Errorf("media = %+v", m)
	}
	if got := readAll(t, m); got != "PNGDATA" {
		t.Errorf("body = %q", got)
	}
	reqs := f.requests()
	if len(reqs) != 3 {
		t.Fatalf("got %d requests, want 3", len(reqs))
	}
	if reqs[0].auth == "" || !strings.Contains(reqs[0].rawQuery, "timeout_ms=20000") {
		t.Errorf("federation request: auth=%q query=%q", reqs[0].auth, reqs[0].rawQuery)
	}
	for _, sr := range reqs[1:] {
		if sr.auth != "" {
			t.Errorf("request to %s carried Authorization %q", sr.path, sr.auth)
		}
	}
}

func TestMediaClientLocationDenied(t *testing.T) {
	plain := newAcceptCounter(t, "127.0.0.1:0")
	tests := []struct {
		name     string
		location string
		guard    func(*Guard)
	}{
		{"metadata IP", "https://169.254.169.254/latest/meta-data", nil},
		{"private IP", "https://10.0.0.1/media", nil},
		{"plain http to allowed address", "http://" + plain.ln.Addr().String() + "/media", nil},
		{"name resolving to private IP", "https://cdn.internal.test/media", func(g *Guard) {
			g.LookupNetIP = stubLookup(map[string][]string{"cdn.internal.test": {"10.0.0.1"}})
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
				_ = WriteMediaRedirect(w, tc.location)
			})
			c := newTestMediaClient(t, f, func(o *ClientOptions) {
				if tc.guard != nil {
					tc.guard(&o.Guard)
				}
			})
			_, err := c.Download(context.Background(), f.name, "m", time.Second)
			if !errors.Is(err, ErrUnavailable) || !errors.Is(err, ErrAddressDenied) {
				t.Fatalf("err = %v, want ErrUnavailable and ErrAddressDenied", err)
			}
			if n := len(f.requests()); n != 1 {
				t.Errorf("remote saw %d requests, want 1", n)
			}
		})
	}
	if n := plain.n.Load(); n != 0 {
		t.Errorf("plain http listener accepted %d connections", n)
	}
}

func TestMediaClientFallback(t *testing.T) {
	tests := []struct {
		name       string
		fed        http.HandlerFunc
		wantLegacy bool
		wantErr    error
	}{
		{"404 M_UNRECOGNIZED", serveError(404, `{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`), true, nil},
		{"405 M_UNRECOGNIZED", serveError(405, `{"errcode":"M_UNRECOGNIZED"}`), true, nil},
		{"400 M_UNRECOGNIZED", serveError(400, `{"errcode":"M_UNRECOGNIZED"}`), true, nil},
		{"404 empty body", serveError(404, ""), true, nil},
		{"404 html", serveError(404, "<html>not found</html>"), true, nil},
		{"404 M_NOT_FOUND", serveError(404, `{"errcode":"M_NOT_FOUND","error":"gone"}`), false, ErrNotFound},
		{"400 M_UNKNOWN", serveError(400, `{"errcode":"M_UNKNOWN"}`), false, ErrUnavailable},
		{"400 non-JSON", serveError(400, "bad origin"), false, ErrUnavailable},
		{"500", serveError(500, ""), false, ErrUnavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var f *fakeRemote
			f = newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
				if strings.HasPrefix(r.URL.Path, "/_matrix/federation/") {
					tc.fed(w, r)
					return
				}
				if r.URL.Path == "/_matrix/media/v3/download/"+f.name+"/fb1" {
					w.Header().Set("Content-Type", "application/pdf")
					w.Header().Set("Content-Disposition", `attachment; filename="x.pdf"`)
					io.WriteString(w, "legacy bytes")
					return
				}
				http.NotFound(w, r)
			})
			c := newTestMediaClient(t, f, nil)
			m, err := c.Download(context.Background(), f.name, "fb1", 2*time.Second)
			reqs := f.requests()
			if !tc.wantLegacy {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if len(reqs) != 1 {
					t.Fatalf("got %d requests, want 1 (no fallback)", len(reqs))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := readAll(t, m); got != "legacy bytes" {
				t.Errorf("body = %q", got)
			}
			if m.ContentType != "application/pdf" || m.ContentDisposition != `attachment; filename="x.pdf"` || m.Size != 12 {
				t.Errorf("media = %+v", m)
			}
			if len(reqs) != 2 {
				t.Fatalf("got %d requests, want 2", len(reqs))
			}
			lr := reqs[1]
			q := lr.query
			if q.Get("allow_remote") != "false" || q.Get("timeout_ms") != "2000" || q.Get("allow_redirect") != "true" {
				t.Errorf("legacy query = %q", lr.rawQuery)
			}
			if err := verifyXMatrix(lr, f.name); err != nil {
				t.Errorf("legacy X-Matrix: %v", err)
			}
		})
	}
}

func TestMediaClientFallbackRedirect(t *testing.T) {
	f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasPrefix(r.URL.Path, "/_matrix/federation/"):
			serveError(404, `{"errcode":"M_UNRECOGNIZED"}`)(w, r)
		case strings.HasPrefix(r.URL.Path, "/_matrix/media/v3/download/"):
			http.Redirect(w, r, "/cdn/legacy", http.StatusTemporaryRedirect)
		case r.URL.Path == "/cdn/legacy":
			w.Header().Set("Content-Type", "text/plain")
			io.WriteString(w, "from cdn")
		default:
			http.NotFound(w, r)
		}
	})
	c := newTestMediaClient(t, f, nil)
	m, err := c.Download(context.Background(), f.name, "r1", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, m); got != "from cdn" {
		t.Errorf("body = %q", got)
	}
	reqs := f.requests()
	if len(reqs) != 3 || reqs[2].path != "/cdn/legacy" || reqs[2].auth != "" {
		t.Fatalf("requests = %+v", reqs)
	}

	// An endless redirect loop stops after MaxRedirects hops.
	f.setHandler(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/_matrix/federation/") {
			serveError(404, `{"errcode":"M_UNRECOGNIZED"}`)(w, r)
			return
		}
		http.Redirect(w, r, "/loop", http.StatusFound)
	})
	before := len(f.requests())
	if _, err := c.Download(context.Background(), f.name, "r2", time.Second); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("loop: err = %v, want ErrUnavailable", err)
	}
	// federation + legacy + MaxRedirects-1 followed hops.
	if n := len(f.requests()) - before; n != 2+MaxRedirects-1+1 {
		t.Errorf("loop made %d requests", n)
	}
}

func TestMediaClientDownloadErrors(t *testing.T) {
	tests := []struct {
		name    string
		h       http.HandlerFunc
		wantErr error
		status  int
	}{
		{"404 M_NOT_FOUND", serveError(404, `{"errcode":"M_NOT_FOUND"}`), ErrNotFound, 404},
		{"504 M_NOT_YET_UPLOADED", serveError(504, `{"errcode":"M_NOT_YET_UPLOADED"}`), ErrNotYetUploaded, 504},
		{"504 from proxy", serveError(504, "gateway timeout"), ErrUnavailable, 504},
		{"502 M_TOO_LARGE", serveError(502, `{"errcode":"M_TOO_LARGE"}`), ErrRemoteTooLarge, 502},
		{"413", serveError(413, `{"errcode":"M_TOO_LARGE"}`), ErrRemoteTooLarge, 413},
		{"502 other", serveError(502, `{"errcode":"M_UNKNOWN"}`), ErrUnavailable, 502},
		{"500", serveError(500, "boom"), ErrUnavailable, 500},
		{"429", serveError(429, `{"errcode":"M_LIMIT_EXCEEDED"}`), ErrUnavailable, 429},
		{"403", serveError(403, `{"errcode":"M_FORBIDDEN"}`), ErrUnavailable, 403},
		{"200 not multipart", serveError(200, "raw bytes"), ErrUnavailable, 0},
		{"top-level redirect", func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "/elsewhere", http.StatusTemporaryRedirect)
		}, ErrUnavailable, 307},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeRemote(t, tc.h)
			c := newTestMediaClient(t, f, nil)
			_, err := c.Download(context.Background(), f.name, "e1", time.Second)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			for _, other := range []error{ErrNotFound, ErrNotYetUploaded, ErrRemoteTooLarge, ErrUnavailable} {
				if other != tc.wantErr && errors.Is(err, other) {
					t.Errorf("err %v also wraps %v", err, other)
				}
			}
			var re *RemoteError
			if tc.status != 0 && (!errors.As(err, &re) || re.Status != tc.status) {
				t.Errorf("RemoteError = %+v, want status %d", re, tc.status)
			}
			if n := len(f.requests()); n != 1 {
				t.Errorf("got %d requests, want 1", n)
			}
		})
	}
}

func TestMediaClientInvalidInput(t *testing.T) {
	f := newFakeRemote(t, serveMultipart("text/plain", "", "x"))
	c := newTestMediaClient(t, f, nil)
	for _, tc := range []struct{ server, id string }{
		{f.name, "../etc"}, {f.name, "a/b"}, {f.name, ""}, {f.name, "a?b"}, {"bad host!", "abc"},
	} {
		if _, err := c.Download(context.Background(), tc.server, tc.id, time.Second); !errors.Is(err, ErrNotFound) {
			t.Errorf("Download(%q, %q) err = %v, want ErrNotFound", tc.server, tc.id, err)
		}
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("got %d requests, want 0", n)
	}
}

// bigStream serves n bytes of media without announcing the length.
func bigStream(n int) string { return strings.Repeat("z", n) }

func TestMediaClientTooLarge(t *testing.T) {
	t.Run("multipart streamed", func(t *testing.T) {
		f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
			_ = WriteMediaResponse(w, "application/octet-stream", "", strings.NewReader(bigStream(5000)), -1)
		})
		c := newTestMediaClient(t, f, func(o *ClientOptions) { o.MaxBytes = 1000 })
		var result string
		c.opts.Observer = func(r string, _ int64, _ time.Duration) { result = r }
		m, err := c.Download(context.Background(), f.name, "big", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(m.Body)
		m.Body.Close()
		if !errors.Is(err, ErrRemoteTooLarge) {
			t.Fatalf("read err = %v, want ErrRemoteTooLarge", err)
		}
		if len(b) != 1000 {
			t.Errorf("read %d bytes before the error, want 1000", len(b))
		}
		if result != ResultTooLarge {
			t.Errorf("observer result = %q", result)
		}
	})
	t.Run("multipart exactly at limit", func(t *testing.T) {
		f := newFakeRemote(t, serveMultipart("application/octet-stream", "", bigStream(1000)))
		c := newTestMediaClient(t, f, func(o *ClientOptions) { o.MaxBytes = 1000 })
		m, err := c.Download(context.Background(), f.name, "fits", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, m); len(got) != 1000 {
			t.Errorf("read %d bytes", len(got))
		}
	})
	legacy := func(announce bool) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			if strings.HasPrefix(r.URL.Path, "/_matrix/federation/") {
				serveError(404, `{"errcode":"M_UNRECOGNIZED"}`)(w, r)
				return
			}
			if announce {
				w.Header().Set("Content-Length", "5000")
			}
			w.WriteHeader(200)
			for i := 0; i < 5; i++ {
				io.WriteString(w, bigStream(1000))
				w.(http.Flusher).Flush()
			}
		}
	}
	t.Run("legacy announced length", func(t *testing.T) {
		f := newFakeRemote(t, legacy(true))
		c := newTestMediaClient(t, f, func(o *ClientOptions) { o.MaxBytes = 1000 })
		if _, err := c.Download(context.Background(), f.name, "big", time.Second); !errors.Is(err, ErrRemoteTooLarge) {
			t.Fatalf("err = %v, want ErrRemoteTooLarge", err)
		}
	})
	t.Run("legacy chunked", func(t *testing.T) {
		f := newFakeRemote(t, legacy(false))
		c := newTestMediaClient(t, f, func(o *ClientOptions) { o.MaxBytes = 1000 })
		m, err := c.Download(context.Background(), f.name, "big", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Body.Close()
		if m.Size != -1 {
			t.Errorf("size = %d, want -1", m.Size)
		}
		if _, err := io.ReadAll(m.Body); !errors.Is(err, ErrRemoteTooLarge) {
			t.Fatalf("read err = %v, want ErrRemoteTooLarge", err)
		}
	})
}

func TestMediaClientBreaker(t *testing.T) {
	clock := testclock.New(time.Unix(1_700_000_000, 0))
	f := newFakeRemote(t, serveError(500, "down"))
	var mu sync.Mutex
	var results []string
	c := newTestMediaClient(t, f, func(o *ClientOptions) {
		o.BreakerThreshold = 3
		o.BreakerCooldown = time.Minute
		o.FailureTTL = -1 // test the breaker alone
		o.Now = clock.Now
		o.Observer = func(r string, _ int64, _ time.Duration) {
			mu.Lock()
			results = append(results, r)
			mu.Unlock()
		}
	})
	ctx := context.Background()
	for i := 0; i < 3; i++ {
		if _, err := c.Download(ctx, f.name, fmt.Sprintf("m%d", i), time.Second); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("call %d: err = %v", i, err)
		}
	}
	if n := len(f.requests()); n != 3 {
		t.Fatalf("got %d requests, want 3", n)
	}
	// Open: no request reaches the server, other media included.
	for i := 0; i < 3; i++ {
		_, err := c.Download(ctx, f.name, "other", time.Second)
		if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "circuit breaker open") {
			t.Fatalf("open breaker: err = %v", err)
		}
		if _, err := c.Thumbnail(ctx, f.name, "other", 32, 32, "crop", false, time.Second); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("open breaker thumbnail: err = %v", err)
		}
	}
	if n := len(f.requests()); n != 3 {
		t.Fatalf("open breaker let %d requests through", n-3)
	}
	mu.Lock()
	if got := results[len(results)-1]; got != ResultBreakerOpen {
		t.Errorf("observer result = %q, want %q", got, ResultBreakerOpen)
	}
	mu.Unlock()

	// Other servers are unaffected.
	g := newFakeRemote(t, serveMultipart("text/plain", "", "fine"))
	// (httptest servers all use the same certificate.)
	m, err := c.Download(ctx, g.name, "ok", time.Second)
	if err != nil {
		t.Fatalf("other server: %v", err)
	}
	readAll(t, m)

	// After the cooldown one trial goes through; it fails and re-opens.
	clock.Advance(time.Minute + time.Second)
	if _, err := c.Download(ctx, f.name, "trial1", time.Second); !errors.Is(err, ErrUnavailable) {
		t.Fatal(err)
	}
	if n := len(f.requests()); n != 4 {
		t.Fatalf("got %d requests after cooldown, want 4", n)
	}
	if _, err := c.Download(ctx, f.name, "trial1b", time.Second); err == nil || !strings.Contains(err.Error(), "circuit breaker open") {
		t.Fatalf("after failed trial: err = %v", err)
	}
	// Next trial succeeds and closes the breaker.
	clock.Advance(time.Minute + time.Second)
	f.setHandler(serveMultipart("text/plain", "", "back"))
	m, err = c.Download(ctx, f.name, "trial2", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, m)
	for i := 0; i < 2; i++ {
		m, err := c.Download(ctx, f.name, "after", time.Second)
		if err != nil {
			t.Fatalf("closed breaker: %v", err)
		}
		readAll(t, m)
	}
	if n := len(f.requests()); n != 7 {
		t.Errorf("got %d requests, want 7", n)
	}
}

func TestMediaClientBreakerIgnores4xx(t *testing.T) {
	tests := []struct {
		name    string
		h       http.HandlerFunc
		wantErr error
	}{
		{"404", serveError(404, `{"errcode":"M_NOT_FOUND"}`), ErrNotFound},
		{"403", serveError(403, `{"errcode":"M_FORBIDDEN"}`), ErrUnavailable},
		{"400", serveError(400, `{"errcode":"M_UNKNOWN"}`), ErrUnavailable},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeRemote(t, tc.h)
			c := newTestMediaClient(t, f, func(o *ClientOptions) {
				o.BreakerThreshold = 2
				o.FailureTTL = -1
			})
			for i := 0; i < 4; i++ {
				if _, err := c.Download(context.Background(), f.name, "nf", time.Second); !errors.Is(err, tc.wantErr) {
					t.Fatalf("call %d: err = %v", i, err)
				}
			}
			if n := len(f.requests()); n != 4 {
				t.Errorf("got %d requests, want 4 (answers of a live server must not open the breaker)", n)
			}
		})
	}
}

func TestMediaClientFailureCache(t *testing.T) {
	clock := testclock.New(time.Unix(1_700_000_000, 0))
	f := newFakeRemote(t, serveError(404, `{"errcode":"M_NOT_FOUND"}`))
	var cached atomic.Int32
	c := newTestMediaClient(t, f, func(o *ClientOptions) {
		o.FailureTTL = 30 * time.Second
		o.Now = clock.Now
		o.Observer = func(r string, _ int64, _ time.Duration) {
			if r == ResultCachedFailure {
				cached.Add(1)
			}
		}
	})
	ctx := context.Background()
	for i := 0; i < 3; i++ {
		if _, err := c.Download(ctx, f.name, "gone", time.Second); !errors.Is(err, ErrNotFound) {
			t.Fatalf("call %d: err = %v", i, err)
		}
	}
	if n := len(f.requests()); n != 1 {
		t.Fatalf("got %d requests within the TTL, want 1", n)
	}
	if cached.Load() != 2 {
		t.Errorf("cached-failure observations = %d, want 2", cached.Load())
	}
	// A thumbnail of the same media is a different entry.
	if _, err := c.Thumbnail(ctx, f.name, "gone", 32, 32, "crop", false, time.Second); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
	if n := len(f.requests()); n != 2 {
		t.Fatalf("thumbnail did not reach the server: %d requests", n)
	}
	// Unavailability is remembered too.
	f.setHandler(serveError(503, ""))
	for i := 0; i < 2; i++ {
		if _, err := c.Download(ctx, f.name, "flaky", time.Second); !errors.Is(err, ErrUnavailable) {
			t.Fatal(err)
		}
	}
	if n := len(f.requests()); n != 3 {
		t.Fatalf("got %d requests, want 3", n)
	}
	// After the TTL the server is asked again.
	clock.Advance(31 * time.Second)
	f.setHandler(serveMultipart("text/plain", "", "now here"))
	m, err := c.Download(ctx, f.name, "gone", time.Second)
	if err != nil {
		t.Fatalf("after TTL: %v", err)
	}
	if got := readAll(t, m); got != "now here" {
		t.Errorf("body = %q", got)
	}
}

func TestMediaClientThumbnail(t *testing.T) {
	f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/_matrix/federation/v1/media/thumbnail/th1" {
			http.NotFound(w, r)
			return
		}
		serveMultipart("image/png", "inline", "thumbbytes")(w, r)
	})
	c := newTestMediaClient(t, f, nil)
	m, err := c.Thumbnail(context.Background(), f.name, "th1", 96, 48, "crop", true, 1500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, m); got != "thumbbytes" || m.ContentType != "image/png" {
		t.Errorf("thumbnail = %q %q", got, m.ContentType)
	}
	sr := f.requests()[0]
	want := url.Values{"width": {"96"}, "height": {"48"}, "method": {"crop"}, "animated": {"true"}, "timeout_ms": {"1500"}}
	if sr.query.Encode() != want.Encode() {
		t.Errorf("query = %q, want %q", sr.query.Encode(), want.Encode())
	}
	if err := verifyXMatrix(sr, f.name); err != nil {
		t.Errorf("X-Matrix: %v", err)
	}
}

func TestMediaClientThumbnailFallback(t *testing.T) {
	var f *fakeRemote
	f = newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/_matrix/federation/v1/media/thumbnail/th2":
			serveError(404, `{"errcode":"M_UNRECOGNIZED"}`)(w, r)
		case "/_matrix/media/v3/thumbnail/" + f.name + "/th2":
			w.Header().Set("Content-Type", "image/jpeg")
			io.WriteString(w, "jpeg")
		default:
			http.NotFound(w, r)
		}
	})
	c := newTestMediaClient(t, f, nil)
	m, err := c.Thumbnail(context.Background(), f.name, "th2", 320, 240, "scale", false, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, m); got != "jpeg" || m.ContentType != "image/jpeg" {
		t.Errorf("thumbnail = %q %q", got, m.ContentType)
	}
	reqs := f.requests()
	if len(reqs) != 2 {
		t.Fatalf("got %d requests", len(reqs))
	}
	want := url.Values{"width": {"320"}, "height": {"240"}, "method": {"scale"}, "animated": {"false"},
		"allow_remote": {"false"}, "timeout_ms": {"20000"}, "allow_redirect": {"true"}}
	if reqs[1].query.Encode() != want.Encode() {
		t.Errorf("legacy query = %q, want %q", reqs[1].query.Encode(), want.Encode())
	}
	if err := verifyXMatrix(reqs[1], f.name); err != nil {
		t.Errorf("legacy X-Matrix: %v", err)
	}
}

func TestMediaClientTimeouts(t *testing.T) {
	t.Run("header timeout", func(t *testing.T) {
		release := make(chan struct{})
		f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		defer close(release)
		c := newTestMediaClient(t, f, func(o *ClientOptions) { o.HeaderTimeout = 200 * time.Millisecond })
		start := time.Now()
		_, err := c.Download(context.Background(), f.name, "slow", time.Millisecond)
		if !errors.Is(err, ErrUnavailable) || !errors.Is(err, errHeaderTimeout) {
			t.Fatalf("err = %v, want header timeout", err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("took %v", d)
		}
	})
	t.Run("whole request timeout during body", func(t *testing.T) {
		release := make(chan struct{})
		f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "multipart/mixed; boundary=b")
			w.WriteHeader(200)
			io.WriteString(w, "--b\r\n\r\n{}\r\n--b\r\nContent-Type: text/plain\r\n\r\nfirst part of the body ")
			w.(http.Flusher).Flush()
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		defer close(release)
		c := newTestMediaClient(t, f, func(o *ClientOptions) { o.Timeout = 300 * time.Millisecond })
		m, err := c.Download(context.Background(), f.name, "stall", time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Body.Close()
		if b, err := io.ReadAll(m.Body); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("read err = %v, want ErrUnavailable (read %q)", err, b)
		}
	})
	t.Run("caller cancel is not cached", func(t *testing.T) {
		f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
		c := newTestMediaClient(t, f, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		if _, err := c.Download(ctx, f.name, "c1", time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v", err)
		}
		f.setHandler(serveMultipart("text/plain", "", "ok"))
		m, err := c.Download(context.Background(), f.name, "c1", time.Millisecond)
		if err != nil {
			t.Fatalf("second call: %v", err)
		}
		readAll(t, m)
	})
}

func TestMediaClientConcurrent(t *testing.T) {
	f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
		id := strings.TrimPrefix(r.URL.Path, "/_matrix/federation/v1/media/download/")
		serveMultipart("text/plain", "", "body-"+id)(w, r)
	})
	c := newTestMediaClient(t, f, nil)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			id := fmt.Sprintf("c%d", i)
			m, err := c.Download(context.Background(), f.name, id, time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer m.Body.Close()
			b, err := io.ReadAll(m.Body)
			if err != nil || string(b) != "body-"+id {
				errs <- fmt.Errorf("%s: %q %v", id, b, err)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestNewMediaClientValidation(t *testing.T) {
	if _, err := NewMediaClient(ClientOptions{Key: testKey}); err == nil {
		t.Error("missing origin accepted")
	}
	if _, err := NewMediaClient(ClientOptions{Origin: testOrigin}); err == nil {
		t.Error("missing key accepted")
	}
}
