package caddymodule

import (
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/ratelimit"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
)

// RateLimitsConfig are a site's rate limits: token buckets per client IP
// (Caddy's client_ip, which honours the server's trusted_proxies; IPv6
// addresses share a bucket per /64) and per user, for each class of
// request, and per remote server for the federation media endpoints
// (download and thumbnail classes). Over a limit, requests get 429
// M_LIMIT_EXCEEDED with Retry-After.
//
// Without a rate_limits block a site has no rate limits. With one, every
// class has the defaults below unless it is set, and a rule set to off has
// no bucket. Buckets are in memory (bounded by the app's rate_limit_keys)
// or, with the app's redis set, in Redis, shared by every instance (which
// must then configure the same limits); when Redis is unreachable requests
// are allowed (counted in
// caddy_matrix_media_rate_limit_fail_open_total).
//
// Defaults (limit per window; the burst is the limit unless set):
//
//	class           per_ip        per_user
//	upload          60/1m         30/1m       (uploads and /create)
//	download        600/1m        600/1m      (per_server 1200/1m: federation downloads)
//	thumbnail       1200/1m       1200/1m     (per_server 2400/1m: federation thumbnails)
//	preview         60/1m         30/1m
//	remote          120/1m        60/1m       (requests fetching remote media not cached)
//	upload_bytes    10GiB/1h      5GiB/1h
//	download_bytes  50GiB/1h      20GiB/1h
//	failed_auth     30/1m         -           (unknown access tokens, refused before the homeserver is asked)
type RateLimitsConfig struct {
	// Upload limits uploads (POST upload, PUT upload) and /create.
	Upload *RateClassConfig `json:"upload,omitempty"`
	// Download limits downloads, and federation downloads (per_ip and
	// per_server).
	Download *RateClassConfig `json:"download,omitempty"`
	// Thumbnail limits thumbnail requests, and federation thumbnails
	// (per_ip and per_server).
	Thumbnail *RateClassConfig `json:"thumbnail,omitempty"`
	// Preview limits URL previews.
	Preview *RateClassConfig `json:"preview,omitempty"`
	// Remote limits requests that fetch remote media (or a remote
	// thumbnail) not cached yet.
	Remote *RateClassConfig `json:"remote,omitempty"`
	// UploadBytes limits uploaded bytes (limit and burst in bytes). A
	// request is allowed while its bucket is positive and is charged its
	// whole size, so one large file always gets through an idle bucket.
	UploadBytes *RateClassConfig `json:"upload_bytes,omitempty"`
	// DownloadBytes limits downloaded bytes (thumbnails excluded), like
	// UploadBytes.
	DownloadBytes *RateClassConfig `json:"download_bytes,omitempty"`
	// FailedAuth limits access tokens the homeserver rejected, per client
	// IP only: once the IP's bucket is empty, tokens not in the token cache
	// are refused (429) without asking the homeserver.
	FailedAuth *RateClassConfig `json:"failed_auth,omitempty"`

	// Exempt are networks (CIDR, or single addresses) whose clients are
	// never limited. Default: none.
	Exempt []string `json:"exempt,omitempty"`
	// ExemptLoopback exempts 127.0.0.0/8 and ::1. Default false. (Behind a
	// proxy on the same machine, set the server's trusted_proxies instead:
	// otherwise every client is the proxy's address.)
	ExemptLoopback bool `json:"exempt_loopback,omitempty"`
	// ExemptAdmins exempts the site's media admins (checked only when a
	// request would be refused). Default false.
	ExemptAdmins bool `json:"exempt_admins,omitempty"`
	// ExemptAppservices exempts requests made with an appservice's token.
	// Default false.
	ExemptAppservices bool `json:"exempt_appservices,omitempty"`
}

// RateClassConfig are the buckets of one class.
type RateClassConfig struct {
	// PerIP is the bucket of each client IP. Default: the class's default.
	PerIP *RateRuleConfig `json:"per_ip,omitempty"`
	// PerUser is the bucket of each user (authenticated requests). Default:
	// the class's default.
	PerUser *RateRuleConfig `json:"per_user,omitempty"`
	// PerServer is the bucket of each remote server requesting our media
	// over federation (its X-Matrix origin, once verified); download and
	// thumbnail only. Default: the class's default (download 1200/1m,
	// thumbnail 2400/1m; other classes none).
	PerServer *RateRuleConfig `json:"per_server,omitempty"`
}

// RateRuleConfig is one token bucket: Limit requests (or bytes) per Window,
// with bursts of up to Burst.
type RateRuleConfig struct {
	// Off removes the bucket (no limit). Default false.
	Off bool `json:"off,omitempty"`
	// Limit is how many requests (bytes, for the byte classes) the bucket
	// regains per Window. Required unless Off.
	Limit int64 `json:"limit,omitempty"`
	// Window is the period of Limit. Required unless Off.
	Window caddy.Duration `json:"window,omitempty"`
	// Burst is the bucket's capacity: how many requests (bytes) may come at
	// once after a quiet period. Default Limit.
	Burst int64 `json:"burst,omitempty"`
}

// rateDefault is a class's default rules (a zero server: none).
type rateDefault struct{ ip, user, server RateRuleConfig }

// rateDefaults are the defaults of a rate_limits block, by class.
var rateDefaults = [mediaapi.NumRateClasses]rateDefault{
	mediaapi.RateUpload:        {ip: perWindow(60, time.Minute), user: perWindow(30, time.Minute)},
	mediaapi.RateDownload:      {ip: perWindow(600, time.Minute), user: perWindow(600, time.Minute), server: perWindow(1200, time.Minute)},
	mediaapi.RateThumbnail:     {ip: perWindow(1200, time.Minute), user: perWindow(1200, time.Minute), server: perWindow(2400, time.Minute)},
	mediaapi.RatePreview:       {ip: perWindow(60, time.Minute), user: perWindow(30, time.Minute)},
	mediaapi.RateRemote:        {ip: perWindow(120, time.Minute), user: perWindow(60, time.Minute)},
	mediaapi.RateUploadBytes:   {ip: perWindow(10<<30, time.Hour), user: perWindow(5<<30, time.Hour)},
	mediaapi.RateDownloadBytes: {ip: perWindow(50<<30, time.Hour), user: perWindow(20<<30, time.Hour)},
	mediaapi.RateFailedAuth:    {ip: perWindow(30, time.Minute), user: RateRuleConfig{Off: true}},
}

func perWindow(n int64, w time.Duration) RateRuleConfig {
	return RateRuleConfig{Limit: n, Window: caddy.Duration(w)}
}

// classes returns the configured classes by mediaapi class (nil: unset).
func (c *RateLimitsConfig) classes() [mediaapi.NumRateClasses]*RateClassConfig {
	return [mediaapi.NumRateClasses]*RateClassConfig{
		mediaapi.RateUpload: c.Upload, mediaapi.RateDownload: c.Download, mediaapi.RateThumbnail: c.Thumbnail,
		mediaapi.RatePreview: c.Preview, mediaapi.RateRemote: c.Remote, mediaapi.RateUploadBytes: c.UploadBytes,
		mediaapi.RateDownloadBytes: c.DownloadBytes, mediaapi.RateFailedAuth: c.FailedAuth,
	}
}

// classPtr returns where the class's config lives.
func (c *RateLimitsConfig) classPtr(class mediaapi.RateClass) **RateClassConfig {
	return [mediaapi.NumRateClasses]**RateClassConfig{
		mediaapi.RateUpload: &c.Upload, mediaapi.RateDownload: &c.Download, mediaapi.RateThumbnail: &c.Thumbnail,
		mediaapi.RatePreview: &c.Preview, mediaapi.RateRemote: &c.Remote, mediaapi.RateUploadBytes: &c.UploadBytes,
		mediaapi.RateDownloadBytes: &c.DownloadBytes, mediaapi.RateFailedAuth: &c.FailedAuth,
	}[class]
}

// build turns the config (nil: no limits) into the site's rate limits on
// limiter, defaults applied.
func (c *RateLimitsConfig) build(limiter ratelimit.Limiter) (*mediaapi.RateLimits, error) {
	if c == nil {
		return nil, nil
	}
	rl := &mediaapi.RateLimits{Limiter: limiter, ExemptAdmins: c.ExemptAdmins, ExemptAppservices: c.ExemptAppservices}
	for class, cc := range c.classes() {
		class := mediaapi.RateClass(class)
		def := rateDefaults[class]
		ip, user, server := def.ip, def.user, def.server
		if server == (RateRuleConfig{}) {
			server.Off = true
		}
		if cc != nil && cc.PerIP != nil {
			ip = *cc.PerIP
		}
		if cc != nil && cc.PerUser != nil {
			user = *cc.PerUser
		}
		if cc != nil && cc.PerServer != nil {
			if class != mediaapi.RateDownload && class != mediaapi.RateThumbnail {
				return nil, fmt.Errorf("rate_limits: %s has no per_server bucket (only download and thumbnail)", class)
			}
			server = *cc.PerServer
		}
		var err error
		if rl.Classes[class].PerIP, err = ip.rule(); err != nil {
			return nil, fmt.Errorf("rate_limits: %s per_ip: %w", class, err)
		}
		if rl.Classes[class].PerUser, err = user.rule(); err != nil {
			return nil, fmt.Errorf("rate_limits: %s per_user: %w", class, err)
		}
		if rl.Classes[class].PerServer, err = server.rule(); err != nil {
			return nil, fmt.Errorf("rate_limits: %s per_server: %w", class, err)
		}
		if class == mediaapi.RateFailedAuth && rl.Classes[class].PerUser != (ratelimit.Rule{}) {
			return nil, fmt.Errorf("rate_limits: failed_auth is per_ip only")
		}
	}
	for _, s := range c.Exempt {
		p, err := parsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("rate_limits: exempt: %w", err)
		}
		rl.Exempt = append(rl.Exempt, p)
	}
	if c.ExemptLoopback {
		rl.Exempt = append(rl.Exempt, netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128"))
	}
	return rl, nil
}

// rule converts one bucket config (the zero Rule when off).
func (r RateRuleConfig) rule() (ratelimit.Rule, error) {
	if r.Off {
		return ratelimit.Rule{}, nil
	}
	switch {
	case r.Limit <= 0:
		return ratelimit.Rule{}, fmt.Errorf("limit must be positive (or the rule off), got %d", r.Limit)
	case r.Window <= 0:
		return ratelimit.Rule{}, fmt.Errorf("window must be positive, got %s", time.Duration(r.Window))
	case r.Burst < 0:
		return ratelimit.Rule{}, fmt.Errorf("burst must not be negative, got %d", r.Burst)
	}
	burst := r.Burst
	if burst == 0 {
		burst = r.Limit
	}
	return ratelimit.Rule{Rate: float64(r.Limit) / time.Duration(r.Window).Seconds(), Burst: float64(burst)}, nil
}

// parsePrefix parses a CIDR or a single address.
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("invalid network %q: %w", s, err)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("invalid address %q: %w", s, err)
	}
	return netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()), nil
}

// rateLimitFailOpen counts rate-limit decisions taken without Redis. It is
// package-level so that its value survives reloads.
var rateLimitFailOpen = prometheus.NewCounter(prometheus.CounterOpts{
	Namespace: "caddy", Subsystem: "matrix_media", Name: "rate_limit_fail_open_total",
	Help: "Rate-limit checks allowed without asking Redis because it was unreachable (limits fail open).",
})

// pooledLimiter is an in-memory limiter in authPool, so that a reload
// keeps its buckets.
type pooledLimiter struct{ l *ratelimit.Memory }

// Destruct implements caddy.Destructor; memory holds nothing to close.
func (*pooledLimiter) Destruct() error { return nil }

// provisionLimiter gives the app its rate-limit store: Redis (on the token
// bus's client) when redis is set, else the pooled in-memory limiter of
// rate_limit_keys buckets.
func (a *App) provisionLimiter(ctx caddy.Context) error {
	if a.RateLimitKeys < 0 {
		return fmt.Errorf("rate_limit_keys must not be negative, got %d", a.RateLimitKeys)
	}
	if err := registerCollectors(ctx.GetMetricsRegistry(), []prometheus.Collector{rateLimitFailOpen}); err != nil {
		return err
	}
	if a.auth.bus != nil {
		a.auth.limiter = ratelimit.NewRedis(a.auth.bus.Client(), ratelimit.RedisOptions{
			OnFailOpen: func(error) { rateLimitFailOpen.Inc() },
			Logger:     a.logger.Named("ratelimit"),
		})
		return nil
	}
	keys := a.RateLimitKeys
	if keys == 0 {
		keys = ratelimit.DefaultMaxKeys
	}
	key := "ratelimit-memory\x00" + strconv.Itoa(keys)
	val, _, err := authPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		return &pooledLimiter{l: ratelimit.NewMemory(ratelimit.MemoryOptions{Max: keys})}, nil
	})
	if err != nil {
		return fmt.Errorf("creating rate limiter: %w", err)
	}
	a.auth.keys = append(a.auth.keys, key)
	a.auth.limiter = val.(*pooledLimiter).l
	return nil
}

// limiter returns the app's rate-limit store.
func (a *App) limiter() ratelimit.Limiter { return a.auth.limiter }

// parseRateLimits parses a rate_limits block:
//
//	rate_limits {
//		<class> [per_ip|per_user|per_server] <limit>/<window> [burst <n>]
//		<class> [per_ip|per_user|per_server] off
//		exempt <cidr|address>...
//		exempt_loopback
//		exempt_admins
//		exempt_appservices
//	}
//
// class is upload, download, thumbnail, preview, remote, upload_bytes,
// download_bytes or failed_auth; without per_ip or per_user the line sets
// both (per_server, for download and thumbnail only, is set only by name).
// Byte classes take sizes (10GiB/1h, burst 1GiB).
func parseRateLimits(d *caddyfile.Dispenser) (*RateLimitsConfig, error) {
	c := new(RateLimitsConfig)
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		switch sub {
		case "exempt":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			for _, a := range args {
				if _, err := parsePrefix(a); err != nil {
					return nil, d.Errf("matrix_media: rate_limits: %v", err)
				}
			}
			c.Exempt = append(c.Exempt, args...)
			continue
		case "exempt_loopback", "exempt_admins", "exempt_appservices":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			switch sub {
			case "exempt_loopback":
				c.ExemptLoopback = true
			case "exempt_admins":
				c.ExemptAdmins = true
			default:
				c.ExemptAppservices = true
			}
			continue
		}
		class, ok := mediaapi.ParseRateClass(sub)
		if !ok {
			return nil, d.Errf("matrix_media: rate_limits: unknown class '%s' (upload, download, thumbnail, preview, remote, upload_bytes, download_bytes, failed_auth)", sub)
		}
		args := d.RemainingArgs()
		scopes := []string{"per_ip", "per_user"}
		if len(args) > 0 && (args[0] == "per_ip" || args[0] == "per_user" || args[0] == "per_server") {
			scopes, args = args[:1], args[1:]
		}
		if scopes[0] == "per_server" && class != mediaapi.RateDownload && class != mediaapi.RateThumbnail {
			return nil, d.Errf("matrix_media: rate_limits: %s has no per_server bucket (only download and thumbnail)", sub)
		}
		rule, err := parseRateRule(args, class.IsBytes())
		if err != nil {
			return nil, d.Errf("matrix_media: rate_limits: %s: %v", sub, err)
		}
		cc := c.classPtr(class)
		if *cc == nil {
			*cc = new(RateClassConfig)
		}
		for _, sc := range scopes {
			r := rule
			switch sc {
			case "per_ip":
				(*cc).PerIP = &r
			case "per_user":
				(*cc).PerUser = &r
			default:
				(*cc).PerServer = &r
			}
		}
	}
	return c, nil
}

// parseRateRule parses "<limit>/<window> [burst <n>]" or "off".
func parseRateRule(args []string, bytes bool) (RateRuleConfig, error) {
	if len(args) == 1 && args[0] == "off" {
		return RateRuleConfig{Off: true}, nil
	}
	if len(args) != 1 && len(args) != 3 {
		return RateRuleConfig{}, fmt.Errorf("want <limit>/<window> [burst <n>] or off")
	}
	lim, win, ok := strings.Cut(args[0], "/")
	if !ok {
		return RateRuleConfig{}, fmt.Errorf("want <limit>/<window>, got '%s'", args[0])
	}
	var r RateRuleConfig
	var err error
	if r.Limit, err = parseAmount(lim, bytes); err != nil {
		return r, err
	}
	w, err := caddy.ParseDuration(win)
	if err != nil || w <= 0 {
		return r, fmt.Errorf("invalid window '%s'", win)
	}
	r.Window = caddy.Duration(w)
	if len(args) == 3 {
		if args[1] != "burst" {
			return r, fmt.Errorf("unexpected '%s', want burst", args[1])
		}
		if r.Burst, err = parseAmount(args[2], bytes); err != nil {
			return r, err
		}
	}
	return r, nil
}

// parseAmount parses a positive count, or size for byte classes.
func parseAmount(s string, bytes bool) (int64, error) {
	if bytes {
		return parseSize(s, 1, math.MaxInt64)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("invalid count '%s'", s)
	}
	return n, nil
}

// logRateLimits notes a site's limits at provision.
func logRateLimits(log *zap.Logger, serverName string, rl *mediaapi.RateLimits, shared bool) {
	if rl == nil {
		return
	}
	log.Info("rate limits on", zap.String("server_name", serverName), zap.Bool("shared_through_redis", shared),
		zap.Int("exempt_networks", len(rl.Exempt)))
}
