package thumbnails

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"github.com/h2non/bimg"
)

// BenchmarkScale4000x3000 measures one 320x240 scale of a 12 MP JPEG
// (reported as thumbs/s); run with -benchtime and -cpu as needed:
//
//	CGO_ENABLED=1 go test -run '^$' -bench Scale4000 ./thumbnails/
func BenchmarkScale4000x3000(b *testing.B) {
	benchGenerate(b, photoOnce(), Request{Width: 320, Height: 240, Method: MethodScale})
}

// BenchmarkCrop4000x3000 measures one 96x96 crop of a 12 MP JPEG.
func BenchmarkCrop4000x3000(b *testing.B) {
	benchGenerate(b, photoOnce(), Request{Width: 96, Height: 96, Method: MethodCrop})
}

// BenchmarkScale4000x3000Rotated measures the EXIF orientation 6 path
// (shrink first, rotate the small result).
func BenchmarkScale4000x3000Rotated(b *testing.B) {
	benchGenerate(b, withOrientation(photoOnce(), 6), Request{Width: 320, Height: 240, Method: MethodScale})
}

// BenchmarkScale4000x3000Parallel runs generations from GOMAXPROCS
// goroutines through one Generator (Workers = NumCPU).
func BenchmarkScale4000x3000Parallel(b *testing.B) {
	g := newGen(b, Options{Queue: 1024})
	src := photoOnce()
	req := Request{Width: 320, Height: 240, Method: MethodScale}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := g.Generate(context.Background(), src, req); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "thumbs/s")
}

// BenchmarkProbeBomb measures Probe on a 100000x100000 PNG header.
func BenchmarkProbeBomb(b *testing.B) {
	bomb := bombPNG(100000, 100000)
	for i := 0; i < b.N; i++ {
		if _, err := Probe(bomb); !errors.Is(err, ErrTooLarge) {
			b.Fatal(err)
		}
	}
}

func benchGenerate(b *testing.B, src []byte, req Request) {
	g := newGen(b, Options{})
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := g.Generate(context.Background(), src, req); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "thumbs/s")
}

// rssKiB returns the process's resident set size from /proc (0 elsewhere).
func rssKiB() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			v, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return v
		}
	}
	return 0
}

// memCheck runs n mixed generations (JPEG scale/crop, rotated JPEG, alpha
// PNG, animated GIF still and animated) and logs RSS and libvips' tracked
// memory every n/5 generations. It fails if libvips still tracks memory
// after the run (a leak in the C path).
func memCheck(t *testing.T, n int) {
	g := newGen(t, Options{})
	jpg := encodeJPEG(t, gradient(1600, 1200), 85)
	rot := withOrientation(jpg, 6)
	alpha := alphaPNG(t, 800, 600)
	anim := animatedGIF(t, 200, 150, 8)
	jobs := []struct {
		src []byte
		req Request
	}{
		{jpg, Request{Width: 320, Height: 240, Method: MethodScale}},
		{jpg, Request{Width: 96, Height: 96, Method: MethodCrop}},
		{rot, Request{Width: 320, Height: 240, Method: MethodScale}},
		{alpha, Request{Width: 96, Height: 96, Method: MethodCrop}},
		{anim, Request{Width: 96, Height: 96, Method: MethodCrop}},
		{anim, Request{Width: 96, Height: 96, Method: MethodScale, Animated: true}},
	}
	step := max(n/5, 1)
	t.Logf("start: rss=%d KiB vips=%+v", rssKiB(), VipsMemory())
	for i := 1; i <= n; i++ {
		j := jobs[i%len(jobs)]
		if _, err := g.Generate(context.Background(), j.src, j.req); err != nil {
			t.Fatal(err)
		}
		if i%step == 0 {
			runtime.GC()
			t.Logf("after %d: rss=%d KiB vips=%+v", i, rssKiB(), VipsMemory())
		}
	}
	debug.FreeOSMemory()
	m := VipsMemory()
	t.Logf("end: rss=%d KiB vips=%+v", rssKiB(), m)
	if m.Bytes > 1<<20 {
		t.Errorf("libvips still tracks %d bytes after %d generations", m.Bytes, n)
	}
}

// TestMemoryTracked is the short, always-on version of the memory check.
func TestMemoryTracked(t *testing.T) {
	memCheck(t, 12)
}

// TestMemorySoak is the memory check helper for the lead: it only runs
// when THUMBNAILS_MEMCHECK is set to a generation count, e.g.
//
//	MALLOC_ARENA_MAX=2 THUMBNAILS_MEMCHECK=2000 CGO_ENABLED=1 \
//	  go test -run TestMemorySoak -v -timeout 30m ./thumbnails/
//
// RSS should plateau (about 100–200 MB with MALLOC_ARENA_MAX=2 per the
// libvips findings) and libvips' tracked bytes return to ~0.
func TestMemorySoak(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("THUMBNAILS_MEMCHECK"))
	if n <= 0 {
		t.Skip("set THUMBNAILS_MEMCHECK=<generations> to run")
	}
	memCheck(t, n)
}

// TestUntrustedLoadersBlocked checks that New blocks libvips' SVG loader
// process-wide, even for callers that bypass Probe.
func TestUntrustedLoadersBlocked(t *testing.T) {
	newGen(t, Options{})
	svg := []byte(`<svg xmlns="http://www.w3.org/2000/svg" width="80" height="60"><rect width="80" height="60" fill="red"/></svg>`)
	_, err := bimg.Resize(svg, bimg.Options{Width: 10, Height: 10, Type: bimg.PNG})
	if err == nil || !strings.Contains(err.Error(), "blocked") {
		t.Errorf("bimg.Resize(svg) err = %v, want a blocked-operation error", err)
	}
}

// TestHEIFSources checks AllowHEIF for HEIC and AVIF sources made with
// libvips.
func TestHEIFSources(t *testing.T) {
	jpg := encodeJPEG(t, gradient(200, 100), 90)
	for _, typ := range []bimg.ImageType{bimg.HEIF, bimg.AVIF} {
		src, err := bimg.Resize(jpg, bimg.Options{Type: typ, Quality: 50, StripMetadata: true, NoAutoRotate: true})
		if err != nil {
			t.Fatalf("making %s fixture: %v", bimg.ImageTypeName(typ), err)
		}
		want := FormatHEIF
		if typ == bimg.AVIF {
			want = FormatAVIF
		}
		if got := sniff(src); got != want {
			t.Fatalf("sniff = %q, want %q (% x)", got, want, src[:min(32, len(src))])
		}
		req := Request{Width: 64, Height: 64, Method: MethodScale}
		if _, err := newGen(t, Options{}).Generate(context.Background(), src, req); !errors.Is(err, ErrUnsupported) {
			t.Errorf("%s without AllowHEIF: err = %v", want, err)
		}
		g := newGen(t, Options{AllowHEIF: true})
		info, err := g.Probe(src)
		if err != nil || info.Width != 200 || info.Height != 100 {
			t.Errorf("%s probe = %+v, %v", want, info, err)
		}
		res, err := g.Generate(context.Background(), src, req)
		if err != nil {
			t.Fatalf("%s: %v", want, err)
		}
		if res.ContentType != "image/jpeg" || res.Width != 64 || res.Height != 32 {
			t.Errorf("%s: %q %dx%d, want image/jpeg 64x32", want, res.ContentType, res.Width, res.Height)
		}
		// Small HEIF is re-encoded, not served as the original.
		res, err = g.Generate(context.Background(), src, Request{Width: 400, Height: 400, Method: MethodCrop})
		if err != nil || res.Width != 200 || res.Height != 100 || !bytes.HasPrefix(res.Data, []byte{0xFF, 0xD8}) {
			t.Errorf("%s small: %dx%d, %v", want, res.Width, res.Height, err)
		}
	}
}

// BenchmarkScale4000x3000AVIF measures AVIF output (libaom, effort 4).
func BenchmarkScale4000x3000AVIF(b *testing.B) {
	benchGenerate(b, photoOnce(), Request{Width: 320, Height: 240, Method: MethodScale, Output: FormatAVIF})
}

// BenchmarkAnimatedGIF measures a 96x96 animated WebP crop of a 320x240,
// 20-frame GIF.
func BenchmarkAnimatedGIF(b *testing.B) {
	benchGenerate(b, animatedGIF(b, 320, 240, 20), Request{Width: 96, Height: 96, Method: MethodCrop, Animated: true})
}
