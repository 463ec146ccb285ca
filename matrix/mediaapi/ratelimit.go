package mediaapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/ratelimit"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
)

// RateClass is what a rate limit counts.
type RateClass uint8

// Rate classes. Request classes take one token per request; the byte
// classes take the request's bytes and allow a request while their bucket
// is positive (so one large file is never refused forever; its debt delays
// what follows); failed_auth takes one token per access token the
// homeserver rejected and is per client IP only.
const (
	// RateUpload counts uploads (POST upload, PUT upload) and /create.
	RateUpload RateClass = iota
	// RateDownload counts downloads (client endpoints).
	RateDownload
	// RateThumbnail counts thumbnail requests.
	RateThumbnail
	// RatePreview counts URL preview requests.
	RatePreview
	// RateRemote counts requests that fetch remote media (or a remote
	// thumbnail) not cached yet, or join such a fetch.
	RateRemote
	// RateUploadBytes counts uploaded bytes: Content-Length up front, or
	// (chunked bodies) what was received, charged after the upload.
	RateUploadBytes
	// RateDownloadBytes counts the bytes of downloads (the range asked
	// for; nothing for HEAD and 304), thumbnails excluded.
	RateDownloadBytes
	// RateFailedAuth counts access tokens the homeserver rejected, per
	// client IP: when the bucket is empty, unknown tokens are refused with
	// 429 without asking the homeserver (tokens already cached still
	// work).
	RateFailedAuth
	// NumRateClasses is the number of classes.
	NumRateClasses
)

// rateClassNames are the classes' names, as in the config and the metric
// reasons.
var rateClassNames = [NumRateClasses]string{
	RateUpload: "upload", RateDownload: "download", RateThumbnail: "thumbnail", RatePreview: "preview",
	RateRemote: "remote", RateUploadBytes: "upload_bytes", RateDownloadBytes: "download_bytes", RateFailedAuth: "failed_auth",
}

// String returns the class's name: upload, download, thumbnail, preview,
// remote, upload_bytes, download_bytes or failed_auth.
func (c RateClass) String() string {
	if c < NumRateClasses {
		return rateClassNames[c]
	}
	return fmt.Sprintf("RateClass(%d)", uint8(c))
}

// ParseRateClass returns the class named name.
func ParseRateClass(name string) (RateClass, bool) {
	for c, n := range rateClassNames {
		if n == name {
			return RateClass(c), true
		}
	}
	return 0, false
}

// IsBytes reports whether the class counts bytes.
func (c RateClass) IsBytes() bool { return c == RateUploadBytes || c == RateDownloadBytes }

// RateRules are the buckets of one class: one per client IP, one per user
// and (download and thumbnail only) one per remote server asking over
// federation. A zero Rule means no bucket. Debt is set by the site (byte
// classes and failed_auth are volume rules), whatever is given.
type RateRules struct {
	// PerIP is the bucket of each client IP (IPv6 addresses share one per
	// /64), for client and federation requests alike. Default: none.
	PerIP ratelimit.Rule
	// PerUser is the bucket of each user (authenticated requests only;
	// never for failed_auth). Default: none.
	PerUser ratelimit.Rule
	// PerServer is the bucket of each remote server requesting media over
	// federation (the X-Matrix origin, once its signature is verified):
	// RateDownload for /_matrix/federation/v1/media/download, RateThumbnail
	// for .../thumbnail. Other classes have none. Default: none.
	PerServer ratelimit.Rule
}

// RateLimits configure a site's rate limits. Buckets are named by the
// site's server name, the class and the IP or user, so sites never share
// them; instances sharing a Limiter (Redis) share them, and must then use
// the same rules.
type RateLimits struct {
	// Limiter holds the buckets. Required.
	Limiter ratelimit.Limiter
	// Classes are the rules per class. Default: no limits.
	Classes [NumRateClasses]RateRules
	// Exempt are networks whose clients are never limited (include
	// 127.0.0.0/8 and ::1/128 to exempt loopback). Default: none.
	Exempt []netip.Prefix
	// ExemptAdmins exempts media admins from every limit. The admin check
	// is made only when a request would be refused. Default false.
	ExemptAdmins bool
	// ExemptAppservices exempts appservice tokens. Default false.
	ExemptAppservices bool
}

// rateScope is what a bucket is per.
type rateScope uint8

const (
	scopeIP rateScope = iota
	scopeUser
	scopeServer
	numScopes
)

// siteLimits are a site's validated rate limits.
type siteLimits struct {
	RateLimits
	// keyPrefix starts every bucket key: the server name.
	keyPrefix string
	// prefixes start the bucket keys of each class and scope:
	// "<server>\x00<class>\x00ip:", "...\x00user:" and "...\x00server:".
	prefixes [NumRateClasses][numScopes]string
	// reasons are the LimitRejected reasons, by class and scope.
	reasons [NumRateClasses][numScopes]string
	// messages are the error messages, by class.
	messages [NumRateClasses]string
}

// newSiteLimits validates rl for the site serverName; nil rl (or one
// without any rule) gives nil: no limits.
func newSiteLimits(serverName string, rl *RateLimits) (*siteLimits, error) {
	if rl == nil {
		return nil, nil
	}
	l := &siteLimits{RateLimits: *rl, keyPrefix: serverName + "\x00"}
	hasRule := false
	for c := range NumRateClasses {
		rules := &l.Classes[c]
		volume := c.IsBytes() || c == RateFailedAuth
		if c == RateFailedAuth && rules.PerUser != (ratelimit.Rule{}) {
			return nil, errors.New("rate limits: failed_auth is per IP only")
		}
		if c != RateDownload && c != RateThumbnail && rules.PerServer != (ratelimit.Rule{}) {
			return nil, fmt.Errorf("rate limits: %s has no per-server bucket (only download and thumbnail)", c)
		}
		for _, r := range []*ratelimit.Rule{&rules.PerIP, &rules.PerUser, &rules.PerServer} {
			if *r == (ratelimit.Rule{}) {
				continue
			}
			r.Debt = volume
			if err := r.Valid(); err != nil {
				return nil, fmt.Errorf("rate limits: %s: %w", c, err)
			}
			hasRule = true
		}
		l.reasons[c] = [numScopes]string{"rate_" + c.String() + "_ip", "rate_" + c.String() + "_user", "rate_" + c.String() + "_server"}
		l.prefixes[c] = [numScopes]string{l.keyPrefix + c.String() + "\x00ip:", l.keyPrefix + c.String() + "\x00user:",
			l.keyPrefix + c.String() + "\x00server:"}
		l.messages[c] = "Too many requests (" + c.String() + "), retry later"
	}
	l.messages[RateUploadBytes] = "Too many bytes uploaded lately, retry later"
	l.messages[RateDownloadBytes] = "Too many bytes downloaded lately, retry later"
	l.messages[RateFailedAuth] = "Too many unrecognised access tokens from this address, retry later"
	if !hasRule {
		return nil, nil
	}
	if l.Limiter == nil {
		return nil, errors.New("rate limits: no limiter")
	}
	for i, p := range l.Exempt {
		if !p.IsValid() {
			return nil, fmt.Errorf("rate limits: exempt network %d is invalid", i+1)
		}
		l.Exempt[i] = p.Masked()
	}
	return l, nil
}

// clientIPKey is the context key of the client IP.
type clientIPKey struct{}

// WithClientIP returns ctx carrying the client's address as the front end
// determined it (the Caddy layer passes Caddy's client_ip, which honours
// the server's trusted_proxies). Requests without it are attributed to the
// address of their connection (RemoteAddr).
func WithClientIP(ctx context.Context, ip netip.Addr) context.Context {
	return context.WithValue(ctx, clientIPKey{}, ip)
}

// clientIP returns the request's client IP (unmapped); invalid when unknown.
func clientIP(r *http.Request) netip.Addr {
	if ip, ok := r.Context().Value(clientIPKey{}).(netip.Addr); ok {
		return ip.Unmap()
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}
	}
	return ip.WithZone("").Unmap()
}

// ipKey returns prefix followed by the name of a client IP: the address
// for IPv4, its /64 for IPv6 (one subscriber's usual allocation), built
// with one allocation.
func ipKey(prefix string, ip netip.Addr) string {
	var buf [96]byte
	b := append(buf[:0], prefix...)
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return string(p.AppendTo(b))
	}
	return string(ip.AppendTo(b))
}

// rateRequest is the limit state of one request: its client IP, once
// looked up.
type rateRequest struct {
	ip     netip.Addr
	exempt bool
}

// rateRequestOf looks up the request's client IP and whether it is exempt.
func (l *siteLimits) rateRequestOf(r *http.Request) rateRequest {
	rr := rateRequest{ip: clientIP(r)}
	for _, p := range l.Exempt {
		if rr.ip.IsValid() && p.Contains(rr.ip) {
			rr.exempt = true
			break
		}
	}
	return rr
}

// rateCost is one class's cost in a check.
type rateCost struct {
	class RateClass
	cost  float64
	// force charges cost without a check (ratelimit.Bucket.Force): for
	// what already happened, never refused.
	force bool
}

// maxCheckClasses is the most classes one check charges: the admission
// of a remote fetch by a download whose bytes are limited (remote,
// download, download_bytes: admitWork); uploads charge two (upload,
// upload_bytes), other requests one.
const maxCheckClasses = 3

// maxCheckBuckets is the most buckets one check names: per IP and per user
// for each of its classes (federation requests have per IP and per server
// instead of per user). A check naming more still charges them all (its
// buckets then live on the heap); none is ever left out.
const maxCheckBuckets = 2 * maxCheckClasses

// limit takes the costs from the buckets of the request's client IP and
// of user (nil for anonymous requests), in one Limiter call. It returns 0
// when the request may go on; otherwise it answers 429 M_LIMIT_EXCEEDED
// with Retry-After and returns the status.
func (s *Site) limit(w http.ResponseWriter, r *http.Request, user *auth.User, costs ...rateCost) int {
	if merr := s.checkLimit(r, user, costs...); merr != nil {
		return writeErr(w, merr)
	}
	return 0
}

// checkLimit is limit without the answer: nil when the request may go on,
// else the 429 M_LIMIT_EXCEEDED error (counted as rate_<class>_<ip|user>).
// Exempt networks, appservices and (when refused) admins pass.
func (s *Site) checkLimit(r *http.Request, user *auth.User, costs ...rateCost) *matrix.Error {
	return s.checkRate(r, user, "", costs)
}

// checkRate takes the costs from the buckets of the request's client IP,
// of user (nil: none) and of the federation origin server (empty: none),
// every bucket in one Limiter call.
func (s *Site) checkRate(r *http.Request, user *auth.User, origin string, costs []rateCost) *matrix.Error {
	l := s.rate
	if l == nil {
		return nil
	}
	if user != nil && (l.ExemptAppservices && user.AppserviceID != "" || l.ExemptAdmins && user.IsAdmin) {
		return nil
	}
	rr := l.rateRequestOf(r)
	if rr.exempt {
		return nil
	}
	// Most checks of a limited site name no bucket at all (their classes
	// are unlimited): they end here, before the buckets (which escape,
	// through the Limiter interface) are allocated.
	limited := false
	for _, c := range costs {
		rules := &l.Classes[c.class]
		if rules.PerIP != (ratelimit.Rule{}) && rr.ip.IsValid() || user != nil && user.UserID != "" && rules.PerUser != (ratelimit.Rule{}) ||
			origin != "" && rules.PerServer != (ratelimit.Rule{}) {
			limited = true
			break
		}
	}
	if !limited {
		return nil
	}
	// Each bucket's scope and class, for the answer and the metric.
	type named struct {
		scope rateScope
		class RateClass
	}
	var arr [maxCheckBuckets]ratelimit.Bucket
	var names [maxCheckBuckets]named
	bs, ns := arr[:0], names[:0]
	for _, c := range costs {
		rules := &l.Classes[c.class]
		if rules.PerIP != (ratelimit.Rule{}) && rr.ip.IsValid() {
			bs = append(bs, ratelimit.Bucket{Key: ipKey(l.prefixes[c.class][scopeIP], rr.ip), Rule: rules.PerIP, Cost: c.cost, Force: c.force})
			ns = append(ns, named{scopeIP, c.class})
		}
		if user != nil && user.UserID != "" && rules.PerUser != (ratelimit.Rule{}) {
			bs = append(bs, ratelimit.Bucket{Key: l.prefixes[c.class][scopeUser] + user.UserID, Rule: rules.PerUser, Cost: c.cost, Force: c.force})
			ns = append(ns, named{scopeUser, c.class})
		}
		if origin != "" && rules.PerServer != (ratelimit.Rule{}) {
			bs = append(bs, ratelimit.Bucket{Key: l.prefixes[c.class][scopeServer] + origin, Rule: rules.PerServer, Cost: c.cost, Force: c.force})
			ns = append(ns, named{scopeServer, c.class})
		}
	}
	d := l.Limiter.Take(r.Context(), bs...)
	if d.Allowed {
		return nil
	}
	if l.ExemptAdmins && user != nil && s.isAdmin(r, *user) {
		return nil
	}
	who := ns[d.Refused]
	s.repo.metrics.LimitRejected(s.cfg.ServerName, l.reasons[who.class][who.scope])
	return matrix.LimitExceeded(l.messages[who.class], max(d.RetryAfter, time.Millisecond))
}

// uploadCosts are the costs of an upload request: one upload and its
// announced bytes (nothing yet when the length is unknown: chargeUpload
// charges them afterwards; nothing for a length over the upload limit,
// which is refused with 413 next).
func (s *Site) uploadCosts(r *http.Request) []rateCost {
	n := r.ContentLength
	if n < 0 || n > s.cfg.MaxUploadSize {
		n = 0
	}
	return []rateCost{{class: RateUpload, cost: 1}, {class: RateUploadBytes, cost: float64(n)}}
}

// chargeUpload charges the bytes of an upload received without a
// Content-Length, once they are known, whatever the bucket holds (the
// next upload is refused while it is not positive).
func (s *Site) chargeUpload(r *http.Request, user *auth.User, size int64) {
	if r.ContentLength >= 0 || !s.rate.has(RateUploadBytes) || size <= 0 {
		return
	}
	_ = s.checkLimit(r, user, rateCost{class: RateUploadBytes, cost: float64(size), force: true})
}

// downloadCost is what a download of e will send: the range asked for,
// nothing for HEAD, 304 and 416.
func downloadCost(r *http.Request, e *mediaEntry) float64 {
	if r.Method == http.MethodHead || notModified(r, e) {
		return 0
	}
	if rv := r.Header["Range"]; len(rv) > 0 && ifRangeHolds(r, e) {
		_, length, kind := parseRange(rv[0], e.m.Size)
		switch kind {
		case rangeSatisfiable:
			return float64(length)
		case rangeUnsatisfiable:
			return 0
		}
	}
	return float64(e.m.Size)
}

// admitWork charges, in one Limiter call, what a request must be allowed
// before resolve does something costly for it (waits for a pending upload;
// fetches remote media, fetch true): a remote fetch (RateRemote), and the
// download its handler deferred (o.deferDownload: the request, with its
// bytes bucket asked to be positive; the bytes are charged once known).
// The deferred download is then charged (o.deferDownload cleared), also
// when refused: the refusal is the answer. nil when allowed.
func (s *Site) admitWork(o *resolveOptions, fetch bool) error {
	if o.req == nil {
		return nil
	}
	var buf [maxCheckClasses]rateCost
	costs := buf[:0]
	if fetch && s.rate.has(RateRemote) {
		costs = append(costs, rateCost{class: RateRemote, cost: 1})
	}
	if o.deferDownload {
		o.deferDownload = false
		costs = append(costs, rateCost{class: RateDownload, cost: 1}, rateCost{class: RateDownloadBytes})
	}
	if len(costs) == 0 {
		return nil
	}
	if merr := s.checkLimit(o.req, o.user, costs...); merr != nil {
		return merr
	}
	return nil
}

// chargeDownload charges a download of e: the request (when its handler
// deferred it) and the bytes sent (downloadCost), in one Limiter call.
func (s *Site) chargeDownload(o *resolveOptions, e *mediaEntry) *matrix.Error {
	var buf [2]rateCost
	costs := buf[:0]
	if o.deferDownload {
		o.deferDownload = false
		costs = append(costs, rateCost{class: RateDownload, cost: 1})
	}
	if s.rate.has(RateDownloadBytes) {
		costs = append(costs, rateCost{class: RateDownloadBytes, cost: downloadCost(o.req, e)})
	}
	if len(costs) == 0 {
		return nil
	}
	return s.checkLimit(o.req, o.user, costs...)
}

// chargeStreamed charges the bytes of remote media streamed to the
// client of o as it is fetched (a whole GET): size, the whole file,
// forced (the request was admitted with its bytes bucket positive, and
// the fetch has started).
func (s *Site) chargeStreamed(o *resolveOptions, size int64) {
	if o.req == nil || !s.rate.has(RateDownloadBytes) || size <= 0 {
		return
	}
	_ = s.checkLimit(o.req, o.user, rateCost{class: RateDownloadBytes, cost: float64(size), force: true})
}

// checkFederation limits a federation media request of origin (verified)
// in class (RateDownload or RateThumbnail): the buckets of its client IP
// and of the origin server.
func (s *Site) checkFederation(r *http.Request, origin string, class RateClass) *matrix.Error {
	if !s.rate.has(class) {
		return nil
	}
	return s.checkRate(r, nil, origin, []rateCost{{class: class, cost: 1}})
}

// has reports whether the class has any bucket.
func (l *siteLimits) has(c RateClass) bool {
	return l != nil && l.Classes[c] != (RateRules{})
}

// authGate is the auth.CheckGate of one request: the failed_auth bucket of
// its client IP (named only when asked: most tokens are cached).
type authGate struct {
	l  *siteLimits
	ip netip.Addr
}

// bucket is the gate's bucket, with cost.
func (g *authGate) bucket(cost float64) ratelimit.Bucket {
	return ratelimit.Bucket{Key: ipKey(g.l.prefixes[RateFailedAuth][scopeIP], g.ip), Rule: g.l.Classes[RateFailedAuth].PerIP, Cost: cost}
}

// AllowCheck implements auth.CheckGate: the bucket is positive.
func (g *authGate) AllowCheck(ctx context.Context) (bool, time.Duration) {
	d := g.l.Limiter.Take(ctx, g.bucket(0))
	return d.Allowed, d.RetryAfter
}

// CheckFailed implements auth.CheckGate: one rejected token.
// The charge is forced: checks that passed AllowCheck together are all
// charged, so concurrent unknown tokens cannot share one token of the
// bucket.
func (g *authGate) CheckFailed(ctx context.Context) {
	b := g.bucket(1)
	b.Force = true
	g.l.Limiter.Take(ctx, b)
}

// checkGate returns the request's gate for unknown tokens, nil when
// failed_auth is not limited or the client is exempt.
func (s *Site) checkGate(r *http.Request) auth.CheckGate {
	l := s.rate
	if l == nil || l.Classes[RateFailedAuth].PerIP == (ratelimit.Rule{}) {
		return nil
	}
	rr := l.rateRequestOf(r)
	if rr.exempt || !rr.ip.IsValid() {
		return nil
	}
	return &authGate{l: l, ip: rr.ip}
}

// failedChecks answers a request refused by its check gate.
func (s *Site) failedChecks(w http.ResponseWriter, fe *auth.FailedChecksError) int {
	s.repo.metrics.LimitRejected(s.cfg.ServerName, "rate_failed_auth_ip")
	return writeErr(w, matrix.LimitExceeded(s.rate.messages[RateFailedAuth], max(fe.RetryAfter, time.Millisecond)))
}
