package sqlstore

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/metatest"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// backend opens stores of one dialect: newDB makes a fresh database and
// returns its Open DSN; open opens a store on it.
type backend struct {
	name  string
	newDB func(t testing.TB) string
}

var backends = []backend{
	{"sqlite", func(t testing.TB) string { return filepath.Join(t.TempDir(), "sub", "meta.db") }},
	{"postgres", func(t testing.TB) string { return testpg.DSN(t) }},
}

func mustOpen(t testing.TB, driver, dsn string) *Store {
	t.Helper()
	s, err := Open(context.Background(), driver, dsn)
	if err != nil {
		t.Fatalf("Open(%s): %v", driver, err)
	}
	return s
}

func TestConformance(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			metatest.Run(t, func(t *testing.T) storage.MetadataStore {
				return mustOpen(t, be.name, be.newDB(t))
			})
		})
	}
}

type migrationRow struct {
	version   int
	appliedAt int64
}

func migrationRows(t *testing.T, s *Store) []migrationRow {
	t.Helper()
	rows, err := s.write.QueryContext(context.Background(), `SELECT version, applied_at FROM schema_migrations ORDER BY version`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var out []migrationRow
	for rows.Next() {
		var r migrationRow
		if err := rows.Scan(&r.version, &r.appliedAt); err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func checkMigrationRows(t *testing.T, rows []migrationRow) {
	t.Helper()
	if len(rows) != len(migrations) {
		t.Fatalf("schema_migrations has %d rows, want %d: %v", len(rows), len(migrations), rows)
	}
	for i, r := range rows {
		if r.version != migrations[i].version || r.appliedAt <= 0 {
			t.Fatalf("schema_migrations row %d = %+v, want version %d with a time", i, r, migrations[i].version)
		}
	}
}

func TestReopen(t *testing.T) {
	ctx := context.Background()
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			dsn := be.newDB(t)
			first := mustOpen(t, be.name, dsn)
			before := migrationRows(t, first)
			checkMigrationRows(t, before)
			if err := first.Close(); err != nil {
				t.Fatal(err)
			}

			metatest.RunReopen(t, func(t *testing.T) storage.MetadataStore { return mustOpen(t, be.name, dsn) })

			s := mustOpen(t, be.name, dsn)
			defer s.Close()
			after := migrationRows(t, s)
			if fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatalf("schema_migrations changed on reopen: before %v, after %v", before, after)
			}
			// The data written by RunReopen is still there.
			if _, err := s.GetMedia(ctx, "example.org", "ready1"); err != nil {
				t.Fatalf("GetMedia after reopen: %v", err)
			}
		})
	}
}

func TestConcurrentOpen(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			dsn := be.newDB(t)
			const n = 6
			stores := make([]*Store, n)
			errs := make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() { stores[i], errs[i] = Open(context.Background(), be.name, dsn) })
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("opener %d: %v", i, err)
				} else {
					defer stores[i].Close()
				}
			}
			if t.Failed() {
				return
			}
			checkMigrationRows(t, migrationRows(t, stores[0]))
			// Every handle works on the same data.
			ctx := context.Background()
			b := storage.BlobRecord{SHA256: strings.Repeat("ab", 32), Size: 3, PrefixSHA256: strings.Repeat("cd", 32), Datastore: "d"}
			if _, err := stores[1].RecordBlob(ctx, b); err != nil {
				t.Fatal(err)
			}
			for i, s := range stores {
				if _, err := s.GetBlob(ctx, b.SHA256); err != nil {
					t.Fatalf("store %d: %v", i, err)
				}
			}
		})
	}
}

func TestSchemaTooNew(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			dsn := be.newDB(t)
			s := mustOpen(t, be.name, dsn)
			future := latestVersion() + 1
			if _, err := s.write.Exec(s.dialect.rebind(`INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`), future, 1); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			s2, err := Open(context.Background(), be.name, dsn)
			if err == nil {
				s2.Close()
				t.Fatal("Open succeeded on a database with a newer schema")
			}
			if !errors.Is(err, ErrSchemaTooNew) || !strings.Contains(err.Error(), fmt.Sprintf("version %d", future)) {
				t.Fatalf("Open error = %v, want ErrSchemaTooNew naming version %d", err, future)
			}
		})
	}
}

func TestBlobMustBeRecorded(t *testing.T) {
	ctx := context.Background()
	unknown := strings.Repeat("0f", 32)
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			s := mustOpen(t, be.name, be.newDB(t))
			defer s.Close()
			m := storage.Media{ServerName: "example.org", MediaID: "m", UserID: "@a:example.org", SHA256: unknown, Size: 1, CreatedAt: time.Now()}
			err := s.InsertMedia(ctx, m)
			if err == nil || errors.Is(err, storage.ErrConflict) || errors.Is(err, storage.ErrNotFound) || !strings.Contains(err.Error(), "not recorded") {
				t.Fatalf("InsertMedia with an unrecorded blob: %v, want a 'not recorded' error", err)
			}
			if _, err := s.GetMedia(ctx, "example.org", "m"); !errors.Is(err, storage.ErrNotFound) {
				t.Fatalf("row stored despite the error: %v", err)
			}

			p := storage.Media{ServerName: "example.org", MediaID: "p", UserID: "@a:example.org", CreatedAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)}
			if err := s.CreatePending(ctx, p, 1); err != nil {
				t.Fatal(err)
			}
			p.SHA256, p.Size, p.UploadedAt = unknown, 1, time.Now()
			err = s.CompletePending(ctx, p)
			if err == nil || errors.Is(err, storage.ErrConflict) || errors.Is(err, storage.ErrNotFound) || !strings.Contains(err.Error(), "not recorded") {
				t.Fatalf("CompletePending with an unrecorded blob: %v, want a 'not recorded' error", err)
			}
			got, err := s.GetMedia(ctx, "example.org", "p")
			if err != nil || got.State != storage.StatePending {
				t.Fatalf("pending item after failed completion: %+v, %v", got, err)
			}
		})
	}
}

func TestInvalidInput(t *testing.T) {
	ctx := context.Background()
	s := mustOpen(t, "sqlite", filepath.Join(t.TempDir(), "x.db"))
	defer s.Close()
	sha := strings.Repeat("ab", 32)
	tests := []struct {
		name string
		err  error
	}{
		{"InsertMedia pending", s.InsertMedia(ctx, storage.Media{ServerName: "e", MediaID: "a", State: storage.StatePending, SHA256: sha})},
		{"InsertMedia without blob", s.InsertMedia(ctx, storage.Media{ServerName: "e", MediaID: "b"})},
		{"CreatePending without expiry", s.CreatePending(ctx, storage.Media{ServerName: "e", MediaID: "c", UserID: "@u:e"}, 1)},
		{"CompletePending without blob", s.CompletePending(ctx, storage.Media{ServerName: "e", MediaID: "d", UserID: "@u:e"})},
		{"RecordBlob without hash", second(s.RecordBlob(ctx, storage.BlobRecord{Size: 1}))},
	}
	for _, tt := range tests {
		if tt.err == nil {
			t.Errorf("%s: no error", tt.name)
		}
		if errors.Is(tt.err, storage.ErrConflict) || errors.Is(tt.err, storage.ErrNotFound) {
			t.Errorf("%s: error %v must not look like a store state", tt.name, tt.err)
		}
	}
}

func TestOpenDriver(t *testing.T) {
	if _, err := Open(context.Background(), "mysql", "x"); err == nil || !strings.Contains(err.Error(), "unknown driver") {
		t.Fatalf("Open(mysql) error = %v, want unknown driver", err)
	}
	if _, err := Open(context.Background(), "sqlite", ""); err == nil {
		t.Fatal("Open(sqlite, \"\") succeeded")
	}
}

func TestSQLitePathAndSettings(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "we?ird #dir %20", "nested")
	path := filepath.Join(dir, "meta.db")
	s := mustOpen(t, "sqlite", path)
	defer s.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database not created at %s: %v", path, err)
	}
	entries, _ := os.ReadDir(filepath.Dir(dir))
	if len(entries) != 1 || entries[0].Name() != "nested" {
		t.Fatalf("unexpected files next to the database directory: %v", entries)
	}

	checks := []struct {
		pool  string
		query string
		want  string
	}{
		{"write", "PRAGMA journal_mode", "wal"},
		{"write", "PRAGMA foreign_keys", "1"},
		{"write", "PRAGMA synchronous", "1"}, // NORMAL
		{"write", "PRAGMA busy_timeout", "10000"},
		{"write", "PRAGMA query_only", "0"},
		{"read", "PRAGMA journal_mode", "wal"},
		{"read", "PRAGMA query_only", "1"},
		{"read", "PRAGMA busy_timeout", "10000"},
	}
	for _, c := range checks {
		db := s.write
		if c.pool == "read" {
			db = s.read
		}
		var got string
		if err := db.QueryRowContext(ctx, c.query).Scan(&got); err != nil {
			t.Fatalf("%s %s: %v", c.pool, c.query, err)
		}
		if got != c.want {
			t.Errorf("%s pool: %s = %s, want %s", c.pool, c.query, got, c.want)
		}
	}
	if _, err := s.read.ExecContext(ctx, `DELETE FROM media`); err == nil {
		t.Error("the read pool accepted a write")
	}
}

func TestRebind(t *testing.T) {
	tests := []struct {
		in, sqlite, postgres string
	}{
		{"SELECT 1", "SELECT 1", "SELECT 1"},
		{"a = ? AND b = ?", "a = ? AND b = ?", "a = $1 AND b = $2"},
		{"x = '?' AND y = ?", "x = '?' AND y = ?", "x = '?' AND y = $1"},
		{"x = 'it''s ?' AND y IN (?, ?, ?)", "x = 'it''s ?' AND y IN (?, ?, ?)", "x = 'it''s ?' AND y IN ($1, $2, $3)"},
		{strings.Repeat("?,", 11) + "?", strings.Repeat("?,", 11) + "?", "$1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12"},
	}
	for _, tt := range tests {
		if got := dialectSQLite.rebind(tt.in); got != tt.sqlite {
			t.Errorf("sqlite rebind(%q) = %q, want %q", tt.in, got, tt.sqlite)
		}
		if got := dialectPostgres.rebind(tt.in); got != tt.postgres {
			t.Errorf("postgres rebind(%q) = %q, want %q", tt.in, got, tt.postgres)
		}
	}
}

// TestPostgresQueriesRebound guards against a query left with '?' for
// PostgreSQL, and against a literal '$' in a query written for SQLite.
func TestPostgresQueriesRebound(t *testing.T) {
	for _, q := range []queries{newQueries(dialectPostgres)} {
		for _, s := range []string{q.recordBlob, q.getBlob, q.findBlobByPrefix, q.countBlobRefs,
			q.listBlobs, q.countBlobs, q.moveBlob, q.insertMedia, q.getMedia,
			q.lockUser, q.countPending, q.oldestPending, q.completePending, q.completeCheck, q.deleteExpiredPending,
			q.quarantine, q.unquarantine, q.getQuarantine, q.setProtected, q.listMediaByHash, q.countUserMedia,
			q.recordAccess, q.listRemoteLRU, q.deleteOldThumbnails, q.createJob, q.getJob, q.listJobs, q.claimJob,
			q.listClaimableJobs, q.updateJob, q.cancelJob} {
			if strings.Contains(s, "?") || !strings.Contains(s, "$1") {
				t.Errorf("postgres query not rebound: %s", s)
			}
		}
	}
	q := newQueries(dialectSQLite)
	if q.lockUser != "" {
		t.Errorf("sqlite has a lock query: %s", q.lockUser)
	}
	if strings.Contains(q.getMedia+q.insertMedia+q.completePending, "$") {
		t.Error("sqlite query contains '$'")
	}
}

func BenchmarkGetMedia(b *testing.B) {
	ctx := context.Background()
	for _, be := range backends {
		b.Run(be.name, func(b *testing.B) {
			s := mustOpen(b, be.name, be.newDB(b))
			defer s.Close()
			blob := recordBlob(b, s, 12345)
			const items = 1000
			for i := range items {
				m := storage.Media{
					ServerName: "example.org", MediaID: fmt.Sprintf("media%04d", i), UserID: "@alice:example.org",
					SHA256: blob.SHA256, Size: blob.Size, ContentType: "image/png", Filename: "cat.png",
					CreatedAt: time.Now(), UploadedAt: time.Now(),
				}
				if err := s.InsertMedia(ctx, m); err != nil {
					b.Fatal(err)
				}
			}
			b.Run("serial", func(b *testing.B) {
				i := 0
				for b.Loop() {
					if _, err := s.GetMedia(ctx, "example.org", fmt.Sprintf("media%04d", i%items)); err != nil {
						b.Fatal(err)
					}
					i++
				}
			})
			b.Run("parallel", func(b *testing.B) {
				b.RunParallel(func(pb *testing.PB) {
					i := 0
					for pb.Next() {
						if _, err := s.GetMedia(ctx, "example.org", fmt.Sprintf("media%04d", i%items)); err != nil {
							b.Fatal(err)
						}
						i++
					}
				})
			})
		})
	}
}

// TestUpgradeTo5 migrates a database holding data at version 4: existing
// media become unprotected and never accessed, and the new capabilities work
// on them.
func TestUpgradeTo5(t *testing.T) {
	ctx := context.Background()
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			dsn, db := databaseAtVersion(t, be, 4)
			sha := strings.Repeat("ab", 32)
			for _, q := range []string{
				`INSERT INTO blobs (sha256, size, prefix_sha256, datastore, created_ts) VALUES ('` + sha + `', 3, 'p', 'files', 1000)`,
				`INSERT INTO media (server_name, media_id, state, user_id, sha256, size, created_ts, uploaded_ts)
					VALUES ('example.org', 'old', 'ready', '@a:example.org', '` + sha + `', 3, 1000, 1000)`,
			} {
				if _, err := db.ExecContext(ctx, q); err != nil {
					t.Fatalf("%s: %v", q, err)
				}
			}
			var v int
			if err := db.QueryRowContext(ctx, `SELECT MAX(version) FROM schema_migrations`).Scan(&v); err != nil || v != 4 {
				t.Fatalf("schema version before upgrade = %d, %v; want 4", v, err)
			}
			db.Close()

			s := mustOpen(t, be.name, dsn)
			defer s.Close()
			checkMigrationRows(t, migrationRows(t, s))
			m, err := s.GetMedia(ctx, "example.org", "old")
			if err != nil || m.Protected || !m.LastAccessAt.IsZero() || m.QuarantinedBy != "" || m.Datastore != "files" {
				t.Fatalf("GetMedia after upgrade = %+v, %v", m, err)
			}
			if _, err := s.QuarantineContent(ctx, storage.Quarantine{SHA256: sha, By: "@admin:example.org"}); err != nil {
				t.Fatal(err)
			}
			if err := s.RecordAccess(ctx, []storage.Access{{MediaRef: storage.MediaRef{ServerName: "example.org", MediaID: "old"}, At: time.UnixMilli(5000)}}); err != nil {
				t.Fatal(err)
			}
			m, err = s.GetMedia(ctx, "example.org", "old")
			if err != nil || !m.Refused() || !m.LastAccessAt.Equal(time.UnixMilli(5000)) {
				t.Fatalf("GetMedia after quarantine and access = %+v, %v", m, err)
			}
		})
	}
}

// databaseAtVersion creates a fresh database of backend be migrated to
// schema version n only (the older schema an upgrade test starts from),
// opened directly; it returns the DSN mustOpen takes and the handle, which
// the test closes before opening the store.
func databaseAtVersion(t *testing.T, be backend, n int) (string, *sql.DB) {
	t.Helper()
	dsn := be.newDB(t)
	d, driver, raw := dialectSQLite, "sqlite3", "file:"+dsn+"?_foreign_keys=1"
	if be.name == "postgres" {
		d, driver, raw = dialectPostgres, "pgx", dsn
	} else if err := os.MkdirAll(filepath.Dir(dsn), 0o750); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open(driver, raw)
	if err != nil {
		t.Fatal(err)
	}
	for range n {
		if _, err := migrateStep(context.Background(), db, d); err != nil {
			t.Fatal(err)
		}
	}
	return dsn, db
}

// recordBlob records a blob of size bytes (hash "abab…") in s and returns
// its record.
func recordBlob(tb testing.TB, s *Store, size int64) storage.BlobRecord {
	tb.Helper()
	blob := storage.BlobRecord{SHA256: strings.Repeat("ab", 32), Size: size, PrefixSHA256: strings.Repeat("cd", 32), Datastore: "files", CreatedAt: time.Now()}
	if _, err := s.RecordBlob(context.Background(), blob); err != nil {
		tb.Fatal(err)
	}
	return blob
}

// second returns the error of a call that also returns a value.
func second[T any](_ T, err error) error { return err }

// BenchmarkUploadMetadata runs the metadata statements of one upload of new
// bytes without quotas, as the handler issues them: "separate" is the
// sequence before RecordBlob returned its row and the quarantine check
// moved into the insert (prefix lookup, RecordBlob, GetBlob, GetQuarantine,
// InsertMedia); "folded" is the current one (prefix lookup, RecordBlob,
// InsertMedia with RefuseQuarantined). Sub-benchmarks alternate on one
// store per database.
func BenchmarkUploadMetadata(b *testing.B) {
	ctx := context.Background()
	for _, be := range backends {
		b.Run(be.name, func(b *testing.B) {
			s := mustOpen(b, be.name, be.newDB(b))
			defer s.Close()
			n := 0
			upload := func(b *testing.B, folded bool) {
				n++
				seed := fmt.Sprintf("upload %d", n)
				rec := storage.BlobRecord{SHA256: hexHash(seed), Size: 256 << 10, PrefixSHA256: hexHash("prefix " + seed),
					Datastore: "files", CreatedAt: time.Now()}
				if _, err := s.FindBlobByPrefix(ctx, rec.Size, rec.PrefixSHA256); !errors.Is(err, storage.ErrNotFound) {
					b.Fatal(err)
				}
				got, err := s.RecordBlob(ctx, rec)
				if err != nil {
					b.Fatal(err)
				}
				if !folded {
					if got, err = s.GetBlob(ctx, rec.SHA256); err != nil {
						b.Fatal(err)
					}
					if _, err := s.GetQuarantine(ctx, rec.SHA256); !errors.Is(err, storage.ErrNotFound) {
						b.Fatal(err)
					}
				}
				now := time.Now()
				m := storage.Media{ServerName: "example.org", MediaID: fmt.Sprintf("m%d", n), UserID: "@alice:example.org",
					SHA256: got.SHA256, Size: got.Size, ContentType: "application/octet-stream", Filename: "a.bin",
					CreatedAt: now, UploadedAt: now, RefuseQuarantined: folded}
				if err := s.InsertMedia(ctx, m); err != nil {
					b.Fatal(err)
				}
			}
			for _, folded := range []bool{false, true} {
				name := map[bool]string{false: "separate", true: "folded"}[folded]
				b.Run(name, func(b *testing.B) {
					b.ReportAllocs()
					for b.Loop() {
						upload(b, folded)
					}
				})
			}
		})
	}
}

// hexHash is the hex SHA-256 of s.
func hexHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}
