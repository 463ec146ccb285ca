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

// RateRules are the buckets of one class: one per client IP and one per
// user. A zero Rule means no bucket. Debt is set by the site (byte classes
// and failed_auth are volume rules), whatever is given.
type RateRules struct {
	// PerIP is the bucket of each client IP (IPv6 addresses share one per
	// /64). Default: none.
	PerIP ratelimit.Rule
	// PerUser is the bucket of each user (authenticated requests only;
	// never for failed_auth). Default: none.
	PerUser ratelimit.Rule
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
)

// siteLimits are a site's validated rate limits.
type siteLimits struct {
	RateLimits
	// keyPrefix starts every bucket key: the server name.
	keyPrefix string
	// prefixes start the bucket keys of each class and scope:
	// "<server>\x00<class>\x00ip:" and "...\x00user:".
	prefixes [NumRateClasses][2]string
	// reasons are the LimitRejected reasons, by class and scope.
	reasons [NumRateClasses][2]string
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
		for _, r := range []*ratelimit.Rule{&rules.PerIP, &rules.PerUser} {
			if *r == (ratelimit.Rule{}) {
				continue
			}
			r.Debt = volume
			if err := r.Valid(); err != nil {
				return nil, fmt.Errorf("rate limits: %s: %w", c, err)
			}
			hasRule = true
		}
		l.reasons[c] = [2]string{"rate_" + c.String() + "_ip", "rate_" + c.String() + "_user"}
		l.prefixes[c] = [2]string{l.keyPrefix + c.String() + "\x00ip:", l.keyPrefix + c.String() + "\x00user:"}
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
	var arr [4]ratelimit.Bucket
	var scopes [4]rateScope
	var classes [4]RateClass
	n := 0
	for _, c := range costs {
		rules := &l.Classes[c.class]
		if rules.PerIP != (ratelimit.Rule{}) && rr.ip.IsValid() && n < len(arr) {
			arr[n] = ratelimit.Bucket{Key: ipKey(l.prefixes[c.class][scopeIP], rr.ip), Rule: rules.PerIP, Cost: c.cost, Force: c.force}
			scopes[n], classes[n] = scopeIP, c.class
			n++
		}
		if user != nil && user.UserID != "" && rules.PerUser != (ratelimit.Rule{}) && n < len(arr) {
			arr[n] = ratelimit.Bucket{Key: l.prefixes[c.class][scopeUser] + user.UserID, Rule: rules.PerUser, Cost: c.cost, Force: c.force}
			scopes[n], classes[n] = scopeUser, c.class
			n++
		}
	}
	bs := arr[:n]
	if len(bs) == 0 {
		return nil
	}
	d := l.Limiter.Take(r.Context(), bs...)
	if d.Allowed {
		return nil
	}
	if l.ExemptAdmins && user != nil && s.isAdmin(r, *user) {
		return nil
	}
	c := classes[d.Refused]
	s.repo.metrics.LimitRejected(s.cfg.ServerName, l.reasons[c][scopes[d.Refused]])
	return matrix.LimitExceeded(l.messages[c], max(d.RetryAfter, time.Millisecond))
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

// remoteAdmission returns the check made before a request fetches remote
// media (nil when remote fetches are not limited).
func (s *Site) remoteAdmission(r *http.Request, user *auth.User) func() error {
	if !s.rate.has(RateRemote) {
		return nil
	}
	return func() error {
		if merr := s.checkLimit(r, user, rateCost{class: RateRemote, cost: 1}); merr != nil {
			return merr
		}
		return nil
	}
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
