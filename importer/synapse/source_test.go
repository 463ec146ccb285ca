package synapse

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/synapse/synapsetest"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

func TestMain(m *testing.M) { testpg.Main(m) }

const serverName = synapsetest.ServerName

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

func openFixture(t testing.TB, f *synapsetest.Fixture) importer.Source {
	t.Helper()
	s, err := Open(context.Background(), f.ConfigPath)
	if err != nil {
		t.Fatalf("Open(%s): %v", f.ConfigPath, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func TestSource(t *testing.T) {
	for _, e := range synapsetest.Engines() {
		for _, withSHA := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/sha256=%v", e.Name, withSHA), func(t *testing.T) {
				f := synapsetest.New(t, e, withSHA)
				wants := f.Populate()
				var want []importer.Item
				for _, w := range wants {
					want = append(want, w.Item)
				}
				s := openFixture(t, f)
				testName(t, f, s)
				testWalk(t, s, want)
				testOpen(t, s, wants)
				testFilters(t, s, want)
			})
		}
	}
}

func testName(t *testing.T, f *synapsetest.Fixture, s importer.Source) {
	db := "postgres"
	if !f.PG {
		db = "sqlite3 " + filepath.Join(f.Dir, "homeserver.db")
	}
	want := fmt.Sprintf("synapse (%s, %s, %s; unreadable storage providers: s3_storage_provider.S3StorageProviderBackend)",
		db, filepath.Join(f.Dir, "media_store"), filepath.Join(f.Dir, "backup"))
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

func testOpen(t *testing.T, s importer.Source, wants []synapsetest.Want) {
	ctx := context.Background()
	byRef := map[storage.MediaRef]synapsetest.Want{}
	for _, w := range wants {
		byRef[w.Item.Ref()] = w
	}
	for _, it := range walkAll(t, s, importer.Filter{IncludeRemote: true}) {
		w, ok := byRef[it.Ref()]
		if !ok {
			t.Errorf("unexpected item %s/%s", it.ServerName, it.MediaID)
			continue
		}
		rc, err := it.Open(ctx)
		if w.OpenErr != nil {
			if rc != nil {
				_ = rc.Close()
			}
			if !errors.Is(err, w.OpenErr) {
				t.Errorf("Open(%s) error %v, want %v", it.MediaID, err, w.OpenErr)
			}
			if w.OpenErr == importer.ErrInvalid && !errors.Is(err, ErrInvalidPath) {
				t.Errorf("Open(%s) error %v, want ErrInvalidPath", it.MediaID, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("Open(%s): %v", it.MediaID, err)
			continue
		}
		b, err := io.ReadAll(rc)
		_ = rc.Close()
		if err != nil || !bytes.Equal(b, w.Body) {
			t.Errorf("Open(%s) read %q, %v; want %q", it.MediaID, b, err, w.Body)
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
	for _, e := range synapsetest.Engines() {
		t.Run(e.Name, func(t *testing.T) {
			f := synapsetest.New(t, e, true)
			f.InsertLocal(synapsetest.LocalRow{ID: "firstMedia000001", MediaType: "text/plain", Length: 1, Created: synapsetest.Created0})
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
			if f.PG {
				var ro string
				if err := s.db.QueryRowContext(ctx, "SHOW default_transaction_read_only").Scan(&ro); err != nil || ro != "on" {
					t.Errorf("default_transaction_read_only = %q, %v; want on", ro, err)
				}
			}
			var n int
			var qb sql.NullString
			if err := f.DB.QueryRow("SELECT COUNT(*), MAX(quarantined_by) FROM local_media_repository").Scan(&n, &qb); err != nil {
				t.Fatal(err)
			}
			if n != 1 || qb.Valid {
				t.Errorf("database changed: %d rows, quarantined_by %v", n, qb)
			}
			// Synapse keeps running and adds a row: the next walk sees it.
			f.InsertLocal(synapsetest.LocalRow{ID: "secondMedia00002", MediaType: "text/plain", Length: 2, Created: synapsetest.Created0 + 1})
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
	for _, e := range synapsetest.Engines() {
		t.Run(e.Name, func(t *testing.T) {
			f := synapsetest.New(t, e, true)
			tx, err := f.DB.Begin()
			if err != nil {
				t.Fatal(err)
			}
			insL, err := tx.Prepare(rebind(`INSERT INTO local_media_repository (media_id, media_type, media_length,
				created_ts, user_id) VALUES (?, 'text/plain', ?, ?, '@u:syn.example')`, f.PG))
			if err != nil {
				t.Fatal(err)
			}
			var wantBytes int64
			for i := 0; i < nLocal; i++ {
				// Inserted in reverse order: the walk must sort.
				if _, err := insL.Exec(fmt.Sprintf("media%06d", nLocal-1-i), i, synapsetest.Created0+int64(i)); err != nil {
					t.Fatal(err)
				}
				wantBytes += int64(i)
			}
			insR, err := tx.Prepare(rebind(`INSERT INTO remote_media_cache (media_origin, media_id, media_type,
				media_length, created_ts, filesystem_id) VALUES (?, ?, 'image/png', 10, ?, 'abcdefghijklmnopqrstuvwx')`, f.PG))
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < nRemote; i++ {
				// Three origins, so pages cross origin boundaries.
				if _, err := insR.Exec(fmt.Sprintf("origin%d.example", i%3), fmt.Sprintf("r%04d", i), synapsetest.Created0); err != nil {
					t.Fatal(err)
				}
			}
			if err := tx.Commit(); err != nil {
				t.Fatal(err)
			}
			cfg, err := LoadConfig(f.ConfigPath)
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
