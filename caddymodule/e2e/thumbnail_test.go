package e2e

import (
	"bytes"
	"image"
	"image/color"
	"image/color/palette"
	"image/gif"
	"image/jpeg"
	"image/png"
	"net/http"
	"strings"
	"sync"
	"testing"
)

// TestThumbnails exercises the thumbnail endpoints of the xcaddy-built Caddy:
// sizes, formats, animation, never upscaling, errors, and that concurrent
// first requests and later requests get the same bytes.
func TestThumbnails(t *testing.T) {
	hs := newHomeserver(t, testTokens)
	cfg := newConfig(t, hs, site{serverName: "a.test", maxUploadSize: "8MiB"})
	cfg.appExtra = []string{"thumbnails {\n\t\t\tworkers 2\n\t\t}"}
	inst := startCaddy(t, cfg)
	c := newSiteClient(inst, "a.test", "token-alice", true)

	photo := e2eJPEG(t, 1600, 1200)
	photoID, err := c.upload(photo, "image/jpeg", "photo.jpg")
	if err != nil {
		t.Fatal(err)
	}
	logo := e2ePNG(t, 300, 300)
	logoID, err := c.upload(logo, "image/png", "logo.png")
	if err != nil {
		t.Fatal(err)
	}
	anim := e2eGIF(t, 200, 150, 6)
	animID, err := c.upload(anim, "image/gif", "anim.gif")
	if err != nil {
		t.Fatal(err)
	}
	textID, err := c.upload([]byte("not an image"), "text/plain", "")
	if err != nil {
		t.Fatal(err)
	}

	v1 := func(id, q string) string { return "/_matrix/client/v1/media/thumbnail/a.test/" + id + "?" + q }
	tests := []struct {
		name, path   string
		noAuth       bool
		status       int
		contentType  string
		wantW, wantH int
	}{
		{"jpeg scale", v1(photoID, "width=320&height=240&method=scale"), false, 200, "image/jpeg", 320, 240},
		{"jpeg crop", v1(photoID, "width=96&height=96&method=crop"), false, 200, "image/jpeg", 96, 96},
		{"legacy, no auth", "/_matrix/media/v3/thumbnail/a.test/" + photoID + "?width=640&height=480", true, 200, "image/jpeg", 640, 480},
		{"png stays png (nearest scale size 320x240)", v1(logoID, "width=32&height=32&method=scale"), false, 200, "image/png", 240, 240},
		{"png never upscaled", v1(logoID, "width=800&height=600&method=scale"), false, 200, "image/png", 300, 300},
		{"animated gif still", v1(animID, "width=96&height=96&method=crop"), false, 200, "image/png", 96, 96},
		{"animated gif animated", v1(animID, "width=96&height=96&method=crop&animated=true"), false, 200, "image/webp", 0, 0},
		{"text is not an image", v1(textID, "width=32&height=32"), false, 400, "", 0, 0},
		{"missing height", v1(photoID, "width=32"), false, 400, "", 0, 0},
		{"no token", v1(photoID, "width=32&height=32"), true, 401, "", 0, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := c.must(t, request{method: http.MethodGet, path: tc.path, noAuth: tc.noAuth})
			if r.status != tc.status {
				t.Fatalf("%v, want %d", r, tc.status)
			}
			if tc.status != 200 {
				if r.errcode() == "" {
					t.Fatalf("error without errcode: %v", r)
				}
				return
			}
			if ct := r.header.Get("Content-Type"); ct != tc.contentType {
				t.Fatalf("Content-Type %q, want %q", ct, tc.contentType)
			}
			if cd := r.header.Get("Content-Disposition"); !strings.HasPrefix(cd, "inline; filename=thumbnail.") {
				t.Fatalf("Content-Disposition %q", cd)
			}
			if tc.contentType == "image/webp" {
				if !bytes.HasPrefix(r.body, []byte("RIFF")) || !bytes.Contains(r.body[:64], []byte("ANIM")) {
					t.Fatal("not an animated WebP")
				}
				return
			}
			cfg, _, err := image.DecodeConfig(bytes.NewReader(r.body))
			if err != nil || cfg.Width != tc.wantW || cfg.Height != tc.wantH {
				t.Fatalf("decoded %+v %v, want %dx%d", cfg, err, tc.wantW, tc.wantH)
			}
		})
	}

	// Concurrent first requests of a new size, then a later one: same bytes.
	path := v1(photoID, "width=800&height=600&method=scale")
	var wg sync.WaitGroup
	bodies := make([][]byte, 6)
	for i := range bodies {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r, err := c.do(request{method: http.MethodGet, path: path}); err == nil && r.status == 200 {
				bodies[i] = r.body
			}
		}()
	}
	wg.Wait()
	later := c.must(t, request{method: http.MethodGet, path: path})
	for i, b := range bodies {
		if b == nil || !bytes.Equal(b, later.body) {
			t.Fatalf("request %d: missing or different thumbnail bytes", i)
		}
	}
}

func e2eJPEG(t *testing.T, w, h int) []byte {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.Set(x, y, color.RGBA{uint8(x), uint8(y), uint8(x ^ y), 255})
		}
	}
	var b bytes.Buffer
	if err := jpeg.Encode(&b, img, &jpeg.Options{Quality: 85}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func e2ePNG(t *testing.T, w, h int) []byte {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			img.Set(x, y, color.NRGBA{uint8(x), 100, uint8(y), uint8(255 - x%200)})
		}
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func e2eGIF(t *testing.T, w, h, frames int) []byte {
	g := &gif.GIF{}
	for f := 0; f < frames; f++ {
		img := image.NewPaletted(image.Rect(0, 0, w, h), palette.Plan9)
		for y := 0; y < h; y++ {
			for x := 0; x < w; x++ {
				img.SetColorIndex(x, y, uint8((x+y+f*20)%200))
			}
		}
		g.Image = append(g.Image, img)
		g.Delay = append(g.Delay, 10)
	}
	var b bytes.Buffer
	if err := gif.EncodeAll(&b, g); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}
