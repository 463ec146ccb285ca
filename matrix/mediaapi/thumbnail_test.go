package mediaapi

import (
	"bytes"
	"context"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"
)

// countingThumbnailer counts generations of a real generator, or fails them
// all with err.
type countingThumbnailer struct {
	g     *thumbnails.Generator
	calls atomic.Int64
	err   error
	// gate, when set, holds every generation until closed.
	gate chan struct{}
}

func (c *countingThumbnailer) Generate(ctx context.Context, src []byte, req thumbnails.Request) (thumbnails.Result, error) {
	c.calls.Add(1)
	if c.gate != nil {
		<-c.gate
	}
	if c.err != nil {
		return thumbnails.Result{}, c.err
	}
	return c.g.Generate(ctx, src, req)
}

func (c *countingThumbnailer) Stats() thumbnails.Stats { return c.g.Stats() }

func thumbEnv(t *testing.T, policy ThumbnailPolicy) (*env, *countingThumbnailer) {
	t.Helper()
	g, err := thumbnails.New(thumbnails.Options{Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	ct := &countingThumbnailer{g: g}
	e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Thumbnailer = ct
		o.Thumbnails = policy
	})
	return e, ct
}

// testJPEG encodes a w×h opaque gradient.
func testJPEG(t testing.TB, w, h int) []byte {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.Set(x, y, color.RGBA{uint8(x * 255 / w), uint8(y * 255 / h), 128, 255})
		}
	}
	var b bytes.Buffer
	if err := jpeg.Encode(&b, img, &jpeg.Options{Quality: 85}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// testPNG encodes a w×h image with transparency.
func testPNG(t testing.TB, w, h int) []byte {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.Set(x, y, color.NRGBA{200, uint8(x), uint8(y), uint8((x + y) % 256)})
		}
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// decodedSize decodes an image response and returns its size and format.
func decodedSize(t *testing.T, rec *httptest.ResponseRecorder) (int, int, string) {
	t.Helper()
	cfg, format, err := image.DecodeConfig(bytes.NewReader(rec.Body.Bytes()))
	if err != nil {
		t.Fatalf("response is not an image (%s, %d bytes): %v", rec.Header().Get("Content-Type"), rec.Body.Len(), err)
	}
	return cfg.Width, cfg.Height, format
}

func TestThumbnailSizesAndHeaders(t *testing.T) {
	e, ct := thumbEnv(t, ThumbnailPolicy{})
	id := e.upload("alice", testJPEG(t, 1000, 750), "image/jpeg", "?filename=photo.jpg")
	tests := []struct {
		name, query  string
		wantW, wantH int
	}{
		{"scale 320x240", "width=320&height=240&method=scale", 320, 240},
		{"default method is scale", "width=320&height=240", 320, 240},
		{"crop 96x96", "width=96&height=96&method=crop", 96, 96},
		{"crop 32x32", "width=32&height=32&method=crop", 32, 32},
		{"small scale request gets the nearest larger size", "width=100&height=50", 320, 240},
		{"crop larger than any crop size gets a large enough scale", "width=200&height=200&method=crop", 320, 240},
		{"beyond every size gets the largest", "width=5000&height=5000", 800, 600},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + "?" + tc.query, token: "alice"})
			if rec.Code != 200 {
				t.Fatalf("%d %s", rec.Code, rec.Body)
			}
			w, h, format := decodedSize(t, rec)
			if w != tc.wantW || h != tc.wantH || format != "jpeg" || rec.Header().Get("Content-Type") != "image/jpeg" {
				t.Fatalf("got %dx%d %s (%s), want %dx%d jpeg", w, h, format, rec.Header().Get("Content-Type"), tc.wantW, tc.wantH)
			}
			if cd := rec.Header().Get("Content-Disposition"); cd != "inline; filename=thumbnail.jpg" {
				t.Fatalf("Content-Disposition %q", cd)
			}
			if rec.Header().Get("Content-Security-Policy") == "" || rec.Header().Get("Access-Control-Allow-Origin") != "*" {
				t.Fatal("security or CORS headers missing")
			}
		})
	}
	// 7 requests, 4 distinct normalised sizes: 4 generations.
	if n := ct.calls.Load(); n != 4 {
		t.Fatalf("%d generations, want 4", n)
	}
	// Same parameters, same bytes, no new generation, on every endpoint.
	paths := []string{
		"/_matrix/client/v1/media/thumbnail/test/" + id + "?width=320&height=240",
		"/_matrix/media/v3/thumbnail/test/" + id + "?width=320&height=240",
		"/_matrix/client/unstable/org.matrix.msc3916/media/thumbnail/test/" + id + "?width=300&height=200",
	}
	var first []byte
	for _, p := range paths {
		rec := e.do(req{method: "GET", path: p, token: "alice"})
		if rec.Code != 200 {
			t.Fatalf("%s: %d", p, rec.Code)
		}
		if first == nil {
			first = rec.Body.Bytes()
		} else if !bytes.Equal(first, rec.Body.Bytes()) {
			t.Fatalf("%s: different bytes for the same thumbnail", p)
		}
	}
	if n := ct.calls.Load(); n != 4 {
		t.Fatalf("%d generations after repeats, want 4", n)
	}
	// Stored once as a thumbnail record, not as media.
	waitThumbnailsStored(t, e.repo)
	th, err := e.meta.GetThumbnail(context.Background(), storage.ThumbnailKey{ServerName: testServer, MediaID: id,
		Width: 320, Height: 240, Method: "scale"})
	if err != nil || th.ContentType != "image/jpeg" || th.ActualWidth != 320 || th.Size != int64(len(first)) {
		t.Fatalf("record %+v %v", th, err)
	}
}

func TestThumbnailNeverUpscales(t *testing.T) {
	e, _ := thumbEnv(t, ThumbnailPolicy{})
	src := testPNG(t, 20, 20)
	id := e.upload("alice", src, "image/png", "")
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=96&height=96&method=crop", token: "alice"})
	if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), src) || rec.Header().Get("Content-Type") != "image/png" {
		t.Fatalf("%d %s, want the 20x20 original", rec.Code, rec.Header().Get("Content-Type"))
	}
	if cd := rec.Header().Get("Content-Disposition"); cd != "inline; filename=thumbnail.png" {
		t.Fatalf("Content-Disposition %q", cd)
	}
}

func TestThumbnailAlphaGivesPNG(t *testing.T) {
	e, _ := thumbEnv(t, ThumbnailPolicy{})
	id := e.upload("alice", testPNG(t, 600, 400), "image/png", "")
	rec := e.do(req{method: "GET", path: "/_matrix/media/v3/thumbnail/test/" + id + "?width=320&height=240"})
	w, h, format := decodedSize(t, rec)
	if rec.Code != 200 || format != "png" || w != 320 || h != 213 {
		t.Fatalf("%d %dx%d %s", rec.Code, w, h, format)
	}
}

func TestThumbnailDynamicAndFormats(t *testing.T) {
	e, _ := thumbEnv(t, ThumbnailPolicy{Dynamic: true, MaxDynamic: 512, Formats: []thumbnails.Format{thumbnails.FormatWebP}})
	id := e.upload("alice", testJPEG(t, 1200, 900), "image/jpeg", "")
	path := "/_matrix/client/v1/media/thumbnail/test/" + id
	rec := e.do(req{method: "GET", path: path + "?width=601&height=300", token: "alice"})
	w, h, _ := decodedSize(t, rec)
	// 601 → 512 (cap), 300 → 320: scale into 512x320 keeps 4:3 → 426.7x320.
	if (w != 426 && w != 427) || h != 320 {
		t.Fatalf("dynamic: %dx%d", w, h)
	}
	for _, q := range []string{"?width=602&height=300", "?width=640&height=290"} {
		if r2 := e.do(req{method: "GET", path: path + q, token: "alice"}); !bytes.Equal(r2.Body.Bytes(), rec.Body.Bytes()) {
			t.Fatalf("%s: not the same bucketed thumbnail", q)
		}
	}
	rec = e.do(req{method: "GET", path: path + "?width=96&height=96&method=crop", token: "alice",
		header: map[string]string{"Accept": "image/avif,image/webp,*/*"}})
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "image/webp" || !bytes.HasPrefix(rec.Body.Bytes(), []byte("RIFF")) {
		t.Fatalf("webp: %d %s", rec.Code, rec.Header().Get("Content-Type"))
	}
	if cd := rec.Header().Get("Content-Disposition"); cd != "inline; filename=thumbnail.webp" {
		t.Fatalf("Content-Disposition %q", cd)
	}
	rec = e.do(req{method: "GET", path: path + "?width=96&height=96&method=crop", token: "alice",
		header: map[string]string{"Accept": "*/*"}})
	if rec.Header().Get("Content-Type") != "image/jpeg" {
		t.Fatalf("wildcard Accept got %s", rec.Header().Get("Content-Type"))
	}
}

func TestThumbnailErrors(t *testing.T) {
	e, ct := thumbEnv(t, ThumbnailPolicy{})
	img := e.upload("alice", testJPEG(t, 400, 300), "image/jpeg", "")
	text := e.upload("alice", []byte("just some text, not an image"), "text/plain", "")
	fake := e.upload("alice", []byte("<svg xmlns='http://www.w3.org/2000/svg'/>"), "image/png", "")
	tests := []struct {
		name, path, token string
		status            int
		code              string
	}{
		{"missing width", "/_matrix/client/v1/media/thumbnail/test/" + img + "?height=32", "alice", 400, "M_MISSING_PARAM"},
		{"bad height", "/_matrix/client/v1/media/thumbnail/test/" + img + "?width=32&height=abc", "alice", 400, "M_INVALID_PARAM"},
		{"zero width", "/_matrix/client/v1/media/thumbnail/test/" + img + "?width=0&height=32", "alice", 400, "M_INVALID_PARAM"},
		{"bad method", "/_matrix/client/v1/media/thumbnail/test/" + img + "?width=32&height=32&method=zoom", "alice", 400, "M_INVALID_PARAM"},
		{"bad animated", "/_matrix/client/v1/media/thumbnail/test/" + img + "?width=32&height=32&animated=yes", "alice", 400, "M_INVALID_PARAM"},
		{"no token", "/_matrix/client/v1/media/thumbnail/test/" + img + "?width=32&height=32", "", 401, "M_MISSING_TOKEN"},
		{"unknown media", "/_matrix/client/v1/media/thumbnail/test/nope?width=32&height=32", "alice", 404, "M_NOT_FOUND"},
		{"remote media", "/_matrix/client/v1/media/thumbnail/other.org/abc?width=32&height=32", "alice", 404, "M_NOT_FOUND"},
		{"not an image", "/_matrix/client/v1/media/thumbnail/test/" + text + "?width=32&height=32", "alice", 400, "M_UNKNOWN"},
		{"lying content type", "/_matrix/client/v1/media/thumbnail/test/" + fake + "?width=32&height=32", "alice", 400, "M_UNKNOWN"},
		{"wrong method", "/_matrix/client/v1/media/thumbnail/test/" + img + "?width=32&height=32", "alice", 0, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := req{method: "GET", path: tc.path, token: tc.token}
			if tc.status == 0 {
				r.method = "POST"
				tc.status, tc.code = 405, "M_UNRECOGNIZED"
			}
			expectError(t, e.do(r), tc.status, tc.code)
		})
	}
	// Guests may thumbnail.
	if rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + img + "?width=32&height=32", token: "guest"}); rec.Code != 200 {
		t.Fatalf("guest: %d", rec.Code)
	}
	// A busy generator answers 429 with Retry-After.
	ct.err = thumbnails.ErrBusy
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + img + "?width=640&height=480", token: "alice"})
	expectError(t, rec, 429, "M_LIMIT_EXCEEDED")
	if rec.Header().Get("Retry-After") == "" {
		t.Fatal("no Retry-After")
	}
	ct.err = thumbnails.ErrTooLarge
	expectError(t, e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + img + "?width=640&height=480", token: "alice"}), 413, "M_TOO_LARGE")
}

func TestThumbnailOfPendingMedia(t *testing.T) {
	e, _ := thumbEnv(t, ThumbnailPolicy{})
	rec := e.do(req{method: "POST", path: "/_matrix/media/v1/create", token: "alice"})
	id := mediaIDFromURI(t, rec, testServer)
	expectError(t, e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=32&height=32&timeout_ms=0", token: "alice"}), 504, "M_NOT_YET_UPLOADED")
}

func TestThumbnailCoalescesConcurrentRequests(t *testing.T) {
	e, ct := thumbEnv(t, ThumbnailPolicy{})
	id := e.upload("alice", testJPEG(t, 800, 600), "image/jpeg", "")
	ct.gate = make(chan struct{})
	const n = 12
	var wg sync.WaitGroup
	bodies := make([][]byte, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=96&height=96&method=crop", token: "alice"})
			if rec.Code == 200 {
				bodies[i] = rec.Body.Bytes()
			}
		}()
	}
	for ct.calls.Load() == 0 {
		runtimeGosched()
	}
	close(ct.gate)
	wg.Wait()
	if c := ct.calls.Load(); c != 1 {
		t.Fatalf("%d generations for %d concurrent requests, want 1", c, n)
	}
	for i, b := range bodies {
		if b == nil || !bytes.Equal(b, bodies[0]) {
			t.Fatalf("request %d got a different or no thumbnail", i)
		}
	}
}

func TestThumbnailPregeneration(t *testing.T) {
	e, ct := thumbEnv(t, ThumbnailPolicy{Pregenerate: true})
	id := e.upload("alice", testJPEG(t, 1000, 750), "image/jpeg", "")
	ctx := context.Background()
	for _, sz := range DefaultThumbnailSizes {
		k := storage.ThumbnailKey{ServerName: testServer, MediaID: id, Width: sz.Width, Height: sz.Height, Method: string(sz.Method)}
		waitFor(t, func() bool { _, err := e.meta.GetThumbnail(ctx, k); return err == nil })
	}
	before := ct.calls.Load()
	if rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=640&height=480", token: "alice"}); rec.Code != 200 {
		t.Fatal(rec.Code)
	}
	if ct.calls.Load() != before {
		t.Fatal("a pre-generated size was generated again")
	}
}

// waitFor polls cond for up to 30 seconds.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 30s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func runtimeGosched() { time.Sleep(time.Millisecond) }

// waitThumbnailsStored waits until every thumbnail answered from memory has
// been stored (recorded and cached).
func waitThumbnailsStored(t *testing.T, r *Repository) {
	t.Helper()
	waitFor(t, func() bool { n, _ := r.thumbPending.size(); return n == 0 })
}

func TestThumbnailOfOpaquePNGIsPNG(t *testing.T) {
	e, _ := thumbEnv(t, ThumbnailPolicy{})
	img := image.NewRGBA(image.Rect(0, 0, 500, 400))
	for i := range img.Pix {
		img.Pix[i] = 255
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	id := e.upload("alice", b.Bytes(), "image/png", "")
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=32&height=32&method=scale", token: "alice"})
	if _, _, format := decodedSize(t, rec); rec.Code != 200 || format != "png" || rec.Header().Get("Content-Type") != "image/png" {
		t.Fatalf("%d %s %s", rec.Code, format, rec.Header().Get("Content-Type"))
	}
}

// newTestGenerator is a thumbnail generator for tests.
func newTestGenerator() (*thumbnails.Generator, error) {
	return thumbnails.New(thumbnails.Options{Workers: 2})
}
