package e2e

import (
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testredis"
)

// TestLogoutInvalidatesAcrossInstances runs two Caddy processes that share a
// real Redis: a logout through one makes the other reject the token within a
// second, although its cache would otherwise trust the token for minutes.
func TestLogoutInvalidatesAcrossInstances(t *testing.T) {
	redis := testredis.Start(t)
	hs := newHomeserver(t, map[string]string{"tok": "@alice:a.test", "keep": "@alice:a.test"})
	start := func() *instance {
		cfg := newConfig(t, hs, site{serverName: "a.test"})
		cfg.appExtra = []string{"redis " + redis.URL(), "token_cache_ttl 10m"}
		return startCaddy(t, cfg)
	}
	instA, instB := start(), start()
	a := newSiteClient(instA, "a.test", "tok", true)
	b := newSiteClient(instB, "a.test", "tok", true)
	bKeep := newSiteClient(instB, "a.test", "keep", true)
	config := request{method: "GET", path: "/_matrix/client/v1/media/config"}

	for _, c := range []*siteClient{a, b, bKeep} {
		if r := c.must(t, config); r.status != 200 {
			t.Fatalf("config before logout: %v", r)
		}
	}
	whoamis := hs.whoamis.Load()
	if r := b.must(t, config); r.status != 200 || hs.whoamis.Load() != whoamis {
		t.Fatalf("B should answer from its cache: %v, %d whoami calls", r, hs.whoamis.Load()-whoamis)
	}

	logout := a.must(t, request{method: "POST", path: "/_matrix/client/v3/logout", body: []byte("{}"), contentType: "application/json"})
	if logout.status != 200 || string(logout.body) != "{}" || logout.header.Get(hsMarker) != "1" {
		t.Fatalf("logout through A: %v", logout)
	}
	loggedOut := time.Now()
	for {
		r := b.must(t, config)
		if r.status == 401 && r.errcode() == "M_UNKNOWN_TOKEN" {
			break
		}
		if r.status != 200 {
			t.Fatalf("B answered %v", r)
		}
		if time.Since(loggedOut) > time.Second {
			t.Fatalf("B still accepts the logged-out token after %v", time.Since(loggedOut))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("B rejected the token %v after the logout through A", time.Since(loggedOut))
	if r := a.must(t, config); r.status != 401 || r.errcode() != "M_UNKNOWN_TOKEN" {
		t.Fatalf("A after its own logout: %v", r)
	}
	if r := bKeep.must(t, config); r.status != 200 {
		t.Fatalf("the user's other token must keep working on B: %v", r)
	}
}
