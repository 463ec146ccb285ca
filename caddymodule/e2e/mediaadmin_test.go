package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testdendrite"
)

// synapseAdmin is the prefix of Synapse's admin API.
const synapseAdmin = "/_synapse/admin/v1/"

// countBlobFiles counts the files under a file datastore's root.
func countBlobFiles(t *testing.T, root string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(root, func(_ string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() && !strings.HasPrefix(d.Name(), ".") {
			n++
		}
		return nil
	})
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return n
}

// decodeJSON decodes a 200 JSON body into v.
func decodeJSON(t *testing.T, what string, resp response, v any) {
	t.Helper()
	if resp.status != http.StatusOK {
		t.Fatalf("%s: %v, want 200", what, resp)
	}
	if err := json.Unmarshal(resp.body, v); err != nil {
		t.Fatalf("%s: decoding %v: %v", what, resp, err)
	}
}

// TestDendriteMediaAdmin drives Synapse's media admin API through a real
// Caddy with a real Dendrite behind it, with the exact paths and JSON that
// synadm and admin consoles send: permissions, quarantine by content,
// protection, media info, user media lists, statistics, deletion with
// shared blobs, deletion by age with keep_profiles (Dendrite's profile API),
// the remote cache purge, room quarantine (Dendrite has no room media API:
// a clear error), and the same operations through Caddy's admin API CLI.
func TestDendriteMediaAdmin(t *testing.T) {
	caddyBinary(t)
	d := testdendrite.Start(t, testdendrite.Options{ServerName: "localhost"})
	d.CreateUser(t, "alice", "alice-password-1", false)
	d.CreateUser(t, "ops", "ops-password-1", false)
	d.CreateUser(t, "root", "root-password-1", true)

	cfg := newConfig(t, dendriteHomeserver(d), site{serverName: d.ServerName(), extra: []string{
		"admins @ops:localhost",
		"detect_homeserver_admins",
	}})
	inst := startCaddy(t, cfg)
	anon := newSiteClient(inst, d.ServerName(), "", true)
	alice := withToken(anon, dendriteLogin(t, anon, "alice", "alice-password-1"))
	ops := withToken(anon, dendriteLogin(t, anon, "ops", "ops-password-1"))
	root := withToken(anon, dendriteLogin(t, anon, "root", "root-password-1"))

	shared := e2ePNG(t, 64, 48)
	a1, err := alice.upload(shared, "image/png", "a1.png")
	if err != nil {
		t.Fatal(err)
	}
	a2, err := alice.upload(shared, "image/png", "a2.png")
	if err != nil {
		t.Fatal(err)
	}
	other := randomBytes(3000)
	b1, err := alice.upload(other, "application/octet-stream", "")
	if err != nil {
		t.Fatal(err)
	}
	post := func(c *siteClient, path string) response {
		return c.must(t, request{method: http.MethodPost, path: path, body: []byte("{}"), contentType: "application/json"})
	}
	get := func(c *siteClient, path string) response {
		return c.must(t, request{method: http.MethodGet, path: path})
	}
	thumb := func(id string) string {
		return "/_matrix/client/v1/media/thumbnail/localhost/" + id + "?width=32&height=32&method=scale"
	}

	t.Run("permissions", func(t *testing.T) {
		path := synapseAdmin + "media/quarantine/localhost/" + a1
		wantStatus(t, "no token", anon.must(t, request{method: http.MethodPost, path: path, body: []byte("{}"), noAuth: true}),
			http.StatusUnauthorized, "M_MISSING_TOKEN")
		wantStatus(t, "unknown token", post(withToken(anon, "never-issued"), path), http.StatusUnauthorized, "M_UNKNOWN_TOKEN")
		resp := post(alice, path)
		wantStatus(t, "plain user", resp, http.StatusForbidden, "M_FORBIDDEN")
		// Dendrite has no Synapse admin API: its own admins are not
		// detected, so only the configured admins get in.
		wantStatus(t, "dendrite admin (not detectable)", post(root, path), http.StatusForbidden, "M_FORBIDDEN")
		if err := alice.download(a1, shared); err != nil {
			t.Errorf("refused requests changed nothing, yet: %v", err)
		}
		// The rest of /_synapse/admin/ is the homeserver's: the module
		// does not answer it (Dendrite's own 404 comes back through the
		// reverse proxy, never the module's 403).
		resp = get(alice, synapseAdmin+"server_version")
		if resp.status == http.StatusForbidden || strings.Contains(string(resp.body), "You are not a server admin") {
			t.Errorf("GET server_version was answered by the module: %v", resp)
		}
	})

	t.Run("quarantine by content", func(t *testing.T) {
		wantEmptyObject(t, "quarantine a1", post(ops, synapseAdmin+"media/quarantine/localhost/"+a1))
		for _, id := range []string{a1, a2} {
			wantStatus(t, "download "+id, get(alice, alice.downloadPath(id)), http.StatusNotFound, "M_NOT_FOUND")
			wantStatus(t, "thumbnail "+id, get(alice, thumb(id)), http.StatusNotFound, "M_NOT_FOUND")
		}
		if err := alice.download(b1, other); err != nil {
			t.Errorf("other content must stay served: %v", err)
		}
		resp := alice.must(t, request{method: http.MethodPost, path: "/_matrix/media/v3/upload", body: shared, contentType: "image/png"})
		wantStatus(t, "re-upload of quarantined bytes", resp, http.StatusForbidden, "M_FORBIDDEN")

		var info struct {
			MediaInfo map[string]any `json:"media_info"`
		}
		decodeJSON(t, "media info", get(ops, synapseAdmin+"media/localhost/"+a2), &info)
		if info.MediaInfo["quarantined_by"] != "@ops:localhost" || info.MediaInfo["media_id"] != a2 ||
			info.MediaInfo["upload_name"] != "a2.png" || info.MediaInfo["media_length"] != float64(len(shared)) {
			t.Errorf("media info of a2: %v", info.MediaInfo)
		}

		wantEmptyObject(t, "unquarantine a2", post(ops, synapseAdmin+"media/unquarantine/localhost/"+a2))
		for _, id := range []string{a1, a2} {
			if err := alice.download(id, shared); err != nil {
				t.Errorf("after unquarantine: %v", err)
			}
			wantStatus(t, "thumbnail after unquarantine "+id, get(alice, thumb(id)), http.StatusOK, "")
		}
	})

	t.Run("protect and user quarantine", func(t *testing.T) {
		wantEmptyObject(t, "protect a2", post(ops, synapseAdmin+"media/protect/"+a2))
		var n struct {
			N *int `json:"num_quarantined"`
		}
		decodeJSON(t, "quarantine alice's media", post(ops, synapseAdmin+"user/@alice:localhost/media/quarantine"), &n)
		if n.N == nil || *n.N != 2 {
			t.Errorf("num_quarantined %v, want 2 (a1 and b1; a2 is protected)", n.N)
		}
		if err := alice.download(a2, shared); err != nil {
			t.Errorf("protected a2 must stay served: %v", err)
		}
		wantStatus(t, "a1", get(alice, alice.downloadPath(a1)), http.StatusNotFound, "M_NOT_FOUND")
		wantStatus(t, "b1", get(alice, alice.downloadPath(b1)), http.StatusNotFound, "M_NOT_FOUND")
		wantEmptyObject(t, "unprotect a2", post(ops, synapseAdmin+"media/unprotect/"+a2))
		wantStatus(t, "a2 unprotected, content quarantined", get(alice, alice.downloadPath(a2)), http.StatusNotFound, "M_NOT_FOUND")
		// Lift it again through Caddy's admin API, with the CLI.
		out, err := exec.Command(caddyBinary(t), "matrix-media", "quarantine", "--undo",
			"--address", fmt.Sprintf("127.0.0.1:%d", cfg.adminPort),
			"mxc://localhost/"+a1, "mxc://localhost/"+b1).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "2 media items no longer quarantined") {
			t.Fatalf("caddy matrix-media quarantine --undo: %v\n%s", err, out)
		}
		for id, want := range map[string][]byte{a1: shared, a2: shared, b1: other} {
			if err := alice.download(id, want); err != nil {
				t.Errorf("after the CLI lifted the quarantine: %v", err)
			}
		}
	})

	t.Run("room quarantine without the homeserver API", func(t *testing.T) {
		resp := post(ops, synapseAdmin+"room/"+url.PathEscape("!nowhere:localhost")+"/media/quarantine")
		wantStatus(t, "room quarantine on Dendrite", resp, http.StatusNotImplemented, "M_UNRECOGNIZED")
		if !strings.Contains(string(resp.body), "room") {
			t.Errorf("the error does not say what is missing: %v", resp)
		}
	})

	t.Run("user media list and statistics", func(t *testing.T) {
		var page struct {
			Media []struct {
				MediaID     string `json:"media_id"`
				MediaLength int64  `json:"media_length"`
			} `json:"media"`
			NextToken *int `json:"next_token"`
			Total     int  `json:"total"`
		}
		// synadm: user media --limit 2 --order-by media_length --reverse
		decodeJSON(t, "list", get(ops, synapseAdmin+"users/@alice:localhost/media?from=0&limit=2&order_by=media_length&dir=b"), &page)
		if page.Total != 3 || len(page.Media) != 2 || page.NextToken == nil || *page.NextToken != 2 ||
			page.Media[0].MediaID != b1 || page.Media[0].MediaLength != int64(len(other)) {
			t.Errorf("first page: %+v", page)
		}
		page.NextToken = nil // absent, not null, on the last page
		decodeJSON(t, "list page 2", get(ops, synapseAdmin+"users/@alice:localhost/media?from=2&limit=2&order_by=media_length&dir=b"), &page)
		if page.Total != 3 || len(page.Media) != 1 || page.NextToken != nil {
			t.Errorf("second page: %+v", page)
		}
		wantStatus(t, "remote user", get(ops, synapseAdmin+"users/@bob:elsewhere.example/media"), http.StatusBadRequest, "")
		var stats struct {
			Users []struct {
				UserID      string `json:"user_id"`
				MediaCount  int    `json:"media_count"`
				MediaLength int64  `json:"media_length"`
			} `json:"users"`
			Total int `json:"total"`
		}
		decodeJSON(t, "statistics", get(ops, synapseAdmin+"statistics/users/media?order_by=media_length&dir=b"), &stats)
		want := int64(2*len(shared) + len(other))
		if stats.Total != 1 || len(stats.Users) != 1 || stats.Users[0].UserID != "@alice:localhost" ||
			stats.Users[0].MediaCount != 3 || stats.Users[0].MediaLength != want {
			t.Errorf("statistics: %+v, want alice with 3 media, %d bytes", stats, want)
		}
		out, err := exec.Command(caddyBinary(t), "matrix-media", "usage", "--server-name", "localhost",
			"--address", fmt.Sprintf("127.0.0.1:%d", cfg.adminPort)).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "@alice:localhost") || !strings.Contains(string(out), "(1 of 1 users)") {
			t.Errorf("caddy matrix-media usage: %v\n%s", err, out)
		}
	})

	t.Run("delete shared content", func(t *testing.T) {
		dir := cfg.storagePath
		before := countBlobFiles(t, dir)
		var del struct {
			Deleted []string `json:"deleted_media"`
			Total   int      `json:"total"`
		}
		decodeJSON(t, "delete a1", ops.must(t, request{method: http.MethodDelete, path: synapseAdmin + "media/localhost/" + a1,
			body: []byte("{}"), contentType: "application/json"}), &del)
		if del.Total != 1 || len(del.Deleted) != 1 || del.Deleted[0] != a1 {
			t.Errorf("delete a1: %+v", del)
		}
		wantStatus(t, "a1 after delete", get(alice, alice.downloadPath(a1)), http.StatusNotFound, "M_NOT_FOUND")
		if err := alice.download(a2, shared); err != nil {
			t.Errorf("a2 shares a1's blob and must stay: %v", err)
		}
		wantStatus(t, "delete of remote media", ops.must(t, request{method: http.MethodDelete,
			path: synapseAdmin + "media/elsewhere.example/abc"}), http.StatusBadRequest, "")
		decodeJSON(t, "delete a2", ops.must(t, request{method: http.MethodDelete, path: synapseAdmin + "media/localhost/" + a2}), &del)
		if del.Total != 1 {
			t.Errorf("delete a2: %+v", del)
		}
		// The blob and the thumbnails were claimed moments ago (the
		// deletion's grace keeps them for the collector); collect now.
		out, err := exec.Command(caddyBinary(t), "matrix-media", "gc", "--grace", "0s",
			"--address", fmt.Sprintf("127.0.0.1:%d", cfg.adminPort)).CombinedOutput()
		if err != nil {
			t.Fatalf("gc: %v\n%s", err, out)
		}
		if after := countBlobFiles(t, dir); after >= before {
			t.Errorf("blob files %d -> %d: the shared blob and its thumbnails were not removed", before, after)
		}
	})

	t.Run("delete by age keeps profile avatars", func(t *testing.T) {
		avatar, err := alice.upload(randomBytes(500), "image/png", "avatar.png")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := json.Marshal(map[string]string{"avatar_url": "mxc://localhost/" + avatar})
		resp := alice.must(t, request{method: http.MethodPut, path: "/_matrix/client/v3/profile/" + url.PathEscape("@alice:localhost") + "/avatar_url",
			body: body, contentType: "application/json"})
		wantStatus(t, "set avatar on dendrite", resp, http.StatusOK, "")
		now := strconv.FormatInt(time.Now().Add(time.Second).UnixMilli(), 10)
		time.Sleep(1100 * time.Millisecond) // before_ts is in ms: be strictly after every upload
		var del struct {
			Deleted []string `json:"deleted_media"`
			Total   int      `json:"total"`
		}
		// synadm: media delete --before-days ... (keep_profiles defaults to true)
		decodeJSON(t, "delete old", post(ops, synapseAdmin+"media/delete?before_ts="+now), &del)
		if del.Total != 1 || len(del.Deleted) != 1 || del.Deleted[0] != b1 {
			t.Errorf("delete by age: %+v, want only %s (the avatar %s is kept)", del, b1, avatar)
		}
		wantStatus(t, "avatar kept", get(alice, alice.downloadPath(avatar)), http.StatusOK, "")
		wantStatus(t, "b1 deleted", get(alice, alice.downloadPath(b1)), http.StatusNotFound, "M_NOT_FOUND")
	})

	t.Run("purge remote cache", func(t *testing.T) {
		var out struct {
			Deleted *int `json:"deleted"`
		}
		decodeJSON(t, "purge", post(ops, synapseAdmin+"purge_media_cache?before_ts="+strconv.FormatInt(time.Now().UnixMilli(), 10)), &out)
		if out.Deleted == nil || *out.Deleted != 0 {
			t.Errorf("purge with no remote media: %v", out.Deleted)
		}
		wantStatus(t, "purge without before_ts", post(ops, synapseAdmin+"purge_media_cache"), http.StatusBadRequest, "M_MISSING_PARAM")
		jobs, err := exec.Command(caddyBinary(t), "matrix-media", "jobs",
			"--address", fmt.Sprintf("127.0.0.1:%d", cfg.adminPort)).CombinedOutput()
		if err != nil || !strings.Contains(string(jobs), "purge_remote") || !strings.Contains(string(jobs), "done") {
			t.Errorf("caddy matrix-media jobs: %v\n%s", err, jobs)
		}
	})

	if logs := inst.logs.String(); !strings.Contains(logs, `"actor":"@ops:localhost"`) {
		t.Errorf("takedowns and deletions are not logged with who asked for them")
	}
}
