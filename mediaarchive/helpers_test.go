package mediaarchive

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"image"
	"image/color"
	"image/gif"
	"image/jpeg"
	"image/png"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testmeta"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// backends are the metadata stores exports are tested on.
var backends = testmeta.Backends

// faultyStore is a BlobStore that can pretend blobs are missing or serve
// other bytes for them.
type faultyStore struct {
	storage.BlobStore
	mu      sync.Mutex
	missing map[string]bool
	altered map[string][]byte
}

func (f *faultyStore) Open(ctx context.Context, sha string) (storage.Blob, error) {
	f.mu.Lock()
	missing, altered := f.missing[sha], f.altered[sha]
	f.mu.Unlock()
	switch {
	case missing:
		return storage.Blob{}, storage.ErrNotFound
	case altered != nil:
		return storage.Blob{Content: nopCloser{bytes.NewReader(altered)}, Size: int64(len(altered))}, nil
	}
	return f.BlobStore.Open(ctx, sha)
}

type nopCloser struct{ io.ReadSeeker }

func (nopCloser) Close() error { return nil }

// env is a metadata store and one file datastore ("files").
type env struct {
	meta   storage.MetadataStore
	admin  storage.MediaAdmin
	blobs  *faultyStore
	stores *storage.Datastores
}

func newEnv(t *testing.T, open func(t testing.TB) *sqlstore.Store) *env {
	t.Helper()
	fs, err := filestore.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	blobs := &faultyStore{BlobStore: fs, missing: map[string]bool{}, altered: map[string][]byte{}}
	stores, err := storage.NewDatastores(storage.Datastore{Name: "files", Store: blobs,
		Kinds: []storage.Kind{storage.KindLocal, storage.KindRemote, storage.KindThumbnails}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stores.Close() })
	meta := open(t)
	return &env{meta: meta, admin: meta, blobs: blobs, stores: stores}
}

func (e *env) source() ExportSource { return ExportSource{Meta: e.meta, Stores: e.stores} }

// put stores content and a ready media row for it, and returns the row as
// the store reads it back.
func (e *env) put(t *testing.T, m storage.Media, content []byte) storage.Media {
	t.Helper()
	ctx := context.Background()
	kind := storage.KindLocal
	if m.Remote {
		kind = storage.KindRemote
	}
	res, err := storage.IngestTo(ctx, e.stores, e.meta, kind, bytes.NewReader(content), storage.PutOptions{ExpectedSize: int64(len(content))})
	if err != nil {
		t.Fatal(err)
	}
	m.State, m.SHA256, m.Size = storage.StateReady, res.SHA256, res.Size
	if m.UploadedAt.IsZero() {
		m.UploadedAt = m.CreatedAt
	}
	if err := e.meta.InsertMedia(ctx, m); err != nil {
		t.Fatalf("inserting %s/%s: %v", m.ServerName, m.MediaID, err)
	}
	return e.get(t, m.ServerName, m.MediaID)
}

func (e *env) get(t *testing.T, server, id string) storage.Media {
	t.Helper()
	m, err := e.meta.GetMedia(context.Background(), server, id)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// testImage draws a w×h picture with a gradient and a seed-dependent tint.
func testImage(w, h int, seed uint64) *image.RGBA {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	r := rand.New(rand.NewPCG(seed, seed))
	tint := uint8(r.IntN(256))
	for y := range h {
		for x := range w {
			img.Set(x, y, color.RGBA{uint8(x * 255 / w), uint8(y * 255 / h), tint, 255})
		}
	}
	return img
}

func pngBytes(t *testing.T, w, h int, seed uint64) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := png.Encode(&b, testImage(w, h, seed)); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func jpegBytes(t *testing.T, w, h int, seed uint64) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := jpeg.Encode(&b, testImage(w, h, seed), &jpeg.Options{Quality: 90}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func gifBytes(t *testing.T, w, h int) []byte {
	t.Helper()
	pal := image.NewPaletted(image.Rect(0, 0, w, h), []color.Color{color.Black, color.White, color.RGBA{200, 30, 30, 255}})
	for y := range h {
		for x := range w {
			pal.SetColorIndex(x, y, uint8((x/4+y/4)%3))
		}
	}
	var b bytes.Buffer
	if err := gif.Encode(&b, pal, nil); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// goThumbnailer is a Thumbnailer in pure Go: it decodes the image and
// scales it to fit 48×48 (nearest neighbour), as PNG. It counts its calls.
type goThumbnailer struct {
	mu    sync.Mutex
	calls int
}

func (g *goThumbnailer) Thumbnail(_ context.Context, _ storage.Media, content io.Reader) (Thumbnail, error) {
	g.mu.Lock()
	g.calls++
	g.mu.Unlock()
	src, _, err := image.Decode(content)
	if err != nil {
		return Thumbnail{}, err
	}
	b := src.Bounds()
	scale := max(float64(b.Dx())/48, float64(b.Dy())/48, 1)
	w, h := max(int(float64(b.Dx())/scale), 1), max(int(float64(b.Dy())/scale), 1)
	dst := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			dst.Set(x, y, src.At(b.Min.X+int(float64(x)*scale), b.Min.Y+int(float64(y)*scale)))
		}
	}
	var out bytes.Buffer
	if err := png.Encode(&out, dst); err != nil {
		return Thumbnail{}, err
	}
	return Thumbnail{ContentType: "image/png", Data: out.Bytes()}, nil
}

func pngConfig(b []byte) (image.Config, error) { return png.DecodeConfig(bytes.NewReader(b)) }

// ms is a time at millisecond precision (what the stores keep), in UTC.
func ms(year int, month time.Month, day, hour, minute, sec, milli int) time.Time {
	return time.Date(year, month, day, hour, minute, sec, milli*int(time.Millisecond), time.UTC)
}
