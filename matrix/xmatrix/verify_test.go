package xmatrix

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
)

// fakeFetcher serves fixed keys and counts calls.
type fakeFetcher struct {
	mu    sync.Mutex
	keys  map[string]map[string]ServerKey
	err   error
	calls atomic.Int32
	gate  chan struct{} // when set, FetchKeys waits for it to close
}

func (f *fakeFetcher) FetchKeys(ctx context.Context, origin string, keyIDs []string) (map[string]ServerKey, error) {
	f.calls.Add(1)
	if f.gate != nil {
		<-f.gate
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	out := map[string]ServerKey{}
	for id, k := range f.keys[origin] {
		out[id] = k
	}
	return out, nil
}

var testEpoch = time.Date(2023, 6, 1, 0, 0, 0, 0, time.UTC)

// newTestVerifier returns a verifier for media.example.org that knows the
// spec test key of "domain", valid for validFor after the clock's start.
func newTestVerifier(t *testing.T, validFor time.Duration) (*Verifier, *fakeFetcher, *testclock.Clock) {
	t.Helper()
	clock := testclock.New(testEpoch)
	k := testKey(t)
	f := &fakeFetcher{keys: map[string]map[string]ServerKey{
		testServer: {testKeyID: {Public: k.Public(), ValidUntil: testEpoch.Add(validFor)}},
	}}
	v, err := NewVerifier(VerifierOptions{
		Names:   []string{testDest, "alt.example.org"},
		Fetcher: f,
		Now:     clock.Now,
	})
	if err != nil {
		t.Fatal(err)
	}
	return v, f, clock
}

func request(method, target, host string, body string, auth ...string) *http.Request {
	var r *http.Request
	if body == "" {
		r = httptest.NewRequest(method, target, nil)
	} else {
		r = httptest.NewRequest(method, target, strings.NewReader(body))
	}
	r.Host = host
	for _, a := range auth {
		r.Header.Add("Authorization", a)
	}
	return r
}

func vectorHeader() string {
	return `X-Matrix origin="domain",destination="media.example.org",key="ed25519:1",sig="` + downloadSig + `"`
}

func TestVerify(t *testing.T) {
	k := testKey(t)
	other, _ := GenerateSigningKey(fixedReader(9))
	signed := func(method, uri, dest string, body []byte, key SigningKey) string {
		h, err := SignRequest(method, uri, testServer, dest, body, key)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	noDest := func(h string) string {
		return strings.Replace(h, `destination="media.example.org",`, "", 1)
	}
	tests := []struct {
		name    string
		req     *http.Request
		rawURI  string
		body    string
		wantErr error
		status  int
	}{
		{name: "valid vector", req: request("GET", downloadURI, testDest, "", vectorHeader())},
		{name: "valid thumbnail vector", req: request("GET", thumbnailURI, testDest, "",
			`X-Matrix origin="domain",destination="media.example.org",key="ed25519:1",sig="`+thumbnailSig+`"`)},
		{name: "re-ordered, unquoted, mixed case", req: request("GET", downloadURI, testDest, "",
			"x-matrix  SIG="+downloadSig+" ,\tKey=ed25519:1, Destination=media.example.org,ORIGIN=domain,extra=1")},
		{name: "explicit raw URI", req: request("GET", "/other", testDest, "", vectorHeader()), rawURI: downloadURI},
		{name: "no destination, host is ours", req: request("GET", downloadURI, testDest, "", noDest(vectorHeader()))},
		{name: "no destination, host unknown, name list tried", req: request("GET", downloadURI, "10.0.0.1:8448", "", noDest(vectorHeader()))},
		{name: "second header valid", req: request("GET", downloadURI, testDest, "",
			`X-Matrix origin="domain",destination="media.example.org",key="ed25519:1",sig="`+thumbnailSig+`"`, vectorHeader())},
		{name: "malformed then valid", req: request("GET", downloadURI, testDest, "", `X-Matrix origin=`, vectorHeader())},
		{name: "bearer ignored", req: request("GET", downloadURI, testDest, "", "Bearer abc", vectorHeader())},
		{name: "trailing bare question mark", req: request("GET", "/_matrix/federation/v1/media/download/x?", testDest, "",
			signed("GET", "/_matrix/federation/v1/media/download/x", testDest, nil, k))},
		{name: "json body", req: request("POST", "/_matrix/federation/v1/x", testDest, "", signed("POST", "/_matrix/federation/v1/x", testDest, []byte(`{"a":[1,"b"]}`), k)),
			body: `{ "a" : [ 1, "b" ] }`},

		{name: "missing", req: request("GET", downloadURI, testDest, ""), wantErr: ErrMissingAuth, status: 401},
		{name: "only bearer", req: request("GET", downloadURI, testDest, "", "Bearer abc"), wantErr: ErrMissingAuth, status: 401},
		{name: "malformed", req: request("GET", downloadURI, testDest, "", `X-Matrix origin="domain",key="ed25519:1"`), wantErr: ErrMalformedAuth, status: 400},
		{name: "wrong destination", req: request("GET", downloadURI, testDest, "",
			strings.Replace(vectorHeader(), "media.example.org", "evil.example.org", 1)), wantErr: ErrWrongDestination, status: 401},
		{name: "other of our names, signed for the first", req: request("GET", downloadURI, testDest, "",
			strings.Replace(vectorHeader(), "media.example.org", "alt.example.org", 1)), wantErr: ErrBadSignature, status: 401},
		{name: "tampered uri", req: request("GET", strings.Replace(downloadURI, "abc123", "abc124", 1), testDest, "", vectorHeader()), wantErr: ErrBadSignature, status: 401},
		{name: "tampered query", req: request("GET", downloadURI+"0", testDest, "", vectorHeader()), wantErr: ErrBadSignature, status: 401},
		{name: "wrong method", req: request("HEAD", downloadURI, testDest, "", vectorHeader()), wantErr: ErrBadSignature, status: 401},
		{name: "signed by another key with our key id", req: request("GET", downloadURI, testDest, "",
			signed("GET", downloadURI, testDest, nil, SigningKey{ID: testKeyID, Private: other.Private})), wantErr: ErrBadSignature, status: 401},
		{name: "tampered body", req: request("POST", "/_matrix/federation/v1/x", testDest, "", signed("POST", "/_matrix/federation/v1/x", testDest, []byte(`{"a":1}`), k)),
			body: `{"a":2}`, wantErr: ErrBadSignature, status: 401},
		{name: "body not JSON", req: request("POST", "/_matrix/federation/v1/x", testDest, "", signed("POST", "/_matrix/federation/v1/x", testDest, nil, k)),
			body: `not json`, wantErr: ErrBadSignature, status: 401},
		{name: "signature not base64", req: request("GET", downloadURI, testDest, "",
			`X-Matrix origin="domain",destination="media.example.org",key="ed25519:1",sig="***"`), wantErr: ErrBadSignature, status: 401},
		{name: "unknown key id", req: request("GET", downloadURI, testDest, "",
			strings.Replace(vectorHeader(), `key="ed25519:1"`, `key="ed25519:2"`, 1)), wantErr: ErrNoKey, status: 401},
		{name: "unknown origin", req: request("GET", downloadURI, testDest, "",
			strings.Replace(vectorHeader(), `origin="domain"`, `origin="elsewhere.org"`, 1)), wantErr: ErrNoKey, status: 401},
		{name: "other algorithm", req: request("GET", downloadURI, testDest, "",
			strings.Replace(vectorHeader(), `key="ed25519:1"`, `key="curve25519:1"`, 1)), wantErr: ErrNoKey, status: 401},
		{name: "first well-formed error wins over malformed", req: request("GET", downloadURI, testDest, "",
			`X-Matrix origin=`, strings.Replace(vectorHeader(), "media.example.org", "evil.example.org", 1)), wantErr: ErrWrongDestination, status: 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, _, _ := newTestVerifier(t, time.Hour)
			var body []byte
			if tt.body != "" {
				body = []byte(tt.body)
			}
			origin, err := v.Verify(context.Background(), tt.req, tt.rawURI, body)
			if tt.wantErr == nil {
				if err != nil || origin != testServer {
					t.Fatalf("Verify = %q, %v; want %q", origin, err, testServer)
				}
				return
			}
			if !errors.Is(err, tt.wantErr) || origin != "" {
				t.Fatalf("Verify = %q, %v; want %v", origin, err, tt.wantErr)
			}
			if got := StatusCode(err); got != tt.status {
				t.Fatalf("StatusCode = %d, want %d", got, tt.status)
			}
		})
	}
}

func TestVerifyServerNamesFunc(t *testing.T) {
	k := testKey(t)
	f := &fakeFetcher{keys: map[string]map[string]ServerKey{
		testServer: {testKeyID: {Public: k.Public(), ValidUntil: testEpoch.Add(time.Hour)}},
	}}
	v, err := NewVerifier(VerifierOptions{
		ServerNames: func(n string) bool { return n == testDest },
		Fetcher:     f,
		Now:         func() time.Time { return testEpoch },
	})
	if err != nil {
		t.Fatal(err)
	}
	if o, err := v.Verify(context.Background(), request("GET", downloadURI, testDest, "", vectorHeader()), "", nil); err != nil || o != testServer {
		t.Fatalf("Verify = %q, %v", o, err)
	}
	noDest := strings.Replace(vectorHeader(), `destination="media.example.org",`, "", 1)
	if o, err := v.Verify(context.Background(), request("GET", downloadURI, testDest, "", noDest), "", nil); err != nil || o != testServer {
		t.Fatalf("Verify without destination = %q, %v", o, err)
	}
	if _, err := v.Verify(context.Background(), request("GET", downloadURI, "other.example", "", noDest), "", nil); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("Verify without destination on a foreign host = %v, want ErrBadSignature", err)
	}
}

func TestNewVerifierRequiresOptions(t *testing.T) {
	if _, err := NewVerifier(VerifierOptions{Names: []string{"a"}}); err == nil {
		t.Fatal("no fetcher accepted")
	}
	if _, err := NewVerifier(VerifierOptions{Fetcher: &fakeFetcher{}}); err == nil {
		t.Fatal("no names accepted")
	}
}

func TestVerifyKeyCache(t *testing.T) {
	ctx := context.Background()
	ok := func(v *Verifier) error {
		_, err := v.Verify(ctx, request("GET", downloadURI, testDest, "", vectorHeader()), "", nil)
		return err
	}
	unknown := strings.Replace(vectorHeader(), `key="ed25519:1"`, `key="ed25519:2"`, 1)

	t.Run("hit", func(t *testing.T) {
		v, f, _ := newTestVerifier(t, time.Hour)
		for i := 0; i < 2; i++ {
			if err := ok(v); err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
		}
		if n := f.calls.Load(); n != 1 {
			t.Fatalf("fetcher called %d times, want 1", n)
		}
	})
	t.Run("expired key", func(t *testing.T) {
		v, f, _ := newTestVerifier(t, -time.Minute)
		if err := ok(v); !errors.Is(err, ErrNoKey) {
			t.Fatalf("Verify = %v, want ErrNoKey", err)
		}
		if !strings.Contains(fmt.Sprint(ok(v)), "expired") {
			t.Fatal("expiry not mentioned")
		}
		if n := f.calls.Load(); n != 1 {
			t.Fatalf("negative result not cached: %d calls", n)
		}
	})
	t.Run("key expires in cache", func(t *testing.T) {
		v, f, clock := newTestVerifier(t, time.Hour)
		if err := ok(v); err != nil {
			t.Fatal(err)
		}
		clock.Advance(61 * time.Minute)
		if err := ok(v); !errors.Is(err, ErrNoKey) {
			t.Fatalf("Verify after expiry = %v, want ErrNoKey", err)
		}
		if n := f.calls.Load(); n != 2 {
			t.Fatalf("fetcher called %d times, want 2 (refetch after expiry)", n)
		}
	})
	t.Run("cache lifetime capped at seven days", func(t *testing.T) {
		v, f, clock := newTestVerifier(t, 30*24*time.Hour)
		if err := ok(v); err != nil {
			t.Fatal(err)
		}
		clock.Advance(6 * 24 * time.Hour)
		if err := ok(v); err != nil || f.calls.Load() != 1 {
			t.Fatalf("day 6: %v, %d calls", err, f.calls.Load())
		}
		clock.Advance(2 * 24 * time.Hour)
		if err := ok(v); err != nil || f.calls.Load() != 2 {
			t.Fatalf("day 8: %v, %d calls (want a refetch)", err, f.calls.Load())
		}
	})
	t.Run("negative cache", func(t *testing.T) {
		v, f, clock := newTestVerifier(t, time.Hour)
		for i := 0; i < 3; i++ {
			if _, err := v.Verify(ctx, request("GET", downloadURI, testDest, "", unknown), "", nil); !errors.Is(err, ErrNoKey) {
				t.Fatalf("Verify = %v, want ErrNoKey", err)
			}
		}
		if n := f.calls.Load(); n != 1 {
			t.Fatalf("fetcher called %d times, want 1", n)
		}
		clock.Advance(2 * time.Minute)
		if _, err := v.Verify(ctx, request("GET", downloadURI, testDest, "", unknown), "", nil); !errors.Is(err, ErrNoKey) {
			t.Fatal(err)
		}
		if n := f.calls.Load(); n != 2 {
			t.Fatalf("negative entry not expired: %d calls", n)
		}
		// The known key of the same origin was learnt by the fetch.
		if err := ok(v); err != nil || f.calls.Load() != 2 {
			t.Fatalf("known key: %v, %d calls", err, f.calls.Load())
		}
	})
	t.Run("fetch error cached briefly", func(t *testing.T) {
		v, f, clock := newTestVerifier(t, time.Hour)
		f.err = errors.New("connection refused")
		if err := ok(v); !errors.Is(err, ErrNoKey) || !strings.Contains(err.Error(), "connection refused") {
			t.Fatalf("Verify = %v", err)
		}
		f.mu.Lock()
		f.err = nil
		f.mu.Unlock()
		if err := ok(v); !errors.Is(err, ErrNoKey) {
			t.Fatalf("failure not cached: %v", err)
		}
		clock.Advance(2 * time.Minute)
		if err := ok(v); err != nil {
			t.Fatalf("after negative TTL: %v", err)
		}
		if n := f.calls.Load(); n != 2 {
			t.Fatalf("fetcher called %d times, want 2", n)
		}
	})
	t.Run("cancelled fetch not cached", func(t *testing.T) {
		v, f, _ := newTestVerifier(t, time.Hour)
		f.err = context.Canceled
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := v.Verify(cctx, request("GET", downloadURI, testDest, "", vectorHeader()), "", nil); !errors.Is(err, ErrNoKey) {
			t.Fatalf("Verify = %v", err)
		}
		f.mu.Lock()
		f.err = nil
		f.mu.Unlock()
		if err := ok(v); err != nil {
			t.Fatalf("cancellation was cached: %v", err)
		}
	})
	t.Run("singleflight", func(t *testing.T) {
		v, f, _ := newTestVerifier(t, time.Hour)
		f.gate = make(chan struct{})
		var wg sync.WaitGroup
		errs := make(chan error, 20)
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- ok(v)
			}()
		}
		// Wait until the first fetch is in progress, then let it finish.
		deadline := time.Now().Add(5 * time.Second)
		for f.calls.Load() == 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(20 * time.Millisecond)
		close(f.gate)
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if n := f.calls.Load(); n != 1 {
			t.Fatalf("fetcher called %d times, want 1", n)
		}
	})
	t.Run("a small cache keeps the key asked for", func(t *testing.T) {
		// The origin publishes many keys at once; the one that signed the
		// request must survive storing its siblings (before, it was stored
		// in map order and a later sibling could evict it: a second
		// request then fetched again).
		k := testKey(t)
		keys := map[string]ServerKey{testKeyID: {Public: k.Public(), ValidUntil: testEpoch.Add(time.Hour)}}
		for i := range 8 {
			other, _ := GenerateSigningKey(fixedReader(byte(20 + i)))
			keys[fmt.Sprintf("ed25519:sib%d", i)] = ServerKey{Public: other.Public(), ValidUntil: testEpoch.Add(time.Hour)}
		}
		f := &fakeFetcher{keys: map[string]map[string]ServerKey{testServer: keys}}
		v, err := NewVerifier(VerifierOptions{Names: []string{testDest}, Fetcher: f, CacheSize: 2, Now: func() time.Time { return testEpoch }})
		if err != nil {
			t.Fatal(err)
		}
		for i := range 2 {
			if _, err := v.Verify(ctx, request("GET", downloadURI, testDest, "", vectorHeader()), "", nil); err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
		}
		if n := f.calls.Load(); n != 1 {
			t.Fatalf("fetcher called %d times, want 1 (the key asked for was evicted)", n)
		}
	})
	t.Run("bounded", func(t *testing.T) {
		f := &fakeFetcher{}
		v, err := NewVerifier(VerifierOptions{Names: []string{testDest}, Fetcher: f, CacheSize: 3, Now: func() time.Time { return testEpoch }})
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 10; i++ {
			h := strings.Replace(vectorHeader(), `origin="domain"`, fmt.Sprintf(`origin="s%d.example"`, i), 1)
			if _, err := v.Verify(ctx, request("GET", downloadURI, testDest, "", h), "", nil); !errors.Is(err, ErrNoKey) {
				t.Fatal(err)
			}
		}
		n := v.cache.entries.Len()
		if n > 3 {
			t.Fatalf("cache holds %d entries, limit 3", n)
		}
		if f.calls.Load() != 10 {
			t.Fatalf("fetcher called %d times, want 10", f.calls.Load())
		}
	})
}

func TestParseServerKeys(t *testing.T) {
	before := time.UnixMilli(1690000000000)
	keys, err := ParseServerKeys([]byte(keyServerJSON), testServer, before)
	if err != nil {
		t.Fatalf("vector: %v", err)
	}
	k, ok := keys[testKeyID]
	if !ok || len(keys) != 1 || !k.Public.Equal(testKey(t).Public()) || !k.ValidUntil.Equal(time.UnixMilli(1700000000000)) {
		t.Fatalf("vector keys %+v", keys)
	}

	spec := testKey(t)
	second, _ := GenerateSigningKey(fixedReader(20))
	stranger, _ := GenerateSigningKey(fixedReader(21))
	build := func(mutate func(obj map[string]any), signers ...SigningKey) []byte {
		obj := map[string]any{
			"server_name":    testServer,
			"valid_until_ts": int64(1700000000000),
			"verify_keys": map[string]any{
				spec.ID:        map[string]any{"key": spec.PublicBase64()},
				second.ID:      map[string]any{"key": second.PublicBase64()},
				"curve25519:x": map[string]any{"key": "ignored"},
			},
			"old_verify_keys": map[string]any{
				stranger.ID: map[string]any{"key": stranger.PublicBase64(), "expired_ts": 1},
			},
		}
		for _, s := range signers {
			if err := SignJSON(obj, testServer, s); err != nil {
				t.Fatal(err)
			}
		}
		if mutate != nil {
			mutate(obj)
		}
		raw, err := json.Marshal(obj)
		if err != nil {
			t.Fatal(err)
		}
		return raw
	}
	tests := []struct {
		name     string
		raw      []byte
		server   string
		now      time.Time
		wantErr  string
		wantKeys int
	}{
		{"signed by one of two keys", build(nil, second), testServer, before, "", 2},
		{"signed by both", build(nil, spec, second), testServer, before, "", 2},
		{"wrong server_name", []byte(keyServerJSON), "other.example", before, "server_name", 0},
		{"bad self-signature", []byte(strings.Replace(keyServerJSON, "1700000000000", "1700000000001", 1)), testServer, before, "does not match", 0},
		{"signature by old key only", build(nil, stranger), testServer, before, "no signature", 0},
		{"signed by another server only", build(func(o map[string]any) {
			o["signatures"] = map[string]any{"other": o["signatures"].(map[string]any)[testServer]}
		}, spec), testServer, before, "no signature", 0},
		{"unsigned", build(nil), testServer, before, "no signature", 0},
		{"expired", []byte(keyServerJSON), testServer, time.UnixMilli(1700000000000), "expired", 0},
		{"missing valid_until_ts", build(func(o map[string]any) { delete(o, "valid_until_ts") }, spec), testServer, before, "valid_until_ts", 0},
		{"float valid_until_ts", []byte(strings.Replace(keyServerJSON, "1700000000000", "1700000000000.5", 1)), testServer, before, "valid_until_ts", 0},
		{"bad verify key", build(func(o map[string]any) {
			o["verify_keys"].(map[string]any)["ed25519:bad"] = map[string]any{"key": "abc"}
		}, spec), testServer, before, "ed25519:bad", 0},
		{"no verify keys", build(func(o map[string]any) { o["verify_keys"] = map[string]any{} }), testServer, before, "no ed25519", 0},
		{"not an object", []byte(`[]`), testServer, before, "not a JSON object", 0},
		{"not JSON", []byte(`{`), testServer, before, "parsing", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := ParseServerKeys(tt.raw, tt.server, tt.now)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseServerKeys = %v, %v; want error containing %q", keys, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseServerKeys: %v", err)
			}
			if len(keys) != tt.wantKeys {
				t.Fatalf("got %d keys, want %d: %v", len(keys), tt.wantKeys, keys)
			}
			if _, ok := keys[stranger.ID]; ok {
				t.Fatal("old_verify_keys returned")
			}
		})
	}
}

// keyServer serves signed /_matrix/key/v2/server responses for name.
func keyServer(t *testing.T, name string, key SigningKey, hits *atomic.Int32) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if r.URL.Path != "/_matrix/key/v2/server" || r.Method != http.MethodGet {
			http.NotFound(w, r)
			return
		}
		obj := map[string]any{
			"server_name":     name,
			"valid_until_ts":  time.Now().Add(time.Hour).UnixMilli(),
			"verify_keys":     map[string]any{key.ID: map[string]any{"key": key.PublicBase64()}},
			"old_verify_keys": map[string]any{},
		}
		if err := SignJSON(obj, name, key); err != nil {
			t.Error(err)
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(obj)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestDirectKeyFetcher(t *testing.T) {
	const remote = "remote.test"
	key, _ := GenerateSigningKey(fixedReader(30))
	var hits atomic.Int32
	srv := keyServer(t, remote, key, &hits)
	fetcher := &DirectKeyFetcher{
		Client: srv.Client(),
		BaseURL: func(ctx context.Context, name string) (string, error) {
			if name != remote && name != "liar.test" {
				return "", fmt.Errorf("unknown server %s", name)
			}
			return srv.URL, nil
		},
	}
	keys, err := fetcher.FetchKeys(context.Background(), remote, []string{key.ID})
	if err != nil {
		t.Fatalf("FetchKeys: %v", err)
	}
	if k, ok := keys[key.ID]; !ok || !k.Public.Equal(key.Public()) || !k.ValidUntil.After(time.Now()) {
		t.Fatalf("keys %+v", keys)
	}
	// The key server speaks for remote.test, not liar.test.
	if _, err := fetcher.FetchKeys(context.Background(), "liar.test", nil); err == nil || !strings.Contains(err.Error(), "server_name") {
		t.Fatalf("FetchKeys for the wrong server = %v", err)
	}
	if _, err := fetcher.FetchKeys(context.Background(), "unknown.test", nil); err == nil {
		t.Fatal("resolution error ignored")
	}
	notFound := &DirectKeyFetcher{Client: srv.Client(), BaseURL: func(context.Context, string) (string, error) { return srv.URL + "/nowhere", nil }}
	if _, err := notFound.FetchKeys(context.Background(), remote, nil); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("404 = %v", err)
	}

	// End to end: a verifier backed by the direct fetcher.
	v, err := NewVerifier(VerifierOptions{Names: []string{testDest}, Fetcher: fetcher})
	if err != nil {
		t.Fatal(err)
	}
	hits.Store(0)
	for i := 0; i < 2; i++ {
		h, err := SignRequest("GET", downloadURI, remote, testDest, nil, key)
		if err != nil {
			t.Fatal(err)
		}
		origin, err := v.Verify(context.Background(), request("GET", downloadURI, testDest, "", h), "", nil)
		if err != nil || origin != remote {
			t.Fatalf("Verify = %q, %v", origin, err)
		}
	}
	if n := hits.Load(); n != 1 {
		t.Fatalf("key server hit %d times, want 1", n)
	}
	forged, _ := GenerateSigningKey(fixedReader(31))
	forged.ID = key.ID
	h, _ := SignRequest("GET", downloadURI, remote, testDest, nil, forged)
	if _, err := v.Verify(context.Background(), request("GET", downloadURI, testDest, "", h), "", nil); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("forged request: %v, want ErrBadSignature", err)
	}
}

// Compile-time check that DirectKeyFetcher is a KeyFetcher.
var _ KeyFetcher = (*DirectKeyFetcher)(nil)

// Compile-time check of ServerKey's public key type.
var _ ed25519.PublicKey = ServerKey{}.Public
