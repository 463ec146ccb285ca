package storage_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/blobtest"
)

// TestDigestHashes feeds bodies around PrefixSize in chunks of several sizes
// and checks the hash, the prefix hash and the size against direct sums.
func TestDigestHashes(t *testing.T) {
	sizes := []int{0, 1, storage.PrefixSize - 1, storage.PrefixSize, storage.PrefixSize + 1, 3*storage.PrefixSize + 5}
	chunks := []int{1 << 20, storage.PrefixSize, 1000, 7}
	for _, size := range sizes {
		body := blobtest.RandomBytes(uint64(size), size)
		whole := sha256.Sum256(body)
		prefix := sha256.Sum256(body[:min(size, storage.PrefixSize)])
		for _, chunk := range chunks {
			if chunk == 7 && size > 2*storage.PrefixSize {
				continue
			}
			t.Run(fmt.Sprintf("size %d chunk %d", size, chunk), func(t *testing.T) {
				d := storage.NewDigest(storage.PutOptions{ExpectedSize: int64(size)})
				for off := 0; off < size; off += chunk {
					if _, err := d.Add(body[off:min(off+chunk, size)]); err != nil {
						t.Fatalf("Add at %d: %v", off, err)
					}
				}
				res, err := d.Finish()
				if err != nil {
					t.Fatalf("Finish: %v", err)
				}
				if res.SHA256 != hex.EncodeToString(whole[:]) || res.PrefixSHA256 != hex.EncodeToString(prefix[:]) || res.Size != int64(size) {
					t.Errorf("got %+v, want sha256 %x prefix %x size %d", res, whole, prefix, size)
				}
			})
		}
	}
}
