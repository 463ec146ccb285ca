package gc_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/blobtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/gc"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// env is a metadata store and one file datastore named "files".
type env struct {
	meta   *sqlstore.Store
	files  *filestore.Store
	stores *storage.Datastores
}

func newEnv(t *testing.T, driver string) *env {
	t.Helper()
	dsn := filepath.Join(t.TempDir(), "meta.db")
	if driver == "postgres" {
		dsn = testpg.DSN(t)
	}
	meta, err := sqlstore.Open(context.Background(), driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { meta.Close() })
	files, err := filestore.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	stores, err := storage.NewDatastores(storage.Datastore{Name: "files", Store: files, Kinds: []storage.Kind{storage.KindLocal}})
	if err != nil {
		t.Fatal(err)
	}
	return &env{meta: meta, files: files, stores: stores}
}

// blobPath is where the file store keeps a blob.
func (e *env) blobPath(h string) string {
	return filepath.Join(e.files.Root(), "blobs", h[:2], h[2:4], h)
}

// age sets a stored blob's modification time to t.
func (e *env) age(t *testing.T, h string, at time.Time) {
	t.Helper()
	if err := os.Chtimes(e.blobPath(h), at, at); err != nil {
		t.Fatal(err)
	}
}

// put stores body's bytes without a record.
func (e *env) put(t *testing.T, body []byte) string {
	t.Helper()
	res, err := e.files.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1})
	if err != nil {
		t.Fatal(err)
	}
	return res.SHA256
}

// record stores body's bytes and records them as claimed at at.
func (e *env) record(t *testing.T, body []byte, at time.Time) storage.BlobRecord {
	t.Helper()
	h := e.put(t, body)
	rec := storage.BlobRecord{SHA256: h, Size: int64(len(body)), PrefixSHA256: blobtest.SHA256Hex(body[:min(len(body), storage.PrefixSize)]),
		Datastore: "files", CreatedAt: at}
	if _, err := e.meta.RecordBlob(context.Background(), rec); err != nil {
		t.Fatal(err)
	}
	return rec
}

func (e *env) media(t *testing.T, id string, rec storage.BlobRecord) error {
	t.Helper()
	return e.meta.InsertMedia(context.Background(), storage.Media{ServerName: "example.org", MediaID: id,
		SHA256: rec.SHA256, Size: rec.Size, ContentType: "application/octet-stream", CreatedAt: time.Now(), UploadedAt: time.Now()})
}

func (e *env) exists(h string) bool {
	_, err := os.Stat(e.blobPath(h))
	return err == nil
}

func (e *env) recorded(t *testing.T, h string) bool {
	t.Helper()
	_, err := e.meta.GetBlob(context.Background(), h)
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

func (e *env) collector(t *testing.T, now func() time.Time) *gc.Collector {
	t.Helper()
	c, err := gc.New(e.meta, e.stores, now)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRun checks what one run removes, with an injected clock: unreferenced
// records and unrecorded bytes older than the grace period go; referenced,
// recently claimed and recently written blobs stay; a dry run removes
// nothing but counts the same.
func TestRun(t *testing.T) {
	for _, driver := range []string{"sqlite", "postgres"} {
		t.Run(driver, func(t *testing.T) {
			e := newEnv(t, driver)
			ctx := context.Background()
			now := time.Now().Truncate(time.Millisecond)
			old := now.Add(-2 * time.Hour)
			grace := time.Hour

			used := e.record(t, blobtest.RandomBytes(1, 100), old)
			if err := e.media(t, "used", used); err != nil {
				t.Fatal(err)
			}
			thumbSrc := e.record(t, blobtest.RandomBytes(2, 100), old)
			thumb := e.record(t, blobtest.RandomBytes(3, 100), old)
			if err := e.media(t, "pic", thumbSrc); err != nil {
				t.Fatal(err)
			}
			if err := e.meta.InsertThumbnail(ctx, storage.Thumbnail{ThumbnailKey: storage.ThumbnailKey{ServerName: "example.org",
				MediaID: "pic", Width: 32, Height: 32, Method: "crop"}, ContentType: "image/png", SHA256: thumb.SHA256, Size: thumb.Size}); err != nil {
				t.Fatal(err)
			}
			freeOld := e.record(t, blobtest.RandomBytes(4, 1000), old)
			freeNew := e.record(t, blobtest.RandomBytes(5, 100), now.Add(-time.Minute))
			orphanOld := e.put(t, blobtest.RandomBytes(6, 300))
			e.age(t, orphanOld, old)
			orphanNew := e.put(t, blobtest.RandomBytes(7, 100))
			// A record whose bytes are missing (never written by this module,
			// but the collector must cope): removed, its delete is a no-op.
			ghost := storage.BlobRecord{SHA256: blobtest.SHA256Hex([]byte("ghost")), Size: 5, PrefixSHA256: "x", Datastore: "files", CreatedAt: old}
			if _, err := e.meta.RecordBlob(ctx, ghost); err != nil {
				t.Fatal(err)
			}

			c := e.collector(t, func() time.Time { return now })
			want := gc.Report{Records: 2, RecordBytes: 1005, Unrecorded: 1, UnrecordedBytes: 300}
			for _, dry := range []bool{true, false} {
				rep, err := c.Run(ctx, gc.Options{Grace: grace, DryRun: dry})
				if err != nil {
					t.Fatalf("Run(dry %v): %v", dry, err)
				}
				w := want
				w.DryRun = dry
				rep.Duration = 0
				if rep != w {
					t.Errorf("Run(dry %v) = %+v, want %+v", dry, rep, w)
				}
				gone := !dry
				for _, h := range []string{freeOld.SHA256, orphanOld} {
					if e.exists(h) == gone {
						t.Errorf("dry %v: bytes of %s exist = %v", dry, h[:8], !gone)
					}
				}
				for _, h := range []string{freeOld.SHA256, ghost.SHA256} {
					if e.recorded(t, h) == gone {
						t.Errorf("dry %v: record of %s exists = %v", dry, h[:8], !gone)
					}
				}
				for _, h := range []string{used.SHA256, thumbSrc.SHA256, thumb.SHA256, freeNew.SHA256} {
					if !e.exists(h) || !e.recorded(t, h) {
						t.Errorf("dry %v: kept blob %s lost (bytes %v, record %v)", dry, h[:8], e.exists(h), e.recorded(t, h))
					}
				}
				if !e.exists(orphanNew) {
					t.Errorf("dry %v: recent unrecorded bytes removed", dry)
				}
			}
			// Nothing left to do; later, the rest goes too once unreferenced.
			rep, err := c.Run(ctx, gc.Options{Grace: grace})
			if err != nil || rep.Blobs() != 0 {
				t.Errorf("second Run = %+v, %v; want nothing removed", rep, err)
			}
			later := e.collector(t, func() time.Time { return now.Add(3 * time.Hour) })
			rep, err = later.Run(ctx, gc.Options{Grace: grace})
			if err != nil || rep.Records != 1 || rep.Unrecorded != 1 {
				t.Errorf("Run 3 h later = %+v, %v; want the recent record and the recent orphan", rep, err)
			}
		})
	}
}

// hookMeta wraps a store and can stop an ingest at FindBlobByPrefix (after
// the candidate lookup, before the claim), TouchBlob (after the claim) or
// RecordBlob (before the record), letting a test run the collector there.
type hookMeta struct {
	*sqlstore.Store
	afterFind, afterTouch, beforeRecord func()
}

func (h *hookMeta) FindBlobByPrefix(ctx context.Context, size int64, prefix string) (storage.BlobRecord, error) {
	b, err := h.Store.FindBlobByPrefix(ctx, size, prefix)
	if h.afterFind != nil {
		h.afterFind()
	}
	return b, err
}

func (h *hookMeta) TouchBlob(ctx context.Context, sha string, at time.Time) (bool, error) {
	ok, err := h.Store.TouchBlob(ctx, sha, at)
	if h.afterTouch != nil {
		h.afterTouch()
	}
	return ok, err
}

func (h *hookMeta) RecordBlob(ctx context.Context, b storage.BlobRecord) (storage.BlobRecord, error) {
	if h.beforeRecord != nil {
		h.beforeRecord()
	}
	return h.Store.RecordBlob(ctx, b)
}

// pause returns a hook that, the first time it runs, signals reached and
// waits for resume.
func pause() (hook func(), reached, resume chan struct{}) {
	reached, resume = make(chan struct{}), make(chan struct{})
	var once sync.Once
	return func() {
		once.Do(func() {
			close(reached)
			<-resume
		})
	}, reached, resume
}

type ingestResult struct {
	res storage.IngestResult
	err error
}

func ingest(e *env, meta storage.MetadataStore, body []byte, known bool) chan ingestResult {
	ch := make(chan ingestResult, 1)
	size := int64(len(body))
	if !known {
		size = -1
	}
	go func() {
		res, err := storage.IngestTo(context.Background(), e.stores, meta, storage.KindLocal, bytes.NewReader(body),
			storage.PutOptions{ExpectedSize: size})
		ch <- ingestResult{res, err}
	}()
	return ch
}

// TestUploadRaces makes the races between an upload that is about to
// reference a blob and the collector deterministic, with hooks in the
// metadata store, and checks that no upload ends with a record (and so a
// media row) pointing at missing bytes.
func TestUploadRaces(t *testing.T) {
	for _, driver := range []string{"sqlite", "postgres"} {
		t.Run(driver, func(t *testing.T) {
			ctx := context.Background()
			body := blobtest.RandomBytes(42, 200_000)
			old := time.Now().Add(-2 * time.Hour)

			// The candidate is collected between the lookup and the claim:
			// the upload writes the body in full and succeeds.
			t.Run("CandidateCollectedBeforeClaim", func(t *testing.T) {
				e := newEnv(t, driver)
				rec := e.record(t, body, old)
				hook, reached, resume := pause()
				meta := &hookMeta{Store: e.meta, afterFind: hook}
				done := ingest(e, meta, body, true)
				<-reached
				rep, err := e.collector(t, nil).Run(ctx, gc.Options{Grace: time.Hour})
				if err != nil || rep.Records != 1 {
					t.Fatalf("Run during the upload = %+v, %v; want the unreferenced blob removed", rep, err)
				}
				if e.exists(rec.SHA256) {
					t.Fatal("collected bytes still there")
				}
				close(resume)
				r := <-done
				if r.err != nil {
					t.Fatalf("upload failed: %v", r.err)
				}
				if r.res.Existed || r.res.SHA256 != rec.SHA256 {
					t.Errorf("upload result = %+v, want the body written anew", r.res)
				}
				if err := e.media(t, "m", rec); err != nil {
					t.Fatalf("InsertMedia after the upload: %v", err)
				}
				checkServable(t, e, rec.SHA256, body)
			})

			// The collector runs after the upload claimed its candidate and
			// before the media row: the blob is kept.
			t.Run("CollectorAfterClaim", func(t *testing.T) {
				e := newEnv(t, driver)
				rec := e.record(t, body, old)
				hook, reached, resume := pause()
				meta := &hookMeta{Store: e.meta, afterTouch: hook}
				done := ingest(e, meta, body, true)
				<-reached
				rep, err := e.collector(t, nil).Run(ctx, gc.Options{Grace: time.Hour})
				if err != nil || rep.Blobs() != 0 {
					t.Fatalf("Run during the upload = %+v, %v; want nothing removed", rep, err)
				}
				close(resume)
				r := <-done
				if r.err != nil || !r.res.Existed {
					t.Fatalf("upload = %+v, %v; want a deduplicated success", r.res, r.err)
				}
				// Between the upload's answer and the media row, the
				// collector still keeps it (the claim is fresh).
				if rep, err := e.collector(t, nil).Run(ctx, gc.Options{Grace: time.Hour}); err != nil || rep.Blobs() != 0 {
					t.Fatalf("Run before the media row = %+v, %v; want nothing removed", rep, err)
				}
				if err := e.media(t, "m", rec); err != nil {
					t.Fatalf("InsertMedia: %v", err)
				}
				checkServable(t, e, rec.SHA256, body)
			})

			// Old bytes without a record, found by an upload of the same
			// bytes (unknown length, so no candidate lookup) and deleted by
			// the collector before the upload records them: the upload's
			// record waits for the deletion, the check of the bytes after it
			// fails, and the upload answers ErrUnavailable (retry) instead of
			// recording missing bytes.
			t.Run("UnrecordedBytesCollectedBeforeRecord", func(t *testing.T) {
				e := newEnv(t, driver)
				h := e.put(t, body)
				e.age(t, h, old)
				hook, reached, resume := pause()
				meta := &hookMeta{Store: e.meta, beforeRecord: hook}
				done := ingest(e, meta, body, false)
				<-reached
				rep, err := e.collector(t, nil).Run(ctx, gc.Options{Grace: time.Hour})
				if err != nil || rep.Unrecorded != 1 {
					t.Fatalf("Run during the upload = %+v, %v; want the unrecorded bytes removed", rep, err)
				}
				close(resume)
				r := <-done
				if !errors.Is(r.err, storage.ErrUnavailable) {
					t.Fatalf("upload = %+v, %v; want ErrUnavailable", r.res, r.err)
				}
				// The retry succeeds and is servable.
				r = <-ingest(e, e.meta, body, false)
				if r.err != nil {
					t.Fatalf("retried upload: %v", r.err)
				}
				checkServable(t, e, h, body)
			})

			// A deduplicating upload while the collector deletes the
			// candidate (its transaction open): the claim waits, finds the
			// record gone, and the upload writes the body in full.
			t.Run("ClaimDuringDeletion", func(t *testing.T) {
				e := newEnv(t, driver)
				rec := e.record(t, body, old)
				found, foundReached, foundResume := pause()
				meta := &hookMeta{Store: e.meta, afterFind: found}
				var done chan ingestResult
				// The deletion callback is the file store's Delete; start the
				// upload from a datastore wrapper that runs it there.
				var err error
				e.stores, err = storage.NewDatastores(storage.Datastore{Name: "files", Store: &onDelete{BlobStore: e.files, fn: func() {
					done = ingest(e, meta, body, true)
					<-foundReached // the lookup saw the record, still committed
					close(foundResume)
				}}, Kinds: []storage.Kind{storage.KindLocal}})
				if err != nil {
					t.Fatal(err)
				}
				rep, err := e.collector(t, nil).Run(ctx, gc.Options{Grace: time.Hour})
				if err != nil || rep.Records != 1 {
					t.Fatalf("Run = %+v, %v; want the blob removed", rep, err)
				}
				r := <-done
				if r.err != nil || r.res.Existed {
					t.Fatalf("upload = %+v, %v; want the body written anew", r.res, r.err)
				}
				if err := e.media(t, "m", rec); err != nil {
					t.Fatalf("InsertMedia: %v", err)
				}
				checkServable(t, e, rec.SHA256, body)
			})
		})
	}
}

// onDelete runs fn once on the first Delete, before deleting.
type onDelete struct {
	storage.BlobStore
	once sync.Once
	fn   func()
}

func (o *onDelete) Delete(ctx context.Context, h string) error {
	o.once.Do(o.fn)
	return o.BlobStore.Delete(ctx, h)
}

// checkServable checks that h is recorded and its bytes are body.
func checkServable(t *testing.T, e *env, h string, body []byte) {
	t.Helper()
	rec, err := e.meta.GetBlob(context.Background(), h)
	if err != nil {
		t.Fatalf("record of %s: %v", h[:8], err)
	}
	store, _ := e.stores.Get(rec.Datastore)
	b, err := store.Open(context.Background(), h)
	if err != nil {
		t.Fatalf("bytes of %s: %v", h[:8], err)
	}
	defer b.Content.Close()
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(b.Content); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), body) {
		t.Fatalf("bytes of %s differ from the upload", h[:8])
	}
}

// TestOneCollectorAtATime runs two collectors on two handles of one
// PostgreSQL database: while the first is inside a deletion, the second is
// skipped without examining anything; afterwards it runs.
func TestOneCollectorAtATime(t *testing.T) {
	ctx := context.Background()
	dsn := testpg.DSN(t)
	var handles [2]*sqlstore.Store
	for i := range handles {
		s, err := sqlstore.OpenPostgres(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		handles[i] = s
	}
	files, err := filestore.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e := &env{meta: handles[0], files: files}
	reached, resume := make(chan struct{}), make(chan struct{})
	blocking := &onDelete{BlobStore: files, fn: func() { close(reached); <-resume }}
	e.stores, err = storage.NewDatastores(storage.Datastore{Name: "files", Store: blocking, Kinds: []storage.Kind{storage.KindLocal}})
	if err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-2 * time.Hour)
	recs := []storage.BlobRecord{e.record(t, blobtest.RandomBytes(1, 10), old), e.record(t, blobtest.RandomBytes(2, 10), old)}

	first := e.collector(t, nil)
	second, err := gc.New(handles[1], e.stores, nil)
	if err != nil {
		t.Fatal(err)
	}
	firstDone := make(chan gc.Report, 1)
	go func() {
		rep, err := first.Run(ctx, gc.Options{Grace: time.Hour})
		if err != nil {
			t.Errorf("first Run: %v", err)
		}
		firstDone <- rep
	}()
	<-reached
	rep, err := second.Run(ctx, gc.Options{Grace: time.Hour})
	if err != nil || !rep.Skipped || rep.Blobs() != 0 {
		t.Fatalf("second Run while the first holds the lock = %+v, %v; want skipped", rep, err)
	}
	close(resume)
	if rep := <-firstDone; rep.Records != 2 {
		t.Fatalf("first Run = %+v, want 2 records removed", rep)
	}
	rep, err = second.Run(ctx, gc.Options{Grace: time.Hour})
	if err != nil || rep.Skipped || rep.Blobs() != 0 {
		t.Fatalf("second Run afterwards = %+v, %v; want a run with nothing left", rep, err)
	}
	for _, r := range recs {
		if e.exists(r.SHA256) || e.recorded(t, r.SHA256) {
			t.Errorf("blob %s not collected", r.SHA256[:8])
		}
	}
}

// downStore is a blob store whose deletions fail as an unreachable backend.
type downStore struct{ storage.BlobStore }

func (downStore) Delete(context.Context, string) error {
	return fmt.Errorf("deleting: %w", storage.ErrUnavailable)
}

// TestDatastoreDown checks that a datastore that cannot delete stops the
// run with an error wrapping storage.ErrUnavailable and keeps the record, so
// the next run retries.
func TestDatastoreDown(t *testing.T) {
	e := newEnv(t, "sqlite")
	rec := e.record(t, blobtest.RandomBytes(9, 100), time.Now().Add(-2*time.Hour))
	var err error
	e.stores, err = storage.NewDatastores(storage.Datastore{Name: "files", Store: downStore{e.files}, Kinds: []storage.Kind{storage.KindLocal}})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := e.collector(t, nil).Run(context.Background(), gc.Options{Grace: time.Hour})
	if !errors.Is(err, storage.ErrUnavailable) || rep.Blobs() != 0 {
		t.Fatalf("Run = %+v, %v; want ErrUnavailable and nothing removed", rep, err)
	}
	if !e.recorded(t, rec.SHA256) || !e.exists(rec.SHA256) {
		t.Fatal("blob lost although its deletion failed")
	}
}
