package auth

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
)

// testHomeserver is an httptest homeserver with whoami and logout that counts
// whoami calls.
type testHomeserver struct {
	*httptest.Server
	mu      sync.Mutex
	tokens  map[string]string // token -> user ID
	guests  map[string]bool
	whoamis atomic.Int64
	// failStatus, when set, is answered to every request.
	failStatus atomic.Int64
	// gate, when set, blocks whoami until it is closed.
	gate atomic.Pointer[chan struct{}]
	// lastLogoutHeaders is what the last logout request carried.
	lastLogoutHeaders http.Header
	lastLogoutBody    string
}

func newTestHomeserver(t testing.TB) *testHomeserver {
	t.Helper()
	hs := &testHomeserver{tokens: map[string]string{}, guests: map[string]bool{}}
	hs.Server = httptest.NewServer(http.HandlerFunc(hs.serve))
	t.Cleanup(hs.Close)
	return hs
}

func (hs *testHomeserver) addToken(token, user string) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	hs.tokens[token] = user
}

func (hs *testHomeserver) serve(w http.ResponseWriter, r *http.Request) {
	if st := hs.failStatus.Load(); st != 0 {
		w.WriteHeader(int(st))
		_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN","error":"down"}`))
		return
	}
	token := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	hs.mu.Lock()
	user, ok := hs.tokens[token]
	guest := hs.guests[token]
	hs.mu.Unlock()
	unknown := func() {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(401)
		_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown token"}`))
	}
	switch r.URL.Path {
	case "/_matrix/client/v3/account/whoami":
		hs.whoamis.Add(1)
		if g := hs.gate.Load(); g != nil {
			<-*g
		}
		if !ok {
			unknown()
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"user_id": user, "device_id": "DEV", "is_guest": guest})
	case "/_matrix/client/v3/logout", "/_matrix/client/r0/logout", "/_matrix/client/v3/logout/all":
		if r.Method != http.MethodPost {
			w.WriteHeader(405)
			_, _ = w.Write([]byte(`{"errcode":"M_UNRECOGNIZED","error":"bad method"}`))
			return
		}
		body := make([]byte, 100)
		n, _ := r.Body.Read(body)
		hs.mu.Lock()
		hs.lastLogoutHeaders = r.Header.Clone()
		hs.lastLogoutBody = string(body[:n])
		hs.mu.Unlock()
		if !ok {
			unknown()
			return
		}
		hs.mu.Lock()
		if strings.HasSuffix(r.URL.Path, "/all") {
			for tok, u := range hs.tokens {
				if u == user {
					delete(hs.tokens, tok)
				}
			}
		} else {
			delete(hs.tokens, token)
		}
		hs.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Homeserver", "yes")
		_, _ = w.Write([]byte(`{}`))
	default:
		w.WriteHeader(404)
		_, _ = w.Write([]byte(`{"errcode":"M_UNRECOGNIZED","error":"no"}`))
	}
}

// authFixture is a site authenticator on a test homeserver.
type authFixture struct {
	hs    *testHomeserver
	clock *testclock.Clock
	cache *TokenCache
	site  *SiteAuthenticator
}

func newAuthFixture(t testing.TB, opts CacheOptions) *authFixture {
	t.Helper()
	hs := newTestHomeserver(t)
	clock := testclock.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	opts.Now = clock.Now
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics()
	}
	cache, err := NewTokenCache(opts)
	if err != nil {
		t.Fatal(err)
	}
	return &authFixture{hs: hs, clock: clock, cache: cache, site: siteOn(t, hs, cache, nil)}
}

func siteOn(t testing.TB, hs *testHomeserver, cache *TokenCache, breaker *Breaker) *SiteAuthenticator {
	t.Helper()
	w, err := NewWhoami(hs.URL, hs.Client())
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewSiteAuthenticator(SiteOptions{Homeserver: hs.URL, Checker: w, Cache: cache, Breaker: breaker})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (f *authFixture) auth(token string) (User, error) {
	return f.site.Authenticate(context.Background(), Credentials{Token: token})
}

func TestTokenCacheHitMissNegativeExpiry(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{TTL: time.Minute, NegativeTTL: 10 * time.Second})
	f.hs.addToken("tok-alice", "@alice:hs")

	steps := []struct {
		name        string
		token       string
		advance     time.Duration
		wantUser    string
		wantErr     error
		wantWhoamis int64
	}{
		{"first use asks the homeserver", "tok-alice", 0, "@alice:hs", nil, 1},
		{"second use is a hit", "tok-alice", 0, "@alice:hs", nil, 1},
		{"still a hit just before the ttl", "tok-alice", 59 * time.Second, "@alice:hs", nil, 1},
		{"expired after the ttl", "tok-alice", 2 * time.Second, "@alice:hs", nil, 2},
		{"unknown token asks", "tok-nobody", 0, "", ErrUnknownToken, 3},
		{"unknown token is cached negatively", "tok-nobody", 9 * time.Second, "", ErrUnknownToken, 3},
		{"negative entry expires", "tok-nobody", 2 * time.Second, "", ErrUnknownToken, 4},
	}
	for _, s := range steps {
		f.clock.Advance(s.advance)
		u, err := f.auth(s.token)
		if s.wantErr != nil {
			if !errors.Is(err, s.wantErr) {
				t.Fatalf("%s: err = %v, want %v", s.name, err, s.wantErr)
			}
		} else if err != nil || u.UserID != s.wantUser || u.DeviceID != "DEV" {
			t.Fatalf("%s: got %+v, %v; want %s", s.name, u, err, s.wantUser)
		}
		if n := f.hs.whoamis.Load(); n != s.wantWhoamis {
			t.Fatalf("%s: %d whoami calls, want %d", s.name, n, s.wantWhoamis)
		}
	}
	if f.cache.Len() != 2 {
		t.Errorf("cache holds %d entries, want 2", f.cache.Len())
	}
}

func TestTokenCacheFailuresNotCached(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{})
	f.hs.addToken("tok", "@alice:hs")
	f.hs.failStatus.Store(500)
	for i := 0; i < 2; i++ {
		if _, err := f.auth("tok"); !errors.Is(err, ErrHomeserverUnavailable) {
			t.Fatalf("err = %v, want unavailable", err)
		}
	}
	if n := f.hs.whoamis.Load(); n != 0 { // failStatus answers before counting
		t.Fatalf("whoami counted %d", n)
	}
	f.hs.failStatus.Store(0)
	if u, err := f.auth("tok"); err != nil || u.UserID != "@alice:hs" {
		t.Fatalf("after recovery: %+v %v", u, err)
	}
	if f.cache.Len() != 1 {
		t.Fatalf("cache len %d, want 1", f.cache.Len())
	}
}

func TestTokenCacheSingleflight(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{})
	f.hs.addToken("tok", "@alice:hs")
	gate := make(chan struct{})
	f.hs.gate.Store(&gate)

	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			u, err := f.auth("tok")
			if err == nil && u.UserID != "@alice:hs" {
				err = errors.New("wrong user " + u.UserID)
			}
			errs <- err
		}()
	}
	// Wait until the single call reached the homeserver, then let it answer.
	deadline := time.Now().Add(5 * time.Second)
	for f.hs.whoamis.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // give late goroutines the chance to (wrongly) call too
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := f.hs.whoamis.Load(); got != 1 {
		t.Fatalf("%d whoami calls for %d concurrent requests, want 1", got, n)
	}
}

func TestTokenCacheWaiterCancellation(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{})
	f.hs.addToken("tok", "@alice:hs")
	gate := make(chan struct{})
	f.hs.gate.Store(&gate)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := f.site.Authenticate(ctx, Credentials{Token: "tok"})
		done <- err
	}()
	for f.hs.whoamis.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; err == nil {
		t.Fatal("cancelled caller got no error")
	}
	// The check goes on for others and is cached.
	close(gate)
	if u, err := f.auth("tok"); err != nil || u.UserID != "@alice:hs" {
		t.Fatalf("%+v %v", u, err)
	}
	if got := f.hs.whoamis.Load(); got != 1 {
		t.Fatalf("%d whoami calls, want 1", got)
	}
}

func TestTokenCacheEviction(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{MaxEntries: 3})
	for _, tok := range []string{"a", "b", "c", "d"} {
		f.hs.addToken("tok-"+tok, "@"+tok+":hs")
	}
	for _, tok := range []string{"a", "b", "c"} {
		if _, err := f.auth("tok-" + tok); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.auth("tok-a"); err != nil { // a is now most recent; b is oldest
		t.Fatal(err)
	}
	if _, err := f.auth("tok-d"); err != nil { // evicts b
		t.Fatal(err)
	}
	if f.cache.Len() != 3 {
		t.Fatalf("len %d, want 3", f.cache.Len())
	}
	before := f.hs.whoamis.Load()
	for _, tok := range []string{"a", "c", "d"} {
		if _, err := f.auth("tok-" + tok); err != nil {
			t.Fatal(err)
		}
	}
	if f.hs.whoamis.Load() != before {
		t.Fatalf("a, c, d should be cached")
	}
	if _, err := f.auth("tok-b"); err != nil {
		t.Fatal(err)
	}
	if f.hs.whoamis.Load() != before+1 {
		t.Fatalf("b should have been evicted")
	}
	if got := counterValue(t, f.cache.Metrics().evictions); got != 2 {
		t.Fatalf("evictions metric %v, want 2", got)
	}
}

func TestTokenCacheInvalidationDuringCheck(t *testing.T) {
	// A whoami that started before a logout must not put the (now revoked)
	// token back into the cache.
	f := newAuthFixture(t, CacheOptions{})
	f.hs.addToken("tok", "@alice:hs")
	gate := make(chan struct{})
	f.hs.gate.Store(&gate)
	done := make(chan error, 1)
	go func() {
		_, err := f.auth("tok")
		done <- err
	}()
	for f.hs.whoamis.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	f.site.Logout(context.Background(), "tok", "", false)
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err) // the answer itself predates the logout
	}
	f.hs.gate.Store(nil)
	if _, err := f.auth("tok"); !errors.Is(err, ErrUnknownToken) {
		t.Fatalf("after logout: err = %v, want unknown token (from the invalidation)", err)
	}
	if got := f.hs.whoamis.Load(); got != 1 {
		t.Fatalf("%d whoami calls; the invalidated token should be rejected from the cache", got)
	}
}

func TestTokenCacheSharedAcrossSitesNamespacedByHomeserver(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{})
	f.hs.addToken("tok", "@alice:hs")
	other := newTestHomeserver(t)
	other.addToken("tok", "@bob:other")
	siteB := siteOn(t, other, f.cache, nil)
	siteA2 := siteOn(t, f.hs, f.cache, nil) // a second site on the same homeserver

	if u, _ := f.auth("tok"); u.UserID != "@alice:hs" {
		t.Fatalf("site A: %q", u.UserID)
	}
	if u, _ := siteB.Authenticate(context.Background(), Credentials{Token: "tok"}); u.UserID != "@bob:other" {
		t.Fatalf("site B: %q", u.UserID)
	}
	if u, _ := siteA2.Authenticate(context.Background(), Credentials{Token: "tok"}); u.UserID != "@alice:hs" {
		t.Fatalf("site A2: %q", u.UserID)
	}
	if f.hs.whoamis.Load() != 1 || other.whoamis.Load() != 1 {
		t.Fatalf("whoamis %d/%d, want 1/1", f.hs.whoamis.Load(), other.whoamis.Load())
	}
}

func TestTokenCacheSetTTLsKeepsEntries(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{TTL: time.Minute})
	f.hs.addToken("tok", "@alice:hs")
	if _, err := f.auth("tok"); err != nil {
		t.Fatal(err)
	}
	f.cache.SetTTLs(10*time.Minute, 0)
	f.clock.Advance(30 * time.Second)
	if _, err := f.auth("tok"); err != nil || f.hs.whoamis.Load() != 1 {
		t.Fatalf("entry lost on SetTTLs: %v %d", err, f.hs.whoamis.Load())
	}
	f.clock.Advance(31 * time.Second) // the old entry keeps its old expiry
	if _, err := f.auth("tok"); err != nil || f.hs.whoamis.Load() != 2 {
		t.Fatalf("%v %d", err, f.hs.whoamis.Load())
	}
	f.clock.Advance(9 * time.Minute) // the new one has the new TTL
	if _, err := f.auth("tok"); err != nil || f.hs.whoamis.Load() != 2 {
		t.Fatalf("%v %d", err, f.hs.whoamis.Load())
	}
}

// recordingPublisher records published invalidations.
type recordingPublisher struct {
	mu   sync.Mutex
	invs []Invalidation
	err  error
}

func (p *recordingPublisher) Publish(_ context.Context, inv Invalidation) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.invs = append(p.invs, inv)
	return p.err
}

func TestTokenCacheApplyAndPurge(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{})
	f.hs.addToken("t1", "@alice:hs")
	f.hs.addToken("t2", "@alice:hs")
	f.hs.addToken("t3", "@bob:hs")
	for _, tok := range []string{"t1", "t2", "t3"} {
		if _, err := f.auth(tok); err != nil {
			t.Fatal(err)
		}
	}
	// A remote instance saw alice log out everywhere.
	f.cache.Apply(Invalidation{Homeserver: f.hs.URL, UserID: "@alice:hs"})
	for _, tok := range []string{"t1", "t2"} {
		if _, err := f.auth(tok); !errors.Is(err, ErrUnknownToken) {
			t.Fatalf("%s after remote logout/all: %v", tok, err)
		}
	}
	if u, err := f.auth("t3"); err != nil || u.UserID != "@bob:hs" {
		t.Fatalf("bob must be unaffected: %v", err)
	}
	// Another homeserver's namespace is untouched by a same-named user.
	f.cache.Apply(Invalidation{Homeserver: "http://elsewhere", UserID: "@bob:hs"})
	if _, err := f.auth("t3"); err != nil {
		t.Fatal(err)
	}
	if f.hs.whoamis.Load() != 3 {
		t.Fatalf("whoamis %d, want 3", f.hs.whoamis.Load())
	}
	f.cache.Purge()
	if f.cache.Len() != 0 {
		t.Fatal("purge left entries")
	}
	if _, err := f.auth("t3"); err != nil || f.hs.whoamis.Load() != 4 {
		t.Fatalf("after purge: %v %d", err, f.hs.whoamis.Load())
	}
	if got := counterValue(t, f.cache.Metrics().invalidations.WithLabelValues("user", "remote")); got != 2 {
		t.Fatalf("user/remote invalidations %v, want 2", got)
	}
}

func TestLogoutPath(t *testing.T) {
	tests := map[string]LogoutKind{
		"/_matrix/client/v3/logout":      LogoutOne,
		"/_matrix/client/r0/logout":      LogoutOne,
		"/_matrix/client/v3/logout/all":  LogoutAll,
		"/_matrix/client/r0/logout/all":  LogoutAll,
		"/_matrix/client/v1/logout":      NotLogout,
		"/_matrix/client/v3/logout/":     NotLogout,
		"/_matrix/client/v3/logoutx":     NotLogout,
		"/_matrix/client/v3/login":       NotLogout,
		"/_matrix/media/v3/logout":       NotLogout,
		"/_matrix/client/v3/logout/all/": NotLogout,
	}
	for p, want := range tests {
		if got := LogoutPath(p); got != want {
			t.Errorf("LogoutPath(%q) = %v, want %v", p, got, want)
		}
	}
}

func TestLogoutProxy(t *testing.T) {
	tests := []struct {
		name       string
		path       string
		token      string
		failStatus int
		wantStatus int
		// wantRejected are tokens that the cache must reject afterwards
		// without a whoami call; wantValid still work.
		wantRejected []string
		wantValid    []string
	}{
		{"logout", "/_matrix/client/v3/logout", "t1", 0, 200, []string{"t1"}, []string{"t2", "t3"}},
		{"r0 logout", "/_matrix/client/r0/logout", "t2", 0, 200, []string{"t2"}, []string{"t1", "t3"}},
		{"logout all", "/_matrix/client/v3/logout/all", "t1", 0, 200, []string{"t1", "t2"}, []string{"t3"}},
		{"homeserver refuses unknown token", "/_matrix/client/v3/logout", "nope", 0, 401, []string{"nope"}, []string{"t1", "t2", "t3"}},
		{"homeserver fails: nothing invalidated", "/_matrix/client/v3/logout/all", "t1", 500, 500, nil, []string{"t1", "t2", "t3"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newAuthFixture(t, CacheOptions{})
			pub := &recordingPublisher{}
			f.cache.SetPublisher(pub)
			f.hs.addToken("t1", "@alice:hs")
			f.hs.addToken("t2", "@alice:hs")
			f.hs.addToken("t3", "@bob:hs")
			for _, tok := range []string{"t1", "t2", "t3"} {
				if _, err := f.auth(tok); err != nil {
					t.Fatal(err)
				}
			}
			proxy, err := NewLogoutProxy(f.hs.URL, f.hs.Client(), f.site, nil)
			if err != nil {
				t.Fatal(err)
			}
			f.hs.failStatus.Store(int64(tc.failStatus))
			r := httptest.NewRequest("POST", tc.path, strings.NewReader("{}"))
			r.Header.Set("Authorization", "Bearer "+tc.token)
			r.Header.Set("X-Forwarded-For", "6.6.6.6")
			r.Header.Set("Connection", "X-Private")
			r.Header.Set("X-Private", "secret")
			r.RemoteAddr = "192.0.2.7:1234"
			rec := httptest.NewRecorder()
			proxy.ServeHTTP(rec, r)
			f.hs.failStatus.Store(0)
			if rec.Code != tc.wantStatus {
				t.Fatalf("status %d, want %d: %s", rec.Code, tc.wantStatus, rec.Body)
			}
			if tc.wantStatus == 200 {
				if rec.Body.String() != "{}" || rec.Header().Get("X-Homeserver") != "yes" {
					t.Fatalf("homeserver response not passed through: %q %v", rec.Body, rec.Header())
				}
				f.hs.mu.Lock()
				h, body := f.hs.lastLogoutHeaders, f.hs.lastLogoutBody
				f.hs.mu.Unlock()
				if h.Get("X-Forwarded-For") != "192.0.2.7" || h.Get("X-Private") != "" || body != "{}" {
					t.Fatalf("forwarded headers %v body %q", h, body)
				}
			}
			before := f.hs.whoamis.Load()
			for _, tok := range tc.wantRejected {
				if _, err := f.auth(tok); !errors.Is(err, ErrUnknownToken) {
					t.Errorf("%s: err = %v, want unknown token", tok, err)
				}
			}
			for _, tok := range tc.wantValid {
				if _, err := f.auth(tok); err != nil {
					t.Errorf("%s: %v", tok, err)
				}
			}
			if got := f.hs.whoamis.Load() - before; got != 0 && tc.name != "homeserver refuses unknown token" {
				t.Errorf("%d whoami calls after the logout; all answers should come from the cache", got)
			}
			pub.mu.Lock()
			defer pub.mu.Unlock()
			switch {
			case tc.wantStatus != 200 && len(pub.invs) != 0:
				t.Errorf("published %v after a failed logout", pub.invs)
			case tc.name == "logout all" && (len(pub.invs) != 2 || pub.invs[1].UserID != "@alice:hs" || pub.invs[0].Token != HashToken("t1")):
				t.Errorf("published %+v", pub.invs)
			case tc.wantStatus == 200 && tc.name != "logout all" && (len(pub.invs) != 1 || pub.invs[0].Token != HashToken(tc.token) || pub.invs[0].Homeserver != f.hs.URL):
				t.Errorf("published %+v", pub.invs)
			}
		})
	}
}

func TestLogoutProxyHomeserverDown(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{})
	proxy, err := NewLogoutProxy("http://127.0.0.1:1", nil, f.site, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := httptest.NewRequest("POST", "/_matrix/client/v3/logout", nil)
	r.Header.Set("Authorization", "Bearer tok")
	rec := httptest.NewRecorder()
	proxy.ServeHTTP(rec, r)
	if rec.Code != 502 || !strings.Contains(rec.Body.String(), `"errcode":"M_UNKNOWN"`) {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
}

func TestBreaker(t *testing.T) {
	clock := testclock.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	hs := newTestHomeserver(t)
	hs.addToken("tok", "@alice:hs")
	cache, err := NewTokenCache(CacheOptions{Now: clock.Now, Metrics: NewMetrics()})
	if err != nil {
		t.Fatal(err)
	}
	b := cache.Breaker(hs.URL, BreakerOptions{Threshold: 3, Cooldown: 10 * time.Second})
	if cache.Breaker(hs.URL, BreakerOptions{Threshold: 3}) != b {
		t.Fatal("Breaker must return the same breaker for a homeserver")
	}
	site := siteOn(t, hs, cache, b)
	authn := func() error {
		_, err := site.Authenticate(context.Background(), Credentials{Token: "tok"})
		return err
	}
	hs.failStatus.Store(503)
	for i := 0; i < 3; i++ {
		if err := authn(); !errors.Is(err, ErrHomeserverUnavailable) || errors.Is(err, ErrCircuitOpen) {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	var open *CircuitOpenError
	if err := authn(); !errors.As(err, &open) || open.RetryAfter != 10*time.Second || !errors.Is(err, ErrHomeserverUnavailable) {
		t.Fatalf("after 3 failures: %v", err)
	}
	if !b.Open() {
		t.Fatal("breaker should be open")
	}
	hs.failStatus.Store(0)
	clock.Advance(5 * time.Second)
	if err := authn(); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("during cooldown: %v", err)
	}
	clock.Advance(6 * time.Second)
	if err := authn(); err != nil { // the probe succeeds and closes the breaker
		t.Fatalf("probe: %v", err)
	}
	if b.Open() {
		t.Fatal("breaker should be closed after a successful probe")
	}
	if got := counterValue(t, cache.Metrics().rejected); got != 2 {
		t.Fatalf("rejected metric %v, want 2", got)
	}
	// A rejected token is a homeserver answer, not a failure.
	for i := 0; i < 5; i++ {
		if err := func() error {
			_, err := site.Authenticate(context.Background(), Credentials{Token: "bad" + string(rune('a'+i))})
			return err
		}(); !errors.Is(err, ErrUnknownToken) {
			t.Fatal(err)
		}
	}
	if b.Open() {
		t.Fatal("unknown tokens must not open the breaker")
	}
}

func TestSiteAuthenticatorAdminTokens(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{})
	secret := strings.Repeat("s", 40)
	w, _ := NewWhoami(f.hs.URL, f.hs.Client())
	site, err := NewSiteAuthenticator(SiteOptions{Homeserver: f.hs.URL, Checker: w, Cache: f.cache,
		AdminTokens: []AdminToken{{Secret: secret, UserID: "@bot:hs"}}})
	if err != nil {
		t.Fatal(err)
	}
	u, err := site.Authenticate(context.Background(), Credentials{Token: secret})
	if err != nil || u.UserID != "@bot:hs" || !u.IsAdmin {
		t.Fatalf("%+v %v", u, err)
	}
	if _, err := site.Authenticate(context.Background(), Credentials{Token: secret + "x"}); !errors.Is(err, ErrUnknownToken) {
		t.Fatalf("near miss: %v", err)
	}
	if f.hs.whoamis.Load() != 1 {
		t.Fatalf("whoamis %d, want 1 (only for the near miss)", f.hs.whoamis.Load())
	}
	for _, bad := range []AdminToken{{Secret: "short", UserID: "@a:b"}, {Secret: secret, UserID: "bot"}, {Secret: secret, UserID: "@bot:hs x"}, {Secret: secret, UserID: "@b t:hs"}, {Secret: secret + " x", UserID: "@a:b"}} {
		if _, err := NewSiteAuthenticator(SiteOptions{Homeserver: "x", Checker: w, Cache: f.cache, AdminTokens: []AdminToken{bad}}); err == nil {
			t.Errorf("accepted %+v", bad)
		}
	}
}

func TestRequestCredentials(t *testing.T) {
	tests := []struct {
		header, query, token, userID string
	}{
		{"Bearer abc", "", "abc", ""},
		{"bearer  abc ", "", "abc", ""},
		{"Basic abc", "access_token=q", "q", ""},
		{"", "access_token=q%2Bx&user_id=%40bot%3Ahs", "q+x", "@bot:hs"},
		{"Bearer h", "access_token=q", "h", ""},
		{"", "", "", ""},
	}
	for _, tc := range tests {
		r := httptest.NewRequest("GET", "/x?"+tc.query, nil)
		if tc.header != "" {
			r.Header.Set("Authorization", tc.header)
		}
		c := RequestCredentials(r)
		if c.Token != tc.token || c.AssertedUserID != tc.userID {
			t.Errorf("%q %q: got %+v", tc.header, tc.query, c)
		}
	}
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
