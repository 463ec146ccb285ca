package caddymodule

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// countingHomeserver answers whoami and logout for its tokens and counts
// whoami calls.
type countingHomeserver struct {
	*httptest.Server
	mu      sync.Mutex
	tokens  map[string]string
	whoamis atomic.Int64
	logouts atomic.Int64
}

func newCountingHomeserver(t *testing.T, tokens map[string]string) *countingHomeserver {
	t.Helper()
	hs := &countingHomeserver{tokens: tokens}
	hs.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		hs.mu.Lock()
		user, ok := hs.tokens[tok]
		hs.mu.Unlock()
		if r.URL.Path == "/_matrix/client/v3/account/whoami" {
			hs.whoamis.Add(1)
		}
		if !ok {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"unknown token"}`)
			return
		}
		switch r.URL.Path {
		case "/_matrix/client/v3/account/whoami":
			_ = json.NewEncoder(w).Encode(map[string]string{"user_id": user})
		case "/_matrix/client/v3/logout":
			hs.logouts.Add(1)
			hs.mu.Lock()
			delete(hs.tokens, tok)
			hs.mu.Unlock()
			_, _ = io.WriteString(w, `{}`)
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(hs.Close)
	return hs
}

// configRequest asks for the media config with token.
func configRequest(token string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/_matrix/client/v1/media/config", nil)
	r.Header.Set("Authorization", "Bearer "+token)
	return r
}

func errCode(t *testing.T, rec *httptest.ResponseRecorder) string {
	t.Helper()
	var e struct {
		ErrCode string `json:"errcode"`
	}
	_ = json.Unmarshal(rec.Body.Bytes(), &e)
	return e.ErrCode
}

func TestTokenCacheSurvivesReload(t *testing.T) {
	hs := newCountingHomeserver(t, map[string]string{"tok": "@alice:example.org"})
	appCfg := testAppConfig(t)

	ctx1, unload1 := newCaddyContext(t, map[string]any{"matrix_media": appCfg})
	h1 := &Handler{ServerName: "example.org", Homeserver: hs.URL}
	if err := h1.Provision(ctx1); err != nil {
		t.Fatal(err)
	}
	if rec, _ := serve(t, h1, configRequest("tok")); rec.Code != 200 {
		t.Fatalf("config: %d %s", rec.Code, rec.Body)
	}
	if rec, _ := serve(t, h1, configRequest("tok")); rec.Code != 200 || hs.whoamis.Load() != 1 {
		t.Fatalf("second request: %d, %d whoami calls; want 200 and 1", rec.Code, hs.whoamis.Load())
	}

	// A reload: the new config is provisioned, then the old one unloaded.
	ctx2, unload2 := newCaddyContext(t, map[string]any{"matrix_media": appCfg})
	defer unload2()
	h2 := &Handler{ServerName: "example.org", Homeserver: hs.URL + "/"} // another spelling, same homeserver
	if err := h2.Provision(ctx2); err != nil {
		t.Fatal(err)
	}
	unload1()
	if rec, _ := serve(t, h2, configRequest("tok")); rec.Code != 200 {
		t.Fatalf("after reload: %d %s", rec.Code, rec.Body)
	}
	if n := hs.whoamis.Load(); n != 1 {
		t.Fatalf("%d whoami calls after the reload; the cache should have been kept", n)
	}
}

func TestHandlerLogoutInvalidatesCache(t *testing.T) {
	hs := newCountingHomeserver(t, map[string]string{"tok": "@alice:example.org", "other": "@alice:example.org"})
	h := &Handler{ServerName: "example.org", Homeserver: hs.URL}
	provisionHandler(t, h)
	for _, tok := range []string{"tok", "other"} {
		if rec, _ := serve(t, h, configRequest(tok)); rec.Code != 200 {
			t.Fatalf("%s: %d", tok, rec.Code)
		}
	}

	// Not a POST: the next handler (the operator's reverse_proxy) gets it.
	if _, next := serve(t, h, httptest.NewRequest(http.MethodGet, "/_matrix/client/v3/logout", nil)); !next {
		t.Fatal("GET logout should go to the next handler")
	}

	req := httptest.NewRequest(http.MethodPost, "/_matrix/client/v3/logout", strings.NewReader("{}"))
	req.Header.Set("Authorization", "Bearer tok")
	rec, next := serve(t, h, req)
	if next || rec.Code != 200 || rec.Body.String() != "{}" || hs.logouts.Load() != 1 {
		t.Fatalf("logout: next=%v %d %q, %d logouts at the homeserver", next, rec.Code, rec.Body, hs.logouts.Load())
	}
	before := hs.whoamis.Load()
	if rec, _ := serve(t, h, configRequest("tok")); rec.Code != 401 || errCode(t, rec) != "M_UNKNOWN_TOKEN" {
		t.Fatalf("logged-out token: %d %s", rec.Code, rec.Body)
	}
	if rec, _ := serve(t, h, configRequest("other")); rec.Code != 200 {
		t.Fatalf("the user's other token must still work: %d", rec.Code)
	}
	if n := hs.whoamis.Load() - before; n != 0 {
		t.Fatalf("%d whoami calls after logout; both answers should come from the cache", n)
	}
}

func TestHandlerAppserviceAndAdminToken(t *testing.T) {
	hs := newCountingHomeserver(t, map[string]string{})
	t.Setenv("TEST_AS_TOKEN", "as-secret-token")
	t.Setenv("TEST_ADMIN_TOKEN", strings.Repeat("a", 40))
	h := &Handler{
		ServerName: "example.org",
		Homeserver: hs.URL,
		Appservices: []AppserviceConfig{{ID: "bridge", ASToken: "{env.TEST_AS_TOKEN}", SenderLocalpart: "bridgebot",
			UserNamespaces: []string{`@bridge_.*:example\.org`}}},
		AdminTokens: []AdminTokenConfig{{Token: "{env.TEST_ADMIN_TOKEN}"}},
	}
	provisionHandler(t, h)

	upload := func(token, query string) *httptest.ResponseRecorder {
		r := httptest.NewRequest(http.MethodPost, "/_matrix/media/v3/upload"+query, strings.NewReader("hello"))
		r.Header.Set("Authorization", "Bearer "+token)
		r.Header.Set("Content-Type", "text/plain")
		rec, _ := serve(t, h, r)
		return rec
	}
	for _, tc := range []struct {
		name, token, query string
		status             int
		code               string
	}{
		{"appservice sender", "as-secret-token", "", 200, ""},
		{"appservice namespaced user", "as-secret-token", "?user_id=%40bridge_42%3Aexample.org", 200, ""},
		{"appservice user outside namespace", "as-secret-token", "?user_id=%40alice%3Aexample.org", 403, "M_FORBIDDEN"},
		{"admin token", strings.Repeat("a", 40), "", 200, ""},
		{"unknown token", "nope", "", 401, "M_UNKNOWN_TOKEN"},
	} {
		rec := upload(tc.token, tc.query)
		if rec.Code != tc.status || (tc.code != "" && errCode(t, rec) != tc.code) {
			t.Errorf("%s: %d %s, want %d %s", tc.name, rec.Code, rec.Body, tc.status, tc.code)
		}
	}
	if n := hs.whoamis.Load(); n != 1 {
		t.Fatalf("%d whoami calls; only the unknown token should reach the homeserver", n)
	}
}

func TestHandlerHomeserverDownGives502(t *testing.T) {
	hs := newCountingHomeserver(t, map[string]string{"tok": "@a:example.org"})
	url := hs.URL
	hs.Close()
	h := &Handler{ServerName: "example.org", Homeserver: url}
	provisionHandler(t, h)
	rec, _ := serve(t, h, configRequest("tok"))
	if rec.Code != http.StatusBadGateway || errCode(t, rec) != "M_UNKNOWN" {
		t.Fatalf("%d %s, want 502 M_UNKNOWN", rec.Code, rec.Body)
	}
}

// A whoami answer that names no valid user ID is a homeserver failure: 502,
// never a 200 for a made-up user.
func TestHandlerInvalidWhoamiUserGives502(t *testing.T) {
	bad := []string{"alice:example.org", "@alice", "@al ice:example.org", "@alice:exa mple.org",
		"@:example.org", "@" + strings.Repeat("a", 300) + ":example.org"}
	tokens := map[string]string{"good": "@alice:example.org"}
	for i, u := range bad {
		tokens["bad"+string(rune('a'+i))] = u
	}
	hs := newCountingHomeserver(t, tokens)
	h := &Handler{ServerName: "example.org", Homeserver: hs.URL}
	provisionHandler(t, h)
	if rec, _ := serve(t, h, configRequest("good")); rec.Code != http.StatusOK {
		t.Fatalf("valid user: %d %s", rec.Code, rec.Body)
	}
	for i, u := range bad {
		rec, _ := serve(t, h, configRequest("bad"+string(rune('a'+i))))
		if rec.Code != http.StatusBadGateway || errCode(t, rec) != "M_UNKNOWN" {
			t.Errorf("whoami user_id %q: %d %s, want 502 M_UNKNOWN", u, rec.Code, rec.Body)
		}
	}
}
