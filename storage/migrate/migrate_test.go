package migrate_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/migrate"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// fixture is a source file store "old", a target file store "new" (taking
// new local uploads) and a SQLite metadata store.
type fixture struct {
	roots map[string]string
	ds    *storage.Datastores
	meta  storage.MetadataStore
	// bodies are the stored blobs by hash.
	bodies map[string][]byte
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	fx := &fixture{roots: map[string]string{}, bodies: map[string][]byte{}}
	var ds []storage.Datastore
	for _, name := range []string{"old", "new"} {
		root := t.TempDir()
		s, err := filestore.New(root)
		if err != nil {
			t.Fatal(err)
		}
		fx.roots[name] = root
		d := storage.Datastore{Name: name, Store: s}
		if name == "new" {
			d.Kinds = []storage.Kind{storage.KindLocal}
		}
		ds = append(ds, d)
	}
	var err error
	if fx.ds, err = storage.NewDatastores(ds...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fx.ds.Close() })
	m, err := sqlstore.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	fx.meta = m
	return fx
}

func hexSum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// fill stores n blobs of various sizes (0 bytes, 1 byte, 1 MiB among them)
// in "old", records them there, and gives each a media item.
func (fx *fixture) fill(t *testing.T, n int) (totalBytes int64) {
	t.Helper()
	ctx := context.Background()
	old, _ := fx.ds.Get("old")
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range n {
		var size int
		switch i % 5 {
		case 0:
			size = []int{0, 1, 1 << 20}[i/5%3]
		case 1:
			size = storage.PrefixSize + rng.IntN(100_000)
		default:
			size = 1 + rng.IntN(20_000)
		}
		body := make([]byte, size)
		rand.NewChaCha8([32]byte{byte(i), byte(i >> 8), 7}).Read(body)
		if size == 0 && i > 0 {
			body = []byte(fmt.Sprintf("not empty %d", i)) // only one empty blob can exist
		}
		res, err := old.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fx.meta.RecordBlob(ctx, storage.BlobRecord{
			SHA256: res.SHA256, Size: res.Size, PrefixSHA256: res.PrefixSHA256, Datastore: "old", CreatedAt: time.Now(),
		}); err != nil {
			t.Fatal(err)
		}
		if err := fx.meta.InsertMedia(ctx, storage.Media{
			ServerName: "example.org", MediaID: fmt.Sprintf("m%d", i), SHA256: res.SHA256, Size: res.Size, CreatedAt: time.Now(),
		}); err != nil {
			t.Fatal(err)
		}
		fx.bodies[res.SHA256] = body
		totalBytes += res.Size
	}
	if len(fx.bodies) != n {
		t.Fatalf("fill made %d distinct blobs, want %d", len(fx.bodies), n)
	}
	return totalBytes
}

// blobPath is where datastore name keeps blob h.
func (fx *fixture) blobPath(name, h string) string {
	return filepath.Join(fx.roots[name], "blobs", h[0:2], h[2:4], h)
}

// files lists the blob files of datastore name and counts its temp files.
func (fx *fixture) files(t *testing.T, name string) (blobs []string, temps int) {
	t.Helper()
	err := filepath.WalkDir(fx.roots[name], func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if filepath.Base(filepath.Dir(p)) == "tmp" {
			temps++
		} else {
			blobs = append(blobs, filepath.Base(p))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return blobs, temps
}

// checkConsistent asserts that every blob's record names a datastore that
// holds its exact bytes, and returns how many records name each datastore.
func (fx *fixture) checkConsistent(t *testing.T) map[string]int {
	t.Helper()
	ctx := context.Background()
	counts := map[string]int{}
	for h, body := range fx.bodies {
		rec, err := fx.meta.GetBlob(ctx, h)
		if err != nil {
			t.Fatalf("GetBlob(%s): %v", h[:8], err)
		}
		counts[rec.Datastore]++
		store, ok := fx.ds.Get(rec.Datastore)
		if !ok {
			t.Fatalf("blob %s recorded in unknown datastore %q", h[:8], rec.Datastore)
		}
		b, err := store.Open(ctx, h)
		if err != nil {
			t.Fatalf("blob %s recorded in %s but not there: %v", h[:8], rec.Datastore, err)
		}
		got, err := io.ReadAll(b.Content)
		b.Content.Close()
		if err != nil || hexSum(got) != h || !bytes.Equal(got, body) {
			t.Fatalf("blob %s in %s: %d bytes with hash %s (%v), want its %d bytes", h[:8], rec.Datastore, len(got), hexSum(got)[:8], err, len(body))
		}
	}
	return counts
}

// recorder collects OnProgress calls and checks they count up by one.
type recorder struct {
	mu    sync.Mutex
	calls []migrate.Progress
	t     *testing.T
	then  func(p migrate.Progress)
}

func (r *recorder) onProgress(p migrate.Progress) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if n := len(r.calls); n > 0 {
		prev := r.calls[n-1]
		if p.DoneBlobs+p.FailedBlobs != prev.DoneBlobs+prev.FailedBlobs+1 {
			r.t.Errorf("progress jumped from %+v to %+v", prev, p)
		}
	}
	if !p.Running || p.From != "old" || p.To != "new" {
		r.t.Errorf("progress during the run = %+v", p)
	}
	r.calls = append(r.calls, p)
	if r.then != nil {
		r.then(p)
	}
}

func TestRunMovesEverything(t *testing.T) {
	fx := newFixture(t)
	total := fx.fill(t, 50)
	rec := &recorder{t: t}
	start := time.Now()
	p, err := migrate.Run(context.Background(), fx.meta, fx.ds, "old", "new",
		migrate.Options{Concurrency: 4, BatchSize: 7, OnProgress: rec.onProgress})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if p.TotalBlobs != 50 || p.DoneBlobs != 50 || p.FailedBlobs != 0 || p.TotalBytes != total || p.DoneBytes != total ||
		p.Running || p.LastError != "" || p.Started.Before(start) || p.Finished.Before(p.Started) {
		t.Fatalf("final progress = %+v, want all 50 blobs (%d bytes) moved", p, total)
	}
	if len(rec.calls) != 50 {
		t.Errorf("OnProgress called %d times, want 50", len(rec.calls))
	}
	if counts := fx.checkConsistent(t); counts["new"] != 50 {
		t.Fatalf("records per datastore after migration: %v, want all in new", counts)
	}
	if blobs, temps := fx.files(t, "old"); len(blobs) != 0 || temps != 0 {
		t.Errorf("old still holds %d blobs and %d temp files", len(blobs), temps)
	}
	if blobs, temps := fx.files(t, "new"); len(blobs) != 50 || temps != 0 {
		t.Errorf("new holds %d blobs and %d temp files, want 50 and 0", len(blobs), temps)
	}
	ctx := context.Background()
	if n, size, err := fx.meta.CountBlobs(ctx, "new"); err != nil || n != 50 || size != total {
		t.Errorf("CountBlobs(new) = %d, %d, %v", n, size, err)
	}
	if left, err := fx.meta.ListBlobs(ctx, "old", "", 10); err != nil || len(left) != 0 {
		t.Errorf("ListBlobs(old) = %d records, %v; want none", len(left), err)
	}
	for i := range 50 {
		m, err := fx.meta.GetMedia(ctx, "example.org", fmt.Sprintf("m%d", i))
		if err != nil || m.Datastore != "new" {
			t.Fatalf("GetMedia(m%d) = datastore %q, %v; want new", i, m.Datastore, err)
		}
	}

	// A second run finds nothing to do.
	p, err = migrate.Run(ctx, fx.meta, fx.ds, "old", "new", migrate.Options{})
	if err != nil || p.TotalBlobs != 0 || p.DoneBlobs != 0 || p.FailedBlobs != 0 {
		t.Fatalf("second Run = %+v, %v; want nothing done", p, err)
	}
}

func TestRunResumesAfterCancel(t *testing.T) {
	fx := newFixture(t)
	total := fx.fill(t, 50)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rec := &recorder{t: t, then: func(p migrate.Progress) {
		if p.DoneBlobs == 10 {
			cancel()
		}
	}}
	first, err := migrate.Run(ctx, fx.meta, fx.ds, "old", "new", migrate.Options{Concurrency: 2, BatchSize: 8, OnProgress: rec.onProgress})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Run error = %v, want context.Canceled", err)
	}
	if first.DoneBlobs < 10 || first.DoneBlobs > 12 || first.FailedBlobs != 0 || first.Running || first.Finished.IsZero() {
		t.Fatalf("cancelled Run progress = %+v, want 10 to 12 blobs done, none failed", first)
	}
	counts := fx.checkConsistent(t)
	if counts["new"] != int(first.DoneBlobs) || counts["old"] != 50-int(first.DoneBlobs) {
		t.Fatalf("records after cancel: %v, want %d in new", counts, first.DoneBlobs)
	}
	if blobs, _ := fx.files(t, "old"); len(blobs) != counts["old"] {
		t.Errorf("old holds %d blobs, want only the %d not yet moved", len(blobs), counts["old"])
	}

	second, err := migrate.Run(context.Background(), fx.meta, fx.ds, "old", "new", migrate.Options{})
	if err != nil {
		t.Fatalf("resumed Run: %v", err)
	}
	if second.TotalBlobs != 50-first.DoneBlobs || second.DoneBlobs != second.TotalBlobs || second.FailedBlobs != 0 ||
		second.TotalBytes != total-first.DoneBytes || second.DoneBytes != second.TotalBytes {
		t.Fatalf("resumed Run = %+v after %+v, want the rest", second, first)
	}
	if counts := fx.checkConsistent(t); counts["new"] != 50 {
		t.Fatalf("records after resume: %v, want all in new", counts)
	}
	if blobs, temps := fx.files(t, "old"); len(blobs) != 0 || temps != 0 {
		t.Errorf("old still holds %d blobs and %d temp files", len(blobs), temps)
	}
}

func TestRunCountsBadSourcesAsFailed(t *testing.T) {
	fx := newFixture(t)
	fx.fill(t, 10)
	var hashes []string
	for h, body := range fx.bodies {
		if len(body) > 100 {
			hashes = append(hashes, h)
		}
	}
	corrupt, truncated, missing := hashes[0], hashes[1], hashes[2]
	flipped := bytes.Clone(fx.bodies[corrupt])
	flipped[len(flipped)/2] ^= 0xff
	if err := os.WriteFile(fx.blobPath("old", corrupt), flipped, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fx.blobPath("old", truncated), fx.bodies[truncated][:50], 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(fx.blobPath("old", missing)); err != nil {
		t.Fatal(err)
	}

	p, err := migrate.Run(context.Background(), fx.meta, fx.ds, "old", "new", migrate.Options{})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if p.DoneBlobs != 7 || p.FailedBlobs != 3 || p.LastError == "" {
		t.Fatalf("progress = %+v, want 7 done and 3 failed with an error", p)
	}
	ctx := context.Background()
	for _, h := range []string{corrupt, truncated, missing} {
		rec, err := fx.meta.GetBlob(ctx, h)
		if err != nil || rec.Datastore != "old" {
			t.Errorf("record of bad blob %s = %+v, %v; want it left in old", h[:8], rec, err)
		}
		if _, err := os.Stat(fx.blobPath("new", h)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("bad blob %s reached new: %v", h[:8], err)
		}
	}
	// The bad bytes are left in place, and no copy of them is in new.
	if got, err := os.ReadFile(fx.blobPath("old", corrupt)); err != nil || !bytes.Equal(got, flipped) {
		t.Errorf("corrupt source copy changed: %v", err)
	}
	if got, err := os.ReadFile(fx.blobPath("old", truncated)); err != nil || len(got) != 50 {
		t.Errorf("truncated source copy changed: %d bytes, %v", len(got), err)
	}
	if blobs, temps := fx.files(t, "new"); len(blobs) != 7 || temps != 0 {
		t.Errorf("new holds %d blobs and %d temp files, want the 7 good ones", len(blobs), temps)
	}
	if blobs, _ := fx.files(t, "old"); len(blobs) != 2 {
		t.Errorf("old holds %d blobs, want the 2 bad ones", len(blobs))
	}
	for h := range fx.bodies {
		if h == corrupt || h == truncated || h == missing {
			continue
		}
		if rec, err := fx.meta.GetBlob(ctx, h); err != nil || rec.Datastore != "new" {
			t.Errorf("record of good blob %s = %+v, %v; want new", h[:8], rec, err)
		}
	}
}

func TestRunDeleteGrace(t *testing.T) {
	fx := newFixture(t)
	fx.fill(t, 6)
	const grace = 300 * time.Millisecond
	start := time.Now()
	p, err := migrate.Run(context.Background(), fx.meta, fx.ds, "old", "new", migrate.Options{DeleteGrace: grace})
	if err != nil || p.DoneBlobs != 6 {
		t.Fatalf("Run = %+v, %v", p, err)
	}
	if took := time.Since(start); took < grace || took > 10*grace {
		t.Errorf("Run with a %v grace took %v, want it to wait about one grace for the deletions", grace, took)
	}
	if blobs, _ := fx.files(t, "old"); len(blobs) != 0 {
		t.Errorf("old holds %d blobs after the grace, want none", len(blobs))
	}

	// Cancelled during a long grace: Run returns at once, the records are
	// switched, and the source copies stay (unreferenced).
	fx2 := newFixture(t)
	fx2.fill(t, 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start = time.Now()
	p, err = migrate.Run(ctx, fx2.meta, fx2.ds, "old", "new", migrate.Options{DeleteGrace: time.Hour, Concurrency: 1,
		OnProgress: func(p migrate.Progress) {
			if p.DoneBlobs == 4 {
				cancel()
			}
		}})
	if !errors.Is(err, context.Canceled) || p.DoneBlobs != 4 {
		t.Fatalf("cancelled Run = %+v, %v", p, err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("cancelled Run took %v", took)
	}
	if counts := fx2.checkConsistent(t); counts["new"] != 4 {
		t.Errorf("records: %v, want all in new", counts)
	}
	if blobs, _ := fx2.files(t, "old"); len(blobs) != 4 {
		t.Errorf("old holds %d blobs, want the 4 copies still in their grace", len(blobs))
	}
}

func TestRunInvalidArguments(t *testing.T) {
	fx := newFixture(t)
	tests := []struct{ from, to, want string }{
		{"old", "old", "both"},
		{"nowhere", "new", "unknown source"},
		{"old", "nowhere", "unknown target"},
	}
	for _, tt := range tests {
		_, err := migrate.Run(context.Background(), fx.meta, fx.ds, tt.from, tt.to, migrate.Options{})
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Run(%s, %s) = %v, want an error containing %q", tt.from, tt.to, err, tt.want)
		}
	}
}

// vanishingStore deletes each blob right after storing it, as a concurrent
// ingest dropping its own copy would.
type vanishingStore struct {
	storage.BlobStore
}

func (v vanishingStore) Put(ctx context.Context, r io.Reader, opts storage.PutOptions) (storage.PutResult, error) {
	res, err := v.BlobStore.Put(ctx, r, opts)
	if err == nil {
		err = v.BlobStore.Delete(ctx, res.SHA256)
	}
	return res, err
}

func TestRunUndoesMoveWhenTargetCopyVanishes(t *testing.T) {
	fx := newFixture(t)
	fx.fill(t, 3)
	oldStore, _ := fx.ds.Get("old")
	newStore, _ := fx.ds.Get("new")
	ds, err := storage.NewDatastores(
		storage.Datastore{Name: "old", Store: oldStore},
		storage.Datastore{Name: "new", Store: vanishingStore{newStore}, Kinds: []storage.Kind{storage.KindLocal}},
	)
	if err != nil {
		t.Fatal(err)
	}
	p, err := migrate.Run(context.Background(), fx.meta, ds, "old", "new", migrate.Options{})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if p.DoneBlobs != 0 || p.FailedBlobs != 3 || !strings.Contains(p.LastError, "vanished") {
		t.Fatalf("progress = %+v, want 3 failed with vanished copies", p)
	}
	if counts := fx.checkConsistent(t); counts["old"] != 3 {
		t.Fatalf("records: %v, want all switched back to old", counts)
	}
}

// A run reports a checkpoint after each page whose blobs are all done; an
// error from the checkpoint stops it, and a run resumed after the last
// checkpoint moves the rest without retrying the blob that failed before it.
func TestRunCheckpointsAndResumesAfter(t *testing.T) {
	fx := newFixture(t)
	fx.fill(t, 20)
	hashes := make([]string, 0, len(fx.bodies))
	for h := range fx.bodies {
		hashes = append(hashes, h)
	}
	slices.Sort(hashes)
	// The first blob listed has lost its bytes: it fails in the first page.
	if err := os.Remove(fx.blobPath("old", hashes[0])); err != nil {
		t.Fatal(err)
	}
	errLeaseLost := errors.New("lease lost")
	var checkpoints []string
	first, err := migrate.Run(context.Background(), fx.meta, fx.ds, "old", "new", migrate.Options{
		Concurrency: 3, BatchSize: 6,
		OnCheckpoint: func(after string, p migrate.Progress) error {
			checkpoints = append(checkpoints, after)
			if n := int64(6 * len(checkpoints)); p.DoneBlobs+p.FailedBlobs != n || p.FailedBlobs != 1 {
				t.Errorf("checkpoint %d: progress %+v, want %d blobs done, one failed", len(checkpoints), p, n)
			}
			if len(checkpoints) == 2 {
				return errLeaseLost
			}
			return nil
		},
	})
	if !errors.Is(err, errLeaseLost) {
		t.Fatalf("Run stopped by its checkpoint: error %v, want one wrapping the checkpoint's", err)
	}
	if want := []string{hashes[5], hashes[11]}; !slices.Equal(checkpoints, want) {
		t.Fatalf("checkpoints %q, want the last hash of each page %q", checkpoints, want)
	}
	if first.DoneBlobs != 11 || first.FailedBlobs != 1 {
		t.Fatalf("stopped Run = %+v, want 11 moved and 1 failed: nothing after the refused checkpoint", first)
	}
	if n, _, err := fx.meta.CountBlobs(context.Background(), "new"); err != nil || n != 11 {
		t.Fatalf("records in new after the stop: %d, %v; want 11", n, err)
	}

	var resumed []string
	second, err := migrate.Run(context.Background(), fx.meta, fx.ds, "old", "new", migrate.Options{
		After: checkpoints[1], BatchSize: 6,
		OnCheckpoint: func(after string, _ migrate.Progress) error { resumed = append(resumed, after); return nil },
	})
	if err != nil {
		t.Fatalf("resumed Run: %v", err)
	}
	if second.DoneBlobs != 8 || second.FailedBlobs != 0 {
		t.Fatalf("resumed Run = %+v, want the 8 blobs after the checkpoint moved, the failed one not retried", second)
	}
	if want := []string{hashes[17], hashes[19]}; !slices.Equal(resumed, want) {
		t.Errorf("resumed checkpoints %q, want %q", resumed, want)
	}
	if rec, err := fx.meta.GetBlob(context.Background(), hashes[0]); err != nil || rec.Datastore != "old" {
		t.Errorf("failed blob's record = %+v, %v; want it left in old", rec, err)
	}
	for _, h := range hashes[1:] {
		if rec, err := fx.meta.GetBlob(context.Background(), h); err != nil || rec.Datastore != "new" {
			t.Errorf("blob %s = %+v, %v; want it in new", h[:8], rec, err)
		}
	}
}
