package importtest

import (
	"context"
	"fmt"
	"io/fs"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testmeta"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/s3store"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// Names of a Target's datastores.
const (
	// LocalStore holds local media: a directory, or an S3 bucket.
	LocalStore = "media"
	// RemoteStore holds remote media: always a directory.
	RemoteStore = "remote"
)

// Now is the clock of every Target's sink: quarantines carried over carry
// this time, so that they compare equal between runs and targets.
func Now() time.Time { return time.UnixMilli(1_700_000_000_000).UTC() }

// Target is a real store that imports of a test write into: a metadata
// store (SQLite or PostgreSQL), the datastores LocalStore and RemoteStore,
// and a StoreSink over them with the clock Now. Everything is removed when
// the test ends. A test that uses the PostgreSQL backend needs
// testpg.Main in its TestMain.
type Target struct {
	// Meta is the metadata store.
	Meta *sqlstore.Store
	// Stores are the datastores.
	Stores *storage.Datastores
	// Sink writes into Meta and Stores.
	Sink *importer.StoreSink
	// Dirs are the roots of the file datastores, LocalStore's first when it
	// is a directory.
	Dirs []string
	// S3 is the S3 server holding LocalStore, nil when that is a directory.
	S3 *tests3.Server
	// dirStores name the datastore of each of Dirs.
	dirStores []string
}

// Backend opens fresh Targets of one kind.
type Backend struct {
	// Name describes it, e.g. "sqlite+files", for subtest names.
	Name string
	// Open opens a fresh, empty Target.
	Open func(t testing.TB) *Target
}

// Backends are the kinds of Target: SQLite or PostgreSQL metadata with a
// file datastore for local media, and SQLite with an S3 one.
func Backends() []Backend {
	return []Backend{
		{"sqlite+files", func(t testing.TB) *Target { return newFileTarget(t, testmeta.SQLite(t)) }},
		{"postgres+files", func(t testing.TB) *Target { return newFileTarget(t, testmeta.Postgres(t)) }},
		{"sqlite+s3", func(t testing.TB) *Target { return newS3Target(t, testmeta.SQLite(t)) }},
	}
}

// BackendNamed returns the backend of Backends named name; it fails the test
// when there is none.
func BackendNamed(t testing.TB, name string) Backend {
	t.Helper()
	for _, b := range Backends() {
		if b.Name == name {
			return b
		}
	}
	t.Fatalf("no import target backend %q", name)
	return Backend{}
}

// fileStore opens a file datastore in a fresh directory.
func fileStore(t testing.TB) (storage.BlobStore, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := filestore.New(dir)
	if err != nil {
		t.Fatalf("filestore.New: %v", err)
	}
	return s, dir
}

// newFileTarget is a Target whose datastores are both directories.
func newFileTarget(t testing.TB, meta *sqlstore.Store) *Target {
	local, dir := fileStore(t)
	return newTarget(t, meta, local, dir)
}

// newS3Target is a Target whose LocalStore is an S3 bucket.
func newS3Target(t testing.TB, meta *sqlstore.Store) *Target {
	t.Helper()
	srv := tests3.Start(t)
	local, err := s3store.New(context.Background(), s3store.Config{
		Endpoint: srv.URL(), Bucket: srv.Bucket(), PathStyle: true,
		AccessKeyID: srv.AccessKey(), SecretAccessKey: srv.SecretKey(), RetryMaxBackoff: 20 * time.Millisecond,
	})
	if err != nil {
		t.Fatalf("s3store.New: %v", err)
	}
	tg := newTarget(t, meta, local, "")
	tg.S3 = srv
	return tg
}

// newTarget completes a Target: local is LocalStore (localDir its root
// when it is a directory), and RemoteStore a fresh directory.
func newTarget(t testing.TB, meta *sqlstore.Store, local storage.BlobStore, localDir string) *Target {
	t.Helper()
	remote, remoteDir := fileStore(t)
	ds, err := storage.NewDatastores(
		storage.Datastore{Name: LocalStore, Store: local, Kinds: []storage.Kind{storage.KindLocal}},
		storage.Datastore{Name: RemoteStore, Store: remote, Kinds: []storage.Kind{storage.KindRemote}},
	)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ds.Close() })
	tg := &Target{Meta: meta, Stores: ds, Sink: &importer.StoreSink{Meta: meta, Stores: ds, Now: Now}}
	if localDir != "" {
		tg.Dirs, tg.dirStores = append(tg.Dirs, localDir), append(tg.dirStores, LocalStore)
	}
	tg.Dirs, tg.dirStores = append(tg.Dirs, remoteDir), append(tg.dirStores, RemoteStore)
	return tg
}

// FileInfo is what is compared of a file in a datastore directory.
type FileInfo struct {
	Size    int64
	ModTime time.Time
}

// State is what a Target holds, for comparisons between runs and between
// targets.
type State struct {
	// Rows are the ready media rows (LastAccessAt cleared).
	Rows map[storage.MediaRef]storage.Media
	// Blobs are the blob records by datastore (CreatedAt cleared).
	Blobs map[string][]storage.BlobRecord
	// Quarantines are the quarantines of the hashes asked about.
	Quarantines map[string]storage.Quarantine
	// Files are the regular files of the file datastores, by "<index in
	// Dirs>/<path below it>".
	Files map[string]FileInfo
	// Objects are the keys of the S3 bucket, sorted.
	Objects []string
}

// maxListed bounds the rows and blobs a snapshot reads: far more than any
// test imports.
const maxListed = 100_000

// Snapshot reads the Target's state; quarantines are read for hashes.
func (tg *Target) Snapshot(t testing.TB, hashes ...string) State {
	t.Helper()
	ctx := context.Background()
	st := State{Rows: map[storage.MediaRef]storage.Media{}, Blobs: map[string][]storage.BlobRecord{},
		Quarantines: map[string]storage.Quarantine{}, Files: map[string]FileInfo{}}
	for _, remote := range []bool{false, true} {
		// SizeGreaterThan -1: empty media too.
		rows, err := tg.Meta.ListOldMedia(ctx, storage.OldMediaQuery{Remote: remote, Before: time.Now().Add(time.Hour),
			SizeGreaterThan: -1, IncludeQuarantined: true, IncludeProtected: true, Limit: maxListed})
		if err != nil {
			t.Fatalf("ListOldMedia: %v", err)
		}
		for _, m := range rows {
			m.LastAccessAt = time.Time{}
			st.Rows[storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID}] = m
		}
	}
	for _, name := range tg.Stores.Names() {
		recs, err := tg.Meta.ListBlobs(ctx, name, "", maxListed)
		if err != nil {
			t.Fatalf("ListBlobs: %v", err)
		}
		for i := range recs {
			recs[i].CreatedAt = time.Time{}
		}
		st.Blobs[name] = recs
	}
	for _, h := range hashes {
		if q, err := tg.Meta.GetQuarantine(ctx, h); err == nil {
			st.Quarantines[q.SHA256] = q
		}
	}
	for i, dir := range tg.Dirs {
		for rel, fi := range files(t, dir) {
			st.Files[fmt.Sprintf("%d/%s", i, rel)] = fi
		}
	}
	if tg.S3 != nil {
		st.Objects = slices.Sorted(slices.Values(tg.S3.Objects(t)))
	}
	return st
}

// files lists the regular files below dir by their slash-separated path.
func files(t testing.TB, dir string) map[string]FileInfo {
	t.Helper()
	out := map[string]FileInfo{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		out[filepath.ToSlash(rel)] = FileInfo{Size: fi.Size(), ModTime: fi.ModTime()}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Diff describes how b differs from a, "" when it does not: rows, blob
// records, quarantines (who and when), the names and sizes of the files
// and the S3 keys. File times are not compared (see Touched): two targets
// holding the same never have the same times.
func (a State) Diff(b State) string {
	var out []string
	for r, m := range a.Rows {
		if n, ok := b.Rows[r]; !ok {
			out = append(out, fmt.Sprintf("row %v missing", r))
		} else if !EqualMedia(m, n) {
			out = append(out, fmt.Sprintf("row %v: %+v vs %+v", r, m, n))
		}
	}
	for r := range b.Rows {
		if _, ok := a.Rows[r]; !ok {
			out = append(out, fmt.Sprintf("extra row %v", r))
		}
	}
	if !maps.EqualFunc(a.Blobs, b.Blobs, slices.Equal) {
		out = append(out, fmt.Sprintf("blobs %v vs %v", a.Blobs, b.Blobs))
	}
	if !maps.EqualFunc(a.Quarantines, b.Quarantines, func(x, y storage.Quarantine) bool { return x.By == y.By && x.At.Equal(y.At) }) {
		out = append(out, fmt.Sprintf("quarantines %v vs %v", a.Quarantines, b.Quarantines))
	}
	if !maps.EqualFunc(a.Files, b.Files, func(x, y FileInfo) bool { return x.Size == y.Size }) {
		out = append(out, fmt.Sprintf("files %v vs %v", a.Files, b.Files))
	}
	if !slices.Equal(a.Objects, b.Objects) {
		out = append(out, fmt.Sprintf("S3 objects %v vs %v", a.Objects, b.Objects))
	}
	return strings.Join(out, "\n")
}

// Touched lists the files of a whose modification time differs in b: a
// second import that writes nothing touches none.
func (a State) Touched(b State) []string {
	var out []string
	for p, fi := range a.Files {
		if g, ok := b.Files[p]; ok && !g.ModTime.Equal(fi.ModTime) {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}

// EqualMedia compares two media rows, their times with time.Equal.
func EqualMedia(a, b storage.Media) bool {
	ta, tb := []time.Time{a.CreatedAt, a.UploadedAt, a.ExpiresAt, a.QuarantinedAt, a.LastAccessAt},
		[]time.Time{b.CreatedAt, b.UploadedAt, b.ExpiresAt, b.QuarantinedAt, b.LastAccessAt}
	for i := range ta {
		if !ta[i].Equal(tb[i]) {
			return false
		}
	}
	a.CreatedAt, a.UploadedAt, a.ExpiresAt, a.QuarantinedAt, a.LastAccessAt = time.Time{}, time.Time{}, time.Time{}, time.Time{}, time.Time{}
	b.CreatedAt, b.UploadedAt, b.ExpiresAt, b.QuarantinedAt, b.LastAccessAt = time.Time{}, time.Time{}, time.Time{}, time.Time{}, time.Time{}
	return a == b
}
