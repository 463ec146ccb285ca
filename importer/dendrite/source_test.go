package dendrite

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// The media table as Dendrite v0.13.8 creates it
// (mediaapi/storage/{sqlite3,postgres}/media_repository_table.go).
const (
	sqliteMediaDDL = `CREATE TABLE mediaapi_media_repository (
    media_id TEXT NOT NULL,
    media_origin TEXT NOT NULL,
    content_type TEXT NOT NULL,
    file_size_bytes INTEGER NOT NULL,
    creation_ts INTEGER NOT NULL,
    upload_name TEXT NOT NULL,
    base64hash TEXT NOT NULL,
    user_id TEXT NOT NULL
);
CREATE UNIQUE INDEX mediaapi_media_repository_index ON mediaapi_media_repository (media_id, media_origin);`
	postgresMediaDDL = `CREATE TABLE mediaapi_media_repository (
    media_id TEXT NOT NULL,
    media_origin TEXT NOT NULL,
    content_type TEXT NOT NULL,
    file_size_bytes BIGINT NOT NULL,
    creation_ts BIGINT NOT NULL,
    upload_name TEXT NOT NULL,
    base64hash TEXT NOT NULL,
    user_id TEXT NOT NULL
);
CREATE UNIQUE INDEX mediaapi_media_repository_index ON mediaapi_media_repository (media_id, media_origin);`
)

const fixtureServer = "hs.example"

// mediaRow is a row to insert, as Dendrite would have written it.
type mediaRow struct {
	mediaID, origin, contentType string
	size, createdMS              int64
	uploadName, hash, userID     string
}

// fixture is a Dendrite installation built by hand: its database (SQLite
// or PostgreSQL), its media directory and its dendrite.yaml.
type fixture struct {
	dir        string
	configPath string
	basePath   string
	dialect    dialect
	db         *sql.DB // writable, for the test only
}

// newFixture creates the media table in a fresh database of the dialect
// and writes a dendrite.yaml for it. The SQLite config names its database
// relative to the config's directory in media_api.database; the PostgreSQL
// one names it only in global.database (Dendrite's fallback), with a
// password that the trusting test server ignores and Name must not show.
func newFixture(t testing.TB, d dialect) *fixture {
	t.Helper()
	dir := t.TempDir()
	fx := &fixture{dir: dir, configPath: filepath.Join(dir, "dendrite.yaml"), basePath: filepath.Join(dir, "media_store"), dialect: d}
	var conf string
	switch d {
	case sqliteDialect:
		db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "dendrite_mediaapi.db"))
		if err != nil {
			t.Fatal(err)
		}
		db.SetMaxOpenConns(1)
		fx.db = db
		fx.exec(t, sqliteMediaDDL)
		conf = `media_api:
  database:
    connection_string: "file:dendrite_mediaapi.db"
  base_path: ./media_store
`
	case postgresDialect:
		dsn := withPassword(t, testpg.DSN(t), "hunter2-secret")
		db, err := sql.Open("pgx", dsn)
		if err != nil {
			t.Fatal(err)
		}
		fx.db = db
		fx.exec(t, postgresMediaDDL)
		conf = fmt.Sprintf(`  database:
    connection_string: %q
    max_open_conns: 10
media_api:
  base_path: ./media_store
`, dsn)
	}
	t.Cleanup(func() { _ = fx.db.Close() })
	writeFile(t, fx.configPath, []byte("version: 2\nglobal:\n  server_name: "+fixtureServer+"\n  private_key: matrix_key.pem\n"+conf+"logging: []\n"))
	if err := os.MkdirAll(fx.basePath, 0o750); err != nil {
		t.Fatal(err)
	}
	return fx
}

// withPassword puts a password into a postgres:// URL.
func withPassword(t testing.TB, dsn, password string) string {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(u.User.Username(), password)
	return u.String()
}

func (fx *fixture) exec(t testing.TB, q string, args ...any) {
	t.Helper()
	if _, err := fx.db.Exec(q, args...); err != nil {
		t.Fatalf("%s: %v", q, err)
	}
}

// insert adds rows to the media table.
func (fx *fixture) insert(t testing.TB, rows ...mediaRow) {
	t.Helper()
	ph := make([]string, 8)
	for i := range ph {
		ph[i] = fx.dialect.placeholder(i + 1)
	}
	q := "INSERT INTO mediaapi_media_repository (" + mediaColumns + ") VALUES (" + strings.Join(ph, ", ") + ")"
	for _, r := range rows {
		fx.exec(t, q, r.mediaID, r.origin, r.contentType, r.size, r.createdMS, r.uploadName, r.hash, r.userID)
	}
}

// store writes body where Dendrite keeps it and returns its base64hash.
func (fx *fixture) store(t testing.TB, body []byte) string {
	t.Helper()
	h := dendriteHash(body)
	writeFile(t, filepath.Join(fx.basePath, filepath.FromSlash(hashPath(h))), body)
	return h
}

// dendriteHash is Dendrite's base64hash of body.
func dendriteHash(body []byte) string {
	sum := sha256.Sum256(body)
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

func hexSHA(body []byte) string {
	sum := sha256.Sum256(body)
	return hex.EncodeToString(sum[:])
}

func open(t *testing.T, configPath string) importer.Source {
	t.Helper()
	src, err := Open(context.Background(), configPath)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = src.Close() })
	return src
}

// walk collects every item of f.
func walk(t *testing.T, src importer.Source, f importer.Filter) []importer.Item {
	t.Helper()
	var items []importer.Item
	if err := src.Walk(context.Background(), f, func(it importer.Item) error {
		items = append(items, it)
		return nil
	}); err != nil {
		t.Fatalf("Walk(%+v): %v", f, err)
	}
	return items
}

// want is what one item must be: its fields (without Open) and what
// opening it gives.
type want struct {
	item    importer.Item
	body    []byte // expected bytes when openErr is nil
	openErr error  // expected error (errors.Is) of Open
}

var dialects = []dialect{sqliteDialect, postgresDialect}

// TestSource runs the same fixture on SQLite and PostgreSQL: every field
// of every item, their bytes, the filters, the totals.
func TestSource(t *testing.T) {
	for _, d := range dialects {
		t.Run(string(d), func(t *testing.T) {
			fx := newFixture(t, d)
			wants := populate(t, fx)
			src := open(t, fx.configPath)
			if n := src.Name(); !strings.Contains(n, string(d)) || !strings.Contains(n, fx.basePath) || strings.Contains(n, "hunter2") {
				t.Errorf("Name() = %q, want the kind and base path, no password", n)
			}
			checkItems(t, walk(t, src, importer.Filter{IncludeRemote: true}), wants)
			checkFilters(t, src, wants)
			checkReadOnly(t, src)
		})
	}
}

// populate writes the fixture's rows and files and returns what Walk must
// list, in its order (media_id, media_origin).
func populate(t *testing.T, fx *fixture) []want {
	t.Helper()
	created := time.Date(2023, 5, 17, 9, 30, 15, 123e6, time.UTC)
	ms := created.UnixMilli()
	text := []byte("bonjour, café ☕\n")
	png := []byte("\x89PNG\r\n\x1a\n not really an image, but bytes")
	remote := bytes.Repeat([]byte{0, 1, 2, 0xff}, 3000)
	textHash := fx.store(t, text)
	pngHash := fx.store(t, png)
	remoteHash := fx.store(t, remote)
	absentHash := dendriteHash([]byte("never stored"))
	// A file overwritten after Dendrite stored it: the same length, other
	// bytes, at the path of the hash Dendrite recorded.
	original, overwritten := []byte("what Dendrite stored"), []byte("what replaced it....")
	overwrittenHash := dendriteHash(original)
	writeFile(t, filepath.Join(fx.basePath, filepath.FromSlash(hashPath(overwrittenHash))), overwritten)

	// A symbolic link in base_path leading outside it is never followed.
	outside := filepath.Join(fx.dir, "outside-secret")
	writeFile(t, outside, []byte("secret"))
	escapeHash := dendriteHash([]byte("escape"))
	linkPath := filepath.Join(fx.basePath, filepath.FromSlash(hashPath(escapeHash)))
	if err := os.MkdirAll(filepath.Dir(linkPath), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, linkPath); err != nil {
		t.Fatal(err)
	}
	// A directory where the file should be counts as missing.
	dirHash := dendriteHash([]byte("a directory"))
	if err := os.MkdirAll(filepath.Join(fx.basePath, filepath.FromSlash(hashPath(dirHash))), 0o750); err != nil {
		t.Fatal(err)
	}

	rows := []mediaRow{
		{"a1", fixtureServer, "text/plain; charset=utf-8", int64(len(text)), ms, url.PathEscape("café ☕ 100%.txt"), textHash, "@alice:" + fixtureServer},
		{"a2", fixtureServer, "text/plain", int64(len(text)), ms + 1, "copy.txt", textHash, "@bob:" + fixtureServer},
		{"b1", fixtureServer, "image/png", int64(len(png)), ms + 2, "", pngHash, "@alice:" + fixtureServer},
		{"b2", fixtureServer, "image/png", -1, ms + 3, "chunked.png", pngHash, "@alice:" + fixtureServer},
		{"c1", fixtureServer, "application/pdf", 10, ms + 4, "gone.pdf", absentHash, "@alice:" + fixtureServer},
		{"c2", fixtureServer, "text/plain", 4, ms + 5, "bad-hash.txt", "../../outside-secret", "@alice:" + fixtureServer},
		{"c3", fixtureServer, "text/plain", 6, ms + 6, "link.txt", escapeHash, "@alice:" + fixtureServer},
		{"c4", fixtureServer, "text/plain", 6, ms + 7, "dir.txt", dirHash, "@alice:" + fixtureServer},
		{"c5", fixtureServer, "text/plain", 6, ms + 8, "short.txt", "abc", "@alice:" + fixtureServer},
		{"r1", "remote.example", "application/octet-stream", int64(len(remote)), ms + 9, "100%.bin", remoteHash, "@alice:" + fixtureServer},
		// The same media ID on two origins is two items.
		{"a1", "remote.example", "text/plain", int64(len(text)), ms + 10, "r.txt", textHash, ""},
		// An ID the module does not accept ('=' is outside [A-Za-z0-9_-]).
		{"a1=", fixtureServer, "text/plain", int64(len(text)), ms + 11, "eq.txt", textHash, "@alice:" + fixtureServer},
		{"d1", fixtureServer, "text/plain", int64(len(original)), ms + 12, "changed.txt", overwrittenHash, "@bob:" + fixtureServer},
	}
	fx.insert(t, rows...)

	local := func(id, user, ct, name string, size int64, add int64, sha string) importer.Item {
		return importer.Item{ServerName: fixtureServer, MediaID: id, UserID: user, ContentType: ct, Filename: name,
			CreatedAt: time.UnixMilli(ms + add).UTC(), Size: size, SHA256: sha}
	}
	alice, bob := "@alice:"+fixtureServer, "@bob:"+fixtureServer
	notRegular := errors.New("any error but ErrMissing")
	return []want{
		{item: local("a1", alice, "text/plain; charset=utf-8", "café ☕ 100%.txt", int64(len(text)), 0, hexSHA(text)), body: text},
		{item: importer.Item{ServerName: "remote.example", MediaID: "a1", Remote: true, ContentType: "text/plain", Filename: "r.txt",
			CreatedAt: time.UnixMilli(ms + 10).UTC(), Size: int64(len(text)), SHA256: hexSHA(text)}, body: text},
		{item: local("a1=", alice, "text/plain", "eq.txt", int64(len(text)), 11, hexSHA(text)), body: text},
		{item: local("a2", bob, "text/plain", "copy.txt", int64(len(text)), 1, hexSHA(text)), body: text},
		{item: local("b1", alice, "image/png", "", int64(len(png)), 2, hexSHA(png)), body: png},
		{item: local("b2", alice, "image/png", "chunked.png", -1, 3, hexSHA(png)), body: png},
		{item: local("c1", alice, "application/pdf", "gone.pdf", 10, 4, hexSHA([]byte("never stored"))), openErr: importer.ErrMissing},
		{item: local("c2", alice, "text/plain", "bad-hash.txt", 4, 5, ""), openErr: ErrInvalidHash},
		{item: local("c3", alice, "text/plain", "link.txt", 6, 6, hexSHA([]byte("escape"))), openErr: notRegular},
		{item: local("c4", alice, "text/plain", "dir.txt", 6, 7, hexSHA([]byte("a directory"))), openErr: importer.ErrMissing},
		{item: local("c5", alice, "text/plain", "short.txt", 6, 8, ""), openErr: ErrInvalidHash},
		{item: local("d1", bob, "text/plain", "changed.txt", int64(len(original)), 12, hexSHA(original)), body: overwritten},
		{item: importer.Item{ServerName: "remote.example", MediaID: "r1", Remote: true, ContentType: "application/octet-stream", Filename: "100%.bin",
			CreatedAt: time.UnixMilli(ms + 9).UTC(), Size: int64(len(remote)), SHA256: hexSHA(remote)}, body: remote},
	}
}

// checkItems compares items with wants, field by field, and opens each.
func checkItems(t *testing.T, items []importer.Item, wants []want) {
	t.Helper()
	if len(items) != len(wants) {
		t.Errorf("got %d items, want %d", len(items), len(wants))
	}
	for i := 0; i < len(items) && i < len(wants); i++ {
		got, w := items[i], wants[i]
		if got.Open == nil {
			t.Errorf("item %d (%s): Open is nil", i, got.Ref())
			continue
		}
		open := got.Open
		got.Open = nil
		if !reflect.DeepEqual(got, w.item) {
			t.Errorf("item %d:\n got  %+v\n want %+v", i, got, w.item)
		}
		checkOpen(t, got.Ref().MediaID, open, w)
	}
}

// checkOpen opens an item and checks its bytes or its error.
func checkOpen(t *testing.T, what string, open func(context.Context) (io.ReadCloser, error), w want) {
	t.Helper()
	rc, err := open(context.Background())
	switch {
	case w.openErr == nil:
		if err != nil {
			t.Errorf("%s: Open: %v", what, err)
			return
		}
		body, err := io.ReadAll(rc)
		_ = rc.Close()
		if err != nil || !bytes.Equal(body, w.body) {
			t.Errorf("%s: read %d bytes (%v), want %d exact bytes", what, len(body), err, len(w.body))
		}
	case err == nil:
		_ = rc.Close()
		t.Errorf("%s: Open succeeded, want an error", what)
	case w.openErr == importer.ErrMissing || w.openErr == ErrInvalidHash:
		if !errors.Is(err, w.openErr) {
			t.Errorf("%s: Open error %v, want %v", what, err, w.openErr)
		}
		if w.openErr == ErrInvalidHash && !errors.Is(err, importer.ErrHashMismatch) {
			t.Errorf("%s: Open error %v does not wrap ErrHashMismatch", what, err)
		}
	default:
		if errors.Is(err, importer.ErrMissing) {
			t.Errorf("%s: Open error %v, want one that is not ErrMissing", what, err)
		}
	}
}

// checkFilters walks and counts with every kind of filter.
func checkFilters(t *testing.T, src importer.Source, wants []want) {
	t.Helper()
	pick := func(keep func(importer.Item) bool) (refs []string, tot importer.Totals) {
		for _, w := range wants {
			if keep(w.item) {
				refs = append(refs, w.item.ServerName+"/"+w.item.MediaID)
				tot.Items++
				tot.Bytes += max(w.item.Size, 0)
			}
		}
		return refs, tot
	}
	isLocal := func(it importer.Item) bool { return !it.Remote }
	isRemote := func(it importer.Item) bool { return it.Remote }
	none := func(importer.Item) bool { return false }
	all := func(importer.Item) bool { return true }
	tests := []struct {
		name string
		f    importer.Filter
		keep func(importer.Item) bool
	}{
		{"default: local only", importer.Filter{}, isLocal},
		{"local and remote", importer.Filter{IncludeRemote: true}, all},
		{"this server name", importer.Filter{ServerNames: []string{"other.example", fixtureServer}}, isLocal},
		{"another server name", importer.Filter{ServerNames: []string{"remote.example"}}, none},
		{"another server name and remote", importer.Filter{ServerNames: []string{"other.example"}, IncludeRemote: true}, isRemote},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantRefs, wantTot := pick(tt.keep)
			var gotRefs []string
			for _, it := range walk(t, src, tt.f) {
				gotRefs = append(gotRefs, it.ServerName+"/"+it.MediaID)
			}
			if !reflect.DeepEqual(gotRefs, wantRefs) {
				t.Errorf("Walk = %v, want %v", gotRefs, wantRefs)
			}
			tot, err := src.Totals(context.Background(), tt.f)
			if err != nil || tot != wantTot {
				t.Errorf("Totals = %+v, %v; want %+v", tot, err, wantTot)
			}
		})
	}
}

// checkReadOnly tries to change the source's database through its own
// pool: every attempt must fail.
func checkReadOnly(t *testing.T, src importer.Source) {
	t.Helper()
	db := src.(*source).db
	for _, q := range []string{
		"DELETE FROM mediaapi_media_repository",
		"UPDATE mediaapi_media_repository SET user_id = 'x'",
		"CREATE TABLE imported (x INTEGER)",
	} {
		if _, err := db.Exec(q); err == nil {
			t.Errorf("%s through the source's pool succeeded", q)
		}
	}
	tot, err := src.Totals(context.Background(), importer.Filter{IncludeRemote: true})
	if err != nil || tot.Items == 0 {
		t.Errorf("after the write attempts: %+v, %v", tot, err)
	}
}

// TestWalkPages lists more rows than several pages hold: each exactly
// once, in order; and fn's error stops the walk.
func TestWalkPages(t *testing.T) {
	for _, d := range dialects {
		t.Run(string(d), func(t *testing.T) {
			fx := newFixture(t, d)
			const n = 2*pageSize + 37
			hash := dendriteHash([]byte("x"))
			tx, err := fx.db.Begin()
			if err != nil {
				t.Fatal(err)
			}
			q := fmt.Sprintf("INSERT INTO mediaapi_media_repository (%s) VALUES (%s, %s, 'text/plain', 1, 0, '', %s, '')",
				mediaColumns, d.placeholder(1), d.placeholder(2), d.placeholder(3))
			for i := range n {
				// Two origins per media ID for some: the key has both columns.
				origin := fixtureServer
				if i%3 == 0 {
					origin = "remote.example"
				}
				if _, err := tx.Exec(q, fmt.Sprintf("m%05d", i/2), origin+fmt.Sprint(i%2), hash); err != nil {
					t.Fatal(err)
				}
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			src := open(t, fx.configPath)
			items := walk(t, src, importer.Filter{IncludeRemote: true})
			if len(items) != n {
				t.Fatalf("walked %d items, want %d", len(items), n)
			}
			for i := 1; i < len(items); i++ {
				a, b := items[i-1], items[i]
				if a.MediaID > b.MediaID || (a.MediaID == b.MediaID && a.ServerName >= b.ServerName) {
					t.Fatalf("items %d and %d out of order: %s/%s, %s/%s", i-1, i, a.ServerName, a.MediaID, b.ServerName, b.MediaID)
				}
			}
			if tot, err := src.Totals(context.Background(), importer.Filter{IncludeRemote: true}); err != nil || tot != (importer.Totals{Items: n, Bytes: n}) {
				t.Errorf("Totals = %+v, %v; want %d items and bytes", tot, err, n)
			}

			stop := errors.New("stop here")
			seen := 0
			err = src.Walk(context.Background(), importer.Filter{IncludeRemote: true}, func(importer.Item) error {
				seen++
				if seen == pageSize+3 {
					return stop
				}
				return nil
			})
			if !errors.Is(err, stop) || seen != pageSize+3 {
				t.Errorf("Walk with a failing fn: %v after %d items, want %v after %d", err, seen, stop, pageSize+3)
			}

			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if err := src.Walk(ctx, importer.Filter{}, func(importer.Item) error { return nil }); !errors.Is(err, context.Canceled) {
				t.Errorf("Walk with a canceled context: %v", err)
			}
		})
	}
}

// TestOpenErrors: a wrong database, a missing database file, a missing
// media directory and a bad config are reported by Open.
func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	conf := func(name, cs, base string) string {
		p := filepath.Join(dir, name)
		writeFile(t, p, fmt.Appendf(nil, "version: 2\nglobal: {server_name: example.org}\nmedia_api: {database: {connection_string: %q}, base_path: %q}\n", cs, base))
		return p
	}
	if err := os.MkdirAll(filepath.Join(dir, "media"), 0o750); err != nil {
		t.Fatal(err)
	}
	empty, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "empty.db"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := empty.Exec("CREATE TABLE other (x INTEGER)"); err != nil {
		t.Fatal(err)
	}
	_ = empty.Close()
	writeFile(t, filepath.Join(dir, "sub", "x"), nil)

	tests := []struct {
		name, config, want string
	}{
		{"no media table", conf("a.yaml", "file:empty.db", "media"), "mediaapi_media_repository"},
		{"absent database", conf("b.yaml", "file:absent.db", "media"), "absent.db"},
		{"database is a directory", conf("c.yaml", "file:sub", "media"), "not a regular file"},
		{"absent media directory", conf("d.yaml", "file:empty.db", "no-media"), "base_path"},
		{"bad config", conf("e.yaml", "mysql:x", "media"), "neither"},
		{"unparsable postgres string", conf("f.yaml", "postgres://u:hunter2@[::1/d", "media"), "does not parse"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, err := Open(ctx, tt.config)
			if err == nil {
				_ = src.Close()
				t.Fatal("Open succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "hunter2") {
				t.Errorf("Open error %q, want it to mention %q (and no password)", err, tt.want)
			}
		})
	}
}

// TestHashHex checks the conversion of Dendrite's hashes.
func TestHashHex(t *testing.T) {
	body := []byte("hash me")
	raw := dendriteHash(body)
	tests := []struct {
		in   string
		want string
	}{
		{raw, hexSHA(body)},
		{raw + "=", hexSHA(body)},
		{strings.Repeat("A", 43), strings.Repeat("0", 64)},
		{strings.Repeat("_", 42) + "8", strings.Repeat("f", 64)},
	}
	for _, tt := range tests {
		if got, err := hashHex(tt.in); err != nil || got != tt.want {
			t.Errorf("hashHex(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "abc", raw[:42], raw + "A", raw + "==", "../" + raw[3:], "+" + raw[1:], "/" + raw[1:], raw[:20] + "." + raw[21:]} {
		if got, err := hashHex(bad); !errors.Is(err, ErrInvalidHash) {
			t.Errorf("hashHex(%q) = %q, %v; want ErrInvalidHash", bad, got, err)
		}
	}
	// The last character of a 43-character hash carries 2 padding bits,
	// which must be zero.
	if _, err := hashHex(raw[:42] + nonCanonical(raw[42])); !errors.Is(err, ErrInvalidHash) {
		t.Errorf("non-canonical last character accepted")
	}
}

// nonCanonical returns a base64url character with the same top two bits
// as c but other low bits set.
func nonCanonical(c byte) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	i := strings.IndexByte(alphabet, c)
	return string(alphabet[i|1])
}

// TestUploadName checks that names are unescaped as Dendrite's download
// handler unescapes them.
func TestUploadName(t *testing.T) {
	for stored, want := range map[string]string{
		"":                            "",
		"plain.txt":                   "plain.txt",
		url.PathEscape("café ☕.jpg"):  "café ☕.jpg",
		url.PathEscape("a/b?c#d.txt"): "a/b?c#d.txt",
		"100%.bin":                    "100%.bin",
		"%zz":                         "%zz",
	} {
		if got := uploadName(stored); got != want {
			t.Errorf("uploadName(%q) = %q, want %q", stored, got, want)
		}
	}
}

// BenchmarkWalk lists 20,000 rows of a SQLite media table (metadata only:
// the bytes are read by the sink).
func BenchmarkWalk(b *testing.B) {
	const benchRows = 20000
	fx := newFixture(b, sqliteDialect)
	hash := dendriteHash([]byte("x"))
	tx, err := fx.db.Begin()
	if err != nil {
		b.Fatal(err)
	}
	for i := range benchRows {
		if _, err := tx.Exec("INSERT INTO mediaapi_media_repository ("+mediaColumns+") VALUES (?, ?, 'image/jpeg', 123456, 1700000000000, 'IMG_0001.jpg', ?, '@alice:hs.example')",
			fmt.Sprintf("%064x", i), fixtureServer, hash); err != nil {
			b.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		b.Fatal(err)
	}
	src, err := Open(context.Background(), fx.configPath)
	if err != nil {
		b.Fatal(err)
	}
	defer src.Close()
	for b.Loop() {
		n := 0
		if err := src.Walk(context.Background(), importer.Filter{IncludeRemote: true}, func(importer.Item) error {
			n++
			return nil
		}); err != nil || n != benchRows {
			b.Fatalf("walked %d items: %v", n, err)
		}
	}
	b.ReportMetric(float64(benchRows*b.N)/b.Elapsed().Seconds(), "items/s")
}
