package storage_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/s3store"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// adminMetaStores are the metadata stores RemoveMedia is tested with (it
// needs storage.MediaAdmin and storage.BlobCollector).
var adminMetaStores = []struct {
	name string
	open func(t *testing.T) storage.MetadataStore
}{
	{"sqlite", func(t *testing.T) storage.MetadataStore {
		m, err := sqlstore.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "meta.db"))
		if err != nil {
			t.Fatalf("opening sqlite metadata store: %v", err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}},
	{"postgres", func(t *testing.T) storage.MetadataStore {
		m, err := sqlstore.OpenPostgres(context.Background(), testpg.DSN(t))
		if err != nil {
			t.Fatalf("opening postgres metadata store: %v", err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}},
}

// removeLayouts are pairs of datastores: "media" takes local media, "thumbs"
// thumbnails.
var removeLayouts = []struct {
	name string
	open func(t *testing.T) (media, thumbs storage.BlobStore)
}{
	{"files", func(t *testing.T) (storage.BlobStore, storage.BlobStore) {
		return newFileStore(t), newFileStore(t)
	}},
	{"s3", func(t *testing.T) (storage.BlobStore, storage.BlobStore) {
		srv := tests3.Start(t)
		s3, err := s3store.New(context.Background(), s3store.Config{
			Endpoint: srv.URL(), Bucket: srv.Bucket(), PathStyle: true,
			AccessKeyID: srv.AccessKey(), SecretAccessKey: srv.SecretKey(), RetryMaxBackoff: 20 * time.Millisecond,
		})
		if err != nil {
			t.Fatalf("s3store.New: %v", err)
		}
		return s3, newFileStore(t)
	}},
}

func newFileStore(t *testing.T) storage.BlobStore {
	t.Helper()
	s, err := filestore.New(t.TempDir())
	if err != nil {
		t.Fatalf("filestore.New: %v", err)
	}
	return s
}

// failingDelete makes Delete fail with err (when set).
type failingDelete struct {
	storage.BlobStore
	err error
}

func (f *failingDelete) Delete(ctx context.Context, sha string) error {
	if f.err != nil {
		return f.err
	}
	return f.BlobStore.Delete(ctx, sha)
}

// removeFixture is a metadata store and two datastores.
type removeFixture struct {
	meta          storage.MetadataStore
	ds            *storage.Datastores
	media, thumbs *failingDelete
}

func newRemoveFixture(t *testing.T, openMeta func(*testing.T) storage.MetadataStore, openStores func(*testing.T) (storage.BlobStore, storage.BlobStore)) *removeFixture {
	t.Helper()
	media, thumbs := openStores(t)
	fx := &removeFixture{meta: openMeta(t), media: &failingDelete{BlobStore: media}, thumbs: &failingDelete{BlobStore: thumbs}}
	var err error
	fx.ds, err = storage.NewDatastores(
		storage.Datastore{Name: "media", Store: fx.media, Kinds: []storage.Kind{storage.KindLocal}},
		storage.Datastore{Name: "thumbs", Store: fx.thumbs, Kinds: []storage.Kind{storage.KindThumbnails}},
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fx.ds.Close() })
	return fx
}

// ingest stores body as a blob of kind.
func (fx *removeFixture) ingest(t *testing.T, kind storage.Kind, body string) storage.IngestResult {
	t.Helper()
	res, err := storage.IngestTo(context.Background(), fx.ds, fx.meta, kind, bytes.NewReader([]byte(body)), storage.PutOptions{ExpectedSize: int64(len(body))})
	if err != nil {
		t.Fatalf("IngestTo: %v", err)
	}
	return res
}

func (fx *removeFixture) insert(t *testing.T, id string, blob storage.IngestResult) storage.MediaRef {
	t.Helper()
	now := time.Now()
	m := storage.Media{ServerName: "example.org", MediaID: id, UserID: "@alice:example.org", SHA256: blob.SHA256,
		Size: blob.Size, ContentType: "image/png", CreatedAt: now, UploadedAt: now}
	if err := fx.meta.InsertMedia(context.Background(), m); err != nil {
		t.Fatalf("InsertMedia(%s): %v", id, err)
	}
	return storage.MediaRef{ServerName: m.ServerName, MediaID: id}
}

func (fx *removeFixture) thumbnail(t *testing.T, r storage.MediaRef, width int, blob storage.IngestResult) {
	t.Helper()
	th := storage.Thumbnail{
		ThumbnailKey: storage.ThumbnailKey{ServerName: r.ServerName, MediaID: r.MediaID, Width: width, Height: width, Method: "scale"},
		ContentType:  "image/jpeg", SHA256: blob.SHA256, Size: blob.Size, ActualWidth: width, ActualHeight: width, CreatedAt: time.Now(),
	}
	if err := fx.meta.InsertThumbnail(context.Background(), th); err != nil {
		t.Fatalf("InsertThumbnail: %v", err)
	}
}

// stored reports whether the blob's bytes are in store and its record
// exists, failing on any other error.
func (fx *removeFixture) check(t *testing.T, store storage.BlobStore, sha string, want bool) {
	t.Helper()
	ctx := context.Background()
	_, statErr := store.Stat(ctx, sha)
	_, recErr := fx.meta.GetBlob(ctx, sha)
	for what, err := range map[string]error{"Stat": statErr, "GetBlob": recErr} {
		switch {
		case want && err != nil:
			t.Fatalf("%s(%s): %v, want it kept", what, sha[:8], err)
		case !want && !errors.Is(err, storage.ErrNotFound):
			t.Fatalf("%s(%s): %v, want ErrNotFound", what, sha[:8], err)
		}
	}
}

// later is a clock past every claim made by the fixture, so that a grace of
// 0 lets every unreferenced blob go.
func later() time.Time { return time.Now().Add(time.Minute) }

// TestRemoveMedia deletes one of two media sharing a blob (the blob stays),
// then the other (the blob and the thumbnails' blobs go, from a file
// datastore and from S3), and checks grace, tombstones and counts.
func TestRemoveMedia(t *testing.T) {
	ctx := context.Background()
	for _, mb := range adminMetaStores {
		for _, layout := range removeLayouts {
			t.Run(mb.name+"/"+layout.name, func(t *testing.T) {
				fx := newRemoveFixture(t, mb.open, layout.open)
				content := fx.ingest(t, storage.KindLocal, "shared content")
				thumbShared := fx.ingest(t, storage.KindThumbnails, "thumbnail shared by both")
				thumbOwn := fx.ingest(t, storage.KindThumbnails, "thumbnail of m1 only")
				fresh := fx.ingest(t, storage.KindLocal, "content of m3")
				if content.Datastore != "media" || thumbOwn.Datastore != "thumbs" {
					t.Fatalf("fixture: content in %s, thumbnail in %s", content.Datastore, thumbOwn.Datastore)
				}
				m1, m2, m3 := fx.insert(t, "m1", content), fx.insert(t, "m2", content), fx.insert(t, "m3", fresh)
				fx.thumbnail(t, m1, 32, thumbShared)
				fx.thumbnail(t, m1, 64, thumbOwn)
				fx.thumbnail(t, m2, 32, thumbShared)

				// m1: its own thumbnail blob goes; the content and the shared
				// thumbnail stay (m2 references them).
				rm, err := storage.RemoveMedia(ctx, fx.meta, fx.ds, []storage.MediaRef{m1, {ServerName: "example.org", MediaID: "missing"}},
					storage.RemoveOptions{Tombstone: true, Now: later})
				if err != nil {
					t.Fatalf("RemoveMedia(m1): %v", err)
				}
				if len(rm.Media) != 1 || rm.Media[0].MediaID != "m1" || rm.Thumbnails != 2 || rm.Blobs != 1 ||
					rm.Bytes != thumbOwn.Size || rm.KeptBlobs != 2 {
					t.Fatalf("RemoveMedia(m1) = %+v; want m1, 2 thumbnails, 1 blob of %d bytes, 2 kept", rm, thumbOwn.Size)
				}
				fx.check(t, fx.media, content.SHA256, true)
				fx.check(t, fx.thumbs, thumbShared.SHA256, true)
				fx.check(t, fx.thumbs, thumbOwn.SHA256, false)
				if _, err := fx.meta.GetMedia(ctx, m2.ServerName, m2.MediaID); err != nil {
					t.Fatalf("m2 after removing m1: %v", err)
				}
				// m1 was tombstoned.
				err = fx.meta.InsertMedia(ctx, storage.Media{ServerName: m1.ServerName, MediaID: m1.MediaID, SHA256: content.SHA256, Size: content.Size})
				if !errors.Is(err, storage.ErrConflict) {
					t.Fatalf("InsertMedia(m1) after removal: %v, want ErrConflict", err)
				}

				// m3 within the grace: the row goes, its blob stays for the
				// collector.
				rm, err = storage.RemoveMedia(ctx, fx.meta, fx.ds, []storage.MediaRef{m3}, storage.RemoveOptions{Grace: time.Hour, Now: later})
				if err != nil {
					t.Fatalf("RemoveMedia(m3): %v", err)
				}
				if len(rm.Media) != 1 || rm.Blobs != 0 || rm.Bytes != 0 || rm.KeptBlobs != 1 {
					t.Fatalf("RemoveMedia(m3) within grace = %+v; want the row and 1 kept blob", rm)
				}
				fx.check(t, fx.media, fresh.SHA256, true)
				// Without tombstone the ID may be used again.
				if err := fx.meta.InsertMedia(ctx, storage.Media{ServerName: m3.ServerName, MediaID: m3.MediaID, SHA256: fresh.SHA256, Size: fresh.Size}); err != nil {
					t.Fatalf("InsertMedia(m3) after removal without tombstone: %v", err)
				}

				// m2: nothing references the content nor the shared thumbnail
				// any more; both go, from their datastores.
				rm, err = storage.RemoveMedia(ctx, fx.meta, fx.ds, []storage.MediaRef{m2}, storage.RemoveOptions{Tombstone: true, Now: later})
				if err != nil {
					t.Fatalf("RemoveMedia(m2): %v", err)
				}
				if len(rm.Media) != 1 || rm.Thumbnails != 1 || rm.Blobs != 2 || rm.Bytes != content.Size+thumbShared.Size || rm.KeptBlobs != 0 {
					t.Fatalf("RemoveMedia(m2) = %+v; want 1 thumbnail, 2 blobs of %d bytes", rm, content.Size+thumbShared.Size)
				}
				fx.check(t, fx.media, content.SHA256, false)
				fx.check(t, fx.thumbs, thumbShared.SHA256, false)

				// Nothing left to remove: no error, nothing counted.
				rm, err = storage.RemoveMedia(ctx, fx.meta, fx.ds, []storage.MediaRef{m1, m2}, storage.RemoveOptions{Now: later})
				if err != nil || len(rm.Media) != 0 || rm.Blobs != 0 || rm.KeptBlobs != 0 {
					t.Fatalf("RemoveMedia(already removed) = %+v, %v", rm, err)
				}
			})
		}
	}
}

// unavailableMeta is a store whose DeleteMedia fails as a database that is
// down.
type unavailableMeta struct {
	storage.MetadataStore
	storage.MediaAdmin
	storage.BlobCollector
}

func (unavailableMeta) DeleteMedia(context.Context, []storage.MediaRef, bool, time.Time) (storage.DeletedMedia, error) {
	return storage.DeletedMedia{}, fmt.Errorf("deleting: %w: connection refused", storage.ErrUnavailable)
}

// TestRemoveMediaErrors checks that unavailability stays recognizable, and
// that a failed byte deletion keeps the blob's record (for the collector)
// while the rows are gone.
func TestRemoveMediaErrors(t *testing.T) {
	ctx := context.Background()
	fx := newRemoveFixture(t, adminMetaStores[0].open, removeLayouts[0].open)
	blob := fx.ingest(t, storage.KindLocal, "content")
	other := fx.ingest(t, storage.KindLocal, "other content")
	m := fx.insert(t, "m", blob)
	n := fx.insert(t, "n", other)

	broken := unavailableMeta{fx.meta, fx.meta.(storage.MediaAdmin), fx.meta.(storage.BlobCollector)}
	_, err := storage.RemoveMedia(ctx, broken, fx.ds, []storage.MediaRef{m}, storage.RemoveOptions{Now: later})
	if !errors.Is(err, storage.ErrUnavailable) {
		t.Fatalf("RemoveMedia with the database down: %v, want ErrUnavailable", err)
	}
	if _, err := fx.meta.GetMedia(ctx, m.ServerName, m.MediaID); err != nil {
		t.Fatalf("row deleted although DeleteMedia failed: %v", err)
	}

	if _, err := storage.RemoveMedia(ctx, struct{ storage.MetadataStore }{fx.meta}, fx.ds, []storage.MediaRef{m}, storage.RemoveOptions{}); err == nil {
		t.Fatal("RemoveMedia with a store lacking MediaAdmin succeeded")
	}

	fx.media.err = fmt.Errorf("s3 said: %w", storage.ErrUnavailable)
	rm, err := storage.RemoveMedia(ctx, fx.meta, fx.ds, []storage.MediaRef{m, n}, storage.RemoveOptions{Now: later})
	if !errors.Is(err, storage.ErrUnavailable) {
		t.Fatalf("RemoveMedia with the datastore down: %v, want ErrUnavailable", err)
	}
	if len(rm.Media) != 2 || rm.Blobs != 0 || rm.KeptBlobs != 2 {
		t.Fatalf("RemoveMedia with the datastore down = %+v; want 2 rows deleted, 2 blobs kept", rm)
	}
	fx.media.err = nil
	// The records were rolled back with the failed byte deletion: the bytes
	// and records are still there, unreferenced, for the collector.
	fx.check(t, fx.media, blob.SHA256, true)
	fx.check(t, fx.media, other.SHA256, true)
	if _, err := fx.meta.GetMedia(ctx, m.ServerName, m.MediaID); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("row after RemoveMedia: %v, want ErrNotFound", err)
	}
}

// concurrentMeta is a metadata store that asks for n blob deletions at once
// (storage.ConcurrentCollector); n 0 leaves the capability out.
type concurrentMeta struct {
	storage.MetadataStore
	storage.MediaAdmin
	storage.BlobCollector
}

type concurrentMetaN struct {
	concurrentMeta
	n int
}

func (c concurrentMetaN) CollectConcurrency() int { return c.n }

// gatedStore holds every Delete until want of them are running at once (or
// two seconds passed), records how many ran at once at most, and then fails
// with err when set, or deletes; onDelete, when set, runs first.
type gatedStore struct {
	storage.BlobStore
	want     int
	err      error
	onDelete func()

	mu             sync.Mutex
	inflight, peak int
	calls          int
	full           chan struct{}
	fullClosed     bool
}

func newGatedStore(t *testing.T, want int) *gatedStore {
	return &gatedStore{BlobStore: newFileStore(t), want: want, full: make(chan struct{})}
}

func (g *gatedStore) Delete(ctx context.Context, sha string) error {
	if g.onDelete != nil {
		g.onDelete()
	}
	g.mu.Lock()
	g.calls++
	g.inflight++
	g.peak = max(g.peak, g.inflight)
	if g.inflight >= g.want && !g.fullClosed {
		close(g.full)
		g.fullClosed = true
	}
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.inflight--
		g.mu.Unlock()
	}()
	select {
	case <-g.full:
	case <-time.After(2 * time.Second):
	}
	if g.err != nil {
		return g.err
	}
	return g.BlobStore.Delete(ctx, sha)
}

// TestRemoveMediaConcurrentBlobs checks that RemoveMedia deletes blobs as
// many at once as the metadata store's ConcurrentCollector asks (one at a
// time without it), that it stops starting deletions once the datastore is
// unavailable or the context ends, and that in every case each blob keeps
// its record exactly when it keeps its bytes.
func TestRemoveMediaConcurrentBlobs(t *testing.T) {
	unavailable := fmt.Errorf("s3 said: %w", storage.ErrUnavailable)
	cases := []struct {
		name        string
		concurrency int // 0: no ConcurrentCollector
		want        int // Deletes held until this many run at once
		blobs       int
		err         error
		cancel      bool // the first Delete cancels the context
		// expected outcome
		peak     int
		maxCalls int
		deleted  int
		wantErr  error
	}{
		{name: "concurrent", concurrency: 3, want: 3, blobs: 12, peak: 3, maxCalls: 12, deleted: 12},
		{name: "sequential without the capability", want: 1, blobs: 5, peak: 1, maxCalls: 5, deleted: 5},
		{name: "datastore unavailable", concurrency: 4, want: 4, blobs: 20, err: unavailable, peak: 4, maxCalls: 4, wantErr: storage.ErrUnavailable},
		{name: "context cancelled", concurrency: 2, want: 1, blobs: 10, cancel: true, maxCalls: 2, wantErr: context.Canceled},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			pg := adminMetaStores[1].open(t)
			base := concurrentMeta{pg, pg.(storage.MediaAdmin), pg.(storage.BlobCollector)}
			var meta storage.MetadataStore = base
			if tc.concurrency > 0 {
				meta = concurrentMetaN{base, tc.concurrency}
			}
			store := newGatedStore(t, tc.want)
			if tc.cancel {
				store.onDelete = cancel
			}
			ds, err := storage.NewDatastores(storage.Datastore{Name: "media", Store: store, Kinds: []storage.Kind{storage.KindLocal}})
			if err != nil {
				t.Fatal(err)
			}
			fx := &removeFixture{meta: meta, ds: ds}
			var (
				refs   []storage.MediaRef
				hashes []string
			)
			for i := range tc.blobs {
				blob := fx.ingest(t, storage.KindLocal, fmt.Sprintf("content %d", i))
				refs = append(refs, fx.insert(t, fmt.Sprintf("m%d", i), blob))
				hashes = append(hashes, blob.SHA256)
			}
			store.err = tc.err

			rm, err := storage.RemoveMedia(ctx, meta, ds, refs, storage.RemoveOptions{Now: later})
			if tc.wantErr == nil && err != nil || tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Fatalf("RemoveMedia: %v, want %v", err, tc.wantErr)
			}
			if len(rm.Media) != tc.blobs || rm.Blobs+rm.KeptBlobs != tc.blobs {
				t.Fatalf("RemoveMedia = %d rows, %d blobs deleted, %d kept; want %d rows and blobs", len(rm.Media), rm.Blobs, rm.KeptBlobs, tc.blobs)
			}
			if !tc.cancel && rm.Blobs != tc.deleted {
				t.Fatalf("RemoveMedia deleted %d blobs, want %d", rm.Blobs, tc.deleted)
			}
			store.mu.Lock()
			peak, calls := store.peak, store.calls
			store.mu.Unlock()
			if tc.peak > 0 && peak != tc.peak {
				t.Errorf("%d blob deletions ran at once at most, want %d", peak, tc.peak)
			}
			if calls > tc.maxCalls {
				t.Errorf("%d blob deletions started, want at most %d", calls, tc.maxCalls)
			}
			// Safety: a blob keeps its record exactly when it keeps its
			// bytes, and the blobs deleted are those counted.
			gone := 0
			for _, h := range hashes {
				_, statErr := store.Stat(context.Background(), h)
				_, recErr := meta.GetBlob(context.Background(), h)
				switch {
				case statErr == nil && recErr == nil:
				case errors.Is(statErr, storage.ErrNotFound) && errors.Is(recErr, storage.ErrNotFound):
					gone++
				default:
					t.Fatalf("blob %s: Stat %v, GetBlob %v; want both or neither", h[:8], statErr, recErr)
				}
			}
			if gone != rm.Blobs {
				t.Fatalf("%d blobs gone, RemoveMedia counted %d", gone, rm.Blobs)
			}
		})
	}
}

// TestRemoveMediaRowsDeleted: RowsDeleted sees the rows once their deletion
// committed and before any blob is deleted; its error leaves the blobs to
// the collector.
func TestRemoveMediaRowsDeleted(t *testing.T) {
	ctx := context.Background()
	fx := newRemoveFixture(t, adminMetaStores[0].open, removeLayouts[0].open)
	a := fx.insert(t, "a", fx.ingest(t, storage.KindLocal, "content a"))
	bBlob := fx.ingest(t, storage.KindLocal, "content b")
	b := fx.insert(t, "b", bBlob)

	var seen []string
	rm, err := storage.RemoveMedia(ctx, fx.meta, fx.ds, []storage.MediaRef{a}, storage.RemoveOptions{Now: later,
		RowsDeleted: func(media []storage.Media) error {
			for _, m := range media {
				if _, err := fx.meta.GetMedia(ctx, m.ServerName, m.MediaID); !errors.Is(err, storage.ErrNotFound) {
					t.Errorf("RowsDeleted called before the row of %s was deleted: %v", m.MediaID, err)
				}
				seen = append(seen, m.MediaID)
			}
			return nil
		}})
	if err != nil || len(rm.Media) != 1 || rm.Blobs != 1 || !slices.Equal(seen, []string{"a"}) {
		t.Fatalf("RemoveMedia = %+v, %v; RowsDeleted saw %v; want a removed with its blob, seen once", rm, err, seen)
	}

	stop := errors.New("job lost its lease")
	rm, err = storage.RemoveMedia(ctx, fx.meta, fx.ds, []storage.MediaRef{b}, storage.RemoveOptions{Now: later,
		RowsDeleted: func([]storage.Media) error { return stop }})
	if !errors.Is(err, stop) || len(rm.Media) != 1 || rm.Blobs != 0 {
		t.Fatalf("RemoveMedia with RowsDeleted failing = %+v, %v; want the row deleted, no blob, the error", rm, err)
	}
	fx.check(t, fx.media, bBlob.SHA256, true)
}
