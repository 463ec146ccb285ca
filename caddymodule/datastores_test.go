package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/jobs"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"

	"github.com/caddyserver/caddy/v2"
)

func TestResolveDatastores(t *testing.T) {
	t.Setenv("TEST_S3_SECRET", "s3cr3t-value")
	s3 := func(mod func(*S3Config)) *S3Config {
		c := &S3Config{Bucket: "b", AccessKeyID: "k", SecretAccessKey: "{env.TEST_S3_SECRET}"}
		if mod != nil {
			mod(c)
		}
		return c
	}
	tests := []struct {
		name    string
		cfgs    []DatastoreConfig
		wantErr string
	}{
		{"file and s3", []DatastoreConfig{
			{Name: "disk", Type: "file", Path: "/tmp/x", Kinds: []string{"local"}},
			{Name: "bucket", Type: "s3", S3: s3(nil), Kinds: []string{"remote"}},
		}, ""},
		{"no name", []DatastoreConfig{{Type: "file", Path: "/x"}}, "a name is required"},
		{"twice", []DatastoreConfig{{Name: "a", Type: "file", Path: "/x"}, {Name: "a", Type: "file", Path: "/y"}}, "defined twice"},
		{"bad kind", []DatastoreConfig{{Name: "a", Type: "file", Path: "/x", Kinds: []string{"avatars"}}}, "unknown kind"},
		{"file without path", []DatastoreConfig{{Name: "a", Type: "file"}}, "needs a path"},
		{"file with s3", []DatastoreConfig{{Name: "a", Type: "file", Path: "/x", S3: s3(nil)}}, "s3 settings on a file datastore"},
		{"s3 without settings", []DatastoreConfig{{Name: "a", Type: "s3"}}, "needs s3 settings"},
		{"s3 without bucket", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) { c.Bucket = "" })}}, "needs a bucket"},
		{"s3 half credentials", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) { c.SecretAccessKey = "" })}}, "go together"},
		{"s3 no credentials", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) { c.AccessKeyID, c.SecretAccessKey = "", "" })}}, "credentials are required"},
		{"s3 env credentials", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) {
			c.AccessKeyID, c.SecretAccessKey, c.UseEnvCredentials = "", "", true
		})}}, ""},
		{"missing placeholder", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) { c.SecretAccessKey = "{env.TEST_NOT_SET_ANYWHERE}" })}}, "resolving placeholders"},
		{"redirect lifetime too long", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) {
			c.Redirect = &RedirectConfig{Lifetime: caddy.Duration(30 * 24 * time.Hour)}
		})}}, "between 1s and 7d"},
		{"bad cdn url", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) {
			c.Redirect = &RedirectConfig{CDNBaseURL: "cdn.example.org"}
		})}}, "cdn_base_url"},
		{"negative parallel parts", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) { c.ParallelParts = -1 })}}, "parallel_parts must be positive"},
		{"small parallel parts", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) { c.ParallelPartSize = 4096 })}}, "parallel_part_size must be at least"},
		{"parallel settings", []DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) { c.ParallelParts, c.ParallelPartSize = 1, 1<<20 })}}, ""},
		{"unknown type", []DatastoreConfig{{Name: "a", Type: "gcs"}}, "unknown type"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ds, err := resolveDatastores(tc.cfgs, caddy.NewReplacer())
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			if strings.Contains(err.Error(), "s3cr3t-value") {
				t.Fatalf("error leaks the secret: %v", err)
			}
			_ = ds
		})
	}

	ds, err := resolveDatastores([]DatastoreConfig{{Name: "a", Type: "s3", S3: s3(func(c *S3Config) {
		c.Redirect = &RedirectConfig{CDNBaseURL: "https://cdn.example.org/m/"}
	})}}, caddy.NewReplacer())
	if err != nil {
		t.Fatal(err)
	}
	if ds[0].S3.SecretAccessKey != "s3cr3t-value" || ds[0].Redirect.Lifetime != DefaultRedirectLifetime || ds[0].Redirect.CDN.String() != "https://cdn.example.org/m" {
		t.Fatalf("resolved %+v %+v", ds[0].S3, ds[0].Redirect)
	}
}

func TestAppRejectsStoragePathWithDatastores(t *testing.T) {
	ctx, cancel := newCaddyContext(t, nil)
	defer cancel()
	a := App{StoragePath: t.TempDir(), Datastores: []DatastoreConfig{{Name: "a", Type: "file", Path: t.TempDir(), Kinds: []string{"local"}}}}
	if err := a.Provision(ctx); err == nil || !strings.Contains(err.Error(), "cannot be combined") {
		t.Fatalf("err = %v", err)
	}
}

func TestAppWithFileDatastores(t *testing.T) {
	dir := t.TempDir()
	cfg := App{
		Database: &Database{Driver: DriverSQLite, DSN: filepath.Join(dir, "media.db")},
		Datastores: []DatastoreConfig{
			{Name: "new", Type: "file", Path: filepath.Join(dir, "new"), Kinds: []string{"local"}},
			{Name: "old", Type: "file", Path: filepath.Join(dir, "old")},
		},
	}
	a, unload := provisionApp(t, cfg)
	defer unload()
	if got := a.res.stores.Names(); len(got) != 2 || got[0] != "new" || got[1] != "old" {
		t.Fatalf("datastores %v", got)
	}
	if name, _ := a.res.stores.ForKind(storage.KindRemote); name != "new" {
		t.Fatalf("remote media go to %q, want the local datastore", name)
	}
}

// migrationFixture is a SQLite metadata store and datastores "a" (taking
// uploads, holding five blobs of 1000 to 5000 bytes) and "b", with the
// blobs' hashes in listing order.
func migrationFixture(t *testing.T) (*sqlstore.Store, *storage.Datastores, []string) {
	t.Helper()
	dir := t.TempDir()
	ctx := context.Background()
	meta, err := sqlstore.OpenSQLite(ctx, filepath.Join(dir, "m.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { meta.Close() })
	var ds []storage.Datastore
	for _, name := range []string{"a", "b"} {
		fs, err := filestore.New(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		ds = append(ds, storage.Datastore{Name: name, Store: fs})
	}
	ds[0].Kinds = []storage.Kind{storage.KindLocal}
	stores, err := storage.NewDatastores(ds...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stores.Close() })
	var hashes []string
	for i := 0; i < 5; i++ {
		body := bytes.Repeat([]byte{byte(i)}, 1000*(i+1))
		res, err := storage.IngestTo(ctx, stores, meta, storage.KindLocal, bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
		if err != nil {
			t.Fatal(err)
		}
		hashes = append(hashes, res.SHA256)
	}
	slices.Sort(hashes)
	return meta, stores, hashes
}

// newTestMigrations returns migrations on a job runner of their own (an
// instance), with no delete grace.
func newTestMigrations(t *testing.T, meta *sqlstore.Store, stores *storage.Datastores) (*migrations, *jobs.Runner) {
	t.Helper()
	runner, err := jobs.New(jobs.Options{Store: meta, Lease: 3 * time.Second, PollInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(runner.Close)
	ms := newMigrations(meta, stores, runner, zap.NewNop())
	ms.grace = 0
	return ms, runner
}

func TestMigrations(t *testing.T) {
	ctx := context.Background()
	meta, stores, _ := migrationFixture(t)
	ms, runner := newTestMigrations(t, meta, stores)
	if _, err := ms.start(ctx, "a", "zzz"); !errors.Is(err, errUnknownDatastore) {
		t.Fatalf("unknown target: %v", err)
	}
	if _, err := ms.start(ctx, "a", "a"); !errors.Is(err, errSameDatastore) {
		t.Fatalf("same datastore: %v", err)
	}
	started, err := ms.start(ctx, "a", "b")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(started.ID) || started.Progress.From != "a" || started.Progress.To != "b" ||
		started.Progress.TotalBlobs != 5 || started.Progress.TotalBytes != 15000 {
		t.Fatalf("started migration %+v", started)
	}
	if _, err := runner.Wait(ctx, started.ID); err != nil {
		t.Fatal(err)
	}
	j, ok, err := ms.get(ctx, started.ID)
	if err != nil || !ok {
		t.Fatalf("get: %v, %v", ok, err)
	}
	p := j.Progress
	if p.Running || j.Error != "" || p.DoneBlobs != 5 || p.TotalBlobs != 5 || p.DoneBytes != 15000 || p.FailedBlobs != 0 || p.Finished.IsZero() {
		t.Fatalf("finished migration %+v", j)
	}
	if n, b, err := meta.CountBlobs(ctx, "b"); err != nil || n != 5 || b != 15000 {
		t.Fatalf("b holds %d blobs, %d bytes, %v", n, b, err)
	}
	if l, err := ms.list(ctx); err != nil || len(l) != 1 || l[0].ID != started.ID {
		t.Fatalf("list %+v, %v", l, err)
	}
	if _, ok, err := ms.cancel(ctx, started.ID); !ok || err != nil {
		t.Fatalf("cancel of a finished migration: %v, %v; want it found", ok, err)
	}
	if _, ok, err := ms.get(ctx, "nope"); ok || err != nil {
		t.Fatalf("get of an unknown migration: %v, %v", ok, err)
	}
	if _, ok, err := ms.cancel(ctx, "nope"); ok || err != nil {
		t.Fatalf("cancel of an unknown migration: %v, %v", ok, err)
	}
	ms.stop()
	if _, err := ms.start(ctx, "b", "a"); !errors.Is(err, errMigrationsClosed) {
		t.Fatalf("start after stop: %v", err)
	}
}

// A migration left running by an instance that died (its row running, its
// lease expired, a checkpoint saved) is refused as a duplicate by every
// instance, and resumed by the next runner after its checkpoint: the blobs
// before it stay where they are, the rest moves, and the counters go on
// from the saved ones.
func TestMigrationResumesOnAnotherInstance(t *testing.T) {
	ctx := context.Background()
	meta, stores, hashes := migrationFixture(t)
	params, _ := json.Marshal(migrateParams{From: "a", To: "b", TotalBlobs: 5, TotalBytes: 15000})
	cursor, _ := json.Marshal(migrateCursor{After: hashes[1], FailedBlobs: 1, LastError: "blob x: earlier failure"})
	now := time.Now()
	if err := meta.CreateJob(ctx, storage.Job{
		ID: "0123456789abcdef", Kind: kindMigrate, Params: params, Cursor: string(cursor), Items: 1, Bytes: 1000,
		RequestedBy: adminAPIRequester, CreatedAt: now, UpdatedAt: now,
	}); err != nil {
		t.Fatal(err)
	}

	ms, runner := newTestMigrations(t, meta, stores)
	for _, pair := range [][2]string{{"a", "b"}, {"b", "a"}} {
		if _, err := ms.start(ctx, pair[0], pair[1]); !errors.Is(err, errMigrationRunning) {
			t.Fatalf("start %s -> %s beside the running migration: %v, want errMigrationRunning", pair[0], pair[1], err)
		}
	}
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	go runner.Run(runCtx)
	waitCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := runner.Wait(waitCtx, "0123456789abcdef"); err != nil {
		t.Fatal(err)
	}
	j, ok, err := ms.get(ctx, "0123456789abcdef")
	if err != nil || !ok {
		t.Fatalf("get: %v, %v", ok, err)
	}
	var moved int64
	for _, h := range hashes[2:] {
		rec, err := meta.GetBlob(ctx, h)
		if err != nil || rec.Datastore != "b" {
			t.Fatalf("blob after the checkpoint: %+v, %v; want it in b", rec, err)
		}
		moved += rec.Size
	}
	for _, h := range hashes[:2] {
		if rec, err := meta.GetBlob(ctx, h); err != nil || rec.Datastore != "a" {
			t.Fatalf("blob before the checkpoint: %+v, %v; want it left in a", rec, err)
		}
	}
	p := j.Progress
	if p.Running || j.Error != "" || p.DoneBlobs != 1+3 || p.DoneBytes != 1000+moved || p.FailedBlobs != 1 ||
		p.LastError != "blob x: earlier failure" || p.TotalBlobs != 5 {
		t.Fatalf("resumed migration %+v, want 3 more blobs (%d bytes) counted after the saved 1", j, moved)
	}
	// Finished, it no longer blocks a migration of the same datastores.
	again, err := ms.start(ctx, "a", "b")
	if err != nil {
		t.Fatalf("start after the resumed migration finished: %v", err)
	}
	if _, err := runner.Wait(waitCtx, again.ID); err != nil {
		t.Fatal(err)
	}
	if n, _, err := meta.CountBlobs(ctx, "b"); err != nil || n != 5 {
		t.Fatalf("b holds %d blobs, %v; want all 5", n, err)
	}
}
