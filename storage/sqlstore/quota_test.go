package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/metatest"
)

// TestQuotaInstances races quota-limited uploads through two stores opened
// on the same database (two Caddy instances sharing it).
func TestQuotaInstances(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			dsn := be.newDB(t)
			metatest.RunQuotaInstances(t, func(t *testing.T) storage.MetadataStore { return mustOpen(t, be.name, dsn) })
		})
	}
}

// TestRecountRepairs corrupts the counters with raw SQL and checks that
// RecountUsage finds and repairs exactly the corrupted ones.
func TestRecountRepairs(t *testing.T) {
	ctx := context.Background()
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			s := mustOpen(t, be.name, be.newDB(t))
			defer s.Close()
			blob := recordBlob(t, s, 10)
			users := []string{"@a:x", "@b:x", "@c:x", "@d:x"}
			for i, u := range users {
				for j := range i + 1 {
					m := storage.Media{ServerName: "x", MediaID: fmt.Sprintf("m%d-%d", i, j), UserID: u, SHA256: blob.SHA256, Size: 10}
					if err := s.InsertMedia(ctx, m); err != nil {
						t.Fatal(err)
					}
				}
			}
			want := map[string]storage.UserUsage{}
			for i, u := range users {
				want[u] = storage.UserUsage{UserID: u, Bytes: int64(10 * (i + 1)), Files: int64(i + 1)}
			}
			check := func(stage string) {
				t.Helper()
				for u, w := range want {
					got, err := s.UserUsage(ctx, u)
					if err != nil || got != w {
						t.Fatalf("%s: UserUsage(%s) = %+v, %v; want %+v", stage, u, got, err, w)
					}
				}
				got, err := s.UserUsage(ctx, "@ghost:x")
				if err != nil || got.Bytes != 0 || got.Files != 0 {
					t.Fatalf("%s: UserUsage(ghost) = %+v, %v", stage, got, err)
				}
			}
			check("before corruption")

			exec := func(q string) {
				t.Helper()
				if _, err := s.write.ExecContext(ctx, q); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			exec(`UPDATE user_usage SET bytes = 999 WHERE user_id = '@a:x'`)                 // wrong bytes
			exec(`UPDATE user_usage SET files = -5 WHERE user_id = '@b:x'`)                  // wrong files
			exec(`DELETE FROM user_usage WHERE user_id = '@c:x'`)                            // lost row
			exec(`INSERT INTO user_usage (user_id, bytes, files) VALUES ('@ghost:x', 7, 7)`) // row of no media
			// @d:x stays right.

			n, err := s.RecountUsage(ctx, "@a:x")
			if err != nil || n != 1 {
				t.Fatalf("RecountUsage(@a:x) = %d, %v; want 1", n, err)
			}
			if got, _ := s.UserUsage(ctx, "@a:x"); got != want["@a:x"] {
				t.Fatalf("after RecountUsage(@a:x): %+v", got)
			}
			if got, _ := s.UserUsage(ctx, "@b:x"); got.Files != -5 {
				t.Fatalf("RecountUsage(@a:x) touched @b:x: %+v", got)
			}
			n, err = s.RecountUsage(ctx, "@d:x")
			if err != nil || n != 0 {
				t.Fatalf("RecountUsage(@d:x) = %d, %v; want 0", n, err)
			}
			n, err = s.RecountUsage(ctx, "")
			if err != nil || n != 3 {
				t.Fatalf("RecountUsage(all) = %d, %v; want 3 (@b, @c, @ghost)", n, err)
			}
			check("after RecountUsage")
			var rows int
			if err := s.write.QueryRowContext(ctx, `SELECT COUNT(*) FROM user_usage`).Scan(&rows); err != nil || rows != len(users) {
				t.Fatalf("user_usage holds %d rows, %v; want %d (the ghost's removed)", rows, err, len(users))
			}
			n, err = s.RecountUsage(ctx, "")
			if err != nil || n != 0 {
				t.Fatalf("RecountUsage(all) again = %d, %v; want 0", n, err)
			}
		})
	}
}

// TestUpgradeTo6 migrates a database holding media at version 5: the usage
// counters and the upload history (migration 7) start from the counted
// rows, and the rolling-window queries use their indexes.
func TestUpgradeTo6(t *testing.T) {
	ctx := context.Background()
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			dsn, db := databaseAtVersion(t, be, 5)
			remote := "1"
			if be.name == "postgres" {
				remote = "TRUE"
			}
			sha := strings.Repeat("ab", 32)
			for _, q := range []string{
				`INSERT INTO blobs (sha256, size, prefix_sha256, datastore, created_ts) VALUES ('` + sha + `', 3, 'p', 'files', 1000)`,
				// Two rows of one blob count twice.
				`INSERT INTO media (server_name, media_id, state, user_id, sha256, size, created_ts, uploaded_ts)
					VALUES ('example.org', 'a1', 'ready', '@a:example.org', '` + sha + `', 3, 1000, 1000)`,
				`INSERT INTO media (server_name, media_id, state, user_id, sha256, size, created_ts, uploaded_ts)
					VALUES ('example.org', 'a2', 'ready', '@a:example.org', '` + sha + `', 5, 1000, 2000)`,
				`INSERT INTO media (server_name, media_id, state, user_id, sha256, size, created_ts)
					VALUES ('other.example', 'b1', 'ready', '@b:other.example', '` + sha + `', 7, 3000)`,
				// Not counted: remote, pending, no user.
				`INSERT INTO media (server_name, media_id, state, user_id, sha256, size, created_ts, remote)
					VALUES ('remote.example', 'r1', 'ready', '@a:example.org', '` + sha + `', 100, 1000, ` + remote + `)`,
				`INSERT INTO media (server_name, media_id, state, user_id, created_ts, expires_ts)
					VALUES ('example.org', 'p1', 'pending', '@a:example.org', 1000, 99999999999999)`,
				`INSERT INTO media (server_name, media_id, state, sha256, size, created_ts)
					VALUES ('example.org', 'n1', 'ready', '` + sha + `', 100, 1000)`,
			} {
				if _, err := db.ExecContext(ctx, q); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			db.Close()

			s := mustOpen(t, be.name, dsn)
			defer s.Close()
			checkMigrationRows(t, migrationRows(t, s))
			for _, want := range []storage.UserUsage{
				{UserID: "@a:example.org", Bytes: 8, Files: 2},
				{UserID: "@b:other.example", Bytes: 7, Files: 1},
				{UserID: "", Bytes: 0, Files: 0},
			} {
				got, err := s.UserUsage(ctx, want.UserID)
				if err != nil || got != want {
					t.Fatalf("UserUsage(%q) after upgrade = %+v, %v; want %+v", want.UserID, got, err, want)
				}
			}
			if n, err := s.RecountUsage(ctx, ""); err != nil || n != 0 {
				t.Fatalf("RecountUsage after upgrade = %d, %v; want 0", n, err)
			}
			bytes, files, err := s.UploadedSince(ctx, "@a:example.org", time.UnixMilli(2000))
			if err != nil || bytes != 5 || files != 1 {
				t.Fatalf("UploadedSince after upgrade = %d, %d, %v; want 5, 1", bytes, files, err)
			}
			// Migration 7 starts the upload history from the same rows.
			var history []string
			rows, err := s.write.QueryContext(ctx, `SELECT user_id, minute, bytes, files FROM user_upload_minutes ORDER BY user_id, minute`)
			if err != nil {
				t.Fatal(err)
			}
			for rows.Next() {
				var (
					u               string
					m, bytes, files int64
				)
				if err := rows.Scan(&u, &m, &bytes, &files); err != nil {
					t.Fatal(err)
				}
				history = append(history, fmt.Sprintf("%s/%d/%d/%d", u, m, bytes, files))
			}
			rows.Close()
			if got, want := strings.Join(history, " "), "@a:example.org/0/8/2 @b:other.example/0/7/1"; got != want {
				t.Fatalf("upload history after upgrade = %s; want %s", got, want)
			}
			// The window sums read the history by its primary key, and the
			// edge of a window the media rows by media_user_uploaded (on
			// PostgreSQL once sequential scans are off, which proves that
			// the index's predicate matches the query's).
			sums := s.q.windowQueries[2]
			if be.name == "postgres" {
				// A user's minutes are far fewer than everyone's recent
				// ones; let the planner know the table.
				for i := range 2000 {
					if _, err := s.write.ExecContext(ctx, `INSERT INTO user_upload_minutes (user_id, minute, bytes, files) VALUES ($1, $2, 1, 1)`,
						fmt.Sprintf("@u%d:example.org", i%50), int64(i)); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := s.write.ExecContext(ctx, `ANALYZE user_upload_minutes`); err != nil {
					t.Fatal(err)
				}
			}
			if plan := queryPlan(t, s, sums, int64(1), int64(1), int64(2), int64(2), int64(3), int64(3), int64(4), int64(4), "@a:example.org", int64(1)); !strings.Contains(plan, "user_upload_minutes_pkey") && !strings.Contains(plan, "PRIMARY KEY") {
				t.Fatalf("the rolling-window query does not use the history's primary key:\n%s", plan)
			}
			if plan := queryPlan(t, s, s.q.uploadedBetween, "@a:example.org", int64(1), int64(60000)); !strings.Contains(plan, "media_user_uploaded") {
				t.Fatalf("the window edge query does not use media_user_uploaded:\n%s", plan)
			}
		})
	}
}

// queryPlan returns the query plan of query with args.
func queryPlan(t *testing.T, s *Store, query string, args ...any) string {
	t.Helper()
	ctx := context.Background()
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback() }()
	explain := "EXPLAIN QUERY PLAN "
	if s.dialect == dialectPostgres {
		explain = "EXPLAIN "
		if _, err := tx.ExecContext(ctx, `SET LOCAL enable_seqscan = off`); err != nil {
			t.Fatal(err)
		}
	}
	rows, err := tx.QueryContext(ctx, explain+query, args...)
	if err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	defer rows.Close()
	cols, _ := rows.Columns()
	var b strings.Builder
	for rows.Next() {
		vals := make([]any, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintln(&b, vals...)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestQuotaQueriesRebound(t *testing.T) {
	q := newQueries(dialectPostgres)
	for _, s := range []string{q.addUsage, q.subtractUsage, q.lockUsage, q.setUsage, q.deleteUsage,
		q.getUsage, q.uploadedBetween, q.topUsage, q.addMinute, q.subtractMinute, q.pruneMinutes} {
		if strings.Contains(s, "?") || !strings.Contains(s, "$1") {
			t.Errorf("postgres query not rebound: %s", s)
		}
	}
	for _, w := range []string{q.windowQueries[3], q.usageWindowQueries[4], windowQuery(dialectPostgres, 6, true)} {
		if strings.Contains(w, "?") || !strings.Contains(w, "$12") {
			t.Errorf("postgres window query not rebound: %s", w)
		}
	}
}

// BenchmarkInsertMediaLimited compares InsertMedia (and an insert that
// counts for nobody, the cost before usage counters) with InsertMediaLimited
// under a limit of stored bytes and files and two rolling windows, for one
// user who already has 1000 items (half of them within the shorter
// window); the items inserted are older than both windows, so that every
// insertion sees the same windows. With limits far above what the user
// stores the windows are not summed at all; WindowsSummed has window limits
// the user could reach, so every insertion sums them (one entry per minute
// with uploads: 500 and 1000).
func BenchmarkInsertMediaLimited(b *testing.B) {
	ctx := context.Background()
	for _, be := range backends {
		b.Run(be.name, func(b *testing.B) {
			s := mustOpen(b, be.name, be.newDB(b))
			defer s.Close()
			blob := recordBlob(b, s, 12345)
			now := time.Now()
			const user = "@alice:example.org"
			for i := range 1000 {
				at := now.Add(-time.Duration(i) * 2 * time.Minute) // 500 within 1000 minutes
				m := storage.Media{ServerName: "example.org", MediaID: fmt.Sprintf("pre%04d", i), UserID: user,
					SHA256: blob.SHA256, Size: blob.Size, ContentType: "image/png", CreatedAt: at, UploadedAt: at}
				if err := s.InsertMedia(ctx, m); err != nil {
					b.Fatal(err)
				}
			}
			lim := storage.UploadLimits{MaxBytes: 1 << 50, MaxFiles: 1 << 40, Windows: []storage.WindowLimit{
				{Window: 1000 * time.Minute, MaxBytes: 1 << 50, MaxFiles: 1 << 40},
				{Window: 7 * 24 * time.Hour, MaxBytes: 1 << 50, MaxFiles: 1 << 40},
			}}
			n := 0
			old := now.Add(-30 * 24 * time.Hour)
			item := func() storage.Media {
				n++
				return storage.Media{ServerName: "example.org", MediaID: fmt.Sprintf("new%d", n), UserID: user,
					SHA256: blob.SHA256, Size: blob.Size, ContentType: "image/png", CreatedAt: old, UploadedAt: old}
			}
			// A row that counts for nobody: one INSERT, as InsertMedia
			// was before usage counters.
			b.Run("InsertMediaUncounted", func(b *testing.B) {
				for b.Loop() {
					m := item()
					m.UserID = ""
					if err := s.InsertMedia(ctx, m); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("InsertMedia", func(b *testing.B) {
				for b.Loop() {
					if err := s.InsertMedia(ctx, item()); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("InsertMediaLimited", func(b *testing.B) {
				for b.Loop() {
					if err := s.InsertMediaLimited(ctx, item(), lim); err != nil {
						b.Fatal(err)
					}
				}
			})
			// Window limits below what the user stores (but above what the
			// windows hold): every insertion sums the windows' history.
			summed := lim
			summed.Windows = []storage.WindowLimit{{Window: 1000 * time.Minute, MaxFiles: 600}, {Window: 7 * 24 * time.Hour, MaxFiles: 1001}}
			b.Run("InsertMediaLimitedWindowsSummed", func(b *testing.B) {
				for b.Loop() {
					if err := s.InsertMediaLimited(ctx, item(), summed); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("CheckUpload", func(b *testing.B) {
				for b.Loop() {
					if _, err := s.CheckUpload(ctx, user, summed, blob.Size, 0); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// TestRecountRepairsHistory corrupts the upload history of recent uploads
// and checks that RecountUsage reports and repairs it, and that the
// windows decide right again.
func TestRecountRepairsHistory(t *testing.T) {
	ctx := context.Background()
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			s := mustOpen(t, be.name, be.newDB(t))
			defer s.Close()
			blob := recordBlob(t, s, 10)
			now := time.Now()
			for i, u := range []string{"@a:x", "@a:x", "@b:x"} {
				at := now.Add(-time.Duration(i) * 2 * time.Minute)
				m := storage.Media{ServerName: "x", MediaID: fmt.Sprintf("m%d", i), UserID: u, SHA256: blob.SHA256, Size: 10, CreatedAt: at, UploadedAt: at}
				if err := s.InsertMedia(ctx, m); err != nil {
					t.Fatal(err)
				}
			}
			hour := storage.UploadLimits{Windows: []storage.WindowLimit{{Window: time.Hour, MaxFiles: 3}}}
			check := func(stage string) {
				t.Helper()
				b, f, err := s.UploadedSince(ctx, "@a:x", now.Add(-time.Hour))
				if err != nil || b != 20 || f != 2 {
					t.Fatalf("%s: UploadedSince(@a:x) = %d, %d, %v; want 20, 2", stage, b, f, err)
				}
				if _, err := s.CheckUpload(ctx, "@a:x", hour, 10, 0); err != nil {
					t.Fatalf("%s: CheckUpload(@a:x) = %v; want room for a third file", stage, err)
				}
			}
			check("before corruption")
			exec := func(q string) {
				t.Helper()
				if _, err := s.write.ExecContext(ctx, s.dialect.rebind(q)); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			exec(`UPDATE user_upload_minutes SET files = files + 5 WHERE user_id = '@a:x'`)
			if _, err := s.CheckUpload(ctx, "@a:x", hour, 10, 0); !errors.Is(err, storage.ErrQuotaExceeded) {
				t.Fatalf("CheckUpload on corrupted history = %v; want a refusal (the corruption is seen)", err)
			}
			exec(`DELETE FROM user_upload_minutes WHERE user_id = '@b:x'`)
			exec(`INSERT INTO user_upload_minutes (user_id, minute, bytes, files) VALUES ('@ghost:x', ` +
				fmt.Sprint(now.UnixMilli()/60000) + `, 1, 1)`)

			if n, err := s.RecountUsage(ctx, "@a:x"); err != nil || n != 1 {
				t.Fatalf("RecountUsage(@a:x) = %d, %v; want 1 (its history)", n, err)
			}
			check("after RecountUsage(@a:x)")
			if n, err := s.RecountUsage(ctx, ""); err != nil || n != 2 {
				t.Fatalf("RecountUsage(all) = %d, %v; want 2 (@b's lost minute, the ghost's)", n, err)
			}
			if b, f, err := s.UploadedSince(ctx, "@b:x", now.Add(-time.Hour)); err != nil || b != 10 || f != 1 {
				t.Fatalf("UploadedSince(@b:x) after recount = %d, %d, %v; want 10, 1", b, f, err)
			}
			if b, f, err := s.UploadedSince(ctx, "@ghost:x", now.Add(-time.Hour)); err != nil || b != 0 || f != 0 {
				t.Fatalf("UploadedSince(@ghost:x) after recount = %d, %d, %v; want nothing", b, f, err)
			}
			if n, err := s.RecountUsage(ctx, ""); err != nil || n != 0 {
				t.Fatalf("RecountUsage(all) again = %d, %v; want 0", n, err)
			}
		})
	}
}

func TestWithoutUnreachableWindows(t *testing.T) {
	stored := storage.UserUsage{Bytes: 100, Files: 4}
	tests := []struct {
		name string
		in   []storage.WindowLimit
		size int64
		want []storage.WindowLimit
	}{
		{"limits above the totals go", []storage.WindowLimit{{Window: time.Hour, MaxBytes: 150, MaxFiles: 5}}, 50,
			[]storage.WindowLimit{{Window: time.Hour}}},
		{"a byte limit the item could reach stays", []storage.WindowLimit{{Window: time.Hour, MaxBytes: 149, MaxFiles: 5}}, 50,
			[]storage.WindowLimit{{Window: time.Hour, MaxBytes: 149}}},
		{"a file limit the item could reach stays", []storage.WindowLimit{{Window: time.Hour, MaxBytes: 1000, MaxFiles: 4}}, 0,
			[]storage.WindowLimit{{Window: time.Hour, MaxFiles: 4}}},
		{"unbounded windows stay unbounded", []storage.WindowLimit{{Window: time.Hour}, {Window: time.Minute, MaxFiles: 2}}, 1,
			[]storage.WindowLimit{{Window: time.Hour}, {Window: time.Minute, MaxFiles: 2}}},
	}
	for _, tt := range tests {
		in := slices.Clone(tt.in)
		got := withoutUnreachableWindows(storage.UploadLimits{Windows: in}, stored, tt.size)
		if !slices.Equal(got.Windows, tt.want) {
			t.Errorf("%s: windows %+v; want %+v", tt.name, got.Windows, tt.want)
		}
		if !slices.Equal(in, tt.in) {
			t.Errorf("%s: the caller's windows were changed: %+v", tt.name, in)
		}
	}
}
