package e2e

import (
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testredis"
)

// rateLimited asserts a 429 M_LIMIT_EXCEEDED with Retry-After and
// retry_after_ms.
func rateLimited(t *testing.T, what string, r response) {
	t.Helper()
	if r.status != 429 || r.errcode() != "M_LIMIT_EXCEEDED" || r.header.Get("Retry-After") == "" || !strings.Contains(string(r.body), `"retry_after_ms"`) {
		t.Fatalf("%s: want 429 M_LIMIT_EXCEEDED with Retry-After and retry_after_ms, got %v (Retry-After %q)", what, r, r.header.Get("Retry-After"))
	}
}

// TestRateLimitSharedThroughRedis runs two Caddy instances sharing one
// redis-server: a per-IP bucket emptied through A refuses through B too.
func TestRateLimitSharedThroughRedis(t *testing.T) {
	redis := testredis.Start(t)
	hs := newHomeserver(t, map[string]string{"tok": "@alice:a.test"})
	start := func() *instance {
		cfg := newConfig(t, hs, site{serverName: "a.test", extra: []string{
			"rate_limits {\n\t\t\tdownload per_ip 3/1h\n\t\t\tdownload per_user off\n\t\t}",
		}})
		cfg.appExtra = []string{"redis " + redis.URL()}
		return startCaddy(t, cfg)
	}
	instA, instB := start(), start()
	a := newSiteClient(instA, "a.test", "tok", true)
	b := newSiteClient(instB, "a.test", "tok", true)
	id, err := a.upload([]byte("shared bucket"), "text/plain", "")
	if err != nil {
		t.Fatal(err)
	}
	legacy := request{method: "GET", path: "/_matrix/media/v3/download/a.test/" + id, noAuth: true}
	for i := range 3 {
		if r := a.must(t, legacy); r.status != 200 {
			t.Fatalf("download %d through A: %v", i+1, r)
		}
	}
	rateLimited(t, "fourth download, through B", b.must(t, legacy))
	rateLimited(t, "fifth download, through A", a.must(t, legacy))
	if !strings.Contains(instB.logs.String(), `"shared_through_redis":true`) {
		t.Error("B did not log that its rate limits are shared through redis")
	}
}

// TestRateLimitTrustedProxies checks that requests carrying
// X-Forwarded-For are limited per forwarded address only when they come
// from a trusted proxy; otherwise per connection address.
func TestRateLimitTrustedProxies(t *testing.T) {
	hs := newHomeserver(t, map[string]string{"tok": "@alice:a.test"})
	for _, tc := range []struct {
		name    string
		trusted bool
	}{{"trusted proxy", true}, {"untrusted proxy", false}} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := newConfig(t, hs, site{serverName: "a.test", extra: []string{
				"rate_limits {\n\t\t\tdownload per_ip 2/1h\n\t\t}",
			}})
			if tc.trusted {
				cfg.text = strings.Replace(cfg.caddyfile(), "\tskip_install_trust\n",
					"\tskip_install_trust\n\tservers {\n\t\ttrusted_proxies static 127.0.0.1/32\n\t}\n", 1)
			}
			inst := startCaddy(t, cfg)
			c := newSiteClient(inst, "a.test", "tok", true)
			id, err := c.upload([]byte("through a proxy"), "text/plain", "")
			if err != nil {
				t.Fatal(err)
			}
			from := func(ip string) request {
				return request{method: "GET", path: "/_matrix/media/v3/download/a.test/" + id, noAuth: true,
					header: map[string]string{"X-Forwarded-For": ip}}
			}
			for i := range 2 {
				if r := c.must(t, from("203.0.113.1")); r.status != 200 {
					t.Fatalf("download %d for 203.0.113.1: %v", i+1, r)
				}
			}
			rateLimited(t, "third download for 203.0.113.1", c.must(t, from("203.0.113.1")))
			r := c.must(t, from("203.0.113.2"))
			if tc.trusted {
				if r.status != 200 {
					t.Fatalf("another forwarded client through a trusted proxy: %v", r)
				}
			} else {
				// Untrusted: X-Forwarded-For is ignored; every request
				// is the proxy's (127.0.0.1), whose bucket is empty.
				rateLimited(t, "another forwarded client through an untrusted proxy", r)
			}
		})
	}
}
