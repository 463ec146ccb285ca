package e2e

import (
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testdendrite"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

// dendriteServer is the server name of the Dendrites media is imported
// from.
const dendriteServer = "dendrite.test"

// dendriteStore is a stopped Dendrite and the media uploaded to it.
type dendriteStore struct {
	configPath, mediaPath string
	// items are the uploads, by their media IDs; rows what Dendrite
	// recorded about them.
	items []mediaItem
	rows  map[string]dendriteRow
}

// ids are the media IDs of the store's items.
func (s dendriteStore) ids() []string {
	ids := make([]string, len(s.items))
	for i, it := range s.items {
		ids[i] = it.id
	}
	return ids
}

// distinctContents counts the different contents of items.
func distinctContents(items []mediaItem) int64 {
	seen := map[string]bool{}
	for _, it := range items {
		seen[string(it.content)] = true
	}
	return int64(len(seen))
}

// upload is a file to send to a media API, by whom.
type upload struct {
	user, name, ctype string
	content           []byte
}

// uploadToDendrite starts a real Dendrite (its database chosen by opts),
// creates users, uploads every file through Dendrite's own media API, stops
// Dendrite and reads back what it recorded.
func uploadToDendrite(t *testing.T, opts testdendrite.Options, uploads []upload) dendriteStore {
	t.Helper()
	d := testdendrite.Start(t, opts)
	tokens := map[string]string{}
	for _, u := range uploads {
		if _, ok := tokens[u.user]; !ok {
			d.CreateUser(t, u.user, u.user+"-password-1", false)
			tokens[u.user] = d.Login(t, u.user, u.user+"-password-1")
		}
	}
	store := dendriteStore{configPath: d.ConfigPath(), mediaPath: d.MediaPath()}
	for _, u := range uploads {
		uri := d.UploadMedia(t, tokens[u.user], u.name, u.ctype, u.content)
		id, ok := strings.CutPrefix(uri, "mxc://"+opts.ServerName+"/")
		if !ok {
			t.Fatalf("dendrite answered %q, want an mxc URI of %s", uri, opts.ServerName)
		}
		store.items = append(store.items, mediaItem{id: id, user: "@" + u.user + ":" + opts.ServerName, name: u.name, ctype: u.ctype, content: u.content})
	}
	d.Stop(t)

	driver, dsn := "sqlite3", "file:"+filepath.Join(filepath.Dir(d.ConfigPath()), "mediaapi.db")+"?mode=ro"
	if opts.Database != "" {
		driver, dsn = "pgx", opts.Database
	}
	store.rows = dendriteRows(t, driver, dsn)
	if len(store.rows) != len(uploads) {
		t.Fatalf("dendrite recorded %d media, want the %d uploaded (one row each, even for the same bytes)", len(store.rows), len(uploads))
	}
	for _, it := range store.items {
		if r, ok := store.rows[it.id]; !ok || r.userID != it.user || r.size != int64(len(it.content)) {
			t.Fatalf("dendrite's row of %s: %+v (%v), want uploader %s and %d bytes", it.id, r, ok, it.user, len(it.content))
		}
	}
	return store
}

// dendriteUploads are the files of TestImportFromDendrite: Unicode and
// awkward names, no name, a PNG, 1 MiB of random bytes, and the same bytes
// uploaded by two users.
func dendriteUploads(t *testing.T) []upload {
	same := []byte("the same bytes, uploaded twice by two people\n")
	return []upload{
		{"alice", "Grüße aus Köln ☕ 日本語.txt", "text/plain; charset=utf-8", []byte("Grüße aus Köln — ☕\n")},
		{"alice", "holiday.png", "image/png", e2ePNG(t, 300, 200)},
		{"bob", "", "application/octet-stream", []byte{0, 1, 2, 3, 0xff, 0xfe, 'n', 'o', ' ', 'n', 'a', 'm', 'e'}},
		{"bob", "random.bin", "application/octet-stream", randomBytes(1 << 20)},
		{"alice", "shared.txt", "text/plain", same},
		{"carol", "a copy of shared.txt", "text/plain", same},
		{"carol", "日本語のファイル名 (1).pdf", "application/pdf", []byte("%PDF-1.4\n%âãÏÓ\ntrailer <<>>\n%%EOF\n")},
		{"alice", `semi;colon "quoted" 100%.json`, "application/json", []byte(`{"hello":"world"}`)},
	}
}

// TestImportFromDendrite uploads media through a real Dendrite v0.13.8's
// own media API (no module in front), stops it, and imports its media into
// a Caddy running the module on its embedded defaults with "caddy
// matrix-media import dendrite --from dendrite.yaml": every mxc URI Dendrite
// answered then downloads through Caddy byte-exact with its type and name
// (v1 and legacy v3), the PNG has thumbnails, the Synapse media admin API
// shows Dendrite's uploader and creation time, the twice-uploaded bytes are
// one blob, and a second run changes nothing. On SQLite it also interrupts
// the import after a random number of items (three seeds; SIGINT, which
// cancels the command's context, and SIGKILL) in fresh Caddys and runs it
// again: the result equals the uninterrupted import.
func TestImportFromDendrite(t *testing.T) {
	caddyBinary(t)
	t.Run("sqlite", func(t *testing.T) {
		store := uploadToDendrite(t, testdendrite.Options{ServerName: dendriteServer}, dendriteUploads(t))
		want := importAndVerify(t, store)
		t.Run("interrupted", func(t *testing.T) {
			for _, tc := range []struct {
				seed uint64
				sig  os.Signal
			}{{1, syscall.SIGINT}, {2, syscall.SIGKILL}, {3, syscall.SIGINT}} {
				t.Run(fmt.Sprintf("seed %d %v", tc.seed, tc.sig), func(t *testing.T) {
					// Two workers: at most one more item than `after`
					// is stored, so at least one is left.
					after := 1 + rand.New(rand.NewPCG(tc.seed, tc.seed)).IntN(len(store.items)-2)
					interruptAndResume(t, store, after, tc.sig, want)
				})
			}
		})
	})
	t.Run("postgres", func(t *testing.T) {
		store := uploadToDendrite(t, testdendrite.Options{ServerName: dendriteServer, Database: testpg.DSN(t)}, dendriteUploads(t))
		importAndVerify(t, store)
	})
}

// importAndVerify imports a Dendrite store into a fresh Caddy and checks
// everything TestImportFromDendrite promises; it returns the state right
// after the import.
func importAndVerify(t *testing.T, store dendriteStore) storeState {
	tg := startDefaultsTarget(t, dendriteServer)
	began := time.Now()
	r := tg.importCLI(t, "dendrite", store.configPath)
	if r.err != nil {
		t.Fatalf("import: %v", r)
	}
	t.Logf("imported %d items in %v", len(store.items), time.Since(began).Round(time.Millisecond))
	wantCounts(t, "import", r, map[string]int{"imported": len(store.items)})
	// Caddy runs on this machine as the same user: it reads Dendrite's
	// files itself instead of receiving their bytes.
	if !strings.Contains(r.stdout, fmt.Sprintf("%d items were read by the target from the source's files directly", len(store.items))) {
		t.Errorf("Caddy did not read Dendrite's files itself:\n%v", r)
	}
	if !strings.Contains(r.stderr, fmt.Sprintf("%d/%d items", len(store.items), len(store.items))) {
		t.Errorf("no final progress line with the item counts:\n%v", r)
	}

	imported := tg.state(t, store.ids())
	if imported.Rows != len(store.items) || len(imported.Media) != len(store.items) {
		t.Errorf("%d media rows, %d of the uploaded IDs present; want %d", imported.Rows, len(imported.Media), len(store.items))
	}
	if n := distinctContents(store.items); imported.blobs() != n {
		t.Errorf("%d blobs, want %d: the bytes uploaded twice must be stored once (%+v)", imported.blobs(), n, imported.Datastores)
	}
	for _, it := range store.items {
		row := store.rows[it.id]
		want := storedMedia{State: "ready", UserID: it.user, ContentType: it.ctype, Filename: it.name, Size: int64(len(it.content)),
			SHA256: sha256Hex(it.content), Datastore: "default", CreatedTS: row.createdMS}
		if got := imported.Media[it.id]; got != want {
			t.Errorf("stored %s:\n got  %+v\n want %+v", it.id, got, want)
		}
	}

	t.Run("downloads", func(t *testing.T) {
		for _, it := range store.items {
			checkServed(t, tg.reader, it)
		}
		checkThumbnail(t, tg.reader, store.items[1].id, 300, 200)
	})
	t.Run("synapse media admin API", func(t *testing.T) {
		for _, it := range store.items {
			var info struct {
				MediaInfo struct {
					MediaID     string  `json:"media_id"`
					UserID      *string `json:"user_id"`
					CreatedTS   int64   `json:"created_ts"`
					UploadName  *string `json:"upload_name"`
					MediaType   string  `json:"media_type"`
					MediaLength *int64  `json:"media_length"`
				} `json:"media_info"`
			}
			decodeJSON(t, "media info of "+it.id, tg.ops.must(t, request{method: http.MethodGet, path: synapseAdmin + "media/" + dendriteServer + "/" + it.id}), &info)
			mi, row := info.MediaInfo, store.rows[it.id]
			if mi.MediaID != it.id || mi.UserID == nil || *mi.UserID != row.userID || mi.CreatedTS != row.createdMS ||
				mi.MediaType != it.ctype || mi.MediaLength == nil || *mi.MediaLength != int64(len(it.content)) ||
				(it.name == "") != (mi.UploadName == nil) || mi.UploadName != nil && *mi.UploadName != it.name {
				t.Errorf("media info of %s: %+v; dendrite recorded %+v", it.id, mi, row)
			}
		}
		wantStatus(t, "media info as a plain user", tg.reader.must(t, request{method: http.MethodGet,
			path: synapseAdmin + "media/" + dendriteServer + "/" + store.items[0].id}), http.StatusForbidden, "M_FORBIDDEN")
	})

	t.Run("second run", func(t *testing.T) {
		before := tg.state(t, store.ids())
		r := tg.importCLI(t, "dendrite", store.configPath)
		if r.err != nil {
			t.Fatalf("second import: %v", r)
		}
		wantCounts(t, "second import", r, map[string]int{"imported": 0, "already present": len(store.items)})
		wantSameState(t, "after the second import", tg.state(t, store.ids()), before)
	})
	return imported
}

// interruptAndResume imports store into a fresh Caddy, interrupting the
// command with sig once `after` items are stored, then runs it again: the
// second run imports exactly what is left, and the end state equals want.
func interruptAndResume(t *testing.T, store dendriteStore, after int, sig os.Signal, want storeState) {
	tg := startDefaultsTarget(t, dendriteServer)
	stored, r := interruptedImport(t, tg, "dendrite", store.configPath, after, sig)
	t.Logf("interrupted with %v after %d items (%d stored)", sig, after, stored)
	if stored < after || stored > after+1 {
		t.Fatalf("%d items stored before the interruption, want %d or %d", stored, after, after+1)
	}
	if sig == syscall.SIGINT {
		how, err := checkInterrupted(r, stored)
		if err != nil {
			t.Fatalf("%v\n%v", err, r)
		}
		t.Logf("the command ended: %s", how)
	} else if r.err == nil {
		t.Fatalf("the killed import exited successfully:\n%v", r)
	}
	mid := tg.state(t, store.ids())
	if mid.Rows != stored || len(mid.Media) != stored {
		t.Errorf("after the interruption: %d media rows, %d of the IDs; want the %d stored", mid.Rows, len(mid.Media), stored)
	}

	r = tg.importCLI(t, "dendrite", store.configPath)
	if r.err != nil {
		t.Fatalf("resumed import: %v", r)
	}
	wantCounts(t, "resumed import", r, map[string]int{"imported": len(store.items) - stored, "already present": stored})
	wantSameState(t, "after the resumed import", tg.state(t, store.ids()), want)
	for _, it := range store.items {
		if err := tg.reader.download(it.id, it.content); err != nil {
			t.Error(err)
		}
	}
}

// TestImportDendriteDamagedFiles imports from a real Dendrite whose media
// directory was damaged after the uploads: one file altered (same length),
// one deleted. The dry run and the import report both by mxc URI and fail
// (exit status not 0); neither is stored, the others are; a second run
// reports them again and stores nothing more.
func TestImportDendriteDamagedFiles(t *testing.T) {
	caddyBinary(t)
	store := uploadToDendrite(t, testdendrite.Options{ServerName: dendriteServer}, []upload{
		{"alice", "good.txt", "text/plain", []byte("good bytes\n")},
		{"alice", "altered.bin", "application/octet-stream", randomBytes(40 << 10)},
		{"bob", "deleted.txt", "text/plain", []byte("these bytes will be gone\n")},
		{"bob", "also good.png", "image/png", e2ePNG(t, 20, 10)},
	})
	good, altered, deleted := []mediaItem{store.items[0], store.items[3]}, store.items[1], store.items[2]
	file := func(it mediaItem) string {
		sum := sha256.Sum256(it.content)
		return dendriteFile(store.mediaPath, base64.RawURLEncoding.EncodeToString(sum[:]))
	}
	b, err := os.ReadFile(file(altered))
	if err != nil {
		t.Fatalf("dendrite's file of the upload: %v", err)
	}
	b[len(b)/2] ^= 0x01
	if err := os.WriteFile(file(altered), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(file(deleted)); err != nil {
		t.Fatal(err)
	}

	tg := startDefaultsTarget(t, dendriteServer)
	empty := tg.state(t, store.ids())
	wantProblems := func(what string, r cliResult) {
		t.Helper()
		var exit *exec.ExitError
		if !errors.As(r.err, &exit) || exit.ExitCode() == 0 {
			t.Errorf("%s: exit %v, want a failure", what, r.err)
		}
		for _, s := range []string{
			"mismatch mxc://" + dendriteServer + "/" + altered.id + ":",
			"missing  mxc://" + dendriteServer + "/" + deleted.id + ":",
		} {
			if !strings.Contains(r.stdout, s) {
				t.Errorf("%s: the report does not name %q\n%v", what, s, r)
			}
		}
		if !strings.Contains(r.stderr, "1 hash mismatches") {
			t.Errorf("%s: the error does not count the mismatch\n%v", what, r)
		}
	}

	r := tg.importCLI(t, "dendrite", store.configPath, "--dry-run")
	wantProblems("dry run", r)
	wantCounts(t, "dry run", r, map[string]int{"would import": 2, "hash mismatches": 1, "missing at the source": 1})
	wantSameState(t, "after the dry run", tg.state(t, store.ids()), empty)

	r = tg.importCLI(t, "dendrite", store.configPath)
	wantProblems("import", r)
	wantCounts(t, "import", r, map[string]int{"imported": 2, "hash mismatches": 1, "missing at the source": 1})
	for _, it := range good {
		checkServed(t, tg.reader, it)
	}
	for _, it := range []mediaItem{altered, deleted} {
		wantStatus(t, "download of "+it.name, tg.reader.must(t, request{method: http.MethodGet, path: tg.reader.downloadPath(it.id)}),
			http.StatusNotFound, "M_NOT_FOUND")
	}
	after := tg.state(t, store.ids())
	if after.Rows != 2 || len(after.Media) != 2 || after.blobs() != 2 {
		t.Errorf("after the import: %d rows, %d of the IDs, %d blobs; want the 2 good items only", after.Rows, len(after.Media), after.blobs())
	}

	r = tg.importCLI(t, "dendrite", store.configPath)
	wantProblems("second import", r)
	wantCounts(t, "second import", r, map[string]int{"imported": 0, "already present": 2, "hash mismatches": 1, "missing at the source": 1})
	wantSameState(t, "after the second import", tg.state(t, store.ids()), after)
}

// TestExportImportRoundTrip exports media from one Caddy with the CLI (a
// user's and the whole server's, including a quarantined and a protected
// item) and imports both archives into a fresh Caddy with separate stores:
// every item downloads from it byte-exact under the same ID, type and
// name, with the same uploader, creation time and protection; the
// quarantined item stays refused (its bytes too); importing again is a
// no-op.
func TestExportImportRoundTrip(t *testing.T) {
	tokens := map[string]string{"tok-alice": "@alice:a.test", "tok-bob": "@bob:a.test", "tok-carol": "@carol:a.test"}
	for tok, user := range importTokens("a.test") {
		tokens[tok] = user
	}
	hs := newHomeserver(t, tokens)
	sites := []site{{serverName: "a.test", extra: []string{"admins @ops:a.test"}}}
	cfgA := newConfig(t, hs, sites...)
	instA := startCaddy(t, cfgA)
	a := newImportTarget(instA, "a.test", filepath.Join(cfgA.dataDir, "media.db"))

	clients := map[string]*siteClient{}
	for tok, user := range tokens {
		clients[user] = newSiteClient(instA, "a.test", tok, true)
	}
	text := []byte("the same text, by alice and by bob\n")
	uploads := []upload{
		{"alice", "holiday.png", "image/png", e2ePNG(t, 120, 80)},
		{"alice", "Ünïcödé ✓ notes.txt", "text/plain; charset=utf-8", []byte("notes ✓\n")},
		{"alice", "", "application/octet-stream", randomBytes(200 << 10)},
		{"alice", "shared.txt", "text/plain", text},
		{"alice", "to be quarantined.txt", "text/plain", []byte("bad bytes\n")},
		{"bob", "copy of shared.txt", "text/plain", text},
		{"bob", "sticker.png", "image/png", e2ePNG(t, 32, 32)},
		{"carol", "../../etc/passwd", "application/octet-stream", []byte("not a passwd file\n")},
	}
	var items []mediaItem
	for _, u := range uploads {
		user := "@" + u.user + ":a.test"
		id, err := clients[user].upload(u.content, u.ctype, u.name)
		if err != nil {
			t.Fatal(err)
		}
		items = append(items, mediaItem{id: id, user: user, name: u.name, ctype: u.ctype, content: u.content})
	}
	quarantined, protected := items[4], items[6]
	adminURL := "http://" + a.admin
	adminPost(t, adminURL+"/matrix_media/quarantine", `{"media":["mxc://a.test/`+quarantined.id+`"]}`)
	adminPost(t, adminURL+"/matrix_media/protect", `{"media":["mxc://a.test/`+protected.id+`"]}`)
	ids := make([]string, len(items))
	for i, it := range items {
		ids[i] = it.id
	}
	stA := a.state(t, ids)
	if !stA.Media[protected.id].Protected || stA.Media[quarantined.id].QuarantinedBy == "" {
		t.Fatalf("on A: protected %+v, quarantined %+v", stA.Media[protected.id], stA.Media[quarantined.id])
	}

	dir := t.TempDir()
	export := func(kind, who, file string) string {
		t.Helper()
		out := filepath.Join(dir, file)
		if r := runCLI(t, "matrix-media", "export", kind, who, "--out", out, "--address", a.admin); r.err != nil {
			t.Fatalf("export %s %s: %v", kind, who, r)
		}
		return out
	}
	aliceZip := export("user", "@alice:a.test", "alice.zip")
	serverZip := export("server", "a.test", "a.test.zip")

	cfgB := newConfig(t, hs, sites...)
	instB := startCaddy(t, cfgB)
	b := newImportTarget(instB, "a.test", filepath.Join(cfgB.dataDir, "media.db"))

	// Alice's archive first: 4 items with content, the quarantined one
	// without. Then the server's: alice's are already there.
	r := b.importCLI(t, "archive", aliceZip)
	if r.err != nil {
		t.Fatalf("import of alice's archive: %v", r)
	}
	wantCounts(t, "import of alice's archive", r, map[string]int{"imported": 4, "missing at the source": 1})
	r = b.importCLI(t, "archive", serverZip)
	if r.err != nil {
		t.Fatalf("import of the server's archive: %v", r)
	}
	wantCounts(t, "import of the server's archive", r, map[string]int{"imported": 3, "already present": 4, "missing at the source": 1})
	if !strings.Contains(r.stdout, "missing  mxc://a.test/"+quarantined.id+":") || !strings.Contains(r.stdout, "quarantine was recorded") {
		t.Errorf("the report does not name the quarantined item and its recorded quarantine:\n%v", r)
	}

	stB := b.state(t, ids)
	reader := b.reader
	for _, it := range items {
		if it.id == quarantined.id {
			continue
		}
		checkServed(t, reader, it)
		if got, want := stB.Media[it.id], stA.Media[it.id]; got != want {
			t.Errorf("%s on B:\n got  %+v\n want %+v (as on A)", it.id, got, want)
		}
	}
	if _, ok := stB.Media[quarantined.id]; ok || stB.Rows != len(items)-1 {
		t.Errorf("B holds %d rows (quarantined item present: %v), want %d", stB.Rows, ok, len(items)-1)
	}
	if n := distinctContents(items) - 1; stB.blobs() != n {
		t.Errorf("B holds %d blobs, want %d (shared text once, no quarantined bytes)", stB.blobs(), n)
	}
	for _, req := range []request{
		{method: http.MethodGet, path: reader.downloadPath(quarantined.id)},
		{method: http.MethodGet, path: "/_matrix/media/v3/download/a.test/" + quarantined.id, noAuth: true},
	} {
		wantStatus(t, "quarantined item on B "+req.path, reader.must(t, req), http.StatusNotFound, "M_NOT_FOUND")
	}

	r = b.importCLI(t, "archive", serverZip)
	if r.err != nil {
		t.Fatalf("second import of the server's archive: %v", r)
	}
	wantCounts(t, "second import of the server's archive", r, map[string]int{"imported": 0, "already present": 7, "missing at the source": 1})
	wantSameState(t, "after the second import", b.state(t, ids), stB)

	// The quarantine came along by content: its bytes cannot be uploaded
	// to B again.
	resp := reader.must(t, request{method: http.MethodPost, path: "/_matrix/media/v3/upload", body: quarantined.content, contentType: "text/plain"})
	wantStatus(t, "upload of the quarantined bytes to B", resp, http.StatusForbidden, "M_FORBIDDEN")
	var usage struct {
		Users []adminUserUsageView `json:"users"`
	}
	if status := adminGet(t, b.admin, "/matrix_media/usage?server_name=a.test&order_by=user_id", &usage); status != http.StatusOK {
		t.Fatalf("usage on B: %d", status)
	}
	wantUsage := []adminUserUsageView{
		{"@alice:a.test", 4, int64(len(items[0].content) + len(items[1].content) + len(items[2].content) + len(text))},
		{"@bob:a.test", 2, int64(len(text) + len(protected.content))},
		{"@carol:a.test", 1, int64(len(items[7].content))},
	}
	if fmt.Sprint(usage.Users) != fmt.Sprint(wantUsage) {
		t.Errorf("per-user usage on B: %+v, want %+v", usage.Users, wantUsage)
	}
}

// adminUserUsageView is one user of GET /matrix_media/usage.
type adminUserUsageView struct {
	UserID      string `json:"user_id"`
	MediaCount  int64  `json:"media_count"`
	MediaLength int64  `json:"media_length"`
}
