package caddymodule

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// serve runs one request through h with a next handler that records whether
// it was called and answers 299 "next".
func serve(t *testing.T, h *Handler, req *http.Request) (rec *httptest.ResponseRecorder, nextCalled bool) {
	t.Helper()
	rec = httptest.NewRecorder()
	req = caddyhttp.PrepareRequest(req, caddy.NewReplacer(), rec, nil)
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		nextCalled = true
		w.WriteHeader(299)
		_, err := io.WriteString(w, "next")
		return err
	})
	if err := h.ServeHTTP(rec, req, next); err != nil {
		t.Fatalf("ServeHTTP %s %s: %v", req.Method, req.URL, err)
	}
	return rec, nextCalled
}

// provisionHandler provisions h in a context whose matrix_media app uses
// fresh temp stores; the context is unloaded when the test ends.
func provisionHandler(t *testing.T, h *Handler) {
	t.Helper()
	ctx, cancel := newCaddyContext(t, map[string]any{"matrix_media": testAppConfig(t)})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("provisioning handler: %v", err)
	}
}

func TestHandlerServes(t *testing.T) {
	hs := fakeHomeserver(t, map[string]string{"tok": "@alice:example.org"})
	h := &Handler{ServerName: "example.org", Homeserver: hs.URL, MaxUploadSize: 1000}
	provisionHandler(t, h)

	t.Run("non-media paths go to next", func(t *testing.T) {
		for _, path := range []string{"/", "/_matrix/client/v3/sync", "/_matrix/client/versions", "/_matrix/mediafoo", "/.well-known/matrix/server"} {
			rec, nextCalled := serve(t, h, httptest.NewRequest(http.MethodGet, path, nil))
			if !nextCalled || rec.Code != 299 || rec.Body.String() != "next" {
				t.Errorf("GET %s: next called %v, got %d %q; want next's 299 \"next\"", path, nextCalled, rec.Code, rec.Body)
			}
		}
	})

	t.Run("media paths are answered", func(t *testing.T) {
		req := httptest.NewRequest(http.MethodGet, "/_matrix/client/v1/media/config", nil)
		rec, nextCalled := serve(t, h, req)
		if nextCalled {
			t.Fatal("next was called for a media path")
		}
		var e struct{ ErrCode string }
		if rec.Code != http.StatusUnauthorized || json.Unmarshal(rec.Body.Bytes(), &e) != nil || e.ErrCode != "M_MISSING_TOKEN" {
			t.Errorf("config without token: got %d %q, want 401 M_MISSING_TOKEN", rec.Code, rec.Body)
		}

		req = httptest.NewRequest(http.MethodGet, "/_matrix/client/v1/media/config", nil)
		req.Header.Set("Authorization", "Bearer tok")
		rec, _ = serve(t, h, req)
		var cfg map[string]int64
		if rec.Code != http.StatusOK || json.Unmarshal(rec.Body.Bytes(), &cfg) != nil || cfg["m.upload.size"] != 1000 {
			t.Errorf("config: got %d %q, want 200 with m.upload.size 1000", rec.Code, rec.Body)
		}
	})

	t.Run("upload then download", func(t *testing.T) {
		content := []byte("direct handler test")
		req := httptest.NewRequest(http.MethodPost, "/_matrix/media/v3/upload?filename=a.txt", bytes.NewReader(content))
		req.Header.Set("Authorization", "Bearer tok")
		req.Header.Set("Content-Type", "text/plain")
		rec, _ := serve(t, h, req)
		var up struct {
			ContentURI string `json:"content_uri"`
		}
		if rec.Code != http.StatusOK || json.Unmarshal(rec.Body.Bytes(), &up) != nil || !strings.HasPrefix(up.ContentURI, "mxc://example.org/") {
			t.Fatalf("upload: got %d %q", rec.Code, rec.Body)
		}
		id := strings.TrimPrefix(up.ContentURI, "mxc://example.org/")
		req = httptest.NewRequest(http.MethodGet, "/_matrix/client/v1/media/download/example.org/"+id, nil)
		req.Header.Set("Authorization", "Bearer tok")
		rec, _ = serve(t, h, req)
		if rec.Code != http.StatusOK || !bytes.Equal(rec.Body.Bytes(), content) {
			t.Fatalf("download: got %d %q, want 200 %q", rec.Code, rec.Body, content)
		}
		if got := rec.Header().Get("Content-Type"); !strings.HasPrefix(got, "text/plain") {
			t.Errorf("download Content-Type = %q, want text/plain", got)
		}
	})
}

func TestHandlerUsesAppDefaults(t *testing.T) {
	hs := fakeHomeserver(t, map[string]string{"tok": "@alice:example.org"})
	app := testAppConfig(t)
	app.MaxUploadSize = 4321
	ctx, cancel := newCaddyContext(t, map[string]any{"matrix_media": app})
	defer cancel()
	h := &Handler{ServerName: "example.org", Homeserver: hs.URL}
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodGet, "/_matrix/media/v3/config", nil)
	req.Header.Set("Authorization", "Bearer tok")
	rec, _ := serve(t, h, req)
	var cfg map[string]int64
	if rec.Code != http.StatusOK || json.Unmarshal(rec.Body.Bytes(), &cfg) != nil || cfg["m.upload.size"] != 4321 {
		t.Errorf("config: got %d %q, want m.upload.size 4321 from the app", rec.Code, rec.Body)
	}
}

func TestHandlerProvisionErrors(t *testing.T) {
	t.Setenv("MATRIX_MEDIA_TEST_UNSET", "")
	since := time.Date(2024, 9, 1, 0, 0, 0, 0, time.UTC)
	for i, tc := range []struct {
		h       Handler
		wantErr string
	}{
		{Handler{Homeserver: "http://127.0.0.1:1"}, "server_name is required"},
		{Handler{ServerName: "bad name", Homeserver: "http://127.0.0.1:1"}, "not a valid Matrix server name"},
		{Handler{ServerName: "example.org"}, "homeserver is required"},
		{Handler{ServerName: "example.org", Homeserver: "ftp://hs"}, "homeserver: parsing homeserver url"},
		{Handler{ServerName: "example.org", Homeserver: "{env.MATRIX_MEDIA_TEST_UNSET}"}, "{env.MATRIX_MEDIA_TEST_UNSET} is empty"},
		{Handler{ServerName: "example.org", Homeserver: "http://127.0.0.1:1", FreezeSince: since}, "freeze_since is set but freeze_legacy is not enabled"},
		{Handler{ServerName: "example.org", Homeserver: "http://127.0.0.1:1", HomeserverTimeout: caddy.Duration(-time.Second)}, "homeserver_timeout must be positive"},
		{Handler{ServerName: "example.org", Homeserver: "http://127.0.0.1:1", PendingExpiry: caddy.Duration(-time.Second)}, "pending_expiry must not be negative"},
		{Handler{ServerName: "example.org", Homeserver: "http://127.0.0.1:1", MaxDownloadTimeout: caddy.Duration(-time.Second)}, "max_download_timeout must not be negative"},
		{Handler{ServerName: "example.org", Homeserver: "http://127.0.0.1:1", MaxUploadSize: -1}, "max_upload_size must not be negative"},
	} {
		ctx, cancel := newCaddyContext(t, map[string]any{"matrix_media": testAppConfig(t)})
		h := tc.h
		err := h.Provision(ctx)
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("Test %d: Provision error = %v, want one containing %q", i, err, tc.wantErr)
		}
	}
}

func TestHandlerResolvesHomeserverPlaceholder(t *testing.T) {
	hs := fakeHomeserver(t, map[string]string{"tok": "@alice:example.org"})
	t.Setenv("MATRIX_MEDIA_TEST_HS", hs.URL)
	h := &Handler{ServerName: "example.org", Homeserver: "{env.MATRIX_MEDIA_TEST_HS}"}
	provisionHandler(t, h)
	req := httptest.NewRequest(http.MethodGet, "/_matrix/client/v1/media/config", nil)
	req.Header.Set("Authorization", "Bearer tok")
	rec, _ := serve(t, h, req)
	if rec.Code != http.StatusOK {
		t.Errorf("config with a token checked against {env.MATRIX_MEDIA_TEST_HS}: got %d %q, want 200", rec.Code, rec.Body)
	}
}
