package caddymodule

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"image"
	"image/color"
	_ "image/jpeg" // previews may be JPEG
	"image/png"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/mediaarchive"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

func testPNG(t *testing.T, w, h int) []byte {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			img.Set(x, y, color.RGBA{uint8(x), uint8(y), 90, 255})
		}
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// TestAdminExport exports through the admin API handler on a provisioned
// app (real stores, the real thumbnail generator): the archive holds the
// user's media byte for byte with libvips previews of the images, the
// server export holds every local item, and bad requests and a busy
// exporter are refused before anything is written.
func TestAdminExport(t *testing.T) {
	a, unload := provisionApp(t, *testAppConfig(t))
	defer unload()
	res := a.res
	ctx := context.Background()
	at := time.Date(2025, 7, 1, 12, 0, 0, 0, time.UTC)
	big, small := testPNG(t, 400, 300), testPNG(t, 20, 10)
	content := map[string][]byte{"big": big, "small": small, "text": []byte("hello"), "bobs": []byte("bob's")}
	for _, m := range []struct{ id, user, ctype string }{
		{"big", "@alice:a.example", "image/png"}, {"small", "@alice:a.example", "image/png"},
		{"text", "@alice:a.example", "text/plain"}, {"bobs", "@bob:a.example", "text/plain"},
	} {
		b := content[m.id]
		blob, err := storage.IngestTo(ctx, res.stores, res.meta, storage.KindLocal, bytes.NewReader(b), storage.PutOptions{ExpectedSize: int64(len(b))})
		if err != nil {
			t.Fatal(err)
		}
		if err := res.meta.InsertMedia(ctx, storage.Media{ServerName: "a.example", MediaID: m.id, UserID: m.user, State: storage.StateReady,
			SHA256: blob.SHA256, Size: blob.Size, ContentType: m.ctype, Filename: m.id, CreatedAt: at, UploadedAt: at}); err != nil {
			t.Fatal(err)
		}
	}

	req := httptest.NewRequest(http.MethodGet, adminPrefix+"export?user=%40alice%3Aa.example", nil)
	rec := httptest.NewRecorder()
	if err := res.serveExport(rec, req); err != nil {
		t.Fatal(err)
	}
	if ct, cd := rec.Header().Get("Content-Type"), rec.Header().Get("Content-Disposition"); rec.Code != 200 || ct != "application/zip" ||
		cd != `attachment; filename="media-alice-a.example.zip"` {
		t.Fatalf("export: %d %q %q", rec.Code, ct, cd)
	}
	body := rec.Body.Bytes()
	src, err := mediaarchive.NewSource(bytes.NewReader(body), int64(len(body)), "test")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]byte{}
	err = src.Walk(ctx, importer.Filter{}, func(it importer.Item) error {
		rc, err := it.Open(ctx)
		if err != nil {
			return err
		}
		defer rc.Close()
		got[it.MediaID], err = io.ReadAll(rc)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || !bytes.Equal(got["big"], big) || !bytes.Equal(got["small"], small) || string(got["text"]) != "hello" {
		t.Errorf("the user's archive holds %d items", len(got))
	}
	checkPreviews(t, body)

	req = httptest.NewRequest(http.MethodGet, adminPrefix+"export?server=a.example", nil)
	rec = httptest.NewRecorder()
	if err := res.serveExport(rec, req); err != nil {
		t.Fatal(err)
	}
	b := rec.Body.Bytes()
	src, err = mediaarchive.NewSource(bytes.NewReader(b), int64(len(b)), "test")
	if err != nil {
		t.Fatal(err)
	}
	if tot, err := src.Totals(ctx, importer.Filter{}); err != nil || tot.Items != 4 {
		t.Errorf("server archive totals %+v, %v", tot, err)
	}

	for _, tc := range []struct {
		method, target string
		status         int
		want           string
	}{
		{http.MethodPost, adminPrefix + "export?server=a.example", 405, "method"},
		{http.MethodGet, adminPrefix + "export", 400, "either"},
		{http.MethodGet, adminPrefix + "export?server=a.example&user=%40a%3Aa.example", 400, "either"},
		{http.MethodGet, adminPrefix + "export?user=alice", 400, "user ID"},
		{http.MethodGet, adminPrefix + "export?server=a%20b", 400, "server name"},
	} {
		status, body := adminCall(t, res.serveExport, tc.method, tc.target, "")
		if status != tc.status || !strings.Contains(body, tc.want) {
			t.Errorf("%s %s = %d %s; want %d with %q", tc.method, tc.target, status, body, tc.status, tc.want)
		}
	}
	for range maxConcurrentExports {
		res.exports <- struct{}{}
	}
	status, msg := adminCall(t, res.serveExport, http.MethodGet, adminPrefix+"export?server=a.example", "")
	for range maxConcurrentExports {
		<-res.exports
	}
	if status != http.StatusTooManyRequests || !strings.Contains(msg, "too many") {
		t.Errorf("busy exporter: %d %s", status, msg)
	}
}

// checkPreviews checks that the big image got a libvips preview that fits
// the box, and the small one is its own preview.
func checkPreviews(t *testing.T, archive []byte) {
	t.Helper()
	zr, err := zip.NewReader(bytes.NewReader(archive), int64(len(archive)))
	if err != nil {
		t.Fatal(err)
	}
	var previews []string
	for _, f := range zr.File {
		if !strings.HasPrefix(f.Name, "thumbnails/") {
			continue
		}
		previews = append(previews, f.Name)
		rc, err := f.Open()
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(rc)
		rc.Close()
		cfg, format, err := image.DecodeConfig(bytes.NewReader(b))
		if err != nil || cfg.Width > exportPreviewWidth || cfg.Height > exportPreviewHeight {
			t.Errorf("preview %s: %s %dx%d, %v", f.Name, format, cfg.Width, cfg.Height, err)
		}
		if strings.Contains(f.Name, "/big.") && (cfg.Width != 160 || cfg.Height != 120) {
			t.Errorf("preview of the 400x300 image is %dx%d, want 160x120", cfg.Width, cfg.Height)
		}
		if strings.Contains(f.Name, "/small.") && (cfg.Width != 20 || format != "png") {
			t.Errorf("preview of the 20x10 PNG is a %dx%d %s, want itself", cfg.Width, cfg.Height, format)
		}
	}
	if len(previews) != 2 {
		t.Errorf("previews %q, want one per image", previews)
	}
}

// TestWriteArchiveFile: the CLI's file is complete and checked before it
// gets its name, an existing file is never replaced, and a failed or
// truncated download leaves nothing behind.
func TestWriteArchiveFile(t *testing.T) {
	archive := minimalArchive(t)
	noProgress := func(int64, bool) {}
	dir := t.TempDir()
	out := filepath.Join(dir, "export.zip")
	var last int64
	man, err := writeArchiveFile(out, bytes.NewReader(archive), func(n int64, done bool) {
		if done {
			last = n
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(out); err != nil || !bytes.Equal(b, archive) || last != int64(len(archive)) || man.Export.ServerName != "a.example" {
		t.Errorf("written file: %d bytes, %v; progress %d; manifest %+v", len(b), err, last, man)
	}
	if _, err := os.Stat(out + ".partial"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the partial file remains: %v", err)
	}

	// Never over an existing file, even one that appears meanwhile.
	if _, err := writeArchiveFile(out, bytes.NewReader(archive), noProgress); err == nil || !strings.Contains(err.Error(), "not overwriting") {
		t.Errorf("writing over an existing file: %v", err)
	}

	for name, body := range map[string]io.Reader{
		"truncated":   bytes.NewReader(archive[:len(archive)-30]),
		"not zip":     strings.NewReader("<html>proxy error</html>"),
		"read failed": io.MultiReader(bytes.NewReader(archive[:100]), failingReader{errors.New("connection reset")}),
	} {
		p := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".zip")
		if _, err := writeArchiveFile(p, body, noProgress); err == nil {
			t.Errorf("%s: no error", name)
		}
		for _, f := range []string{p, p + ".partial"} {
			if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s: %s exists after a failed export (%v)", name, f, err)
			}
		}
	}
}

// minimalArchive is a real export of one text item.
func minimalArchive(t *testing.T) []byte {
	t.Helper()
	a, unload := provisionApp(t, *testAppConfig(t))
	defer unload()
	res := a.res
	ctx := context.Background()
	blob, err := storage.IngestTo(ctx, res.stores, res.meta, storage.KindLocal, strings.NewReader("x"), storage.PutOptions{ExpectedSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	if err := res.meta.InsertMedia(ctx, storage.Media{ServerName: "a.example", MediaID: "x", UserID: "@u:a.example", State: storage.StateReady,
		SHA256: blob.SHA256, Size: 1, ContentType: "text/plain", CreatedAt: at, UploadedAt: at}); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := res.export(ctx, &b, "a.example", ""); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}
