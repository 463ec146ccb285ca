package auth

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/capped"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
)

const adminTestToken = "syt_YWxpY2U_secrettokenvalue_0123"

// adminHS is a fake homeserver serving the Synapse admin API. respond
// decides each answer; calls counts requests; bad records requests that were
// not the expected shape.
type adminHS struct {
	srv   *httptest.Server
	calls atomic.Int64

	mu      sync.Mutex
	respond func(w http.ResponseWriter, r *http.Request)
	bad     []string
	users   []string
}

func newAdminHS(t *testing.T, respond func(w http.ResponseWriter, r *http.Request)) *adminHS {
	t.Helper()
	hs := &adminHS{respond: respond}
	hs.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hs.calls.Add(1)
		hs.mu.Lock()
		if r.Method != http.MethodGet || r.Header.Get("Authorization") != "Bearer "+adminTestToken ||
			!strings.HasPrefix(r.URL.Path, "/_synapse/admin/v1/users/") || !strings.HasSuffix(r.URL.Path, "/admin") {
			hs.bad = append(hs.bad, r.Method+" "+r.URL.EscapedPath()+" auth="+r.Header.Get("Authorization"))
		}
		hs.users = append(hs.users, strings.TrimSuffix(strings.TrimPrefix(r.URL.EscapedPath(), "/_synapse/admin/v1/users/"), "/admin"))
		respond := hs.respond
		hs.mu.Unlock()
		respond(w, r)
	}))
	t.Cleanup(func() {
		hs.srv.Close()
		hs.mu.Lock()
		defer hs.mu.Unlock()
		for _, b := range hs.bad {
			t.Errorf("unexpected request: %s", b)
		}
	})
	return hs
}

func (hs *adminHS) setRespond(f func(w http.ResponseWriter, r *http.Request)) {
	hs.mu.Lock()
	hs.respond = f
	hs.mu.Unlock()
}

func adminJSON(status int, body string) func(w http.ResponseWriter, r *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		fmt.Fprint(w, body)
	}
}

func newAdminTestPolicy(t *testing.T, opts AdminOptions) *AdminPolicy {
	t.Helper()
	p, err := NewAdminPolicy(opts)
	if err != nil {
		t.Fatalf("NewAdminPolicy: %v", err)
	}
	return p
}

var adminAlice = User{UserID: "@alice:example.org", DeviceID: "DEV"}

func TestNewAdminPolicyErrors(t *testing.T) {
	tests := []struct {
		name    string
		opts    AdminOptions
		wantErr string
	}{
		{"admin without @", AdminOptions{Admins: []string{"alice:example.org"}}, "not a Matrix user ID"},
		{"admin without server", AdminOptions{Admins: []string{"@alice"}}, "not a Matrix user ID"},
		{"admin with bad server", AdminOptions{Admins: []string{"@alice:exa mple.org"}}, "not a Matrix user ID"},
		{"detect without url", AdminOptions{DetectHomeserverAdmins: true}, "homeserver url"},
		{"detect with bad scheme", AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: "ftp://127.0.0.1"}, "scheme"},
		{"detect with query", AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: "http://127.0.0.1/?x=1"}, "query"},
		{"negative ttl", AdminOptions{CacheTTL: -time.Second}, "negative cache ttl"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewAdminPolicy(tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("err = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
	// The URL is not needed without detection.
	if _, err := NewAdminPolicy(AdminOptions{Admins: []string{"@alice:example.org", "@bob:localhost:8448"}}); err != nil {
		t.Errorf("valid static policy rejected: %v", err)
	}
}

func TestAdminStatic(t *testing.T) {
	hs := newAdminHS(t, adminJSON(200, `{"admin":false}`))
	p := newAdminTestPolicy(t, AdminOptions{
		Admins:                 []string{"@alice:example.org"},
		DetectHomeserverAdmins: true,
		HomeserverURL:          hs.srv.URL,
	})
	ctx := context.Background()
	tests := []struct {
		name string
		user User
		want bool
	}{
		{"listed admin", adminAlice, true},
		{"admin secret", User{UserID: "@robot:example.org", IsAdmin: true}, true},
		{"listed admin who is a guest", User{UserID: "@alice:example.org", IsGuest: true}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := p.IsAdmin(ctx, tt.user, adminTestToken)
			if err != nil || got != tt.want {
				t.Errorf("IsAdmin = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
	if n := hs.calls.Load(); n != 0 {
		t.Errorf("homeserver called %d times for static admins, want 0", n)
	}

	// Without detection nobody else is an admin and nothing is asked.
	p2 := newAdminTestPolicy(t, AdminOptions{Admins: []string{"@alice:example.org"}})
	if got, err := p2.IsAdmin(ctx, User{UserID: "@bob:example.org"}, adminTestToken); got || err != nil {
		t.Errorf("non-listed user without detection: %v, %v", got, err)
	}
	if got, err := p2.IsAdmin(ctx, adminAlice, ""); !got || err != nil {
		t.Errorf("listed user without token: %v, %v", got, err)
	}
}

func TestAdminDetect(t *testing.T) {
	tests := []struct {
		name      string
		status    int
		body      string
		want      bool
		wantErr   error
		wantCalls int64 // after two IsAdmin calls for the same user
	}{
		{"admin", 200, `{"admin": true}`, true, nil, 1},
		{"not admin", 200, `{"admin": false}`, false, nil, 1},
		{"forbidden", 403, `{"errcode":"M_FORBIDDEN","error":"You are not a server admin"}`, false, nil, 1},
		{"user not found", 404, `{"errcode":"M_NOT_FOUND","error":"User not found"}`, false, nil, 1},
		{"not a local user", 400, `{"errcode":"M_UNKNOWN","error":"Only local users can be looked up"}`, false, nil, 1},
		{"token revoked meanwhile", 401, `{"errcode":"M_UNKNOWN_TOKEN"}`, false, nil, 2},
		{"server error", 500, `{"errcode":"M_UNKNOWN"}`, false, ErrHomeserverUnavailable, 2},
		{"bad gateway", 502, `<html>bad gateway</html>`, false, ErrHomeserverUnavailable, 2},
		{"rate limited", 429, `{"errcode":"M_LIMIT_EXCEEDED"}`, false, ErrHomeserverUnavailable, 2},
		{"garbage 200", 200, `not json`, false, ErrHomeserverUnavailable, 2},
		{"200 without admin field", 200, `{}`, false, ErrHomeserverUnavailable, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hs := newAdminHS(t, adminJSON(tt.status, tt.body))
			p := newAdminTestPolicy(t, AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: hs.srv.URL + "/"})
			for i := 0; i < 2; i++ {
				got, err := p.IsAdmin(context.Background(), adminAlice, adminTestToken)
				if tt.wantErr != nil {
					if !errors.Is(err, tt.wantErr) {
						t.Fatalf("call %d: err = %v, want %v", i, err, tt.wantErr)
					}
					if strings.Contains(err.Error(), adminTestToken) {
						t.Errorf("error leaks the token: %q", err)
					}
				} else if err != nil {
					t.Fatalf("call %d: err = %v", i, err)
				}
				if got != tt.want {
					t.Errorf("call %d: IsAdmin = %v, want %v", i, got, tt.want)
				}
			}
			if n := hs.calls.Load(); n != tt.wantCalls {
				t.Errorf("homeserver calls = %d, want %d", n, tt.wantCalls)
			}
			hs.mu.Lock()
			defer hs.mu.Unlock()
			if len(hs.users) == 0 || hs.users[0] != "@alice:example.org" {
				t.Errorf("asked about %v, want @alice:example.org", hs.users)
			}
		})
	}
}

func TestAdminUserIDEscaped(t *testing.T) {
	hs := newAdminHS(t, adminJSON(200, `{"admin":true}`))
	p := newAdminTestPolicy(t, AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: hs.srv.URL})
	if got, err := p.IsAdmin(context.Background(), User{UserID: "@a/b?c:example.org"}, adminTestToken); !got || err != nil {
		t.Fatalf("IsAdmin = %v, %v", got, err)
	}
	hs.mu.Lock()
	defer hs.mu.Unlock()
	if len(hs.users) != 1 || hs.users[0] != "@a%2Fb%3Fc:example.org" {
		t.Errorf("escaped user in path = %v, want @a%%2Fb%%3Fc:example.org", hs.users)
	}
}

func TestAdminGuestsAndAppservicesNotDetected(t *testing.T) {
	hs := newAdminHS(t, adminJSON(200, `{"admin":true}`))
	p := newAdminTestPolicy(t, AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: hs.srv.URL})
	for _, u := range []User{
		{UserID: "@guest:example.org", IsGuest: true},
		{UserID: "@whatsapp_1:example.org", AppserviceID: "whatsapp"},
		{},
	} {
		if got, err := p.IsAdmin(context.Background(), u, adminTestToken); got || err != nil {
			t.Errorf("IsAdmin(%+v) = %v, %v; want false, nil", u, got, err)
		}
	}
	if got, err := p.IsAdmin(context.Background(), adminAlice, ""); got || err != nil {
		t.Errorf("IsAdmin without token = %v, %v; want false, nil", got, err)
	}
	if n := hs.calls.Load(); n != 0 {
		t.Errorf("homeserver calls = %d, want 0", n)
	}
	if _, err := p.IsAdmin(context.Background(), adminAlice, "bad token\n"); !errors.Is(err, ErrUnknownToken) {
		t.Errorf("malformed token: err = %v, want ErrUnknownToken", err)
	}
}

func TestAdminDendriteNoAPI(t *testing.T) {
	for _, tt := range []struct {
		name   string
		status int
		body   string
	}{
		{"plain 404", 404, "404 page not found\n"},
		{"404 M_UNRECOGNIZED", 404, `{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`},
		{"400 M_UNRECOGNIZED", 400, `{"errcode":"M_UNRECOGNIZED"}`},
		{"405", 405, ``},
	} {
		t.Run(tt.name, func(t *testing.T) {
			hs := newAdminHS(t, adminJSON(tt.status, tt.body))
			clock := testclock.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
			core, logs := observer.New(zapcore.InfoLevel)
			p := newAdminTestPolicy(t, AdminOptions{
				DetectHomeserverAdmins: true,
				HomeserverURL:          hs.srv.URL,
				CacheTTL:               time.Minute,
				Now:                    clock.Now,
				Logger:                 zap.New(core),
			})
			ctx := context.Background()
			users := []User{adminAlice, {UserID: "@bob:example.org"}, {UserID: "@carol:example.org"}}
			for _, u := range users {
				if got, err := p.IsAdmin(ctx, u, adminTestToken); got || err != nil {
					t.Errorf("IsAdmin(%s) = %v, %v; want false, nil", u.UserID, got, err)
				}
			}
			if n := hs.calls.Load(); n != 1 {
				t.Errorf("homeserver calls = %d, want 1 (API remembered as missing)", n)
			}
			// After the TTL the homeserver is asked again (it may have been
			// upgraded); the log line is not repeated.
			clock.Advance(time.Minute + time.Second)
			if got, err := p.IsAdmin(ctx, users[1], adminTestToken); got || err != nil {
				t.Errorf("IsAdmin after ttl = %v, %v", got, err)
			}
			if n := hs.calls.Load(); n != 2 {
				t.Errorf("homeserver calls after ttl = %d, want 2", n)
			}
			if n := logs.FilterMessageSnippet("no Synapse admin API").Len(); n != 1 {
				t.Errorf("logged %d times, want once", n)
			}
			for _, e := range logs.All() {
				for _, f := range e.Context {
					if strings.Contains(f.String, adminTestToken) {
						t.Errorf("log leaks the token: %+v", e)
					}
				}
			}
			// Once the API exists, admins are found again.
			clock.Advance(time.Minute + time.Second)
			hs.setRespond(adminJSON(200, `{"admin":true}`))
			if got, err := p.IsAdmin(ctx, users[2], adminTestToken); !got || err != nil {
				t.Errorf("IsAdmin after upgrade = %v, %v; want true", got, err)
			}
		})
	}
}

func TestAdminCacheExpiry(t *testing.T) {
	hs := newAdminHS(t, adminJSON(200, `{"admin":true}`))
	clock := testclock.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	p := newAdminTestPolicy(t, AdminOptions{
		DetectHomeserverAdmins: true,
		HomeserverURL:          hs.srv.URL,
		Now:                    clock.Now,
	})
	ctx := context.Background()
	check := func(want bool, wantCalls int64) {
		t.Helper()
		got, err := p.IsAdmin(ctx, adminAlice, adminTestToken)
		if err != nil || got != want {
			t.Errorf("IsAdmin = %v, %v; want %v", got, err, want)
		}
		if n := hs.calls.Load(); n != wantCalls {
			t.Errorf("homeserver calls = %d, want %d", n, wantCalls)
		}
	}
	check(true, 1)
	// Demoted at the homeserver: the cached answer holds for the default
	// TTL of 5 minutes.
	hs.setRespond(adminJSON(403, `{"errcode":"M_FORBIDDEN"}`))
	clock.Advance(4*time.Minute + 59*time.Second)
	check(true, 1)
	clock.Advance(time.Second)
	check(false, 2)
	check(false, 2)
}

func TestAdminErrorNotCached(t *testing.T) {
	hs := newAdminHS(t, adminJSON(503, `{"errcode":"M_UNKNOWN"}`))
	p := newAdminTestPolicy(t, AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: hs.srv.URL})
	ctx := context.Background()
	if _, err := p.IsAdmin(ctx, adminAlice, adminTestToken); !errors.Is(err, ErrHomeserverUnavailable) {
		t.Fatalf("err = %v, want ErrHomeserverUnavailable", err)
	}
	hs.setRespond(adminJSON(200, `{"admin":true}`))
	if got, err := p.IsAdmin(ctx, adminAlice, adminTestToken); !got || err != nil {
		t.Errorf("after recovery IsAdmin = %v, %v; want true", got, err)
	}
	if n := hs.calls.Load(); n != 2 {
		t.Errorf("homeserver calls = %d, want 2", n)
	}
}

func TestAdminTransportErrors(t *testing.T) {
	t.Run("timeout", func(t *testing.T) {
		hs := newAdminHS(t, func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(5 * time.Second):
			}
		})
		p := newAdminTestPolicy(t, AdminOptions{
			DetectHomeserverAdmins: true,
			HomeserverURL:          hs.srv.URL,
			Client:                 &http.Client{Timeout: 50 * time.Millisecond},
		})
		_, err := p.IsAdmin(context.Background(), adminAlice, adminTestToken)
		if !errors.Is(err, ErrHomeserverTimeout) {
			t.Fatalf("err = %v, want ErrHomeserverTimeout", err)
		}
		if strings.Contains(err.Error(), adminTestToken) {
			t.Errorf("error leaks the token: %q", err)
		}
	})
	t.Run("connection refused", func(t *testing.T) {
		srv := httptest.NewServer(http.NotFoundHandler())
		url := srv.URL
		srv.Close()
		p := newAdminTestPolicy(t, AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: url})
		_, err := p.IsAdmin(context.Background(), adminAlice, adminTestToken)
		if !errors.Is(err, ErrHomeserverUnavailable) {
			t.Fatalf("err = %v, want ErrHomeserverUnavailable", err)
		}
		if strings.Contains(err.Error(), adminTestToken) {
			t.Errorf("error leaks the token: %q", err)
		}
	})
}

func TestAdminSingleflight(t *testing.T) {
	started := make(chan struct{}, 100)
	release := make(chan struct{})
	hs := newAdminHS(t, func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-release
		adminJSON(200, `{"admin":true}`)(w, r)
	})
	p := newAdminTestPolicy(t, AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: hs.srv.URL})

	const n = 20
	var wg sync.WaitGroup
	var admins atomic.Int64
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := p.IsAdmin(context.Background(), adminAlice, adminTestToken)
			if err != nil {
				errs <- err
				return
			}
			if got {
				admins.Add(1)
			}
		}()
	}
	<-started
	// Give the other goroutines time to reach the lookup: without request
	// sharing they would each start a request while this one is held.
	time.Sleep(100 * time.Millisecond)
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("IsAdmin: %v", err)
	}
	if got := admins.Load(); got != n {
		t.Errorf("%d of %d callers saw admin", got, n)
	}
	if c := hs.calls.Load(); c != 1 {
		t.Errorf("homeserver calls = %d, want 1", c)
	}
}

func TestAdminCallerCancelDoesNotAbortLookup(t *testing.T) {
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	hs := newAdminHS(t, func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		<-release
		adminJSON(200, `{"admin":true}`)(w, r)
	})
	p := newAdminTestPolicy(t, AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: hs.srv.URL})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := p.IsAdmin(ctx, adminAlice, adminTestToken)
		done <- err
	}()
	<-started
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	close(release)
	// The request finishes for the next caller; it is answered from the
	// shared flight or the cache, without a second request.
	if got, err := p.IsAdmin(context.Background(), adminAlice, adminTestToken); !got || err != nil {
		t.Errorf("IsAdmin = %v, %v; want true", got, err)
	}
	if c := hs.calls.Load(); c != 1 {
		t.Errorf("homeserver calls = %d, want 1", c)
	}
}

func TestAdminCacheBounded(t *testing.T) {
	hs := newAdminHS(t, adminJSON(200, `{"admin":false}`))
	p := newAdminTestPolicy(t, AdminOptions{DetectHomeserverAdmins: true, HomeserverURL: hs.srv.URL})
	p.answers = capped.New(capped.Options[string, bool]{Max: 3, Now: p.now})
	ctx := context.Background()
	ask := func(name string) {
		t.Helper()
		if _, err := p.IsAdmin(ctx, User{UserID: "@" + name + ":example.org"}, adminTestToken); err != nil {
			t.Fatalf("IsAdmin(%s): %v", name, err)
		}
	}
	for _, name := range []string{"u1", "u2", "u3", "u4"} {
		ask(name)
	}
	size := p.answers.Len()
	_, hasOldest := p.answers.Get("@u1:example.org")
	if size != 3 {
		t.Errorf("cache size = %d, want 3", size)
	}
	if hasOldest {
		t.Error("oldest entry @u1 was not evicted")
	}
	// u4 is cached, u1 was evicted and is asked again.
	ask("u4")
	if c := hs.calls.Load(); c != 4 {
		t.Errorf("calls after cached lookup = %d, want 4", c)
	}
	ask("u1")
	if c := hs.calls.Load(); c != 5 {
		t.Errorf("calls after evicted lookup = %d, want 5", c)
	}
}
