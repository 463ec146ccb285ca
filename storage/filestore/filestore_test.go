package filestore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/blobtest"
)

// newStore opens a store in a fresh temp directory.
func newStore(t testing.TB) *Store {
	t.Helper()
	s, err := New(t.TempDir())
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s
}

// randomBytes returns n pseudo-random bytes determined by seed.
func randomBytes(seed byte, n int) []byte { return blobtest.RandomBytes(uint64(seed), n) }

// hexSum is the address of b.
func hexSum(b []byte) string { return blobtest.SHA256Hex(b) }

// files lists the regular files under dir, relative to it, sorted.
func files(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			rel, err := filepath.Rel(dir, path)
			if err != nil {
				return err
			}
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("listing %s: %v", dir, err)
	}
	sort.Strings(out)
	return out
}

// checkLayout asserts that the temp directory is empty and that the blob tree
// holds exactly one correctly named file per wanted body, with its bytes.
func checkLayout(t *testing.T, s *Store, want ...[]byte) {
	t.Helper()
	if tmp := files(t, s.tmpDir); len(tmp) != 0 {
		t.Errorf("temp files left behind: %v", tmp)
	}
	var wantNames []string
	for _, b := range want {
		h := hexSum(b)
		wantNames = append(wantNames, filepath.Join(h[0:2], h[2:4], h))
		got, err := os.ReadFile(filepath.Join(s.blobDir, h[0:2], h[2:4], h))
		if err != nil {
			t.Errorf("reading blob file: %v", err)
		} else if !bytes.Equal(got, b) {
			t.Errorf("blob file %s holds other bytes", h)
		}
	}
	sort.Strings(wantNames)
	if got := files(t, s.blobDir); strings.Join(got, ",") != strings.Join(wantNames, ",") {
		t.Errorf("blob files = %v, want %v", got, wantNames)
	}
}

func TestConformance(t *testing.T) {
	blobtest.Run(t, func(t *testing.T) storage.BlobStore {
		s := newStore(t)
		t.Cleanup(func() {
			// Whatever a sub-test did, no upload may leave a temp file.
			if tmp := files(t, s.tmpDir); len(tmp) != 0 {
				t.Errorf("temp files left behind: %v", tmp)
			}
		})
		return s
	})
}

func TestLayoutAndOpenFile(t *testing.T) {
	s := newStore(t)
	body := randomBytes(1, 1000)
	res, err := s.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1})
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	checkLayout(t, s, body)
	blob, err := s.Open(context.Background(), res.SHA256)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer blob.Content.Close()
	f, ok := blob.Content.(*os.File)
	if !ok {
		t.Fatalf("Open returned %T, want *os.File (for sendfile)", blob.Content)
	}
	want := filepath.Join(s.Root(), "blobs", res.SHA256[:2], res.SHA256[2:4], res.SHA256)
	if f.Name() != want {
		t.Errorf("opened %s, want %s", f.Name(), want)
	}
}

func TestNothingLeftOnFailure(t *testing.T) {
	errBroken := errors.New("broken")
	stored := randomBytes(2, 700_001)
	tests := []struct {
		name string
		r    func(ctx context.Context, cancel context.CancelFunc) io.Reader
		opts storage.PutOptions
	}{
		{"TooLarge", func(context.Context, context.CancelFunc) io.Reader { return bytes.NewReader(randomBytes(3, 600_000)) },
			storage.PutOptions{MaxSize: 500_000, ExpectedSize: -1}},
		{"Shorter", func(context.Context, context.CancelFunc) io.Reader { return bytes.NewReader(randomBytes(3, 600_000)) },
			storage.PutOptions{ExpectedSize: 600_001}},
		{"Longer", func(context.Context, context.CancelFunc) io.Reader { return bytes.NewReader(randomBytes(3, 600_000)) },
			storage.PutOptions{ExpectedSize: 599_999}},
		{"ReaderError", func(context.Context, context.CancelFunc) io.Reader {
			return io.MultiReader(bytes.NewReader(randomBytes(3, 600_000)), iotestErr{errBroken})
		}, storage.PutOptions{ExpectedSize: -1}},
		{"Cancelled", func(ctx context.Context, cancel context.CancelFunc) io.Reader {
			return io.MultiReader(bytes.NewReader(randomBytes(3, 600_000)), cancelOnRead{cancel},
				bytes.NewReader(randomBytes(4, 600_000)))
		}, storage.PutOptions{ExpectedSize: -1}},
		{"CandidateDivergedThenTooLong", func(context.Context, context.CancelFunc) io.Reader {
			return bytes.NewReader(append(bytes.Clone(stored[:500_000]), randomBytes(5, 300_000)...))
		}, storage.PutOptions{ExpectedSize: 700_001, Candidate: hexSum(stored)}},
		{"CandidateLongerThenReaderError", func(context.Context, context.CancelFunc) io.Reader {
			return io.MultiReader(bytes.NewReader(stored[:600_000]), iotestErr{errBroken})
		}, storage.PutOptions{ExpectedSize: -1, Candidate: hexSum(stored)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t)
			if _, err := s.Put(context.Background(), bytes.NewReader(stored), storage.PutOptions{ExpectedSize: -1}); err != nil {
				t.Fatalf("Put: %v", err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if _, err := s.Put(ctx, tt.r(ctx, cancel), tt.opts); err == nil {
				t.Fatal("Put succeeded, want an error")
			}
			checkLayout(t, s, stored)
		})
	}
}

type iotestErr struct{ err error }

func (r iotestErr) Read([]byte) (int, error) { return 0, r.err }

type cancelOnRead struct{ cancel context.CancelFunc }

func (r cancelOnRead) Read([]byte) (int, error) { r.cancel(); return 0, io.EOF }

// breakTempDir replaces the store's temp directory by a regular file, so that
// any attempt to create a temp file fails. It lets a test prove that a Put
// wrote nothing, even when running as root.
func breakTempDir(t *testing.T, s *Store) {
	t.Helper()
	if err := os.Remove(s.tmpDir); err != nil {
		t.Fatalf("removing temp dir: %v", err)
	}
	if err := os.WriteFile(s.tmpDir, nil, 0o600); err != nil {
		t.Fatalf("creating blocker file: %v", err)
	}
}

func TestDuplicateWithCandidateWritesNothing(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	body := randomBytes(6, 3<<20+17)
	first, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1})
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	path := s.blobPath(first.SHA256)
	before, err := os.Stat(path)
	if err != nil {
		t.Fatalf("Stat blob file: %v", err)
	}
	breakTempDir(t, s)

	for _, expected := range []int64{int64(len(body)), -1} {
		res, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: expected, Candidate: first.SHA256})
		if err != nil {
			t.Fatalf("duplicate Put with candidate (ExpectedSize %d) tried to write: %v", expected, err)
		}
		if !res.Existed || res.SHA256 != first.SHA256 || res.Size != int64(len(body)) || res.PrefixSHA256 != first.PrefixSHA256 {
			t.Errorf("duplicate Put = %+v, want existing %+v", res, first)
		}
	}
	after, err := os.Stat(path)
	if err != nil {
		t.Fatalf("Stat blob file: %v", err)
	}
	if !os.SameFile(before, after) || !after.ModTime().Equal(before.ModTime()) {
		t.Error("blob file was replaced or modified by a duplicate Put")
	}
	// Without a candidate the store must write a temp file, which now fails:
	// this proves the check above would catch a write.
	if _, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1}); err == nil {
		t.Error("Put without candidate succeeded although no temp file can be created")
	}
	// A body that diverges from the candidate must write too.
	if _, err := s.Put(ctx, bytes.NewReader(body[:len(body)-1]), storage.PutOptions{ExpectedSize: -1, Candidate: first.SHA256}); err == nil {
		t.Error("diverging Put succeeded although no temp file can be created")
	}
}

func TestStaleTempFilesRemovedOnNew(t *testing.T) {
	root := t.TempDir()
	s, err := New(root)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	stale := filepath.Join(s.tmpDir, "put-stale")
	fresh := filepath.Join(s.tmpDir, "put-fresh")
	for _, p := range []string{stale, fresh} {
		if err := os.WriteFile(p, []byte("partial upload"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(stale, old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := New(root); err != nil {
		t.Fatalf("reopening: %v", err)
	}
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stale temp file still there (err %v)", err)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Errorf("fresh temp file (maybe an upload in progress) was removed: %v", err)
	}
}

func TestNewCreatesDirectories(t *testing.T) {
	root := filepath.Join(t.TempDir(), "a", "b")
	s, err := New(root)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	for _, d := range []string{"blobs", "tmp"} {
		info, err := os.Stat(filepath.Join(root, d))
		if err != nil || !info.IsDir() {
			t.Errorf("%s not created as a directory: %v", d, err)
		}
	}
	if _, err := New(""); err == nil {
		t.Error("New(\"\") succeeded")
	}
	// A root that is a file cannot hold a store.
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(file); err == nil {
		t.Error("New on a regular file succeeded")
	}
	_ = s
}

func TestDeleteMalformedAndWhileOpen(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	if err := s.Delete(ctx, "../../etc"); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("Delete(malformed) = %v, want ErrNotFound", err)
	}
	body := randomBytes(7, 100_000)
	res, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1})
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	blob, err := s.Open(ctx, res.SHA256)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer blob.Content.Close()
	if err := s.Delete(ctx, res.SHA256); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	got, err := io.ReadAll(blob.Content)
	if err != nil || !bytes.Equal(got, body) {
		t.Errorf("reading a blob opened before its deletion: %d bytes, %v", len(got), err)
	}
	checkLayout(t, s)
}

// patternReader yields n bytes of a cheap, non-repeating-per-chunk pattern
// without allocating.
type patternReader struct {
	n, off int64
}

func (r *patternReader) Read(p []byte) (int, error) {
	if r.off >= r.n {
		return 0, io.EOF
	}
	if rem := r.n - r.off; int64(len(p)) > rem {
		p = p[:rem]
	}
	for i := range p {
		x := uint64(r.off) + uint64(i)
		p[i] = byte(x ^ x>>8 ^ x>>19)
	}
	r.off += int64(len(p))
	return len(p), nil
}

func TestPutMemoryDoesNotGrowWithSize(t *testing.T) {
	if testing.Short() {
		t.Skip("streams 64 MiB three times")
	}
	const size = 64 << 20
	const limit = 4 << 20
	ctx := context.Background()
	s := newStore(t)
	measure := func(name string, opts storage.PutOptions, wantExisted bool) storage.PutResult {
		t.Helper()
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		res, err := s.Put(ctx, &patternReader{n: size}, opts)
		runtime.ReadMemStats(&after)
		if err != nil {
			t.Fatalf("%s: Put: %v", name, err)
		}
		if res.Size != size || res.Existed != wantExisted {
			t.Fatalf("%s: Put = %+v", name, res)
		}
		alloc := after.TotalAlloc - before.TotalAlloc
		t.Logf("%s: %d bytes allocated for a %d byte body", name, alloc, size)
		if alloc > limit {
			t.Errorf("%s: allocated %d bytes for a %d byte body, want < %d", name, alloc, size, limit)
		}
		return res
	}
	first := measure("new", storage.PutOptions{ExpectedSize: size}, false)
	measure("duplicate with candidate", storage.PutOptions{ExpectedSize: size, Candidate: first.SHA256}, true)
	measure("duplicate without candidate", storage.PutOptions{ExpectedSize: -1}, true)
	if tmp := files(t, s.tmpDir); len(tmp) != 0 {
		t.Errorf("temp files left behind: %v", tmp)
	}
	if blobs := files(t, s.blobDir); len(blobs) != 1 {
		t.Errorf("blob files = %v, want exactly one", blobs)
	}
}

// countingCancelReader yields n pattern bytes, cancels after cancelAt of them
// and counts how many it handed out.
type countingCancelReader struct {
	patternReader
	cancelAt int64
	cancel   context.CancelFunc
}

func (r *countingCancelReader) Read(p []byte) (int, error) {
	n, err := r.patternReader.Read(p)
	if r.off >= r.cancelAt {
		r.cancel()
	}
	return n, err
}

func TestPutStopsReadingOnceCancelled(t *testing.T) {
	const size = 64 << 20
	const cancelAt = 1 << 20
	for _, withCandidate := range []bool{false, true} {
		s := newStore(t)
		opts := storage.PutOptions{ExpectedSize: size}
		if withCandidate {
			res, err := s.Put(context.Background(), &patternReader{n: size}, opts)
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			opts.Candidate = res.SHA256
		}
		ctx, cancel := context.WithCancel(context.Background())
		r := &countingCancelReader{patternReader: patternReader{n: size}, cancelAt: cancelAt, cancel: cancel}
		_, err := s.Put(ctx, r, opts)
		cancel()
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("candidate=%v: Put error = %v, want context.Canceled", withCandidate, err)
		}
		// Cancellation is checked between chunks: at most one more chunk may
		// be read after the one during which the context was cancelled.
		if limit := int64(cancelAt + 2*chunkSize); r.off > limit {
			t.Errorf("candidate=%v: read %d bytes after cancelling at %d, want at most %d", withCandidate, r.off, cancelAt, limit)
		}
		if tmp := files(t, s.tmpDir); len(tmp) != 0 {
			t.Errorf("candidate=%v: temp files left behind: %v", withCandidate, tmp)
		}
	}
}

// deleteMidway yields data and deletes a blob once after bytes are read.
type deleteMidway struct {
	r     io.Reader
	after int64
	off   int64
	del   func()
}

func (d *deleteMidway) Read(p []byte) (int, error) {
	n, err := d.r.Read(p)
	d.off += int64(n)
	if d.off >= d.after && d.del != nil {
		d.del()
		d.del = nil
	}
	return n, err
}

func TestCandidateDeletedWhileComparing(t *testing.T) {
	ctx := context.Background()
	body := randomBytes(8, 1<<20+3)
	for _, tt := range []struct {
		name string
		body []byte
	}{
		{"Equal", body},
		{"Shorter", body[:len(body)-5]},
		{"DifferAtEnd", append(bytes.Clone(body[:len(body)-1]), body[len(body)-1]^1)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newStore(t)
			first, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1})
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			r := &deleteMidway{r: bytes.NewReader(tt.body), after: 300_000, del: func() {
				if err := s.Delete(ctx, first.SHA256); err != nil {
					t.Errorf("Delete: %v", err)
				}
			}}
			res, err := s.Put(ctx, r, storage.PutOptions{ExpectedSize: -1, Candidate: first.SHA256})
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			if res.Existed || res.SHA256 != hexSum(tt.body) {
				t.Errorf("Put = %+v, want a new blob %s", res, hexSum(tt.body))
			}
			checkLayout(t, s, tt.body)
		})
	}
}

func TestUnusableCandidateIgnored(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	body := randomBytes(9, 300_000)
	// A directory where the candidate blob would be: opening it works, reading
	// it does not.
	bogus := hexSum([]byte("bogus"))
	if err := os.MkdirAll(s.blobPath(bogus), 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1, Candidate: bogus})
	if err != nil {
		t.Fatalf("Put with an unusable candidate: %v", err)
	}
	if res.SHA256 != hexSum(body) || res.Existed {
		t.Errorf("Put = %+v", res)
	}
	got, err := os.ReadFile(s.blobPath(res.SHA256))
	if err != nil || !bytes.Equal(got, body) {
		t.Errorf("stored blob: %d bytes, %v", len(got), err)
	}
}
