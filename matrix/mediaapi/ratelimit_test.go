package mediaapi

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/ratelimit"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testredis"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
)

// perMinute is a request rule of n per minute, burst n.
func perMinute(n float64) ratelimit.Rule { return ratelimit.Rule{Rate: n / 60, Burst: n} }

// rateEnv is an env whose site has rate limits rl on a memory limiter with
// its own clock (returned).
func rateEnv(t *testing.T, rl RateLimits, opts ...envOption) (*env, *testclock.Clock) {
	t.Helper()
	clock := testclock.New(time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC))
	rl.Limiter = ratelimit.NewMemory(ratelimit.MemoryOptions{Now: clock.Now})
	opts = append(opts, func(c *SiteConfig, _ *RepositoryOptions) { c.RateLimits = &rl })
	return newEnv(t, opts...), clock
}

// from is r sent by the client at ip (as the Caddy layer passes it).
func (e *env) from(ip string, r req) *httptest.ResponseRecorder {
	hr := r.request()
	hr = hr.WithContext(WithClientIP(hr.Context(), netip.MustParseAddr(ip)))
	rec := httptest.NewRecorder()
	e.site.ServeHTTP(rec, hr)
	return rec
}

// expectLimited asserts a 429 M_LIMIT_EXCEEDED with Retry-After (seconds,
// rounded up) and retry_after_ms near wantRetry.
func expectLimited(t *testing.T, rec *httptest.ResponseRecorder, wantRetry time.Duration) {
	t.Helper()
	expectError(t, rec, http.StatusTooManyRequests, "M_LIMIT_EXCEEDED")
	var b struct {
		RetryAfterMS int64 `json:"retry_after_ms"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil {
		t.Fatal(err)
	}
	if d := time.Duration(b.RetryAfterMS)*time.Millisecond - wantRetry.Truncate(time.Millisecond); d < -5*time.Millisecond || d > 5*time.Millisecond {
		t.Errorf("retry_after_ms = %d, want about %d", b.RetryAfterMS, wantRetry.Milliseconds())
	}
	want := strconv.FormatInt(int64((wantRetry+time.Second-1)/time.Second), 10)
	if got := rec.Header().Get("Retry-After"); got != want {
		t.Errorf("Retry-After = %q, want %q", got, want)
	}
}

func rejections(e *env, reason string) float64 {
	var m dto.Metric
	if err := e.repo.metrics.limitRejections.WithLabelValues(testServer, reason).Write(&m); err != nil {
		e.t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func rateUploadReq(token string, n int) req {
	return req{method: "POST", path: "/_matrix/media/v3/upload", token: token, body: bytes.Repeat([]byte("u"), n)}
}

func TestRateLimitRequests(t *testing.T) {
	type step struct {
		ip      string
		r       req
		status  int
		retry   time.Duration // for 429s (byte buckets: until positive, 1 ns past zero)
		advance time.Duration // before the step
	}
	dl := func(id string) req { return req{method: "GET", path: "/_matrix/media/v3/download/test/" + id} }
	tests := []struct {
		name   string
		rl     RateLimits
		steps  func(e *env) []step
		reason string
		count  float64
	}{
		{
			name: "uploads per user: another user and another IP are separate",
			rl:   RateLimits{Classes: [NumRateClasses]RateRules{RateUpload: {PerUser: perMinute(2)}}},
			steps: func(*env) []step {
				return []step{
					{ip: "192.0.2.1", r: rateUploadReq("alice", 10), status: 200},
					{ip: "192.0.2.2", r: rateUploadReq("alice", 10), status: 200},
					{ip: "192.0.2.3", r: rateUploadReq("alice", 10), status: 429, retry: 30 * time.Second},
					{ip: "192.0.2.1", r: rateUploadReq("bob", 10), status: 200},
					// /create is an upload too.
					{ip: "192.0.2.1", r: req{method: "POST", path: "/_matrix/media/v1/create", token: "alice"}, status: 429, retry: 30 * time.Second},
					{advance: 30 * time.Second, ip: "192.0.2.1", r: rateUploadReq("alice", 10), status: 200},
				}
			},
			reason: "rate_upload_user", count: 2,
		},
		{
			name: "uploads per IP: users behind one address share it; IPv6 per /64",
			rl:   RateLimits{Classes: [NumRateClasses]RateRules{RateUpload: {PerIP: perMinute(2)}}},
			steps: func(*env) []step {
				return []step{
					{ip: "2001:db8:1:2::1", r: rateUploadReq("alice", 10), status: 200},
					{ip: "2001:db8:1:2::ffff", r: rateUploadReq("bob", 10), status: 200},
					{ip: "2001:db8:1:2:3::", r: rateUploadReq("bob", 10), status: 429, retry: 30 * time.Second},
					{ip: "2001:db8:1:3::1", r: rateUploadReq("bob", 10), status: 200},
					{ip: "::ffff:192.0.2.7", r: rateUploadReq("bob", 10), status: 200},
					{ip: "192.0.2.7", r: rateUploadReq("alice", 10), status: 200},
					{ip: "192.0.2.7", r: rateUploadReq("alice", 10), status: 429, retry: 30 * time.Second},
				}
			},
			reason: "rate_upload_ip", count: 2,
		},
		{
			name: "exempt networks are never limited",
			rl: RateLimits{Classes: [NumRateClasses]RateRules{RateUpload: {PerIP: perMinute(1), PerUser: perMinute(1)}},
				Exempt: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}},
			steps: func(*env) []step {
				return []step{
					{ip: "10.1.2.3", r: rateUploadReq("alice", 10), status: 200},
					{ip: "10.1.2.3", r: rateUploadReq("alice", 10), status: 200},
					{ip: "10.1.9.9", r: rateUploadReq("alice", 10), status: 200},
					{ip: "10.2.0.1", r: rateUploadReq("alice", 10), status: 200},
					{ip: "10.2.0.1", r: rateUploadReq("alice", 10), status: 429, retry: time.Minute},
				}
			},
			reason: "rate_upload_ip", count: 1,
		},
		{
			name: "legacy downloads per IP",
			rl:   RateLimits{Classes: [NumRateClasses]RateRules{RateDownload: {PerIP: perMinute(3), PerUser: perMinute(1)}}},
			steps: func(e *env) []step {
				id := e.upload("alice", []byte("hello"), "text/plain", "")
				return []step{
					{ip: "198.51.100.1", r: dl(id), status: 200},
					{ip: "198.51.100.1", r: dl(id), status: 200},
					{ip: "198.51.100.1", r: dl("missing"), status: 404},
					{ip: "198.51.100.1", r: dl(id), status: 429, retry: 20 * time.Second},
					{ip: "198.51.100.2", r: dl(id), status: 200},
					// Authenticated: the user's bucket too.
					{ip: "198.51.100.3", r: req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "bob"}, status: 200},
					{ip: "198.51.100.4", r: req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "bob"}, status: 429, retry: time.Minute},
				}
			},
			reason: "rate_download_ip", count: 1,
		},
		{
			name: "download bytes: a large file passes once, its debt delays the next",
			rl:   RateLimits{Classes: [NumRateClasses]RateRules{RateDownloadBytes: {PerIP: ratelimit.Rule{Rate: 100, Burst: 1000}}}},
			steps: func(e *env) []step {
				big := e.upload("alice", bytes.Repeat([]byte("b"), 5000), "application/octet-stream", "")
				small := e.upload("alice", []byte("s"), "text/plain", "")
				return []step{
					{ip: "203.0.113.5", r: dl(big), status: 200},
					// Level -4000: 40 s to be positive again; HEAD costs nothing
					// but needs a positive bucket too.
					{ip: "203.0.113.5", r: dl(small), status: 429, retry: 40*time.Second + 1},
					{ip: "203.0.113.5", r: req{method: "HEAD", path: "/_matrix/media/v3/download/test/" + small}, status: 429, retry: 40*time.Second + 1},
					{ip: "203.0.113.6", r: dl(small), status: 200},
					{advance: 41 * time.Second, ip: "203.0.113.5", r: dl(small), status: 200},
					// A range costs its length only.
					{ip: "203.0.113.7", r: req{method: "GET", path: "/_matrix/media/v3/download/test/" + big, header: map[string]string{"Range": "bytes=0-99"}}, status: 206},
					{ip: "203.0.113.7", r: req{method: "GET", path: "/_matrix/media/v3/download/test/" + big, header: map[string]string{"Range": "bytes=0-99"}}, status: 206},
				}
			},
			reason: "rate_download_bytes_ip", count: 2,
		},
		{
			name: "upload bytes per user: announced up front, chunked charged after",
			rl:   RateLimits{Classes: [NumRateClasses]RateRules{RateUploadBytes: {PerUser: ratelimit.Rule{Rate: 10, Burst: 100}}}},
			steps: func(*env) []step {
				chunked := rateUploadReq("bob", 300)
				chunked.chunked = true
				tooLarge := rateUploadReq("alice", 2<<20)
				return []step{
					// Refused with 413: its announced size is not charged.
					{ip: "192.0.2.1", r: tooLarge, status: 413},
					{ip: "192.0.2.1", r: rateUploadReq("alice", 250), status: 200},
					{ip: "192.0.2.1", r: rateUploadReq("alice", 1), status: 429, retry: 15*time.Second + 1},
					{ip: "192.0.2.1", r: chunked, status: 200},
					{ip: "192.0.2.1", r: rateUploadReq("bob", 1), status: 429, retry: 20*time.Second + 1},
				}
			},
			reason: "rate_upload_bytes_user", count: 2,
		},
		{
			name: "appservices exempt",
			rl:   RateLimits{Classes: [NumRateClasses]RateRules{RateUpload: {PerIP: perMinute(1)}}, ExemptAppservices: true},
			steps: func(*env) []step {
				return []step{
					{ip: "192.0.2.1", r: rateUploadReq("alice", 1), status: 200},
					{ip: "192.0.2.1", r: rateUploadReq("alice", 1), status: 429, retry: time.Minute},
				}
			},
			reason: "rate_upload_ip", count: 1,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, clock := rateEnv(t, tc.rl)
			for i, s := range tc.steps(e) {
				clock.Advance(s.advance)
				rec := e.from(s.ip, s.r)
				if rec.Code != s.status {
					t.Fatalf("step %d: status %d, want %d: %s", i, rec.Code, s.status, rec.Body.String())
				}
				if s.status == 429 {
					expectLimited(t, rec, s.retry)
				}
			}
			if got := rejections(e, tc.reason); got != tc.count {
				t.Errorf("limit_rejections_total{reason=%q} = %v, want %v", tc.reason, got, tc.count)
			}
		})
	}
}

// adminAlice says alice is a media admin and counts the questions.
type adminAlice struct{ asked atomic.Int64 }

func (a *adminAlice) IsAdmin(_ context.Context, u auth.User, _ string) (bool, error) {
	a.asked.Add(1)
	return u.UserID == "@alice:test", nil
}

func TestRateLimitExemptAdmins(t *testing.T) {
	admins := &adminAlice{}
	e, _ := rateEnv(t, RateLimits{Classes: [NumRateClasses]RateRules{RateUpload: {PerUser: perMinute(1)}}, ExemptAdmins: true},
		func(c *SiteConfig, _ *RepositoryOptions) { c.Admins = admins })
	for i := range 3 {
		if rec := e.from("192.0.2.1", rateUploadReq("alice", 1)); rec.Code != 200 {
			t.Fatalf("admin upload %d: %d %s", i, rec.Code, rec.Body.String())
		}
	}
	// Asked only when the limit would refuse.
	if admins.asked.Load() != 2 {
		t.Errorf("admin checks: %d, want 2", admins.asked.Load())
	}
	e.from("192.0.2.1", rateUploadReq("bob", 1))
	expectLimited(t, e.from("192.0.2.1", rateUploadReq("bob", 1)), time.Minute)
}

func TestRateLimitThumbnailRemote(t *testing.T) {
	e, fr := remoteEnv(t)
	clock := testclock.New(time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC))
	rl := &RateLimits{Limiter: ratelimit.NewMemory(ratelimit.MemoryOptions{Now: clock.Now}),
		Classes: [NumRateClasses]RateRules{
			RateRemote:    {PerUser: perMinute(1)},
			RateThumbnail: {PerIP: perMinute(2)},
		}}
	var err error
	if e.site.rate, err = newSiteLimits(testServer, rl); err != nil {
		t.Fatal(err)
	}
	photo := testJPEG(t, 64, 48)
	fr.media["other.test/a"] = photo
	fr.media["other.test/b"] = photo
	get := func(path string) req { return req{method: "GET", path: path, token: "alice"} }
	if rec := e.from("192.0.2.1", get("/_matrix/client/v1/media/download/other.test/a")); rec.Code != 200 {
		t.Fatalf("first remote download: %d %s", rec.Code, rec.Body.String())
	}
	// Cached now: no fetch, not counted.
	if rec := e.from("192.0.2.1", get("/_matrix/client/v1/media/download/other.test/a")); rec.Code != 200 {
		t.Fatalf("cached remote download: %d %s", rec.Code, rec.Body.String())
	}
	expectLimited(t, e.from("192.0.2.1", get("/_matrix/client/v1/media/download/other.test/b")), time.Minute)
	if fr.calls.Load() != 1 {
		t.Errorf("remote calls: %d, want 1", fr.calls.Load())
	}
	for i := range 2 {
		if rec := e.from("192.0.2.9", get("/_matrix/client/v1/media/thumbnail/other.test/a?width=32&height=32")); rec.Code != 200 {
			t.Fatalf("thumbnail %d: %d %s", i, rec.Code, rec.Body.String())
		}
	}
	expectLimited(t, e.from("192.0.2.9", get("/_matrix/client/v1/media/thumbnail/other.test/a?width=32&height=32")), 30*time.Second)
	if rejections(e, "rate_remote_user") != 1 || rejections(e, "rate_thumbnail_ip") != 1 {
		t.Errorf("rejections: remote %v, thumbnail %v", rejections(e, "rate_remote_user"), rejections(e, "rate_thumbnail_ip"))
	}
}

// TestRateLimitFailedAuth sends 1,000 random tokens from one IP through
// the media API: the homeserver (a counting httptest server) is asked at
// most burst times; the rest get 429 without a homeserver call; another
// IP and known tokens are unaffected.
func TestRateLimitFailedAuth(t *testing.T) {
	const burst = 5
	var calls atomic.Int64
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.Header.Get("Authorization") == "Bearer alice" {
			_, _ = io.WriteString(w, `{"user_id":"@alice:test"}`)
			return
		}
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown token"}`)
	}))
	t.Cleanup(hs.Close)
	e, _ := rateEnv(t, RateLimits{Classes: [NumRateClasses]RateRules{RateFailedAuth: {PerIP: perMinute(burst)}}})
	whoami, err := auth.NewWhoami(hs.URL, hs.Client())
	if err != nil {
		t.Fatal(err)
	}
	cache, _ := auth.NewTokenCache(auth.CacheOptions{})
	e.site.auth, err = auth.NewSiteAuthenticator(auth.SiteOptions{Homeserver: hs.URL, Checker: whoami, Cache: cache})
	if err != nil {
		t.Fatal(err)
	}
	cfg := req{method: "GET", path: "/_matrix/client/v1/media/config"}
	cfg.token = "alice"
	if rec := e.from("192.0.2.50", cfg); rec.Code != 200 {
		t.Fatalf("alice: %d", rec.Code)
	}
	calls.Store(0)
	var unknown, limited int
	for range 1000 {
		var b [16]byte
		_, _ = rand.Read(b[:])
		cfg.token = hex.EncodeToString(b[:])
		rec := e.from("192.0.2.50", cfg)
		switch rec.Code {
		case 401:
			unknown++
		case 429:
			if limited == 0 {
				// The bucket is at zero, positive again in a moment
				// (the clock stands still here): a failure will then
				// take it to -1, 12 s of refusals.
				expectLimited(t, rec, time.Millisecond)
			}
			limited++
		default:
			t.Fatalf("status %d: %s", rec.Code, rec.Body.String())
		}
	}
	t.Logf("1,000 random tokens from one IP: %d homeserver calls, %d answered 401, %d answered 429", calls.Load(), unknown, limited)
	if calls.Load() != burst || unknown != burst || limited != 1000-burst {
		t.Errorf("calls %d, 401s %d, 429s %d; want %d, %d, %d", calls.Load(), unknown, limited, burst, burst, 1000-burst)
	}
	if got := rejections(e, "rate_failed_auth_ip"); got != 1000-burst {
		t.Errorf("rate_failed_auth_ip = %v", got)
	}
	// A cached valid token still works from the refused address; another
	// address may still try unknown tokens.
	cfg.token = "alice"
	if rec := e.from("192.0.2.50", cfg); rec.Code != 200 {
		t.Errorf("alice from the refused IP: %d", rec.Code)
	}
	cfg.token = "nope"
	if rec := e.from("192.0.2.51", cfg); rec.Code != 401 {
		t.Errorf("unknown token from another IP: %d", rec.Code)
	}
}

func TestRateLimitsValidation(t *testing.T) {
	l := ratelimit.NewMemory(ratelimit.MemoryOptions{})
	for _, tc := range []struct {
		name string
		rl   *RateLimits
		ok   bool
	}{
		{"nil", nil, true},
		{"no rules needs no limiter", &RateLimits{}, true},
		{"rules need a limiter", &RateLimits{Classes: [NumRateClasses]RateRules{RateUpload: {PerIP: perMinute(1)}}}, false},
		{"failed_auth per user", &RateLimits{Limiter: l, Classes: [NumRateClasses]RateRules{RateFailedAuth: {PerUser: perMinute(1)}}}, false},
		{"zero rate", &RateLimits{Limiter: l, Classes: [NumRateClasses]RateRules{RateUpload: {PerIP: ratelimit.Rule{Burst: 1}}}}, false},
		{"invalid network", &RateLimits{Limiter: l, Classes: [NumRateClasses]RateRules{RateUpload: {PerIP: perMinute(1)}}, Exempt: []netip.Prefix{{}}}, false},
		{"per server on upload", &RateLimits{Limiter: l, Classes: [NumRateClasses]RateRules{RateUpload: {PerServer: perMinute(1)}}}, false},
		{"per server on thumbnail", &RateLimits{Limiter: l, Classes: [NumRateClasses]RateRules{RateThumbnail: {PerServer: perMinute(1)}}}, true},
		{"fine", &RateLimits{Limiter: l, Classes: [NumRateClasses]RateRules{RateDownloadBytes: {PerIP: ratelimit.Rule{Rate: 1, Burst: 0.5}}}}, true},
	} {
		if _, err := newSiteLimits(testServer, tc.rl); (err == nil) != tc.ok {
			t.Errorf("%s: err = %v, want ok %v", tc.name, err, tc.ok)
		}
	}
	for c := range NumRateClasses {
		if got, ok := ParseRateClass(c.String()); !ok || got != c {
			t.Errorf("ParseRateClass(%q) = %v, %v", c.String(), got, ok)
		}
	}
}

// BenchmarkRateLimitOverhead measures an authenticated 100 KiB download
// through the handler (discarding writer) with rate limits off and on
// (every class per IP and per user, limits that never trigger, in memory,
// and in a real Redis: one round trip per download): the difference is
// the cost of the limits per request.
func BenchmarkRateLimitOverhead(b *testing.B) {
	high := ratelimit.Rule{Rate: 1e12, Burst: 1e12}
	all := RateLimits{}
	for c := range NumRateClasses {
		all.Classes[c] = RateRules{PerIP: high, PerUser: high}
	}
	all.Classes[RateFailedAuth].PerUser = ratelimit.Rule{}
	for _, tc := range []struct {
		name  string
		rl    *RateLimits
		redis bool
	}{{"off", nil, false}, {"on", &all, false}, {"on_redis", &all, true}} {
		b.Run(tc.name, func(b *testing.B) {
			e, id, content := benchEnv(b)
			if tc.rl != nil {
				rl := *tc.rl
				rl.Limiter = ratelimit.NewMemory(ratelimit.MemoryOptions{})
				if tc.redis {
					srv := testredis.Start(b)
					c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
					b.Cleanup(func() { c.Close() })
					rl.Limiter = ratelimit.NewRedis(c, ratelimit.RedisOptions{OnFailOpen: func(err error) { b.Error(err) }})
				}
				var err error
				if e.site.rate, err = newSiteLimits(testServer, &rl); err != nil {
					b.Fatal(err)
				}
			}
			path := "/_matrix/client/v1/media/download/test/" + id
			b.ReportAllocs()
			b.SetBytes(int64(len(content)))
			var n atomic.Int64
			b.RunParallel(func(pb *testing.PB) {
				i := n.Add(1)
				r := httptest.NewRequest("GET", path, nil)
				r.Header.Set("Authorization", "Bearer alice")
				r = r.WithContext(WithClientIP(r.Context(), netip.AddrFrom4([4]byte{192, 0, 2, byte(i)})))
				w := &discardWriter{}
				for pb.Next() {
					w.h = make(http.Header, 24)
					e.site.ServeHTTP(w, r)
					if w.status != 200 {
						b.Fatalf("status %d", w.status)
					}
				}
			})
		})
	}
}
