package storage_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/blobtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// memBlobMeta keeps blob records in memory. Only the blob methods are
// implemented; the media methods of the embedded (nil) interface are never
// called by IngestTo.
type memBlobMeta struct {
	storage.MetadataStore
	mu    sync.Mutex
	blobs map[string]storage.BlobRecord
}

func newMemBlobMeta() *memBlobMeta {
	return &memBlobMeta{blobs: map[string]storage.BlobRecord{}}
}

func (m *memBlobMeta) RecordBlob(_ context.Context, b storage.BlobRecord) (storage.BlobRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if first, ok := m.blobs[b.SHA256]; ok {
		return first, nil
	}
	m.blobs[b.SHA256] = b
	return b, nil
}

func (m *memBlobMeta) GetBlob(_ context.Context, h string) (storage.BlobRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.blobs[h]
	if !ok {
		return storage.BlobRecord{}, fmt.Errorf("blob %s: %w", h, storage.ErrNotFound)
	}
	return b, nil
}

func (m *memBlobMeta) FindBlobByPrefix(_ context.Context, size int64, prefix string) (storage.BlobRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, b := range m.blobs {
		if b.Size == size && b.PrefixSHA256 == prefix {
			return b, nil
		}
	}
	return storage.BlobRecord{}, fmt.Errorf("blob by prefix: %w", storage.ErrNotFound)
}

func (m *memBlobMeta) Close() error { return nil }

// spyMeta wraps a MetadataStore, counting prefix lookups and optionally
// failing them or RecordBlob.
type spyMeta struct {
	storage.MetadataStore
	lookups   int
	findErr   error
	recordErr error
}

func (s *spyMeta) FindBlobByPrefix(ctx context.Context, size int64, prefix string) (storage.BlobRecord, error) {
	s.lookups++
	if s.findErr != nil {
		return storage.BlobRecord{}, s.findErr
	}
	return s.MetadataStore.FindBlobByPrefix(ctx, size, prefix)
}

func (s *spyMeta) RecordBlob(ctx context.Context, b storage.BlobRecord) (storage.BlobRecord, error) {
	if s.recordErr != nil {
		return storage.BlobRecord{}, s.recordErr
	}
	return s.MetadataStore.RecordBlob(ctx, b)
}

// spyBlobs wraps a BlobStore and remembers the options of each Put.
type spyBlobs struct {
	storage.BlobStore
	puts []storage.PutOptions
}

func (s *spyBlobs) Put(ctx context.Context, r io.Reader, opts storage.PutOptions) (storage.PutResult, error) {
	s.puts = append(s.puts, opts)
	return s.BlobStore.Put(ctx, r, opts)
}

// fixture is a file store and a metadata store for one test.
type fixture struct {
	root  string
	blobs *spyBlobs
	meta  *spyMeta
}

// metaStores are the metadata stores IngestTo is tested with.
var metaStores = map[string]func(t *testing.T) storage.MetadataStore{
	"memory": func(*testing.T) storage.MetadataStore { return newMemBlobMeta() },
	"sqlite": func(t *testing.T) storage.MetadataStore {
		m, err := sqlstore.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "meta.db"))
		if err != nil {
			t.Fatalf("opening sqlite metadata store: %v", err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	},
}

// forEachMeta runs f once per metadata store implementation.
func forEachMeta(t *testing.T, f func(t *testing.T, fx *fixture)) {
	for name, newMeta := range metaStores {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			bs, err := filestore.New(root)
			if err != nil {
				t.Fatalf("filestore.New: %v", err)
			}
			t.Cleanup(func() { bs.Close() })
			f(t, &fixture{root: root, blobs: &spyBlobs{BlobStore: bs}, meta: &spyMeta{MetadataStore: newMeta(t)}})
		})
	}
}

// randomBytes returns n pseudo-random bytes determined by seed.
func randomBytes(seed byte, n int) []byte { return blobtest.RandomBytes(uint64(seed), n) }

// hexSum is the address of b.
func hexSum(b []byte) string { return blobtest.SHA256Hex(b) }

// ingest runs IngestTo with the body's length announced (or not).
func (fx *fixture) ingest(t *testing.T, body []byte, known bool) (storage.PutResult, error) {
	t.Helper()
	opts := storage.PutOptions{ExpectedSize: -1}
	if known {
		opts.ExpectedSize = int64(len(body))
	}
	return ingest(fx, bytes.NewReader(body), opts)
}

// lastCandidate returns the Candidate given to the last Put.
func (fx *fixture) lastCandidate(t *testing.T) string {
	t.Helper()
	if len(fx.blobs.puts) == 0 {
		t.Fatal("Put was never called")
	}
	return fx.blobs.puts[len(fx.blobs.puts)-1].Candidate
}

// blobFiles counts the files under root/blobs and root/tmp.
func (fx *fixture) blobFiles(t *testing.T) (blobs, temps int) {
	t.Helper()
	count := func(dir string) int {
		n := 0
		err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if !d.IsDir() {
				n++
			}
			return nil
		})
		if err != nil {
			t.Fatalf("walking %s: %v", dir, err)
		}
		return n
	}
	return count(filepath.Join(fx.root, "blobs")), count(filepath.Join(fx.root, "tmp"))
}

// checkStored asserts that the blob store holds body and meta records it.
func (fx *fixture) checkStored(t *testing.T, body []byte, started time.Time) {
	t.Helper()
	ctx := context.Background()
	h := hexSum(body)
	blob, err := fx.blobs.Open(ctx, h)
	if err != nil {
		t.Fatalf("Open(%s): %v", h, err)
	}
	got, err := io.ReadAll(blob.Content)
	blob.Content.Close()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("stored blob %s: %d bytes, err %v; want %d bytes", h, len(got), err, len(body))
	}
	rec, err := fx.meta.GetBlob(ctx, h)
	if err != nil {
		t.Fatalf("GetBlob(%s): %v", h, err)
	}
	wantPrefix := hexSum(body[:min(len(body), storage.PrefixSize)])
	if rec.SHA256 != h || rec.Size != int64(len(body)) || rec.PrefixSHA256 != wantPrefix || rec.Datastore != "local" {
		t.Errorf("blob record = %+v, want sha256 %s size %d prefix %s datastore local", rec, h, len(body), wantPrefix)
	}
	if rec.CreatedAt.Before(started.Add(-time.Second)) || rec.CreatedAt.After(time.Now().Add(time.Second)) {
		t.Errorf("blob record CreatedAt = %v, want about %v", rec.CreatedAt, started)
	}
}

func TestIngestDedup(t *testing.T) {
	for _, size := range []int{storage.PrefixSize + 300_000, 1000} {
		t.Run(fmt.Sprintf("size=%d", size), func(t *testing.T) {
			forEachMeta(t, func(t *testing.T, fx *fixture) {
				start := time.Now()
				body := randomBytes(1, size)

				// First upload: stored and recorded, no candidate.
				first, err := fx.ingest(t, body, true)
				if err != nil {
					t.Fatalf("first IngestTo: %v", err)
				}
				if first.Existed || first.SHA256 != hexSum(body) || first.Size != int64(size) {
					t.Errorf("first IngestTo = %+v", first)
				}
				if c := fx.lastCandidate(t); c != "" {
					t.Errorf("first Put got candidate %q, want none", c)
				}
				fx.checkStored(t, body, start)

				// Second identical upload: the candidate is the stored blob and
				// nothing is written. With the temp directory replaced by a
				// file, any write attempt would fail the upload.
				tmp := filepath.Join(fx.root, "tmp")
				if err := os.Remove(tmp); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(tmp, nil, 0o600); err != nil {
					t.Fatal(err)
				}
				second, err := fx.ingest(t, body, true)
				if err != nil {
					t.Fatalf("second IngestTo (must not write): %v", err)
				}
				if !second.Existed || second.SHA256 != first.SHA256 {
					t.Errorf("second IngestTo = %+v, want Existed with %s", second, first.SHA256)
				}
				if c := fx.lastCandidate(t); c != first.SHA256 {
					t.Errorf("second Put got candidate %q, want %q", c, first.SHA256)
				}
				if err := os.Remove(tmp); err != nil {
					t.Fatal(err)
				}
				if err := os.Mkdir(tmp, 0o755); err != nil {
					t.Fatal(err)
				}
				if blobs, temps := fx.blobFiles(t); blobs != 1 || temps != 0 {
					t.Errorf("after duplicate: %d blob files and %d temp files, want 1 and 0", blobs, temps)
				}

				// Same size and prefix, different tail: the candidate is tried,
				// and a new, correct blob is stored.
				other := bytes.Clone(body)
				other[len(other)-1] ^= 0xff
				third, err := fx.ingest(t, other, true)
				if err != nil {
					t.Fatalf("third IngestTo: %v", err)
				}
				if third.Existed || third.SHA256 != hexSum(other) {
					t.Errorf("third IngestTo = %+v, want new blob %s", third, hexSum(other))
				}
				wantCand := first.SHA256
				if size <= storage.PrefixSize {
					// A short body's prefix is all of it: a different tail
					// means a different prefix, so no candidate is found.
					wantCand = ""
				}
				if c := fx.lastCandidate(t); c != wantCand {
					t.Errorf("third Put got candidate %q, want %q", c, wantCand)
				}
				fx.checkStored(t, other, start)
				fx.checkStored(t, body, start)
				if blobs, temps := fx.blobFiles(t); blobs != 2 || temps != 0 {
					t.Errorf("after third upload: %d blob files and %d temp files, want 2 and 0", blobs, temps)
				}
			})
		})
	}
}

func TestIngestUnknownLength(t *testing.T) {
	forEachMeta(t, func(t *testing.T, fx *fixture) {
		start := time.Now()
		body := randomBytes(2, 200_000)
		if _, err := fx.ingest(t, body, false); err != nil {
			t.Fatalf("IngestTo: %v", err)
		}
		res, err := fx.ingest(t, body, false)
		if err != nil {
			t.Fatalf("IngestTo: %v", err)
		}
		if !res.Existed {
			t.Errorf("repeated IngestTo = %+v, want Existed", res)
		}
		if fx.meta.lookups != 0 {
			t.Errorf("%d prefix lookups for bodies of unknown length, want 0", fx.meta.lookups)
		}
		fx.checkStored(t, body, start)
	})
}

func TestIngestEmpty(t *testing.T) {
	forEachMeta(t, func(t *testing.T, fx *fixture) {
		start := time.Now()
		if _, err := fx.ingest(t, nil, true); err != nil {
			t.Fatalf("IngestTo: %v", err)
		}
		res, err := fx.ingest(t, nil, true)
		if err != nil {
			t.Fatalf("IngestTo: %v", err)
		}
		if !res.Existed || res.Size != 0 || fx.lastCandidate(t) != hexSum(nil) {
			t.Errorf("repeated empty IngestTo = %+v with candidate %q", res, fx.lastCandidate(t))
		}
		fx.checkStored(t, nil, start)
	})
}

func TestIngestErrors(t *testing.T) {
	errBroken := errors.New("broken pipe")
	tests := []struct {
		name      string
		body      []byte
		reader    func(body []byte) io.Reader
		opts      storage.PutOptions
		findErr   error
		recordErr error
		wantErr   error
		wantPut   bool
		wantBlob  bool
	}{
		{name: "BodyShorterThanHead", body: randomBytes(3, 500),
			opts: storage.PutOptions{ExpectedSize: 1000}, wantErr: storage.ErrSizeMismatch},
		{name: "EmptyBodyAnnouncedLong", body: nil,
			opts: storage.PutOptions{ExpectedSize: 1000}, wantErr: storage.ErrSizeMismatch},
		{name: "BodyShorterAfterHead", body: randomBytes(3, storage.PrefixSize+10),
			opts: storage.PutOptions{ExpectedSize: storage.PrefixSize + 11}, wantErr: storage.ErrSizeMismatch, wantPut: true},
		{name: "BodyLonger", body: randomBytes(3, 1001),
			opts: storage.PutOptions{ExpectedSize: 1000}, wantErr: storage.ErrSizeMismatch, wantPut: true},
		{name: "AnnouncedOverLimit", body: randomBytes(3, 1001),
			opts: storage.PutOptions{ExpectedSize: 1001, MaxSize: 1000}, wantErr: storage.ErrTooLarge},
		{name: "StreamOverLimit", body: randomBytes(3, 1001),
			opts: storage.PutOptions{ExpectedSize: -1, MaxSize: 1000}, wantErr: storage.ErrTooLarge, wantPut: true},
		{name: "HeadReadFails", body: randomBytes(3, 100),
			reader: func(b []byte) io.Reader { return io.MultiReader(bytes.NewReader(b), errReader{errBroken}) },
			opts:   storage.PutOptions{ExpectedSize: 1000}, wantErr: errBroken},
		{name: "LookupFails", body: randomBytes(3, 1000),
			opts: storage.PutOptions{ExpectedSize: 1000}, findErr: errBroken, wantErr: errBroken},
		{name: "LookupNotFoundIsFine", body: randomBytes(3, 1000),
			opts: storage.PutOptions{ExpectedSize: 1000}, findErr: fmt.Errorf("no row: %w", storage.ErrNotFound),
			wantPut: true, wantBlob: true},
		{name: "RecordFails", body: randomBytes(3, 1000),
			opts: storage.PutOptions{ExpectedSize: 1000}, recordErr: errBroken, wantErr: errBroken,
			wantPut: true, wantBlob: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			forEachMeta(t, func(t *testing.T, fx *fixture) {
				fx.meta.findErr, fx.meta.recordErr = tt.findErr, tt.recordErr
				var r io.Reader = bytes.NewReader(tt.body)
				if tt.reader != nil {
					r = tt.reader(tt.body)
				}
				res, err := ingest(fx, r, tt.opts)
				if tt.wantErr == nil && err != nil {
					t.Fatalf("IngestTo: %v", err)
				}
				if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
					t.Fatalf("IngestTo = %+v, %v; want error %v", res, err, tt.wantErr)
				}
				if got := len(fx.blobs.puts) > 0; got != tt.wantPut {
					t.Errorf("Put called: %v, want %v", got, tt.wantPut)
				}
				blobs, temps := fx.blobFiles(t)
				if wantBlobs := map[bool]int{true: 1, false: 0}[tt.wantBlob]; blobs != wantBlobs || temps != 0 {
					t.Errorf("%d blob files and %d temp files, want %d and 0", blobs, temps, wantBlobs)
				}
				_, gerr := fx.meta.GetBlob(context.Background(), hexSum(tt.body))
				if recorded := gerr == nil; recorded != (tt.wantBlob && tt.recordErr == nil) {
					t.Errorf("blob recorded: %v (GetBlob error %v)", recorded, gerr)
				}
			})
		})
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

func TestIngestKeepsGivenCandidateWhenNoneFound(t *testing.T) {
	forEachMeta(t, func(t *testing.T, fx *fixture) {
		body := randomBytes(4, 1000)
		_, err := ingest(fx, bytes.NewReader(body),
			storage.PutOptions{ExpectedSize: 1000, Candidate: hexSum([]byte("hint"))})
		if err != nil {
			t.Fatalf("IngestTo: %v", err)
		}
		if c := fx.lastCandidate(t); c != hexSum([]byte("hint")) {
			t.Errorf("Put got candidate %q, want the given one", c)
		}
		fx.checkStored(t, body, time.Now().Add(-time.Minute))
	})
}

// ingest stores r with IngestTo into a single datastore "local" holding the
// fixture's blob store.
func ingest(fx *fixture, r io.Reader, opts storage.PutOptions) (storage.PutResult, error) {
	stores, err := storage.NewDatastores(storage.Datastore{Name: "local", Store: fx.blobs, Kinds: []storage.Kind{storage.KindLocal}})
	if err != nil {
		return storage.PutResult{}, err
	}
	res, err := storage.IngestTo(context.Background(), stores, fx.meta, storage.KindLocal, r, opts)
	return res.PutResult, err
}
