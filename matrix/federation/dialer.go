// Package federation holds the outbound plumbing the media repository needs to
// talk to other Matrix homeservers: server discovery (Resolver), an SSRF guard
// for every outbound connection (Guard, NewClient) and the multipart/mixed
// wire format of the federation media endpoints (ReadMediaResponse,
// WriteMediaResponse, WriteMediaRedirect).
package federation

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrAddressDenied is returned (wrapped) when an outbound connection or
// redirect would reach an address the Guard does not allow.
var ErrAddressDenied = errors.New("address denied by SSRF guard")

// MaxRedirects is the number of redirects a client built by NewClient
// follows before giving up.
const MaxRedirects = 5

// Guard decides which remote addresses outbound requests may reach. The zero
// value denies every non-public address (loopback, private, link-local,
// CGNAT, documentation, multicast, reserved and IPv6 forms embedding such an
// IPv4 address) and resolves names with net.DefaultResolver.
type Guard struct {
	// AllowPrivate disables the address checks entirely: every valid
	// address is allowed. Only for tests and closed private deployments.
	// Default false.
	AllowPrivate bool

	// AllowCIDRs lists prefixes that are allowed even though they fall in a
	// denied range (for example a private peer at 10.1.2.0/24). An
	// IPv4-mapped or embedded IPv6 address is also allowed when its
	// embedded IPv4 address is in one of these prefixes. Default none.
	AllowCIDRs []netip.Prefix

	// AllowHTTP lets redirects lead to plain http:// URLs. By default
	// (false) a client built by NewClient follows redirects to https://
	// only.
	AllowHTTP bool

	// LookupNetIP resolves host names for DialContext; network is "ip",
	// "ip4" or "ip6". Default net.DefaultResolver.LookupNetIP.
	LookupNetIP func(ctx context.Context, network, host string) ([]netip.Addr, error)

	// dialHook, when set (tests only), rewrites the address actually
	// dialled after the pre-dial check, simulating a DNS answer that
	// changes between the check and the connect (rebinding). The
	// net.Dialer Control re-check must still catch it.
	dialHook func(netip.AddrPort) netip.AddrPort
}

// deniedRange is one denied prefix and a short human-readable reason.
type deniedRange struct {
	prefix netip.Prefix
	reason string
}

// deniedV4 lists the IPv4 ranges that are never public unicast destinations.
var deniedV4 = [...]deniedRange{
	{netip.MustParsePrefix("0.0.0.0/8"), "this-network"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private"},
	{netip.MustParsePrefix("100.64.0.0/10"), "carrier-grade NAT"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private"},
	{netip.MustParsePrefix("192.0.0.0/24"), "IETF protocol assignments"},
	{netip.MustParsePrefix("192.0.2.0/24"), "documentation"},
	{netip.MustParsePrefix("192.88.99.0/24"), "6to4 relay anycast"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private"},
	{netip.MustParsePrefix("198.18.0.0/15"), "benchmarking"},
	{netip.MustParsePrefix("198.51.100.0/24"), "documentation"},
	{netip.MustParsePrefix("203.0.113.0/24"), "documentation"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast"},
	{netip.MustParsePrefix("255.255.255.255/32"), "broadcast"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved"},
}

// deniedV6 lists the IPv6 ranges that are never public unicast destinations.
// IPv4-mapped, NAT64 and 6to4 addresses are handled separately by judging
// the IPv4 address they embed.
var deniedV6 = [...]deniedRange{
	{netip.MustParsePrefix("::/128"), "unspecified"},
	{netip.MustParsePrefix("::1/128"), "loopback"},
	{netip.MustParsePrefix("::/96"), "IPv4-compatible (deprecated)"},
	{netip.MustParsePrefix("64:ff9b:1::/48"), "local-use NAT64"},
	{netip.MustParsePrefix("100::/64"), "discard-only"},
	{netip.MustParsePrefix("2001::/32"), "Teredo"},
	{netip.MustParsePrefix("2001:2::/48"), "benchmarking"},
	{netip.MustParsePrefix("2001:10::/28"), "ORCHID"},
	{netip.MustParsePrefix("2001:20::/28"), "ORCHIDv2"},
	{netip.MustParsePrefix("2001:db8::/32"), "documentation"},
	{netip.MustParsePrefix("3fff::/20"), "documentation"},
	{netip.MustParsePrefix("fc00::/7"), "unique local (private)"},
	{netip.MustParsePrefix("fe80::/10"), "link-local"},
	{netip.MustParsePrefix("fec0::/10"), "site-local (deprecated)"},
	{netip.MustParsePrefix("ff00::/8"), "multicast"},
}

var (
	nat64Prefix = netip.MustParsePrefix("64:ff9b::/96")
	sixToFour   = netip.MustParsePrefix("2002::/16")
)

// Check reports whether ip may be connected to. It returns nil for allowed
// addresses and an error wrapping ErrAddressDenied otherwise. Zones are
// ignored. IPv4-mapped (::ffff:0:0/96), NAT64 (64:ff9b::/96) and 6to4
// (2002::/16) addresses are judged by the IPv4 address they embed.
func (g Guard) Check(ip netip.Addr) error {
	if !ip.IsValid() {
		return fmt.Errorf("checking address: %w: invalid address", ErrAddressDenied)
	}
	ip = ip.WithZone("")
	if g.AllowPrivate || g.allowListed(ip) {
		return nil
	}
	if reason := g.deniedReason(ip); reason != "" {
		return fmt.Errorf("checking address %s: %w: %s", ip, ErrAddressDenied, reason)
	}
	return nil
}

// allowListed reports whether ip is inside one of g.AllowCIDRs.
func (g Guard) allowListed(ip netip.Addr) bool {
	for _, p := range g.AllowCIDRs {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// deniedReason returns why ip is denied, or "" if it is allowed.
func (g Guard) deniedReason(ip netip.Addr) string {
	if ip.Is4() {
		for _, r := range deniedV4 {
			if r.prefix.Contains(ip) {
				return r.reason
			}
		}
		return ""
	}
	if ip.Is4In6() {
		return g.embeddedReason("IPv4-mapped", ip.Unmap())
	}
	b := ip.As16()
	if nat64Prefix.Contains(ip) {
		return g.embeddedReason("NAT64", netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]}))
	}
	if sixToFour.Contains(ip) {
		return g.embeddedReason("6to4", netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]}))
	}
	for _, r := range deniedV6 {
		if r.prefix.Contains(ip) {
			return r.reason
		}
	}
	return ""
}

// embeddedReason judges the IPv4 address v4 embedded in an IPv6 address of
// the given kind.
func (g Guard) embeddedReason(kind string, v4 netip.Addr) string {
	if g.allowListed(v4) {
		return ""
	}
	if r := g.deniedReason(v4); r != "" {
		return kind + " " + v4.String() + " is " + r
	}
	return ""
}

// control is the net.Dialer Control hook: it re-checks the address the
// socket is actually about to connect to, after every name resolution.
func (g Guard) control(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("checking dial address %q: %w: unparsable", address, ErrAddressDenied)
	}
	if err := g.Check(ap.Addr()); err != nil {
		return fmt.Errorf("checking connect address: %w", err)
	}
	return nil
}

// DialContext connects to addr ("host:port") over TCP. It resolves host
// itself, checks every resolved address immediately before dialling it
// (skipping denied ones) and installs a net.Dialer Control hook that checks
// the address the socket really connects to, so a DNS answer that changes
// between check and connect (rebinding) is still denied. Addresses are tried
// in resolver order; the first successful connection wins.
func (g Guard) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	ipNetwork := "ip"
	switch network {
	case "tcp":
	case "tcp4":
		ipNetwork = "ip4"
	case "tcp6":
		ipNetwork = "ip6"
	default:
		return nil, fmt.Errorf("dialing %s: unsupported network %q", addr, network)
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", addr, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return nil, fmt.Errorf("dialing %s: invalid port %q", addr, portStr)
	}
	ips, err := g.resolve(ctx, ipNetwork, host)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", addr, err)
	}
	d := net.Dialer{Control: g.control}
	var errs []error
	for _, ip := range ips {
		ip = ip.Unmap()
		if err := g.Check(ip); err != nil {
			errs = append(errs, err)
			continue
		}
		target := netip.AddrPortFrom(ip, uint16(port))
		if g.dialHook != nil {
			target = g.dialHook(target)
		}
		conn, err := d.DialContext(ctx, network, target.String())
		if err == nil {
			return conn, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("dialing %s: %w", addr, errors.Join(errs...))
}

// resolve returns the addresses of host (an IP literal is its own
// address) on network ("ip", "ip4" or "ip6").
func (g Guard) resolve(ctx context.Context, network, host string) ([]netip.Addr, error) {
	if ip, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{ip}, nil
	}
	lookup := g.LookupNetIP
	if lookup == nil {
		lookup = net.DefaultResolver.LookupNetIP
	}
	ips, err := lookup(ctx, network, host)
	if err != nil {
		return nil, fmt.Errorf("resolving host: %w", err)
	}
	if len(ips) == 0 {
		return nil, errors.New("resolving host: no addresses")
	}
	return ips, nil
}

// CheckHost reports whether every address of host (a name, resolved, or an
// IP literal) may be connected to: nil, an error wrapping ErrAddressDenied
// naming the first denied address, or the resolution's error. It is the
// check for a host that others (clients) will connect to, so one denied
// address is enough to refuse it.
func (g Guard) CheckHost(ctx context.Context, host string) error {
	ips, err := g.resolve(ctx, "ip", strings.Trim(host, "[]"))
	if err != nil {
		return fmt.Errorf("checking host %s: %w", host, err)
	}
	for _, ip := range ips {
		if err := g.Check(ip.Unmap()); err != nil {
			return fmt.Errorf("checking host %s: %w", host, err)
		}
	}
	return nil
}

// checkRedirect is the http.Client CheckRedirect policy: at most
// MaxRedirects hops, https only (unless AllowHTTP) and IP-literal targets
// must pass Check. Host names are checked when dialled.
func (g Guard) checkRedirect(req *http.Request, via []*http.Request) error {
	// via holds the requests already made, so it has k entries when the
	// k-th redirect is about to be followed.
	if len(via) > MaxRedirects {
		return fmt.Errorf("following redirect to %s: stopped after %d redirects", req.URL.Redacted(), MaxRedirects)
	}
	switch req.URL.Scheme {
	case "https":
	case "http":
		if !g.AllowHTTP {
			return fmt.Errorf("following redirect to %s: %w: plain http not allowed", req.URL.Redacted(), ErrAddressDenied)
		}
	default:
		return fmt.Errorf("following redirect to %s: %w: scheme %q not allowed", req.URL.Redacted(), ErrAddressDenied, req.URL.Scheme)
	}
	if ip, err := netip.ParseAddr(req.URL.Hostname()); err == nil {
		if err := g.Check(ip); err != nil {
			return fmt.Errorf("following redirect: %w", err)
		}
	}
	return nil
}

// NewClient returns an HTTP client whose every connection goes through
// guard.DialContext, that never uses a proxy from the environment (a proxy
// would bypass the guard) and that re-validates each redirect target
// (scheme https unless guard.AllowHTTP, IP literals checked, at most
// MaxRedirects hops). tlsConfig may be nil for the system defaults; it is
// cloned. timeout bounds a whole request including reading the body; 0 means
// no overall timeout (use the request context instead).
func NewClient(guard Guard, tlsConfig *tls.Config, timeout time.Duration) *http.Client {
	tr := &http.Transport{
		Proxy:                  nil,
		DialContext:            guard.DialContext,
		TLSClientConfig:        tlsConfig.Clone(),
		TLSHandshakeTimeout:    10 * time.Second,
		ForceAttemptHTTP2:      true,
		MaxIdleConns:           100,
		MaxIdleConnsPerHost:    4,
		IdleConnTimeout:        90 * time.Second,
		ExpectContinueTimeout:  time.Second,
		MaxResponseHeaderBytes: 64 << 10,
	}
	return &http.Client{
		Transport:     tr,
		Timeout:       timeout,
		CheckRedirect: guard.checkRedirect,
	}
}

// TLSConfig builds the client TLS configuration for outbound federation
// requests. caFile, if not empty, names a PEM file of extra CA certificates
// trusted in addition to the system pool (for tests and private
// deployments). insecure disables certificate verification entirely: this is
// DANGEROUS — any peer or on-path attacker can then impersonate any server —
// and is meant only for local testing; TLSConfig does not log it, so callers
// should warn loudly when they enable it.
func TLSConfig(caFile string, insecure bool) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("reading CA file: %w", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("reading CA file %s: no PEM certificates found", caFile)
		}
		cfg.RootCAs = pool
	}
	if insecure {
		cfg.InsecureSkipVerify = true
	}
	return cfg, nil
}
