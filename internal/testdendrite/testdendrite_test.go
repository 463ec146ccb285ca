package testdendrite

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// call sends a JSON request to d and returns the status and decoded body.
func call(t *testing.T, d *Dendrite, method, path, token, body string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, d.URL()+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	if err := json.Unmarshal(data, &out); err != nil {
		t.Fatalf("%s %s: decoding %q: %v", method, path, data, err)
	}
	return resp.StatusCode, out
}

func TestStartCreateUserLogin(t *testing.T) {
	d := Start(t, Options{ServerName: "hs.test"})
	if d.ServerName() != "hs.test" {
		t.Errorf("ServerName() = %q, want hs.test", d.ServerName())
	}
	if !strings.HasPrefix(d.URL(), "http://127.0.0.1:") {
		t.Errorf("URL() = %q, want http://127.0.0.1:port", d.URL())
	}

	if got := d.CreateUser(t, "alice", "alice-password", false); got != "@alice:hs.test" {
		t.Errorf("CreateUser = %q, want @alice:hs.test", got)
	}
	if got := d.CreateUser(t, "root", "root-password", true); got != "@root:hs.test" {
		t.Errorf("CreateUser(admin) = %q, want @root:hs.test", got)
	}
	// A second account with the same localpart is refused.
	if _, err := d.createUser(context.Background(), "alice", "alice-password", false); err == nil {
		t.Error("creating alice twice succeeded")
	}

	// Open registration is closed.
	status, body := call(t, d, http.MethodPost, "/_matrix/client/v3/register", "",
		`{"username":"mallory","password":"mallory-password","auth":{"type":"m.login.dummy"}}`)
	if status != http.StatusForbidden || body["errcode"] != "M_FORBIDDEN" {
		t.Errorf("open registration: %d %v, want 403 M_FORBIDDEN", status, body)
	}

	status, body = call(t, d, http.MethodPost, "/_matrix/client/v3/login", "",
		`{"type":"m.login.password","identifier":{"type":"m.id.user","user":"alice"},"password":"alice-password"}`)
	token, _ := body["access_token"].(string)
	if status != http.StatusOK || token == "" {
		t.Fatalf("login: %d %v", status, body)
	}
	status, body = call(t, d, http.MethodGet, "/_matrix/client/v3/account/whoami", token, "")
	if status != http.StatusOK || body["user_id"] != "@alice:hs.test" {
		t.Errorf("whoami: %d %v, want 200 @alice:hs.test", status, body)
	}
	status, body = call(t, d, http.MethodPost, "/_matrix/client/v3/logout", token, "{}")
	if status != http.StatusOK {
		t.Errorf("logout: %d %v", status, body)
	}
	status, body = call(t, d, http.MethodGet, "/_matrix/client/v3/account/whoami", token, "")
	if status != http.StatusUnauthorized || body["errcode"] != "M_UNKNOWN_TOKEN" {
		t.Errorf("whoami after logout: %d %v, want 401 M_UNKNOWN_TOKEN", status, body)
	}
}

func TestConfigYAMLDisablesOutboundFeatures(t *testing.T) {
	y := configYAML("/tmp/x", "/tmp/x/key.pem", Options{ServerName: "localhost", SharedSecret: "s3cret"})
	for _, want := range []string{
		"disable_federation: true",
		"registration_disabled: true",
		`registration_shared_secret: "s3cret"`,
		"rate_limiting:\n    enabled: false",
		"sentry:\n    enabled: false",
		"trusted_third_party_id_servers: []",
		"key_perspectives: []",
		"turn_uris: []",
		`connection_string: "file:/tmp/x/userapi.db"`,
	} {
		if !strings.Contains(y, want) {
			t.Errorf("config lacks %q", want)
		}
	}
}

func TestConfigYAMLDatabase(t *testing.T) {
	y := configYAML("/tmp/x", "/tmp/x/key.pem", Options{ServerName: "localhost", Database: "postgres://u@127.0.0.1/d?sslmode=disable"})
	if !strings.Contains(y, "\n  database:\n    connection_string: \"postgres://u@127.0.0.1/d?sslmode=disable\"\n") {
		t.Errorf("config lacks the global database:\n%s", y)
	}
	if strings.Contains(y, "file:") {
		t.Errorf("config with a PostgreSQL database still names SQLite files:\n%s", y)
	}
	y = configYAML("/tmp/x", "/tmp/x/key.pem", Options{ServerName: "localhost"})
	global, _, _ := strings.Cut(y, "app_service_api:")
	if strings.Contains(global, "database") {
		t.Errorf("config without Options.Database has a global database:\n%s", global)
	}
}

// TestUploadMediaStop uploads through Dendrite's media API, downloads it
// back, stops Dendrite and finds its config and the file at rest.
func TestUploadMediaStop(t *testing.T) {
	d := Start(t, Options{ServerName: "hs.test"})
	d.CreateUser(t, "alice", "alice-password", false)
	token := d.Login(t, "alice", "alice-password")
	body := []byte("some bytes for dendrite ☕")
	uri := d.UploadMedia(t, token, "café.txt", "text/plain", body)
	id, ok := strings.CutPrefix(uri, "mxc://hs.test/")
	if !ok || id == "" {
		t.Fatalf("UploadMedia = %q, want mxc://hs.test/<id>", uri)
	}
	resp, err := http.Get(d.URL() + "/_matrix/media/v3/download/hs.test/" + id)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(got, body) {
		t.Fatalf("download: %s, %q (%v), want 200 and the uploaded bytes", resp.Status, got, err)
	}

	d.Stop(t)
	d.Stop(t) // a second Stop does nothing
	if _, err := http.Get(d.URL() + "/_matrix/client/versions"); err == nil {
		t.Error("dendrite still answers after Stop")
	}
	conf, err := os.ReadFile(d.ConfigPath())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(conf), "base_path: "+strconv.Quote(d.MediaPath())) {
		t.Errorf("the config at ConfigPath does not name MediaPath %s as base_path", d.MediaPath())
	}
	sum := sha256.Sum256(body)
	h := base64.RawURLEncoding.EncodeToString(sum[:])
	file := filepath.Join(d.MediaPath(), h[:1], h[1:2], h[2:], "file")
	if stored, err := os.ReadFile(file); err != nil || !bytes.Equal(stored, body) {
		t.Errorf("the uploaded file at %s: %q, %v", file, stored, err)
	}
}
