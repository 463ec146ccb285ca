package mediaarchive

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// wantImportItem is the importer.Item expected for a stored row (Open
// aside).
func wantImportItem(m storage.Media) importer.Item {
	return importer.Item{ServerName: m.ServerName, MediaID: m.MediaID, Remote: m.Remote, UserID: m.UserID,
		ContentType: m.ContentType, Filename: m.Filename, CreatedAt: m.CreatedAt.UTC(), Size: m.Size,
		SHA256: m.SHA256, QuarantinedBy: m.QuarantinedBy, Protected: m.Protected}
}

// TestRoundTrip exports a user and a server from SQLite and PostgreSQL,
// opens each archive as an import source, and checks that Walk lists
// exactly the store's rows, in order, with their bytes (refused items:
// ErrMissing), and that Totals and the filter agree.
func TestRoundTrip(t *testing.T) {
	for _, b := range backends {
		t.Run(b.Name, func(t *testing.T) {
			e := newEnv(t, b.Open)
			fx := fixtures(t, b.Name)
			rows := seed(t, e, fx)
			content := map[string][]byte{}
			for _, f := range fx {
				content[f.id] = f.content
			}
			for _, sel := range []Selection{{ServerName: "example.org", UserID: alice}, {ServerName: "example.org"}} {
				path := filepath.Join(t.TempDir(), "export.zip")
				f, err := os.Create(path)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := Export(context.Background(), f, e.source(), sel, ExportOptions{Thumbnailer: &goThumbnailer{}}); err != nil {
					t.Fatal(err)
				}
				if err := f.Close(); err != nil {
					t.Fatal(err)
				}
				src, err := Open(context.Background(), path)
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				defer src.Close()
				if !strings.Contains(src.Name(), path) {
					t.Errorf("Name() = %q", src.Name())
				}
				var want []importer.Item
				var wantBytes int64
				for _, f := range fx {
					if f.server == sel.ServerName && !f.remote && (sel.UserID == "" || f.user == sel.UserID) {
						want = append(want, wantImportItem(rows[f.id]))
						wantBytes += rows[f.id].Size
					}
				}
				var got []importer.Item
				err = src.Walk(context.Background(), importer.Filter{}, func(it importer.Item) error {
					body, oerr := it.Open(context.Background())
					m := rows[it.MediaID]
					if m.Refused() {
						if !errors.Is(oerr, importer.ErrMissing) {
							t.Errorf("%s: Open of a refused item = %v, want ErrMissing", it.MediaID, oerr)
						}
					} else {
						if oerr != nil {
							t.Fatalf("%s: Open: %v", it.MediaID, oerr)
						}
						b, rerr := io.ReadAll(body)
						body.Close()
						if rerr != nil || !bytes.Equal(b, content[it.MediaID]) || sha(b) != it.SHA256 {
							t.Errorf("%s: read %d bytes (%v), want the stored %d", it.MediaID, len(b), rerr, len(content[it.MediaID]))
						}
					}
					it.Open = nil
					got = append(got, it)
					return nil
				})
				if err != nil {
					t.Fatalf("Walk: %v", err)
				}
				if len(got) != len(want) {
					t.Fatalf("Walk listed %d items, want %d", len(got), len(want))
				}
				for i := range want {
					if !got[i].CreatedAt.Equal(want[i].CreatedAt) {
						t.Errorf("item %d created %v, want %v", i, got[i].CreatedAt, want[i].CreatedAt)
					}
					got[i].CreatedAt, want[i].CreatedAt = time.Time{}, time.Time{}
					if fmt.Sprintf("%+v", got[i]) != fmt.Sprintf("%+v", want[i]) {
						t.Errorf("item %d:\n%+v\nwant\n%+v", i, got[i], want[i])
					}
				}
				tot, err := src.Totals(context.Background(), importer.Filter{})
				if err != nil || tot != (importer.Totals{Items: int64(len(want)), Bytes: wantBytes}) {
					t.Errorf("Totals = %+v, %v; want %d items, %d bytes", tot, err, len(want), wantBytes)
				}
				for _, f := range []importer.Filter{{ServerNames: []string{"other.example"}}, {ServerNames: []string{"other.example"}, IncludeRemote: true}} {
					n := 0
					if err := src.Walk(context.Background(), f, func(importer.Item) error { n++; return nil }); err != nil || n != 0 {
						t.Errorf("Walk(%+v) listed %d items (%v), want none", f, n, err)
					}
				}
				stop := errors.New("stop")
				if err := src.Walk(context.Background(), importer.Filter{ServerNames: []string{"example.org"}}, func(importer.Item) error { return stop }); err != stop {
					t.Errorf("Walk returned %v, want the callback's error as it is", err)
				}
			}
		})
	}
}

// zipEntry is one entry of a hand-built archive.
type zipEntry struct {
	name string
	data []byte
}

func buildZip(t testing.TB, entries ...zipEntry) []byte {
	t.Helper()
	var b bytes.Buffer
	zw := zip.NewWriter(&b)
	for _, e := range entries {
		w, err := zw.CreateHeader(&zip.FileHeader{Name: e.name, Method: zip.Deflate})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(e.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

const validSHA = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" // "hello"

// manifestJSON is a manifest with the given items (JSON objects) and
// header fields in the usual order.
func manifestJSON(items ...string) string {
	return `{"format":"caddy-matrix-media-archive","version":1,"created_at":"2026-01-02T03:04:05Z",` +
		`"export":{"kind":"server","server_name":"example.org"},"totals":{"items":1,"files":1,"bytes":5},` +
		`"items":[` + strings.Join(items, ",") + `]}`
}

// itemJSON is a valid item holding "hello" at media/example.org/abc/hello.txt,
// with fields replaced or added by extra (a JSON fragment that starts with a
// comma, appended last: a repeated key wins in encoding/json).
func itemJSON(extra string) string {
	return `{"mxc":"mxc://example.org/abc","server_name":"example.org","media_id":"abc","remote":false,` +
		`"user_id":"@alice:example.org","upload_name":"hello.txt","content_type":"text/plain","size":5,` +
		`"sha256":"` + validSHA + `","created_at":"2025-01-01T00:00:00.123Z","quarantined":false,"protected":false,` +
		`"file":"media/example.org/abc/hello.txt"` + extra + `}`
}

func validArchive(t testing.TB) []byte {
	return buildZip(t, zipEntry{"media/example.org/abc/hello.txt", []byte("hello")}, zipEntry{ManifestName, []byte(manifestJSON(itemJSON("")))})
}

// TestNewSourceValid opens a hand-built minimal archive.
func TestNewSourceValid(t *testing.T) {
	b := validArchive(t)
	src, err := NewSource(bytes.NewReader(b), int64(len(b)), "test")
	if err != nil {
		t.Fatal(err)
	}
	if h := src.Manifest(); h.Export.ServerName != "example.org" || h.Version != 1 || h.Items != nil {
		t.Errorf("Manifest() = %+v", h)
	}
	var items []importer.Item
	if err := src.Walk(context.Background(), importer.Filter{}, func(it importer.Item) error { items = append(items, it); return nil }); err != nil || len(items) != 1 {
		t.Fatalf("Walk: %d items, %v", len(items), err)
	}
	rc, err := items[0].Open(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if string(got) != "hello" || items[0].UserID != "@alice:example.org" || items[0].CreatedAt.UnixMilli() != 1735689600123 {
		t.Errorf("item %+v with %q", items[0], got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	rc, _ = items[0].Open(ctx)
	cancel()
	if _, err := rc.Read(make([]byte, 10)); !errors.Is(err, context.Canceled) {
		t.Errorf("read after cancel: %v", err)
	}
	rc.Close()
}

// TestNewSourceInvalid refuses malformed archives with ErrInvalidArchive.
func TestNewSourceInvalid(t *testing.T) {
	hello := zipEntry{"media/example.org/abc/hello.txt", []byte("hello")}
	man := func(s string) zipEntry { return zipEntry{ManifestName, []byte(s)} }
	withItem := func(extra string) []zipEntry { return []zipEntry{hello, man(manifestJSON(itemJSON(extra)))} }
	header := `"format":"caddy-matrix-media-archive","version":1,"export":{"kind":"server","server_name":"example.org"}`
	for _, tc := range []struct {
		name    string
		entries []zipEntry
		raw     []byte
		want    string
	}{
		{"not a zip", nil, []byte("PK\x03\x04 definitely not"), "zip"},
		{"no manifest", []zipEntry{hello}, nil, "no manifest.json"},
		{"empty manifest", []zipEntry{man("")}, nil, "EOF"},
		{"not an object", []zipEntry{man(`[]`)}, nil, "expected"},
		{"other format", []zipEntry{man(strings.Replace(manifestJSON(), "caddy-matrix-media-archive", "other", 1))}, nil, "format"},
		{"version 2", []zipEntry{man(strings.Replace(manifestJSON(), `"version":1`, `"version":2`, 1))}, nil, "version 2"},
		{"unknown field", []zipEntry{man(`{` + header + `,"extra":1,"items":[]}`)}, nil, "unknown field"},
		{"field twice", []zipEntry{man(`{` + header + `,"version":1,"items":[]}`)}, nil, "twice"},
		{"items first", []zipEntry{man(`{"items":[],` + header + `}`)}, nil, "before"},
		{"no items", []zipEntry{man(`{` + header + `}`)}, nil, `no "items"`},
		{"trailing data", []zipEntry{man(`{` + header + `,"items":[]} {}`)}, nil, "after"},
		{"bad subject", []zipEntry{man(strings.Replace(manifestJSON(), `"kind":"server"`, `"kind":"user"`, 1))}, nil, "subject"},
		{"bad export server", []zipEntry{man(strings.Replace(manifestJSON(), `"server_name":"example.org"}`, `"server_name":"ex ample"}`, 1))}, nil, "export server name"},
		{"unknown item field", withItem(`,"evil":true`), nil, "unknown field"},
		{"bad media ID", withItem(`,"media_id":"a/b","mxc":"mxc://example.org/a/b"`), nil, "invalid media ID"},
		{"bad server", withItem(`,"server_name":"../x","mxc":"mxc://../x/abc"`), nil, "invalid server name"},
		{"mxc mismatch", withItem(`,"mxc":"mxc://example.org/other"`), nil, "mxc URI"},
		{"bad user", withItem(`,"user_id":"alice"`), nil, "invalid user ID"},
		{"bad sha", withItem(`,"sha256":"` + strings.ToUpper(validSHA) + `"`), nil, "sha256"},
		{"short sha", withItem(`,"sha256":"abc"`), nil, "sha256"},
		{"negative size", withItem(`,"size":-1`), nil, "negative"},
		{"quarantined_by alone", withItem(`,"quarantined_by":"@m:x.org"`), nil, "quarantined_by"},
		{"traversal", withItem(`,"file":"media/../manifest.json"`), nil, "not a safe path"},
		{"absolute", withItem(`,"file":"/etc/passwd"`), nil, "not a safe path"},
		{"outside media", withItem(`,"file":"index.html"`), nil, "not a safe path"},
		{"dot segment", withItem(`,"file":"media/./example.org/abc/hello.txt"`), nil, "not a safe path"},
		{"backslash", withItem(`,"file":"media/example.org/abc\\hello.txt"`), nil, "not a safe path"},
		{"NUL in path", withItem(`,"file":"media/example.org/abc/he\u0000llo.txt"`), nil, "not a safe path"},
		{"media dir only", withItem(`,"file":"media/"`), nil, "not a safe path"},
		{"bad thumbnail", withItem(`,"thumbnail":"thumbnails/../../x.png"`), nil, "not a safe path"},
		{"file not in archive", withItem(`,"file":"media/example.org/abc/other.txt"`), nil, "not in the archive"},
		{"thumbnail not in archive", withItem(`,"thumbnail":"thumbnails/example.org/abc.png"`), nil, "not in the archive"},
		{"entry twice", append(withItem(""), hello), nil, "twice"},
		{"item too large", withItem(`,"upload_name":"` + strings.Repeat("x", maxItemJSON) + `"`), nil, "exceeds"},
		{"field too large", withItem(`,"upload_name":"` + strings.Repeat("x", maxFieldBytes+1) + `"`), nil, "exceeds"},
		{"header value too large", []zipEntry{man(`{"format":"` + strings.Repeat("x", maxItemJSON) + `"}`)}, nil, "exceeds"},
		{"truncated", []zipEntry{hello, man(manifestJSON(itemJSON(""))[:200])}, nil, "EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.raw
			if b == nil {
				b = buildZip(t, tc.entries...)
			}
			_, err := NewSource(bytes.NewReader(b), int64(len(b)), "test")
			if !errors.Is(err, ErrInvalidArchive) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("NewSource = %v, want ErrInvalidArchive mentioning %q", err, tc.want)
			}
		})
	}
	if _, err := OpenSource(filepath.Join(t.TempDir(), "missing.zip")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("OpenSource of a missing file: %v", err)
	}
}

// TestArchiveQuarantinedItem: a quarantined item without bytes imports as
// ErrMissing with who quarantined it; a quarantined protected item with
// bytes keeps both flags.
func TestArchiveQuarantinedItem(t *testing.T) {
	refused := strings.Replace(itemJSON(`,"quarantined":true`), `,"file":"media/example.org/abc/hello.txt"`, "", 1)
	protected := strings.ReplaceAll(itemJSON(`,"quarantined":true,"quarantined_by":"@mod:example.org","protected":true`), "abc", "def")
	b := buildZip(t, zipEntry{"media/example.org/def/hello.txt", []byte("hello")}, zipEntry{ManifestName, []byte(manifestJSON(refused, protected))})
	src, err := NewSource(bytes.NewReader(b), int64(len(b)), "test")
	if err != nil {
		t.Fatal(err)
	}
	var items []importer.Item
	if err := src.Walk(context.Background(), importer.Filter{}, func(it importer.Item) error { items = append(items, it); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(items) != 2 {
		t.Fatalf("%d items", len(items))
	}
	if _, err := items[0].Open(context.Background()); !errors.Is(err, importer.ErrMissing) || items[0].QuarantinedBy != quarantinedByDefault {
		t.Errorf("refused item: %+v, Open %v", items[0], err)
	}
	if items[1].QuarantinedBy != "@mod:example.org" || !items[1].Protected {
		t.Errorf("protected item: %+v", items[1])
	}
	if rc, err := items[1].Open(context.Background()); err != nil {
		t.Errorf("protected item: Open %v", err)
	} else {
		rc.Close()
	}
	if !slices.ContainsFunc(items, func(it importer.Item) bool { return it.MediaID == "def" }) {
		t.Error("no item def")
	}
}
