package mmr

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
	"slices"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/mmr/mmrtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// fixture is a matrix-media-repo installation (see mmrtest.Fixture).
type fixture struct{ *mmrtest.Fixture }

func newFixture(t *testing.T) fixture { return fixture{mmrtest.New(t)} }

func sha(b []byte) string { return importtest.SHA256(b) }

// openSource opens the fixture's configuration.
func (f fixture) openSource(t *testing.T) *source {
	t.Helper()
	src, err := Open(context.Background(), f.ConfigPath)
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
	f.Populate(t)
	src := f.openSource(t)
	ctx := context.Background()

	all := importer.Filter{IncludeRemote: true}
	items := walk(t, src, all)
	if len(items) != len(f.Media) {
		t.Fatalf("Walk listed %d items, want %d", len(items), len(f.Media))
	}
	seen := map[string]bool{}
	for _, it := range items {
		ref := refOf(it)
		if seen[ref] {
			t.Errorf("%s listed twice", ref)
		}
		seen[ref] = true
		want, ok := f.Media[ref]
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
		if !reflect.DeepEqual(got, want.Item) {
			t.Errorf("%s:\n got %+v\nwant %+v", ref, got, want.Item)
		}
		checkOpen(t, ref, it, want)
	}

	t.Run("Totals", func(t *testing.T) {
		tot, err := src.Totals(ctx, all)
		if err != nil {
			t.Fatal(err)
		}
		var bytes int64
		for _, w := range f.Media {
			bytes += w.Item.Size
		}
		if tot != (importer.Totals{Items: int64(len(f.Media)), Bytes: bytes}) {
			t.Errorf("Totals = %+v, want %d items, %d bytes", tot, len(f.Media), bytes)
		}
	})

	t.Run("Pages", func(t *testing.T) {
		// The same listing, in the same order, read two rows at a time.
		for _, size := range []int{1, 2, 3, len(f.Media), len(f.Media) + 1} {
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
		for _, want := range []string{"matrix-media-repo", `"files1"`, f.FileDir, `"s3main"`, f.S3.Bucket(), f.LegacyDir} {
			if !strings.Contains(name, want) {
				t.Errorf("Name() = %q, lacks %q", name, want)
			}
		}
	})
}

// checkOpen opens it and compares what it gives with want.
func checkOpen(t *testing.T, ref string, it importer.Item, want mmrtest.Want) {
	t.Helper()
	body, err := it.Open(context.Background())
	switch {
	case want.OpenErr == nil:
		if err != nil {
			t.Errorf("%s: Open: %v", ref, err)
			return
		}
		got, err := io.ReadAll(body)
		body.Close()
		if err != nil {
			t.Errorf("%s: reading: %v", ref, err)
		}
		if !bytes.Equal(got, want.Body) {
			t.Errorf("%s: content %q, want %q", ref, got, want.Body)
		}
		// Bytes changed since their hash was recorded are given as they
		// are: the import's verifier tells.
		if matches := sha(got) == it.SHA256; matches != (want.Problem != importer.ProblemMismatch) {
			t.Errorf("%s: content hashes to %s, item says %s", ref, sha(got), it.SHA256)
		}
	case err == nil:
		body.Close()
		t.Errorf("%s: Open succeeded, want %v", ref, want.OpenErr)
	case want.OpenErr == mmrtest.ErrOther:
		if errors.Is(err, importer.ErrMissing) || errors.Is(err, importer.ErrHashMismatch) || errors.Is(err, importer.ErrInvalid) {
			t.Errorf("%s: Open: %v, want an error other than missing, mismatch or invalid", ref, err)
		}
	case !errors.Is(err, want.OpenErr):
		t.Errorf("%s: Open: %v, want %v", ref, err, want.OpenErr)
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
	f.Populate(t)
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
			for ref, w := range f.Media {
				if tc.keep(w.Item) {
					want = append(want, ref)
					wantBytes += w.Item.Size
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
	f.Populate(t)
	ctx := context.Background()
	// Make every transaction of the database read-only unless it asks
	// otherwise, so that a statement writing anything would fail; then
	// check that the source does not depend on writes either way.
	if _, err := f.DB.ExecContext(ctx, `CREATE TABLE written (x int)`); err != nil {
		t.Fatal(err)
	}
	if _, err := f.DB.ExecContext(ctx, `CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN RAISE EXCEPTION 'matrix-media-repo tables were written'; END $$`); err != nil {
		t.Fatal(err)
	}
	for _, tbl := range []string{"media", "datastores", "media_attributes", "user_stats", "thumbnails"} {
		if _, err := f.DB.ExecContext(ctx, `CREATE TRIGGER refuse_`+tbl+` BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON `+tbl+
			` FOR EACH STATEMENT EXECUTE FUNCTION refuse()`); err != nil {
			t.Fatal(err)
		}
	}
	src := f.openSource(t)
	items := walk(t, src, importer.Filter{IncludeRemote: true})
	if len(items) != len(f.Media) {
		t.Errorf("Walk listed %d items, want %d", len(items), len(f.Media))
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
			"  - type: s3\n    id: x\n    opts:\n      endpoint: https://s3.example/\n      bucketName: b\n", f.DSN), "endpoint"},
		{"two datastores for one legacy id", fmt.Sprintf("database:\n  postgres: %q\nhomeservers:\n  - name: example.org\ndatastores:\n"+
			"  - type: file\n    id: legacyid\n    opts:\n      path: /a\n  - type: file\n    opts:\n      path: %s\n", f.DSN, f.LegacyDir), "legacyid"},
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
		f.DSN, t.TempDir())
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
