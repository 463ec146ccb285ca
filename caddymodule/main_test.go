package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// TestMain points Caddy's data and config directories at a temp directory, so
// that no test touches ~/.local/share/caddy or ~/.config/caddy. With
// sqliteHolderEnv set, the binary is a helper process of the SQLite claim
// tests instead (sqlitelock_test.go).
func TestMain(m *testing.M) {
	if db := os.Getenv(sqliteHolderEnv); db != "" {
		os.Exit(runSQLiteHolder(db))
	}
	dir, err := os.MkdirTemp("", "caddymodule-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_ = os.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data"))
	_ = os.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "config"))
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// newCaddyContext returns a Caddy context whose config holds the given raw
// apps (ctx.App works in it), and a function that unloads it, cleaning up
// every module provisioned in it.
func newCaddyContext(t *testing.T, apps map[string]any) (caddy.Context, context.CancelFunc) {
	t.Helper()
	cfg := &caddy.Config{AppsRaw: caddy.ModuleMap{}}
	for name, v := range apps {
		raw, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		cfg.AppsRaw[name] = raw
	}
	base, err := caddy.ProvisionContext(cfg)
	if err != nil {
		t.Fatalf("provisioning caddy context: %v", err)
	}
	base.Context = t.Context()
	return caddy.NewContext(base)
}

// testAppConfig is an app config with its stores in a fresh temp directory.
func testAppConfig(t *testing.T) *App {
	dir := t.TempDir()
	return &App{
		Database:    &Database{Driver: DriverSQLite, DSN: filepath.Join(dir, "media.db")},
		StoragePath: filepath.Join(dir, "media"),
	}
}

// fakeHomeserver answers whoami for the given tokens (token -> user ID).
func fakeHomeserver(t testing.TB, tokens map[string]string) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/_matrix/client/v3/account/whoami" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		user, ok := tokens[strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")]
		if !ok {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"unknown token"}`)
			return
		}
		_, _ = fmt.Fprintf(w, `{"user_id":%q}`, user)
	}))
	t.Cleanup(srv.Close)
	return srv
}
