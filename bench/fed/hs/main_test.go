package main

import (
	"crypto/rand"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

func TestWhoami(t *testing.T) {
	key, err := xmatrix.GenerateSigningKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	mux := newMux("127.0.0.1:8443", key, "@bench:a")
	tests := []struct {
		name, auth string
		wantStatus int
		wantUser   string
	}{
		{"bearer token", "Bearer anything", http.StatusOK, "@bench:a"},
		{"no token", "", http.StatusUnauthorized, ""},
		{"empty token", "Bearer ", http.StatusUnauthorized, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := httptest.NewRequest(http.MethodGet, "/_matrix/client/v3/account/whoami", nil)
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, req)
			if rec.Code != tt.wantStatus {
				t.Fatalf("status %d, want %d; body %s", rec.Code, tt.wantStatus, rec.Body)
			}
			var body struct {
				UserID  string `json:"user_id"`
				ErrCode string `json:"errcode"`
			}
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatalf("decoding %q: %v", rec.Body, err)
			}
			if body.UserID != tt.wantUser {
				t.Errorf("user_id %q, want %q", body.UserID, tt.wantUser)
			}
			if tt.wantStatus != http.StatusOK && body.ErrCode != "M_MISSING_TOKEN" {
				t.Errorf("errcode %q, want M_MISSING_TOKEN", body.ErrCode)
			}
		})
	}
}

func TestServerKeysSigned(t *testing.T) {
	const name = "127.0.0.1:8443"
	key, err := xmatrix.GenerateSigningKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	newMux(name, key, "@bench:a").ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/_matrix/key/v2/server", nil))
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d; body %s", rec.Code, rec.Body)
	}
	var obj map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &obj); err != nil {
		t.Fatalf("decoding %q: %v", rec.Body, err)
	}
	if obj["server_name"] != name {
		t.Errorf("server_name %v, want %s", obj["server_name"], name)
	}
	vk, _ := obj["verify_keys"].(map[string]any)
	entry, _ := vk[key.ID].(map[string]any)
	if entry["key"] != key.PublicBase64() {
		t.Errorf("verify_keys[%s] = %v, want key %s", key.ID, vk[key.ID], key.PublicBase64())
	}
	if err := xmatrix.VerifyJSON(obj, name, key.ID, key.Public()); err != nil {
		t.Errorf("signature: %v", err)
	}
	other, err := xmatrix.GenerateSigningKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if err := xmatrix.VerifyJSON(obj, name, key.ID, other.Public()); err == nil {
		t.Errorf("signature verified with another key")
	}
}
