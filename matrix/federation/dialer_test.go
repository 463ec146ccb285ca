package federation

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestGuardCheck(t *testing.T) {
	tests := []struct {
		ip    string
		allow bool
	}{
		{"8.8.8.8", true},
		{"93.184.216.34", true},
		{"2606:4700:4700::1111", true},
		{"::ffff:8.8.8.8", true},
		{"64:ff9b::808:808", true},   // NAT64 of 8.8.8.8
		{"2002:808:808::1", true},    // 6to4 of 8.8.8.8
		{"100.63.255.255", true},     // just below CGNAT
		{"100.128.0.0", true},        // just above CGNAT
		{"172.32.0.1", true},         // just above 172.16/12
		{"127.0.0.1", false},         // loopback
		{"127.255.255.254", false},   // loopback
		{"10.0.0.1", false},          // RFC1918
		{"172.16.5.4", false},        // RFC1918
		{"192.168.1.1", false},       // RFC1918
		{"169.254.169.254", false},   // link-local / cloud metadata
		{"100.64.0.1", false},        // CGNAT
		{"0.0.0.0", false},           // unspecified
		{"0.1.2.3", false},           // this-network
		{"255.255.255.255", false},   // broadcast
		{"224.0.0.1", false},         // multicast
		{"240.0.0.1", false},         // reserved
		{"192.0.2.1", false},         // TEST-NET-1
		{"198.51.100.1", false},      // TEST-NET-2
		{"203.0.113.1", false},       // TEST-NET-3
		{"198.18.0.1", false},        // benchmarking
		{"::", false},                // unspecified
		{"::1", false},               // loopback
		{"fe80::1", false},           // link-local
		{"fe80::1%eth0", false},      // link-local with zone
		{"fc00::1", false},           // ULA
		{"fd12:3456::1", false},      // ULA
		{"ff02::1", false},           // multicast
		{"2001:db8::1", false},       // documentation
		{"::ffff:127.0.0.1", false},  // IPv4-mapped loopback
		{"::ffff:10.0.0.1", false},   // IPv4-mapped private
		{"64:ff9b::a00:1", false},    // NAT64 of 10.0.0.1
		{"64:ff9b::7f00:1", false},   // NAT64 of 127.0.0.1
		{"2002:7f00:1::", false},     // 6to4 of 127.0.0.1
		{"2002:a9fe:a9fe::1", false}, // 6to4 of 169.254.169.254
		{"::127.0.0.1", false},       // IPv4-compatible
		{"2001::1", false},           // Teredo
	}
	var g Guard
	for _, tc := range tests {
		t.Run(tc.ip, func(t *testing.T) {
			err := g.Check(netip.MustParseAddr(tc.ip))
			if tc.allow && err != nil {
				t.Errorf("Check(%s) = %v, want allowed", tc.ip, err)
			}
			if !tc.allow && !errors.Is(err, ErrAddressDenied) {
				t.Errorf("Check(%s) = %v, want ErrAddressDenied", tc.ip, err)
			}
		})
	}
	if err := g.Check(netip.Addr{}); !errors.Is(err, ErrAddressDenied) {
		t.Errorf("zero Addr: %v", err)
	}
}

func TestGuardAllowances(t *testing.T) {
	g := Guard{AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16"), netip.MustParsePrefix("fd00::/8")}}
	for ip, allow := range map[string]bool{
		"10.1.2.3":         true,
		"::ffff:10.1.2.3":  true,
		"64:ff9b::a01:203": true, // NAT64 of 10.1.2.3
		"10.2.0.1":         false,
		"fd00::5":          true,
		"fc00::5":          false,
		"127.0.0.1":        false,
	} {
		if err := g.Check(netip.MustParseAddr(ip)); (err == nil) != allow {
			t.Errorf("AllowCIDRs Check(%s) = %v, want allowed=%v", ip, err, allow)
		}
	}
	priv := Guard{AllowPrivate: true}
	for _, ip := range []string{"127.0.0.1", "::1", "10.0.0.1", "169.254.169.254"} {
		if err := priv.Check(netip.MustParseAddr(ip)); err != nil {
			t.Errorf("AllowPrivate Check(%s) = %v", ip, err)
		}
	}
}

// stubLookup returns a LookupNetIP that maps names to fixed addresses.
func stubLookup(m map[string][]string) func(context.Context, string, string) ([]netip.Addr, error) {
	return func(_ context.Context, _, host string) ([]netip.Addr, error) {
		ss, ok := m[host]
		if !ok {
			return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
		}
		var out []netip.Addr
		for _, s := range ss {
			out = append(out, netip.MustParseAddr(s))
		}
		return out, nil
	}
}

// acceptCounter is a loopback TCP listener that counts accepted
// connections.
type acceptCounter struct {
	ln net.Listener
	n  atomic.Int32
}

func newAcceptCounter(t *testing.T, addr string) *acceptCounter {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("cannot listen on %s: %v", addr, err)
	}
	a := &acceptCounter{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			a.n.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return a
}

func TestGuardDialContext(t *testing.T) {
	ac := newAcceptCounter(t, "127.0.0.1:0")
	port := ac.ln.Addr().(*net.TCPAddr).Port
	lookup := stubLookup(map[string][]string{
		"loop.example":  {"127.0.0.1"},
		"mixed.example": {"10.0.0.1", "127.0.0.1"},
	})
	loopOnly := []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	tests := []struct {
		name    string
		guard   Guard
		addr    string
		wantErr error
	}{
		{"name to loopback denied", Guard{LookupNetIP: lookup}, fmt.Sprintf("loop.example:%d", port), ErrAddressDenied},
		{"IP literal loopback denied", Guard{LookupNetIP: lookup}, fmt.Sprintf("127.0.0.1:%d", port), ErrAddressDenied},
		{"mapped loopback literal denied", Guard{LookupNetIP: lookup}, fmt.Sprintf("[::ffff:127.0.0.1]:%d", port), ErrAddressDenied},
		{"loopback allowed by CIDR", Guard{LookupNetIP: lookup, AllowCIDRs: loopOnly}, fmt.Sprintf("loop.example:%d", port), nil},
		{"denied address skipped, allowed one dialled", Guard{LookupNetIP: lookup, AllowCIDRs: loopOnly}, fmt.Sprintf("mixed.example:%d", port), nil},
		{"unknown host", Guard{LookupNetIP: lookup, AllowPrivate: true}, "nope.example:1", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := ac.n.Load()
			conn, err := tc.guard.DialContext(context.Background(), "tcp", tc.addr)
			if tc.name == "unknown host" {
				var dnsErr *net.DNSError
				if !errors.As(err, &dnsErr) {
					t.Fatalf("err = %v, want DNS error", err)
				}
				return
			}
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				time.Sleep(20 * time.Millisecond)
				if ac.n.Load() != before {
					t.Fatalf("listener accepted a connection although the dial was denied")
				}
				return
			}
			if err != nil {
				t.Fatalf("DialContext: %v", err)
			}
			conn.Close()
		})
	}
	if _, err := (Guard{}).DialContext(context.Background(), "udp", "8.8.8.8:53"); err == nil {
		t.Error("udp accepted")
	}
}

// TestGuardRebinding simulates a DNS answer that changes between the
// pre-dial check (public address) and the connect (loopback): the
// net.Dialer Control re-check must deny the connection.
func TestGuardRebinding(t *testing.T) {
	ac := newAcceptCounter(t, "127.0.0.1:0")
	loop := ac.ln.Addr().(*net.TCPAddr).AddrPort()
	rebind := func(netip.AddrPort) netip.AddrPort { return loop }
	lookup := stubLookup(map[string][]string{"rebind.example": {"93.184.216.34"}})

	g := Guard{LookupNetIP: lookup, dialHook: rebind}
	_, err := g.DialContext(context.Background(), "tcp", "rebind.example:443")
	if !errors.Is(err, ErrAddressDenied) {
		t.Fatalf("err = %v, want ErrAddressDenied from the Control re-check", err)
	}
	if !strings.Contains(err.Error(), "connect address") {
		t.Errorf("err = %v, want it to come from the connect-time check", err)
	}
	time.Sleep(20 * time.Millisecond)
	if n := ac.n.Load(); n != 0 {
		t.Fatalf("listener accepted %d connections", n)
	}

	// Control: the same rebinding to an allowed address connects, so the
	// denial above is the Control hook's doing and not a dial failure.
	g.AllowCIDRs = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	conn, err := g.DialContext(context.Background(), "tcp", "rebind.example:443")
	if err != nil {
		t.Fatalf("allowed rebinding target: %v", err)
	}
	conn.Close()
}

// writeCA stores the httptest server certificate as a PEM CA file.
func writeCA(t *testing.T, srv *httptest.Server) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "ca.pem")
	data := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// startTLSOn starts an httptest TLS server listening on addr.
func startTLSOn(t *testing.T, addr string, h http.Handler) *httptest.Server {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("cannot listen on %s: %v", addr, err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.Listener.Close()
	srv.Listener = ln
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func TestNewClientRedirects(t *testing.T) {
	var evilHits atomic.Int32
	evil := startTLSOn(t, "127.0.0.2:0", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		evilHits.Add(1)
		io.WriteString(w, "secret")
	}))
	evilPort := evil.Listener.Addr().(*net.TCPAddr).Port
	good := startTLSOn(t, "127.0.0.1:0", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/ok":
			io.WriteString(w, "fine")
		case r.URL.Path == "/to-evil-name":
			http.Redirect(w, r, fmt.Sprintf("https://evil.example.com:%d/", evilPort), http.StatusFound)
		case r.URL.Path == "/to-evil-ip":
			http.Redirect(w, r, fmt.Sprintf("https://127.0.0.2:%d/", evilPort), http.StatusFound)
		case r.URL.Path == "/to-http":
			http.Redirect(w, r, "http://good.example.com/ok", http.StatusFound)
		case r.URL.Path == "/to-file":
			http.Redirect(w, r, "file:///etc/passwd", http.StatusFound)
		case strings.HasPrefix(r.URL.Path, "/hop/"):
			var n int
			fmt.Sscanf(strings.TrimPrefix(r.URL.Path, "/hop/"), "%d", &n)
			if n == 0 {
				io.WriteString(w, "landed")
				return
			}
			http.Redirect(w, r, fmt.Sprintf("/hop/%d", n-1), http.StatusFound)
		default:
			http.NotFound(w, r)
		}
	}))
	goodPort := good.Listener.Addr().(*net.TCPAddr).Port
	ca := writeCA(t, good) // both servers share httptest's certificate
	tlsCfg, err := TLSConfig(ca, false)
	if err != nil {
		t.Fatalf("TLSConfig: %v", err)
	}
	lookup := stubLookup(map[string][]string{
		"good.example.com": {"127.0.0.1"},
		"evil.example.com": {"127.0.0.2"},
	})
	guard := Guard{LookupNetIP: lookup, AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}
	client := NewClient(guard, tlsCfg, 5*time.Second)
	base := fmt.Sprintf("https://good.example.com:%d", goodPort)

	get := func(c *http.Client, path string) (string, error) {
		resp, err := c.Get(base + path)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}

	if body, err := get(client, "/ok"); err != nil || body != "fine" {
		t.Fatalf("plain request: %q, %v", body, err)
	}
	if body, err := get(client, "/hop/5"); err != nil || body != "landed" {
		t.Errorf("5 redirects: %q, %v", body, err)
	}
	if _, err := get(client, "/hop/6"); err == nil || !strings.Contains(err.Error(), "stopped after 5 redirects") {
		t.Errorf("6 redirects: %v", err)
	}
	for _, path := range []string{"/to-evil-name", "/to-evil-ip", "/to-http", "/to-file"} {
		_, err := get(client, path)
		if !errors.Is(err, ErrAddressDenied) {
			t.Errorf("%s: err = %v, want ErrAddressDenied", path, err)
		}
		// Everything but the host name is refused by CheckRedirect
		// itself, before any dial.
		if path != "/to-evil-name" && (err == nil || !strings.Contains(err.Error(), "following redirect")) {
			t.Errorf("%s: err = %v, want a CheckRedirect refusal", path, err)
		}
	}
	if n := evilHits.Load(); n != 0 {
		t.Fatalf("denied server was reached %d times", n)
	}

	// Control: once 127.0.0.2 is allowed, the same redirect reaches it,
	// so the refusals above are the guard's doing.
	guard.AllowCIDRs = append(guard.AllowCIDRs, netip.MustParsePrefix("127.0.0.2/32"))
	open := NewClient(guard, tlsCfg, 5*time.Second)
	if body, err := get(open, "/to-evil-name"); err != nil || body != "secret" {
		t.Fatalf("allowed redirect: %q, %v", body, err)
	}

	// Without the CA the certificate is not trusted.
	plainCfg, err := TLSConfig("", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := get(NewClient(guard, plainCfg, 5*time.Second), "/ok"); err == nil {
		t.Error("untrusted certificate accepted")
	}
	insecureCfg, err := TLSConfig("", true)
	if err != nil {
		t.Fatal(err)
	}
	if body, err := get(NewClient(guard, insecureCfg, 5*time.Second), "/ok"); err != nil || body != "fine" {
		t.Errorf("insecure config: %q, %v", body, err)
	}
}

func TestTLSConfigErrors(t *testing.T) {
	if _, err := TLSConfig(filepath.Join(t.TempDir(), "missing.pem"), false); err == nil {
		t.Error("missing CA file accepted")
	}
	p := filepath.Join(t.TempDir(), "junk.pem")
	if err := os.WriteFile(p, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := TLSConfig(p, false); err == nil {
		t.Error("CA file without certificates accepted")
	}
}

func TestGuardCheckHost(t *testing.T) {
	answers := map[string][]netip.Addr{
		"public.example":  {netip.MustParseAddr("93.184.215.14"), netip.MustParseAddr("2606:2800:21f:cb07:6820:80da:af6b:8b2c")},
		"mixed.example":   {netip.MustParseAddr("93.184.215.14"), netip.MustParseAddr("10.0.0.7")},
		"private.example": {netip.MustParseAddr("192.168.1.2")},
		"mapped.example":  {netip.MustParseAddr("::ffff:127.0.0.1")},
		"empty.example":   {},
	}
	g := Guard{LookupNetIP: func(_ context.Context, _, host string) ([]netip.Addr, error) {
		ips, ok := answers[host]
		if !ok {
			return nil, errors.New("no such host")
		}
		return ips, nil
	}}
	for _, tc := range []struct {
		host   string
		denied bool // want ErrAddressDenied
		ok     bool
	}{
		{"public.example", false, true},
		{"mixed.example", true, false},
		{"private.example", true, false},
		{"mapped.example", true, false},
		{"127.0.0.1", true, false},
		{"[::1]", true, false},
		{"8.8.8.8", false, true},
		{"empty.example", false, false},
		{"unknown.example", false, false},
	} {
		err := g.CheckHost(context.Background(), tc.host)
		if (err == nil) != tc.ok || errors.Is(err, ErrAddressDenied) != tc.denied {
			t.Errorf("CheckHost(%s) = %v; want ok %v, denied %v", tc.host, err, tc.ok, tc.denied)
		}
	}
	if err := (Guard{AllowPrivate: true}).CheckHost(context.Background(), "127.0.0.1"); err != nil {
		t.Errorf("CheckHost with AllowPrivate = %v", err)
	}
}
