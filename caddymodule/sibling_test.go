package caddymodule

import "testing"

// TestReloadUnregistersRemovedSite: sites register their server names with
// the shared repository; a reload that drops a site leaves its name remote,
// one that keeps a site keeps it local throughout (the new config registers
// it before the old one is cleaned up).
func TestReloadUnregistersRemovedSite(t *testing.T) {
	hs := fakeHomeserver(t, map[string]string{"tok": "@alice:a.test"})
	appCfg := testAppConfig(t)
	ctx1, cancel1 := newCaddyContext(t, map[string]any{"matrix_media": appCfg})
	defer cancel1()
	oldA := &Handler{ServerName: "a.test", Homeserver: hs.URL}
	oldB := &Handler{ServerName: "b.test", Homeserver: hs.URL}
	for _, h := range []*Handler{oldA, oldB} {
		if err := h.Provision(ctx1); err != nil {
			t.Fatal(err)
		}
	}
	repo := oldA.res.repo
	if !repo.IsLocal("a.test") || !repo.IsLocal("b.test") {
		t.Fatal("sites not registered")
	}
	// The reloaded config serves a.test only.
	ctx2, cancel2 := newCaddyContext(t, map[string]any{"matrix_media": appCfg})
	defer cancel2()
	newA := &Handler{ServerName: "a.test", Homeserver: hs.URL}
	if err := newA.Provision(ctx2); err != nil {
		t.Fatal(err)
	}
	defer newA.Cleanup()
	if newA.res.repo != repo {
		t.Fatal("the reload did not keep the repository")
	}
	for _, h := range []*Handler{oldA, oldB} {
		if err := h.Cleanup(); err != nil {
			t.Fatal(err)
		}
	}
	if !repo.IsLocal("a.test") {
		t.Fatal("a.test stopped being local although the new config serves it")
	}
	if repo.IsLocal("b.test") {
		t.Fatal("b.test is still local after the reload dropped it")
	}
	// A failed provision (no site built) cleans up without effect.
	if err := (&Handler{ServerName: "c.test"}).Cleanup(); err != nil {
		t.Fatal(err)
	}
}
