package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/mediaarchive"
)

// uploaded is one media item a test uploaded.
type uploaded struct {
	id, name, ctype string
	content         []byte
}

// checkArchive opens an export and checks that it holds exactly want (by
// media ID: name, type, uploader, bytes), with quarantined ones listed
// without content.
func checkArchive(t *testing.T, what string, archive []byte, serverName, user string, want []uploaded, quarantined map[string]bool) {
	t.Helper()
	src, err := mediaarchive.NewSource(bytes.NewReader(archive), int64(len(archive)), what)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	byID := map[string]uploaded{}
	for _, u := range want {
		byID[u.id] = u
	}
	seen := 0
	err = src.Walk(context.Background(), importer.Filter{}, func(it importer.Item) error {
		u, ok := byID[it.MediaID]
		if !ok || it.ServerName != serverName || it.Filename != u.name || it.ContentType != u.ctype || (user != "" && it.UserID != user) {
			t.Errorf("%s: unexpected item %+v", what, it)
			return nil
		}
		seen++
		rc, err := it.Open(context.Background())
		if quarantined[it.MediaID] {
			if err == nil || it.QuarantinedBy == "" {
				t.Errorf("%s: quarantined %s has content in the archive (or no quarantiner: %q)", what, it.MediaID, it.QuarantinedBy)
			}
			return nil
		}
		if err != nil {
			return err
		}
		defer rc.Close()
		b, err := io.ReadAll(rc)
		if err != nil || !bytes.Equal(b, u.content) {
			t.Errorf("%s: %s holds %d bytes (%v), want the %d uploaded", what, it.MediaID, len(b), err, len(u.content))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if seen != len(want) {
		t.Errorf("%s: %d items, want %d", what, seen, len(want))
	}
}

// TestExport uploads media through a real Caddy and exports them through
// Caddy's admin API, through the sites' export endpoints (media admins;
// users for themselves only where allow_user_export is on; everyone else
// 403 M_FORBIDDEN), and with the CLI into a file, checking every archive's
// content.
func TestExport(t *testing.T) {
	hs := newHomeserver(t, map[string]string{
		"tok-alice": "@alice:a.test", "tok-bob": "@bob:a.test", "tok-ops": "@ops:a.test",
		"tok-carol": "@carol:b.test", "tok-dave": "@dave:b.test",
	})
	cfg := newConfig(t, hs,
		site{serverName: "a.test", extra: []string{"admins @ops:a.test"}},
		site{serverName: "b.test", extra: []string{"allow_user_export"}})
	inst := startCaddy(t, cfg)
	alice := newSiteClient(inst, "a.test", "tok-alice", true)
	bob := newSiteClient(inst, "a.test", "tok-bob", true)
	ops := newSiteClient(inst, "a.test", "tok-ops", true)
	carol := newSiteClient(inst, "b.test", "tok-carol", true)
	dave := newSiteClient(inst, "b.test", "tok-dave", true)

	upload := func(c *siteClient, content []byte, ctype, name string) uploaded {
		t.Helper()
		id, err := c.upload(content, ctype, name)
		if err != nil {
			t.Fatal(err)
		}
		return uploaded{id: id, name: name, ctype: ctype, content: content}
	}
	aliceMedia := []uploaded{
		upload(alice, e2ePNG(t, 300, 200), "image/png", "holiday.png"),
		upload(alice, []byte("notes of alice\n"), "text/plain", "Ünïcödé notes ✓.txt"),
		upload(alice, randomBytes(300<<10), "application/octet-stream", "../../etc/passwd"),
		upload(alice, []byte("to be quarantined"), "text/plain", "bad.txt"),
	}
	bobMedia := []uploaded{upload(bob, []byte("bob's\n"), "text/plain", "bob.txt")}
	carolMedia := []uploaded{upload(carol, []byte("carol's\n"), "text/plain", "carol.txt")}
	upload(dave, []byte("dave's\n"), "text/plain", "dave.txt")

	adminURL := fmt.Sprintf("http://127.0.0.1:%d", cfg.adminPort)
	adminPost(t, adminURL+"/matrix_media/quarantine", `{"media":["mxc://a.test/`+aliceMedia[3].id+`"]}`)
	quarantined := map[string]bool{aliceMedia[3].id: true}

	t.Run("admin API", func(t *testing.T) {
		resp, err := http.Get(adminURL + "/matrix_media/export?user=" + url.QueryEscape("@alice:a.test"))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/zip" ||
			resp.Header.Get("Content-Disposition") != `attachment; filename="media-alice-a.test.zip"` {
			t.Fatalf("GET /matrix_media/export: %d %v %v", resp.StatusCode, resp.Header, err)
		}
		checkArchive(t, "admin API, user", body, "a.test", "@alice:a.test", aliceMedia, quarantined)

		resp, err = http.Get(adminURL + "/matrix_media/export?server=a.test")
		if err != nil {
			t.Fatal(err)
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		checkArchive(t, "admin API, server", body, "a.test", "", append(append([]uploaded{}, aliceMedia...), bobMedia...), quarantined)

		resp, err = http.Get(adminURL + "/matrix_media/export?user=nobody")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("bad user: %d", resp.StatusCode)
		}
	})

	t.Run("sites", func(t *testing.T) {
		get := func(c *siteClient, path string) response {
			return c.must(t, request{method: http.MethodGet, path: "/_matrix_media/v1/export/" + path})
		}
		resp := get(ops, "user/"+url.PathEscape("@alice:a.test"))
		if resp.status != 200 || resp.header.Get("Content-Type") != "application/zip" {
			t.Fatalf("admin export of alice: %v", resp)
		}
		checkArchive(t, "site, admin, user", resp.body, "a.test", "@alice:a.test", aliceMedia, quarantined)
		resp = get(ops, "server/a.test")
		checkArchive(t, "site, admin, server", resp.body, "a.test", "", append(append([]uploaded{}, aliceMedia...), bobMedia...), quarantined)

		wantStatus(t, "alice herself without allow_user_export", get(alice, "user/"+url.PathEscape("@alice:a.test")), 403, "M_FORBIDDEN")
		wantStatus(t, "bob exporting alice", get(bob, "user/"+url.PathEscape("@alice:a.test")), 403, "M_FORBIDDEN")
		wantStatus(t, "alice exporting the server", get(alice, "server/a.test"), 403, "M_FORBIDDEN")
		wantStatus(t, "no token", alice.must(t, request{method: http.MethodGet, path: "/_matrix_media/v1/export/server/a.test", noAuth: true}), 401, "M_MISSING_TOKEN")

		resp = get(carol, "user/"+url.PathEscape("@carol:b.test"))
		if resp.status != 200 {
			t.Fatalf("carol exporting herself with allow_user_export: %v", resp)
		}
		checkArchive(t, "site, own media", resp.body, "b.test", "@carol:b.test", carolMedia, nil)
		wantStatus(t, "dave exporting carol", get(dave, "user/"+url.PathEscape("@carol:b.test")), 403, "M_FORBIDDEN")
		wantStatus(t, "carol exporting b.test", get(carol, "server/b.test"), 403, "M_FORBIDDEN")
	})

	t.Run("CLI", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "alice.zip")
		run := func() ([]byte, error) {
			return exec.Command(caddyBinary(t), "matrix-media", "export", "user", "@alice:a.test", "--out", out,
				"--address", fmt.Sprintf("127.0.0.1:%d", cfg.adminPort)).CombinedOutput()
		}
		msg, err := run()
		if err != nil || !strings.Contains(string(msg), "4 media items, 3 files") {
			t.Fatalf("caddy matrix-media export: %v\n%s", err, msg)
		}
		body, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		checkArchive(t, "CLI", body, "a.test", "@alice:a.test", aliceMedia, quarantined)
		if _, err := os.Stat(out + ".partial"); !os.IsNotExist(err) {
			t.Errorf("partial file left behind: %v", err)
		}
		msg, err = run()
		if err == nil || !strings.Contains(string(msg), "already exists") {
			t.Errorf("a second export to the same file: %v\n%s", err, msg)
		}
		if again, _ := os.ReadFile(out); !bytes.Equal(again, body) {
			t.Error("the second export changed the existing file")
		}
	})
}

// adminPost posts a JSON body to Caddy's admin API and fails the test
// unless it answers 200.
func adminPost(t *testing.T, url, body string) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("POST %s: %d %s", url, resp.StatusCode, b)
	}
}
