package sqlstore

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// TestBackgroundCheckpoint: the writer only checkpoints as a backstop, and
// the background checkpointer keeps the WAL from growing: after batches of
// commits with pauses longer than the checkpoint interval, the WAL file
// holds about one batch, not all of them (it restarts from its beginning
// once fully checkpointed).
func TestBackgroundCheckpoint(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "meta.db")
	s := mustOpen(t, "sqlite", path)
	defer s.Close()

	var auto int
	if err := s.write.QueryRowContext(ctx, "PRAGMA wal_autocheckpoint").Scan(&auto); err != nil || auto != walBackstopPages {
		t.Fatalf("writer's wal_autocheckpoint = %d, %v; want %d", auto, err, walBackstopPages)
	}

	const batches, perBatch = 12, 100
	var first, maxWAL int64
	for b := range batches {
		for i := range perBatch {
			seed := fmt.Sprintf("blob %d/%d", b, i)
			if _, err := s.RecordBlob(ctx, storage.BlobRecord{SHA256: hexHash(seed), Size: 1, PrefixSHA256: hexHash("p " + seed), Datastore: "f"}); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(3 * checkpointInterval)
		fi, err := os.Stat(path + "-wal")
		if err != nil {
			t.Fatal(err)
		}
		if b == 0 {
			first = fi.Size()
		}
		maxWAL = max(maxWAL, fi.Size())
	}
	// Without checkpoints the WAL would hold the frames of every batch:
	// batches times the first.
	if limit := 3 * first; maxWAL > limit {
		t.Fatalf("WAL grew to %d bytes (limit %d): the background checkpointer did not keep up", maxWAL, limit)
	}
	frames, done, err := s.ckpt.checkpoint(ctx)
	if err != nil || frames != done {
		t.Fatalf("checkpoint = %d frames, %d checkpointed, %v", frames, done, err)
	}
}

// TestCheckpointerStops: Close stops the checkpointer and closes its
// connection; a second store on the same file keeps working meanwhile.
func TestCheckpointerStops(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meta.db")
	a := mustOpen(t, "sqlite", path)
	b := mustOpen(t, "sqlite", path)
	defer b.Close()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.ckpt.done:
	default:
		t.Fatal("checkpointer still running after Close")
	}
	if err := a.ckpt.db.PingContext(context.Background()); err == nil {
		t.Fatal("checkpoint connection still open after Close")
	}
	if _, err := b.RecordBlob(context.Background(), storage.BlobRecord{SHA256: hexHash("x"), Size: 1, PrefixSHA256: hexHash("px"), Datastore: "f"}); err != nil {
		t.Fatal(err)
	}
}

// TestSQLiteSynchronous: the writer runs synchronous=NORMAL by default and
// FULL with Options.SQLiteFullSync; the setting survives a reconnect of the
// writer (it is part of the DSN, not a one-off PRAGMA).
func TestSQLiteSynchronous(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		opts Options
		want int // SQLite's numbering: 1 NORMAL, 2 FULL
	}{
		{"default", Options{}, 1},
		{"full", Options{SQLiteFullSync: true}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := OpenWith(ctx, "sqlite", filepath.Join(t.TempDir(), "meta.db"), tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			for round := range 2 {
				var got int
				if err := s.write.QueryRowContext(ctx, "PRAGMA synchronous").Scan(&got); err != nil {
					t.Fatal(err)
				}
				if got != tc.want {
					t.Fatalf("round %d: writer's synchronous = %d, want %d", round, got, tc.want)
				}
				// A fresh connection must come up with the same setting.
				s.write.SetMaxIdleConns(0)
				s.write.SetMaxIdleConns(1)
			}
		})
	}
}
