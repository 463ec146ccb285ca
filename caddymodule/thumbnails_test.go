package caddymodule

import (
	"bytes"
	"encoding/json"
	"image"
	"image/color"
	"image/jpeg"
	stdpng "image/png"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

func TestResolveThumbnails(t *testing.T) {
	for _, tc := range []struct {
		cfg     ThumbnailsConfig
		wantErr string
	}{
		{ThumbnailsConfig{}, ""},
		{ThumbnailsConfig{Formats: []string{"webp", "avif"}, Dynamic: true}, ""},
		{ThumbnailsConfig{Formats: []string{"gif"}}, "unknown output format"},
		{ThumbnailsConfig{Sizes: []ThumbnailSizeConfig{{0, 10, "crop"}}}, "invalid size"},
		{ThumbnailsConfig{Workers: -1}, "workers must not be negative"},
		{ThumbnailsConfig{Remote: "fetch"}, ""},
		{ThumbnailsConfig{Remote: "proxy"}, "remote must be generate or fetch"},
		{ThumbnailsConfig{MaxMemory: 64 << 20, Timeout: caddyDuration("30s")}, ""},
		{ThumbnailsConfig{MaxMemory: -1}, "max_memory must not be negative"},
		{ThumbnailsConfig{Timeout: -1}, "timeout must not be negative"},
	} {
		_, err := resolveThumbnails(&tc.cfg)
		if (tc.wantErr == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("%+v: err = %v, want %q", tc.cfg, err, tc.wantErr)
		}
	}
}

// TestQuarantinePlaceholderFile: the placeholder is read once, typed from
// its bytes, and refused when it is not a small image.
func TestQuarantinePlaceholderFile(t *testing.T) {
	dir := t.TempDir()
	var png bytes.Buffer
	if err := stdpng.Encode(&png, image.NewGray(image.Rect(0, 0, 4, 4))); err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	okPath := write("removed.png", png.Bytes())
	s, err := resolveThumbnails(&ThumbnailsConfig{QuarantinePlaceholder: okPath})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s.placeholder, png.Bytes()) || s.placeholderType != "image/png" {
		t.Fatalf("placeholder = %d bytes of %q, want the PNG file", len(s.placeholder), s.placeholderType)
	}
	for _, tc := range []struct{ path, wantErr string }{
		{write("notes.txt", []byte("not an image")), "not a JPEG, PNG, GIF or WebP image"},
		{write("huge.png", append(png.Bytes(), make([]byte, maxPlaceholderSize)...)), "larger than"},
		{filepath.Join(dir, "missing.png"), "no such file"},
	} {
		_, err := resolveThumbnails(&ThumbnailsConfig{QuarantinePlaceholder: tc.path})
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("%s: err = %v, want %q", filepath.Base(tc.path), err, tc.wantErr)
		}
	}
}

func caddyDuration(s string) caddy.Duration {
	d, err := caddy.ParseDuration(s)
	if err != nil {
		panic(err)
	}
	return caddy.Duration(d)
}

func TestHandlerThumbnails(t *testing.T) {
	hs := fakeHomeserver(t, map[string]string{"tok": "@alice:example.org"})
	img := image.NewRGBA(image.Rect(0, 0, 640, 480))
	for i := range img.Pix {
		img.Pix[i] = uint8(i)
	}
	img.Set(0, 0, color.RGBA{1, 2, 3, 255})
	var src bytes.Buffer
	if err := jpeg.Encode(&src, img, nil); err != nil {
		t.Fatal(err)
	}
	for _, disabled := range []bool{false, true} {
		appCfg := testAppConfig(t)
		if disabled {
			appCfg.Thumbnails = &ThumbnailsConfig{Disabled: true}
		}
		ctx, cancel := newCaddyContext(t, map[string]any{"matrix_media": appCfg})
		h := &Handler{ServerName: "example.org", Homeserver: hs.URL}
		if err := h.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		up := httptest.NewRequest(http.MethodPost, "/_matrix/media/v3/upload", bytes.NewReader(src.Bytes()))
		up.Header.Set("Authorization", "Bearer tok")
		up.Header.Set("Content-Type", "image/jpeg")
		rec, _ := serve(t, h, up)
		var body struct {
			ContentURI string `json:"content_uri"`
		}
		if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &body) != nil {
			t.Fatalf("upload: %d %s", rec.Code, rec.Body)
		}
		id := body.ContentURI[strings.LastIndexByte(body.ContentURI, '/')+1:]
		rec, _ = serve(t, h, httptest.NewRequest(http.MethodGet, "/_matrix/media/v3/thumbnail/example.org/"+id+"?width=96&height=96&method=crop", nil))
		if disabled {
			if rec.Code != 404 || !strings.Contains(rec.Body.String(), "M_UNRECOGNIZED") {
				t.Fatalf("disabled: %d %s", rec.Code, rec.Body)
			}
		} else {
			cfg, format, err := image.DecodeConfig(bytes.NewReader(rec.Body.Bytes()))
			if rec.Code != 200 || err != nil || format != "jpeg" || cfg.Width != 96 || cfg.Height != 96 {
				t.Fatalf("thumbnail: %d %v %s %+v", rec.Code, err, format, cfg)
			}
		}
		cancel()
	}
}
