package mediaadmin

import (
	"net/http"
	"strings"
	"testing"
)

func TestParseRoute(t *testing.T) {
	p := adminPrefix
	cases := []struct {
		method, path string
		ok           bool
		want         route
	}{
		{"POST", p + "media/quarantine/example.org/abc", true, route{ep: epQuarantineMedia, server: "example.org", mediaID: "abc"}},
		{"POST", p + "media/unquarantine/example.org/abc", true, route{ep: epUnquarantine, server: "example.org", mediaID: "abc"}},
		{"GET", p + "media/quarantine/example.org/abc", true, route{ep: epMethodNotAllowed}},
		{"POST", p + "user/%40alice%3Aexample.org/media/quarantine", true, route{ep: epQuarantineUser, userID: "@alice:example.org"}},
		{"POST", p + "user/@alice:example.org/media/quarantine", true, route{ep: epQuarantineUser, userID: "@alice:example.org"}},
		{"POST", p + "room/%21r%3Aexample.org/media/quarantine", true, route{ep: epQuarantineRoom, roomID: "!r:example.org"}},
		{"POST", p + "quarantine_media/!r:example.org", true, route{ep: epQuarantineRoom, roomID: "!r:example.org"}},
		{"POST", p + "media/protect/abc", true, route{ep: epProtect, mediaID: "abc"}},
		{"POST", p + "media/unprotect/abc", true, route{ep: epUnprotect, mediaID: "abc"}},
		// Overlaps, decided by method as Synapse registers them.
		{"GET", p + "media/protect/abc", true, route{ep: epMediaInfo, server: "protect", mediaID: "abc"}},
		{"POST", p + "media/protect/delete", true, route{ep: epProtect, mediaID: "delete"}},
		{"POST", p + "media/example.org/delete", true, route{ep: epDeleteOld, server: "example.org", legacyServer: true}},
		{"DELETE", p + "media/example.org/delete", true, route{ep: epDeleteMedia, server: "example.org", mediaID: "delete"}},
		{"POST", p + "media/example.org/abc", true, route{ep: epMethodNotAllowed}},
		{"GET", p + "media/example.org/abc", true, route{ep: epMediaInfo, server: "example.org", mediaID: "abc"}},
		{"DELETE", p + "media/example.org/abc", true, route{ep: epDeleteMedia, server: "example.org", mediaID: "abc"}},
		{"GET", p + "media/example.org/", true, route{ep: epMediaInfo, server: "example.org"}},
		{"POST", p + "media/delete", true, route{ep: epDeleteOld}},
		{"GET", p + "media/delete", true, route{ep: epMethodNotAllowed}},
		{"POST", p + "purge_media_cache", true, route{ep: epPurgeRemote}},
		{"GET", p + "users/%40a%3Ab/media", true, route{ep: epListUserMedia, userID: "@a:b"}},
		{"DELETE", p + "users/%40a%3Ab/media", true, route{ep: epDeleteUserMedia, userID: "@a:b"}},
		{"POST", p + "users/%40a%3Ab/media", true, route{ep: epMethodNotAllowed}},
		{"GET", p + "users/%40a%2Fb%3Ac/media", true, route{ep: epListUserMedia, userID: "@a/b:c"}},
		{"GET", p + "statistics/users/media", true, route{ep: epUsage}},
		// The homeserver's.
		{"GET", p + "room/!r:example.org/media", false, route{}},
		{"GET", p + "media/quarantine_changes", false, route{}},
		{"GET", p + "users/%40a%3Ab", false, route{}},
		{"GET", p + "users/%40a%3Ab/admin", false, route{}},
		{"POST", p + "media/quarantine/a/b/c", false, route{}},
		{"GET", "/_synapse/admin/v2/users/%40a%3Ab/media", false, route{}},
		{"GET", "/_matrix/media/v3/download/a/b", false, route{}},
		{"POST", p + "purge_media_cache/", false, route{}},
		{"GET", p + "users/%zz/media", false, route{}},
	}
	for _, c := range cases {
		got, ok := parseRoute(c.method, c.path)
		if ok != c.ok || got != c.want {
			t.Errorf("%s %s: %+v %v, want %+v %v", c.method, c.path, got, ok, c.want, c.ok)
		}
		if IsAdminPath(c.path) != c.ok {
			t.Errorf("IsAdminPath(%s) = %v", c.path, !c.ok)
		}
	}
}

// FuzzParseRoute checks that the path parser never panics on untrusted
// paths, that the method never decides whether a path is answered, and that
// parameters come from one path segment each.
func FuzzParseRoute(f *testing.F) {
	for _, s := range []string{
		"media/quarantine/example.org/abc", "media/unquarantine/a/b", "user/%40alice%3Aexample.org/media/quarantine",
		"room/%21r%3Aexample.org/media/quarantine", "quarantine_media/!r", "media/protect/abc", "media/unprotect/x",
		"media/example.org/abc", "media/example.org/delete", "media/delete", "purge_media_cache",
		"users/%40a%3Ab/media", "statistics/users/media", "users/%zz/media", "media//", "", "/", "%2F%2F/media",
	} {
		f.Add("GET", adminPrefix+s)
		f.Add("POST", adminPrefix+s)
	}
	f.Fuzz(func(t *testing.T, method, path string) {
		rt, ok := parseRoute(method, path)
		admin := IsAdminPath(path)
		if ok != admin {
			t.Fatalf("parseRoute %v but IsAdminPath %v", ok, admin)
		}
		for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodDelete, http.MethodPut} {
			if _, ok2 := parseRoute(m, path); ok2 != ok {
				t.Fatalf("method %s changes whether %q is answered", m, path)
			}
		}
		if !ok {
			if rt != (route{}) {
				t.Fatalf("unmatched path gave %+v", rt)
			}
			return
		}
		if !strings.HasPrefix(path, adminPrefix) {
			t.Fatalf("%q matched outside the prefix", path)
		}
		segs := strings.Split(strings.TrimPrefix(path, adminPrefix), "/")
		if len(segs) < 1 || len(segs) > 4 {
			t.Fatalf("%q matched with %d segments", path, len(segs))
		}
		if rt.ep == "" {
			t.Fatalf("%q matched without an endpoint", path)
		}
	})
}
