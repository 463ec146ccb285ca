package federation

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// roundTripFunc is an http.RoundTripper made of a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// FuzzResolve runs server discovery on a fuzzed server name whose
// well-known delegation is a fuzzed m.server value (DNS answers every name
// with 192.0.2.1 and has no SRV records), and checks that discovery refuses
// exactly the names matrix.ValidServerName refuses, at both steps, and
// that the target follows the spec's steps for the names it accepts.
func FuzzResolve(f *testing.F) {
	f.Add("example.org", "delegated.example:443")
	f.Add("example.org", "delegated.example")
	f.Add("example.org", "[2001:db8::1]:8448")
	f.Add("example.org", "192.0.2.7")
	f.Add("example.org", "bad name")
	f.Add("example.org", "delegated.example:0")
	f.Add("example.org:8448", "x")
	f.Add("[::1]", "x")
	f.Add("1.2.3.4:99999", "x")
	f.Add("..", "x")
	f.Add("", "")
	f.Fuzz(func(t *testing.T, name, delegated string) {
		body, err := json.Marshal(map[string]string{"m.server": delegated})
		if err != nil {
			t.Skip()
		}
		var doc struct {
			Server string `json:"m.server"`
		}
		if err := json.Unmarshal(body, &doc); err != nil {
			t.Fatal(err)
		}
		delegated = doc.Server // as it reads after JSON (invalid UTF-8 replaced)
		r := &Resolver{
			Lookup: LookupFuncs{
				LookupSRV: func(context.Context, string, string, string) (string, []*net.SRV, error) {
					return "", nil, &net.DNSError{Err: "no such host", IsNotFound: true}
				},
				LookupIPAddr: func(context.Context, string) ([]net.IPAddr, error) {
					return []net.IPAddr{{IP: net.IPv4(192, 0, 2, 1)}}, nil
				},
			},
			HTTPClient: &http.Client{Transport: roundTripFunc(func(req *http.Request) (*http.Response, error) {
				return &http.Response{
					StatusCode: http.StatusOK,
					Header:     http.Header{"Content-Type": {"application/json"}},
					Body:       io.NopCloser(strings.NewReader(string(body))),
					Request:    req,
				}, nil
			})},
		}
		target, err := r.Resolve(context.Background(), name)
		sn, perr := matrix.ParseServerName(name)
		if perr != nil {
			if !errors.Is(err, ErrInvalidServerName) {
				t.Fatalf("Resolve(%q) = %+v, %v; the validator refuses it: %v", name, target, err, perr)
			}
			return
		}
		if err != nil {
			t.Fatalf("Resolve(%q) (valid) failed: %v", name, err)
		}
		if len(target.Addrs) == 0 {
			t.Fatalf("Resolve(%q) = %+v without addresses", name, target)
		}
		for _, a := range target.Addrs {
			if _, _, err := net.SplitHostPort(a); err != nil {
				t.Fatalf("Resolve(%q) address %q: %v", name, a, err)
			}
		}
		switch {
		case sn.IP.IsValid(): // step 1
			port := sn.Port
			if port == "" {
				port = DefaultFederationPort
			}
			want := net.JoinHostPort(sn.IP.String(), port)
			if len(target.Addrs) != 1 || target.Addrs[0] != want || target.Host != name || target.TLSServerName != "" {
				t.Fatalf("Resolve(%q) = %+v, want %s, Host %q, no SNI", name, target, want, name)
			}
		case sn.Port != "": // step 2
			if target.Host != name || target.TLSServerName != sn.Host || target.Addrs[0] != net.JoinHostPort("192.0.2.1", sn.Port) {
				t.Fatalf("Resolve(%q) = %+v", name, target)
			}
		default: // step 3 (delegation) or, when it is invalid, steps 4–6
			dn, derr := matrix.ParseServerName(delegated)
			switch {
			case derr != nil:
				if target.Host != sn.Host || target.TLSServerName != sn.Host || target.Addrs[0] != "192.0.2.1:8448" {
					t.Fatalf("Resolve(%q) with invalid delegation %q = %+v, want the name itself on 8448", name, delegated, target)
				}
			case dn.IP.IsValid():
				if target.Host != delegated || target.TLSServerName != "" {
					t.Fatalf("Resolve(%q) delegated to %q = %+v", name, delegated, target)
				}
			case dn.Port != "":
				if target.Host != delegated || target.TLSServerName != dn.Host || target.Addrs[0] != net.JoinHostPort("192.0.2.1", dn.Port) {
					t.Fatalf("Resolve(%q) delegated to %q = %+v", name, delegated, target)
				}
			default:
				if target.Host != dn.Host || target.TLSServerName != dn.Host || target.Addrs[0] != "192.0.2.1:8448" {
					t.Fatalf("Resolve(%q) delegated to %q = %+v", name, delegated, target)
				}
			}
		}
	})
}
