package federation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/capped"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// Server discovery defaults (spec "Resolving server names").
const (
	// DefaultFederationPort is the port used when neither the server name,
	// the well-known delegation nor SRV names one.
	DefaultFederationPort = "8448"
	// WellKnownMaxBytes caps the size of a .well-known/matrix/server body.
	WellKnownMaxBytes = 64 << 10
	// WellKnownDefaultTTL is how long a well-known answer without
	// Cache-Control max-age is cached.
	WellKnownDefaultTTL = 24 * time.Hour
	// WellKnownMaxTTL caps the cache lifetime of a well-known answer.
	WellKnownMaxTTL = 48 * time.Hour
	// WellKnownErrorTTL is how long a failed or invalid well-known lookup is
	// remembered before it is tried again.
	WellKnownErrorTTL = 10 * time.Minute
	// DefaultWellKnownTimeout bounds one well-known fetch.
	DefaultWellKnownTimeout = 10 * time.Second
	// wellKnownCacheMax bounds the number of cached well-known entries.
	wellKnownCacheMax = 4096
)

// ErrInvalidServerName is returned (wrapped) for server names that do not
// match the spec grammar. It is matrix.ErrInvalidServerName.
var ErrInvalidServerName = matrix.ErrInvalidServerName

// LookupFuncs are the DNS lookups the Resolver uses. Nil fields default to
// the methods of net.DefaultResolver.
type LookupFuncs struct {
	// LookupSRV looks up _service._proto.name SRV records (see
	// net.Resolver.LookupSRV). Default net.DefaultResolver.LookupSRV.
	LookupSRV func(ctx context.Context, service, proto, name string) (string, []*net.SRV, error)
	// LookupIPAddr resolves a host name to its A/AAAA addresses. Default
	// net.DefaultResolver.LookupIPAddr.
	LookupIPAddr func(ctx context.Context, host string) ([]net.IPAddr, error)
}

// Target is where to send requests for a Matrix server name.
type Target struct {
	// Addrs are the "ip:port" addresses to dial, in preference order.
	// They are not SSRF-checked here; dial them through a Guard.
	Addrs []string
	// Host is the value of the HTTP Host header.
	Host string
	// TLSServerName is the name to send as SNI and to verify the
	// certificate against; empty when the target is an IP literal (the
	// certificate must then be valid for that IP and no SNI is sent).
	TLSServerName string
}

// Resolver implements Matrix server discovery: IP literals, explicit ports,
// /.well-known/matrix/server delegation (cached), SRV records
// (_matrix-fed._tcp, then the deprecated _matrix._tcp) and finally A/AAAA
// on port 8448. The zero value is ready to use; a Resolver must not be
// copied after first use and is safe for concurrent use.
type Resolver struct {
	// Lookup holds the DNS lookups; nil fields default to
	// net.DefaultResolver.
	Lookup LookupFuncs
	// HTTPClient fetches .well-known/matrix/server. It should come from
	// NewClient (SSRF-guarded, at most 5 redirects). Default
	// NewClient(Guard{}, nil, 0) created on first use.
	HTTPClient *http.Client
	// Now returns the current time for cache expiry. Default time.Now.
	Now func() time.Time
	// WellKnownTimeout bounds one well-known fetch. Default
	// DefaultWellKnownTimeout (10s).
	WellKnownTimeout time.Duration

	mu sync.Mutex
	// cache holds well-known outcomes by host name; created on first use
	// (under mu), with r.now as its clock.
	cache         *capped.Map[string, wellKnownEntry]
	inflight      map[string]*wellKnownCall
	defaultClient *http.Client
}

// wellKnownEntry is a cached well-known outcome: the delegated server name
// or the error.
type wellKnownEntry struct {
	server string
	err    error
}

// wellKnownCall is one in-flight well-known fetch shared by concurrent
// resolutions of the same host name.
type wellKnownCall struct {
	done   chan struct{}
	server string
	err    error
}

// Resolve finds where to reach the Matrix server serverName, following the
// spec's discovery steps in order:
//
//  1. IP literal: that IP, given port or 8448; no SNI.
//  2. Host name with explicit port: its A/AAAA addresses on that port.
//  3. Valid https://<hostname>/.well-known/matrix/server {"m.server": ...}:
//     3.1 delegated IP literal; 3.2 delegated host with port; 3.3 SRV
//     _matrix-fed._tcp.<delegated>; 3.4 SRV _matrix._tcp.<delegated>;
//     3.5 A/AAAA of the delegated host on 8448. Host header and certificate
//     name are the delegated host (with its port in 3.1/3.2).
//  4. SRV _matrix-fed._tcp.<hostname>; 5. SRV _matrix._tcp.<hostname>;
//  6. A/AAAA of the host name on 8448.
//
// A well-known answer that is missing, not 200, not JSON or without a valid
// "m.server" falls through to step 4. SRV lookup failures fall through to the
// next step. SRV records are ordered by priority (weights are left to the
// lookup function, which net.Resolver already applies); a "." target means
// "no service" and is skipped. SRV targets are not checked for being CNAMEs.
func (r *Resolver) Resolve(ctx context.Context, name string) (Target, error) {
	sn, err := matrix.ParseServerName(name)
	if err != nil {
		return Target{}, fmt.Errorf("resolving server name: %w", err)
	}
	if sn.IP.IsValid() { // step 1
		return ipTarget(sn, name), nil
	}
	if sn.Port != "" { // step 2
		addrs, err := r.lookupHost(ctx, sn.Host, sn.Port)
		if err != nil {
			return Target{}, fmt.Errorf("resolving server name %s: %w", name, err)
		}
		return Target{Addrs: addrs, Host: name, TLSServerName: sn.Host}, nil
	}
	delegated, wkErr := r.wellKnown(ctx, sn.Host) // step 3
	if wkErr == nil {
		t, err := r.resolveDelegated(ctx, delegated)
		if err != nil {
			return Target{}, fmt.Errorf("resolving server name %s via well-known %s: %w", name, delegated, err)
		}
		return t, nil
	}
	if ctx.Err() != nil {
		return Target{}, fmt.Errorf("resolving server name %s: %w", name, ctx.Err())
	}
	// Steps 4–6.
	addrs, err := r.srvOrHost(ctx, sn.Host)
	if err != nil {
		return Target{}, fmt.Errorf("resolving server name %s: %w", name, err)
	}
	return Target{Addrs: addrs, Host: sn.Host, TLSServerName: sn.Host}, nil
}

// resolveDelegated applies steps 3.1–3.5 to a validated m.server value.
func (r *Resolver) resolveDelegated(ctx context.Context, delegated string) (Target, error) {
	dn, err := matrix.ParseServerName(delegated)
	if err != nil {
		return Target{}, err
	}
	if dn.IP.IsValid() { // 3.1
		return ipTarget(dn, delegated), nil
	}
	if dn.Port != "" { // 3.2
		addrs, err := r.lookupHost(ctx, dn.Host, dn.Port)
		if err != nil {
			return Target{}, err
		}
		return Target{Addrs: addrs, Host: delegated, TLSServerName: dn.Host}, nil
	}
	addrs, err := r.srvOrHost(ctx, dn.Host) // 3.3–3.5
	if err != nil {
		return Target{}, err
	}
	return Target{Addrs: addrs, Host: dn.Host, TLSServerName: dn.Host}, nil
}

// ipTarget builds the Target of an IP-literal server name; hostHeader is the
// name as given (including any port).
func ipTarget(sn matrix.ServerName, hostHeader string) Target {
	port := sn.Port
	if port == "" {
		port = DefaultFederationPort
	}
	return Target{
		Addrs: []string{net.JoinHostPort(sn.IP.String(), port)},
		Host:  hostHeader,
	}
}

// srvOrHost tries SRV _matrix-fed._tcp.host, then _matrix._tcp.host, then
// A/AAAA of host on the default port.
func (r *Resolver) srvOrHost(ctx context.Context, host string) ([]string, error) {
	for _, service := range [...]string{"matrix-fed", "matrix"} {
		addrs, found, err := r.lookupSRV(ctx, service, host)
		if err != nil {
			return nil, err
		}
		if found {
			return addrs, nil
		}
	}
	return r.lookupHost(ctx, host, DefaultFederationPort)
}

// lookupSRV resolves _service._tcp.host and the addresses of its targets.
// found is false when there are no usable records (lookup failure, no
// records, or only "." targets); err is set when records exist but none of
// their targets resolves.
func (r *Resolver) lookupSRV(ctx context.Context, service, host string) (addrs []string, found bool, err error) {
	lookup := r.Lookup.LookupSRV
	if lookup == nil {
		lookup = net.DefaultResolver.LookupSRV
	}
	_, recs, lerr := lookup(ctx, service, "tcp", host)
	if lerr != nil || len(recs) == 0 {
		return nil, false, nil
	}
	recs = append([]*net.SRV(nil), recs...)
	sort.SliceStable(recs, func(i, j int) bool { return recs[i].Priority < recs[j].Priority })
	var errs []error
	for _, rec := range recs {
		if rec == nil || rec.Port == 0 {
			continue
		}
		target := strings.TrimSuffix(rec.Target, ".")
		if target == "" {
			continue
		}
		found = true
		a, err := r.lookupHost(ctx, target, strconv.Itoa(int(rec.Port)))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		addrs = append(addrs, a...)
	}
	if len(addrs) == 0 && found {
		return nil, true, fmt.Errorf("resolving SRV _%s._tcp.%s targets: %w", service, host, errors.Join(errs...))
	}
	return addrs, found, nil
}

// lookupHost resolves host (or passes an IP literal through) to "ip:port"
// strings.
func (r *Resolver) lookupHost(ctx context.Context, host, port string) ([]string, error) {
	if ip, err := netip.ParseAddr(host); err == nil {
		return []string{net.JoinHostPort(ip.String(), port)}, nil
	}
	lookup := r.Lookup.LookupIPAddr
	if lookup == nil {
		lookup = net.DefaultResolver.LookupIPAddr
	}
	ips, err := lookup(ctx, host)
	if err != nil {
		return nil, fmt.Errorf("looking up %s: %w", host, err)
	}
	addrs := make([]string, 0, len(ips))
	for _, ip := range ips {
		a, ok := netip.AddrFromSlice(ip.IP)
		if !ok {
			continue
		}
		addrs = append(addrs, net.JoinHostPort(a.Unmap().String(), port))
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("looking up %s: no addresses", host)
	}
	return addrs, nil
}

// now returns the current time from r.Now or time.Now.
func (r *Resolver) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// wellKnown returns the m.server delegation for host, from the cache or by
// fetching it. Concurrent callers for the same host share one fetch; the
// fetch is not cancelled by one caller's context (it is bounded by
// WellKnownTimeout) so that one impatient caller does not cache an error for
// everybody.
func (r *Resolver) wellKnown(ctx context.Context, host string) (string, error) {
	r.mu.Lock()
	if r.cache == nil {
		r.cache = capped.New(capped.Options[string, wellKnownEntry]{Max: wellKnownCacheMax, Now: r.now})
	}
	if e, ok := r.cache.Get(host); ok {
		r.mu.Unlock()
		return e.server, e.err
	}
	c, ok := r.inflight[host]
	if !ok {
		c = &wellKnownCall{done: make(chan struct{})}
		if r.inflight == nil {
			r.inflight = make(map[string]*wellKnownCall)
		}
		r.inflight[host] = c
		client := r.HTTPClient
		if client == nil {
			if r.defaultClient == nil {
				r.defaultClient = NewClient(Guard{}, nil, 0)
			}
			client = r.defaultClient
		}
		timeout := r.WellKnownTimeout
		if timeout <= 0 {
			timeout = DefaultWellKnownTimeout
		}
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
		go func() {
			defer cancel()
			r.fetchAndStore(fctx, client, host, c)
		}()
	}
	r.mu.Unlock()
	select {
	case <-c.done:
		return c.server, c.err
	case <-ctx.Done():
		return "", fmt.Errorf("fetching well-known for %s: %w", host, ctx.Err())
	}
}

// fetchAndStore runs one well-known fetch, caches its outcome and wakes the
// waiters of c.
func (r *Resolver) fetchAndStore(ctx context.Context, client *http.Client, host string, c *wellKnownCall) {
	server, ttl, err := fetchWellKnown(ctx, client, host)
	if err != nil {
		ttl = WellKnownErrorTTL
	}
	r.mu.Lock()
	delete(r.inflight, host)
	if ttl > 0 {
		r.cache.PutTTL(host, wellKnownEntry{server: server, err: err}, ttl)
	}
	c.server, c.err = server, err
	r.mu.Unlock()
	close(c.done)
}

// fetchWellKnown GETs https://host/.well-known/matrix/server and returns the
// validated m.server value and how long to cache it. The body is parsed as
// JSON whatever its Content-Type.
func fetchWellKnown(ctx context.Context, client *http.Client, host string) (string, time.Duration, error) {
	u := "https://" + host + "/.well-known/matrix/server"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", 0, fmt.Errorf("fetching well-known for %s: %w", host, err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", 0, fmt.Errorf("fetching well-known for %s: %w", host, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", 0, fmt.Errorf("fetching well-known for %s: unexpected status %d", host, resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, WellKnownMaxBytes+1))
	if err != nil {
		return "", 0, fmt.Errorf("reading well-known for %s: %w", host, err)
	}
	if len(body) > WellKnownMaxBytes {
		return "", 0, fmt.Errorf("reading well-known for %s: body larger than %d bytes", host, WellKnownMaxBytes)
	}
	var doc struct {
		Server *string `json:"m.server"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return "", 0, fmt.Errorf("parsing well-known for %s: %w", host, err)
	}
	if doc.Server == nil {
		return "", 0, fmt.Errorf("parsing well-known for %s: missing m.server", host)
	}
	if _, err := matrix.ParseServerName(*doc.Server); err != nil {
		return "", 0, fmt.Errorf("parsing well-known for %s: %w", host, err)
	}
	return *doc.Server, cacheTTL(resp.Header.Get("Cache-Control")), nil
}

// cacheTTL derives the cache lifetime of a well-known answer from its
// Cache-Control header: max-age (capped at WellKnownMaxTTL), 0 for no-store,
// otherwise WellKnownDefaultTTL.
func cacheTTL(cc string) time.Duration {
	ttl := WellKnownDefaultTTL
	for _, d := range strings.Split(cc, ",") {
		d = strings.ToLower(strings.TrimSpace(d))
		switch {
		case d == "no-store":
			return 0
		case strings.HasPrefix(d, "max-age="):
			v := strings.Trim(strings.TrimPrefix(d, "max-age="), `"`)
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 {
				continue
			}
			if n > int64(WellKnownMaxTTL/time.Second) {
				ttl = WellKnownMaxTTL
			} else {
				ttl = time.Duration(n) * time.Second
			}
		}
	}
	return ttl
}
