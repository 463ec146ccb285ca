package preview

import (
	"bytes"
	"context"
	"errors"
	"image"
	"image/color"
	"image/png"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
)

// complementPage mirrors the page Complement's TestUrlPreview serves.
const complementPage = `<!DOCTYPE html>
<html prefix="og: http://ogp.me/ns#">
<head>
<title>The Rock (1996)</title>
<meta property="og:title" content="The Rock" />
<meta property="og:type" content="video.movie" />
<meta property="og:url" content="http://www.imdb.com/title/tt0117500/" />
<meta property="og:image" content="test.png" />
</head>
<body><img src="other.png"></body>
</html>`

// testPNG encodes a w×h PNG.
func testPNG(t *testing.T, w, h int) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for x := range w {
		img.Set(x, x%h, color.NRGBA{R: 200, A: 255})
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// allowLoopback is a Guard that lets tests reach httptest servers.
var allowLoopback = federation.Guard{
	AllowHTTP:  true,
	AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
}

// newPreviewer builds a Previewer using a guarded client for guard.
func newPreviewer(t *testing.T, guard federation.Guard, opts Options) *Previewer {
	t.Helper()
	opts.Client = federation.NewClient(guard, nil, 0)
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// serve returns a handler writing body with the given Content-Type.
func serve(contentType string, body []byte) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if contentType != "" {
			w.Header().Set("Content-Type", contentType)
		}
		_, _ = w.Write(body)
	}
}

// testServer starts an httptest server with the given routes and records
// the User-Agent of the last request.
func testServer(t *testing.T, routes map[string]http.Handler) (*httptest.Server, *atomic.Value) {
	t.Helper()
	mux := http.NewServeMux()
	ua := new(atomic.Value)
	for path, h := range routes {
		mux.Handle(path, h)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ua.Store(r.UserAgent())
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv, ua
}

func TestComplementPage(t *testing.T) {
	pngBytes := testPNG(t, 279, 129)
	srv, ua := testServer(t, map[string]http.Handler{
		"/test.html": serve("text/html; charset=utf-8", []byte(complementPage)),
		"/test.png":  serve("image/png", pngBytes),
		"/redirect":  http.RedirectHandler("/test.html", http.StatusFound),
	})
	p := newPreviewer(t, allowLoopback, Options{})
	ctx := context.Background()

	for _, path := range []string{"/test.html", "/redirect"} {
		t.Run(path, func(t *testing.T) {
			pv, err := p.Fetch(ctx, srv.URL+path+"#frag")
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]any{
				"og:title": "The Rock",
				"og:type":  "video.movie",
				"og:url":   "http://www.imdb.com/title/tt0117500/",
			}
			if !reflect.DeepEqual(pv.Fields, want) {
				t.Errorf("Fields = %v, want %v", pv.Fields, want)
			}
			if pv.ImageURL != srv.URL+"/test.png" {
				t.Errorf("ImageURL = %q, want %q", pv.ImageURL, srv.URL+"/test.png")
			}
			if got := ua.Load(); got != DefaultUserAgent {
				t.Errorf("User-Agent = %v", got)
			}
		})
	}

	img, err := p.FetchImage(ctx, srv.URL+"/test.png")
	if err != nil {
		t.Fatal(err)
	}
	if img.Width != 279 || img.Height != 129 || img.ContentType != "image/png" || !bytes.Equal(img.Body, pngBytes) {
		t.Errorf("image = %s %dx%d (%d bytes), want image/png 279x129 (%d bytes)",
			img.ContentType, img.Width, img.Height, len(img.Body), len(pngBytes))
	}
}

func TestFallbacksAndParsing(t *testing.T) {
	long := strings.Repeat("é", 600)
	tests := []struct {
		name        string
		contentType string
		body        string
		path        string
		want        map[string]any
		wantImage   string // path on the server, "" for none
	}{
		{
			name:        "title fallback",
			contentType: "text/html",
			body:        "<html><head><title>\n  Plain   page\n</title></head><body>hi</body></html>",
			want:        map[string]any{"og:title": "Plain page"},
		},
		{
			name:        "meta description fallback",
			contentType: "text/html",
			body: `<head><meta name="description" content="  A   description "><meta property="og:title" content="OG">
				<title>ignored</title></head>`,
			want: map[string]any{"og:title": "OG", "og:description": "A description"},
		},
		{
			name:        "og:description wins over description",
			contentType: "text/html",
			body:        `<meta name="description" content="plain"><meta property="og:description" content="og">`,
			want:        map[string]any{"og:description": "og"},
		},
		{
			name:        "og via name attribute, first value wins, uppercase key",
			contentType: "text/html",
			body:        `<meta name="og:site_name" content="Site"><META PROPERTY="OG:SITE_NAME" content="Other"><meta property="og:empty" content="  ">`,
			want:        map[string]any{"og:site_name": "Site"},
		},
		{
			name:        "first img fallback resolved against base href",
			contentType: "text/html",
			body:        `<head><base href="/assets/"><title>T</title></head><body><img alt="x"><img src="pic.png"><img src="second.png"></body>`,
			want:        map[string]any{"og:title": "T"},
			wantImage:   "/assets/pic.png",
		},
		{
			name:        "relative og:url and og:image:secure_url",
			contentType: "text/html",
			path:        "/dir/page.html",
			body:        `<meta property="og:url" content="../canonical"><meta property="og:image:secure_url" content="img.png"><meta property="og:image:width" content="5">`,
			want:        map[string]any{"og:url": "/canonical"},
			wantImage:   "/dir/img.png",
		},
		{
			name:        "non-http og:image and data img ignored",
			contentType: "text/html",
			body:        `<meta property="og:image" content="javascript:alert(1)"><img src="data:image/png;base64,AAAA">`,
			want:        map[string]any{},
		},
		{
			name:        "title inside svg and script ignored",
			contentType: "text/html",
			body:        `<svg><title>icon</title></svg><script>var s = "<meta property='og:title' content='bad'>";</script><title>Real</title>`,
			want:        map[string]any{"og:title": "Real"},
		},
		{
			name:        "latin-1 from Content-Type",
			contentType: "text/html; charset=ISO-8859-1",
			body:        "<title>Caf\xe9 cr\xe8me</title>",
			want:        map[string]any{"og:title": "Café crème"},
		},
		{
			name:        "windows-1252 from meta charset",
			contentType: "text/html",
			body:        "<meta charset=\"windows-1252\"><meta property=\"og:title\" content=\"\x93quoted\x94 \x80\">",
			want:        map[string]any{"og:title": "“quoted” €"},
		},
		{
			name:        "xhtml",
			contentType: "application/xhtml+xml",
			body:        `<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><head><meta property="og:title" content="X"/></head></html>`,
			want:        map[string]any{"og:title": "X"},
		},
		{
			name:        "sniffed without Content-Type",
			contentType: "",
			body:        `<!DOCTYPE html><html><head><title>Sniffed</title></head></html>`,
			want:        map[string]any{"og:title": "Sniffed"},
		},
		{
			name:        "values truncated to 500 characters",
			contentType: "text/html; charset=utf-8",
			body:        `<meta property="og:title" content="` + long + `">`,
			want:        map[string]any{"og:title": strings.Repeat("é", 500)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.path
			if path == "" {
				path = "/page"
			}
			srv, _ := testServer(t, map[string]http.Handler{path: serve(tt.contentType, []byte(tt.body))})
			p := newPreviewer(t, allowLoopback, Options{})
			pv, err := p.Fetch(context.Background(), srv.URL+path)
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]any{}
			for k, v := range tt.want {
				if k == "og:url" {
					v = srv.URL + v.(string)
				}
				want[k] = v
			}
			if !reflect.DeepEqual(pv.Fields, want) {
				t.Errorf("Fields = %#v, want %#v", pv.Fields, want)
			}
			wantImage := ""
			if tt.wantImage != "" {
				wantImage = srv.URL + tt.wantImage
			}
			if pv.ImageURL != wantImage {
				t.Errorf("ImageURL = %q, want %q", pv.ImageURL, wantImage)
			}
		})
	}
}

func TestPageLimit(t *testing.T) {
	body := `<html><head><meta property="og:title" content="Early">` +
		strings.Repeat("<p>filler</p>", 2000) +
		`<meta property="og:description" content="Late"></head></html>`
	srv, _ := testServer(t, map[string]http.Handler{"/big": serve("text/html", []byte(body))})
	p := newPreviewer(t, allowLoopback, Options{MaxPageBytes: 4096})
	pv, err := p.Fetch(context.Background(), srv.URL+"/big")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"og:title": "Early"}
	if !reflect.DeepEqual(pv.Fields, want) {
		t.Errorf("Fields = %v, want %v", pv.Fields, want)
	}

	// Without the limit the late tag is found, so the test above is real.
	p = newPreviewer(t, allowLoopback, Options{})
	pv, err = p.Fetch(context.Background(), srv.URL+"/big")
	if err != nil {
		t.Fatal(err)
	}
	if pv.Fields["og:description"] != "Late" {
		t.Errorf("Fields = %v, want og:description Late", pv.Fields)
	}
}

func TestImageURLDirectly(t *testing.T) {
	pngBytes := testPNG(t, 10, 20)
	srv, _ := testServer(t, map[string]http.Handler{
		"/pic.png": serve("image/png", pngBytes),
		"/pic":     http.RedirectHandler("/pic.png", http.StatusMovedPermanently),
	})
	p := newPreviewer(t, allowLoopback, Options{})
	pv, err := p.Fetch(context.Background(), srv.URL+"/pic")
	if err != nil {
		t.Fatal(err)
	}
	if pv.ImageURL != srv.URL+"/pic.png" || pv.Fields == nil || len(pv.Fields) != 0 {
		t.Errorf("preview = %+v, want ImageURL %s/pic.png and empty Fields", pv, srv.URL)
	}
	img, err := p.FetchImage(context.Background(), pv.ImageURL)
	if err != nil {
		t.Fatal(err)
	}
	if img.Width != 10 || img.Height != 20 {
		t.Errorf("image %dx%d, want 10x20", img.Width, img.Height)
	}
}

func TestErrors(t *testing.T) {
	pngBytes := testPNG(t, 64, 64)
	srv, _ := testServer(t, map[string]http.Handler{
		"/doc.pdf":   serve("application/pdf", []byte("%PDF-1.4")),
		"/video":     serve("video/mp4", []byte("....")),
		"/svg":       serve("image/svg+xml", []byte("<svg/>")),
		"/missing":   http.NotFoundHandler(),
		"/big.png":   serve("image/png", pngBytes),
		"/liar.png":  serve("image/png", []byte("<html>not an image</html>")),
		"/page.html": serve("text/html", []byte("<title>x</title>")),
		"/chunked.png": http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "image/png")
			for i := 0; i < len(pngBytes); i += 50 {
				_, _ = w.Write(pngBytes[i:min(i+50, len(pngBytes))])
				w.(http.Flusher).Flush()
			}
		}),
		"/loop": http.RedirectHandler("/loop", http.StatusFound),
	})
	small := newPreviewer(t, allowLoopback, Options{MaxImageBytes: 100})
	p := newPreviewer(t, allowLoopback, Options{})
	denied := newPreviewer(t, federation.Guard{AllowHTTP: true}, Options{})
	ctx := context.Background()

	tests := []struct {
		name  string
		call  func() error
		want  error
		want2 error // optional second error in the chain
	}{
		{"pdf", fetch(p, srv.URL+"/doc.pdf"), ErrNotPreviewable, nil},
		{"video", fetch(p, srv.URL+"/video"), ErrNotPreviewable, nil},
		{"svg page", fetch(p, srv.URL+"/svg"), ErrNotPreviewable, nil},
		{"404", fetch(p, srv.URL+"/missing"), ErrUnreachable, nil},
		{"redirect loop", fetch(p, srv.URL+"/loop"), ErrUnreachable, nil},
		{"denied loopback", fetch(denied, srv.URL+"/page.html"), ErrUnreachable, federation.ErrAddressDenied},
		{"denied image", fetchImage(denied, srv.URL+"/big.png"), ErrUnreachable, federation.ErrAddressDenied},
		{"image too large (Content-Length)", fetchImage(small, srv.URL+"/big.png"), ErrTooLarge, nil},
		{"image too large (chunked)", fetchImage(small, srv.URL+"/chunked.png"), ErrTooLarge, nil},
		{"image not an image", fetchImage(p, srv.URL+"/liar.png"), ErrNotPreviewable, nil},
		{"image is html", fetchImage(p, srv.URL+"/page.html"), ErrNotPreviewable, nil},
		{"image is svg", fetchImage(p, srv.URL+"/svg"), ErrNotPreviewable, nil},
		{"image 404", fetchImage(p, srv.URL+"/missing"), ErrUnreachable, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if !errors.Is(err, tt.want) {
				t.Fatalf("error = %v, want %v", err, tt.want)
			}
			if tt.want2 != nil && !errors.Is(err, tt.want2) {
				t.Fatalf("error = %v, want it to wrap %v", err, tt.want2)
			}
		})
	}

	// The chunked image is fine without the small limit.
	if _, err := p.FetchImage(ctx, srv.URL+"/chunked.png"); err != nil {
		t.Errorf("chunked image without limit: %v", err)
	}
}

func fetch(p *Previewer, u string) func() error {
	return func() error { _, err := p.Fetch(context.Background(), u); return err }
}

func fetchImage(p *Previewer, u string) func() error {
	return func() error { _, err := p.FetchImage(context.Background(), u); return err }
}

func TestTimeout(t *testing.T) {
	srv, _ := testServer(t, map[string]http.Handler{
		"/slow": http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		}),
	})
	p := newPreviewer(t, allowLoopback, Options{Timeout: 100 * time.Millisecond})
	start := time.Now()
	_, err := p.Fetch(context.Background(), srv.URL+"/slow")
	if !errors.Is(err, ErrUnreachable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error = %v, want ErrUnreachable and DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("took %v", d)
	}
}

func TestInvalidURLs(t *testing.T) {
	p := newPreviewer(t, allowLoopback, Options{})
	for _, raw := range []string{
		"ftp://example.com/file",
		"javascript:alert(1)",
		"http://",
		"http:///path",
		"https:example.com",
		"//example.com/page",
		"/relative/path",
		"",
		"http://user:pass@example.com/",
		"http://user@example.com/",
		"http://example.com:0/",
		"http://example.com:99999/",
		"http://exa mple.com/",
		"file:///etc/passwd",
		"data:text/html,<title>x</title>",
	} {
		t.Run(raw, func(t *testing.T) {
			if _, err := p.Fetch(context.Background(), raw); !errors.Is(err, ErrInvalidURL) {
				t.Errorf("Fetch error = %v, want ErrInvalidURL", err)
			}
			if _, err := p.FetchImage(context.Background(), raw); !errors.Is(err, ErrInvalidURL) {
				t.Errorf("FetchImage error = %v, want ErrInvalidURL", err)
			}
		})
	}
	for _, raw := range []string{"http://example.com", "HTTPS://Example.com:8443/a?b=c#d", "http://[::1]:80/"} {
		if _, err := ValidateURL(raw); err != nil {
			t.Errorf("ValidateURL(%q) = %v, want nil", raw, err)
		}
	}
}

func TestNew(t *testing.T) {
	if _, err := New(Options{}); err == nil {
		t.Error("New without Client succeeded")
	}
	if _, err := New(Options{Client: http.DefaultClient, MaxPageBytes: -1}); err == nil {
		t.Error("New with negative limit succeeded")
	}
	p, err := New(Options{Client: http.DefaultClient})
	if err != nil {
		t.Fatal(err)
	}
	if p.maxPageBytes != DefaultMaxPageBytes || p.maxImageBytes != DefaultMaxImageBytes ||
		p.userAgent != DefaultUserAgent || p.timeout != DefaultTimeout {
		t.Errorf("defaults not applied: %+v", p)
	}
}
