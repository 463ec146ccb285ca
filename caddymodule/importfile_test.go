package caddymodule

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// fileItems writes each item's body to a file of its own and points the
// item at it.
func fileItems(t *testing.T, items ...testSourceItem) []testSourceItem {
	t.Helper()
	dir := t.TempDir()
	for i := range items {
		items[i].File = filepath.Join(dir, items[i].MediaID+".bin")
		if err := os.WriteFile(items[i].File, items[i].Body, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return items
}

// TestImportLocalFiles runs the import command against a real Caddy on the
// same machine: Caddy reads the source's files itself, checks their bytes
// as it does sent bytes, and --send-bytes sends them instead.
func TestImportLocalFiles(t *testing.T) {
	rc := startCaddy(t, t.TempDir())
	big := bytes.Repeat([]byte("fedcba9876543210"), 1<<20/16+7)
	altered := testItem("altered", "text/plain", "", []byte("recorded bytes"))
	items := fileItems(t,
		testItem("small", "text/plain", "s.txt", []byte("small file\n")),
		testItem("large", "application/octet-stream", "", big),
		altered,
	)
	if err := os.WriteFile(items[2].File, []byte("RECORDED bytes"), 0o600); err != nil {
		t.Fatal(err)
	}
	report, err := rc.runImportCommand(t, []string{"test"}, map[string]string{"from": writeTestSource(t, items)})
	if err == nil || !strings.Contains(err.Error(), "1 hash mismatches") ||
		!strings.Contains(report, "imported:              2") ||
		!strings.Contains(report, "2 items were read by the target from the source's files directly") ||
		!strings.Contains(report, "mismatch mxc://example.org/altered") {
		t.Fatalf("import: %v\n%s", err, report)
	}
	for _, it := range items[:2] {
		resp := rc.download(t, it.MediaID)
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, it.Body) {
			t.Errorf("download %s: %d, %d bytes (want %d), %v", it.MediaID, resp.StatusCode, len(body), len(it.Body), err)
		}
	}
	if resp := rc.download(t, "altered"); resp.StatusCode != http.StatusNotFound {
		t.Errorf("altered file stored: %d", resp.StatusCode)
	}

	sent := fileItems(t, testItem("sent", "text/plain", "", []byte("sent over the socket")))
	report, err = rc.runImportCommand(t, []string{"test"}, map[string]string{"from": writeTestSource(t, sent), "send-bytes": "true"})
	if err != nil || !strings.Contains(report, "imported:              1") || strings.Contains(report, "read by the target") {
		t.Fatalf("import --send-bytes: %v\n%s", err, report)
	}
	if resp := rc.download(t, "sent"); resp.StatusCode != http.StatusOK {
		t.Errorf("download sent: %d", resp.StatusCode)
	}
}

// TestImportFileEndpoint checks PUT import/file: it imports only the very
// file the command opened, only for a command on this machine, and
// answers file_unreachable (so that the command sends the bytes) for
// anything else.
func TestImportFileEndpoint(t *testing.T) {
	a, unload := provisionApp(t, *testAppConfig(t))
	defer unload()
	res := a.res
	dir := t.TempDir()
	body := []byte("the file's bytes")
	path := filepath.Join(dir, "file.bin")
	if err := os.WriteFile(path, body, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ident, err := localFileName(f)
	if err != nil || ident.Path != path || ident.Size != int64(len(body)) {
		t.Fatalf("localFileName = %+v, %v", ident, err)
	}
	other := filepath.Join(dir, "other.bin")
	if err := os.WriteFile(other, body, 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.bin")
	if err := os.Symlink(path, link); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	fileHdr := func(mod func(*importFile)) string {
		id := ident
		mod(&id)
		v, err := id.encode()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	same := func(*importFile) {}
	sum := importtest.SHA256(body)
	item, err := importItem{Size: new(int64(len(body))), SHA256: sum}.encode()
	if err != nil {
		t.Fatal(err)
	}
	prefix := adminPrefix + "import/file/example.org/"
	for i, tc := range []struct {
		id, remote, file string
		status           int
		want             string
	}{
		{"remote", "192.0.2.7:4000", fileHdr(same), 400, `"code":"file_unreachable"`},
		{"inode", "127.0.0.1:4000", fileHdr(func(f *importFile) { f.Inode++ }), 400, `not the file the command opened`},
		{"otherfile", "127.0.0.1:4000", fileHdr(func(f *importFile) { f.Path = other }), 400, `"code":"file_unreachable"`},
		{"symlink", "[::1]:4000", fileHdr(func(f *importFile) { f.Path = link }), 400, `"code":"file_unreachable"`},
		{"size", "127.0.0.1:4000", fileHdr(func(f *importFile) { f.Size++ }), 400, `the command saw`},
		{"dir", "127.0.0.1:4000", fileHdr(func(f *importFile) { f.Path = dir }), 400, `"code":"file_unreachable"`},
		{"fifo", "127.0.0.1:4000", fileHdr(func(f *importFile) { f.Path = fifo }), 400, `"code":"file_unreachable"`},
		{"gone", "127.0.0.1:4000", fileHdr(func(f *importFile) { f.Path = filepath.Join(dir, "none") }), 400, `"code":"file_unreachable"`},
		{"relative", "127.0.0.1:4000", fileHdr(func(f *importFile) { f.Path = "file.bin" }), 400, `"code":"invalid"`},
		{"nohdr", "127.0.0.1:4000", "", 400, `"code":"invalid"`},
		{"ok", "@", fileHdr(same), 200, `{"outcome":"imported"}`},
		{"ok", "127.0.0.1:4000", fileHdr(same), 200, `{"outcome":"already_present"}`},
	} {
		req := httptest.NewRequest(http.MethodPut, prefix+tc.id, nil)
		req.RemoteAddr = tc.remote
		req.Header.Set(importItemHeader, item)
		if tc.file != "" {
			req.Header.Set(importFileHeader, tc.file)
		}
		rec := httptest.NewRecorder()
		if err := res.serveImportFile(rec, req); err != nil {
			t.Fatalf("Test %d (%s): %v", i, tc.id, err)
		}
		if rec.Code != tc.status || !strings.Contains(rec.Body.String(), tc.want) {
			t.Errorf("Test %d (%s): %d %s; want %d with %q", i, tc.id, rec.Code, rec.Body.String(), tc.status, tc.want)
		}
		if tc.status != 200 {
			if _, err := res.meta.GetMedia(context.Background(), "example.org", tc.id); !errors.Is(err, storage.ErrNotFound) {
				t.Errorf("Test %d (%s): refused item stored: %v", i, tc.id, err)
			}
		}
	}
	var answer importError
	req := httptest.NewRequest(http.MethodPut, prefix+"x", nil)
	rec := httptest.NewRecorder()
	if err := res.serveImportFile(rec, req); err != nil || json.Unmarshal(rec.Body.Bytes(), &answer) != nil {
		t.Fatalf("answer: %v %s", err, rec.Body.String())
	}
	if err := importAnswerError(errors.New("caddy responded with error: HTTP 400: " + rec.Body.String())); !errors.Is(err, importer.ErrFileUnreachable) {
		t.Errorf("the command maps %q to %v, want ErrFileUnreachable", rec.Body.String(), err)
	}
}

// TestLocalAdminConn checks which peers may have Caddy read their files.
func TestLocalAdminConn(t *testing.T) {
	for _, tc := range []struct {
		remote string
		local  bool
	}{
		{"127.0.0.1:1234", true},
		{"127.8.9.10:1", true},
		{"[::1]:1234", true},
		{"@", true},
		{"", true},
		{"192.0.2.1:1234", false},
		{"[2001:db8::1]:80", false},
		{"[::ffff:192.0.2.1]:80", false},
		{"localhost:80", false},
		{"10.0.0.1", false},
	} {
		r := &http.Request{RemoteAddr: tc.remote}
		if got := localAdminConn(r); got != tc.local {
			t.Errorf("localAdminConn(%q) = %v, want %v", tc.remote, got, tc.local)
		}
	}
}

// FuzzImportFileHeader checks the decoder of the Matrix-Media-Import-File
// header: every refusal wraps importer.ErrInvalid, and what it accepts is
// an absolute path without NUL and a size, which round-trips.
func FuzzImportFileHeader(f *testing.F) {
	for _, doc := range []string{
		`{"path":"/var/lib/synapse/media_store/local_content/ab/cd/efgh","dev":65024,"ino":12345,"size":11}`,
		`{"path":"relative","dev":1,"ino":2,"size":3}`, `{"path":"/a\u0000b","size":1}`, `{"path":"/x","size":-1}`,
		`{"path":"/x","size":1,"extra":1}`, `{"path":"/x","dev":-1,"size":1}`, `[]`, `null`, ``,
	} {
		f.Add(base64.RawURLEncoding.EncodeToString([]byte(doc)))
	}
	f.Add("!!!")
	f.Fuzz(func(t *testing.T, value string) {
		got, err := decodeImportFile(value)
		if err != nil {
			if !errors.Is(err, importer.ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if !strings.HasPrefix(got.Path, "/") || strings.ContainsRune(got.Path, 0) || got.Size < 0 {
			t.Fatalf("accepted %+v", got)
		}
		again, err := got.encode()
		if err != nil {
			t.Fatal(err)
		}
		if back, err := decodeImportFile(again); err != nil || back != got {
			t.Fatalf("round trip: %+v -> %+v, %v", got, back, err)
		}
	})
}
