package e2e

import (
	"bytes"
	"image"
	"image/color"
	"image/png"
	"net/http"
	"strings"
	"testing"
)

// checkSiblings: media of one site block is served by the other site block
// of the same Caddy from the shared store, under the asking site's auth
// (download, thumbnail, legacy download), never over federation.
func checkSiblings(t *testing.T, a, b *siteClient) {
	img := image.NewNRGBA(image.Rect(0, 0, 200, 150))
	for i := range img.Pix {
		img.Pix[i] = byte(i * 7)
	}
	img.Set(3, 3, color.White)
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	content := buf.Bytes()
	id, err := a.upload(content, "image/png", "sib.png")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, path string
		noAuth     bool
		status     int
	}{
		{"download", "/_matrix/client/v1/media/download/a.test/" + id, false, 200},
		{"legacy download", "/_matrix/media/v3/download/a.test/" + id, true, 200},
		{"thumbnail", "/_matrix/client/v1/media/thumbnail/a.test/" + id + "?width=32&height=32&method=crop", false, 200},
		{"without a token", "/_matrix/client/v1/media/download/a.test/" + id, true, 401},
		{"unknown", "/_matrix/client/v1/media/download/a.test/nosuchmedia", false, 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := b.do(request{method: http.MethodGet, path: tc.path, noAuth: tc.noAuth})
			if err != nil {
				t.Fatal(err)
			}
			if resp.status != tc.status {
				t.Fatalf("b.test: %v, want %d", resp, tc.status)
			}
			switch {
			case tc.status != 200:
			case strings.Contains(tc.path, "/download/") && !bytes.Equal(resp.body, content):
				t.Fatalf("b.test served %d bytes that differ from the %d uploaded on a.test", len(resp.body), len(content))
			case strings.Contains(tc.path, "/thumbnail/") && !strings.HasPrefix(resp.header.Get("Content-Type"), "image/"):
				t.Fatalf("thumbnail of type %q", resp.header.Get("Content-Type"))
			}
		})
	}
}
