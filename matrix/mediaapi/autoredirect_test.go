package mediaapi

import (
	"context"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// TestAutoRedirects walks an automatic redirect policy through the states
// of its bucket: downloads are redirected only while the presigned URLs'
// host is public and the bucket's CORS lets any origin GET, and never in
// federation answers.
func TestAutoRedirects(t *testing.T) {
	var hostAddr atomic.Pointer[netip.Addr]
	public := netip.MustParseAddr("93.184.215.14")
	hostAddr.Store(&public)
	serve, key := servesFederation(t)
	e, obj := objectEnv(t, serve, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Redirects = map[string]RedirectPolicy{"objects": {Lifetime: time.Minute, Auto: true}}
		o.RedirectCheckInterval = time.Hour
		o.RedirectGuard = federation.Guard{LookupNetIP: func(_ context.Context, _, host string) ([]netip.Addr, error) {
			if host != "s3.example.net" {
				t.Errorf("resolved %q, want the presigned URLs' host", host)
			}
			return []netip.Addr{*hostAddr.Load()}, nil
		}}
	})
	id := e.upload("alice", []byte("maybe redirected"), "text/plain", "")
	check := func() {
		for name, a := range e.repo.autoRedirects {
			e.repo.checkAutoRedirect(context.Background(), name, a)
		}
	}
	setCORS := func(rules ...storage.CORSRule) {
		if rules == nil {
			obj.cors.Store(nil)
			return
		}
		obj.cors.Store(&rules)
	}
	anyOrigin := storage.CORSRule{AllowedOrigins: []string{"*"}, AllowedMethods: []string{"HEAD", "get"}}
	// expect downloads the media on each endpoint and checks the state.
	expect := func(step string, redirected bool, reason string) {
		t.Helper()
		st := e.repo.RedirectStates()["objects"]
		if !st.Auto || st.Active != redirected || !strings.Contains(st.Reason, reason) {
			t.Errorf("%s: state %+v, want active %v and a reason containing %q", step, st, redirected, reason)
		}
		rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"})
		switch {
		case redirected && (rec.Code != 307 || !strings.HasPrefix(rec.Header().Get("Location"), "https://s3.example.net/")):
			t.Errorf("%s: authenticated download %d Location %q, want a 307 to the bucket", step, rec.Code, rec.Header().Get("Location"))
		case !redirected && (rec.Code != 200 || rec.Body.String() != "maybe redirected"):
			t.Errorf("%s: authenticated download %d %q, want the bytes", step, rec.Code, rec.Body)
		}
		rec = e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id + "?allow_redirect=true"})
		if want := map[bool]int{true: 307, false: 200}[redirected]; rec.Code != want {
			t.Errorf("%s: legacy download with allow_redirect=true: %d, want %d", step, rec.Code, want)
		}
		if rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id}); rec.Code != 200 {
			t.Errorf("%s: legacy download without allow_redirect: %d, want 200", step, rec.Code)
		}
		// Federation answers always carry the bytes.
		rec = fedGet(t, e, "/_matrix/federation/v1/media/download/"+id, key, "remote.test", testServer)
		if rec.Code != 200 || !strings.Contains(rec.Body.String(), "maybe redirected") {
			t.Errorf("%s: federation download %d %q, want the bytes in the answer", step, rec.Code, rec.Body)
		}
	}

	expect("before the first check", false, "not checked yet")
	check()
	expect("no CORS configuration", false, "no CORS configuration")
	setCORS(storage.CORSRule{AllowedOrigins: []string{"https://app.example.org"}, AllowedMethods: []string{"GET"}})
	check()
	expect("CORS for one origin", false, "no CORS rule")
	setCORS(storage.CORSRule{AllowedOrigins: []string{"*"}, AllowedMethods: []string{"PUT"}}, anyOrigin)
	private := netip.MustParseAddr("10.1.2.3")
	hostAddr.Store(&private)
	check()
	expect("private S3 endpoint", false, "may not reach")
	hostAddr.Store(&public)
	check()
	expect("public bucket with CORS", true, "lets any origin GET")

	// A check that cannot reach the bucket keeps the decision.
	obj.down.Store(true)
	check()
	obj.down.Store(false)
	expect("check failed", true, "last check failed")

	setCORS()
	check()
	expect("CORS removed", false, "no CORS configuration")
}

func TestRedirectStatesAndChecksWithoutAutoPolicies(t *testing.T) {
	e, _ := objectEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Redirects = map[string]RedirectPolicy{"objects": {Lifetime: time.Minute}}
	})
	if got := e.repo.RedirectStates(); len(got) != 1 || got["objects"] != (RedirectState{Active: true}) {
		t.Errorf("RedirectStates = %+v, want objects always active", got)
	}
	done := make(chan struct{})
	go func() { e.repo.RunRedirectChecks(context.Background()); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("RunRedirectChecks without automatic policies did not return")
	}
}
