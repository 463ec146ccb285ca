package storage_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// BenchmarkRemoveMedia measures RemoveMedia as a remote cache purge uses it
// (batches of 500, no tombstones) on PostgreSQL and a file datastore, with
// one distinct 1 KiB blob per media item, so that every item costs a row
// deletion and a blob deletion (record and bytes). It reports items/s.
func BenchmarkRemoveMedia(b *testing.B) {
	const (
		rows  = 2000
		batch = 500
	)
	ctx := context.Background()
	cached := time.Now().Add(-48 * time.Hour)
	for b.Loop() {
		b.StopTimer()
		meta, err := sqlstore.OpenPostgres(ctx, testpg.DSN(b))
		if err != nil {
			b.Fatal(err)
		}
		blobs, err := filestore.New(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		ds, err := storage.NewDatastores(storage.Datastore{Name: "d", Store: blobs, Kinds: []storage.Kind{storage.KindLocal}})
		if err != nil {
			b.Fatal(err)
		}
		refs := seedRemote(b, meta, blobs, rows, cached)
		b.StartTimer()
		start := time.Now()
		for chunk := range slices.Chunk(refs, batch) {
			rm, err := storage.RemoveMedia(ctx, meta, ds, chunk, storage.RemoveOptions{Grace: time.Hour})
			if err != nil {
				b.Fatal(err)
			}
			if len(rm.Media) != len(chunk) || rm.Blobs != len(chunk) {
				b.Fatalf("RemoveMedia = %d rows, %d blobs; want %d of each", len(rm.Media), rm.Blobs, len(chunk))
			}
		}
		b.ReportMetric(float64(rows)/time.Since(start).Seconds(), "items/s")
		b.StopTimer()
		meta.Close()
		b.StartTimer()
	}
}

// seedRemote stores n remote media items with one distinct blob each, cached
// (and their blobs claimed) at cached.
func seedRemote(tb testing.TB, meta *sqlstore.Store, blobs storage.BlobStore, n int, cached time.Time) []storage.MediaRef {
	tb.Helper()
	ctx := context.Background()
	refs := make([]storage.MediaRef, n)
	body := make([]byte, 1024)
	for i := range n {
		binary.BigEndian.PutUint64(body, uint64(i))
		res, err := blobs.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
		if err != nil {
			tb.Fatal(err)
		}
		if _, err := meta.RecordBlob(ctx, storage.BlobRecord{SHA256: res.SHA256, Size: res.Size, PrefixSHA256: res.PrefixSHA256, Datastore: "d", CreatedAt: cached}); err != nil {
			tb.Fatal(err)
		}
		refs[i] = storage.MediaRef{ServerName: "remote.example", MediaID: fmt.Sprintf("m%06d", i)}
		if err := meta.InsertMedia(ctx, storage.Media{ServerName: refs[i].ServerName, MediaID: refs[i].MediaID, State: storage.StateReady,
			SHA256: res.SHA256, Size: res.Size, CreatedAt: cached, UploadedAt: cached, Remote: true}); err != nil {
			tb.Fatal(err)
		}
	}
	return refs
}
