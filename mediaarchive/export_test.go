package mediaarchive

import (
	"archive/zip"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// fixture is one media item of the export tests.
type fixture struct {
	server, id, user string
	name, ctype      string
	content          []byte
	remote           bool
	// quarantine quarantines the content; protect protects the item.
	quarantine, protect bool
	// wantName is the file name expected in the archive ("" for items
	// exported without bytes).
	wantName string
}

const (
	alice = "@alice:example.org"
	bob   = "@bob:example.org"
)

// fixtures are the media of the export tests. IDs sort the same in every
// collation (lowercase letters and digits), so that the expected order of
// a server export is the media ID order on both databases.
//
// PostgreSQL refuses NUL in text, so there the NUL of a file name is
// another control character (both become "_").
func fixtures(t *testing.T, backend string) []fixture {
	nul := "\x00"
	if backend == "postgres" {
		nul = "\x01"
	}
	longName := strings.Repeat("é", 200) + ".txt"
	return []fixture{
		{server: "example.org", id: "a01png", user: alice, name: "photo.png", ctype: "image/png",
			content: pngBytes(t, 40, 30, 1), wantName: "photo.png"},
		{server: "example.org", id: "a02jpeg", user: alice, name: "Über café 😀.jpg", ctype: "image/jpeg",
			content: jpegBytes(t, 64, 48, 2), wantName: "Über café 😀.jpg"},
		{server: "example.org", id: "a03dots", user: alice, name: "../../x", ctype: "text/plain; charset=utf-8",
			content: []byte("dot dot slash\n"), wantName: "_.._x"},
		{server: "example.org", id: "a04slash", user: alice, name: "a/b", ctype: "text/plain",
			content: []byte("a slash b\n"), wantName: "a_b"},
		{server: "example.org", id: "a05nul", user: alice, name: "nul" + nul + "byte.txt", ctype: "text/plain",
			content: []byte("NUL in the name\n"), wantName: "nul_byte.txt"},
		{server: "example.org", id: "a06long", user: alice, name: longName, ctype: "text/plain",
			content: []byte(strings.Repeat("long name ", 500)), wantName: strings.Repeat("é", 58) + ".txt"},
		{server: "example.org", id: "a07noname", user: alice, name: "", ctype: "application/pdf",
			content: []byte("%PDF-1.4 not really\n"), wantName: "a07noname.pdf"},
		{server: "example.org", id: "a08con", user: alice, name: "CON.txt", ctype: "text/plain",
			content: []byte("device name\n"), wantName: "_CON.txt"},
		{server: "example.org", id: "a09bidi", user: alice, name: "gnp\u202e.exe", ctype: "application/octet-stream",
			content: []byte("MZ not really\n"), wantName: "gnp.exe"},
		{server: "example.org", id: "a10quar", user: alice, name: "bad.bin", ctype: "application/octet-stream",
			content: []byte("quarantined bytes"), quarantine: true},
		// Same bytes as a10quar, so quarantined too, but protected: served,
		// hence exported.
		{server: "example.org", id: "a11prot", user: alice, name: "sticker.bin", ctype: "application/octet-stream",
			content: []byte("quarantined bytes"), protect: true, wantName: "sticker.bin"},
		// Same bytes as a03dots (one blob, two items).
		{server: "example.org", id: "a12dup", user: alice, name: "copy.txt", ctype: "text/plain",
			content: []byte("dot dot slash\n"), wantName: "copy.txt"},
		{server: "example.org", id: "a13gif", user: alice, name: "anim.gif", ctype: "image/gif",
			content: gifBytes(t, 33, 21), wantName: "anim.gif"},
		{server: "example.org", id: "b01bob", user: bob, name: "bob.txt", ctype: "text/plain",
			content: []byte("bob's file\n"), wantName: "bob.txt"},
		{server: "remote.example", id: "r01remote", name: "remote.txt", ctype: "text/plain",
			content: []byte("a remote copy\n"), remote: true},
		{server: "other.example", id: "o01other", user: "@carol:other.example", name: "carol.txt", ctype: "text/plain",
			content: []byte("another server\n")},
	}
}

// seed stores the fixtures and returns the rows as stored, by media ID.
func seed(t *testing.T, e *env, fx []fixture) map[string]storage.Media {
	t.Helper()
	ctx := context.Background()
	base := ms(2025, 3, 14, 15, 9, 26, 535)
	for i, f := range fx {
		created := base.Add(time.Duration(i) * 90 * time.Minute)
		e.put(t, storage.Media{ServerName: f.server, MediaID: f.id, UserID: f.user, ContentType: f.ctype,
			Filename: f.name, CreatedAt: created, Remote: f.remote, Protected: f.protect}, f.content)
	}
	for _, f := range fx {
		if f.quarantine {
			if _, err := e.admin.QuarantineContent(ctx, storage.Quarantine{SHA256: sha(f.content), By: "@mod:example.org", At: base}); err != nil {
				t.Fatal(err)
			}
		}
	}
	rows := map[string]storage.Media{}
	for _, f := range fx {
		rows[f.id] = e.get(t, f.server, f.id)
	}
	return rows
}

// wantItem is the manifest entry expected for a stored row.
func wantItem(m storage.Media, f fixture, thumb string) Item {
	it := Item{
		MXC: "mxc://" + m.ServerName + "/" + m.MediaID, ServerName: m.ServerName, MediaID: m.MediaID,
		Remote: m.Remote, UserID: m.UserID, UploadName: m.Filename, ContentType: m.ContentType,
		Size: m.Size, SHA256: m.SHA256, CreatedAt: m.CreatedAt.UTC(),
		Quarantined: m.QuarantinedBy != "", QuarantinedBy: m.QuarantinedBy, Protected: m.Protected,
		Thumbnail: thumb,
	}
	if f.wantName != "" {
		it.File = "media/" + m.ServerName + "/" + m.MediaID + "/" + f.wantName
	}
	return it
}

// readArchive opens an archive held in memory and decodes its manifest in
// full (the test archives are small).
func readArchive(t *testing.T, b []byte) (*zip.Reader, Manifest) {
	t.Helper()
	zr, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatalf("reading the archive: %v", err)
	}
	rc, err := zr.Open(ManifestName)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var man Manifest
	dec := json.NewDecoder(rc)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&man); err != nil {
		t.Fatalf("decoding the manifest: %v", err)
	}
	return zr, man
}

func entry(t *testing.T, zr *zip.Reader, name string) ([]byte, *zip.File) {
	t.Helper()
	for _, f := range zr.File {
		if f.Name == name {
			rc, err := f.Open()
			if err != nil {
				t.Fatal(err)
			}
			defer rc.Close()
			b, err := io.ReadAll(rc)
			if err != nil {
				t.Fatalf("reading %s: %v", name, err)
			}
			return b, f
		}
	}
	t.Fatalf("no entry %q in the archive", name)
	return nil, nil
}

// TestExport exports a user and a server from real stores, with and
// without a Thumbnailer, and checks the manifest field by field, every
// file byte for byte with its SHA-256 and compression method, the sanitised
// names, the quarantined item listed without bytes, and that nothing else
// is in the archive.
func TestExport(t *testing.T) {
	for _, b := range backends {
		t.Run(b.Name, func(t *testing.T) {
			e := newEnv(t, b.Open)
			fx := fixtures(t, b.Name)
			rows := seed(t, e, fx)
			byID := map[string]fixture{}
			for _, f := range fx {
				byID[f.id] = f
			}
			created := ms(2026, 12, 3, 10, 0, 0, 0)
			for _, tc := range []struct {
				name  string
				sel   Selection
				thumb bool
				ids   []string
			}{
				{"user", Selection{ServerName: "example.org", UserID: alice}, false,
					[]string{"a01png", "a02jpeg", "a03dots", "a04slash", "a05nul", "a06long", "a07noname", "a08con", "a09bidi", "a10quar", "a11prot", "a12dup", "a13gif"}},
				{"user with thumbnails", Selection{ServerName: "example.org", UserID: alice}, true,
					[]string{"a01png", "a02jpeg", "a03dots", "a04slash", "a05nul", "a06long", "a07noname", "a08con", "a09bidi", "a10quar", "a11prot", "a12dup", "a13gif"}},
				{"server", Selection{ServerName: "example.org"}, false,
					[]string{"a01png", "a02jpeg", "a03dots", "a04slash", "a05nul", "a06long", "a07noname", "a08con", "a09bidi", "a10quar", "a11prot", "a12dup", "a13gif", "b01bob"}},
				{"other user", Selection{ServerName: "example.org", UserID: bob}, false, []string{"b01bob"}},
				{"nobody", Selection{ServerName: "example.org", UserID: "@nobody:example.org"}, false, nil},
			} {
				t.Run(tc.name, func(t *testing.T) {
					opts := ExportOptions{Now: func() time.Time { return created }, PageSize: 4}
					thumbs := &goThumbnailer{}
					if tc.thumb {
						opts.Thumbnailer = thumbs
					}
					var buf bytes.Buffer
					sum, err := Export(context.Background(), &buf, e.source(), tc.sel, opts)
					if err != nil {
						t.Fatalf("Export: %v", err)
					}
					zr, man := readArchive(t, buf.Bytes())
					checkExport(t, zr, man, sum, tc.sel, tc.ids, rows, byID, tc.thumb, created)
					if tc.thumb && thumbs.calls != 3 {
						t.Errorf("the thumbnailer was called %d times, want 3 (the three images)", thumbs.calls)
					}
				})
			}
		})
	}
}

// checkExport checks an exported archive against the fixtures it should
// hold, in order.
func checkExport(t *testing.T, zr *zip.Reader, man Manifest, sum Summary, sel Selection, ids []string,
	rows map[string]storage.Media, byID map[string]fixture, thumbs bool, created time.Time) {
	t.Helper()
	want := Manifest{Format: Format, Version: Version, CreatedAt: created,
		Export: Subject{Kind: KindServer, ServerName: sel.ServerName}}
	if sel.UserID != "" {
		want.Export = Subject{Kind: KindUser, ServerName: sel.ServerName, UserID: sel.UserID}
	}
	wantSum := Summary{}
	var wantEntries []string
	for _, id := range ids {
		m, f := rows[id], byID[id]
		thumb := ""
		if thumbs && strings.HasPrefix(f.ctype, "image/") {
			thumb = "thumbnails/" + f.server + "/" + id + ".png"
		}
		it := wantItem(m, f, thumb)
		want.Items = append(want.Items, it)
		wantSum.Items++
		if it.File != "" {
			wantSum.Files++
			wantSum.Bytes += m.Size
			wantEntries = append(wantEntries, it.File)
		} else {
			wantSum.Quarantined++
		}
		if thumb != "" {
			wantSum.Thumbnails++
			wantEntries = append(wantEntries, thumb)
		}
	}
	if want.Items == nil {
		want.Items = []Item{}
	}
	want.Totals = Totals{Items: wantSum.Items, Files: wantSum.Files, Bytes: wantSum.Bytes}
	wantEntries = append(wantEntries, ManifestName, IndexName)
	if sum != wantSum {
		t.Errorf("summary = %+v, want %+v", sum, wantSum)
	}
	if !reflect.DeepEqual(man, want) {
		gotJSON, _ := json.MarshalIndent(man, "", " ")
		wantJSON, _ := json.MarshalIndent(want, "", " ")
		t.Errorf("manifest:\n%s\nwant:\n%s", gotJSON, wantJSON)
	}
	var entries []string
	for _, f := range zr.File {
		entries = append(entries, f.Name)
		if !filepath.IsLocal(f.Name) || !validEntryPath(f.Name, "media/") && !validEntryPath(f.Name, "thumbnails/") &&
			f.Name != ManifestName && f.Name != IndexName {
			t.Errorf("entry %q is not a safe relative path", f.Name)
		}
	}
	if !slices.Equal(entries, wantEntries) {
		t.Errorf("entries:\n%q\nwant:\n%q", entries, wantEntries)
	}
	for _, it := range want.Items {
		if it.File == "" {
			continue
		}
		f := byID[it.MediaID]
		got, zf := entry(t, zr, it.File)
		if !bytes.Equal(got, f.content) || sha(got) != it.SHA256 {
			t.Errorf("%s: %d bytes with SHA-256 %s, want the %d stored bytes (%s)", it.File, len(got), sha(got), len(f.content), it.SHA256)
		}
		wantMethod := zip.Deflate
		if strings.HasPrefix(f.ctype, "image/") {
			wantMethod = zip.Store
		}
		if zf.Method != wantMethod {
			t.Errorf("%s: method %d, want %d", it.File, zf.Method, wantMethod)
		}
		// ZIP keeps modification times to the second.
		if !zf.Modified.Equal(rows[it.MediaID].CreatedAt.Truncate(time.Second)) {
			t.Errorf("%s: modified %v, want the creation time %v", it.File, zf.Modified, rows[it.MediaID].CreatedAt)
		}
		if it.Thumbnail != "" {
			th, _ := entry(t, zr, it.Thumbnail)
			cfg, err := pngConfig(th)
			if err != nil || cfg.Width > 48 || cfg.Height > 48 || cfg.Width < 1 {
				t.Errorf("%s: not a small PNG (%+v, %v)", it.Thumbnail, cfg, err)
			}
		}
	}
	index, _ := entry(t, zr, IndexName)
	for _, it := range want.Items {
		if !bytes.Contains(index, []byte(it.MXC)) {
			t.Errorf("index.html does not list %s", it.MXC)
		}
	}
	for _, bad := range []string{"<script", "\x00", "\u202e", "http://", "https://"} {
		if bytes.Contains(index, []byte(bad)) {
			t.Errorf("index.html holds %q", bad)
		}
	}
}

// TestExportMissingAndDamaged lists a blob missing from its datastore with
// an error and no file, and exports bytes that do not match their SHA-256
// as read, with an error, without failing the export.
func TestExportMissingAndDamaged(t *testing.T) {
	e := newEnv(t, backends[0].Open)
	at := ms(2025, 1, 2, 3, 4, 5, 6)
	gone := e.put(t, storage.Media{ServerName: "example.org", MediaID: "gone", UserID: alice, ContentType: "text/plain", Filename: "gone.txt", CreatedAt: at}, []byte("gone"))
	bad := e.put(t, storage.Media{ServerName: "example.org", MediaID: "rotten", UserID: alice, ContentType: "text/plain", Filename: "rotten.txt", CreatedAt: at}, []byte("good bytes"))
	ok := e.put(t, storage.Media{ServerName: "example.org", MediaID: "fine", UserID: alice, ContentType: "text/plain", Filename: "fine.txt", CreatedAt: at}, []byte("fine"))
	e.blobs.missing[gone.SHA256] = true
	e.blobs.altered[bad.SHA256] = []byte("evil bytes")

	var buf bytes.Buffer
	sum, err := Export(context.Background(), &buf, e.source(), Selection{ServerName: "example.org", UserID: alice}, ExportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := (Summary{Items: 3, Files: 2, Bytes: int64(len("evil bytes") + len("fine")), Missing: 1, Damaged: 1}); sum != want {
		t.Errorf("summary %+v, want %+v", sum, want)
	}
	zr, man := readArchive(t, buf.Bytes())
	byID := map[string]Item{}
	for _, it := range man.Items {
		byID[it.MediaID] = it
	}
	if it := byID["gone"]; it.File != "" || it.Error != "content missing from its datastore" || it.SHA256 != gone.SHA256 {
		t.Errorf("missing item: %+v", it)
	}
	if it := byID["rotten"]; it.File != "media/example.org/rotten/rotten.txt" || it.SHA256 != bad.SHA256 ||
		!strings.Contains(it.Error, "does not match") || !strings.Contains(it.Error, sha([]byte("evil bytes"))) {
		t.Errorf("damaged item: %+v", it)
	}
	if got, _ := entry(t, zr, "media/example.org/rotten/rotten.txt"); string(got) != "evil bytes" {
		t.Errorf("damaged content exported as %q", got)
	}
	if it := byID["fine"]; it.File != "media/example.org/fine/fine.txt" || it.Error != "" || it.SHA256 != ok.SHA256 {
		t.Errorf("fine item: %+v", it)
	}
}

// TestExportUserPagingUnderChanges exports a user's media in pages of 4
// while, after each page, two items already exported are deleted and an
// item sorting before the cursor is uploaded: every item present from start to
// end is exported exactly once.
func TestExportUserPagingUnderChanges(t *testing.T) {
	e := newEnv(t, backends[0].Open)
	at := ms(2025, 6, 1, 0, 0, 0, 0)
	var stable []string
	for i := range 30 {
		id := "m" + string(rune('a'+i/10)) + string(rune('0'+i%10))
		e.put(t, storage.Media{ServerName: "example.org", MediaID: id, UserID: alice, ContentType: "text/plain", CreatedAt: at}, []byte(id))
		stable = append(stable, id)
	}
	pages := 0
	hooked := &hookAdmin{MetadataStore: e.meta, MediaAdmin: e.admin, after: func() {
		pages++
		if len(stable) < 12 {
			return
		}
		// Delete the first two stable items (already exported) and upload
		// one that sorts first: the rest shifts back by one, which the
		// overlap of a quarter page (1) absorbs.
		for range 2 {
			victim := stable[0]
			stable = stable[1:]
			if _, err := e.admin.DeleteMedia(context.Background(), []storage.MediaRef{{ServerName: "example.org", MediaID: victim}}, false, at); err != nil {
				t.Error(err)
			}
		}
		id := "a" + strings.Repeat("0", pages)
		e.put(t, storage.Media{ServerName: "example.org", MediaID: id, UserID: alice, ContentType: "text/plain", CreatedAt: at}, []byte(id))
	}}
	var buf bytes.Buffer
	_, err := Export(context.Background(), &buf, ExportSource{Meta: hooked, Stores: e.stores},
		Selection{ServerName: "example.org", UserID: alice}, ExportOptions{PageSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	_, man := readArchive(t, buf.Bytes())
	count := map[string]int{}
	for _, it := range man.Items {
		count[it.MediaID]++
	}
	for id, n := range count {
		if n != 1 {
			t.Errorf("%s exported %d times", id, n)
		}
	}
	for _, id := range stable {
		if count[id] != 1 {
			t.Errorf("%s, present throughout, was not exported", id)
		}
	}
	if pages < 5 {
		t.Errorf("only %d pages listed; the test wants several", pages)
	}
}

// hookAdmin calls after once each ListUserMedia page has been returned.
type hookAdmin struct {
	storage.MetadataStore
	storage.MediaAdmin
	after func()
}

func (h *hookAdmin) ListUserMedia(ctx context.Context, q storage.UserMediaQuery) ([]storage.Media, int64, error) {
	page, total, err := h.MediaAdmin.ListUserMedia(ctx, q)
	if err == nil {
		defer h.after()
	}
	return page, total, err
}

// TestExportErrors: invalid selections and stores are refused before
// anything is written; a failing writer and a cancelled context fail the
// export.
func TestExportErrors(t *testing.T) {
	e := newEnv(t, backends[0].Open)
	e.put(t, storage.Media{ServerName: "example.org", MediaID: "one", UserID: alice, ContentType: "text/plain", CreatedAt: ms(2025, 1, 1, 0, 0, 0, 0)}, []byte("one"))
	for _, sel := range []Selection{{}, {ServerName: "bad server"}, {ServerName: "example.org", UserID: "alice"}, {ServerName: "example.org", UserID: "@alice"}} {
		var buf bytes.Buffer
		if _, err := Export(context.Background(), &buf, e.source(), sel, ExportOptions{}); !errors.Is(err, ErrInvalidSelection) || buf.Len() != 0 {
			t.Errorf("Export(%+v) = %v with %d bytes written, want ErrInvalidSelection and nothing", sel, err, buf.Len())
		}
	}
	if _, err := UserSelection("nope"); !errors.Is(err, ErrInvalidSelection) {
		t.Errorf("UserSelection(nope) = %v", err)
	}
	if sel, err := UserSelection("@x:a.example:8448"); err != nil || sel != (Selection{ServerName: "a.example:8448", UserID: "@x:a.example:8448"}) {
		t.Errorf("UserSelection = %+v, %v", sel, err)
	}
	if _, err := Export(context.Background(), io.Discard, ExportSource{Meta: e.meta}, Selection{ServerName: "example.org"}, ExportOptions{}); err == nil {
		t.Error("an export without datastores succeeded")
	}
	wantErr := errors.New("disk full")
	if _, err := Export(context.Background(), failWriter{wantErr}, e.source(), Selection{ServerName: "example.org"}, ExportOptions{}); !errors.Is(err, wantErr) {
		t.Errorf("export to a failing writer: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Export(ctx, io.Discard, e.source(), Selection{ServerName: "example.org"}, ExportOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled export: %v", err)
	}
}

type failWriter struct{ err error }

func (f failWriter) Write([]byte) (int, error) { return 0, f.err }

func TestSafeFileName(t *testing.T) {
	for _, tc := range []struct{ in, ctype, want string }{
		{"photo.png", "image/png", "photo.png"},
		{"../../etc/passwd", "", "_.._etc_passwd"},
		{"..", "image/png", "id.png"},
		{".hidden", "", "hidden"},
		{"trailing. . ", "", "trailing"},
		{`a\b:c*d?e"f<g>h|i`, "", "a_b_c_d_e_f_g_h_i"},
		{"tab\tnew\nline\r", "", "tab_new_line_"},
		{"\xff\xfeinvalid", "", "_invalid"},
		{"", "video/mp4; codecs=avc1", "id.mp4"},
		{"", "application/x-unknown", "id"},
		{"nul.tar.gz", "", "_nul.tar.gz"},
		{"com1", "", "_com1"},
		{"console.log", "", "console.log"},
		{"\u202egnp.exe", "", "gnp.exe"},
		{"\uFEFFbom", "", "_bom"},
		{strings.Repeat("x", 300), "", strings.Repeat("x", maxNameBytes)},
		{strings.Repeat("ab", 100) + ".verylongextension-notkept", "", strings.Repeat("ab", 60)},
		{strings.Repeat("日", 100) + ".jpeg", "", strings.Repeat("日", 38) + ".jpeg"},
	} {
		got := SafeFileName(tc.in, "id", tc.ctype)
		if got != tc.want {
			t.Errorf("SafeFileName(%q) = %q, want %q", tc.in, got, tc.want)
		}
		if len(got) > maxNameBytes || !filepath.IsLocal(got) || strings.ContainsAny(got, "/\\\x00") {
			t.Errorf("SafeFileName(%q) = %q is not a safe name", tc.in, got)
		}
	}
}
