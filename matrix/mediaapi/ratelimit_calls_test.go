package mediaapi

import (
	"bytes"
	"context"
	"crypto/rand"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/ratelimit"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// recordingLimiter is a Limiter that records every Take (the buckets'
// class and scope, as "<class>/<scope>", and costs) before passing it on.
type recordingLimiter struct {
	next ratelimit.Limiter
	mu   sync.Mutex
	// takes are the calls: each the bucket names with their costs.
	takes [][]recordedBucket
}

type recordedBucket struct {
	name string // "<class>/<ip|user|server>"
	cost float64
	// force is Bucket.Force.
	force bool
}

func (l *recordingLimiter) Take(ctx context.Context, buckets ...ratelimit.Bucket) ratelimit.Decision {
	rec := make([]recordedBucket, len(buckets))
	for i, b := range buckets {
		// Keys are "<server>\x00<class>\x00<scope>:<who>".
		parts := strings.SplitN(b.Key, "\x00", 3)
		scope, _, _ := strings.Cut(parts[2], ":")
		rec[i] = recordedBucket{name: parts[1] + "/" + scope, cost: b.Cost, force: b.Force}
	}
	l.mu.Lock()
	l.takes = append(l.takes, rec)
	l.mu.Unlock()
	return l.next.Take(ctx, buckets...)
}

// reset forgets the calls so far.
func (l *recordingLimiter) reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.takes = nil
}

// calls returns the calls so far.
func (l *recordingLimiter) calls() [][]recordedBucket {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.takes)
}

// recordingSite gives e's site the rate limits rl on a recording memory
// limiter with its own clock.
func recordingSite(t *testing.T, e *env, rl RateLimits) (*recordingLimiter, *testclock.Clock) {
	t.Helper()
	clock := testclock.New(time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC))
	rec := &recordingLimiter{next: ratelimit.NewMemory(ratelimit.MemoryOptions{Now: clock.Now})}
	rl.Limiter = rec
	var err error
	if e.site.rate, err = newSiteLimits(testServer, &rl); err != nil {
		t.Fatal(err)
	}
	return rec, clock
}

// bothScopes is a RateRules with rule per IP and per user.
func bothScopes(rule ratelimit.Rule) RateRules { return RateRules{PerIP: rule, PerUser: rule} }

// TestRateLimitDownloadOneCall checks that a download with download_bytes
// limited makes one Limiter call naming the request's buckets and its
// bytes' (the bytes of the range served), whatever the media is: local,
// unknown, cached remote; a first remote download makes its admission
// call (remote, download, bytes asked to be positive) and charges the
// bytes streamed.
func TestRateLimitDownloadOneCall(t *testing.T) {
	e, fr := remoteEnv(t)
	high := ratelimit.Rule{Rate: 1e6, Burst: 1e9}
	rec, _ := recordingSite(t, e, RateLimits{Classes: [NumRateClasses]RateRules{
		RateDownload: bothScopes(high), RateDownloadBytes: bothScopes(high), RateRemote: bothScopes(high),
	}})
	local := e.upload("alice", bytes.Repeat([]byte("l"), 1000), "application/octet-stream", "")
	pending := e.create("alice")
	remote := testJPEG(t, 64, 48)
	fr.media["other.test/r"] = remote
	rsize := float64(len(remote))
	dl := func(path string, header map[string]string) req {
		return req{method: "GET", path: "/_matrix/client/v1/media/download/" + path, token: "alice", header: header}
	}
	type b = recordedBucket
	downloadAnd := func(bytes float64) []b {
		return []b{{name: "download/ip", cost: 1}, {name: "download/user", cost: 1}, {name: "download_bytes/ip", cost: bytes}, {name: "download_bytes/user", cost: bytes}}
	}
	tests := []struct {
		name   string
		r      req
		status int
		want   [][]b
	}{
		{"local", dl("test/"+local, nil), 200, [][]b{downloadAnd(1000)}},
		{"local range", dl("test/"+local, map[string]string{"Range": "bytes=10-19"}), 206, [][]b{downloadAnd(10)}},
		{"unknown", dl("test/nope", nil), 404, [][]b{{{name: "download/ip", cost: 1}, {name: "download/user", cost: 1}}}},
		// Charged before waiting (its bytes bucket asked to be positive):
		// a refused client does not wait.
		{"pending", dl("test/"+pending+"?timeout_ms=0", nil), 504, [][]b{
			{{name: "download/ip", cost: 1}, {name: "download/user", cost: 1}, {name: "download_bytes/ip"}, {name: "download_bytes/user"}},
		}},
		{"first remote, streamed", dl("other.test/r", nil), 200, [][]b{
			{{name: "remote/ip", cost: 1}, {name: "remote/user", cost: 1}, {name: "download/ip", cost: 1}, {name: "download/user", cost: 1},
				{name: "download_bytes/ip"}, {name: "download_bytes/user"}},
			{{name: "download_bytes/ip", cost: rsize, force: true}, {name: "download_bytes/user", cost: rsize, force: true}},
		}},
		{"cached remote", dl("other.test/r", nil), 200, [][]b{downloadAnd(rsize)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec.reset()
			got := e.from("192.0.2.1", tc.r)
			if got.Code != tc.status {
				t.Fatalf("status %d, want %d: %s", got.Code, tc.status, got.Body.String())
			}
			if calls := rec.calls(); !slices.EqualFunc(calls, tc.want, slices.Equal) {
				t.Errorf("limiter calls:\n got %v\nwant %v", calls, tc.want)
			}
		})
	}
}

// TestRateLimitNoBucketDropped checks that a check charges every bucket it
// names, also beyond maxCheckBuckets: every class, per IP, per user and per
// server.
func TestRateLimitNoBucketDropped(t *testing.T) {
	e := newEnv(t)
	high := ratelimit.Rule{Rate: 1, Burst: 1e9}
	all := RateLimits{}
	for c := range NumRateClasses {
		all.Classes[c] = bothScopes(high)
	}
	all.Classes[RateFailedAuth].PerUser = ratelimit.Rule{}
	all.Classes[RateDownload].PerServer = high
	all.Classes[RateThumbnail].PerServer = high
	rec, _ := recordingSite(t, e, all)
	r := httptest.NewRequest("GET", "/", nil)
	r = r.WithContext(WithClientIP(r.Context(), netip.MustParseAddr("192.0.2.1")))
	user := &auth.User{UserID: "@alice:test"}

	tests := []struct {
		name   string
		origin string
		costs  []rateCost
		want   int
	}{
		// The largest check a request makes: a download's admission of a
		// remote fetch.
		{"remote admission", "", []rateCost{{class: RateRemote, cost: 1}, {class: RateDownload, cost: 1}, {class: RateDownloadBytes}}, maxCheckBuckets},
		{"every class", "", func() []rateCost {
			var cs []rateCost
			for c := range NumRateClasses {
				cs = append(cs, rateCost{class: c, cost: 1})
			}
			return cs
		}(), 2*int(NumRateClasses) - 1},
		{"federation", "remote.test", []rateCost{{class: RateDownload, cost: 1}, {class: RateThumbnail, cost: 1}}, 4},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec.reset()
			u := user
			if tc.origin != "" {
				u = nil
			}
			if merr := e.site.checkRate(r, u, tc.origin, tc.costs); merr != nil {
				t.Fatal(merr)
			}
			calls := rec.calls()
			if len(calls) != 1 || len(calls[0]) != tc.want {
				t.Fatalf("calls %v, want one of %d buckets", calls, tc.want)
			}
		})
	}
}

// TestRateLimitRemoteAdmissionAllocs checks that limiting remote fetches
// costs a download of local media no allocation: the admission is made
// from the resolve options, not a closure built per request.
func TestRateLimitRemoteAdmissionAllocs(t *testing.T) {
	e := newEnv(t)
	id := e.upload("alice", []byte("some content"), "text/plain", "")
	r := httptest.NewRequest("GET", "/_matrix/client/v1/media/download/test/"+id, nil)
	r.Header.Set("Authorization", "Bearer alice")
	r = r.WithContext(WithClientIP(r.Context(), netip.MustParseAddr("192.0.2.1")))
	perMin := perMinute(1)
	allocs := func(class RateClass) float64 {
		rl := &RateLimits{Limiter: ratelimit.NewMemory(ratelimit.MemoryOptions{})}
		rl.Classes[class] = bothScopes(perMin)
		var err error
		if e.site.rate, err = newSiteLimits(testServer, rl); err != nil {
			t.Fatal(err)
		}
		w := &discardWriter{}
		return testing.AllocsPerRun(200, func() {
			w.h = make(http.Header, 24)
			e.site.ServeHTTP(w, r)
			if w.status != 200 {
				t.Fatalf("status %d", w.status)
			}
		})
	}
	// Neither class applies to a local download: the same work.
	preview, remote := allocs(RatePreview), allocs(RateRemote)
	if remote != preview {
		t.Errorf("allocations per download: %v with remote fetches limited, %v with previews limited", remote, preview)
	}
}

// TestRateLimitStreamedRemoteBytes checks that the first download of remote
// media, streamed while it is fetched, is charged to download_bytes like
// any download.
func TestRateLimitStreamedRemoteBytes(t *testing.T) {
	e, fr := remoteEnv(t)
	_, _ = recordingSite(t, e, RateLimits{Classes: [NumRateClasses]RateRules{
		RateDownloadBytes: {PerIP: ratelimit.Rule{Rate: 100, Burst: 1000}},
	}})
	photo := testJPEG(t, 640, 480)
	fr.media["other.test/big"] = photo
	small := e.upload("alice", []byte("s"), "text/plain", "")
	get := func(path string) req {
		return req{method: "GET", path: "/_matrix/client/v1/media/download/" + path, token: "alice"}
	}
	if rec := e.from("203.0.113.5", get("other.test/big")); rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), photo) {
		t.Fatalf("streamed download: %d, %d bytes", rec.Code, rec.Body.Len())
	}
	// Level 1000 - len(photo): that long at 100 bytes/s to be positive.
	wait := time.Duration(float64(len(photo)-1000)/100*float64(time.Second)) + 1
	expectLimited(t, e.from("203.0.113.5", get("test/"+small)), wait)
	if got := rejections(e, "rate_download_bytes_ip"); got != 1 {
		t.Errorf("rate_download_bytes_ip = %v", got)
	}
}

// originKeys serves the keys of several remote servers.
type originKeys map[string]xmatrix.SigningKey

func (o originKeys) FetchKeys(_ context.Context, origin string, _ []string) (map[string]xmatrix.ServerKey, error) {
	key, ok := o[origin]
	if !ok {
		return nil, nil
	}
	return map[string]xmatrix.ServerKey{key.ID: {Public: key.Public(), ValidUntil: time.Now().Add(time.Hour)}}, nil
}

// TestRateLimitFederation checks the limits of the federation media
// endpoints: per verified origin server and per client IP, with the
// download and thumbnail classes; unverified requests are not charged.
func TestRateLimitFederation(t *testing.T) {
	keys := originKeys{}
	for _, o := range []string{"a.test", "b.test", "c.test"} {
		k, err := xmatrix.GenerateSigningKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		keys[o] = k
	}
	v, err := xmatrix.NewVerifier(xmatrix.VerifierOptions{Names: []string{testServer}, Fetcher: keys})
	if err != nil {
		t.Fatal(err)
	}
	g, err := newTestGenerator()
	if err != nil {
		t.Fatal(err)
	}
	e, _ := rateEnv(t, RateLimits{Classes: [NumRateClasses]RateRules{
		RateDownload:  {PerServer: perMinute(2), PerIP: perMinute(3)},
		RateThumbnail: {PerServer: perMinute(1)},
	}}, func(c *SiteConfig, o *RepositoryOptions) {
		c.Federation = &FederationConfig{Verifier: v}
		o.Thumbnailer = g
	})
	id := e.upload("alice", testJPEG(t, 64, 48), "image/jpeg", "")
	download := "/_matrix/federation/v1/media/download/" + id
	thumbnail := "/_matrix/federation/v1/media/thumbnail/" + id + "?width=32&height=32&method=scale"
	steps := []struct {
		origin string // "" unsigned
		ip     string
		uri    string
		status int
		retry  time.Duration
	}{
		{"a.test", "192.0.2.1", download, 200, 0},
		{"a.test", "192.0.2.2", download, 200, 0},
		// a.test's bucket is empty, whatever its address.
		{"a.test", "192.0.2.3", download, 429, 30 * time.Second},
		{"b.test", "192.0.2.1", download, 200, 0},
		{"b.test", "192.0.2.1", download, 200, 0},
		// 192.0.2.1's bucket is empty, whatever the server.
		{"c.test", "192.0.2.1", download, 429, 20 * time.Second},
		// Thumbnails have their own buckets.
		{"a.test", "192.0.2.4", thumbnail, 200, 0},
		{"a.test", "192.0.2.4", thumbnail, 429, time.Minute},
		// Unverified requests are refused before any bucket.
		{"", "192.0.2.5", download, 401, 0},
		{"", "192.0.2.5", download, 401, 0},
		{"", "192.0.2.5", download, 401, 0},
		{"", "192.0.2.5", download, 401, 0},
		{"c.test", "192.0.2.5", download, 200, 0},
	}
	for i, s := range steps {
		r := httptest.NewRequest("GET", "http://media.test"+s.uri, nil)
		r.RequestURI = s.uri
		if s.origin != "" {
			h, err := xmatrix.SignRequest("GET", s.uri, s.origin, testServer, nil, keys[s.origin])
			if err != nil {
				t.Fatal(err)
			}
			r.Header.Set("Authorization", h)
		}
		r = r.WithContext(WithClientIP(r.Context(), netip.MustParseAddr(s.ip)))
		rec := httptest.NewRecorder()
		e.site.ServeHTTP(rec, r)
		if rec.Code != s.status {
			t.Fatalf("step %d: status %d, want %d: %s", i, rec.Code, s.status, rec.Body.String())
		}
		if s.status == 429 {
			expectLimited(t, rec, s.retry)
		}
	}
	for reason, want := range map[string]float64{"rate_download_server": 1, "rate_download_ip": 1, "rate_thumbnail_server": 1} {
		if got := rejections(e, reason); got != want {
			t.Errorf("limit_rejections_total{reason=%q} = %v, want %v", reason, got, want)
		}
	}
}
