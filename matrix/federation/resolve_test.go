package federation

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
)

// fakeDNS serves SRV and A/AAAA answers from maps.
type fakeDNS struct {
	srv map[string][]*net.SRV // key "_service._proto.name"
	ips map[string][]string
}

func (f *fakeDNS) lookupSRV(_ context.Context, service, proto, name string) (string, []*net.SRV, error) {
	key := "_" + service + "._" + proto + "." + name
	recs, ok := f.srv[key]
	if !ok {
		return "", nil, &net.DNSError{Err: "no such host", Name: key, IsNotFound: true}
	}
	return key + ".", recs, nil
}

func (f *fakeDNS) lookupIPAddr(_ context.Context, host string) ([]net.IPAddr, error) {
	ss, ok := f.ips[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	var out []net.IPAddr
	for _, s := range ss {
		out = append(out, net.IPAddr{IP: net.ParseIP(s)})
	}
	return out, nil
}

func (f *fakeDNS) funcs() LookupFuncs {
	return LookupFuncs{LookupSRV: f.lookupSRV, LookupIPAddr: f.lookupIPAddr}
}

// wellKnownServer is an httptest TLS server answering
// /.well-known/matrix/server per Host and counting requests per Host.
type wellKnownServer struct {
	srv *httptest.Server

	mu      sync.Mutex
	answers map[string]func(w http.ResponseWriter, r *http.Request)
	hits    map[string]int
}

func newWellKnownServer(t *testing.T) *wellKnownServer {
	t.Helper()
	wk := &wellKnownServer{answers: map[string]func(http.ResponseWriter, *http.Request){}, hits: map[string]int{}}
	wk.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		wk.mu.Lock()
		wk.hits[r.Host]++
		h := wk.answers[r.Host]
		wk.mu.Unlock()
		if h == nil {
			http.NotFound(w, r)
			return
		}
		h(w, r)
	}))
	wk.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	wk.srv.StartTLS()
	t.Cleanup(wk.srv.Close)
	return wk
}

// set installs the handler for one host.
func (wk *wellKnownServer) set(host string, h func(w http.ResponseWriter, r *http.Request)) {
	wk.mu.Lock()
	defer wk.mu.Unlock()
	wk.answers[host] = h
}

// json answers with a fixed body, content type and Cache-Control.
func jsonAnswer(body, contentType, cacheControl string) func(http.ResponseWriter, *http.Request) {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/.well-known/matrix/server" {
			http.NotFound(w, r)
			return
		}
		if contentType != "" {
			w.Header().Set("Content-Type", contentType)
		}
		if cacheControl != "" {
			w.Header().Set("Cache-Control", cacheControl)
		}
		io.WriteString(w, body)
	}
}

func (wk *wellKnownServer) hitCount(host string) int {
	wk.mu.Lock()
	defer wk.mu.Unlock()
	return wk.hits[host]
}

func (wk *wellKnownServer) totalHits() int {
	wk.mu.Lock()
	defer wk.mu.Unlock()
	n := 0
	for _, v := range wk.hits {
		n += v
	}
	return n
}

// client returns an SSRF-guarded client that trusts the test server and
// dials every *.example.com name to it: names resolve to 127.0.0.1 through
// the guard (loopback allowed by CIDR) and the port is rewritten to the
// server's.
func (wk *wellKnownServer) client(t *testing.T) *http.Client {
	t.Helper()
	_, port, _ := net.SplitHostPort(wk.srv.Listener.Addr().String())
	guard := Guard{
		AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
		LookupNetIP: func(_ context.Context, _, host string) ([]netip.Addr, error) {
			if strings.HasSuffix(host, ".example.com") {
				return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
			}
			return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
		},
	}
	pool := wk.srv.Client().Transport.(*http.Transport).TLSClientConfig.RootCAs
	c := NewClient(guard, &tls.Config{RootCAs: pool}, 5*time.Second)
	c.Transport.(*http.Transport).DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		return guard.DialContext(ctx, network, net.JoinHostPort(host, port))
	}
	return c
}

func srv(target string, port, prio uint16) *net.SRV {
	return &net.SRV{Target: target, Port: port, Priority: prio, Weight: 1}
}

func TestResolve(t *testing.T) {
	wk := newWellKnownServer(t)
	dns := &fakeDNS{
		srv: map[string][]*net.SRV{
			// Delegated hosts.
			"_matrix-fed._tcp.deleg32.example.net": {srv("ignored.example.net.", 1, 0)},
			"_matrix-fed._tcp.deleg33.example.net": {srv("b.srv.example.net.", 7754, 20), srv("a.srv.example.net.", 7755, 10)},
			"_matrix._tcp.deleg33.example.net":     {srv("ignored.example.net.", 1, 0)},
			"_matrix._tcp.deleg34.example.net":     {srv("c.srv.example.net.", 7756, 0)},
			// Host names without (valid) delegation.
			"_matrix-fed._tcp.wk32.example.com":   {srv("ignored.example.net.", 1, 0)},
			"_matrix-fed._tcp.s4.example.com":     {srv("srv4.example.net.", 7855, 0)},
			"_matrix._tcp.s4.example.com":         {srv("ignored.example.net.", 1, 0)},
			"_matrix._tcp.s5.example.com":         {srv("srv5.example.net", 7856, 0)},
			"_matrix-fed._tcp.srvdot.example.com": {srv(".", 0, 0)},
			"_matrix-fed._tcp.srvbad.example.com": {srv("unresolvable.example.net.", 7000, 0)},
		},
		ips: map[string][]string{
			"s2.example.com":      {"192.0.2.2", "2001:db8::2"},
			"deleg32.example.net": {"192.0.2.32", "2001:db8::32"},
			"a.srv.example.net":   {"192.0.2.1"},
			"b.srv.example.net":   {"192.0.2.11"},
			"c.srv.example.net":   {"192.0.2.34"},
			"deleg35.example.net": {"192.0.2.35"},
			"srv4.example.net":    {"192.0.2.4"},
			"srv5.example.net":    {"192.0.2.5"},
			"s6.example.com":      {"192.0.2.6"},
			"srvdot.example.com":  {"192.0.2.7"},
			"fallback.example":    {"192.0.2.99"},
		},
	}
	for _, h := range []string{"inv404", "invjson", "invmissing", "invtype", "invname", "invport", "invbig", "invarray", "inv500"} {
		dns.ips[h+".example.com"] = []string{"192.0.2.99"}
	}
	wk.set("s2.example.com", jsonAnswer(`{"m.server":"elsewhere.example.net"}`, "", ""))
	wk.set("wk31.example.com", jsonAnswer(`{"m.server":"198.51.100.7"}`, "application/json", ""))
	wk.set("wk31p.example.com", jsonAnswer(`{"m.server":"[2001:db8::7]:9000"}`, "application/json", ""))
	wk.set("wk32.example.com", jsonAnswer(`{"m.server":"deleg32.example.net:7000"}`, "application/json", ""))
	wk.set("wk33.example.com", jsonAnswer(`{"m.server":"deleg33.example.net"}`, "application/json", ""))
	wk.set("wk34.example.com", jsonAnswer(`{"m.server":"deleg34.example.net"}`, "application/json", ""))
	wk.set("wk35.example.com", jsonAnswer(`{"m.server":"deleg35.example.net", "extra": [1,2]}`, "application/json", ""))
	wk.set("ctype.example.com", jsonAnswer(`{"m.server":"deleg35.example.net"}`, "text/html", ""))
	wk.set("redir.example.com", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/.well-known/matrix/server" {
			http.Redirect(w, r, "/moved", http.StatusMovedPermanently)
			return
		}
		io.WriteString(w, `{"m.server":"deleg35.example.net"}`)
	})
	wk.set("invjson.example.com", jsonAnswer(`{"m.server":`, "application/json", ""))
	wk.set("invmissing.example.com", jsonAnswer(`{"server":"deleg35.example.net"}`, "application/json", ""))
	wk.set("invtype.example.com", jsonAnswer(`{"m.server":5}`, "application/json", ""))
	wk.set("invname.example.com", jsonAnswer(`{"m.server":"bad name.example"}`, "application/json", ""))
	wk.set("invport.example.com", jsonAnswer(`{"m.server":"deleg35.example.net:0"}`, "application/json", ""))
	wk.set("invarray.example.com", jsonAnswer(`["deleg35.example.net"]`, "application/json", ""))
	wk.set("invbig.example.com", jsonAnswer(`{"m.server":"deleg35.example.net","pad":"`+strings.Repeat("x", WellKnownMaxBytes)+`"}`, "application/json", ""))
	wk.set("inv500.example.com", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(500)
		io.WriteString(w, `{"m.server":"deleg35.example.net"}`)
	})

	fallback := func(host string) Target {
		return Target{Addrs: []string{"192.0.2.99:8448"}, Host: host, TLSServerName: host}
	}
	deleg35 := Target{Addrs: []string{"192.0.2.35:8448"}, Host: "deleg35.example.net", TLSServerName: "deleg35.example.net"}
	tests := []struct {
		name    string
		server  string
		want    Target
		wantErr error // nil: success expected
		anyErr  bool  // some error expected
		noWK    bool  // no well-known request may be made
	}{
		{name: "1 IPv4 literal", server: "192.0.2.10", want: Target{Addrs: []string{"192.0.2.10:8448"}, Host: "192.0.2.10"}, noWK: true},
		{name: "1 IPv4 literal with port", server: "192.0.2.10:8080", want: Target{Addrs: []string{"192.0.2.10:8080"}, Host: "192.0.2.10:8080"}, noWK: true},
		{name: "1 IPv6 literal", server: "[2001:db8::10]", want: Target{Addrs: []string{"[2001:db8::10]:8448"}, Host: "[2001:db8::10]"}, noWK: true},
		{name: "1 IPv6 literal with port", server: "[2001:db8::10]:443", want: Target{Addrs: []string{"[2001:db8::10]:443"}, Host: "[2001:db8::10]:443"}, noWK: true},
		{name: "2 host with port skips well-known", server: "s2.example.com:1234",
			want: Target{Addrs: []string{"192.0.2.2:1234", "[2001:db8::2]:1234"}, Host: "s2.example.com:1234", TLSServerName: "s2.example.com"}, noWK: true},
		{name: "3.1 delegated IP literal", server: "wk31.example.com",
			want: Target{Addrs: []string{"198.51.100.7:8448"}, Host: "198.51.100.7"}},
		{name: "3.1 delegated IPv6 literal with port", server: "wk31p.example.com",
			want: Target{Addrs: []string{"[2001:db8::7]:9000"}, Host: "[2001:db8::7]:9000"}},
		{name: "3.2 delegated host with port", server: "wk32.example.com",
			want: Target{Addrs: []string{"192.0.2.32:7000", "[2001:db8::32]:7000"}, Host: "deleg32.example.net:7000", TLSServerName: "deleg32.example.net"}},
		{name: "3.3 delegated SRV _matrix-fed by priority", server: "wk33.example.com",
			want: Target{Addrs: []string{"192.0.2.1:7755", "192.0.2.11:7754"}, Host: "deleg33.example.net", TLSServerName: "deleg33.example.net"}},
		{name: "3.4 delegated deprecated SRV _matrix", server: "wk34.example.com",
			want: Target{Addrs: []string{"192.0.2.34:7756"}, Host: "deleg34.example.net", TLSServerName: "deleg34.example.net"}},
		{name: "3.5 delegated host without SRV on 8448", server: "wk35.example.com", want: deleg35},
		{name: "3 body parsed as JSON regardless of content type", server: "ctype.example.com", want: deleg35},
		{name: "3 redirect followed", server: "redir.example.com", want: deleg35},
		{name: "invalid: 404", server: "inv404.example.com", want: fallback("inv404.example.com")},
		{name: "invalid: 500 with valid body", server: "inv500.example.com", want: fallback("inv500.example.com")},
		{name: "invalid: bad JSON", server: "invjson.example.com", want: fallback("invjson.example.com")},
		{name: "invalid: missing m.server", server: "invmissing.example.com", want: fallback("invmissing.example.com")},
		{name: "invalid: m.server not a string", server: "invtype.example.com", want: fallback("invtype.example.com")},
		{name: "invalid: bad delegated name", server: "invname.example.com", want: fallback("invname.example.com")},
		{name: "invalid: delegated port 0", server: "invport.example.com", want: fallback("invport.example.com")},
		{name: "invalid: JSON array", server: "invarray.example.com", want: fallback("invarray.example.com")},
		{name: "invalid: body over 64 KiB", server: "invbig.example.com", want: fallback("invbig.example.com")},
		{name: "4 SRV _matrix-fed on host name", server: "s4.example.com",
			want: Target{Addrs: []string{"192.0.2.4:7855"}, Host: "s4.example.com", TLSServerName: "s4.example.com"}},
		{name: "5 deprecated SRV _matrix on host name", server: "s5.example.com",
			want: Target{Addrs: []string{"192.0.2.5:7856"}, Host: "s5.example.com", TLSServerName: "s5.example.com"}},
		{name: "6 A/AAAA on 8448", server: "s6.example.com",
			want: Target{Addrs: []string{"192.0.2.6:8448"}, Host: "s6.example.com", TLSServerName: "s6.example.com"}},
		{name: "SRV '.' target means no service", server: "srvdot.example.com",
			want: Target{Addrs: []string{"192.0.2.7:8448"}, Host: "srvdot.example.com", TLSServerName: "srvdot.example.com"}},
		{name: "well-known unreachable (not in test DNS) falls back", server: "fallback.example",
			want: Target{Addrs: []string{"192.0.2.99:8448"}, Host: "fallback.example", TLSServerName: "fallback.example"}},
		{name: "SRV target unresolvable", server: "srvbad.example.com", anyErr: true},
		{name: "host does not resolve", server: "nohost.example.com", anyErr: true},
		{name: "invalid: empty", server: "", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: space", server: "exa mple.com", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: port 0", server: "example.com:0", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: port 65536", server: "example.com:65536", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: empty port", server: "example.com:", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: two colons", server: "a:1:2", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: bare IPv6", server: "2001:db8::1", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: unterminated bracket", server: "[2001:db8::1", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: bracketed non-IP", server: "[example.com]", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: bracketed IPv4", server: "[192.0.2.1]", wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: too long", server: strings.Repeat("a", 256), wantErr: ErrInvalidServerName, noWK: true},
		{name: "invalid: slash", server: "example.com/x", wantErr: ErrInvalidServerName, noWK: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := &Resolver{Lookup: dns.funcs(), HTTPClient: wk.client(t)}
			before := wk.totalHits()
			got, err := r.Resolve(context.Background(), tc.server)
			switch {
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
			case tc.anyErr:
				if err == nil {
					t.Fatalf("got %+v, want an error", got)
				}
			case err != nil:
				t.Fatalf("Resolve: %v", err)
			case !reflect.DeepEqual(got, tc.want):
				t.Errorf("Resolve(%q) =\n  %+v\nwant\n  %+v", tc.server, got, tc.want)
			}
			hits := wk.totalHits() - before
			if tc.noWK && hits != 0 {
				t.Errorf("made %d well-known requests, want none", hits)
			}
			if !tc.noWK && strings.HasSuffix(tc.server, ".example.com") && hits == 0 {
				t.Errorf("made no well-known request")
			}
		})
	}
}

func TestResolveWellKnownCache(t *testing.T) {
	wk := newWellKnownServer(t)
	dns := &fakeDNS{ips: map[string][]string{
		"deleg.example.net": {"192.0.2.50"},
		"other.example.net": {"192.0.2.51"},
		"err.example.com":   {"192.0.2.52"},
	}}
	wk.set("default.example.com", jsonAnswer(`{"m.server":"deleg.example.net"}`, "", ""))
	wk.set("maxage.example.com", jsonAnswer(`{"m.server":"deleg.example.net"}`, "", "public, max-age=60"))
	wk.set("capped.example.com", jsonAnswer(`{"m.server":"deleg.example.net"}`, "", "max-age=100000000"))
	wk.set("nostore.example.com", jsonAnswer(`{"m.server":"deleg.example.net"}`, "", "no-store"))
	wk.set("err.example.com", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "boom", 500) })

	tests := []struct {
		host string
		// steps: advance the clock by d, resolve, expect total hits.
		steps []struct {
			d    time.Duration
			hits int
		}
	}{
		{"default.example.com", []struct {
			d    time.Duration
			hits int
		}{{0, 1}, {0, 1}, {23 * time.Hour, 1}, {time.Hour + time.Second, 2}, {time.Minute, 2}}},
		{"maxage.example.com", []struct {
			d    time.Duration
			hits int
		}{{0, 1}, {59 * time.Second, 1}, {2 * time.Second, 2}}},
		{"capped.example.com", []struct {
			d    time.Duration
			hits int
		}{{0, 1}, {47 * time.Hour, 1}, {time.Hour + time.Second, 2}}},
		{"nostore.example.com", []struct {
			d    time.Duration
			hits int
		}{{0, 1}, {0, 2}, {0, 3}}},
		{"err.example.com", []struct {
			d    time.Duration
			hits int
		}{{0, 1}, {0, 1}, {9 * time.Minute, 1}, {time.Minute + time.Second, 2}, {0, 2}}},
	}
	for _, tc := range tests {
		t.Run(tc.host, func(t *testing.T) {
			clock := testclock.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
			r := &Resolver{Lookup: dns.funcs(), HTTPClient: wk.client(t), Now: clock.Now}
			base := wk.hitCount(tc.host)
			for i, s := range tc.steps {
				clock.Advance(s.d)
				if _, err := r.Resolve(context.Background(), tc.host); err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
				if got := wk.hitCount(tc.host) - base; got != s.hits {
					t.Fatalf("step %d: %d well-known requests, want %d", i, got, s.hits)
				}
			}
		})
	}

	// A cached error is replaced by the delegation once it expires, and a
	// cached delegation is used even if the remote changes its answer.
	t.Run("answer changes", func(t *testing.T) {
		clock := testclock.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
		r := &Resolver{Lookup: dns.funcs(), HTTPClient: wk.client(t), Now: clock.Now}
		wk.set("flip.example.com", func(w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) })
		dns.ips["flip.example.com"] = []string{"192.0.2.53"}
		got, err := r.Resolve(context.Background(), "flip.example.com")
		if err != nil || got.Host != "flip.example.com" {
			t.Fatalf("first: %+v, %v", got, err)
		}
		wk.set("flip.example.com", jsonAnswer(`{"m.server":"other.example.net"}`, "", ""))
		if got, _ := r.Resolve(context.Background(), "flip.example.com"); got.Host != "flip.example.com" {
			t.Fatalf("cached error not used: %+v", got)
		}
		clock.Advance(WellKnownErrorTTL + time.Second)
		got, err = r.Resolve(context.Background(), "flip.example.com")
		if err != nil || !reflect.DeepEqual(got.Addrs, []string{"192.0.2.51:8448"}) || got.Host != "other.example.net" {
			t.Fatalf("after expiry: %+v, %v", got, err)
		}
		wk.set("flip.example.com", jsonAnswer(`{"m.server":"deleg.example.net"}`, "", ""))
		clock.Advance(time.Hour)
		if got, _ := r.Resolve(context.Background(), "flip.example.com"); got.Host != "other.example.net" {
			t.Fatalf("cached delegation not used: %+v", got)
		}
	})
}

func TestResolveConcurrentSharesFetch(t *testing.T) {
	wk := newWellKnownServer(t)
	release := make(chan struct{})
	wk.set("slow.example.com", func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, `{"m.server":"192.0.2.60:9000"}`)
	})
	r := &Resolver{HTTPClient: wk.client(t)}
	const n = 10
	var wg sync.WaitGroup
	results := make(chan Target, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tg, err := r.Resolve(context.Background(), "slow.example.com")
			if err != nil {
				t.Errorf("Resolve: %v", err)
			}
			results <- tg
		}()
	}
	time.Sleep(50 * time.Millisecond)
	close(release)
	wg.Wait()
	close(results)
	for tg := range results {
		if tg.Host != "192.0.2.60:9000" {
			t.Errorf("got %+v", tg)
		}
	}
	if h := wk.hitCount("slow.example.com"); h != 1 {
		t.Errorf("%d well-known requests, want 1", h)
	}
}

func TestResolveContextCancelled(t *testing.T) {
	wk := newWellKnownServer(t)
	release := make(chan struct{})
	defer close(release)
	wk.set("hang.example.com", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	r := &Resolver{HTTPClient: wk.client(t), WellKnownTimeout: 200 * time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := r.Resolve(ctx, "hang.example.com")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	if time.Since(start) > 150*time.Millisecond {
		t.Errorf("Resolve did not return promptly on cancellation")
	}
}

func TestCacheTTL(t *testing.T) {
	for cc, want := range map[string]time.Duration{
		"":                         WellKnownDefaultTTL,
		"max-age=3600":             time.Hour,
		"public, MAX-AGE=120":      2 * time.Minute,
		"max-age=999999999":        WellKnownMaxTTL,
		"max-age=bogus":            WellKnownDefaultTTL,
		"max-age=0":                0,
		"no-store, max-age=3600":   0,
		`max-age="60"`:             time.Minute,
		"private, must-revalidate": WellKnownDefaultTTL,
	} {
		if got := cacheTTL(cc); got != want {
			t.Errorf("cacheTTL(%q) = %v, want %v", cc, got, want)
		}
	}
}
