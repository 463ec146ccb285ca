package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testdendrite"
)

// dendriteHomeserver lets the harness's config point matrix_media and
// reverse_proxy at a real Dendrite: the harness reads only the URL of its
// homeserver's server, so an unstarted httptest.Server carrying Dendrite's
// URL stands in (nothing serves or closes it).
func dendriteHomeserver(d *testdendrite.Dendrite) *homeserver {
	return &homeserver{srv: &httptest.Server{URL: d.URL()}}
}

// withToken returns a copy of c that authenticates with token.
func withToken(c *siteClient, token string) *siteClient {
	cp := *c
	cp.token = token
	return &cp
}

// dendriteLogin logs localpart in through Caddy (reverse_proxy to Dendrite)
// and returns the new access token.
func dendriteLogin(t *testing.T, c *siteClient, localpart, password string) string {
	t.Helper()
	body, err := json.Marshal(map[string]any{
		"type":       "m.login.password",
		"identifier": map[string]string{"type": "m.id.user", "user": localpart},
		"password":   password,
	})
	if err != nil {
		t.Fatal(err)
	}
	resp := c.must(t, request{method: http.MethodPost, path: "/_matrix/client/v3/login",
		body: body, contentType: "application/json", noAuth: true})
	var r struct {
		AccessToken string `json:"access_token"`
		UserID      string `json:"user_id"`
	}
	if err := json.Unmarshal(resp.body, &r); err != nil || resp.status != http.StatusOK || r.AccessToken == "" {
		t.Fatalf("login of %s through caddy: %v (decoding: %v)", localpart, resp, err)
	}
	if want := "@" + localpart + ":" + c.serverName; r.UserID != want {
		t.Fatalf("login of %s: user_id %q, want %q", localpart, r.UserID, want)
	}
	return r.AccessToken
}

// wantEmptyObject checks a 200 response whose body is the JSON object {}.
func wantEmptyObject(t *testing.T, what string, resp response) {
	t.Helper()
	var obj map[string]any
	if resp.status != http.StatusOK || json.Unmarshal(resp.body, &obj) != nil || obj == nil || len(obj) != 0 {
		t.Errorf("%s: got %v, want 200 {}", what, resp)
	}
}

// wantStatus checks a response's status and, when errcode is not empty, its
// Matrix errcode.
func wantStatus(t *testing.T, what string, resp response, status int, errcode string) {
	t.Helper()
	if resp.status != status || (errcode != "" && resp.errcode() != errcode) {
		t.Errorf("%s: got %v, want %d %s", what, resp, status, errcode)
	}
}

// TestDendriteLoginUploadDownloadLogout runs the module in front of a real
// homeserver, Dendrite: logins and logouts go through Caddy's reverse_proxy,
// the module checks tokens with Dendrite's whoami, and a logout through Caddy
// must revoke the token in the module at once, not when its cache expires.
func TestDendriteLoginUploadDownloadLogout(t *testing.T) {
	caddyBinary(t) // build (or skip under -short) before starting Dendrite
	const (
		alicePassword = "alice-password-1"
		bobPassword   = "bob-password-1"
	)
	d := testdendrite.Start(t, testdendrite.Options{ServerName: "localhost"})
	d.CreateUser(t, "alice", alicePassword, false)
	d.CreateUser(t, "bob", bobPassword, false)

	cfg := newConfig(t, dendriteHomeserver(d), site{serverName: d.ServerName()})
	inst := startCaddy(t, cfg)
	anon := newSiteClient(inst, d.ServerName(), "", true)
	whoami := request{method: http.MethodGet, path: "/_matrix/client/v3/account/whoami"}

	t.Run("logout", func(t *testing.T) {
		alice := withToken(anon, dendriteLogin(t, anon, "alice", alicePassword))

		resp := alice.must(t, whoami)
		wantStatus(t, "whoami through caddy", resp, http.StatusOK, "")
		if !bytes.Contains(resp.body, []byte(`"@alice:localhost"`)) {
			t.Errorf("whoami through caddy: %v, want @alice:localhost", resp)
		}

		content := randomBytes(64 << 10)
		id, err := alice.upload(content, "application/octet-stream", "")
		if err != nil {
			t.Fatal(err)
		}
		if err := alice.download(id, content); err != nil {
			t.Fatal(err)
		}
		wantStatus(t, "download without token",
			alice.must(t, request{method: http.MethodGet, path: alice.downloadPath(id), noAuth: true}),
			http.StatusUnauthorized, "M_MISSING_TOKEN")
		wantStatus(t, "download with a token Dendrite never issued",
			withToken(alice, "not-a-dendrite-token").must(t, request{method: http.MethodGet, path: alice.downloadPath(id)}),
			http.StatusUnauthorized, "M_UNKNOWN_TOKEN")

		wantEmptyObject(t, "logout through caddy", alice.must(t, request{method: http.MethodPost,
			path: "/_matrix/client/v3/logout", body: []byte("{}"), contentType: "application/json"}))

		// At once: the module must not answer from its token cache.
		wantStatus(t, "download right after logout",
			alice.must(t, request{method: http.MethodGet, path: alice.downloadPath(id)}),
			http.StatusUnauthorized, "M_UNKNOWN_TOKEN")
		wantStatus(t, "upload right after logout",
			alice.must(t, request{method: http.MethodPost, path: "/_matrix/media/v3/upload",
				body: []byte("late"), contentType: "text/plain"}),
			http.StatusUnauthorized, "M_UNKNOWN_TOKEN")
		// Dendrite itself revoked the token.
		wantStatus(t, "whoami through caddy after logout", alice.must(t, whoami),
			http.StatusUnauthorized, "M_UNKNOWN_TOKEN")

		// The media stays readable with a new login.
		again := withToken(anon, dendriteLogin(t, anon, "alice", alicePassword))
		if err := again.download(id, content); err != nil {
			t.Errorf("download with a new token: %v", err)
		}
	})

	// The control for the two subtests above: a logout that does not go
	// through Caddy is unknown to the module, which keeps serving the token
	// from its cache (token_cache_ttl, default 5m). So the immediate 401s
	// above come from the module's own invalidation, not from a fresh
	// whoami.
	t.Run("logout_bypassing_caddy", func(t *testing.T) {
		alice := withToken(anon, dendriteLogin(t, anon, "alice", alicePassword))
		content := []byte("cached " + rand.Text())
		id, err := alice.upload(content, "text/plain", "")
		if err != nil {
			t.Fatal(err)
		}
		if err := alice.download(id, content); err != nil {
			t.Fatal(err)
		}

		req, err := http.NewRequest(http.MethodPost, d.URL()+"/_matrix/client/v3/logout", strings.NewReader("{}"))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+alice.token)
		hr, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_ = hr.Body.Close()
		if hr.StatusCode != http.StatusOK {
			t.Fatalf("logout straight at dendrite: %s", hr.Status)
		}

		wantStatus(t, "whoami through caddy after a direct logout", alice.must(t, whoami),
			http.StatusUnauthorized, "M_UNKNOWN_TOKEN")
		if err := alice.download(id, content); err != nil {
			t.Errorf("download with a token cached before a logout the module did not see: %v (want 200 from the token cache)", err)
		}
	})

	t.Run("logout_all", func(t *testing.T) {
		first := withToken(anon, dendriteLogin(t, anon, "alice", alicePassword))
		second := withToken(anon, dendriteLogin(t, anon, "alice", alicePassword))
		if first.token == second.token {
			t.Fatal("two logins gave the same token")
		}
		bob := withToken(anon, dendriteLogin(t, anon, "bob", bobPassword))

		content := []byte("logout/all " + rand.Text())
		id, err := first.upload(content, "text/plain", "")
		if err != nil {
			t.Fatal(err)
		}
		// Every token is now known (and cached) by the module.
		for name, c := range map[string]*siteClient{"first": first, "second": second, "bob": bob} {
			if err := c.download(id, content); err != nil {
				t.Fatalf("download with %s token: %v", name, err)
			}
		}

		wantEmptyObject(t, "logout/all through caddy", first.must(t, request{method: http.MethodPost,
			path: "/_matrix/client/v3/logout/all", body: []byte("{}"), contentType: "application/json"}))

		for name, c := range map[string]*siteClient{"first": first, "second": second} {
			wantStatus(t, "download with the "+name+" token right after logout/all",
				c.must(t, request{method: http.MethodGet, path: c.downloadPath(id)}),
				http.StatusUnauthorized, "M_UNKNOWN_TOKEN")
			wantStatus(t, "whoami with the "+name+" token after logout/all", c.must(t, whoami),
				http.StatusUnauthorized, "M_UNKNOWN_TOKEN")
		}
		// Another user's session is untouched.
		if err := bob.download(id, content); err != nil {
			t.Errorf("bob after alice's logout/all: %v", err)
		}
		wantStatus(t, "bob's whoami after alice's logout/all", bob.must(t, whoami), http.StatusOK, "")
	})
}
