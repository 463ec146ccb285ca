package sqlstore

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// fillRemote inserts n ready remote media rows (spread over 50 server names,
// created at t ms, never accessed) and one local row per 10, all sharing one
// blob, with one thumbnail per 4 remote rows.
func fillRemote(tb testing.TB, s *Store, n int) {
	tb.Helper()
	ctx := context.Background()
	sha := strings.Repeat("ab", 32)
	if _, err := s.RecordBlob(ctx, storage.BlobRecord{SHA256: sha, Size: 1000, PrefixSHA256: sha, Datastore: "d", CreatedAt: time.UnixMilli(1)}); err != nil {
		tb.Fatal(err)
	}
	remote := "TRUE"
	if s.dialect == dialectSQLite {
		remote = "1"
	}
	stmts := []string{
		fmt.Sprintf(`INSERT INTO media (server_name, media_id, state, sha256, size, created_ts, remote)
			SELECT 'srv' || (i %% 50) || '.example', 'm' || i, 'ready', '%s', 1000 + i, 1000 + i, %s
			FROM generate_series(1, %d) AS g(i)`, sha, remote, n),
		fmt.Sprintf(`INSERT INTO media (server_name, media_id, state, user_id, sha256, size, created_ts)
			SELECT 'local.example', 'l' || i, 'ready', '@u' || (i %% 100) || ':local.example', '%s', 1000, 1000 + i
			FROM generate_series(1, %d) AS g(i)`, sha, n/10),
		fmt.Sprintf(`INSERT INTO thumbnails (server_name, media_id, width, height, method, animated, format, content_type, sha256, size, actual_width, actual_height, created_ts)
			SELECT 'srv' || (i %% 50) || '.example', 'm' || i, 32, 32, 'crop', FALSE, '', 'image/jpeg', '%s', 10, 32, 32, 1
			FROM generate_series(1, %d, 4) AS g(i)`, sha, n),
		`ANALYZE`,
	}
	for _, q := range stmts {
		if _, err := s.write.ExecContext(ctx, q); err != nil {
			tb.Fatalf("%s: %v", q, err)
		}
	}
}

// BenchmarkPurgeRemote measures purging a remote media cache of 100,000
// rows on PostgreSQL as the admin API does it: pages of ListOldMedia, each
// deleted with DeleteMedia, resuming after the last item of the page.
func BenchmarkPurgeRemote(b *testing.B) {
	const rows = 100_000
	ctx := context.Background()
	for b.Loop() {
		b.StopTimer()
		s := mustOpen(b, "postgres", backends[1].newDB(b))
		fillRemote(b, s, rows)
		b.StartTimer()
		start := time.Now()
		purged := 0
		q := storage.OldMediaQuery{Remote: true, Before: time.UnixMilli(1 << 50), SizeGreaterThan: -1, Limit: 500}
		for {
			page, err := s.ListOldMedia(ctx, q)
			if err != nil {
				b.Fatal(err)
			}
			if len(page) == 0 {
				break
			}
			refs := make([]storage.MediaRef, len(page))
			for i, m := range page {
				refs[i] = storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID}
			}
			del, err := s.DeleteMedia(ctx, refs, false, time.Now())
			if err != nil {
				b.Fatal(err)
			}
			purged += len(del.Media)
			q.After = refs[len(refs)-1]
		}
		if purged != rows {
			b.Fatalf("purged %d rows, want %d", purged, rows)
		}
		b.ReportMetric(float64(purged)/time.Since(start).Seconds(), "items/s")
		b.StopTimer()
		s.Close()
		b.StartTimer()
	}
}
