package storage_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
)

// multiFixture is two file stores, "a" (kind local) and "b" (kind remote),
// and a metadata store.
type multiFixture struct {
	roots  map[string]string
	stores map[string]*spyBlobs
	ds     *storage.Datastores
	meta   *forcedMeta
}

// forcedMeta wraps a MetadataStore; when cand is set, FindBlobByPrefix
// returns it whatever is asked, to make a candidate of bytes whose prefix
// differs.
type forcedMeta struct {
	storage.MetadataStore
	cand *storage.BlobRecord
}

func (f *forcedMeta) FindBlobByPrefix(ctx context.Context, size int64, prefix string) (storage.BlobRecord, error) {
	if f.cand != nil {
		return *f.cand, nil
	}
	return f.MetadataStore.FindBlobByPrefix(ctx, size, prefix)
}

// forEachMulti runs f once per metadata store implementation with a fresh
// multiFixture.
func forEachMulti(t *testing.T, f func(t *testing.T, fx *multiFixture)) {
	for name, newMeta := range metaStores {
		t.Run(name, func(t *testing.T) {
			fx := &multiFixture{roots: map[string]string{}, stores: map[string]*spyBlobs{}, meta: &forcedMeta{MetadataStore: newMeta(t)}}
			var ds []storage.Datastore
			for _, d := range []struct {
				name string
				kind storage.Kind
			}{{"a", storage.KindLocal}, {"b", storage.KindRemote}} {
				root := t.TempDir()
				bs, err := filestore.New(root)
				if err != nil {
					t.Fatalf("filestore.New: %v", err)
				}
				fx.roots[d.name] = root
				fx.stores[d.name] = &spyBlobs{BlobStore: bs}
				ds = append(ds, storage.Datastore{Name: d.name, Store: fx.stores[d.name], Kinds: []storage.Kind{d.kind}})
			}
			var err error
			fx.ds, err = storage.NewDatastores(ds...)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { fx.ds.Close() })
			f(t, fx)
		})
	}
}

func (fx *multiFixture) ingest(t *testing.T, kind storage.Kind, body []byte, known bool) storage.IngestResult {
	t.Helper()
	opts := storage.PutOptions{ExpectedSize: -1}
	if known {
		opts.ExpectedSize = int64(len(body))
	}
	res, err := storage.IngestTo(context.Background(), fx.ds, fx.meta, kind, bytes.NewReader(body), opts)
	if err != nil {
		t.Fatalf("IngestTo(%s, %d bytes): %v", kind, len(body), err)
	}
	return res
}

// files counts the blob and temp files of datastore name.
func (fx *multiFixture) files(t *testing.T, name string) (blobs, temps int) {
	t.Helper()
	return (&fixture{root: fx.roots[name]}).blobFiles(t)
}

// blobPath is where the file store of datastore name keeps blob h.
func (fx *multiFixture) blobPath(name, h string) string {
	return filepath.Join(fx.roots[name], "blobs", h[0:2], h[2:4], h)
}

// check asserts that datastore name holds body, that the record names it,
// and that the result agrees.
func (fx *multiFixture) check(t *testing.T, name string, body []byte) {
	t.Helper()
	ctx := context.Background()
	h := hexSum(body)
	blob, err := fx.stores[name].Open(ctx, h)
	if err != nil {
		t.Fatalf("Open(%s) in %s: %v", h[:8], name, err)
	}
	got, err := io.ReadAll(blob.Content)
	blob.Content.Close()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("blob %s in %s: %d bytes (%v), want the %d bytes of the body", h[:8], name, len(got), err, len(body))
	}
	rec, err := fx.meta.GetBlob(ctx, h)
	if err != nil {
		t.Fatalf("GetBlob(%s): %v", h[:8], err)
	}
	wantPrefix := hexSum(body[:min(len(body), storage.PrefixSize)])
	if rec.Datastore != name || rec.Size != int64(len(body)) || rec.PrefixSHA256 != wantPrefix {
		t.Fatalf("record of %s = %+v, want datastore %s, size %d, prefix %s", h[:8], rec, name, len(body), wantPrefix[:8])
	}
}

func checkResult(t *testing.T, res storage.IngestResult, body []byte, existed bool, datastore string) {
	t.Helper()
	if res.SHA256 != hexSum(body) || res.Size != int64(len(body)) || res.Existed != existed || res.Datastore != datastore ||
		res.PrefixSHA256 != hexSum(body[:min(len(body), storage.PrefixSize)]) {
		t.Fatalf("IngestTo result = %+v, want sha256 %s, size %d, existed %v, datastore %s",
			res, hexSum(body)[:8], len(body), existed, datastore)
	}
}

func TestIngestToSameStoreDedup(t *testing.T) {
	forEachMulti(t, func(t *testing.T, fx *multiFixture) {
		body := randomBytes(10, storage.PrefixSize+70_000)
		checkResult(t, fx.ingest(t, storage.KindLocal, body, true), body, false, "a")
		fx.check(t, "a", body)
		// Thumbnails are accepted by no datastore and fall back to local.
		res := fx.ingest(t, storage.KindThumbnails, body, true)
		checkResult(t, res, body, true, "a")
		puts := fx.stores["a"].puts
		if len(puts) != 2 || puts[1].Candidate != hexSum(body) {
			t.Fatalf("Puts into a: %+v, want the second with the stored blob as candidate", puts)
		}
		if blobs, temps := fx.files(t, "a"); blobs != 1 || temps != 0 {
			t.Errorf("a holds %d blobs and %d temp files, want 1 and 0", blobs, temps)
		}
		if blobs, _ := fx.files(t, "b"); blobs != 0 || len(fx.stores["b"].puts) != 0 {
			t.Errorf("b got %d Puts and holds %d blobs, want none", len(fx.stores["b"].puts), blobs)
		}
	})
}

func TestIngestToCrossStoreIdentical(t *testing.T) {
	for _, size := range []int{0, 1, 1000, storage.PrefixSize, 3*storage.PrefixSize + 17} {
		t.Run(fmt.Sprintf("size=%d", size), func(t *testing.T) {
			forEachMulti(t, func(t *testing.T, fx *multiFixture) {
				body := randomBytes(11, size)
				fx.ingest(t, storage.KindLocal, body, true)
				res := fx.ingest(t, storage.KindRemote, body, true)
				checkResult(t, res, body, true, "a")
				fx.check(t, "a", body)
				// Nothing was written to b, not even a temp file.
				if len(fx.stores["b"].puts) != 0 {
					t.Errorf("%d Puts into b, want none", len(fx.stores["b"].puts))
				}
				if _, err := fx.stores["b"].Stat(context.Background(), hexSum(body)); !errors.Is(err, storage.ErrNotFound) {
					t.Errorf("Stat in b = %v, want ErrNotFound", err)
				}
				if blobs, temps := fx.files(t, "b"); blobs != 0 || temps != 0 {
					t.Errorf("b holds %d blobs and %d temp files, want none", blobs, temps)
				}
			})
		})
	}
}

func TestIngestToCrossStoreDiverging(t *testing.T) {
	const size = 3*storage.PrefixSize + 1000
	tests := []struct {
		name string
		size int
		at   int
		// force makes the stored blob the candidate although its prefix
		// differs (the lookup alone finds it only when the bodies share the
		// prefix).
		force bool
	}{
		{"first byte", size, 0, true},
		{"inside the prefix", size, 1000, true},
		{"first byte after the prefix", size, storage.PrefixSize, false},
		{"middle", size, size / 2, false},
		{"chunk boundary", size, 2 * storage.PrefixSize, false},
		{"last byte of a chunk", size, 2*storage.PrefixSize - 1, false},
		{"last byte", size, size - 1, false},
		{"small body, last byte", 100, 99, true},
		{"one byte body", 1, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			forEachMulti(t, func(t *testing.T, fx *multiFixture) {
				stored := randomBytes(12, tt.size)
				fx.ingest(t, storage.KindLocal, stored, true)
				rec, err := fx.meta.GetBlob(context.Background(), hexSum(stored))
				if err != nil {
					t.Fatal(err)
				}
				if tt.force {
					fx.meta.cand = &rec
				}
				other := bytes.Clone(stored)
				other[tt.at] ^= 0x5a

				res := fx.ingest(t, storage.KindRemote, other, true)
				checkResult(t, res, other, false, "b")
				fx.check(t, "b", other)
				fx.check(t, "a", stored)
				if puts := fx.stores["b"].puts; len(puts) != 1 || puts[0].Candidate != "" {
					t.Errorf("Puts into b: %+v, want one without candidate", puts)
				}
				if blobs, temps := fx.files(t, "b"); blobs != 1 || temps != 0 {
					t.Errorf("b holds %d blobs and %d temp files, want 1 and 0", blobs, temps)
				}
				if blobs, _ := fx.files(t, "a"); blobs != 1 {
					t.Errorf("a holds %d blobs, want 1", blobs)
				}
			})
		})
	}
}

func TestIngestToCrossStoreLengthErrors(t *testing.T) {
	forEachMulti(t, func(t *testing.T, fx *multiFixture) {
		stored := randomBytes(13, storage.PrefixSize+5000)
		fx.ingest(t, storage.KindLocal, stored, true)
		// Announced with the stored length, but the body is a prefix of the
		// stored blob, or continues past it.
		for _, body := range [][]byte{stored[:len(stored)-10], append(bytes.Clone(stored), 1, 2, 3)} {
			_, err := storage.IngestTo(context.Background(), fx.ds, fx.meta, storage.KindRemote, bytes.NewReader(body),
				storage.PutOptions{ExpectedSize: int64(len(stored))})
			if !errors.Is(err, storage.ErrSizeMismatch) {
				t.Errorf("IngestTo of %d bytes announced as %d: %v, want ErrSizeMismatch", len(body), len(stored), err)
			}
		}
		if blobs, temps := fx.files(t, "b"); blobs != 0 || temps != 0 {
			t.Errorf("b holds %d blobs and %d temp files after failed uploads, want none", blobs, temps)
		}
	})
}

func TestIngestToCorruptCandidateNotTrusted(t *testing.T) {
	forEachMulti(t, func(t *testing.T, fx *multiFixture) {
		stored := randomBytes(14, storage.PrefixSize+5000)
		fx.ingest(t, storage.KindLocal, stored, true)
		// The file of the stored blob rots into other bytes with the same
		// prefix; the same bytes are then uploaded. They match the file to
		// the end but not the blob's address, so they must be stored anew.
		rotten := bytes.Clone(stored)
		rotten[len(rotten)-1] ^= 1
		if err := os.WriteFile(fx.blobPath("a", hexSum(stored)), rotten, 0o600); err != nil {
			t.Fatal(err)
		}
		res := fx.ingest(t, storage.KindRemote, rotten, true)
		checkResult(t, res, rotten, false, "b")
		fx.check(t, "b", rotten)
	})
}

// changingStore serves, from the second Open on, the blob's bytes with one
// byte flipped, as if the file changed between the comparison and the copy.
type changingStore struct {
	storage.BlobStore
	opens int
}

func (c *changingStore) Open(ctx context.Context, h string) (storage.Blob, error) {
	c.opens++
	b, err := c.BlobStore.Open(ctx, h)
	if err != nil || c.opens == 1 {
		return b, err
	}
	data, err := io.ReadAll(b.Content)
	b.Content.Close()
	if err != nil {
		return storage.Blob{}, err
	}
	data[0] ^= 1
	return storage.Blob{Content: nopCloser{bytes.NewReader(data)}, Size: int64(len(data))}, nil
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

func TestIngestToCandidateChangedWhileCopying(t *testing.T) {
	forEachMulti(t, func(t *testing.T, fx *multiFixture) {
		stored := randomBytes(15, storage.PrefixSize+5000)
		fx.ingest(t, storage.KindLocal, stored, true)
		changing := &changingStore{BlobStore: fx.stores["a"]}
		ds, err := storage.NewDatastores(
			storage.Datastore{Name: "a", Store: changing, Kinds: []storage.Kind{storage.KindLocal}},
			storage.Datastore{Name: "b", Store: fx.stores["b"], Kinds: []storage.Kind{storage.KindRemote}},
		)
		if err != nil {
			t.Fatal(err)
		}
		other := bytes.Clone(stored)
		other[len(other)-1] ^= 1
		_, err = storage.IngestTo(context.Background(), ds, fx.meta, storage.KindRemote, bytes.NewReader(other),
			storage.PutOptions{ExpectedSize: int64(len(other))})
		if err == nil || !strings.Contains(err.Error(), "changed") {
			t.Fatalf("IngestTo with a candidate changing under it: %v, want an error", err)
		}
		if blobs, temps := fx.files(t, "b"); blobs != 0 || temps != 0 {
			t.Errorf("b holds %d blobs and %d temp files, want none", blobs, temps)
		}
		if _, err := fx.meta.GetBlob(context.Background(), hexSum(other)); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("GetBlob of the failed upload = %v, want ErrNotFound", err)
		}
	})
}

func TestIngestToRecordedElsewhereAfterPut(t *testing.T) {
	forEachMulti(t, func(t *testing.T, fx *multiFixture) {
		ctx := context.Background()
		body := randomBytes(16, 200_000)
		fx.ingest(t, storage.KindLocal, body, true)

		// Unknown length: no lookup, so the bytes are written to b, found
		// recorded in a, and the new copy is dropped.
		res := fx.ingest(t, storage.KindRemote, body, false)
		checkResult(t, res, body, true, "a")
		fx.check(t, "a", body)
		if blobs, temps := fx.files(t, "b"); blobs != 0 || temps != 0 {
			t.Errorf("b holds %d blobs and %d temp files, want the copy dropped", blobs, temps)
		}

		// A copy that b already held (say from an interrupted migration) is
		// not the upload's to delete.
		if _, err := fx.stores["b"].Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1}); err != nil {
			t.Fatal(err)
		}
		res = fx.ingest(t, storage.KindRemote, body, false)
		checkResult(t, res, body, true, "a")
		if _, err := fx.stores["b"].Stat(ctx, hexSum(body)); err != nil {
			t.Errorf("b's earlier copy was deleted: %v", err)
		}
		fx.check(t, "a", body)
	})
}

func TestIngestToUnknownCandidateDatastore(t *testing.T) {
	forEachMulti(t, func(t *testing.T, fx *multiFixture) {
		body := randomBytes(17, 5000)
		// A candidate recorded in a datastore that is not configured is
		// ignored: the body is stored in the kind's datastore.
		fx.meta.cand = &storage.BlobRecord{SHA256: hexSum([]byte("x")), Size: 5000, Datastore: "gone"}
		res := fx.ingest(t, storage.KindRemote, body, true)
		checkResult(t, res, body, false, "b")
		fx.check(t, "b", body)
	})
}

// TestIngestToExpectedSHA256 ingests bodies that do not hash to the
// expected SHA-256 along every path of IngestTo (a new body; a duplicate in
// the kind's datastore; a duplicate in another datastore, compared there; a
// body diverging from such a duplicate): each fails with ErrHashMismatch,
// and no blob or record is added. A body that matches is stored as usual.
func TestIngestToExpectedSHA256(t *testing.T) {
	stored := randomBytes(40, 3*storage.PrefixSize+1000)
	diverging := bytes.Clone(stored)
	diverging[2*storage.PrefixSize] ^= 0xff
	fresh := randomBytes(41, 5000)
	wrong := hexSum([]byte("something else"))
	tests := []struct {
		name string
		kind storage.Kind
		body []byte
	}{
		{"new body", storage.KindLocal, fresh},
		{"duplicate in the kind's datastore", storage.KindLocal, stored},
		{"duplicate in another datastore", storage.KindRemote, stored},
		{"diverging from a duplicate in another datastore", storage.KindRemote, diverging},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			forEachMulti(t, func(t *testing.T, fx *multiFixture) {
				ctx := context.Background()
				fx.ingest(t, storage.KindLocal, stored, true)
				for _, known := range []bool{true, false} {
					opts := storage.PutOptions{ExpectedSize: -1, ExpectedSHA256: wrong}
					if known {
						opts.ExpectedSize = int64(len(tt.body))
					}
					_, err := storage.IngestTo(ctx, fx.ds, fx.meta, tt.kind, bytes.NewReader(tt.body), opts)
					if !errors.Is(err, storage.ErrHashMismatch) {
						t.Fatalf("IngestTo (known length %v) error = %v, want ErrHashMismatch", known, err)
					}
				}
				for _, name := range []string{"a", "b"} {
					want := 0
					if name == "a" {
						want = 1
					}
					if blobs, temps := fx.files(t, name); blobs != want || temps != 0 {
						t.Errorf("%s holds %d blobs and %d temp files, want %d and 0", name, blobs, temps, want)
					}
				}
				if h := hexSum(tt.body); h != hexSum(stored) {
					if _, err := fx.meta.GetBlob(ctx, h); !errors.Is(err, storage.ErrNotFound) {
						t.Errorf("GetBlob of the refused body = %v, want ErrNotFound", err)
					}
				}
				fx.check(t, "a", stored)

				opts := storage.PutOptions{ExpectedSize: int64(len(tt.body)), ExpectedSHA256: hexSum(tt.body)}
				res, err := storage.IngestTo(ctx, fx.ds, fx.meta, tt.kind, bytes.NewReader(tt.body), opts)
				if err != nil || res.SHA256 != hexSum(tt.body) {
					t.Fatalf("IngestTo with the right hash = %+v, %v", res, err)
				}
			})
		})
	}
}
