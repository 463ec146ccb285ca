package synapse

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

func TestMain(m *testing.M) { testpg.Main(m) }

const serverName = "syn.example"

// engine makes a fresh Synapse database: a writable handle for the test's
// own rows and the database section of homeserver.yaml pointing at it.
type engine struct {
	name  string
	newDB func(t *testing.T, dir string) (*sql.DB, string)
}

var engines = []engine{
	{EngineSQLite, newSQLiteDB},
	{"postgres", newPostgresDB},
}

// newSQLiteDB creates dir/homeserver.db in WAL mode, as Synapse does, and
// refers to it by a path relative to the config file.
func newSQLiteDB(t *testing.T, dir string) (*sql.DB, string) {
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "homeserver.db")+"?_journal_mode=WAL")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db, `database:
  name: sqlite3
  args:
    database: homeserver.db
    cp_min: 1
    cp_max: 1
`
}

// newPostgresDB creates a fresh PostgreSQL database and writes psycopg2
// args for it, with pool and keepalive settings Synapse configs carry.
func newPostgresDB(t *testing.T, _ string) (*sql.DB, string) {
	dsn := testpg.DSN(t)
	pc, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db, fmt.Sprintf(`database:
  name: psycopg2
  txn_limit: 10000
  args:
    user: %q
    password: %q
    dbname: %q
    host: %q
    port: %d
    sslmode: disable
    cp_min: 5
    cp_max: 10
    keepalives_idle: 10
`, pc.User, pc.Password, pc.Database, pc.Host, pc.Port)
}

// fixture is a Synapse installation on disk: homeserver.yaml, database,
// media store and a file-system storage provider's directory.
type fixture struct {
	t       *testing.T
	dir     string
	cfgPath string
	db      *sql.DB
	pg      bool
	hasSHA  bool
}

// newFixture creates Synapse's media tables (schema 72 + delta 86, and
// delta 91's sha256 columns when withSHA) and a homeserver.yaml.
func newFixture(t *testing.T, e engine, withSHA bool) *fixture {
	t.Helper()
	dir := t.TempDir()
	db, dbYAML := e.newDB(t, dir)
	f := &fixture{t: t, dir: dir, cfgPath: filepath.Join(dir, "homeserver.yaml"), db: db, pg: e.name == "postgres", hasSHA: withSHA}
	schemaDir := "sqlite"
	if f.pg {
		schemaDir = "postgres"
	}
	files := []string{"72_media.sql", "86_authenticated.sql"}
	if withSHA {
		files = append(files, "91_media_hash.sql")
	}
	for _, name := range files {
		ddl, err := os.ReadFile(filepath.Join("testdata", schemaDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := db.Exec(string(ddl)); err != nil {
			t.Fatalf("applying %s: %v", name, err)
		}
	}
	yml := "server_name: " + serverName + "\n" + dbYAML + `media_store_path: media_store
max_upload_size: 50M
media_storage_providers:
- module: file_system
  store_local: true
  store_remote: false
  store_synchronous: true
  config:
    directory: backup
- module: s3_storage_provider.S3StorageProviderBackend
  store_local: true
  config:
    bucket: synapse-media
`
	if err := os.WriteFile(f.cfgPath, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// exec runs a statement with ? placeholders on the fixture's writable
// handle.
func (f *fixture) exec(q string, args ...any) {
	f.t.Helper()
	if _, err := f.db.Exec(rebind(q, f.pg), args...); err != nil {
		f.t.Fatalf("%s: %v", q, err)
	}
}

// writeFile writes body at rel under the fixture directory.
func (f *fixture) writeFile(rel string, body []byte) {
	f.t.Helper()
	p := filepath.Join(f.dir, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(p, body, 0o600); err != nil {
		f.t.Fatal(err)
	}
}

// localRow is a row of local_media_repository; nil fields are NULL.
type localRow struct {
	id                                     string
	mediaType, name, userID, quarantinedBy any
	length                                 any
	created                                int64
	urlCache                               any
	safe                                   bool
	sha                                    any
}

func (f *fixture) insertLocal(r localRow) {
	f.t.Helper()
	if f.hasSHA {
		f.exec(`INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name,
			user_id, quarantined_by, url_cache, last_access_ts, safe_from_quarantine, authenticated, sha256)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			r.id, r.mediaType, r.length, r.created, r.name, r.userID, r.quarantinedBy, r.urlCache, r.created+5, r.safe, true, r.sha)
		return
	}
	f.exec(`INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name,
		user_id, quarantined_by, url_cache, last_access_ts, safe_from_quarantine, authenticated)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		r.id, r.mediaType, r.length, r.created, r.name, r.userID, r.quarantinedBy, r.urlCache, r.created+5, r.safe, false)
}

// remoteRow is a row of remote_media_cache; nil fields are NULL.
type remoteRow struct {
	origin, id                 string
	mediaType, name, fsid, qBy any
	length                     any
	created                    int64
	sha                        any
}

func (f *fixture) insertRemote(r remoteRow) {
	f.t.Helper()
	if f.hasSHA {
		f.exec(`INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts, upload_name,
			media_length, filesystem_id, last_access_ts, quarantined_by, authenticated, sha256)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			r.origin, r.id, r.mediaType, r.created, r.name, r.length, r.fsid, r.created, r.qBy, true, r.sha)
		return
	}
	f.exec(`INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts, upload_name,
		media_length, filesystem_id, last_access_ts, quarantined_by, authenticated)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		r.origin, r.id, r.mediaType, r.created, r.name, r.length, r.fsid, r.created, r.qBy, false)
}

func hexSHA(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// Contents of the fixture's files.
var (
	bodyText     = []byte("hello from synapse\n")
	bodyPNG      = append([]byte("\x89PNG\r\n\x1a\n"), bytes.Repeat([]byte{0, 1, 2, 0xff}, 300)...)
	bodyPercent  = []byte("percent name")
	bodyQuar     = []byte("quarantined bytes")
	bodyProt     = []byte("protected bytes")
	bodyNoName   = []byte{}
	bodyBackup   = []byte("only in the file_system storage provider")
	bodyRemote1  = []byte("remote one")
	bodyRemote2  = []byte("remote two, on a port")
	bodySecret   = []byte("outside the media store")
	bodyPreview  = []byte("url preview")
	bodyDecoy    = []byte("another file")
	unicodeName  = "Grüße 日本 🎉.png"
	percentName  = "100%25 done%20.txt" // stored as Synapse got it: never decoded again
	created0     = int64(1700000000123)
	pngUpperHash = strings.ToUpper(hexSHA(bodyPNG))
)

// sha returns v when the fixture has the sha256 column (for the expected
// items), else "".
func (f *fixture) sha(v string) string {
	if f.hasSHA {
		return v
	}
	return ""
}

// populate writes the representative rows and files and returns the items
// a full walk (IncludeRemote) must list, in order, without Open, and what
// opening each gives: bytes, or an error the Open must wrap.
func (f *fixture) populate() ([]importer.Item, map[string]any) {
	ms := "media_store/"
	locals := []localRow{
		{id: "AAAAplainText0000001", mediaType: "text/plain", name: "notes.txt", userID: "@alice:syn.example",
			length: len(bodyText), created: created0, sha: hexSHA(bodyText)},
		{id: "BBBBunicodeName00002", mediaType: "image/png", name: unicodeName, userID: "@bob:syn.example",
			length: len(bodyPNG), created: created0 + 1000, sha: pngUpperHash},
		{id: "CCCCpercentName00003", mediaType: "text/plain", name: percentName, userID: "@bob:syn.example",
			length: len(bodyPercent), created: created0 + 2000},
		{id: "DDDDquarantined00004", mediaType: "application/octet-stream", name: "bad.bin", userID: "@eve:syn.example",
			quarantinedBy: "@admin:syn.example", length: len(bodyQuar), created: created0 + 3000, sha: hexSHA(bodyQuar)},
		{id: "EEEEprotected0000005", mediaType: "image/jpeg", name: "logo.jpg", userID: "@admin:syn.example",
			length: len(bodyProt), created: created0 + 4000, safe: true},
		{id: "FFFFmissingFile00006", mediaType: "video/mp4", name: "gone.mp4", userID: "@alice:syn.example",
			length: 42, created: created0 + 5000},
		{id: "GGGGurlPreview000007", mediaType: "text/html", name: nil, userID: nil,
			length: len(bodyPreview), created: created0 + 6000, urlCache: "https://example.com/"},
		{id: "HHHHpendingUpload008", userID: "@alice:syn.example", created: created0 + 7000},
		{id: "JJJJnoNameNoUser0010", mediaType: nil, name: nil, userID: nil,
			length: 0, created: created0 + 9000},
		{id: "KKKKinBackupOnly0011", mediaType: "text/plain", name: "backup.txt", userID: "@carol:syn.example",
			length: len(bodyBackup), created: created0 + 10000},
		{id: "../../../secret", mediaType: "text/plain", name: "escape", userID: "@eve:syn.example",
			length: len(bodySecret), created: created0 + 11000},
		{id: "abc", mediaType: "text/plain", name: "short", userID: "@eve:syn.example",
			length: 1, created: created0 + 12000},
		{id: "AB/c/../../zz", mediaType: "text/plain", name: "inside", userID: "@eve:syn.example",
			length: len(bodyDecoy), created: created0 + 13000},
	}
	for _, r := range locals {
		f.insertLocal(r)
	}
	f.writeFile(ms+"local_content/AA/AA/plainText0000001", bodyText)
	f.writeFile(ms+"local_content/BB/BB/unicodeName00002", bodyPNG)
	f.writeFile(ms+"local_content/CC/CC/percentName00003", bodyPercent)
	f.writeFile(ms+"local_content/DD/DD/quarantined00004", bodyQuar)
	f.writeFile(ms+"local_content/EE/EE/protected0000005", bodyProt)
	f.writeFile(ms+"local_content/JJ/JJ/noNameNoUser0010", bodyNoName)
	f.writeFile("backup/local_content/KK/KK/inBackupOnly0011", bodyBackup)
	f.writeFile(ms+"url_cache/2026-01-01/GGGGurlPreview000007", bodyPreview)
	// Where a naive join of "../../../secret" would lead.
	f.writeFile("secret", bodySecret)
	// Where a naive join of "AB/c/../../zz" would lead: inside the media
	// store, but not that media's file.
	f.writeFile(ms+"local_content/zz", bodyDecoy)

	remotes := []remoteRow{
		{origin: "remote.example", id: "remoteMedia1", mediaType: "image/gif", name: "cat.gif",
			fsid: "abcdefghijklmnopqrstuvwx", length: len(bodyRemote1), created: created0 + 20000, sha: hexSHA(bodyRemote1)},
		{origin: "remote.example:8448", id: "remoteMedia2", mediaType: "text/plain", name: "Ünïcödé ☃.txt",
			fsid: "ZYXWVUTSRQPONMLKJIHGFEDC", qBy: "@admin:syn.example", length: len(bodyRemote2), created: created0 + 21000},
		{origin: "other.example", id: "goneRemote", mediaType: "image/png", name: nil,
			fsid: "qwertyuiopasdfghjklzxcvb", length: 77, created: created0 + 22000},
		{origin: "../evil", id: "evilOrigin", mediaType: "text/plain",
			fsid: "abcdefghijklmnopqrstuvwx", length: 3, created: created0 + 23000},
		{origin: "remote.example", id: "evilFsid", mediaType: "text/plain",
			fsid: "../../../secret", length: 3, created: created0 + 24000},
	}
	for _, r := range remotes {
		f.insertRemote(r)
	}
	f.writeFile(ms+"remote_content/remote.example/ab/cd/efghijklmnopqrstuvwx", bodyRemote1)
	f.writeFile(ms+"remote_content/remote.example:8448/ZY/XW/VUTSRQPONMLKJIHGFEDC", bodyRemote2)
	// A remote file in the backup provider (store_remote false) is not
	// looked at: other.example's item stays missing.
	f.writeFile("backup/remote_content/other.example/qw/er/tyuiopasdfghjklzxcvb", []byte("not searched"))

	ts := func(ms int64) time.Time { return time.UnixMilli(ms).UTC() }
	want := []importer.Item{
		{ServerName: serverName, MediaID: "../../../secret", UserID: "@eve:syn.example", ContentType: "text/plain",
			Filename: "escape", CreatedAt: ts(created0 + 11000), Size: int64(len(bodySecret))},
		{ServerName: serverName, MediaID: "AAAAplainText0000001", UserID: "@alice:syn.example", ContentType: "text/plain",
			Filename: "notes.txt", CreatedAt: ts(created0), Size: int64(len(bodyText)), SHA256: f.sha(hexSHA(bodyText))},
		{ServerName: serverName, MediaID: "AB/c/../../zz", UserID: "@eve:syn.example", ContentType: "text/plain",
			Filename: "inside", CreatedAt: ts(created0 + 13000), Size: int64(len(bodyDecoy))},
		{ServerName: serverName, MediaID: "BBBBunicodeName00002", UserID: "@bob:syn.example", ContentType: "image/png",
			Filename: unicodeName, CreatedAt: ts(created0 + 1000), Size: int64(len(bodyPNG)), SHA256: f.sha(hexSHA(bodyPNG))},
		{ServerName: serverName, MediaID: "CCCCpercentName00003", UserID: "@bob:syn.example", ContentType: "text/plain",
			Filename: percentName, CreatedAt: ts(created0 + 2000), Size: int64(len(bodyPercent))},
		{ServerName: serverName, MediaID: "DDDDquarantined00004", UserID: "@eve:syn.example", ContentType: "application/octet-stream",
			Filename: "bad.bin", CreatedAt: ts(created0 + 3000), Size: int64(len(bodyQuar)), SHA256: f.sha(hexSHA(bodyQuar)),
			QuarantinedBy: "@admin:syn.example"},
		{ServerName: serverName, MediaID: "EEEEprotected0000005", UserID: "@admin:syn.example", ContentType: "image/jpeg",
			Filename: "logo.jpg", CreatedAt: ts(created0 + 4000), Size: int64(len(bodyProt)), Protected: true},
		{ServerName: serverName, MediaID: "FFFFmissingFile00006", UserID: "@alice:syn.example", ContentType: "video/mp4",
			Filename: "gone.mp4", CreatedAt: ts(created0 + 5000), Size: 42},
		{ServerName: serverName, MediaID: "JJJJnoNameNoUser0010", CreatedAt: ts(created0 + 9000), Size: 0},
		{ServerName: serverName, MediaID: "KKKKinBackupOnly0011", UserID: "@carol:syn.example", ContentType: "text/plain",
			Filename: "backup.txt", CreatedAt: ts(created0 + 10000), Size: int64(len(bodyBackup))},
		{ServerName: serverName, MediaID: "abc", UserID: "@eve:syn.example", ContentType: "text/plain",
			Filename: "short", CreatedAt: ts(created0 + 12000), Size: 1},
		// Remote, ordered by origin then media ID.
		{ServerName: "../evil", MediaID: "evilOrigin", Remote: true, ContentType: "text/plain",
			CreatedAt: ts(created0 + 23000), Size: 3},
		{ServerName: "other.example", MediaID: "goneRemote", Remote: true, ContentType: "image/png",
			CreatedAt: ts(created0 + 22000), Size: 77},
		{ServerName: "remote.example", MediaID: "evilFsid", Remote: true, ContentType: "text/plain",
			CreatedAt: ts(created0 + 24000), Size: 3},
		{ServerName: "remote.example", MediaID: "remoteMedia1", Remote: true, ContentType: "image/gif",
			Filename: "cat.gif", CreatedAt: ts(created0 + 20000), Size: int64(len(bodyRemote1)), SHA256: f.sha(hexSHA(bodyRemote1))},
		{ServerName: "remote.example:8448", MediaID: "remoteMedia2", Remote: true, ContentType: "text/plain",
			Filename: "Ünïcödé ☃.txt", CreatedAt: ts(created0 + 21000), Size: int64(len(bodyRemote2)),
			QuarantinedBy: "@admin:syn.example"},
	}
	opens := map[string]any{
		"AAAAplainText0000001": bodyText,
		"BBBBunicodeName00002": bodyPNG,
		"CCCCpercentName00003": bodyPercent,
		"DDDDquarantined00004": bodyQuar,
		"EEEEprotected0000005": bodyProt,
		"FFFFmissingFile00006": importer.ErrMissing,
		"JJJJnoNameNoUser0010": bodyNoName,
		"KKKKinBackupOnly0011": bodyBackup,
		"../../../secret":      ErrInvalidPath,
		"abc":                  ErrInvalidPath,
		"AB/c/../../zz":        ErrInvalidPath,
		"evilOrigin":           ErrInvalidPath,
		"goneRemote":           importer.ErrMissing,
		"evilFsid":             ErrInvalidPath,
		"remoteMedia1":         bodyRemote1,
		"remoteMedia2":         bodyRemote2,
	}
	return want, opens
}

// walkAll collects the items Walk lists for flt.
func walkAll(t *testing.T, s importer.Source, flt importer.Filter) []importer.Item {
	t.Helper()
	var got []importer.Item
	if err := s.Walk(context.Background(), flt, func(it importer.Item) error {
		got = append(got, it)
		return nil
	}); err != nil {
		t.Fatalf("Walk(%+v): %v", flt, err)
	}
	return got
}

// withoutOpen returns items with Open cleared, for comparison.
func withoutOpen(items []importer.Item) []importer.Item {
	out := make([]importer.Item, len(items))
	for i, it := range items {
		if it.Open == nil {
			panic("item without Open: " + it.MediaID)
		}
		it.Open = nil
		out[i] = it
	}
	return out
}

func openFixture(t *testing.T, f *fixture) importer.Source {
	t.Helper()
	s, err := Open(context.Background(), f.cfgPath)
	if err != nil {
		t.Fatalf("Open(%s): %v", f.cfgPath, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func TestSource(t *testing.T) {
	for _, e := range engines {
		for _, withSHA := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/sha256=%v", e.name, withSHA), func(t *testing.T) {
				f := newFixture(t, e, withSHA)
				want, opens := f.populate()
				s := openFixture(t, f)
				testName(t, f, s)
				testWalk(t, s, want)
				testOpen(t, s, opens)
				testFilters(t, s, want)
			})
		}
	}
}

func testName(t *testing.T, f *fixture, s importer.Source) {
	db := "postgres"
	if !f.pg {
		db = "sqlite3 " + filepath.Join(f.dir, "homeserver.db")
	}
	want := fmt.Sprintf("synapse (%s, %s, %s; unreadable storage providers: s3_storage_provider.S3StorageProviderBackend)",
		db, filepath.Join(f.dir, "media_store"), filepath.Join(f.dir, "backup"))
	if got := s.Name(); got != want {
		t.Errorf("Name() = %q\nwant      %q", got, want)
	}
}

func testWalk(t *testing.T, s importer.Source, want []importer.Item) {
	got := withoutOpen(walkAll(t, s, importer.Filter{IncludeRemote: true}))
	if len(got) != len(want) {
		t.Errorf("Walk listed %d items, want %d", len(got), len(want))
	}
	for i := 0; i < len(got) || i < len(want); i++ {
		var g, w importer.Item
		if i < len(got) {
			g = got[i]
		}
		if i < len(want) {
			w = want[i]
		}
		if !reflect.DeepEqual(g, w) {
			t.Errorf("item %d:\n got %+v\nwant %+v", i, g, w)
		}
	}
}

func testOpen(t *testing.T, s importer.Source, opens map[string]any) {
	ctx := context.Background()
	for _, it := range walkAll(t, s, importer.Filter{IncludeRemote: true}) {
		want, ok := opens[it.MediaID]
		if !ok {
			t.Errorf("unexpected item %s/%s", it.ServerName, it.MediaID)
			continue
		}
		rc, err := it.Open(ctx)
		switch w := want.(type) {
		case []byte:
			if err != nil {
				t.Errorf("Open(%s): %v", it.MediaID, err)
				continue
			}
			b, err := io.ReadAll(rc)
			_ = rc.Close()
			if err != nil || !bytes.Equal(b, w) {
				t.Errorf("Open(%s) read %q, %v; want %q", it.MediaID, b, err, w)
			}
		case error:
			if rc != nil {
				_ = rc.Close()
			}
			if !errors.Is(err, w) {
				t.Errorf("Open(%s) error %v, want %v", it.MediaID, err, w)
			}
		}
	}
}

func testFilters(t *testing.T, s importer.Source, all []importer.Item) {
	var local, remote []importer.Item
	for _, it := range all {
		if it.Remote {
			remote = append(remote, it)
		} else {
			local = append(local, it)
		}
	}
	cases := []struct {
		name string
		f    importer.Filter
		want []importer.Item
	}{
		{"default: local only", importer.Filter{}, local},
		{"include remote", importer.Filter{IncludeRemote: true}, all},
		{"this server named", importer.Filter{ServerNames: []string{"other.example", serverName}}, local},
		{"other server only", importer.Filter{ServerNames: []string{"other.example"}}, nil},
		{"other server, remote", importer.Filter{ServerNames: []string{"remote.example"}, IncludeRemote: true}, remote},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := withoutOpen(walkAll(t, s, c.f))
			if len(got) != len(c.want) {
				t.Fatalf("listed %d items, want %d", len(got), len(c.want))
			}
			for i := range got {
				if !reflect.DeepEqual(got[i], c.want[i]) {
					t.Errorf("item %d: got %+v, want %+v", i, got[i], c.want[i])
				}
			}
			tot, err := s.Totals(context.Background(), c.f)
			if err != nil {
				t.Fatal(err)
			}
			wantTot := importer.Totals{Items: int64(len(c.want))}
			for _, it := range c.want {
				wantTot.Bytes += it.Size
			}
			if tot != wantTot {
				t.Errorf("Totals = %+v, want %+v", tot, wantTot)
			}
		})
	}
}

// TestReadOnly shows that the connection the source reads through refuses
// writes, and that rows a running Synapse adds meanwhile are seen.
func TestReadOnly(t *testing.T) {
	for _, e := range engines {
		t.Run(e.name, func(t *testing.T) {
			f := newFixture(t, e, true)
			f.insertLocal(localRow{id: "firstMedia000001", mediaType: "text/plain", length: 1, created: created0})
			s := openFixture(t, f).(*Source)
			ctx := context.Background()
			if _, err := s.db.ExecContext(ctx, "INSERT INTO local_media_repository (media_id) VALUES ('intruder')"); err == nil {
				t.Fatal("insert through the source's connection succeeded")
			} else if !strings.Contains(err.Error(), "read-only") && !strings.Contains(err.Error(), "readonly") {
				t.Errorf("insert failed with %v, want a read-only error", err)
			}
			if _, err := s.db.ExecContext(ctx, "UPDATE local_media_repository SET quarantined_by = 'x'"); err == nil {
				t.Fatal("update through the source's connection succeeded")
			}
			if f.pg {
				var ro string
				if err := s.db.QueryRowContext(ctx, "SHOW default_transaction_read_only").Scan(&ro); err != nil || ro != "on" {
					t.Errorf("default_transaction_read_only = %q, %v; want on", ro, err)
				}
			}
			var n int
			var qb sql.NullString
			if err := f.db.QueryRow("SELECT COUNT(*), MAX(quarantined_by) FROM local_media_repository").Scan(&n, &qb); err != nil {
				t.Fatal(err)
			}
			if n != 1 || qb.Valid {
				t.Errorf("database changed: %d rows, quarantined_by %v", n, qb)
			}
			// Synapse keeps running and adds a row: the next walk sees it.
			f.insertLocal(localRow{id: "secondMedia00002", mediaType: "text/plain", length: 2, created: created0 + 1})
			got := walkAll(t, s, importer.Filter{})
			if len(got) != 2 || got[1].MediaID != "secondMedia00002" {
				t.Errorf("after a concurrent insert, walk listed %d items: %+v", len(got), withoutOpen(got))
			}
		})
	}
}

// TestPaging walks many rows with a small page size.
func TestPaging(t *testing.T) {
	const nLocal, nRemote, page = 1000, 95, 7
	for _, e := range engines {
		t.Run(e.name, func(t *testing.T) {
			f := newFixture(t, e, true)
			tx, err := f.db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			insL, err := tx.Prepare(rebind(`INSERT INTO local_media_repository (media_id, media_type, media_length,
				created_ts, user_id) VALUES (?, 'text/plain', ?, ?, '@u:syn.example')`, f.pg))
			if err != nil {
				t.Fatal(err)
			}
			var wantBytes int64
			for i := 0; i < nLocal; i++ {
				// Inserted in reverse order: the walk must sort.
				if _, err := insL.Exec(fmt.Sprintf("media%06d", nLocal-1-i), i, created0+int64(i)); err != nil {
					t.Fatal(err)
				}
				wantBytes += int64(i)
			}
			insR, err := tx.Prepare(rebind(`INSERT INTO remote_media_cache (media_origin, media_id, media_type,
				media_length, created_ts, filesystem_id) VALUES (?, ?, 'image/png', 10, ?, 'abcdefghijklmnopqrstuvwx')`, f.pg))
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < nRemote; i++ {
				// Three origins, so pages cross origin boundaries.
				if _, err := insR.Exec(fmt.Sprintf("origin%d.example", i%3), fmt.Sprintf("r%04d", i), created0); err != nil {
					t.Fatal(err)
				}
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			cfg, err := LoadConfig(f.cfgPath)
			if err != nil {
				t.Fatal(err)
			}
			cfg.PageSize = page
			s, err := OpenWith(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()

			tot, err := s.Totals(context.Background(), importer.Filter{IncludeRemote: true})
			if err != nil {
				t.Fatal(err)
			}
			if want := (importer.Totals{Items: nLocal + nRemote, Bytes: wantBytes + 10*nRemote}); tot != want {
				t.Errorf("Totals = %+v, want %+v", tot, want)
			}
			got := walkAll(t, s, importer.Filter{IncludeRemote: true})
			if len(got) != nLocal+nRemote {
				t.Fatalf("walk listed %d items, want %d", len(got), nLocal+nRemote)
			}
			for i := 0; i < nLocal; i++ {
				if want := fmt.Sprintf("media%06d", i); got[i].MediaID != want || got[i].Size != int64(nLocal-1-i) {
					t.Fatalf("local item %d = %s (size %d), want %s (size %d)", i, got[i].MediaID, got[i].Size, want, nLocal-1-i)
				}
			}
			seen := map[string]bool{}
			prev := ""
			for _, it := range got[nLocal:] {
				key := it.ServerName + "\x00" + it.MediaID
				if seen[key] || key <= prev {
					t.Fatalf("remote item %s/%s out of order or repeated", it.ServerName, it.MediaID)
				}
				seen[key], prev = true, key
			}

			// fn's error stops the walk at once and is returned.
			stop := errors.New("stop here")
			calls := 0
			err = s.Walk(context.Background(), importer.Filter{}, func(importer.Item) error {
				calls++
				if calls == 10 {
					return stop
				}
				return nil
			})
			if !errors.Is(err, stop) || calls != 10 {
				t.Errorf("Walk returned %v after %d calls, want the callback's error after 10", err, calls)
			}
		})
	}
}

// TestOpenErrors covers a missing database, a database without Synapse's
// tables, and a missing file's report naming the unreadable providers.
func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	cfg := Config{ServerName: serverName, Engine: EngineSQLite, SQLitePath: filepath.Join(dir, "nope.db"),
		LocalDirs: []string{dir}}
	if _, err := OpenWith(ctx, cfg); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing database: %v", err)
	}
	if _, err := os.Stat(cfg.SQLitePath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("opening created the database file: %v", err)
	}

	empty := filepath.Join(dir, "empty.db")
	db, err := sql.Open("sqlite3", empty)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("CREATE TABLE local_media_repository (media_id TEXT); CREATE TABLE remote_media_cache (media_id TEXT)"); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	cfg.SQLitePath = empty
	if _, err := OpenWith(ctx, cfg); err == nil || !strings.Contains(err.Error(), "lacks columns media_type") {
		t.Errorf("database without synapse columns: %v", err)
	}

	err = missing([]string{"/srv/media_store"}, "local_content/ab/cd/efgh", []string{"s3_storage_provider.S3StorageProviderBackend"})
	if !errors.Is(err, importer.ErrMissing) || !strings.Contains(err.Error(), "s3_storage_provider.S3StorageProviderBackend") ||
		!strings.Contains(err.Error(), "/srv/media_store") {
		t.Errorf("missing() = %v", err)
	}

	for _, bad := range []Config{
		{Engine: EngineSQLite, SQLitePath: "/x.db"},
		{ServerName: serverName, Engine: "mysql"},
		{ServerName: serverName, Engine: EngineSQLite, SQLitePath: "rel.db"},
		{ServerName: serverName, Engine: EnginePostgres},
		{ServerName: serverName, Engine: EngineSQLite, SQLitePath: "/x.db", LocalDirs: []string{"media_store"}},
	} {
		if _, err := OpenWith(ctx, bad); err == nil {
			t.Errorf("OpenWith(%+v) succeeded", bad)
		}
	}
}
