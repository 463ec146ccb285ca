package caddymodule

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
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

func TestMigrations(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	meta, err := sqlstore.OpenSQLite(ctx, filepath.Join(dir, "m.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer meta.Close()
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
	defer stores.Close()
	for i := 0; i < 5; i++ {
		body := bytes.Repeat([]byte{byte(i)}, 1000*(i+1))
		if _, err := storage.IngestTo(ctx, stores, meta, storage.KindLocal, bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))}); err != nil {
			t.Fatal(err)
		}
	}
	ms := newMigrations(meta, stores, zap.NewNop(), func(_ string, fn func()) bool { go fn(); return true })
	ms.grace = 0
	if _, err := ms.start("a", "zzz"); !errors.Is(err, errUnknownDatastore) {
		t.Fatalf("unknown target: %v", err)
	}
	if _, err := ms.start("a", "a"); err == nil {
		t.Fatal("same datastore accepted")
	}
	id, err := ms.start("a", "b")
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		j, ok := ms.get(id)
		if !ok {
			t.Fatal("job vanished")
		}
		if !j.Progress.Running {
			if j.Error != "" || j.Progress.DoneBlobs != 5 || j.Progress.TotalBlobs != 5 || j.Progress.DoneBytes != 15000 {
				t.Fatalf("finished job %+v", j)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("migration still running: %+v", j)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n, b, err := meta.CountBlobs(ctx, "b"); err != nil || n != 5 || b != 15000 {
		t.Fatalf("b holds %d blobs, %d bytes, %v", n, b, err)
	}
	if l := ms.list(); len(l) != 1 || l[0].ID != id {
		t.Fatalf("list %+v", l)
	}
	if !ms.cancel(id) || ms.cancel("nope") {
		t.Fatal("cancel of a finished job must succeed, of an unknown one fail")
	}
	ms.stop()
	if _, err := ms.start("b", "a"); err == nil {
		t.Fatal("started after stop")
	}
}
