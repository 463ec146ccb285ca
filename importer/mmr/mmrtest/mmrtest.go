// Package mmrtest builds matrix-media-repo installations for tests: its
// database schema (testdata/schema.sql, from its migrations) on a fresh
// PostgreSQL database, file datastores, an S3 datastore on the S3 test
// server, and a media-repo.yaml naming them; and a set of representative
// rows (local, remote, quarantined, pinned, deduplicated, Unicode names,
// missing and altered content, unreadable locations, invalid IDs) with
// what a walk lists and an import makes of each.
//
// Tests that use it need testpg.Main in their TestMain.
package mmrtest

import (
	"bytes"
	"cmp"
	"context"
	"database/sql"
	"errors"
	// The schema.
	_ "embed"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	// The "pgx" database/sql driver.
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
)

//go:embed testdata/schema.sql
var schemaSQL string

// QuarantinedBy is the actor an import records for media matrix-media-repo
// quarantined (it records none of its own).
const QuarantinedBy = "imported from matrix-media-repo"

// Datastore ids of the fixture's configuration.
const (
	// FileStore is a file datastore at FileDir.
	FileStore = "files1"
	// S3Store is the S3 datastore.
	S3Store = "s3main"
	// LegacyStore is the id the datastores table gives the file datastore
	// at LegacyDir, which the configuration lists without id.
	LegacyStore = "legacyid"
	// GoneStore is a file datastore whose directory does not exist.
	GoneStore = "gone"
)

// Fixture is a matrix-media-repo installation: database, a file
// datastore, an S3 datastore, a datastore configured without id (named by
// the datastores table), a datastore whose directory is gone, and its
// media-repo.yaml. Its local homeservers are example.org and
// other.example.
type Fixture struct {
	// DSN and DB are its database.
	DSN string
	DB  *sql.DB
	// S3 is the server of the S3 datastore; S3Client reaches it.
	S3       *tests3.Server
	S3Client *s3.Client
	// FileDir and LegacyDir are the directories of FileStore and
	// LegacyStore; OutsideDir holds a file no row may reach.
	FileDir, LegacyDir, OutsideDir string
	// ConfigPath is media-repo.yaml.
	ConfigPath string
	// Media is what each row added becomes, by "origin/media_id".
	Media map[string]Want
}

// Want is what one row becomes: the item Walk lists (without Open), what
// opening its bytes gives, and what an import makes of it.
type Want struct {
	importtest.Expect
	// OpenErr is what Open's error wraps (importer.ErrMissing,
	// importer.ErrHashMismatch, importer.ErrInvalid, or ErrOther); nil when
	// Open gives the stored bytes.
	OpenErr error
}

// ErrOther stands for an error of Open that wraps neither
// importer.ErrMissing, importer.ErrHashMismatch nor importer.ErrInvalid
// (an unknown datastore, a gone directory, a symbolic link out of the
// datastore, a file that is not a regular file).
var ErrOther = errors.New("another error")

// Row is one media row the fixture inserts.
type Row struct {
	Origin, MediaID, Name, ContentType, User string
	// Content is what matrix-media-repo stored: its size and (unless Hash
	// is set) its hash are recorded.
	Content []byte
	// Hash is the recorded sha256_hash; default: Content's.
	Hash    string
	Created int64
	// Quarantined and Pinned are the row's flags.
	Quarantined, Pinned bool
	// Datastore and Location say where the bytes are.
	Datastore, Location string
	// Store puts the content in the datastore; false leaves it missing.
	Store bool
	// Altered, when set, is stored instead of Content: bytes changed after
	// matrix-media-repo recorded their hash.
	Altered []byte
}

// New creates the database, the S3 bucket's server, the directories and
// media-repo.yaml, without media.
func New(t testing.TB) *Fixture {
	t.Helper()
	ctx := context.Background()
	f := &Fixture{
		DSN:        testpg.DSN(t),
		S3:         tests3.Start(t),
		FileDir:    t.TempDir(),
		LegacyDir:  t.TempDir(),
		OutsideDir: t.TempDir(),
		Media:      map[string]Want{},
	}
	db, err := sql.Open("pgx", f.DSN)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	f.DB = db
	if _, err := db.ExecContext(ctx, schemaSQL); err != nil {
		t.Fatalf("creating matrix-media-repo's schema: %v", err)
	}
	f.S3Client = s3.New(s3.Options{
		BaseEndpoint: aws.String(f.S3.URL()),
		Region:       "us-east-1",
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(f.S3.AccessKey(), f.S3.SecretKey(), ""),
	})
	// matrix-media-repo before 1.3 named the legacy datastore here.
	if _, err := db.ExecContext(ctx, `INSERT INTO datastores (datastore_id, ds_type, uri) VALUES ($1, 'file', $2),
		('s3old', 's3', 's3://elsewhere.example/bucket')`, LegacyStore, f.LegacyDir); err != nil {
		t.Fatal(err)
	}
	f.writeConfig(t)
	return f
}

// writeConfig writes media-repo.yaml, in the shape of matrix-media-repo's
// sample configuration.
func (f *Fixture) writeConfig(t testing.TB) {
	t.Helper()
	endpoint := strings.TrimPrefix(f.S3.URL(), "http://")
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
    id: %q
    forKinds: ["thumbnails", "local_media"]
    opts:
      path: %s
  - type: s3
    id: %q
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
    id: %q
    forKinds: []
    opts:
      path: %s
archiving:
  enabled: true
`, f.DSN, FileStore, f.FileDir, S3Store, endpoint, f.S3.AccessKey(), f.S3.SecretKey(), f.S3.Bucket(),
		f.LegacyDir, GoneStore, filepath.Join(f.FileDir, "no-such-dir"))
	f.ConfigPath = filepath.Join(t.TempDir(), "media-repo.yaml")
	if err := os.WriteFile(f.ConfigPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
}

// Add inserts r, stores its content, and records what it should become:
// Open gives the stored bytes or fails with openErr, and an import
// reports problem (empty: imports it).
func (f *Fixture) Add(t testing.TB, r Row, openErr error, problem importer.ProblemKind) {
	t.Helper()
	ctx := context.Background()
	if r.Hash == "" {
		r.Hash = importtest.SHA256(r.Content)
	}
	stored := r.Content
	if r.Altered != nil {
		stored = r.Altered
	}
	if r.Store {
		f.Put(t, r.Datastore, r.Location, stored)
	}
	if _, err := f.DB.ExecContext(ctx, `INSERT INTO media (origin, media_id, upload_name, content_type, user_id, sha256_hash,
		size_bytes, creation_ts, quarantined, datastore_id, location) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)`,
		r.Origin, r.MediaID, r.Name, r.ContentType, r.User, r.Hash, len(r.Content), r.Created, r.Quarantined, r.Datastore, r.Location); err != nil {
		t.Fatal(err)
	}
	if _, err := f.DB.ExecContext(ctx, `INSERT INTO user_stats (user_id, uploaded_bytes) VALUES ($1, $2)
		ON CONFLICT (user_id) DO UPDATE SET uploaded_bytes = user_stats.uploaded_bytes + $2`, r.User, len(r.Content)); err != nil {
		t.Fatal(err)
	}
	purpose := "none"
	if r.Pinned {
		purpose = "pinned"
	}
	if _, err := f.DB.ExecContext(ctx, `INSERT INTO media_attributes (origin, media_id, purpose) VALUES ($1, $2, $3)`,
		r.Origin, r.MediaID, purpose); err != nil {
		t.Fatal(err)
	}
	local := r.Origin == "example.org" || r.Origin == "other.example"
	it := importer.Item{
		ServerName:  r.Origin,
		MediaID:     r.MediaID,
		Remote:      !local,
		ContentType: r.ContentType,
		Filename:    r.Name,
		CreatedAt:   time.UnixMilli(r.Created).UTC(),
		Size:        int64(len(r.Content)),
		SHA256:      strings.ToLower(r.Hash),
		Protected:   r.Pinned,
	}
	if local {
		it.UserID = r.User
	}
	if r.Quarantined {
		it.QuarantinedBy = QuarantinedBy
	}
	if openErr == importer.ErrHashMismatch {
		// A recorded hash that is no SHA-256 is not listed.
		it.SHA256 = ""
	}
	var body []byte
	if openErr == nil || openErr == importer.ErrHashMismatch {
		// A hash that cannot be checked: the bytes are never read, and
		// must not be stored.
		body = stored
	}
	f.Media[r.Origin+"/"+r.MediaID] = Want{Expect: importtest.Expect{Item: it, Body: body, Problem: problem}, OpenErr: openErr}
}

// Put stores content at location in datastore ds, as matrix-media-repo
// would have.
func (f *Fixture) Put(t testing.TB, ds, location string, content []byte) {
	t.Helper()
	switch ds {
	case FileStore, LegacyStore:
		dir := f.FileDir
		if ds == LegacyStore {
			dir = f.LegacyDir
		}
		p := filepath.Join(dir, filepath.FromSlash(location))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, content, 0o644); err != nil {
			t.Fatal(err)
		}
	case S3Store:
		_, err := f.S3Client.PutObject(context.Background(), &s3.PutObjectInput{
			Bucket: aws.String(f.S3.Bucket()), Key: aws.String(location), Body: bytes.NewReader(content),
		})
		if err != nil {
			t.Fatalf("uploading %s: %v", location, err)
		}
	default:
		t.Fatalf("no datastore %q to put content in", ds)
	}
}

// Expects returns the import expectations of every row added, ordered by
// origin and media ID.
func (f *Fixture) Expects() []importtest.Expect {
	keys := slices.SortedFunc(maps.Keys(f.Media), func(a, b string) int { return cmp.Compare(a, b) })
	out := make([]importtest.Expect, 0, len(keys))
	for _, k := range keys {
		out = append(out, f.Media[k].Expect)
	}
	return out
}

// Populate inserts the representative rows:
//
//   - imported: files in the file datastore, the datastore without id and
//     S3 (a Unicode name), remote media, a quarantined, a pinned and a
//     pinned quarantined item, two items sharing one stored object, a hash
//     recorded in capitals;
//   - missing: a file and an object never written, and a quarantined item
//     whose object is gone (its quarantine is carried over by hash);
//   - mismatched: a recorded hash that is no SHA-256, and a file
//     overwritten after its hash was recorded;
//   - invalid: a media ID with '=', a location leaving the datastore;
//   - failed: an unknown datastore, a datastore whose directory is gone, a
//     symbolic link out of the datastore, a named pipe and a directory.
func (f *Fixture) Populate(t testing.TB) {
	t.Helper()
	png := append([]byte("\x89PNG\r\n\x1a\n"), bytes.Repeat([]byte{7}, 3000)...)
	dup := []byte("the same bytes uploaded twice")
	const base = int64(1_700_000_000_123)
	rows := []struct {
		r       Row
		err     error
		problem importer.ProblemKind
	}{
		{Row{Origin: "example.org", MediaID: "LocalFile1", Name: "cat.png", ContentType: "image/png", User: "@alice:example.org",
			Content: png, Created: base, Datastore: FileStore, Location: "ab/cd/efghLocalFile1idv2fmt", Store: true}, nil, ""},
		{Row{Origin: "example.org", MediaID: "LocalS3Unicode", Name: "Ünïcødé 猫 🐱 «name».txt", ContentType: "text/plain; charset=utf-8",
			User: "@bob:example.org", Content: []byte("héllo wörld ✓\n"), Created: base + 1,
			Datastore: S3Store, Location: "Xyz/XyzUnicodeObjectidv2fmt", Store: true}, nil, ""},
		{Row{Origin: "remote.org", MediaID: "Remote1", ContentType: "application/octet-stream",
			Content: []byte("cached from remote.org"), Created: base + 2, Datastore: S3Store, Location: "Rem/RemoteObjidv2fmt", Store: true}, nil, ""},
		{Row{Origin: "example.org", MediaID: "QuarantinedKept", Name: "bad.jpg", ContentType: "image/jpeg", User: "@mallory:example.org",
			Content: []byte("quarantined but kept"), Created: base + 3, Quarantined: true, Datastore: FileStore,
			Location: "qq/kk/QuarantinedKeptidv2fmt", Store: true}, nil, ""},
		{Row{Origin: "example.org", MediaID: "QuarantinedGone", Name: "worse.jpg", ContentType: "image/jpeg", User: "@mallory:example.org",
			Content: []byte("quarantined and deleted"), Created: base + 4, Quarantined: true, Datastore: S3Store,
			Location: "Qgo/QgoneObjidv2fmt"}, importer.ErrMissing, importer.ProblemMissing},
		{Row{Origin: "example.org", MediaID: "DedupA", Name: "a.txt", ContentType: "text/plain", User: "@alice:example.org",
			Content: dup, Created: base + 5, Datastore: S3Store, Location: "Ddd/DedupObjidv2fmt", Store: true}, nil, ""},
		{Row{Origin: "other.example", MediaID: "DedupB", Name: "b.txt", ContentType: "text/plain", User: "@carol:other.example",
			Content: dup, Created: base + 6, Datastore: S3Store, Location: "Ddd/DedupObjidv2fmt"}, nil, ""},
		{Row{Origin: "example.org", MediaID: "MissingFile", Name: "lost.bin", ContentType: "application/octet-stream", User: "@bob:example.org",
			Content: []byte("never written"), Created: base + 7, Datastore: FileStore, Location: "mi/ss/MissingFileidv2fmt"},
			importer.ErrMissing, importer.ProblemMissing},
		{Row{Origin: "example.org", MediaID: "MissingObject", Name: "lost2.bin", ContentType: "application/octet-stream", User: "@bob:example.org",
			Content: []byte("never uploaded"), Created: base + 8, Datastore: S3Store, Location: "Mis/MissingObjidv2fmt"},
			importer.ErrMissing, importer.ProblemMissing},
		{Row{Origin: "example.org", MediaID: "UnknownStore", Name: "u.bin", ContentType: "application/octet-stream", User: "@bob:example.org",
			Content: []byte("in a datastore nobody configured"), Created: base + 9, Datastore: "removed-datastore", Location: "aa/bb/cc"},
			ErrOther, importer.ProblemFailed},
		{Row{Origin: "example.org", MediaID: "LegacyFile", Name: "old.gif", ContentType: "image/gif", User: "@alice:example.org",
			Content: []byte("GIF89a from 2019"), Created: base + 10, Datastore: LegacyStore, Location: "le/ga/LegacyFile", Store: true}, nil, ""},
		{Row{Origin: "example.org", MediaID: "Pinned", Name: "pinned.txt", ContentType: "text/plain", User: "@admin:example.org",
			Content: []byte("pinned by an admin"), Created: base + 11, Pinned: true, Datastore: FileStore, Location: "pi/nn/Pinned", Store: true}, nil, ""},
		{Row{Origin: "example.org", MediaID: "PinnedQuarantined", Name: "pq.txt", ContentType: "text/plain", User: "@admin:example.org",
			Content: []byte("pinned, then quarantined"), Created: base + 12, Pinned: true, Quarantined: true, Datastore: FileStore,
			Location: "pi/nq/PinnedQuarantined", Store: true}, nil, ""},
		{Row{Origin: "example.org", MediaID: "BadHash", Name: "h.bin", ContentType: "application/octet-stream", User: "@bob:example.org",
			Content: []byte("recorded hash is garbage"), Hash: "not-a-sha256", Created: base + 13, Datastore: FileStore,
			Location: "ba/dh/BadHash", Store: true}, importer.ErrHashMismatch, importer.ProblemMismatch},
		{Row{Origin: "example.org", MediaID: "Overwritten", Name: "o.txt", ContentType: "text/plain", User: "@bob:example.org",
			Content: []byte("the bytes that were hashed"), Altered: []byte("the bytes written over it!"), Created: base + 14,
			Datastore: FileStore, Location: "ov/er/Overwritten", Store: true}, nil, importer.ProblemMismatch},
		{Row{Origin: "example.org", MediaID: "Escape", Name: "e.txt", ContentType: "text/plain", User: "@bob:example.org",
			Content: []byte("outside the datastore"), Created: base + 15, Datastore: FileStore, Location: "../outside.txt"},
			importer.ErrInvalid, importer.ProblemInvalid},
		{Row{Origin: "example.org", MediaID: "GoneDir", Name: "g.txt", ContentType: "text/plain", User: "@bob:example.org",
			Content: []byte("datastore directory removed"), Created: base + 16, Datastore: GoneStore, Location: "go/ne/GoneDir"},
			ErrOther, importer.ProblemFailed},
		{Row{Origin: "example.org", MediaID: "Symlink", Name: "s.txt", ContentType: "text/plain", User: "@bob:example.org",
			Content: []byte("a link out of the datastore"), Created: base + 17, Datastore: FileStore, Location: "sy/ml/Symlink"},
			ErrOther, importer.ProblemFailed},
		{Row{Origin: "example.org", MediaID: "UpperHash", Name: "u.txt", ContentType: "text/plain", User: "@bob:example.org",
			Content: []byte("hash recorded in capitals"), Hash: strings.ToUpper(importtest.SHA256([]byte("hash recorded in capitals"))),
			Created: base + 18, Datastore: FileStore, Location: "up/pe/UpperHash", Store: true}, nil, ""},
		{Row{Origin: "example.org", MediaID: "Fifo", Name: "f.txt", ContentType: "text/plain", User: "@bob:example.org",
			Content: []byte("a named pipe, not a file"), Created: base + 19, Datastore: FileStore, Location: "fi/fo/Fifo"},
			ErrOther, importer.ProblemFailed},
		{Row{Origin: "example.org", MediaID: "Directory", Name: "d.txt", ContentType: "text/plain", User: "@bob:example.org",
			Content: []byte("a directory, not a file"), Created: base + 20, Datastore: FileStore, Location: "di/re"},
			ErrOther, importer.ProblemFailed},
		{Row{Origin: "example.org", MediaID: "Bad=Id", Name: "eq.txt", ContentType: "text/plain", User: "@bob:example.org",
			Content: []byte("an ID with an equals sign"), Created: base + 21, Datastore: FileStore, Location: "ba/d=/Bad=Id", Store: true},
			nil, importer.ProblemInvalid},
	}
	for _, r := range rows {
		f.Add(t, r.r, r.err, r.problem)
	}
	f.makeTraps(t)
}

// makeTraps makes what the rows Fifo, Directory, Escape and Symlink point
// at: a named pipe nobody writes to (opening it must not block), a
// directory, and files outside the datastore that must never be read.
func (f *Fixture) makeTraps(t testing.TB) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(f.FileDir, "fi", "fo"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(filepath.Join(f.FileDir, "fi", "fo", "Fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(f.FileDir, "di", "re"), 0o755); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(f.OutsideDir, "outside.txt")
	if err := os.WriteFile(secret, []byte("outside the datastore"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(filepath.Dir(f.FileDir), "outside.txt"), []byte("outside the datastore"), 0o644); err != nil && !os.IsPermission(err) {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(f.FileDir, "sy", "ml"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(secret, filepath.Join(f.FileDir, "sy", "ml", "Symlink")); err != nil {
		t.Fatal(err)
	}
}
