package filestore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// benchSize is the body size of the Put benchmarks.
const benchSize = 32 << 20

// BenchmarkPutNew stores a new 32 MiB blob per iteration (hash, write, fsync,
// rename). Blobs are deleted outside the timed section.
func BenchmarkPutNew(b *testing.B) {
	ctx := context.Background()
	s := newStore(b)
	body := randomBytes(10, benchSize)
	b.SetBytes(benchSize)
	for i := 0; b.Loop(); i++ {
		binary.LittleEndian.PutUint64(body, uint64(i)+1)
		res, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: benchSize})
		if err != nil || res.Existed {
			b.Fatalf("Put = %+v, %v", res, err)
		}
		b.StopTimer()
		if err := s.Delete(ctx, res.SHA256); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkPutDuplicateWithCandidate stores a 32 MiB body that is already
// stored, naming it as the candidate: hash and compare, no write.
func BenchmarkPutDuplicateWithCandidate(b *testing.B) {
	benchDuplicate(b, true)
}

// BenchmarkPutDuplicateNoCandidate stores a 32 MiB body that is already
// stored without a candidate: hash and write a temp file, then drop it.
func BenchmarkPutDuplicateNoCandidate(b *testing.B) {
	benchDuplicate(b, false)
}

func benchDuplicate(b *testing.B, withCandidate bool) {
	ctx := context.Background()
	s := newStore(b)
	body := randomBytes(11, benchSize)
	first, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: benchSize})
	if err != nil {
		b.Fatal(err)
	}
	opts := storage.PutOptions{ExpectedSize: benchSize}
	if withCandidate {
		opts.Candidate = first.SHA256
	}
	b.SetBytes(benchSize)
	for b.Loop() {
		res, err := s.Put(ctx, bytes.NewReader(body), opts)
		if err != nil || !res.Existed {
			b.Fatalf("Put = %+v, %v", res, err)
		}
	}
}

// BenchmarkSHA256Only hashes the same 32 MiB in chunkSize pieces: the floor
// for any Put, against which the duplicate benchmarks can be read.
func BenchmarkSHA256Only(b *testing.B) {
	body := randomBytes(12, benchSize)
	b.SetBytes(benchSize)
	for b.Loop() {
		h := sha256.New()
		for off := 0; off < len(body); off += chunkSize {
			h.Write(body[off:min(off+chunkSize, len(body))])
		}
		h.Sum(nil)
	}
}
