package mmr

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
)

func TestMain(m *testing.M) { testpg.Main(m) }

//go:embed testdata/schema.sql
var schemaSQL string

// fixture is a matrix-media-repo installation: database, a file datastore,
// an S3 datastore, a datastore configured without id (named by the
// datastores table), a datastore whose directory is gone, and its
// media-repo.yaml.
type fixture struct {
	dsn        string
	db         *sql.DB
	s3         *tests3.Server
	s3client   *s3.Client
	fileDir    string
	legacyDir  string
	outsideDir string
	configPath string
	// media is what each row should become, by ref; content is the bytes
	// Open should give, and openErr the error it should give instead.
	media map[string]wantItem
}

// wantItem is an expected item and the outcome of opening it.
type wantItem struct {
	item    importer.Item
	content []byte
	// openErr is the error Open should wrap; errOther means an error that
	// wraps neither ErrMissing nor ErrHashMismatch.
	openErr error
}

// errOther stands for an error that is neither ErrMissing nor
// ErrHashMismatch (an unknown datastore, a path outside the datastore).
var errOther = errors.New("another error")

// row is one media row the fixture inserts.
type row struct {
	origin, mediaID, name, ctype, user string
	content                            []byte
	hash                               string // default: the content's
	created                            int64
	quarantined                        bool
	pinned                             bool
	ds, location                       string
	// store puts the content in the datastore; false leaves it missing.
	store bool
}

func sha(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{
		dsn:        testpg.DSN(t),
		s3:         tests3.Start(t),
		fileDir:    t.TempDir(),
		legacyDir:  t.TempDir(),
		outsideDir: t.TempDir(),
		media:      map[string]wantItem{},
	}
	db, err := sql.Open("pgx", f.dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	f.db = db
	if _, err := db.ExecContext(ctx, schemaSQL); err != nil {
		t.Fatalf("creating matrix-media-repo's schema: %v", err)
	}
	f.s3client = s3.New(s3.Options{
		BaseEndpoint: aws.String(f.s3.URL()),
		Region:       "us-east-1",
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(f.s3.AccessKey(), f.s3.SecretKey(), ""),
	})
	// matrix-media-repo before 1.3 named the legacy datastore here.
	if _, err := db.ExecContext(ctx, `INSERT INTO datastores (datastore_id, ds_type, uri) VALUES ('legacyid', 'file', $1),
		('s3old', 's3', 's3://elsewhere.example/bucket')`, f.legacyDir); err != nil {
		t.Fatal(err)
	}
	f.writeConfig(t)
	return f
}

// writeConfig writes media-repo.yaml, in the shape of matrix-media-repo's
// sample configuration.
func (f *fixture) writeConfig(t *testing.T) {
	t.Helper()
	endpoint := strings.TrimPrefix(f.s3.URL(), "http://")
	cfg := fmt.Sprintf(`repo:
  bindAddress: '127.0.0.1'
  port: 8000
database:
  postgres: %q
  pool:
    maxConnections: 25
homeservers:
  - name: example.org
    csApi: "https://example.org/"
    backoffAt: 10
    adminApiKind: "synapse"
  - name: other.example
    csApi: "https://other.example/"
admins:
  - "@admin:example.org"
datastores:
  - type: file
    id: "files1"
    forKinds: ["thumbnails", "local_media"]
    opts:
      path: %s
  - type: s3
    id: "s3main"
    forKinds: ["all"]
    opts:
      tempPath: "/tmp/mediarepo_s3_upload"
      endpoint: %s
      accessKeyId: %q
      accessSecret: %q
      ssl: false
      bucketName: %q
      storageClass: STANDARD
      prefixLength: 3
  - type: file
    forKinds: []
    opts:
      path: %s
  - type: file
    id: "gone"
    forKinds: []
    opts:
      path: %s
archiving:
  enabled: true
`, f.dsn, f.fileDir, endpoint, f.s3.AccessKey(), f.s3.SecretKey(), f.s3.Bucket(), f.legacyDir, filepath.Join(f.fileDir, "no-such-dir"))
	f.configPath = filepath.Join(t.TempDir(), "media-repo.yaml")
	if err := os.WriteFile(f.configPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// add inserts r and stores its content, and records the item it should
// become.
func (f *fixture) add(t *testing.T, r row, openErr error) {
	t.Helper()
	ctx := context.Background()
	if r.hash == "" {
		r.hash = sha(r.content)
	}
	if r.store {
		f.put(t, r.ds, r.location, r.content)
	}
	if _, err := f.db.ExecContext(ctx, `INSERT INTO media (origin, media_id, upload_name, content_type, user_id, sha256_hash,
		size_bytes, creation_ts, quarantined, datastore_id, location) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`,
		r.origin, r.mediaID, r.name, r.ctype, r.user, r.hash, len(r.content), r.created, r.quarantined, r.ds, r.location); err != nil {
		t.Fatal(err)
	}
	if _, err := f.db.ExecContext(ctx, `INSERT INTO user_stats (user_id, uploaded_bytes) VALUES ($1, $2)
		ON CONFLICT (user_id) DO UPDATE SET uploaded_bytes = user_stats.uploaded_bytes + $2`, r.user, len(r.content)); err != nil {
		t.Fatal(err)
	}
	purpose := "none"
	if r.pinned {
		purpose = "pinned"
	}
	if _, err := f.db.ExecContext(ctx, `INSERT INTO media_attributes (origin, media_id, purpose) VALUES ($1, $2, $3)`,
		r.origin, r.mediaID, purpose); err != nil {
		t.Fatal(err)
	}
	local := r.origin == "example.org" || r.origin == "other.example"
	it := importer.Item{
		ServerName:  r.origin,
		MediaID:     r.mediaID,
		Remote:      !local,
		ContentType: r.ctype,
		Filename:    r.name,
		CreatedAt:   time.UnixMilli(r.created).UTC(),
		Size:        int64(len(r.content)),
		SHA256:      r.hash,
		Protected:   r.pinned,
	}
	if local {
		it.UserID = r.user
	}
	if r.quarantined {
		it.QuarantinedBy = "imported from matrix-media-repo"
	}
	it.SHA256 = strings.ToLower(r.hash)
	if openErr == importer.ErrHashMismatch {
		it.SHA256 = ""
	}
	f.media[r.origin+"/"+r.mediaID] = wantItem{item: it, content: r.content, openErr: openErr}
}

// put stores content at location in datastore ds, as matrix-media-repo
// would have.
func (f *fixture) put(t *testing.T, ds, location string, content []byte) {
	t.Helper()
	switch ds {
	case "files1", "legacyid":
		dir := f.fileDir
		if ds == "legacyid" {
			dir = f.legacyDir
		}
		p := filepath.Join(dir, filepath.FromSlash(location))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, content, 0o644); err != nil {
			t.Fatal(err)
		}
	case "s3main":
		_, err := f.s3client.PutObject(context.Background(), &s3.PutObjectInput{
			Bucket: aws.String(f.s3.Bucket()), Key: aws.String(location), Body: bytes.NewReader(content),
		})
		if err != nil {
			t.Fatalf("uploading %s: %v", location, err)
		}
	default:
		t.Fatalf("no datastore %q to put content in", ds)
	}
}

// populate inserts the representative rows.
func (f *fixture) populate(t *testing.T) {
	t.Helper()
	png := append([]byte("\x89PNG\r\n\x1a\n"), bytes.Repeat([]byte{7}, 3000)...)
	dup := []byte("the same bytes uploaded twice")
	const base = int64(1_700_000_000_123)
	rows := []struct {
		r   row
		err error
	}{
		{row{origin: "example.org", mediaID: "LocalFile1", name: "cat.png", ctype: "image/png", user: "@alice:example.org",
			content: png, created: base, ds: "files1", location: "ab/cd/efghLocalFile1idv2fmt", store: true}, nil},
		{row{origin: "example.org", mediaID: "LocalS3Unicode", name: "Ünïcødé 猫 🐱 «name».txt", ctype: "text/plain; charset=utf-8",
			user: "@bob:example.org", content: []byte("héllo wörld ✓\n"), created: base + 1,
			ds: "s3main", location: "Xyz/XyzUnicodeObjectidv2fmt", store: true}, nil},
		{row{origin: "remote.org", mediaID: "Remote1", name: "", ctype: "application/octet-stream", user: "",
			content: []byte("cached from remote.org"), created: base + 2, ds: "s3main", location: "Rem/RemoteObjidv2fmt", store: true}, nil},
		{row{origin: "example.org", mediaID: "QuarantinedKept", name: "bad.jpg", ctype: "image/jpeg", user: "@mallory:example.org",
			content: []byte("quarantined but kept"), created: base + 3, quarantined: true, ds: "files1",
			location: "qq/kk/QuarantinedKeptidv2fmt", store: true}, nil},
		{row{origin: "example.org", mediaID: "QuarantinedGone", name: "worse.jpg", ctype: "image/jpeg", user: "@mallory:example.org",
			content: []byte("quarantined and deleted"), created: base + 4, quarantined: true, ds: "s3main",
			location: "Qgo/QgoneObjidv2fmt", store: false}, importer.ErrMissing},
		{row{origin: "example.org", mediaID: "DedupA", name: "a.txt", ctype: "text/plain", user: "@alice:example.org",
			content: dup, created: base + 5, ds: "s3main", location: "Ddd/DedupObjidv2fmt", store: true}, nil},
		{row{origin: "other.example", mediaID: "DedupB", name: "b.txt", ctype: "text/plain", user: "@carol:other.example",
			content: dup, created: base + 6, ds: "s3main", location: "Ddd/DedupObjidv2fmt", store: false}, nil},
		{row{origin: "example.org", mediaID: "MissingFile", name: "lost.bin", ctype: "application/octet-stream", user: "@bob:example.org",
			content: []byte("never written"), created: base + 7, ds: "files1", location: "mi/ss/MissingFileidv2fmt", store: false}, importer.ErrMissing},
		{row{origin: "example.org", mediaID: "MissingObject", name: "lost2.bin", ctype: "application/octet-stream", user: "@bob:example.org",
			content: []byte("never uploaded"), created: base + 8, ds: "s3main", location: "Mis/MissingObjidv2fmt", store: false}, importer.ErrMissing},
		{row{origin: "example.org", mediaID: "UnknownStore", name: "u.bin", ctype: "application/octet-stream", user: "@bob:example.org",
			content: []byte("in a datastore nobody configured"), created: base + 9, ds: "removed-datastore", location: "aa/bb/cc", store: false}, errOther},
		{row{origin: "example.org", mediaID: "LegacyFile", name: "old.gif", ctype: "image/gif", user: "@alice:example.org",
			content: []byte("GIF89a from 2019"), created: base + 10, ds: "legacyid", location: "le/ga/LegacyFile", store: true}, nil},
		{row{origin: "example.org", mediaID: "Pinned", name: "pinned.txt", ctype: "text/plain", user: "@admin:example.org",
			content: []byte("pinned by an admin"), created: base + 11, pinned: true, ds: "files1", location: "pi/nn/Pinned", store: true}, nil},
		{row{origin: "example.org", mediaID: "BadHash", name: "h.bin", ctype: "application/octet-stream", user: "@bob:example.org",
			content: []byte("recorded hash is garbage"), hash: "not-a-sha256", created: base + 12, ds: "files1",
			location: "ba/dh/BadHash", store: true}, importer.ErrHashMismatch},
		{row{origin: "example.org", mediaID: "Escape", name: "e.txt", ctype: "text/plain", user: "@bob:example.org",
			content: []byte("outside the datastore"), created: base + 13, ds: "files1", location: "../outside.txt", store: false}, errOther},
		{row{origin: "example.org", mediaID: "GoneDir", name: "g.txt", ctype: "text/plain", user: "@bob:example.org",
			content: []byte("datastore directory removed"), created: base + 14, ds: "gone", location: "go/ne/GoneDir", store: false}, errOther},
		{row{origin: "example.org", mediaID: "Symlink", name: "s.txt", ctype: "text/plain", user: "@bob:example.org",
			content: []byte("a link out of the datastore"), created: base + 15, ds: "files1", location: "sy/ml/Symlink", store: false}, errOther},
		{row{origin: "example.org", mediaID: "UpperHash", name: "u.txt", ctype: "text/plain", user: "@bob:example.org",
			content: []byte("hash recorded in capitals"), hash: strings.ToUpper(sha([]byte("hash recorded in capitals"))),
			created: base + 16, ds: "files1", location: "up/pe/UpperHash", store: true}, nil},
		{row{origin: "example.org", mediaID: "Fifo", name: "f.txt", ctype: "text/plain", user: "@bob:example.org",
			content: []byte("a named pipe, not a file"), created: base + 17, ds: "files1", location: "fi/fo/Fifo", store: false}, errOther},
		{row{origin: "example.org", mediaID: "Directory", name: "d.txt", ctype: "text/plain", user: "@bob:example.org",
			content: []byte("a directory, not a file"), created: base + 18, ds: "files1", location: "di/re", store: false}, errOther},
	}
	for _, r := range rows {
		f.add(t, r.r, r.err)
	}
	// A named pipe that no one writes to: opening it must not block.
	if err := os.MkdirAll(filepath.Join(f.fileDir, "fi", "fo"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(f.fileDir, "fi", "fo", "Fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(f.fileDir, "di", "re"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Files outside the datastore that Escape and Symlink point at: they
	// must never be read.
	secret := filepath.Join(f.outsideDir, "outside.txt")
	if err := os.WriteFile(secret, []byte("outside the datastore"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(filepath.Dir(f.fileDir), "outside.txt"), []byte("outside the datastore"), 0o644); err != nil && !os.IsPermission(err) {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(f.fileDir, "sy", "ml"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, filepath.Join(f.fileDir, "sy", "ml", "Symlink")); err != nil {
		t.Fatal(err)
	}
}

// openSource opens the fixture's configuration.
func (f *fixture) openSource(t *testing.T) *source {
	t.Helper()
	src, err := Open(context.Background(), f.configPath)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := src.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return src.(*source)
}

// maxListed stops a Walk that lists far more items than any fixture has
// (one that does not advance).
const maxListed = 1000

// walk lists every item selected by flt.
func walk(t *testing.T, src importer.Source, flt importer.Filter) []importer.Item {
	t.Helper()
	var out []importer.Item
	if err := src.Walk(context.Background(), flt, func(it importer.Item) error {
		out = append(out, it)
		if len(out) > maxListed {
			return errors.New("Walk does not advance")
		}
		return nil
	}); err != nil {
		t.Fatalf("Walk(%+v): %v", flt, err)
	}
	return out
}

func refOf(it importer.Item) string { return it.ServerName + "/" + it.MediaID }

func TestSource(t *testing.T) {
	f := newFixture(t)
	f.populate(t)
	src := f.openSource(t)
	ctx := context.Background()

	all := importer.Filter{IncludeRemote: true}
	items := walk(t, src, all)
	if len(items) != len(f.media) {
		t.Fatalf("Walk listed %d items, want %d", len(items), len(f.media))
	}
	seen := map[string]bool{}
	for _, it := range items {
		ref := refOf(it)
		if seen[ref] {
			t.Errorf("%s listed twice", ref)
		}
		seen[ref] = true
		want, ok := f.media[ref]
		if !ok {
			t.Errorf("unexpected item %s", ref)
			continue
		}
		if it.Open == nil {
			t.Errorf("%s: no Open", ref)
			continue
		}
		got := it
		got.Open = nil
		if !reflect.DeepEqual(got, want.item) {
			t.Errorf("%s:\n got %+v\nwant %+v", ref, got, want.item)
		}
		checkOpen(t, ref, it, want)
	}

	t.Run("Totals", func(t *testing.T) {
		tot, err := src.Totals(ctx, all)
		if err != nil {
			t.Fatal(err)
		}
		var bytes int64
		for _, w := range f.media {
			bytes += w.item.Size
		}
		if tot != (importer.Totals{Items: int64(len(f.media)), Bytes: bytes}) {
			t.Errorf("Totals = %+v, want %d items, %d bytes", tot, len(f.media), bytes)
		}
	})

	t.Run("Pages", func(t *testing.T) {
		// The same listing, in the same order, read two rows at a time.
		for _, size := range []int{1, 2, 3, len(f.media), len(f.media) + 1} {
			src.pageSize = size
			paged := walk(t, src, all)
			if !slices.EqualFunc(paged, items, func(a, b importer.Item) bool { return refOf(a) == refOf(b) }) {
				t.Errorf("page size %d: order %v, want %v", size, refs(paged), refs(items))
			}
		}
		src.pageSize = defaultPageSize
	})

	t.Run("StopsAtError", func(t *testing.T) {
		stop := errors.New("stop")
		n := 0
		err := src.Walk(ctx, all, func(importer.Item) error {
			n++
			if n == 3 {
				return stop
			}
			return nil
		})
		if !errors.Is(err, stop) || n != 3 {
			t.Errorf("Walk returned %v after %d calls, want stop after 3", err, n)
		}
	})

	t.Run("Name", func(t *testing.T) {
		name := src.Name()
		for _, want := range []string{"matrix-media-repo", `"files1"`, f.fileDir, `"s3main"`, f.s3.Bucket(), f.legacyDir} {
			if !strings.Contains(name, want) {
				t.Errorf("Name() = %q, lacks %q", name, want)
			}
		}
	})
}

// checkOpen opens it and compares what it gives with want.
func checkOpen(t *testing.T, ref string, it importer.Item, want wantItem) {
	t.Helper()
	body, err := it.Open(context.Background())
	switch {
	case want.openErr == nil:
		if err != nil {
			t.Errorf("%s: Open: %v", ref, err)
			return
		}
		got, err := io.ReadAll(body)
		body.Close()
		if err != nil {
			t.Errorf("%s: reading: %v", ref, err)
		}
		if !bytes.Equal(got, want.content) {
			t.Errorf("%s: content %q, want %q", ref, got, want.content)
		}
		if sha(got) != it.SHA256 {
			t.Errorf("%s: content hashes to %s, item says %s", ref, sha(got), it.SHA256)
		}
	case err == nil:
		body.Close()
		t.Errorf("%s: Open succeeded, want %v", ref, want.openErr)
	case want.openErr == errOther:
		if errors.Is(err, importer.ErrMissing) || errors.Is(err, importer.ErrHashMismatch) {
			t.Errorf("%s: Open: %v, want an error other than missing or mismatch", ref, err)
		}
	case !errors.Is(err, want.openErr):
		t.Errorf("%s: Open: %v, want %v", ref, err, want.openErr)
	}
}

func refs(items []importer.Item) []string {
	var out []string
	for _, it := range items {
		out = append(out, refOf(it))
	}
	return out
}

func TestFilters(t *testing.T) {
	f := newFixture(t)
	f.populate(t)
	src := f.openSource(t)
	ctx := context.Background()
	tests := []struct {
		name   string
		filter importer.Filter
		keep   func(importer.Item) bool
	}{
		{"local only", importer.Filter{}, func(it importer.Item) bool { return !it.Remote }},
		{"all", importer.Filter{IncludeRemote: true}, func(importer.Item) bool { return true }},
		{"one server", importer.Filter{ServerNames: []string{"other.example"}},
			func(it importer.Item) bool { return it.ServerName == "other.example" }},
		{"one server and remote", importer.Filter{ServerNames: []string{"other.example"}, IncludeRemote: true},
			func(it importer.Item) bool { return it.ServerName == "other.example" || it.Remote }},
		{"both servers", importer.Filter{ServerNames: []string{"example.org", "other.example"}},
			func(it importer.Item) bool { return !it.Remote }},
		{"a remote name is not local", importer.Filter{ServerNames: []string{"remote.org"}},
			func(importer.Item) bool { return false }},
		{"unknown server", importer.Filter{ServerNames: []string{"nowhere.example"}},
			func(importer.Item) bool { return false }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var want []string
			var wantBytes int64
			for ref, w := range f.media {
				if tc.keep(w.item) {
					want = append(want, ref)
					wantBytes += w.item.Size
				}
			}
			got := refs(walk(t, src, tc.filter))
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("Walk listed %v, want %v", got, want)
			}
			tot, err := src.Totals(ctx, tc.filter)
			if err != nil {
				t.Fatal(err)
			}
			if tot != (importer.Totals{Items: int64(len(want)), Bytes: wantBytes}) {
				t.Errorf("Totals = %+v, want %d items, %d bytes", tot, len(want), wantBytes)
			}
		})
	}
}

// TestEmpty opens an installation without media.
func TestEmpty(t *testing.T) {
	f := newFixture(t)
	src := f.openSource(t)
	if items := walk(t, src, importer.Filter{IncludeRemote: true}); len(items) != 0 {
		t.Errorf("Walk listed %d items", len(items))
	}
	tot, err := src.Totals(context.Background(), importer.Filter{IncludeRemote: true})
	if err != nil || tot != (importer.Totals{}) {
		t.Errorf("Totals = %+v, %v; want zero", tot, err)
	}
}

// TestReadOnly checks that the source reads in read-only transactions: a
// database whose role may not write still serves every query.
func TestReadOnly(t *testing.T) {
	f := newFixture(t)
	f.populate(t)
	ctx := context.Background()
	// Make every transaction of the database read-only unless it asks
	// otherwise, so that a statement writing anything would fail; then
	// check that the source does not depend on writes either way.
	if _, err := f.db.ExecContext(ctx, `CREATE TABLE written (x int)`); err != nil {
		t.Fatal(err)
	}
	if _, err := f.db.ExecContext(ctx, `CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN RAISE EXCEPTION 'matrix-media-repo tables were written'; END $$`); err != nil {
		t.Fatal(err)
	}
	for _, tbl := range []string{"media", "datastores", "media_attributes", "user_stats", "thumbnails"} {
		if _, err := f.db.ExecContext(ctx, `CREATE TRIGGER refuse_`+tbl+` BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON `+tbl+
			` FOR EACH STATEMENT EXECUTE FUNCTION refuse()`); err != nil {
			t.Fatal(err)
		}
	}
	src := f.openSource(t)
	items := walk(t, src, importer.Filter{IncludeRemote: true})
	if len(items) != len(f.media) {
		t.Errorf("Walk listed %d items, want %d", len(items), len(f.media))
	}
	// And the transactions are read-only: an insert through the source's
	// own connection pool inside one fails.
	err := src.readOnly(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO written VALUES (1)`)
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("insert in the source's transaction: %v, want a read-only error", err)
	}
}

func TestOpenErrors(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	write := func(t *testing.T, body string) string {
		p := filepath.Join(t.TempDir(), "media-repo.yaml")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// A database without matrix-media-repo's tables.
	emptyDSN := testpg.DSN(t)
	tests := []struct {
		name, config, wantErr string
	}{
		{"no such file", "", "no such file"},
		{"not an MMR database", fmt.Sprintf("database:\n  postgres: %q\nhomeservers:\n  - name: example.org\n", emptyDSN), "media table"},
		{"bad DSN", "database:\n  postgres: \"postgres://[bad\"\nhomeservers:\n  - name: example.org\n", "database.postgres"},
		{"bad s3 endpoint", fmt.Sprintf("database:\n  postgres: %q\nhomeservers:\n  - name: example.org\ndatastores:\n"+
			"  - type: s3\n    id: x\n    opts:\n      endpoint: https://s3.example/\n      bucketName: b\n", f.dsn), "endpoint"},
		{"two datastores for one legacy id", fmt.Sprintf("database:\n  postgres: %q\nhomeservers:\n  - name: example.org\ndatastores:\n"+
			"  - type: file\n    id: legacyid\n    opts:\n      path: /a\n  - type: file\n    opts:\n      path: %s\n", f.dsn, f.legacyDir), "legacyid"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "absent.yaml")
			if tc.config != "" {
				path = write(t, tc.config)
			}
			src, err := Open(ctx, path)
			if err == nil {
				src.Close()
				t.Fatalf("Open succeeded")
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Open: %v, want an error mentioning %q", err, tc.wantErr)
			}
		})
	}
}

// TestLegacyUnmatched opens a configuration whose datastore without id no
// row of the datastores table names: it holds no media and is no error.
func TestLegacyUnmatched(t *testing.T) {
	f := newFixture(t)
	p := filepath.Join(t.TempDir(), "media-repo.yaml")
	body := fmt.Sprintf("database:\n  postgres: %q\nhomeservers:\n  - name: example.org\ndatastores:\n"+
		"  - type: file\n    opts:\n      path: %s\n  - type: s3\n    opts:\n      endpoint: elsewhere.example\n      bucketName: bucket\n",
		f.dsn, t.TempDir())
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := Open(context.Background(), p)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	s := src.(*source)
	if len(s.all) != 2 || len(s.stores) != 1 || s.stores["s3old"] == nil {
		t.Errorf("stores %v (all %v), want only s3old named", s.stores, s.all)
	}
}
