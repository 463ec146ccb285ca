package thumbnails

import (
	"bytes"
	"context"
	"errors"
	"image"
	"image/color"
	"image/gif"
	"strings"
	"testing"
	"time"
)

func newGen(t testing.TB, opts Options) *Generator {
	t.Helper()
	g, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func decode(t testing.TB, b []byte) (image.Image, string) {
	t.Helper()
	img, name, err := image.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("decoding output: %v", err)
	}
	return img, name
}

func TestGenerateStill(t *testing.T) {
	g := newGen(t, Options{})
	photo := photoOnce()
	alpha := alphaPNG(t, 400, 300)
	opaquePNG := encodePNG(t, gradient(400, 300))
	tests := []struct {
		name        string
		src         []byte
		req         Request
		wantW       int
		wantH       int
		wantType    string
		wantDecoder string
	}{
		{"jpeg scale 320x240", photo, Request{Width: 320, Height: 240, Method: MethodScale}, 320, 240, "image/jpeg", "jpeg"},
		{"jpeg scale 32x32 keeps aspect", photo, Request{Width: 32, Height: 32, Method: MethodScale}, 32, 24, "image/jpeg", "jpeg"},
		{"jpeg scale tall box", photo, Request{Width: 100, Height: 1000, Method: MethodScale}, 100, 75, "image/jpeg", "jpeg"},
		{"jpeg crop 96x96", photo, Request{Width: 96, Height: 96, Method: MethodCrop}, 96, 96, "image/jpeg", "jpeg"},
		{"jpeg crop 32x32", photo, Request{Width: 32, Height: 32, Method: MethodCrop}, 32, 32, "image/jpeg", "jpeg"},
		{"jpeg crop wide", photo, Request{Width: 640, Height: 100, Method: MethodCrop}, 640, 100, "image/jpeg", "jpeg"},
		{"jpeg crop larger than source in one dimension", photo, Request{Width: 6000, Height: 1000, Method: MethodCrop}, 4000, 667, "image/jpeg", "jpeg"},
		{"png alpha scale stays png", alpha, Request{Width: 100, Height: 100, Method: MethodScale}, 100, 75, "image/png", "png"},
		{"png alpha crop stays png", alpha, Request{Width: 32, Height: 32, Method: MethodCrop}, 32, 32, "image/png", "png"},
		{"opaque png stays png", opaquePNG, Request{Width: 100, Height: 100, Method: MethodScale}, 100, 75, "image/png", "png"},
		{"explicit png output", photo, Request{Width: 64, Height: 64, Method: MethodCrop, Output: FormatPNG}, 64, 64, "image/png", "png"},
		{"explicit webp output", photo, Request{Width: 64, Height: 48, Method: MethodScale, Output: FormatWebP}, 64, 48, "image/webp", "webp"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res, err := g.Generate(context.Background(), tc.src, tc.req)
			if err != nil {
				t.Fatalf("Generate: %v", err)
			}
			if res.Width != tc.wantW || res.Height != tc.wantH {
				t.Errorf("result size %dx%d, want %dx%d", res.Width, res.Height, tc.wantW, tc.wantH)
			}
			if res.ContentType != tc.wantType || res.Animated || res.Frames != 1 {
				t.Errorf("result %q animated=%v frames=%d, want %q still", res.ContentType, res.Animated, res.Frames, tc.wantType)
			}
			img, name := decode(t, res.Data)
			if name != tc.wantDecoder {
				t.Errorf("data decodes as %s, want %s", name, tc.wantDecoder)
			}
			if b := img.Bounds(); b.Dx() != tc.wantW || b.Dy() != tc.wantH {
				t.Errorf("decoded size %dx%d, want %dx%d", b.Dx(), b.Dy(), tc.wantW, tc.wantH)
			}
			if tc.wantDecoder == "jpeg" && bytes.Contains(res.Data[:min(len(res.Data), 200)], []byte("Exif")) {
				t.Error("metadata not stripped")
			}
		})
	}
}

func TestAlphaPreserved(t *testing.T) {
	g := newGen(t, Options{})
	res, err := g.Generate(context.Background(), alphaPNG(t, 400, 300), Request{Width: 200, Height: 200, Method: MethodScale})
	if err != nil {
		t.Fatal(err)
	}
	img, _ := decode(t, res.Data)
	_, _, _, aLeft := img.At(10, 75).RGBA()
	_, _, _, aRight := img.At(190, 75).RGBA()
	if aLeft != 0 || aRight != 0xFFFF {
		t.Errorf("alpha left=%#x right=%#x, want 0 and 0xffff", aLeft, aRight)
	}
}

func TestTransparentGIFAndJPEGFlatten(t *testing.T) {
	g := newGen(t, Options{})
	pal := color.Palette{color.RGBA{}, color.RGBA{255, 0, 0, 255}}
	img := image.NewPaletted(image.Rect(0, 0, 200, 100), pal)
	for y := 0; y < 100; y++ {
		for x := 100; x < 200; x++ {
			img.SetColorIndex(x, y, 1)
		}
	}
	var buf bytes.Buffer
	if err := gif.Encode(&buf, img, nil); err != nil {
		t.Fatal(err)
	}
	if info, err := Probe(buf.Bytes()); err != nil || !info.HasAlpha {
		t.Fatalf("Probe = %+v, %v; want HasAlpha", info, err)
	}
	res, err := g.Generate(context.Background(), buf.Bytes(), Request{Width: 100, Height: 100, Method: MethodScale})
	if err != nil {
		t.Fatal(err)
	}
	out, name := decode(t, res.Data)
	if _, _, _, a := out.At(10, 25).RGBA(); name != "png" || res.ContentType != "image/png" || a != 0 {
		t.Errorf("transparent gif: %s %q alpha=%#x, want transparent png", name, res.ContentType, a)
	}
	// Explicit JPEG of a transparent source: transparent areas turn white.
	res, err = g.Generate(context.Background(), alphaPNG(t, 400, 300), Request{Width: 100, Height: 100, Method: MethodScale, Output: FormatJPEG})
	if err != nil {
		t.Fatal(err)
	}
	out, name = decode(t, res.Data)
	if name != "jpeg" || !near(out.At(10, 30), color.RGBA{255, 255, 255, 255}) {
		t.Errorf("jpeg of alpha png: %s pixel %v, want white", name, out.At(10, 30))
	}
}

// near reports whether c is within 60 of want in every channel.
func near(c color.Color, want color.RGBA) bool {
	r, g, b, _ := c.RGBA()
	d := func(a uint32, b uint8) bool { return int(a>>8)-int(b) < 60 && int(b)-int(a>>8) < 60 }
	return d(r, want.R) && d(g, want.G) && d(b, want.B)
}

func TestOrientation(t *testing.T) {
	g := newGen(t, Options{})
	red := color.RGBA{255, 0, 0, 255}
	green := color.RGBA{0, 255, 0, 255}
	blue := color.RGBA{0, 0, 255, 255}
	white := color.RGBA{255, 255, 255, 255}
	// Stored 400x200: TL red, TR green, BL blue, BR white.
	base := encodeJPEG(t, quadrants(400, 200), 95)
	tests := []struct {
		orientation    uint16
		wantW, wantH   int
		tl, tr, bl, br color.RGBA
	}{
		{1, 200, 100, red, green, blue, white},
		{2, 200, 100, green, red, white, blue},
		{3, 200, 100, white, blue, green, red},
		{4, 200, 100, blue, white, red, green},
		{5, 100, 200, red, blue, green, white},
		{6, 100, 200, blue, red, white, green},
		{7, 100, 200, white, green, blue, red},
		{8, 100, 200, green, white, red, blue},
	}
	for _, tc := range tests {
		src := withOrientation(base, tc.orientation)
		info, err := Probe(src)
		if err != nil || info.Orientation != int(tc.orientation) {
			t.Fatalf("orientation %d: Probe = %+v, %v", tc.orientation, info, err)
		}
		res, err := g.Generate(context.Background(), src, Request{Width: 200, Height: 200, Method: MethodScale})
		if err != nil {
			t.Fatalf("orientation %d: %v", tc.orientation, err)
		}
		if res.Width != tc.wantW || res.Height != tc.wantH {
			t.Errorf("orientation %d: size %dx%d, want %dx%d", tc.orientation, res.Width, res.Height, tc.wantW, tc.wantH)
		}
		img, _ := decode(t, res.Data)
		b := img.Bounds()
		corners := []struct {
			x, y int
			want color.RGBA
		}{{5, 5, tc.tl}, {b.Dx() - 5, 5, tc.tr}, {5, b.Dy() - 5, tc.bl}, {b.Dx() - 5, b.Dy() - 5, tc.br}}
		for _, c := range corners {
			if got := img.At(c.x, c.y); !near(got, c.want) {
				t.Errorf("orientation %d: pixel (%d,%d) = %v, want %v", tc.orientation, c.x, c.y, got, c.want)
			}
		}
		if info, err := Probe(res.Data); err != nil || info.Orientation != 1 {
			t.Errorf("orientation %d: output keeps orientation %+v, %v", tc.orientation, info, err)
		}
	}
}

func TestOrientationCropAndLargeJPEG(t *testing.T) {
	g := newGen(t, Options{})
	src := withOrientation(photoOnce(), 6)
	res, err := g.Generate(context.Background(), src, Request{Width: 320, Height: 240, Method: MethodScale})
	if err != nil {
		t.Fatal(err)
	}
	// 4000x3000 displayed as 3000x4000 → fits 320x240 as 180x240.
	if res.Width != 180 || res.Height != 240 {
		t.Errorf("size %dx%d, want 180x240", res.Width, res.Height)
	}
	res, err = g.Generate(context.Background(), src, Request{Width: 96, Height: 64, Method: MethodCrop})
	if err != nil {
		t.Fatal(err)
	}
	if img, _ := decode(t, res.Data); img.Bounds().Dx() != 96 || img.Bounds().Dy() != 64 {
		t.Errorf("crop size %v, want 96x64", img.Bounds())
	}
}

func TestAnimated(t *testing.T) {
	g := newGen(t, Options{MaxFrames: 4})
	src := animatedGIF(t, 120, 90, 6)
	info, err := Probe(src)
	if err != nil || info.Frames != 6 || info.Width != 120 || info.Height != 90 {
		t.Fatalf("Probe = %+v, %v; want 120x90, 6 frames", info, err)
	}

	g6 := newGen(t, Options{})
	res, err := g6.Generate(context.Background(), src, Request{Width: 60, Height: 60, Method: MethodScale, Animated: true})
	if err != nil {
		t.Fatal(err)
	}
	frames, anim := webpFrames(t, res.Data)
	if !anim || frames != 6 || !res.Animated || res.Frames != 6 || res.ContentType != "image/webp" {
		t.Errorf("animated scale: ANIM=%v ANMF=%d result=%+v", anim, frames, Result{ContentType: res.ContentType, Width: res.Width, Height: res.Height, Animated: res.Animated, Frames: res.Frames})
	}
	if res.Width != 60 || res.Height != 45 {
		t.Errorf("animated scale size %dx%d, want 60x45", res.Width, res.Height)
	}
	if oi, err := Probe(res.Data); err != nil || oi.Width != 60 || oi.Height != 45 || oi.Frames != 6 {
		t.Errorf("animated output probe = %+v, %v", oi, err)
	}

	// MaxFrames cuts the animation; crop gives the exact box.
	res, err = g.Generate(context.Background(), src, Request{Width: 32, Height: 32, Method: MethodCrop, Animated: true})
	if err != nil {
		t.Fatal(err)
	}
	frames, anim = webpFrames(t, res.Data)
	if !anim || frames != 4 || res.Frames != 4 {
		t.Errorf("MaxFrames 4: ANIM=%v ANMF=%d Frames=%d", anim, frames, res.Frames)
	}
	if oi, err := Probe(res.Data); err != nil || oi.Width != 32 || oi.Height != 32 {
		t.Errorf("animated crop probe = %+v, %v; want 32x32", oi, err)
	}

	// Animated=false → still image of the first frame.
	res, err = g.Generate(context.Background(), src, Request{Width: 60, Height: 60, Method: MethodScale})
	if err != nil {
		t.Fatal(err)
	}
	if res.Animated || res.Frames != 1 || res.ContentType != "image/png" {
		t.Errorf("still from gif: %q animated=%v frames=%d", res.ContentType, res.Animated, res.Frames)
	}
	if img, _ := decode(t, res.Data); img.Bounds().Dx() != 60 || img.Bounds().Dy() != 45 {
		t.Errorf("still from gif size %v", img.Bounds())
	}

	// Explicit JPEG output with Animated=true → still.
	res, err = g.Generate(context.Background(), src, Request{Width: 60, Height: 60, Method: MethodScale, Animated: true, Output: FormatJPEG})
	if err != nil || res.Animated || res.ContentType != "image/jpeg" {
		t.Errorf("animated with jpeg output: %q animated=%v, %v", res.ContentType, res.Animated, err)
	}

	// Animated=true on a still image behaves like false.
	res, err = g.Generate(context.Background(), photoOnce(), Request{Width: 64, Height: 64, Method: MethodCrop, Animated: true})
	if err != nil || res.Animated || res.ContentType != "image/jpeg" {
		t.Errorf("animated on still jpeg: %q animated=%v, %v", res.ContentType, res.Animated, err)
	}

	// A small animation already fits: serve the original when animated,
	// make a still of it otherwise.
	if _, err := g.Generate(context.Background(), src, Request{Width: 320, Height: 240, Method: MethodScale, Animated: true}); !errors.Is(err, ErrSmallerThanRequest) {
		t.Errorf("small animated gif, animated: err = %v, want ErrSmallerThanRequest", err)
	}
	res, err = g.Generate(context.Background(), src, Request{Width: 320, Height: 240, Method: MethodScale})
	if err != nil || res.Width != 120 || res.Height != 90 || res.Frames != 1 {
		t.Errorf("small animated gif, still: %dx%d frames=%d, %v", res.Width, res.Height, res.Frames, err)
	}
}

func TestAnimatedWebPSource(t *testing.T) {
	g := newGen(t, Options{})
	anim, err := g.Generate(context.Background(), animatedGIF(t, 200, 100, 5), Request{Width: 150, Height: 150, Method: MethodScale, Animated: true})
	if err != nil {
		t.Fatal(err)
	}
	res, err := g.Generate(context.Background(), anim.Data, Request{Width: 60, Height: 60, Method: MethodScale, Animated: true})
	if err != nil {
		t.Fatal(err)
	}
	if frames, ok := webpFrames(t, res.Data); !ok || frames != 5 || res.Width != 60 || res.Height != 30 {
		t.Errorf("webp→webp: ANIM=%v frames=%d size %dx%d", ok, frames, res.Width, res.Height)
	}
	// libwebp's animation encoder uses transparency for frame deltas, so
	// the VP8X alpha flag is set and the still comes out as PNG.
	res, err = g.Generate(context.Background(), anim.Data, Request{Width: 60, Height: 60, Method: MethodScale})
	if err != nil || res.Animated || res.ContentType != "image/png" || res.Width != 60 || res.Height != 30 {
		t.Errorf("animated webp → still: %+v, %v", Result{ContentType: res.ContentType, Width: res.Width, Height: res.Height, Animated: res.Animated}, err)
	}
}

func TestNeverUpscale(t *testing.T) {
	g := newGen(t, Options{})
	small := encodeJPEG(t, gradient(100, 80), 90)
	for _, req := range []Request{
		{Width: 320, Height: 240, Method: MethodScale},
		{Width: 100, Height: 80, Method: MethodScale},
		{Width: 100, Height: 80, Method: MethodCrop},
		{Width: 800, Height: 600, Method: MethodCrop},
	} {
		if _, err := g.Generate(context.Background(), small, req); !errors.Is(err, ErrSmallerThanRequest) {
			t.Errorf("%+v: err = %v, want ErrSmallerThanRequest", req, err)
		}
	}
	// Crop larger than the source in one dimension keeps the requested
	// aspect ratio without scaling: 100x80 cropped to 96x200 → 38x80.
	res, err := g.Generate(context.Background(), small, Request{Width: 96, Height: 200, Method: MethodCrop})
	if err != nil {
		t.Fatal(err)
	}
	if res.Width != 38 || res.Height != 80 {
		t.Errorf("partial crop size %dx%d, want 38x80", res.Width, res.Height)
	}
	// Scale with one dimension over the box shrinks.
	res, err = g.Generate(context.Background(), small, Request{Width: 50, Height: 200, Method: MethodScale})
	if err != nil || res.Width != 50 || res.Height != 40 {
		t.Errorf("scale 50x200: %dx%d, %v; want 50x40", res.Width, res.Height, err)
	}
}

func TestDeterministic(t *testing.T) {
	g := newGen(t, Options{})
	cases := []struct {
		src []byte
		req Request
	}{
		{photoOnce(), Request{Width: 320, Height: 240, Method: MethodScale}},
		{withOrientation(encodeJPEG(t, quadrants(400, 200), 90), 6), Request{Width: 96, Height: 96, Method: MethodCrop}},
		{alphaPNG(t, 300, 300), Request{Width: 64, Height: 64, Method: MethodCrop}},
		{animatedGIF(t, 120, 90, 5), Request{Width: 60, Height: 60, Method: MethodScale, Animated: true}},
	}
	for i, c := range cases {
		a, err := g.Generate(context.Background(), c.src, c.req)
		if err != nil {
			t.Fatal(err)
		}
		b, err := g.Generate(context.Background(), c.src, c.req)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a.Data, b.Data) {
			t.Errorf("case %d: outputs differ (%d vs %d bytes)", i, len(a.Data), len(b.Data))
		}
	}
}

func TestRejections(t *testing.T) {
	g := newGen(t, Options{})
	jpg := encodeJPEG(t, gradient(300, 200), 90)
	gifSrc := animatedGIF(t, 120, 90, 3)
	pngSrc := encodePNG(t, gradient(300, 200))
	tests := []struct {
		name string
		src  []byte
		want error
	}{
		{"zero bytes", nil, ErrUnsupported},
		{"bomb png header", bombPNG(100000, 100000), ErrTooLarge},
		{"bomb png just over 32MP", bombPNG(8000, 4001), ErrTooLarge},
		{"svg", []byte(`<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="800" height="600"><rect width="800" height="600"/></svg>`), ErrUnsupported},
		{"pdf", []byte("%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"), ErrUnsupported},
		{"text", []byte("hello, this is not an image\n"), ErrUnsupported},
		{"truncated jpeg", jpg[:len(jpg)/2], ErrUnsupported},
		{"jpeg header only", jpg[:20], ErrUnsupported},
		{"truncated png", pngSrc[:len(pngSrc)/2], ErrUnsupported},
		{"truncated gif", gifSrc[:len(gifSrc)/2], ErrUnsupported},
		{"magic only", []byte{0xFF, 0xD8, 0xFF}, ErrUnsupported},
		{"tiff", []byte("II*\x00\x08\x00\x00\x00\x00\x00"), ErrUnsupported},
		{"heic not allowed", append([]byte("\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"), make([]byte, 64)...), ErrUnsupported},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Probe(tc.src); !errors.Is(err, tc.want) {
				t.Errorf("Probe err = %v, want %v", err, tc.want)
			}
			if _, err := g.Generate(context.Background(), tc.src, Request{Width: 32, Height: 32, Method: MethodCrop}); !errors.Is(err, tc.want) {
				t.Errorf("Generate err = %v, want %v", err, tc.want)
			}
		})
	}

	// Byte limit.
	gs := newGen(t, Options{MaxSourceBytes: 1000})
	if _, err := gs.Generate(context.Background(), jpg, Request{Width: 32, Height: 32, Method: MethodCrop}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("MaxSourceBytes: err = %v, want ErrTooLarge", err)
	}
	// Frames count towards MaxPixels only for animated output.
	gp := newGen(t, Options{MaxPixels: 120 * 90 * 2})
	anim := animatedGIF(t, 120, 90, 5)
	if _, err := gp.Generate(context.Background(), anim, Request{Width: 32, Height: 32, Method: MethodCrop, Animated: true}); !errors.Is(err, ErrTooLarge) {
		t.Errorf("animated over MaxPixels: err = %v, want ErrTooLarge", err)
	}
	if _, err := gp.Generate(context.Background(), anim, Request{Width: 32, Height: 32, Method: MethodCrop}); err != nil {
		t.Errorf("still of animated gif within MaxPixels: %v", err)
	}
	// Invalid requests.
	for _, req := range []Request{
		{Width: 0, Height: 32, Method: MethodCrop},
		{Width: 32, Height: -1, Method: MethodScale},
		{Width: 32, Height: 32, Method: "fit"},
		{Width: 32, Height: 32, Method: MethodScale, Output: FormatGIF},
	} {
		if _, err := g.Generate(context.Background(), jpg, req); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("%+v: err = %v, want ErrInvalidRequest", req, err)
		}
	}
}

func TestProbeBombFast(t *testing.T) {
	bomb := bombPNG(100000, 100000)
	start := time.Now()
	const n = 100
	for i := 0; i < n; i++ {
		if _, err := Probe(bomb); !errors.Is(err, ErrTooLarge) {
			t.Fatalf("err = %v, want ErrTooLarge", err)
		}
	}
	if per := time.Since(start) / n; per > 5*time.Millisecond {
		t.Errorf("Probe on bomb took %v per call, want < 5ms", per)
	}
}

func TestProbeInfo(t *testing.T) {
	photo := photoOnce()
	tests := []struct {
		name string
		src  []byte
		want Info
	}{
		{"jpeg", photo, Info{Format: FormatJPEG, Width: 4000, Height: 3000, Frames: 1, Orientation: 1}},
		{"png alpha", alphaPNG(t, 30, 20), Info{Format: FormatPNG, Width: 30, Height: 20, Frames: 1, Orientation: 1, HasAlpha: true}},
		{"gif", animatedGIF(t, 40, 30, 7), Info{Format: FormatGIF, Width: 40, Height: 30, Frames: 7, Orientation: 1}},
	}
	for _, tc := range tests {
		got, err := Probe(tc.src)
		if err != nil || got != tc.want {
			t.Errorf("%s: Probe = %+v, %v; want %+v", tc.name, got, err, tc.want)
		}
	}
	// Trailing bytes after EOI are fine.
	if _, err := Probe(append(append([]byte{}, photo...), "trailer"...)); err != nil {
		t.Errorf("jpeg with trailing data: %v", err)
	}
}

func TestBusyAndCancel(t *testing.T) {
	g := newGen(t, Options{Workers: 1, Queue: 1})
	release := make(chan struct{})
	entered := make(chan struct{}, 4)
	g.testHookRunning = func() {
		entered <- struct{}{}
		<-release
	}
	src := encodeJPEG(t, gradient(200, 100), 90)
	req := Request{Width: 50, Height: 50, Method: MethodCrop}
	waitFor := func(want Stats) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for g.Stats() != want {
			if time.Now().After(deadline) {
				t.Fatalf("stats %+v, want %+v", g.Stats(), want)
			}
			time.Sleep(time.Millisecond)
		}
	}

	errs := make(chan error, 2)
	go func() { _, err := g.Generate(context.Background(), src, req); errs <- err }()
	<-entered // first generation holds the only worker
	go func() { _, err := g.Generate(context.Background(), src, req); errs <- err }()
	waitFor(Stats{Running: 1, Queued: 1})

	// Third: queue full.
	if _, err := g.Generate(context.Background(), src, req); !errors.Is(err, ErrBusy) {
		t.Fatalf("third generation: err = %v, want ErrBusy", err)
	}
	close(release)
	for i := 0; i < 2; i++ {
		if err := <-errs; err != nil {
			t.Errorf("blocked generation %d: %v", i, err)
		}
	}
	waitFor(Stats{})

	// Cancel while queued.
	release2 := make(chan struct{})
	entered2 := make(chan struct{}, 4)
	g.testHookRunning = func() {
		entered2 <- struct{}{}
		<-release2
	}
	go func() { _, err := g.Generate(context.Background(), src, req); errs <- err }()
	<-entered2
	ctx, cancel := context.WithCancel(context.Background())
	cancelled := make(chan error, 1)
	go func() { _, err := g.Generate(ctx, src, req); cancelled <- err }()
	waitFor(Stats{Running: 1, Queued: 1})
	cancel()
	if err := <-cancelled; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled while queued: err = %v, want context.Canceled", err)
	}
	waitFor(Stats{Running: 1})
	close(release2)
	if err := <-errs; err != nil {
		t.Errorf("running generation: %v", err)
	}
	waitFor(Stats{})
}

func TestPlan(t *testing.T) {
	tests := []struct {
		info         Info
		req          Request
		outW, outH   int
		loadW, loadH int
		useOriginal  bool
	}{
		{Info{Format: FormatJPEG, Width: 1000, Height: 673, Frames: 1, Orientation: 1}, Request{Width: 32, Height: 32, Method: MethodScale}, 32, 21, 32, 21, false},
		{Info{Format: FormatJPEG, Width: 1000, Height: 673, Frames: 1, Orientation: 6}, Request{Width: 320, Height: 240, Method: MethodScale}, 161, 240, 240, 161, false},
		{Info{Format: FormatJPEG, Width: 50, Height: 200, Frames: 1, Orientation: 1}, Request{Width: 96, Height: 96, Method: MethodCrop}, 50, 50, 50, 50, false},
		{Info{Format: FormatHEIF, Width: 50, Height: 40, Frames: 1, Orientation: 1}, Request{Width: 96, Height: 96, Method: MethodCrop}, 50, 40, 50, 40, false},
		{Info{Format: FormatPNG, Width: 50, Height: 40, Frames: 1, Orientation: 1}, Request{Width: 96, Height: 96, Method: MethodCrop}, 50, 40, 50, 40, true},
	}
	for i, tc := range tests {
		p := plan(tc.info, tc.req)
		if p.outW != tc.outW || p.outH != tc.outH || p.loadW != tc.loadW || p.loadH != tc.loadH || p.useOriginal != tc.useOriginal {
			t.Errorf("case %d: plan = %+v", i, p)
		}
	}
}

func TestAVIFOutput(t *testing.T) {
	g := newGen(t, Options{})
	res, err := g.Generate(context.Background(), encodeJPEG(t, gradient(200, 100), 90), Request{Width: 64, Height: 64, Method: MethodScale, Output: FormatAVIF})
	if err != nil {
		t.Fatal(err)
	}
	if res.ContentType != "image/avif" || len(res.Data) < 12 || string(res.Data[4:8]) != "ftyp" || !strings.Contains(string(res.Data[8:32]), "avif") {
		t.Errorf("avif output: %q % x", res.ContentType, res.Data[:min(len(res.Data), 32)])
	}
	if res.Width != 64 || res.Height != 32 {
		t.Errorf("avif size %dx%d, want 64x32", res.Width, res.Height)
	}
}
