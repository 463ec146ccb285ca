// Package blobtest is the conformance suite that every storage.BlobStore
// implementation must pass. A store's own tests call Run with a constructor
// that returns a fresh, empty store; checks that depend on how a store keeps
// its bytes (temp files, object layout) belong in that store's own tests.
package blobtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// multiChunk is a body size that spans several read chunks of any sensible
// store (several 64 KiB prefixes, more than two 256 KiB buffers) and is not a
// multiple of a power of two.
const multiChunk = 700_001

// Run runs the conformance suite against stores made by newStore, which must
// return a fresh, empty store for each call. Run closes every store it gets
// when the sub-test that asked for it ends.
func Run(t *testing.T, newStore func(t *testing.T) storage.BlobStore) {
	t.Helper()
	open := func(t *testing.T) storage.BlobStore {
		t.Helper()
		s := newStore(t)
		t.Cleanup(func() {
			if err := s.Close(); err != nil {
				t.Errorf("closing store: %v", err)
			}
		})
		return s
	}
	t.Run("RoundTrip", func(t *testing.T) { testRoundTrip(t, open) })
	t.Run("Empty", func(t *testing.T) { testEmpty(t, open) })
	t.Run("Dedup", func(t *testing.T) { testDedup(t, open) })
	t.Run("SmallReads", func(t *testing.T) { testSmallReads(t, open) })
	t.Run("MaxSize", func(t *testing.T) { testMaxSize(t, open) })
	t.Run("ExpectedSizeMismatch", func(t *testing.T) { testExpectedSize(t, open) })
	t.Run("ExpectedSHA256", func(t *testing.T) { testExpectedSHA256(t, open) })
	t.Run("ReaderError", func(t *testing.T) { testReaderError(t, open) })
	t.Run("ContextCancelled", func(t *testing.T) { testContextCancelled(t, open) })
	t.Run("Candidate", func(t *testing.T) { testCandidate(t, open) })
	t.Run("NotFound", func(t *testing.T) { testNotFound(t, open) })
	t.Run("Delete", func(t *testing.T) { testDelete(t, open) })
	t.Run("ConcurrentSameBytes", func(t *testing.T) { testConcurrentSame(t, open) })
	t.Run("ConcurrentDistinct", func(t *testing.T) { testConcurrentDistinct(t, open) })
	t.Run("LargeSeek", func(t *testing.T) { testLargeSeek(t, open) })
	t.Run("IndependentReaders", func(t *testing.T) { testIndependentReaders(t, open) })
	t.Run("List", func(t *testing.T) { testList(t, open) })
}

// opener returns a fresh store for one sub-test.
type opener func(t *testing.T) storage.BlobStore

// RandomBytes returns n pseudo-random bytes determined by seed, for tests
// of blob stores.
func RandomBytes(seed uint64, n int) []byte {
	var key [32]byte
	for i := range 8 {
		key[i] = byte(seed >> (8 * i))
	}
	b := make([]byte, n)
	rand.NewChaCha8(key).Read(b)
	return b
}

// SHA256Hex returns the lowercase hex SHA-256 of b: the address a blob
// store gives b.
func SHA256Hex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// prefixSum returns the expected PrefixSHA256 of b.
func prefixSum(b []byte) string {
	return SHA256Hex(b[:min(len(b), storage.PrefixSize)])
}

// concat returns a new slice holding the given slices one after another.
func concat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// withByteChanged returns a copy of b with the byte at i changed.
func withByteChanged(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0xff
	return c
}

// mustPut stores body and checks the result against the body.
func mustPut(t *testing.T, s storage.BlobStore, body []byte, opts storage.PutOptions, wantExisted bool) storage.PutResult {
	t.Helper()
	res, err := s.Put(context.Background(), bytes.NewReader(body), opts)
	if err != nil {
		t.Fatalf("Put(%d bytes, %+v): %v", len(body), opts, err)
	}
	checkResult(t, res, body, wantExisted)
	return res
}

// checkResult checks a PutResult against the body that was stored.
func checkResult(t *testing.T, res storage.PutResult, body []byte, wantExisted bool) {
	t.Helper()
	if want := SHA256Hex(body); res.SHA256 != want {
		t.Errorf("PutResult.SHA256 = %q, want %q", res.SHA256, want)
	}
	if res.Size != int64(len(body)) {
		t.Errorf("PutResult.Size = %d, want %d", res.Size, len(body))
	}
	if want := prefixSum(body); res.PrefixSHA256 != want {
		t.Errorf("PutResult.PrefixSHA256 = %q, want %q", res.PrefixSHA256, want)
	}
	if res.Existed != wantExisted {
		t.Errorf("PutResult.Existed = %v, want %v", res.Existed, wantExisted)
	}
}

// mustHave checks that the blob of want is stored with exactly want's bytes.
func mustHave(t *testing.T, s storage.BlobStore, want []byte) {
	t.Helper()
	ctx := context.Background()
	h := SHA256Hex(want)
	size, err := s.Stat(ctx, h)
	if err != nil {
		t.Fatalf("Stat(%s): %v", h, err)
	}
	if size != int64(len(want)) {
		t.Errorf("Stat(%s) = %d, want %d", h, size, len(want))
	}
	blob, err := s.Open(ctx, h)
	if err != nil {
		t.Fatalf("Open(%s): %v", h, err)
	}
	defer blob.Content.Close()
	if blob.Size != int64(len(want)) {
		t.Errorf("Open(%s).Size = %d, want %d", h, blob.Size, len(want))
	}
	got, err := io.ReadAll(blob.Content)
	if err != nil {
		t.Fatalf("reading blob %s: %v", h, err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("blob %s holds %d bytes (sha256 %s), want %d bytes", h, len(got), SHA256Hex(got), len(want))
	}
}

// mustMissing checks that no blob is stored under hash h.
func mustMissing(t *testing.T, s storage.BlobStore, h string) {
	t.Helper()
	ctx := context.Background()
	if size, err := s.Stat(ctx, h); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("Stat(%q) = %d, %v; want an error wrapping ErrNotFound", h, size, err)
	}
	blob, err := s.Open(ctx, h)
	if err == nil {
		blob.Content.Close()
	}
	if !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("Open(%q) error = %v; want an error wrapping ErrNotFound", h, err)
	}
}

// failingReader yields data up to failAt bytes, then fails with err.
type failingReader struct {
	data   []byte
	failAt int
	err    error
	off    int
}

func (r *failingReader) Read(p []byte) (int, error) {
	if r.off >= r.failAt {
		return 0, r.err
	}
	n := copy(p, r.data[r.off:r.failAt])
	r.off += n
	return n, nil
}

// cancellingReader yields data, calling cancel once at least after bytes have
// been handed out, and keeps yielding the rest of the data afterwards.
type cancellingReader struct {
	data   []byte
	after  int
	cancel context.CancelFunc
	off    int
}

func (r *cancellingReader) Read(p []byte) (int, error) {
	if r.off >= len(r.data) {
		return 0, io.EOF
	}
	n := copy(p, r.data[r.off:])
	r.off += n
	if r.off >= r.after {
		r.cancel()
	}
	return n, nil
}

func testRoundTrip(t *testing.T, open opener) {
	sizes := []int{1, 11, storage.PrefixSize - 1, storage.PrefixSize, storage.PrefixSize + 1, multiChunk}
	for i, size := range sizes {
		for _, known := range []bool{true, false} {
			t.Run(fmt.Sprintf("size=%d/knownLength=%v", size, known), func(t *testing.T) {
				s := open(t)
				body := RandomBytes(uint64(100+i), size)
				opts := storage.PutOptions{ExpectedSize: -1}
				if known {
					opts.ExpectedSize = int64(size)
				}
				mustPut(t, s, body, opts, false)
				mustHave(t, s, body)
			})
		}
	}
	t.Run("DistinctBlobsStayApart", func(t *testing.T) {
		s := open(t)
		a, b := RandomBytes(1, 5000), RandomBytes(2, 5000)
		mustPut(t, s, a, storage.PutOptions{ExpectedSize: -1}, false)
		mustPut(t, s, b, storage.PutOptions{ExpectedSize: -1}, false)
		mustHave(t, s, a)
		mustHave(t, s, b)
	})
}

func testEmpty(t *testing.T, open opener) {
	for _, expected := range []int64{0, -1} {
		t.Run(fmt.Sprintf("ExpectedSize=%d", expected), func(t *testing.T) {
			s := open(t)
			res := mustPut(t, s, nil, storage.PutOptions{ExpectedSize: expected}, false)
			const emptySHA = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
			if res.SHA256 != emptySHA || res.PrefixSHA256 != emptySHA {
				t.Errorf("empty blob hashes = %q / %q, want %q", res.SHA256, res.PrefixSHA256, emptySHA)
			}
			mustHave(t, s, nil)
			mustPut(t, s, nil, storage.PutOptions{ExpectedSize: expected}, true)
			mustHave(t, s, nil)
		})
	}
}

func testDedup(t *testing.T, open opener) {
	for _, size := range []int{1000, multiChunk} {
		t.Run(fmt.Sprintf("size=%d", size), func(t *testing.T) {
			s := open(t)
			body := RandomBytes(7, size)
			first := mustPut(t, s, body, storage.PutOptions{ExpectedSize: int64(size)}, false)
			second := mustPut(t, s, body, storage.PutOptions{ExpectedSize: int64(size)}, true)
			third := mustPut(t, s, body, storage.PutOptions{ExpectedSize: -1}, true)
			if first.SHA256 != second.SHA256 || first.SHA256 != third.SHA256 {
				t.Errorf("hashes differ across identical puts: %s %s %s", first.SHA256, second.SHA256, third.SHA256)
			}
			mustHave(t, s, body)
		})
	}
}

func testSmallReads(t *testing.T, open opener) {
	body := RandomBytes(9, 5000)
	readers := map[string]func() io.Reader{
		"OneByte": func() io.Reader { return iotest.OneByteReader(bytes.NewReader(body)) },
		"Half":    func() io.Reader { return iotest.HalfReader(bytes.NewReader(body)) },
		"DataErr": func() io.Reader { return iotest.DataErrReader(bytes.NewReader(body)) },
	}
	for name, mk := range readers {
		t.Run(name, func(t *testing.T) {
			s := open(t)
			res, err := s.Put(context.Background(), mk(), storage.PutOptions{ExpectedSize: int64(len(body))})
			if err != nil {
				t.Fatalf("Put: %v", err)
			}
			checkResult(t, res, body, false)
			mustHave(t, s, body)
		})
	}
}

func testMaxSize(t *testing.T, open opener) {
	tests := []struct {
		name     string
		size     int
		max      int64
		expected int64
		wantErr  error
	}{
		{"OneOver", 1000, 999, -1, storage.ErrTooLarge},
		{"Exact", 1000, 1000, -1, nil},
		{"ExactKnownLength", 1000, 1000, 1000, nil},
		{"FarOverStreaming", multiChunk, 300_000, -1, storage.ErrTooLarge},
		{"AnnouncedOver", 1000, 999, 1000, storage.ErrTooLarge},
		{"AnnouncedOverLarge", multiChunk, 300_000, multiChunk, storage.ErrTooLarge},
		{"NoLimit", multiChunk, 0, -1, nil},
		{"NegativeIsNoLimit", multiChunk, -1, -1, nil},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := open(t)
			body := RandomBytes(uint64(200+i), tt.size)
			opts := storage.PutOptions{MaxSize: tt.max, ExpectedSize: tt.expected}
			res, err := s.Put(context.Background(), bytes.NewReader(body), opts)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatalf("Put: %v", err)
				}
				checkResult(t, res, body, false)
				mustHave(t, s, body)
				return
			}
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Put error = %v, want %v", err, tt.wantErr)
			}
			mustMissing(t, s, SHA256Hex(body))
			mustMissing(t, s, SHA256Hex(body[:tt.max]))
		})
	}
}

func testExpectedSize(t *testing.T, open opener) {
	tests := []struct {
		name     string
		size     int
		expected int64
	}{
		{"ShorterByOne", 1000, 1001},
		{"LongerByOne", 1000, 999},
		{"ShorterLarge", multiChunk, multiChunk + 1},
		{"LongerLarge", multiChunk, multiChunk - 1},
		{"FarLonger", multiChunk, 10},
		{"FarShorter", 10, multiChunk},
		{"EmptyButAnnounced", 0, 1},
		{"AnnouncedEmpty", 1, 0},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := open(t)
			body := RandomBytes(uint64(300+i), tt.size)
			_, err := s.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: tt.expected})
			if !errors.Is(err, storage.ErrSizeMismatch) {
				t.Fatalf("Put error = %v, want ErrSizeMismatch", err)
			}
			mustMissing(t, s, SHA256Hex(body))
			if tt.expected < int64(len(body)) {
				mustMissing(t, s, SHA256Hex(body[:tt.expected]))
			}
		})
	}
}

// testExpectedSHA256 stores bodies with PutOptions.ExpectedSHA256: the
// body's own hash is stored as usual; any other hash (another body's, a
// malformed one) fails with ErrHashMismatch and keeps nothing, whether the
// body would have been new, was already stored, or equals a candidate.
func testExpectedSHA256(t *testing.T, open opener) {
	ctx := context.Background()
	base := RandomBytes(900, multiChunk)
	other := SHA256Hex(withByteChanged(base, len(base)/2))
	t.Run("Matching", func(t *testing.T) {
		s := open(t)
		mustPut(t, s, base, storage.PutOptions{ExpectedSize: int64(len(base)), ExpectedSHA256: SHA256Hex(base)}, false)
		mustHave(t, s, base)
		mustPut(t, s, nil, storage.PutOptions{ExpectedSize: -1, ExpectedSHA256: SHA256Hex(nil)}, false)
	})
	for _, tt := range []struct {
		name   string
		body   []byte
		expect string
	}{
		{"OtherHash", base, other},
		{"OtherHashSmall", base[:1000], other},
		{"Empty", nil, other},
		{"Uppercase", base, strings.ToUpper(SHA256Hex(base))},
		{"Malformed", base, "not-a-hash"},
	} {
		for _, known := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/knownLength=%v", tt.name, known), func(t *testing.T) {
				s := open(t)
				opts := storage.PutOptions{ExpectedSize: -1, ExpectedSHA256: tt.expect}
				if known {
					opts.ExpectedSize = int64(len(tt.body))
				}
				_, err := s.Put(ctx, bytes.NewReader(tt.body), opts)
				if !errors.Is(err, storage.ErrHashMismatch) {
					t.Fatalf("Put error = %v, want ErrHashMismatch", err)
				}
				mustMissing(t, s, SHA256Hex(tt.body))
				mustMissing(t, s, other)
				mustList(t, s, nil)
			})
		}
	}
	t.Run("AlreadyStored", func(t *testing.T) {
		s := open(t)
		mustPut(t, s, base, storage.PutOptions{ExpectedSize: -1}, false)
		_, err := s.Put(ctx, bytes.NewReader(base), storage.PutOptions{ExpectedSize: -1, ExpectedSHA256: other})
		if !errors.Is(err, storage.ErrHashMismatch) {
			t.Fatalf("Put error = %v, want ErrHashMismatch", err)
		}
		mustHave(t, s, base)
		mustList(t, s, [][]byte{base})
	})
	for _, body := range [][]byte{base, withByteChanged(base, 300_000)} {
		t.Run(fmt.Sprintf("Candidate/equal=%v", bytes.Equal(body, base)), func(t *testing.T) {
			s := open(t)
			cand := mustPut(t, s, base, storage.PutOptions{ExpectedSize: -1}, false)
			_, err := s.Put(ctx, bytes.NewReader(body),
				storage.PutOptions{ExpectedSize: int64(len(body)), Candidate: cand.SHA256, ExpectedSHA256: other})
			if !errors.Is(err, storage.ErrHashMismatch) {
				t.Fatalf("Put error = %v, want ErrHashMismatch", err)
			}
			mustHave(t, s, base)
			mustList(t, s, [][]byte{base})
		})
	}
}

// mustList checks that the store lists exactly the blobs of bodies.
func mustList(t *testing.T, s storage.BlobStore, bodies [][]byte) {
	t.Helper()
	l, ok := s.(storage.Lister)
	if !ok {
		t.Fatalf("%T does not implement storage.Lister", s)
	}
	want := map[string]bool{}
	for _, b := range bodies {
		want[SHA256Hex(b)] = true
	}
	got := map[string]bool{}
	if err := l.List(context.Background(), func(b storage.StoredBlob) error {
		got[b.SHA256] = true
		return nil
	}); err != nil {
		t.Fatalf("List: %v", err)
	}
	if !maps.Equal(got, want) {
		t.Errorf("List gave %v, want %v", slices.Collect(maps.Keys(got)), slices.Collect(maps.Keys(want)))
	}
}

func testReaderError(t *testing.T, open opener) {
	errBroken := errors.New("connection reset by test")
	body := RandomBytes(400, multiChunk)
	for _, failAt := range []int{0, 1, storage.PrefixSize, 300_000, multiChunk - 1} {
		for _, known := range []bool{true, false} {
			t.Run(fmt.Sprintf("failAt=%d/knownLength=%v", failAt, known), func(t *testing.T) {
				s := open(t)
				opts := storage.PutOptions{ExpectedSize: -1}
				if known {
					opts.ExpectedSize = int64(len(body))
				}
				r := &failingReader{data: body, failAt: failAt, err: errBroken}
				_, err := s.Put(context.Background(), r, opts)
				if !errors.Is(err, errBroken) {
					t.Fatalf("Put error = %v, want one wrapping the reader's error", err)
				}
				mustMissing(t, s, SHA256Hex(body))
				mustMissing(t, s, SHA256Hex(body[:failAt]))
			})
		}
	}
	t.Run("WhileComparingWithCandidate", func(t *testing.T) {
		s := open(t)
		base := mustPut(t, s, body, storage.PutOptions{ExpectedSize: -1}, false)
		other := withByteChanged(body, len(body)-1)
		r := &failingReader{data: other, failAt: 300_000, err: errBroken}
		_, err := s.Put(context.Background(), r, storage.PutOptions{ExpectedSize: int64(len(other)), Candidate: base.SHA256})
		if !errors.Is(err, errBroken) {
			t.Fatalf("Put error = %v, want one wrapping the reader's error", err)
		}
		mustMissing(t, s, SHA256Hex(other))
		mustMissing(t, s, SHA256Hex(other[:300_000]))
		mustHave(t, s, body)
	})
	t.Run("AfterDivergingFromCandidate", func(t *testing.T) {
		s := open(t)
		base := mustPut(t, s, body, storage.PutOptions{ExpectedSize: -1}, false)
		other := withByteChanged(body, 10)
		r := &failingReader{data: other, failAt: 500_000, err: errBroken}
		_, err := s.Put(context.Background(), r, storage.PutOptions{ExpectedSize: int64(len(other)), Candidate: base.SHA256})
		if !errors.Is(err, errBroken) {
			t.Fatalf("Put error = %v, want one wrapping the reader's error", err)
		}
		mustMissing(t, s, SHA256Hex(other))
		mustMissing(t, s, SHA256Hex(other[:500_000]))
		mustHave(t, s, body)
	})
}

func testContextCancelled(t *testing.T, open opener) {
	body := RandomBytes(500, 4<<20)
	t.Run("BeforePut", func(t *testing.T) {
		s := open(t)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Put error = %v, want context.Canceled", err)
		}
		mustMissing(t, s, SHA256Hex(body))
	})
	t.Run("Midway", func(t *testing.T) {
		s := open(t)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		r := &cancellingReader{data: body, after: 300_000, cancel: cancel}
		_, err := s.Put(ctx, r, storage.PutOptions{ExpectedSize: int64(len(body))})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Put error = %v, want context.Canceled", err)
		}
		mustMissing(t, s, SHA256Hex(body))
	})
	t.Run("MidwayWhileComparingWithCandidate", func(t *testing.T) {
		s := open(t)
		base := mustPut(t, s, body, storage.PutOptions{ExpectedSize: -1}, false)
		other := withByteChanged(body, len(body)-1)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		r := &cancellingReader{data: other, after: 300_000, cancel: cancel}
		_, err := s.Put(ctx, r, storage.PutOptions{ExpectedSize: int64(len(other)), Candidate: base.SHA256})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Put error = %v, want context.Canceled", err)
		}
		mustMissing(t, s, SHA256Hex(other))
		mustHave(t, s, body)
	})
}

func testCandidate(t *testing.T, open opener) {
	base := RandomBytes(600, multiChunk)
	tail := RandomBytes(601, 500_000)
	tests := []struct {
		name string
		body []byte
	}{
		{"Equal", base},
		{"DifferAtFirstByte", withByteChanged(base, 0)},
		{"DifferInPrefix", withByteChanged(base, 1000)},
		{"DifferAfterPrefix", withByteChanged(base, storage.PrefixSize)},
		{"DifferAt256KiB", withByteChanged(base, 256<<10)},
		{"DifferInMiddle", withByteChanged(base, len(base)/2)},
		{"DifferAtLastByte", withByteChanged(base, len(base)-1)},
		{"BodyShorterByOne", base[:len(base)-1]},
		{"BodyMuchShorter", base[:1000]},
		{"BodyShorterAtChunkEdge", base[:256<<10]},
		{"BodyLongerByOne", concat(base, []byte{'x'})},
		{"BodyMuchLonger", concat(base, tail)},
		{"BodyEmpty", nil},
		{"Unrelated", tail},
	}
	for _, tt := range tests {
		for _, known := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/knownLength=%v", tt.name, known), func(t *testing.T) {
				s := open(t)
				cand := mustPut(t, s, base, storage.PutOptions{ExpectedSize: -1}, false)
				opts := storage.PutOptions{ExpectedSize: -1, Candidate: cand.SHA256}
				if known {
					opts.ExpectedSize = int64(len(tt.body))
				}
				mustPut(t, s, tt.body, opts, bytes.Equal(tt.body, base))
				mustHave(t, s, tt.body)
				mustHave(t, s, base)
			})
		}
	}
	t.Run("Missing", func(t *testing.T) {
		s := open(t)
		body := RandomBytes(602, multiChunk)
		mustPut(t, s, body, storage.PutOptions{ExpectedSize: int64(len(body)), Candidate: SHA256Hex(base)}, false)
		mustHave(t, s, body)
		mustMissing(t, s, SHA256Hex(base))
	})
	t.Run("MissingEqualHash", func(t *testing.T) {
		// The candidate is the very hash of the body but is not stored.
		s := open(t)
		mustPut(t, s, base, storage.PutOptions{ExpectedSize: int64(len(base)), Candidate: SHA256Hex(base)}, false)
		mustHave(t, s, base)
	})
	for _, bad := range []string{"not-a-hash", strings.ToUpper(SHA256Hex(base)), "../../../../etc/passwd"} {
		t.Run("Malformed/"+strings.ReplaceAll(bad, "/", "_"), func(t *testing.T) {
			s := open(t)
			mustPut(t, s, base, storage.PutOptions{ExpectedSize: -1, Candidate: bad}, false)
			mustHave(t, s, base)
		})
	}
	t.Run("DivergingBodyAlreadyStored", func(t *testing.T) {
		// The body differs from the candidate but is itself already stored.
		s := open(t)
		cand := mustPut(t, s, base, storage.PutOptions{ExpectedSize: -1}, false)
		for _, body := range [][]byte{base[:len(base)-1], withByteChanged(base, 300_000), concat(base, []byte{'y'})} {
			mustPut(t, s, body, storage.PutOptions{ExpectedSize: -1}, false)
			mustPut(t, s, body, storage.PutOptions{ExpectedSize: int64(len(body)), Candidate: cand.SHA256}, true)
			mustPut(t, s, body, storage.PutOptions{ExpectedSize: -1, Candidate: cand.SHA256}, true)
			mustHave(t, s, body)
		}
		mustHave(t, s, base)
	})
	t.Run("WithMaxSize", func(t *testing.T) {
		s := open(t)
		cand := mustPut(t, s, base, storage.PutOptions{ExpectedSize: -1}, false)
		_, err := s.Put(context.Background(), bytes.NewReader(base),
			storage.PutOptions{ExpectedSize: -1, MaxSize: int64(len(base) - 1), Candidate: cand.SHA256})
		if !errors.Is(err, storage.ErrTooLarge) {
			t.Fatalf("Put error = %v, want ErrTooLarge", err)
		}
		mustHave(t, s, base)
	})
	t.Run("SizeMismatch", func(t *testing.T) {
		s := open(t)
		cand := mustPut(t, s, base, storage.PutOptions{ExpectedSize: -1}, false)
		for _, expected := range []int64{int64(len(base)) - 1, int64(len(base)) + 1} {
			_, err := s.Put(context.Background(), bytes.NewReader(base),
				storage.PutOptions{ExpectedSize: expected, Candidate: cand.SHA256})
			if !errors.Is(err, storage.ErrSizeMismatch) {
				t.Fatalf("Put(ExpectedSize=%d) error = %v, want ErrSizeMismatch", expected, err)
			}
		}
		mustHave(t, s, base)
		mustMissing(t, s, SHA256Hex(base[:len(base)-1]))
	})
}

// malformedHashes are strings that can never name a blob.
func malformedHashes() []string {
	valid := SHA256Hex([]byte("x"))
	return []string{
		"",
		"abc",
		valid[:63],
		valid + "0",
		strings.ToUpper(valid),
		"g" + valid[1:],
		"../" + valid[3:],
		"ab/cd/" + valid[6:],
		strings.Repeat(".", 64),
		valid[:32] + "\x00" + valid[33:],
	}
}

func testNotFound(t *testing.T, open opener) {
	s := open(t)
	stored := RandomBytes(700, 100)
	mustPut(t, s, stored, storage.PutOptions{ExpectedSize: -1}, false)
	t.Run("Missing", func(t *testing.T) {
		mustMissing(t, s, SHA256Hex([]byte("never stored")))
	})
	for i, h := range malformedHashes() {
		t.Run(fmt.Sprintf("Malformed%d", i), func(t *testing.T) {
			mustMissing(t, s, h)
		})
	}
	t.Run("UppercaseOfStored", func(t *testing.T) {
		mustMissing(t, s, strings.ToUpper(SHA256Hex(stored)))
	})
}

func testDelete(t *testing.T, open opener) {
	ctx := context.Background()
	s := open(t)
	a, b := RandomBytes(800, 3000), RandomBytes(801, multiChunk)
	mustPut(t, s, a, storage.PutOptions{ExpectedSize: -1}, false)
	mustPut(t, s, b, storage.PutOptions{ExpectedSize: -1}, false)
	if err := s.Delete(ctx, SHA256Hex(a)); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	mustMissing(t, s, SHA256Hex(a))
	mustHave(t, s, b)
	if err := s.Delete(ctx, SHA256Hex(a)); err != nil {
		t.Errorf("Delete of an already deleted blob: %v", err)
	}
	if err := s.Delete(ctx, SHA256Hex([]byte("never stored"))); err != nil {
		t.Errorf("Delete of a never stored blob: %v", err)
	}
	// Storing the bytes again brings the blob back, as new.
	mustPut(t, s, a, storage.PutOptions{ExpectedSize: -1}, false)
	mustHave(t, s, a)
	// A deleted blob is no longer a usable candidate, but naming it is harmless.
	if err := s.Delete(ctx, SHA256Hex(b)); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	mustPut(t, s, b, storage.PutOptions{ExpectedSize: int64(len(b)), Candidate: SHA256Hex(b)}, false)
	mustHave(t, s, b)
}

func testConcurrentSame(t *testing.T, open opener) {
	s := open(t)
	body := RandomBytes(900, multiChunk)
	const workers = 16
	results := make([]storage.PutResult, workers)
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() {
			opts := storage.PutOptions{ExpectedSize: -1}
			if i%2 == 0 {
				opts.ExpectedSize = int64(len(body))
			}
			results[i], errs[i] = s.Put(context.Background(), bytes.NewReader(body), opts)
		})
	}
	wg.Wait()
	for i := range workers {
		if errs[i] != nil {
			t.Errorf("Put #%d: %v", i, errs[i])
			continue
		}
		if results[i].SHA256 != SHA256Hex(body) || results[i].Size != int64(len(body)) {
			t.Errorf("Put #%d = %+v, want sha256 %s size %d", i, results[i], SHA256Hex(body), len(body))
		}
	}
	mustHave(t, s, body)
	// Once all are done the blob exists: one more Put reports it.
	mustPut(t, s, body, storage.PutOptions{ExpectedSize: -1}, true)
}

func testConcurrentDistinct(t *testing.T, open opener) {
	s := open(t)
	const workers = 8
	bodies := make([][]byte, workers)
	for i := range bodies {
		bodies[i] = RandomBytes(uint64(1000+i), 100_000+i*37_000)
	}
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() {
			_, errs[i] = s.Put(context.Background(), bytes.NewReader(bodies[i]), storage.PutOptions{ExpectedSize: -1})
		})
	}
	wg.Wait()
	for i := range workers {
		if errs[i] != nil {
			t.Errorf("Put #%d: %v", i, errs[i])
		}
	}
	for _, b := range bodies {
		mustHave(t, s, b)
	}
}

func testLargeSeek(t *testing.T, open opener) {
	s := open(t)
	const size = 8 << 20
	body := RandomBytes(1100, size)
	mustPut(t, s, body, storage.PutOptions{ExpectedSize: size}, false)
	mustHave(t, s, body)
	blob, err := s.Open(context.Background(), SHA256Hex(body))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer blob.Content.Close()
	ranges := []struct{ off, n int64 }{
		{0, 1},
		{1, 100},
		{storage.PrefixSize - 3, 10},
		{size/2 - 7, 1 << 20},
		{size - 100, 100},
		{size - 1, 1},
		{12345, 3 << 20},
	}
	for _, rg := range ranges {
		pos, err := blob.Content.Seek(rg.off, io.SeekStart)
		if err != nil || pos != rg.off {
			t.Fatalf("Seek(%d, start) = %d, %v", rg.off, pos, err)
		}
		got := make([]byte, rg.n)
		if _, err := io.ReadFull(blob.Content, got); err != nil {
			t.Fatalf("reading %d bytes at %d: %v", rg.n, rg.off, err)
		}
		if !bytes.Equal(got, body[rg.off:rg.off+rg.n]) {
			t.Errorf("bytes %d..%d differ from the stored body", rg.off, rg.off+rg.n)
		}
	}
	end, err := blob.Content.Seek(0, io.SeekEnd)
	if err != nil || end != size {
		t.Fatalf("Seek(0, end) = %d, %v; want %d", end, err, size)
	}
	if n, err := blob.Content.Read(make([]byte, 10)); n != 0 || err != io.EOF {
		t.Errorf("Read at end = %d, %v; want 0, EOF", n, err)
	}
	pos, err := blob.Content.Seek(-10, io.SeekEnd)
	if err != nil || pos != size-10 {
		t.Fatalf("Seek(-10, end) = %d, %v", pos, err)
	}
	got, err := io.ReadAll(blob.Content)
	if err != nil || !bytes.Equal(got, body[size-10:]) {
		t.Errorf("last 10 bytes = %x, %v; want %x", got, err, body[size-10:])
	}
	if _, err := blob.Content.Seek(-20, io.SeekCurrent); err != nil {
		t.Fatalf("Seek(-20, current): %v", err)
	}
	got = make([]byte, 20)
	if _, err := io.ReadFull(blob.Content, got); err != nil || !bytes.Equal(got, body[size-20:]) {
		t.Errorf("last 20 bytes via SeekCurrent = %x, %v", got, err)
	}
}

func testIndependentReaders(t *testing.T, open opener) {
	s := open(t)
	body := RandomBytes(1200, multiChunk)
	mustPut(t, s, body, storage.PutOptions{ExpectedSize: -1}, false)
	ctx := context.Background()
	b1, err := s.Open(ctx, SHA256Hex(body))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer b1.Content.Close()
	b2, err := s.Open(ctx, SHA256Hex(body))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer b2.Content.Close()
	var got1, got2 bytes.Buffer
	chunk := make([]byte, 10_000)
	for {
		n1, err1 := b1.Content.Read(chunk)
		got1.Write(chunk[:n1])
		n2, err2 := b2.Content.Read(chunk[:5000])
		got2.Write(chunk[:n2])
		if err1 == io.EOF && err2 == io.EOF {
			break
		}
		if (err1 != nil && err1 != io.EOF) || (err2 != nil && err2 != io.EOF) {
			t.Fatalf("interleaved reads: %v, %v", err1, err2)
		}
	}
	if !bytes.Equal(got1.Bytes(), body) || !bytes.Equal(got2.Bytes(), body) {
		t.Errorf("interleaved readers got %d and %d bytes, want %d equal bytes", got1.Len(), got2.Len(), len(body))
	}
}

// testList checks the optional storage.Lister capability: every stored blob
// is listed once with its size and a plausible modification time, deleted
// blobs are not, and an error from the callback stops the walk. A store that
// does not implement storage.Lister fails: every store of this module must
// (the garbage collector needs it).
func testList(t *testing.T, open opener) {
	ctx := context.Background()
	s := open(t)
	l, ok := s.(storage.Lister)
	if !ok {
		t.Fatalf("%T does not implement storage.Lister", s)
	}
	list := func() map[string]storage.StoredBlob {
		t.Helper()
		got := map[string]storage.StoredBlob{}
		if err := l.List(ctx, func(b storage.StoredBlob) error {
			if _, dup := got[b.SHA256]; dup {
				t.Errorf("List gave %s twice", b.SHA256)
			}
			got[b.SHA256] = b
			return nil
		}); err != nil {
			t.Fatalf("List: %v", err)
		}
		return got
	}
	if got := list(); len(got) != 0 {
		t.Fatalf("List of an empty store gave %d blobs", len(got))
	}
	// Clocks of object stores have second precision.
	before := time.Now().Add(-2 * time.Second)
	bodies := [][]byte{RandomBytes(71, 10), RandomBytes(72, multiChunk), RandomBytes(73, 0)}
	for _, b := range bodies {
		mustPut(t, s, b, storage.PutOptions{ExpectedSize: -1}, false)
	}
	after := time.Now().Add(2 * time.Second)
	got := list()
	if len(got) != len(bodies) {
		t.Errorf("List gave %d blobs, want %d", len(got), len(bodies))
	}
	for _, b := range bodies {
		sb, ok := got[SHA256Hex(b)]
		switch {
		case !ok:
			t.Errorf("blob of %d bytes not listed", len(b))
		case sb.Size != int64(len(b)):
			t.Errorf("listed size of %s = %d, want %d", sb.SHA256, sb.Size, len(b))
		case sb.ModTime.Before(before) || sb.ModTime.After(after):
			t.Errorf("listed ModTime of %s = %v, want between %v and %v", sb.SHA256, sb.ModTime, before, after)
		}
	}
	gone := SHA256Hex(bodies[0])
	if err := s.Delete(ctx, gone); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, ok := list()[gone]; ok {
		t.Errorf("deleted blob %s still listed", gone)
	}
	stop := errors.New("stop")
	calls := 0
	err := l.List(ctx, func(storage.StoredBlob) error { calls++; return stop })
	if !errors.Is(err, stop) || calls != 1 {
		t.Errorf("List with a failing callback = %v after %d calls, want the callback's error after 1", err, calls)
	}
}
