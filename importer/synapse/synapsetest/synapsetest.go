// Package synapsetest builds Synapse installations for tests: Synapse's
// media tables from its published schema (testdata) on SQLite or
// PostgreSQL, a media store and a file_system storage provider's directory
// on disk, and a homeserver.yaml naming them; and a set of representative
// rows (local, remote, quarantined, protected, Unicode names, missing,
// altered and truncated files, duplicates, path-traversal IDs) with what a
// walk lists and an import makes of each.
//
// Tests that use the PostgreSQL engine need testpg.Main in their TestMain.
package synapsetest

import (
	"bytes"
	"database/sql"
	"embed"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	// The "pgx" database/sql driver.
	_ "github.com/jackc/pgx/v5/stdlib"
	// The SQLite driver, registered as "sqlite3".
	_ "github.com/mattn/go-sqlite3"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

// ServerName is the server_name of every fixture's homeserver.yaml.
const ServerName = "syn.example"

// Created0 is the creation time (Unix milliseconds) of the first media
// Populate inserts; the others follow it.
const Created0 = int64(1700000000123)

//go:embed testdata/sqlite/*.sql testdata/postgres/*.sql
var schemas embed.FS

// Engine makes the database of a fixture.
type Engine struct {
	// Name is "sqlite3" or "postgres".
	Name string
	// newDB makes the database in dir and returns a writable handle and
	// the database section of homeserver.yaml.
	newDB func(t testing.TB, dir string) (*sql.DB, string)
}

// Engines are the database engines Synapse supports.
func Engines() []Engine {
	return []Engine{{"sqlite3", newSQLiteDB}, {"postgres", newPostgresDB}}
}

// newSQLiteDB creates dir/homeserver.db in WAL mode, as Synapse does, and
// refers to it by a path relative to the config file.
func newSQLiteDB(t testing.TB, dir string) (*sql.DB, string) {
	t.Helper()
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
// connection arguments for it.
func newPostgresDB(t testing.TB, _ string) (*sql.DB, string) {
	t.Helper()
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

// Fixture is a Synapse installation on disk: homeserver.yaml, database,
// media store (Dir/media_store) and a file_system storage provider's
// directory (Dir/backup); homeserver.yaml also names an S3 storage
// provider, which the importer cannot read.
type Fixture struct {
	t testing.TB
	// Dir holds the installation.
	Dir string
	// ConfigPath is homeserver.yaml.
	ConfigPath string
	// DB is a writable handle on the database.
	DB *sql.DB
	// PG is true for PostgreSQL, false for SQLite.
	PG bool
	// HasSHA is true when the tables have delta 91's sha256 column.
	HasSHA bool
}

// New creates Synapse's media tables (schema 72 + delta 86, and delta 91's
// sha256 columns when withSHA) on engine e, and a homeserver.yaml.
func New(t testing.TB, e Engine, withSHA bool) *Fixture {
	t.Helper()
	dir := t.TempDir()
	db, dbYAML := e.newDB(t, dir)
	f := &Fixture{t: t, Dir: dir, ConfigPath: filepath.Join(dir, "homeserver.yaml"), DB: db, PG: e.Name == "postgres", HasSHA: withSHA}
	schemaDir := "sqlite"
	if f.PG {
		schemaDir = "postgres"
	}
	files := []string{"72_media.sql", "86_authenticated.sql"}
	if withSHA {
		files = append(files, "91_media_hash.sql")
	}
	for _, name := range files {
		ddl, err := schemas.ReadFile(path.Join("testdata", schemaDir, name))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := db.Exec(string(ddl)); err != nil {
			t.Fatalf("applying %s: %v", name, err)
		}
	}
	yml := "server_name: " + ServerName + "\n" + dbYAML + `media_store_path: media_store
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
	if err := os.WriteFile(f.ConfigPath, []byte(yml), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// Exec runs a statement on the writable handle; its placeholders are $1,
// $2, ... (both engines accept them).
func (f *Fixture) Exec(q string, args ...any) {
	f.t.Helper()
	if _, err := f.DB.Exec(q, args...); err != nil {
		f.t.Fatalf("%s: %v", q, err)
	}
}

// WriteFile writes body at rel (slash-separated) below Dir.
func (f *Fixture) WriteFile(rel string, body []byte) {
	f.t.Helper()
	p := filepath.Join(f.Dir, filepath.FromSlash(rel))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Fatal(err)
	}
	if err := os.WriteFile(p, body, 0o600); err != nil {
		f.t.Fatal(err)
	}
}

// LocalRow is a row of local_media_repository; nil fields are NULL.
type LocalRow struct {
	ID                                     string
	MediaType, Name, UserID, QuarantinedBy any
	Length                                 any
	Created                                int64
	URLCache                               any
	Safe                                   bool
	// SHA is stored only when the table has the sha256 column.
	SHA any
}

// InsertLocal inserts r (last_access_ts a little after its creation).
func (f *Fixture) InsertLocal(r LocalRow) {
	f.t.Helper()
	cols := `media_id, media_type, media_length, created_ts, upload_name, user_id, quarantined_by, url_cache,
		last_access_ts, safe_from_quarantine, authenticated`
	args := []any{r.ID, r.MediaType, r.Length, r.Created, r.Name, r.UserID, r.QuarantinedBy, r.URLCache, r.Created + 5, r.Safe, f.HasSHA}
	if f.HasSHA {
		cols += ", sha256"
		args = append(args, r.SHA)
	}
	f.Exec("INSERT INTO local_media_repository ("+cols+") VALUES ("+placeholders(len(args))+")", args...)
}

// RemoteRow is a row of remote_media_cache; nil fields are NULL.
type RemoteRow struct {
	Origin, ID                 string
	MediaType, Name, FSID, QBy any
	Length                     any
	Created                    int64
	// SHA is stored only when the table has the sha256 column.
	SHA any
}

// InsertRemote inserts r.
func (f *Fixture) InsertRemote(r RemoteRow) {
	f.t.Helper()
	cols := `media_origin, media_id, media_type, created_ts, upload_name, media_length, filesystem_id, last_access_ts,
		quarantined_by, authenticated`
	args := []any{r.Origin, r.ID, r.MediaType, r.Created, r.Name, r.Length, r.FSID, r.Created, r.QBy, f.HasSHA}
	if f.HasSHA {
		cols += ", sha256"
		args = append(args, r.SHA)
	}
	f.Exec("INSERT INTO remote_media_cache ("+cols+") VALUES ("+placeholders(len(args))+")", args...)
}

// placeholders returns "$1, $2, ..., $n".
func placeholders(n int) string {
	ps := make([]string, n)
	for i := range ps {
		ps[i] = fmt.Sprintf("$%d", i+1)
	}
	return strings.Join(ps, ", ")
}

// Contents of the fixture's files.
var (
	bodyText      = []byte("hello from synapse\n")
	bodyPNG       = append([]byte("\x89PNG\r\n\x1a\n"), bytes.Repeat([]byte{0, 1, 2, 0xff}, 300)...)
	bodyPercent   = []byte("percent name")
	bodyQuar      = []byte("quarantined bytes")
	bodyProt      = []byte("protected bytes")
	bodyNoName    = []byte{}
	bodyBackup    = []byte("only in the file_system storage provider")
	bodyRemote1   = []byte("remote one")
	bodyRemote2   = []byte("remote two, on a port")
	bodySecret    = []byte("outside the media store")
	bodyPreview   = []byte("url preview")
	bodyDecoy     = []byte("another file")
	bodyOriginal  = []byte("the bytes Synapse stored and hashed")
	bodyAltered   = []byte("the bytes somebody wrote over them!")
	bodyFull      = bytes.Repeat([]byte("truncated? "), 40)
	bodyQuarGone  = []byte("quarantined, then its file was deleted")
	unicodeName   = "Grüße 日本 🎉.png"
	unicodeRemote = "Ünïcödé ☃.txt"
	percentName   = "100%25 done%20.txt" // stored as Synapse got it: never decoded again
)

// Want is an item a full walk (Filter.IncludeRemote) lists: the item
// without Open, what opening its bytes gives, and what an import makes of
// it.
type Want struct {
	importtest.Expect
	// OpenErr is what Open's error wraps (importer.ErrMissing, or
	// importer.ErrInvalid for a row that names no media store path); nil
	// when Open gives Body.
	OpenErr error
}

// Expects returns the import expectations of wants.
func Expects(wants []Want) []importtest.Expect {
	out := make([]importtest.Expect, len(wants))
	for i, w := range wants {
		out[i] = w.Expect
	}
	return out
}

// sha returns v when the tables have the sha256 column (for the expected
// items), else "".
func (f *Fixture) sha(v string) string {
	if f.HasSHA {
		return v
	}
	return ""
}

// Populate writes the representative rows and files and returns what a
// full walk lists, in order. What it holds:
//
//   - imported: plain text, a PNG whose hash is recorded in capitals, a
//     percent sign in a name, a quarantined and a protected item, an empty
//     one without name, type or uploader, one only in the file_system
//     provider, a duplicate of the plain text (one blob), and remote media
//     (one quarantined, with a Unicode name);
//   - missing: files that are gone (one of them quarantined: with the
//     sha256 column its quarantine is still carried over by hash);
//   - mismatched: a file shorter than recorded, and (with the sha256
//     column; without it nothing can tell) a file overwritten with other
//     bytes of the same length;
//   - invalid: IDs that would traverse the file system ("../../../secret",
//     "AB/c/../../zz"), one too short to name a path ("abc"), a remote
//     origin "../evil" and a remote filesystem_id "../../../secret";
//   - not listed: a URL preview (url_cache) and a pending upload.
func (f *Fixture) Populate() []Want {
	f.t.Helper()
	ms := "media_store/"
	hexSHA := importtest.SHA256
	locals := []LocalRow{
		{ID: "AAAAplainText0000001", MediaType: "text/plain", Name: "notes.txt", UserID: "@alice:syn.example",
			Length: len(bodyText), Created: Created0, SHA: hexSHA(bodyText)},
		{ID: "BBBBunicodeName00002", MediaType: "image/png", Name: unicodeName, UserID: "@bob:syn.example",
			Length: len(bodyPNG), Created: Created0 + 1000, SHA: strings.ToUpper(hexSHA(bodyPNG))},
		{ID: "CCCCpercentName00003", MediaType: "text/plain", Name: percentName, UserID: "@bob:syn.example",
			Length: len(bodyPercent), Created: Created0 + 2000},
		{ID: "DDDDquarantined00004", MediaType: "application/octet-stream", Name: "bad.bin", UserID: "@eve:syn.example",
			QuarantinedBy: "@admin:syn.example", Length: len(bodyQuar), Created: Created0 + 3000, SHA: hexSHA(bodyQuar)},
		{ID: "EEEEprotected0000005", MediaType: "image/jpeg", Name: "logo.jpg", UserID: "@admin:syn.example",
			Length: len(bodyProt), Created: Created0 + 4000, Safe: true},
		{ID: "FFFFmissingFile00006", MediaType: "video/mp4", Name: "gone.mp4", UserID: "@alice:syn.example",
			Length: 42, Created: Created0 + 5000},
		{ID: "GGGGurlPreview000007", MediaType: "text/html", Length: len(bodyPreview), Created: Created0 + 6000,
			URLCache: "https://example.com/"},
		{ID: "HHHHpendingUpload008", UserID: "@alice:syn.example", Created: Created0 + 7000},
		{ID: "JJJJnoNameNoUser0010", Length: 0, Created: Created0 + 9000},
		{ID: "KKKKinBackupOnly0011", MediaType: "text/plain", Name: "backup.txt", UserID: "@carol:syn.example",
			Length: len(bodyBackup), Created: Created0 + 10000},
		{ID: "LLLLduplicate0000012", MediaType: "text/plain", Name: "notes (copy).txt", UserID: "@carol:syn.example",
			Length: len(bodyText), Created: Created0 + 10500, SHA: hexSHA(bodyText)},
		{ID: "MMMMoverwritten00013", MediaType: "text/plain", Name: "changed.txt", UserID: "@alice:syn.example",
			Length: len(bodyOriginal), Created: Created0 + 10600, SHA: hexSHA(bodyOriginal)},
		{ID: "NNNNtruncated0000014", MediaType: "text/plain", Name: "cut.txt", UserID: "@alice:syn.example",
			Length: len(bodyFull), Created: Created0 + 10700, SHA: hexSHA(bodyFull)},
		{ID: "PPPPquarantinedGone5", MediaType: "image/gif", Name: "worse.gif", UserID: "@eve:syn.example",
			QuarantinedBy: "@admin:syn.example", Length: len(bodyQuarGone), Created: Created0 + 10800, SHA: hexSHA(bodyQuarGone)},
		{ID: "../../../secret", MediaType: "text/plain", Name: "escape", UserID: "@eve:syn.example",
			Length: len(bodySecret), Created: Created0 + 11000},
		{ID: "abc", MediaType: "text/plain", Name: "short", UserID: "@eve:syn.example",
			Length: 1, Created: Created0 + 12000},
		{ID: "AB/c/../../zz", MediaType: "text/plain", Name: "inside", UserID: "@eve:syn.example",
			Length: len(bodyDecoy), Created: Created0 + 13000},
	}
	for _, r := range locals {
		f.InsertLocal(r)
	}
	f.WriteFile(ms+"local_content/AA/AA/plainText0000001", bodyText)
	f.WriteFile(ms+"local_content/BB/BB/unicodeName00002", bodyPNG)
	f.WriteFile(ms+"local_content/CC/CC/percentName00003", bodyPercent)
	f.WriteFile(ms+"local_content/DD/DD/quarantined00004", bodyQuar)
	f.WriteFile(ms+"local_content/EE/EE/protected0000005", bodyProt)
	f.WriteFile(ms+"local_content/JJ/JJ/noNameNoUser0010", bodyNoName)
	f.WriteFile("backup/local_content/KK/KK/inBackupOnly0011", bodyBackup)
	f.WriteFile(ms+"local_content/LL/LL/duplicate0000012", bodyText)
	f.WriteFile(ms+"local_content/MM/MM/overwritten00013", bodyAltered)
	f.WriteFile(ms+"local_content/NN/NN/truncated0000014", bodyFull[:len(bodyFull)/2])
	f.WriteFile(ms+"url_cache/2026-01-01/GGGGurlPreview000007", bodyPreview)
	// Where a naive join of "../../../secret" would lead.
	f.WriteFile("secret", bodySecret)
	// Where a naive join of "AB/c/../../zz" would lead: inside the media
	// store, but not that media's file.
	f.WriteFile(ms+"local_content/zz", bodyDecoy)

	remotes := []RemoteRow{
		{Origin: "remote.example", ID: "remoteMedia1", MediaType: "image/gif", Name: "cat.gif",
			FSID: "abcdefghijklmnopqrstuvwx", Length: len(bodyRemote1), Created: Created0 + 20000, SHA: hexSHA(bodyRemote1)},
		{Origin: "remote.example:8448", ID: "remoteMedia2", MediaType: "text/plain", Name: unicodeRemote,
			FSID: "ZYXWVUTSRQPONMLKJIHGFEDC", QBy: "@admin:syn.example", Length: len(bodyRemote2), Created: Created0 + 21000},
		{Origin: "other.example", ID: "goneRemote", MediaType: "image/png",
			FSID: "qwertyuiopasdfghjklzxcvb", Length: 77, Created: Created0 + 22000},
		{Origin: "../evil", ID: "evilOrigin", MediaType: "text/plain",
			FSID: "abcdefghijklmnopqrstuvwx", Length: 3, Created: Created0 + 23000},
		{Origin: "remote.example", ID: "evilFsid", MediaType: "text/plain",
			FSID: "../../../secret", Length: 3, Created: Created0 + 24000},
	}
	for _, r := range remotes {
		f.InsertRemote(r)
	}
	f.WriteFile(ms+"remote_content/remote.example/ab/cd/efghijklmnopqrstuvwx", bodyRemote1)
	f.WriteFile(ms+"remote_content/remote.example:8448/ZY/XW/VUTSRQPONMLKJIHGFEDC", bodyRemote2)
	// A remote file in the backup provider (store_remote false) is not
	// looked at: other.example's item stays missing.
	f.WriteFile("backup/remote_content/other.example/qw/er/tyuiopasdfghjklzxcvb", []byte("not searched"))
	return f.wants()
}

// wants is what a full walk of Populate's rows lists, in order.
func (f *Fixture) wants() []Want {
	ts := func(ms int64) time.Time { return time.UnixMilli(ms).UTC() }
	hexSHA := importtest.SHA256
	local := func(id, user, ctype, name string, created int64, size int, sha string) importer.Item {
		return importer.Item{ServerName: ServerName, MediaID: id, UserID: user, ContentType: ctype, Filename: name,
			CreatedAt: ts(created), Size: int64(size), SHA256: f.sha(sha)}
	}
	remote := func(origin, id, ctype, name string, created int64, size int, sha string) importer.Item {
		return importer.Item{ServerName: origin, MediaID: id, Remote: true, ContentType: ctype, Filename: name,
			CreatedAt: ts(created), Size: int64(size), SHA256: f.sha(sha)}
	}
	ok := func(it importer.Item, body []byte) Want {
		return Want{Expect: importtest.Expect{Item: it, Body: body}}
	}
	fails := func(it importer.Item, body []byte, openErr error, p importer.ProblemKind) Want {
		return Want{Expect: importtest.Expect{Item: it, Body: body, Problem: p}, OpenErr: openErr}
	}
	invalid := func(it importer.Item) Want { return fails(it, nil, importer.ErrInvalid, importer.ProblemInvalid) }
	missing := func(it importer.Item) Want { return fails(it, nil, importer.ErrMissing, importer.ProblemMissing) }
	quarantined := func(it importer.Item) importer.Item { it.QuarantinedBy = "@admin:syn.example"; return it }
	protected := func(it importer.Item) importer.Item { it.Protected = true; return it }

	overwritten := ok(local("MMMMoverwritten00013", "@alice:syn.example", "text/plain", "changed.txt", Created0+10600,
		len(bodyOriginal), hexSHA(bodyOriginal)), bodyAltered)
	if f.HasSHA {
		overwritten.Problem = importer.ProblemMismatch
	}
	return []Want{
		invalid(local("../../../secret", "@eve:syn.example", "text/plain", "escape", Created0+11000, len(bodySecret), "")),
		ok(local("AAAAplainText0000001", "@alice:syn.example", "text/plain", "notes.txt", Created0, len(bodyText), hexSHA(bodyText)), bodyText),
		invalid(local("AB/c/../../zz", "@eve:syn.example", "text/plain", "inside", Created0+13000, len(bodyDecoy), "")),
		ok(local("BBBBunicodeName00002", "@bob:syn.example", "image/png", unicodeName, Created0+1000, len(bodyPNG), hexSHA(bodyPNG)), bodyPNG),
		ok(local("CCCCpercentName00003", "@bob:syn.example", "text/plain", percentName, Created0+2000, len(bodyPercent), ""), bodyPercent),
		ok(quarantined(local("DDDDquarantined00004", "@eve:syn.example", "application/octet-stream", "bad.bin", Created0+3000,
			len(bodyQuar), hexSHA(bodyQuar))), bodyQuar),
		ok(protected(local("EEEEprotected0000005", "@admin:syn.example", "image/jpeg", "logo.jpg", Created0+4000, len(bodyProt), "")), bodyProt),
		missing(local("FFFFmissingFile00006", "@alice:syn.example", "video/mp4", "gone.mp4", Created0+5000, 42, "")),
		ok(local("JJJJnoNameNoUser0010", "", "", "", Created0+9000, 0, ""), bodyNoName),
		ok(local("KKKKinBackupOnly0011", "@carol:syn.example", "text/plain", "backup.txt", Created0+10000, len(bodyBackup), ""), bodyBackup),
		ok(local("LLLLduplicate0000012", "@carol:syn.example", "text/plain", "notes (copy).txt", Created0+10500, len(bodyText), hexSHA(bodyText)), bodyText),
		overwritten,
		fails(local("NNNNtruncated0000014", "@alice:syn.example", "text/plain", "cut.txt", Created0+10700, len(bodyFull), hexSHA(bodyFull)),
			bodyFull[:len(bodyFull)/2], nil, importer.ProblemMismatch),
		missing(quarantined(local("PPPPquarantinedGone5", "@eve:syn.example", "image/gif", "worse.gif", Created0+10800,
			len(bodyQuarGone), hexSHA(bodyQuarGone)))),
		invalid(local("abc", "@eve:syn.example", "text/plain", "short", Created0+12000, 1, "")),
		// Remote, ordered by origin then media ID.
		invalid(remote("../evil", "evilOrigin", "text/plain", "", Created0+23000, 3, "")),
		missing(remote("other.example", "goneRemote", "image/png", "", Created0+22000, 77, "")),
		invalid(remote("remote.example", "evilFsid", "text/plain", "", Created0+24000, 3, "")),
		ok(remote("remote.example", "remoteMedia1", "image/gif", "cat.gif", Created0+20000, len(bodyRemote1), hexSHA(bodyRemote1)), bodyRemote1),
		ok(quarantined(remote("remote.example:8448", "remoteMedia2", "text/plain", unicodeRemote, Created0+21000, len(bodyRemote2), "")), bodyRemote2),
	}
}
