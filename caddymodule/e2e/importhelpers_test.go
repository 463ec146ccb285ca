package e2e

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	_ "image/png" // thumbnails are decoded to check them
	"io"
	"mime"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	// Registers the "pgx" database/sql driver (Dendrite's PostgreSQL
	// database).
	_ "github.com/jackc/pgx/v5/stdlib"
	// Registers the "sqlite3" database/sql driver (Dendrite's and Caddy's
	// SQLite databases).
	_ "github.com/mattn/go-sqlite3"
)

// cliTimeout bounds one run of a "caddy matrix-media" command.
const cliTimeout = 2 * time.Minute

// mediaItem is one media item a test uploaded, and to whom it belongs.
type mediaItem struct {
	id, user, name, ctype string
	content               []byte
}

// importTarget is a Caddy that media is imported into: one site for
// serverName whose media admin is @ops:<serverName>, in front of a fake
// homeserver that knows a reader's and the admin's tokens.
type importTarget struct {
	inst       *instance
	serverName string
	// admin is the admin API's address, 127.0.0.1:port.
	admin string
	// dbPath is the SQLite database of the app.
	dbPath string
	// reader is a plain user of the site, ops its media admin.
	reader, ops *siteClient
}

// importTokens are the fake homeserver's tokens for an import target.
func importTokens(serverName string) map[string]string {
	return map[string]string{"tok-reader": "@reader:" + serverName, "tok-ops": "@ops:" + serverName}
}

// startDefaultsTarget starts a Caddy whose matrix_media app runs on its
// embedded defaults: no matrix_media global option at all, so the SQLite
// database and the file datastore live under Caddy's data directory (the
// harness points XDG_DATA_HOME into the test's temporary directory).
func startDefaultsTarget(t *testing.T, serverName string) *importTarget {
	t.Helper()
	hs := newHomeserver(t, importTokens(serverName))
	cfg := config{adminPort: freePort(t), httpPort: freePort(t), dataDir: t.TempDir(), homeserver: hs}
	cfg.text = fmt.Sprintf(`{
	admin 127.0.0.1:%d
	default_bind 127.0.0.1
	auto_https off
	persist_config off
	skip_install_trust
	http_port %d
	https_port %d
}

http://%s:%d {
	matrix_media {
		server_name %s
		homeserver %s
		admins @ops:%s
	}
}
`, cfg.adminPort, cfg.httpPort, cfg.httpPort+1, serverName, cfg.httpPort, serverName, hs.srv.URL, serverName)
	inst := startCaddy(t, cfg)
	return newImportTarget(inst, serverName,
		filepath.Join(cfg.dataDir, "xdg-data", "caddy", "matrix_media", "media.db"))
}

// newImportTarget describes a running Caddy whose site serverName has the
// tokens of importTokens.
func newImportTarget(inst *instance, serverName, dbPath string) *importTarget {
	return &importTarget{
		inst:       inst,
		serverName: serverName,
		admin:      fmt.Sprintf("127.0.0.1:%d", inst.cfg.adminPort),
		dbPath:     dbPath,
		reader:     newSiteClient(inst, serverName, "tok-reader", true),
		ops:        newSiteClient(inst, serverName, "tok-ops", true),
	}
}

// cliResult is what one run of the caddy binary printed, and how it ended.
type cliResult struct {
	stdout, stderr string
	err            error
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit: %v\nstdout:\n%s\nstderr:\n%s", r.err, r.stdout, r.stderr)
}

// runCLI runs the Caddy binary with args and waits for it (at most
// cliTimeout).
func runCLI(t *testing.T, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBinary(t), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("caddy %s did not end within %v", strings.Join(args, " "), cliTimeout)
	}
	return cliResult{stdout: stdout.String(), stderr: stderr.String(), err: err}
}

// importCLI runs "caddy matrix-media import <kind> --from <from>" against
// the target's admin API, with extra flags.
func (tg *importTarget) importCLI(t *testing.T, kind, from string, extra ...string) cliResult {
	t.Helper()
	args := append([]string{"matrix-media", "import", kind, "--from", from, "--address", tg.admin}, extra...)
	return runCLI(t, args...)
}

// reportLine matches a count line of an import report, e.g.
// "  already present:       8".
var reportLine = regexp.MustCompile(`(?m)^  ([a-z ]+):\s+(\d+)`)

// reportCounts reads the counts of an import report by label.
func reportCounts(report string) map[string]int {
	out := map[string]int{}
	for _, m := range reportLine.FindAllStringSubmatch(report, -1) {
		n, err := strconv.Atoi(m[2])
		if err == nil {
			out[m[1]] = n
		}
	}
	return out
}

// wantCounts checks that the report of r shows the counts of want (labels
// of the report: "imported", "already present", "missing at the source",
// "hash mismatches", "conflicts", "invalid", "failed", or "would import"
// for a dry run); the counts of the labels not in want must be 0.
func wantCounts(t *testing.T, what string, r cliResult, want map[string]int) {
	t.Helper()
	got := reportCounts(r.stdout)
	if len(got) == 0 {
		t.Errorf("%s: no report printed\n%v", what, r)
		return
	}
	for label, n := range got {
		if w, ok := want[label]; ok && n != w || !ok && n != 0 {
			t.Errorf("%s: report says %q: %d, want %d\n%v", what, label, n, want[label], r)
		}
	}
	for label := range want {
		if _, ok := got[label]; !ok {
			t.Errorf("%s: the report has no %q line\n%v", what, label, r)
		}
	}
}

// adminGet sends a GET to a Caddy admin API and decodes a 200 JSON answer
// into out; it returns the status.
func adminGet(t *testing.T, admin, path string, out any) int {
	t.Helper()
	resp, err := http.Get("http://" + admin + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading: %v", path, err)
	}
	if resp.StatusCode == http.StatusOK {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("GET %s: decoding %q: %v", path, body, err)
		}
	}
	return resp.StatusCode
}

// storedMedia is what Caddy's admin API says about a media item
// (GET /matrix_media/media/<server>/<id>), without its last access time,
// which downloads change.
type storedMedia struct {
	State         string `json:"state"`
	UserID        string `json:"user_id"`
	ContentType   string `json:"content_type"`
	Filename      string `json:"filename"`
	Size          int64  `json:"size"`
	SHA256        string `json:"sha256"`
	Datastore     string `json:"datastore"`
	Remote        bool   `json:"remote"`
	Protected     bool   `json:"protected"`
	QuarantinedBy string `json:"quarantined_by"`
	CreatedTS     int64  `json:"created_ts"`
}

// datastoreCount is one datastore of GET /matrix_media/datastores.
type datastoreCount struct {
	Name  string `json:"name"`
	Blobs int64  `json:"blobs"`
	Bytes int64  `json:"bytes"`
}

// storeState is what a Caddy holds: the media items of a set of IDs, the
// number of media rows of its database, and its datastores' blob counts.
type storeState struct {
	Media      map[string]storedMedia
	Rows       int
	Datastores []datastoreCount
}

// state reads what the target holds about ids (absent ones are left out of
// Media), counts its media rows in its database and its blobs.
func (tg *importTarget) state(t *testing.T, ids []string) storeState {
	t.Helper()
	st := storeState{Media: map[string]storedMedia{}}
	for _, id := range ids {
		var m storedMedia
		switch status := adminGet(t, tg.admin, "/matrix_media/media/"+tg.serverName+"/"+id, &m); status {
		case http.StatusOK:
			st.Media[id] = m
		case http.StatusNotFound:
		default:
			t.Fatalf("media info of %s: status %d", id, status)
		}
	}
	st.Rows = countRows(t, "sqlite3", "file:"+tg.dbPath+"?mode=ro&_busy_timeout=10000", "SELECT COUNT(*) FROM media")
	if status := adminGet(t, tg.admin, "/matrix_media/datastores", &st.Datastores); status != http.StatusOK {
		t.Fatalf("GET /matrix_media/datastores: %d", status)
	}
	return st
}

// blobs is the number of blobs in every datastore.
func (s storeState) blobs() int64 {
	var n int64
	for _, d := range s.Datastores {
		n += d.Blobs
	}
	return n
}

// wantSameState fails the test when two states differ.
func wantSameState(t *testing.T, what string, got, want storeState) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s: the stores differ:\n got  %+v\n want %+v", what, got, want)
	}
}

// countRows runs a COUNT query on a database opened with driver and dsn.
func countRows(t *testing.T, driver, dsn, query string) int {
	t.Helper()
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatalf("opening %s database: %v", driver, err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow(query).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// dendriteRow is what Dendrite recorded about one upload.
type dendriteRow struct {
	userID, contentType, uploadName string
	size, createdMS                 int64
}

// dendriteRows reads Dendrite's media table (at rest: Dendrite stopped)
// by media ID.
func dendriteRows(t *testing.T, driver, dsn string) map[string]dendriteRow {
	t.Helper()
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatalf("opening dendrite's media database: %v", err)
	}
	defer db.Close()
	rows, err := db.Query(`SELECT media_id, user_id, content_type, upload_name, file_size_bytes, creation_ts FROM mediaapi_media_repository`)
	if err != nil {
		t.Fatalf("reading dendrite's media table: %v", err)
	}
	defer rows.Close()
	out := map[string]dendriteRow{}
	for rows.Next() {
		var id string
		var r dendriteRow
		if err := rows.Scan(&id, &r.userID, &r.contentType, &r.uploadName, &r.size, &r.createdMS); err != nil {
			t.Fatal(err)
		}
		out[id] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// checkServed downloads it through the authenticated v1 endpoint (with c's
// token) and the legacy v3 endpoint (without one): both must answer its
// exact bytes, its content type and, in Content-Disposition, its file name
// (none when it has none).
func checkServed(t *testing.T, c *siteClient, it mediaItem) {
	t.Helper()
	for _, req := range []request{
		{method: http.MethodGet, path: c.downloadPath(it.id)},
		{method: http.MethodGet, path: "/_matrix/media/v3/download/" + c.serverName + "/" + it.id, noAuth: true},
	} {
		resp := c.must(t, req)
		if resp.status != http.StatusOK || !bytes.Equal(resp.body, it.content) {
			t.Errorf("GET %s (%q): %d with %d bytes, want 200 with the %d uploaded", req.path, it.name, resp.status, len(resp.body), len(it.content))
			continue
		}
		if ct := resp.header.Get("Content-Type"); ct != it.ctype {
			t.Errorf("GET %s: Content-Type %q, want %q", req.path, ct, it.ctype)
		}
		disp := resp.header.Get("Content-Disposition")
		_, params, err := mime.ParseMediaType(disp)
		if err != nil || params["filename"] != it.name {
			t.Errorf("GET %s: Content-Disposition %q (%v), want file name %q", req.path, disp, err, it.name)
		}
	}
}

// checkThumbnail asks for a thumbnail of an image through the v1 endpoint:
// a PNG no larger than the original comes back.
func checkThumbnail(t *testing.T, c *siteClient, id string, maxW, maxH int) {
	t.Helper()
	path := "/_matrix/client/v1/media/thumbnail/" + c.serverName + "/" + id + "?width=64&height=64&method=scale"
	resp := c.must(t, request{method: http.MethodGet, path: path})
	if resp.status != http.StatusOK || resp.header.Get("Content-Type") != "image/png" {
		t.Fatalf("thumbnail of %s: %v (%s), want 200 image/png", id, resp, resp.header.Get("Content-Type"))
	}
	cfg, format, err := image.DecodeConfig(bytes.NewReader(resp.body))
	if err != nil || format != "png" || cfg.Width <= 0 || cfg.Height <= 0 || cfg.Width > maxW || cfg.Height > maxH {
		t.Errorf("thumbnail of %s: %s %dx%d (%v), want a PNG of at most %dx%d", id, format, cfg.Width, cfg.Height, err, maxW, maxH)
	}
}

// interruptProxy stands between the import command and Caddy's admin API:
// it passes every request on, counts the items Caddy stored (PUT
// /matrix_media/import/media/... answered 200), and once there are `after`
// of them it holds every further item until cut, when it closes their
// connections unanswered. So the command is stopped after a known number
// of items, whatever the moment its interruption arrives.
//
// A request the proxy passed on runs to its end in Caddy even when the
// command goes away meanwhile (killed, or cancelling on SIGINT): Caddy may
// store an item whose answer nobody reads, and the proxy still counts it,
// so once the proxy is closed (which waits for every request it accepted),
// stored is exactly what Caddy holds.
type interruptProxy struct {
	srv *httptest.Server
	// after is how many stored items trip the proxy.
	after int64
	// stored counts the items Caddy stored through the proxy.
	stored atomic.Int64
	// tripped is closed when stored reaches after; cutc when cut is called.
	tripped, cutc     chan struct{}
	tripOnce, cutOnce sync.Once
}

// newInterruptProxy starts a proxy to the admin API at admin.
func newInterruptProxy(t *testing.T, admin string, after int) *interruptProxy {
	t.Helper()
	target := &url.URL{Scheme: "http", Host: admin}
	p := &interruptProxy{after: int64(after), tripped: make(chan struct{}), cutc: make(chan struct{})}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out = pr.Out.WithContext(context.WithoutCancel(pr.Out.Context()))
			pr.SetURL(target)
			// Caddy's admin API checks Host (and Origin, if enforced).
			pr.Out.Header.Set("Origin", "http://"+admin)
		},
		// Counted before the answer reaches the command: a request the
		// command sends after this answer finds the proxy tripped.
		ModifyResponse: func(resp *http.Response) error {
			if isImportPut(resp.Request) && resp.StatusCode == http.StatusOK && p.stored.Add(1) >= p.after {
				p.tripOnce.Do(func() { close(p.tripped) })
			}
			return nil
		},
	}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if isImportPut(r) && p.isTripped() {
			p.hold(w)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		p.cut()
		p.srv.Close()
	})
	return p
}

// isImportPut tells whether r stores one item: with its bytes sent, or
// read by Caddy from the source's file.
func isImportPut(r *http.Request) bool {
	return r.Method == http.MethodPut && (strings.HasPrefix(r.URL.Path, "/matrix_media/import/media/") ||
		strings.HasPrefix(r.URL.Path, "/matrix_media/import/file/"))
}

func (p *interruptProxy) isTripped() bool {
	select {
	case <-p.tripped:
		return true
	default:
		return false
	}
}

// hold keeps a request until cut, then closes its connection unanswered.
func (p *interruptProxy) hold(w http.ResponseWriter) {
	<-p.cutc
	conn, _, err := http.NewResponseController(w).Hijack()
	if err == nil {
		_ = conn.Close()
	}
}

// cut closes the connections of the held requests, and of every later
// item request.
func (p *interruptProxy) cut() { p.cutOnce.Do(func() { close(p.cutc) }) }

// addr is the proxy's address, 127.0.0.1:port.
func (p *interruptProxy) addr() string { return strings.TrimPrefix(p.srv.URL, "http://") }

// interruptedImport runs "caddy matrix-media import <kind> --from <from>
// --workers 2" through an interruptProxy and sends the command sig once
// Caddy has stored `after` items. It returns how many items Caddy stored
// (after, or one more: the other worker's item may have been on its way),
// counted once every request that reached Caddy was answered, and what the
// command printed.
func interruptedImport(t *testing.T, tg *importTarget, kind, from string, after int, sig os.Signal) (int, cliResult) {
	t.Helper()
	p := newInterruptProxy(t, tg.admin, after)
	cmd := exec.Command(caddyBinary(t), "matrix-media", "import", kind, "--from", from, "--workers", "2", "--address", p.addr())
	var stdout, stderr syncBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the import: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	result := func(err error) cliResult {
		return cliResult{stdout: stdout.String(), stderr: stderr.String(), err: err}
	}
	deadline := time.NewTimer(cliTimeout)
	defer deadline.Stop()
	select {
	case <-p.tripped:
	case err := <-exited:
		t.Fatalf("the import ended before %d items were stored:\n%v", after, result(err))
	case <-deadline.C:
		_ = cmd.Process.Kill()
		t.Fatalf("%d items not stored within %v:\n%v", after, cliTimeout, result(<-exited))
	}
	if err := cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signalling the import: %v", err)
	}
	p.cut()
	select {
	case err := <-exited:
		// No request the command sent is still on its way to Caddy.
		p.srv.Close()
		return int(p.stored.Load()), result(err)
	case <-deadline.C:
		_ = cmd.Process.Kill()
		t.Fatalf("the import did not end within %v of %v:\n%v", cliTimeout, sig, result(<-exited))
	}
	return 0, cliResult{}
}

// errNotInterrupted is returned by checkInterrupted.
var errNotInterrupted = errors.New("the command did not end as interrupted")

// checkInterrupted checks how an import stopped by SIGINT ended: with an
// error, having reported no item Caddy does not hold and missing at most the
// two whose answers were on their way when it cancelled (the resumed run
// finds those present), and saying it was
// interrupted (its context was cancelled) or, when the signal reached it
// after its cut requests failed, that they failed.
func checkInterrupted(r cliResult, stored int) (string, error) {
	if r.err == nil {
		return "", fmt.Errorf("%w: it succeeded", errNotInterrupted)
	}
	if got := reportCounts(r.stdout)["imported"]; got > stored || got < stored-2 {
		return "", fmt.Errorf("%w: its report says %d imported, Caddy stored %d", errNotInterrupted, got, stored)
	}
	switch {
	case strings.Contains(r.stderr, "import interrupted: run the same command again to resume"):
		return "cancelled", nil
	case strings.Contains(r.stderr, "failures (see the report)"):
		return "requests cut before the signal arrived", nil
	default:
		return "", fmt.Errorf("%w: no interruption nor failure in its output", errNotInterrupted)
	}
}

// dendriteFile is where Dendrite keeps content in its media directory:
// base_path/h[0]/h[1]/h[2:]/file, h the unpadded URL-safe base64 of its
// SHA-256.
func dendriteFile(mediaPath string, h string) string {
	return filepath.Join(mediaPath, h[0:1], h[1:2], h[2:], "file")
}
