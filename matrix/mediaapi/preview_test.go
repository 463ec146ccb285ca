package mediaapi

import (
	"bytes"
	"encoding/json"
	"image"
	"image/png"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/preview"
)

// previewSite serves the page Complement's TestUrlPreview uses, and its image.
func previewSite(t *testing.T) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var pageHits atomic.Int64
	img := image.NewNRGBA(image.Rect(0, 0, 279, 129))
	var pngBytes bytes.Buffer
	if err := png.Encode(&pngBytes, img); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/test.html":
			pageHits.Add(1)
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			_, _ = w.Write([]byte(`<html prefix="og: http://ogp.me/ns#"><head><title>The Rock (1996)</title>
<meta property="og:title" content="The Rock" />
<meta property="og:type" content="video.movie" />
<meta property="og:url" content="http://www.imdb.com/title/tt0117500/" />
<meta property="og:image" content="test.png" />
</head><body></body></html>`))
		case "/test.png":
			w.Header().Set("Content-Type", "image/png")
			_, _ = w.Write(pngBytes.Bytes())
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv, &pageHits
}

func previewEnv(t *testing.T, allowLoopback bool) *env {
	t.Helper()
	guard := federation.Guard{AllowHTTP: true}
	if allowLoopback {
		guard.AllowCIDRs = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	}
	p, err := preview.New(preview.Options{Client: federation.NewClient(guard, nil, 5*time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	return newEnv(t, func(c *SiteConfig, _ *RepositoryOptions) { c.Previews = p })
}

func TestPreviewURL(t *testing.T) {
	srv, hits := previewSite(t)
	e := previewEnv(t, true)
	page := url.QueryEscape(srv.URL + "/test.html")
	for _, path := range []string{"/_matrix/media/v3/preview_url?url=" + page, "/_matrix/client/v1/media/preview_url?url=" + page + "&ts=1700000000000"} {
		rec := e.do(req{method: "GET", path: path, token: "alice"})
		if rec.Code != 200 {
			t.Fatalf("%s: %d %s", path, rec.Code, rec.Body)
		}
		var got map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatal(err)
		}
		mxc, _ := got["og:image"].(string)
		if got["og:title"] != "The Rock" || got["og:type"] != "video.movie" || got["og:url"] != "http://www.imdb.com/title/tt0117500/" ||
			got["og:image:width"] != float64(279) || got["og:image:height"] != float64(129) || !strings.HasPrefix(mxc, "mxc://test/") {
			t.Fatalf("%s: %v", path, got)
		}
		size, _ := got["matrix:image:size"].(float64)
		// The image is real media of this site.
		dl := e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + strings.TrimPrefix(mxc, "mxc://test/"), token: "alice"})
		if dl.Code != 200 || dl.Header().Get("Content-Type") != "image/png" || float64(dl.Body.Len()) != size {
			t.Fatalf("preview image: %d %s %d bytes, size %v", dl.Code, dl.Header().Get("Content-Type"), dl.Body.Len(), size)
		}
	}
	if n := hits.Load(); n != 1 {
		t.Fatalf("page fetched %d times, want 1 (cached)", n)
	}
	for _, tc := range []struct {
		name, query, token string
		status             int
		code               string
	}{
		{"no token", "?url=" + page, "", 401, "M_MISSING_TOKEN"},
		{"guest", "?url=" + page, "guest", 403, "M_GUEST_ACCESS_FORBIDDEN"},
		{"missing url", "", "alice", 400, "M_MISSING_PARAM"},
		{"not http", "?url=" + url.QueryEscape("ftp://example.org/x"), "alice", 400, "M_INVALID_PARAM"},
		{"bad ts", "?url=" + page + "&ts=yesterday", "alice", 400, "M_INVALID_PARAM"},
		{"missing page", "?url=" + url.QueryEscape(srv.URL+"/nope.html"), "alice", 502, "M_UNKNOWN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			expectError(t, e.do(req{method: "GET", path: "/_matrix/client/v1/media/preview_url" + tc.query, token: tc.token}), tc.status, tc.code)
		})
	}
}

func TestPreviewURLRefusesPrivateAddresses(t *testing.T) {
	srv, hits := previewSite(t)
	e := previewEnv(t, false)
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/preview_url?url=" + url.QueryEscape(srv.URL+"/test.html"), token: "alice"})
	expectError(t, rec, 403, "M_FORBIDDEN")
	if hits.Load() != 0 {
		t.Fatal("a loopback page was fetched")
	}
}

func TestPreviewURLDisabled(t *testing.T) {
	e := newEnv(t)
	expectError(t, e.do(req{method: "GET", path: "/_matrix/client/v1/media/preview_url?url=https%3A%2F%2Fexample.org", token: "alice"}), 404, "M_UNRECOGNIZED")
}
