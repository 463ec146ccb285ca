package caddymodule

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

func init() {
	importSources["test"] = openTestSource
}

// testSourceItem is one item of a test source file.
type testSourceItem struct {
	ServerName    string `json:"server_name"`
	MediaID       string `json:"media_id"`
	Remote        bool   `json:"remote,omitempty"`
	UserID        string `json:"user_id,omitempty"`
	ContentType   string `json:"content_type,omitempty"`
	Filename      string `json:"filename,omitempty"`
	CreatedTS     int64  `json:"created_ts"`
	Body          []byte `json:"body"`
	SHA256        string `json:"sha256,omitempty"`
	Size          int64  `json:"size"`
	QuarantinedBy string `json:"quarantined_by,omitempty"`
	Protected     bool   `json:"protected,omitempty"`
	Missing       bool   `json:"missing,omitempty"`
	// File names a file holding the bytes (opened as an *os.File).
	File string `json:"file,omitempty"`
}

// openTestSource is the "test" import kind: an importtest.Source read from
// a JSON file of testSourceItems.
func openTestSource(_ context.Context, from string) (importer.Source, error) {
	raw, err := os.ReadFile(from)
	if err != nil {
		return nil, fmt.Errorf("reading test source: %w", err)
	}
	var items []testSourceItem
	if err := json.Unmarshal(raw, &items); err != nil {
		return nil, fmt.Errorf("parsing test source: %w", err)
	}
	src := &importtest.Source{Label: "test source " + filepath.Base(from)}
	for _, it := range items {
		src.Media = append(src.Media, importtest.Media{Item: importer.Item{
			ServerName: it.ServerName, MediaID: it.MediaID, Remote: it.Remote, UserID: it.UserID,
			ContentType: it.ContentType, Filename: it.Filename, CreatedAt: time.UnixMilli(it.CreatedTS).UTC(),
			Size: it.Size, SHA256: it.SHA256, QuarantinedBy: it.QuarantinedBy, Protected: it.Protected,
		}, Body: it.Body, Missing: it.Missing, File: it.File})
	}
	return src, nil
}

// writeTestSource writes items to a test source file and returns its path.
func writeTestSource(t *testing.T, items []testSourceItem) string {
	t.Helper()
	raw, err := json.Marshal(items)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "source.json")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// testItem is a local item of example.org with recorded hash and size.
func testItem(id, contentType, filename string, body []byte) testSourceItem {
	return testSourceItem{ServerName: "example.org", MediaID: id, UserID: "@alice:example.org", ContentType: contentType,
		Filename: filename, CreatedTS: 1_650_000_000_000, Body: body, SHA256: importtest.SHA256(body), Size: int64(len(body))}
}

// freeTCPPort returns a free port of 127.0.0.1.
func freeTCPPort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// runningCaddy is a Caddy started in this process with caddy.Load.
type runningCaddy struct {
	admin    string
	httpPort int
	token    string
}

// startCaddy runs Caddy in this process: its admin API and one site,
// example.org, served by the module with SQLite and a file datastore under
// dir. It is stopped when the test ends.
func startCaddy(t testing.TB, dir string) runningCaddy {
	t.Helper()
	return startCaddySite(t, dir, "")
}

// startCaddySite is startCaddy with siteExtra (Caddyfile lines) added to the
// site's matrix_media block.
func startCaddySite(t testing.TB, dir, siteExtra string) runningCaddy {
	t.Helper()
	rc := runningCaddy{httpPort: freeTCPPort(t), token: "token-alice"}
	rc.admin = fmt.Sprintf("127.0.0.1:%d", freeTCPPort(t))
	hs := fakeHomeserver(t, map[string]string{rc.token: "@alice:example.org"})
	caddyfile := fmt.Sprintf(`{
	admin %s
	default_bind 127.0.0.1
	auto_https off
	persist_config off
	skip_install_trust
	http_port %d
	matrix_media {
		database sqlite %s
		storage_path %s
	}
}

http://example.org:%d {
	matrix_media {
		server_name example.org
		homeserver %s
		%s
	}
}
`, rc.admin, rc.httpPort, filepath.Join(dir, "media.db"), filepath.Join(dir, "media"), rc.httpPort, hs.URL, siteExtra)
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		t.Fatalf("adapting Caddyfile: %v (%v)", err, warnings)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("starting caddy: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	return rc
}

// download fetches an item of example.org through the site.
func (rc runningCaddy) download(t *testing.T, id string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/_matrix/client/v1/media/download/example.org/%s", rc.httpPort, id), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "example.org"
	req.Header.Set("Authorization", "Bearer "+rc.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// runImportCommand runs "caddy matrix-media import" against rc with the
// given arguments and flags, returning its report and error.
func (rc runningCaddy) runImportCommand(t *testing.T, args []string, flags map[string]string) (string, error) {
	t.Helper()
	cmd := importCommand()
	cmd.Flags().String("address", "", "")
	cmd.Flags().String("config", "", "")
	cmd.Flags().String("adapter", "", "")
	var out, progress bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&progress)
	if err := cmd.Flags().Set("address", rc.admin); err != nil {
		t.Fatal(err)
	}
	for k, v := range flags {
		if err := cmd.Flags().Set(k, v); err != nil {
			t.Fatal(err)
		}
	}
	err := cmd.RunE(cmd, args)
	if out.Len() > 0 && !strings.Contains(progress.String(), " items, ") {
		// A run that started shows its progress (plain lines: not a
		// terminal), at least the final one.
		t.Errorf("no progress shown: %q", progress.String())
	}
	return out.String(), err
}

// TestImportCommand runs the import command against a real Caddy: the
// imported media downloads through the site byte-exact with its type and
// file name, a second run finds everything present, a dry run writes
// nothing, and mismatched or conflicting items make the command fail.
func TestImportCommand(t *testing.T) {
	rc := startCaddy(t, t.TempDir())
	big := bytes.Repeat([]byte("0123456789abcdef"), 300_000/16)
	items := []testSourceItem{
		testItem("text", "text/plain; charset=utf-8", "Grüße aus Köln 日本語.txt", []byte("Grüße\n")),
		testItem("image", "image/png", "cat.png", []byte("\x89PNG not really")),
		testItem("big", "application/octet-stream", "", big),
		testItem("dup", "image/png", "copy.png", []byte("\x89PNG not really")),
	}
	quarantined := testItem("quar", "image/png", "q.png", []byte("bad bytes"))
	quarantined.QuarantinedBy = "@mod:example.org"
	missingQ := testItem("goneq", "image/png", "gq.png", []byte("long gone"))
	missingQ.Missing, missingQ.QuarantinedBy = true, "@mod:example.org"
	remote := testItem("remote1", "text/plain", "", []byte("from afar"))
	remote.ServerName, remote.Remote, remote.UserID = "remote.example", true, ""
	items = append(items, quarantined, missingQ, remote)
	from := writeTestSource(t, items)

	// A dry run reads everything and writes nothing.
	report, err := rc.runImportCommand(t, []string{"test"}, map[string]string{"from": from, "dry-run": "true", "include-remote": "true"})
	if err != nil || !strings.Contains(report, "would import:          6") || !strings.Contains(report, "missing at the source: 1") {
		t.Fatalf("dry run: %v\n%s", err, report)
	}
	if resp := rc.download(t, "text"); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("dry run stored an item: %d", resp.StatusCode)
	}

	report, err = rc.runImportCommand(t, []string{"test", from}, map[string]string{"include-remote": "true", "workers": "3"})
	if err != nil || !strings.Contains(report, "imported:              6") || !strings.Contains(report, "missing  mxc://example.org/goneq") {
		t.Fatalf("import: %v\n%s", err, report)
	}
	for _, it := range items[:4] {
		resp := rc.download(t, it.MediaID)
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, it.Body) {
			t.Errorf("download %s: %d, %d bytes (want %d), %v", it.MediaID, resp.StatusCode, len(body), len(it.Body), err)
			continue
		}
		if ct := resp.Header.Get("Content-Type"); ct != it.ContentType {
			t.Errorf("download %s: Content-Type %q, want %q", it.MediaID, ct, it.ContentType)
		}
		_, params, err := mime.ParseMediaType(resp.Header.Get("Content-Disposition"))
		if it.Filename != "" && (err != nil || params["filename"] != it.Filename) {
			t.Errorf("download %s: Content-Disposition %q, want file name %q", it.MediaID, resp.Header.Get("Content-Disposition"), it.Filename)
		}
	}
	if resp := rc.download(t, "quar"); resp.StatusCode != http.StatusNotFound {
		t.Errorf("quarantined item served: %d", resp.StatusCode)
	}
	res, err := currentResources()
	if err != nil {
		t.Fatal(err)
	}
	defer res.release()
	ctx := context.Background()
	for _, it := range []testSourceItem{quarantined, missingQ} {
		if q, err := res.meta.GetQuarantine(ctx, it.SHA256); err != nil || q.By != "@mod:example.org" {
			t.Errorf("quarantine of %s: %+v, %v", it.MediaID, q, err)
		}
	}
	m, err := res.meta.GetMedia(ctx, "remote.example", "remote1")
	if err != nil || !m.Remote || m.Datastore == "" || m.UserID != "" {
		t.Errorf("remote item: %+v, %v", m, err)
	}
	if n, _, err := res.meta.CountBlobs(ctx, "default"); err != nil || n != 5 {
		// text, image (= dup), big, quar, remote1.
		t.Errorf("%d blobs (%v), want 5: dup shares image's", n, err)
	}

	// A second run: everything already present.
	report, err = rc.runImportCommand(t, []string{"test"}, map[string]string{"from": from, "include-remote": "true"})
	if err != nil || !strings.Contains(report, "already present:       6") || !strings.Contains(report, "imported:              0") {
		t.Fatalf("second run: %v\n%s", err, report)
	}

	// Mismatched bytes and a conflicting ID fail the command and store
	// nothing.
	mismatch := testItem("mismatch", "text/plain", "", []byte("recorded"))
	mismatch.Body = []byte("REcorded")
	conflict := testItem("text", "text/plain", "", []byte("other text"))
	unknown := testItem("image", "image/png", "", []byte("other image"))
	unknown.SHA256, unknown.Size = "", -1
	bad := writeTestSource(t, []testSourceItem{mismatch, conflict, unknown})
	report, err = rc.runImportCommand(t, []string{"test"}, map[string]string{"from": bad})
	if err == nil || !strings.Contains(err.Error(), "1 hash mismatches, 2 conflicts") ||
		!strings.Contains(report, "mismatch mxc://example.org/mismatch") || !strings.Contains(report, "conflict mxc://example.org/image") {
		t.Fatalf("bad source: %v\n%s", err, report)
	}
	if resp := rc.download(t, "mismatch"); resp.StatusCode != http.StatusNotFound {
		t.Errorf("mismatched item stored: %d", resp.StatusCode)
	}
	if _, err := res.meta.GetBlob(ctx, importtest.SHA256(mismatch.Body)); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("mismatched bytes kept: %v", err)
	}

	if _, err := rc.runImportCommand(t, []string{"nosuchkind"}, map[string]string{"from": from}); err == nil || !strings.Contains(err.Error(), "known: archive, dendrite, mmr, synapse, test") {
		t.Errorf("unknown kind: %v", err)
	}
}

// TestAdminSinkErrors checks that the admin sink maps the endpoints'
// refusals to the importer's errors, through a real Caddy.
func TestAdminSinkErrors(t *testing.T) {
	rc := startCaddy(t, t.TempDir())
	sink := &adminSink{addr: rc.admin}
	ctx := context.Background()
	put := func(it testSourceItem, body []byte) (importer.Outcome, error) {
		src, err := openTestSource(ctx, writeTestSource(t, []testSourceItem{it}))
		if err != nil {
			t.Fatal(err)
		}
		m := src.(*importtest.Source).Media[0]
		return sink.Put(ctx, m.Item, bytes.NewReader(body))
	}
	it := testItem("one", "text/plain", "", []byte("one"))
	if out, err := put(it, it.Body); err != nil || out != importer.Imported {
		t.Fatalf("Put: %v, %v", out, err)
	}
	if out, err := put(it, it.Body); err != nil || out != importer.AlreadyPresent {
		t.Fatalf("Put again: %v, %v", out, err)
	}
	other := testItem("one", "text/plain", "", []byte("two"))
	if _, err := put(other, other.Body); !errors.Is(err, importer.ErrConflict) {
		t.Errorf("Put(conflict) = %v", err)
	}
	// The server checks the bytes itself.
	wrong := testItem("wrong", "text/plain", "", []byte("recorded"))
	if _, err := put(wrong, []byte("REcorded")); !errors.Is(err, importer.ErrHashMismatch) {
		t.Errorf("Put(mismatch) = %v", err)
	}
	badID := testItem("bad", "text/plain", "", []byte("x"))
	badID.SHA256 = "ABC"
	if _, err := put(badID, badID.Body); !errors.Is(err, importer.ErrInvalid) {
		t.Errorf("Put(invalid) = %v", err)
	}
	// A body that fails stops the upload with its own error.
	boom := errors.New("source disk failed")
	if _, err := sink.Put(ctx, importer.Item{ServerName: "example.org", MediaID: "broken", Size: 100_000},
		io.MultiReader(bytes.NewReader(make([]byte, 50_000)), failingReader{boom})); !errors.Is(err, boom) {
		t.Errorf("Put(failing body) = %v", err)
	}
	got, err := sink.Lookup(ctx, []storage.MediaRef{{ServerName: "example.org", MediaID: "one"}, {ServerName: "example.org", MediaID: "broken"}})
	if err != nil || len(got) != 1 || got[storage.MediaRef{ServerName: "example.org", MediaID: "one"}].SHA256 != it.SHA256 {
		t.Errorf("Lookup = %v, %v", got, err)
	}
	if err := sink.Quarantine(ctx, "nothex", "@mod:example.org"); !errors.Is(err, importer.ErrInvalid) {
		t.Errorf("Quarantine(bad hash) = %v", err)
	}
	if resp := rc.download(t, "one"); resp.StatusCode != http.StatusOK {
		t.Fatalf("download before the quarantine: %d", resp.StatusCode)
	}
	if err := sink.Quarantine(ctx, it.SHA256, "@mod:example.org"); err != nil {
		t.Errorf("Quarantine = %v", err)
	}
	if resp := rc.download(t, "one"); resp.StatusCode != http.StatusNotFound {
		t.Errorf("quarantined through the admin API, yet served (cached?): %d", resp.StatusCode)
	}
}

// failingReader fails every read with err.
type failingReader struct{ err error }

func (f failingReader) Read([]byte) (int, error) { return 0, f.err }

// TestImportEndpointAnswers checks the import endpoints' answers to bad
// requests, and that each item-level refusal has its status and code.
func TestImportEndpointAnswers(t *testing.T) {
	a, unload := provisionApp(t, *testAppConfig(t))
	defer unload()
	res := a.res
	header := func(doc string) string { return base64.RawURLEncoding.EncodeToString([]byte(doc)) }
	put := func(path, hdr, body string) (int, string) {
		t.Helper()
		req := httptest.NewRequest(http.MethodPut, path, strings.NewReader(body))
		if hdr != "" {
			req.Header.Set(importItemHeader, hdr)
		}
		rec := httptest.NewRecorder()
		if err := res.serveImportMedia(rec, req); err != nil {
			t.Fatalf("PUT %s: %v", path, err)
		}
		return rec.Code, rec.Body.String()
	}
	media := adminPrefix + "import/media/example.org/"
	sum := importtest.SHA256([]byte("hello"))
	for i, tc := range []struct {
		path, hdr, body string
		status          int
		want            string
	}{
		{media + "ok", header(`{"size":5,"sha256":"` + sum + `","content_type":"text/plain"}`), "hello", 200, `{"outcome":"imported"}`},
		{media + "ok", header(`{"size":5,"sha256":"` + sum + `"}`), "hello", 200, `{"outcome":"already_present"}`},
		{media + "ok", header(`{"size":5}`), "HELLO", 409, `"code":"conflict"`},
		{media + "short", header(`{"size":6}`), "hello", 422, `"code":"mismatch"`},
		{media + "wrong", header(`{"size":-1,"sha256":"` + sum + `"}`), "olleh", 422, `"code":"mismatch"`},
		{media + "bad=id", header(`{"size":5}`), "hello", 400, `"code":"invalid"`},
		{adminPrefix + "import/media/example.org", header(`{"size":5}`), "hello", 400, `"code":"invalid"`},
		{media + "nosize", header(`{"sha256":"` + sum + `"}`), "hello", 400, `no \"size\"`},
		{media + "unknown", header(`{"size":5,"bogus":1}`), "hello", 400, `unknown field`},
		{media + "nohdr", "", "hello", 400, `header is missing`},
		{media + "notb64", "!!!", "hello", 400, `base64url`},
		{media + "huge", strings.Repeat("A", maxImportItemHeader+1), "hello", 400, `longer than`},
		{media + "neg", header(`{"size":-2}`), "hello", 400, `negative`},
	} {
		status, body := put(tc.path, tc.hdr, tc.body)
		if status != tc.status || !strings.Contains(body, tc.want) {
			t.Errorf("Test %d: PUT %s = %d %s; want %d with %q", i, tc.path, status, body, tc.status, tc.want)
		}
	}
	for _, id := range []string{"short", "wrong", "bad=id"} {
		if _, err := res.meta.GetMedia(context.Background(), "example.org", id); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("refused item %s stored: %v", id, err)
		}
	}
	if _, err := res.meta.GetBlob(context.Background(), importtest.SHA256([]byte("olleh"))); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("mismatched bytes kept: %v", err)
	}

	lookup := func(body string) (int, string) {
		return adminCallRaw(t, res.serveImportLookup, http.MethodPost, "import/lookup", body)
	}
	if status, body := lookup(`{"media":["mxc://example.org/ok","mxc://example.org/none"]}`); status != 200 ||
		strings.TrimSpace(body) != `{"present":{"mxc://example.org/ok":{"sha256":"`+sum+`","size":5}}}` {
		t.Errorf("lookup: %d %s", status, body)
	}
	many, _ := json.Marshal(importLookupRequest{Media: make([]string, maxImportLookupRefs+1)})
	for i, tc := range []struct {
		body, want string
	}{
		{`{"media":["https://example.org/ok"]}`, "mxc://"},
		{`{"refs":[]}`, "unknown field"},
		{string(many), "at most"},
	} {
		if status, body := lookup(tc.body); status != 400 || !strings.Contains(body, tc.want) || !strings.Contains(body, `"code":"invalid"`) {
			t.Errorf("lookup %d: %d %s", i, status, body)
		}
	}
	if status, _ := adminCallRaw(t, res.serveImportLookup, http.MethodGet, "import/lookup", ""); status != http.StatusMethodNotAllowed {
		t.Errorf("GET lookup: %d", status)
	}

	quarantine := func(body string) (int, string) {
		return adminCallRaw(t, res.serveImportQuarantine, http.MethodPost, "import/quarantine", body)
	}
	if status, body := quarantine(`{"sha256":"` + sum + `","quarantined_by":"@mod:example.org"}`); status != 200 || strings.TrimSpace(body) != `{}` {
		t.Errorf("quarantine: %d %s", status, body)
	}
	if m, err := res.meta.GetMedia(context.Background(), "example.org", "ok"); err != nil || !m.Refused() {
		t.Errorf("quarantined item: %+v, %v", m, err)
	}
	for _, body := range []string{`{"sha256":"x","quarantined_by":"@mod:example.org"}`, `{"sha256":"` + sum + `"}`, `{"nope":1}`} {
		if status, answer := quarantine(body); status != 400 || !strings.Contains(answer, `"code":"invalid"`) {
			t.Errorf("quarantine %s: %d %s", body, status, answer)
		}
	}
}

// adminCallRaw calls an import endpoint handler, which writes its refusals
// itself, and returns the status and body.
func adminCallRaw(t *testing.T, serve func(http.ResponseWriter, *http.Request) error, method, path, body string) (int, string) {
	t.Helper()
	return adminCall(t, serve, method, adminPrefix+path, body)
}

// TestImportArgs checks the command line of the import command.
func TestImportArgs(t *testing.T) {
	for i, tc := range []struct {
		args  []string
		flags map[string]string
		want  string
	}{
		{[]string{"nope"}, nil, "unknown import kind"},
		{[]string{"test"}, nil, "--from is required"},
		{[]string{"test", "a.json"}, map[string]string{"from": "b.json"}, "give the source once"},
		{[]string{"test"}, map[string]string{"from": "a.json", "workers": "0"}, "--workers"},
		{[]string{"test"}, map[string]string{"from": "a.json", "server-name": "https://example.org"}, "not a server name"},
	} {
		cmd := importCommand()
		for k, v := range tc.flags {
			if err := cmd.Flags().Set(k, v); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := parseImportArgs(cmd, tc.args); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Test %d: %v, want %q", i, err, tc.want)
		}
	}
	cmd := importCommand()
	for k, v := range map[string]string{"from": "a.json", "include-remote": "true", "dry-run": "true", "workers": "7"} {
		if err := cmd.Flags().Set(k, v); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []string{"one.example", "two.example"} {
		if err := cmd.Flags().Set("server-name", s); err != nil {
			t.Fatal(err)
		}
	}
	req, err := parseImportArgs(cmd, []string{"test"})
	if err != nil || req.from != "a.json" || !req.opts.DryRun || !req.opts.Filter.IncludeRemote || req.opts.Workers != 7 ||
		strings.Join(req.opts.Filter.ServerNames, ",") != "one.example,two.example" {
		t.Errorf("parsed %+v, %v", req, err)
	}
}

// TestImportProgressLine checks the progress line of the import command.
func TestImportProgressLine(t *testing.T) {
	p := importer.Progress{Totals: importer.Totals{Items: 10, Bytes: 4096}, Bytes: 1024, Elapsed: time.Minute,
		Counts: importer.Counts{Imported: 2, AlreadyPresent: 1, Missing: 1}}
	got := importProgressLine(p)
	want := "[########                      ]  25% 4/10 items, 1.0 KiB/4.0 KiB, 2 imported, 1 already present, 1 not imported, ETA 3m0s"
	if got != want {
		t.Errorf("line\n%q\nwant\n%q", got, want)
	}
	p.Totals = importer.Totals{Items: -1, Bytes: -1}
	if got := importProgressLine(p); got != "4 items, 1.0 KiB, 2 imported, 1 already present, 1 not imported" {
		t.Errorf("line without totals: %q", got)
	}
}

// slowBody yields n bytes 'x', one per second.
type slowBody struct{ n, sent int }

func (s *slowBody) Read(p []byte) (int, error) {
	if s.sent >= s.n {
		return 0, io.EOF
	}
	time.Sleep(time.Second)
	s.sent++
	p[0] = 'x'
	return 1, nil
}

// TestImportSlowBody stores an item whose body takes longer than the admin
// server's read timeout (10 s) to arrive: the endpoint lifts it.
func TestImportSlowBody(t *testing.T) {
	rc := startCaddy(t, t.TempDir())
	body := bytes.Repeat([]byte("x"), 11)
	it := importer.Item{ServerName: "example.org", MediaID: "slow", Size: int64(len(body)), SHA256: importtest.SHA256(body)}
	out, err := (&adminSink{addr: rc.admin}).Put(context.Background(), it, &slowBody{n: len(body)})
	if err != nil || out != importer.Imported {
		t.Fatalf("Put = %v, %v", out, err)
	}
	resp := rc.download(t, "slow")
	got, err := io.ReadAll(resp.Body)
	if err != nil || !bytes.Equal(got, body) {
		t.Errorf("download: %d %q %v", resp.StatusCode, got, err)
	}
}

// FuzzImportItemHeader feeds the import endpoint's metadata header parser
// arbitrary documents: it never panics, accepts only valid items, and an
// accepted item survives encoding again.
func FuzzImportItemHeader(f *testing.F) {
	for _, doc := range []string{
		`{"size":5,"sha256":"` + importtest.SHA256([]byte("hello")) + `","content_type":"text/plain","filename":"Grüße.txt"}`,
		`{"size":-1,"remote":true,"created_ts":1650000000000,"quarantined_by":"@mod:example.org","protected":true}`,
		`{"size":-2}`, `{"sha256":"x"}`, `{"size":1,"bogus":true}`, `[]`, `null`, `{"size":1e400}`, ``,
	} {
		f.Add(base64.RawURLEncoding.EncodeToString([]byte(doc)))
	}
	f.Add("!!!")
	ref := storage.MediaRef{ServerName: "example.org", MediaID: "fuzz"}
	f.Fuzz(func(t *testing.T, value string) {
		it, err := decodeImportItem(ref, value)
		if err != nil {
			if !errors.Is(err, importer.ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if err := importer.ValidateItem(it); err != nil {
			t.Fatalf("accepted an invalid item: %v", err)
		}
		again, err := newImportItem(it).encode()
		if err != nil {
			t.Fatal(err)
		}
		back, err := decodeImportItem(ref, again)
		if err != nil || back.Size != it.Size || back.SHA256 != it.SHA256 || back.Filename != it.Filename ||
			back.ContentType != it.ContentType || !back.CreatedAt.Equal(it.CreatedAt) || back.QuarantinedBy != it.QuarantinedBy {
			t.Fatalf("round trip: %+v -> %+v, %v", it, back, err)
		}
	})
}

// BenchmarkImportAdminAPI imports b.N items of 1 KiB through the admin API
// of a Caddy running in this process (SQLite and a file datastore), as the
// import command does.
func BenchmarkImportAdminAPI(b *testing.B) {
	rc := startCaddy(b, b.TempDir())
	src := &importtest.Source{}
	for i := range b.N {
		body := make([]byte, 1024)
		copy(body, fmt.Sprintf("item %d", i))
		src.Media = append(src.Media, importtest.New("example.org", fmt.Sprintf("m%09d", i), body))
	}
	b.SetBytes(1024)
	b.ResetTimer()
	rep, err := importer.Run(context.Background(), src, &adminSink{addr: rc.admin}, importer.Options{})
	b.StopTimer()
	if err != nil || rep.Imported != int64(b.N) {
		b.Fatalf("Run: %v\n%s", err, rep)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "items/s")
}

// readSizes records the sizes of the reads asked of it.
type readSizes struct {
	r     io.Reader
	sizes []int
}

func (s *readSizes) Read(p []byte) (int, error) {
	s.sizes = append(s.sizes, len(p))
	return s.r.Read(p)
}

// TestGatedBodyWriteTo checks the pieces an item's body is sent in (the
// HTTP client copies request bodies through WriteTo), the bytes sent, and
// the gate: nothing is read after shut or after ctx ended.
func TestGatedBodyWriteTo(t *testing.T) {
	ctx := context.Background()
	for _, tt := range []struct {
		size     int
		wantRead int
	}{
		{0, 1},
		{10, 11},
		{importSendChunk - 1, importSendChunk},
		{importSendChunk, importSendChunk},
		{600_000, importSendChunk},
	} {
		t.Run(fmt.Sprint(tt.size), func(t *testing.T) {
			body := make([]byte, tt.size)
			for i := range body {
				body[i] = byte(i * 7)
			}
			src := &readSizes{r: bytes.NewReader(body)}
			g := &gatedBody{ctx: ctx, r: src, chunk: sendChunk(int64(tt.size))}
			var out bytes.Buffer
			n, err := g.WriteTo(&out)
			if err != nil || n != int64(tt.size) || !bytes.Equal(out.Bytes(), body) {
				t.Fatalf("WriteTo = %d, %v; %d bytes out, equal %v", n, err, out.Len(), bytes.Equal(out.Bytes(), body))
			}
			for _, s := range src.sizes {
				if s != tt.wantRead {
					t.Fatalf("reads of %v bytes, want %d each", src.sizes, tt.wantRead)
				}
			}
			if err := g.shut(); err != nil {
				t.Errorf("shut = %v", err)
			}
		})
	}

	t.Run("shut", func(t *testing.T) {
		src := &readSizes{r: bytes.NewReader(make([]byte, 100))}
		g := &gatedBody{ctx: ctx, r: src, chunk: sendChunk(100)}
		if err := g.shut(); err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		if n, err := g.WriteTo(&out); !errors.Is(err, errGateShut) || n != 0 || len(src.sizes) != 0 {
			t.Errorf("WriteTo after shut = %d, %v after %d reads", n, err, len(src.sizes))
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		src := &readSizes{r: bytes.NewReader(make([]byte, 100))}
		g := &gatedBody{ctx: cctx, r: src, chunk: sendChunk(100)}
		if _, err := g.WriteTo(io.Discard); !errors.Is(err, context.Canceled) || len(src.sizes) != 0 {
			t.Errorf("WriteTo with a cancelled context = %v after %d reads", err, len(src.sizes))
		}
		if err := g.shut(); !errors.Is(err, context.Canceled) {
			t.Errorf("shut = %v", err)
		}
	})
	t.Run("body error", func(t *testing.T) {
		boom := errors.New("disk failed")
		g := &gatedBody{ctx: ctx, r: io.MultiReader(bytes.NewReader(make([]byte, 300_000)), failingReader{boom}), chunk: importSendChunk}
		var out bytes.Buffer
		if n, err := g.WriteTo(&out); !errors.Is(err, boom) || n != 300_000 || out.Len() != 300_000 {
			t.Errorf("WriteTo = %d, %v; %d bytes out", n, err, out.Len())
		}
		if err := g.shut(); !errors.Is(err, boom) {
			t.Errorf("shut = %v", err)
		}
	})
}
