package mediaapi

import (
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"
)

// FuzzRouteAgreesWithValidators builds the request paths a client would
// send for a server name and media ID (escaped as a client library does,
// then parsed by net/url as the server does) and checks that every route
// accepts exactly what matrix.ValidServerName and matrix.ValidMediaID
// accept: one rule, whatever the endpoint.
func FuzzRouteAgreesWithValidators(f *testing.F) {
	f.Add("example.org", "abcXYZ019_-")
	f.Add("example.org:8448", "a=b")
	f.Add("[::1]:8448", "id")
	f.Add("1.2.3.4:99999", "id")
	f.Add("..", "..")
	f.Add("a/b", "c%2Fd")
	f.Add("ex ample.org", "ä")
	f.Add("example.org", "a\x00")
	f.Fuzz(func(t *testing.T, server, id string) {
		want := matrix.ValidServerName(server) && matrix.ValidMediaID(id)
		seg := "/" + url.PathEscape(server) + "/" + url.PathEscape(id)
		for _, c := range []struct {
			path string
			ep   endpoint
		}{
			{prefixLegacy + "v3/download" + seg, epDownload},
			{prefixLegacy + "r0/download" + seg + "/name.png", epDownload},
			{prefixLegacy + "v3/thumbnail" + seg, epThumbnail},
			{prefixLegacy + "v3/upload" + seg, epUploadPut},
			{prefixLegacy + "unstable/fi.mau.msc2246/upload" + seg, epUploadPut},
			{prefixClientV1 + "download" + seg, epDownload},
			{prefixClientUnstable + "thumbnail" + seg, epThumbnail},
		} {
			u, err := url.Parse("https://h" + c.path)
			if err != nil {
				t.Fatalf("url.Parse(%q): %v", c.path, err)
			}
			rt := parseRoute(u.EscapedPath())
			if rt.ep != c.ep {
				t.Fatalf("parseRoute(%q).ep = %d, want %d", u.EscapedPath(), rt.ep, c.ep)
			}
			gotServer, gotID, merr := rt.mediaRef()
			if (merr == nil) != want {
				t.Fatalf("%q: route accepts = %v, validators say %v (%v)", u.EscapedPath(), merr == nil, want, merr)
			}
			if merr == nil && (gotServer != server || gotID != id) {
				t.Fatalf("%q: route reads %q %q, want %q %q", u.EscapedPath(), gotServer, gotID, server, id)
			}
			if merr != nil && merr.Status != http.StatusBadRequest {
				t.Fatalf("%q: refusal status %d", u.EscapedPath(), merr.Status)
			}
		}
		for _, prefix := range []string{prefixFederationV1, prefixFederationUnstable} {
			u, err := url.Parse("https://h" + prefix + "download/" + url.PathEscape(id))
			if err != nil {
				t.Fatal(err)
			}
			rt := parseRoute(u.EscapedPath())
			if rt.ep != epFedDownload {
				t.Fatalf("parseRoute(%q).ep = %d", u.EscapedPath(), rt.ep)
			}
			got, ok := unescapeSegment(rt.rawMediaID)
			if accepted := ok && matrix.ValidMediaID(got); accepted != matrix.ValidMediaID(id) || accepted && got != id {
				t.Fatalf("%q: federation route accepts %q = %v, ValidMediaID(%q) = %v", u.EscapedPath(), got, accepted, id, matrix.ValidMediaID(id))
			}
		}
	})
}

// FuzzParseRoute feeds arbitrary escaped paths to parseRoute and checks the
// shape of what it returns: an unknown path yields the zero route; the
// parameters are single raw segments found in the path where the endpoint
// puts them; every known endpoint allows some method.
func FuzzParseRoute(f *testing.F) {
	for _, p := range []string{
		"/_matrix/media/v3/download/example.org/abc",
		"/_matrix/media/v3/download/example.org/abc/file%20name.png",
		"/_matrix/media/v3/download/example.org/abc/a/b",
		"/_matrix/media/r0/upload",
		"/_matrix/media/v1/create",
		"/_matrix/media/v1/upload/example.org/abc",
		"/_matrix/media/unstable/fi.mau.msc2246/create",
		"/_matrix/media/unstable/fi.mau.msc2246/upload/s/i",
		"/_matrix/media/v3/config",
		"/_matrix/media/v3/preview_url",
		"/_matrix/client/v1/media/thumbnail/example.org/abc",
		"/_matrix/client/unstable/org.matrix.msc3916/media/download/s/i",
		"/_matrix/federation/v1/media/download/abc",
		"/_matrix/federation/unstable/org.matrix.msc3916.v2/media/thumbnail/abc",
		"/_matrix/federation/v1/media/download/abc/extra",
		"/_matrix/media/v3/download/%2e%2e/%2F",
		"/_matrix/media/v4/download/s/i",
		"/_matrix/media/",
		"/_matrix/client/v1/media//",
	} {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p string) {
		rt := parseRoute(p)
		if rt.ep == epUnknown {
			if rt != (route{}) {
				t.Fatalf("parseRoute(%q) = %+v: unknown endpoint with fields set", p, rt)
			}
			return
		}
		if rt.ep >= numEndpoints {
			t.Fatalf("parseRoute(%q).ep = %d", p, rt.ep)
		}
		if !strings.HasPrefix(p, "/_matrix/") {
			t.Fatalf("parseRoute(%q) = %+v outside /_matrix/", p, rt)
		}
		for _, seg := range []string{rt.rawServer, rt.rawMediaID, rt.rawFileName} {
			if strings.IndexByte(seg, '/') >= 0 {
				t.Fatalf("parseRoute(%q) = %+v: parameter %q spans segments", p, rt, seg)
			}
		}
		switch rt.ep {
		case epDownload, epThumbnail, epUploadPut:
			tail := "/" + rt.rawServer + "/" + rt.rawMediaID
			if rt.hasFileName {
				tail += "/" + rt.rawFileName
			}
			if !strings.HasSuffix(p, tail) {
				t.Fatalf("parseRoute(%q) = %+v: parameters are not the path's tail", p, rt)
			}
			if rt.ep != epDownload && rt.hasFileName {
				t.Fatalf("parseRoute(%q) = %+v: file name outside download", p, rt)
			}
		case epFedDownload, epFedThumbnail:
			if rt.rawServer != "" || rt.hasFileName || !strings.HasSuffix(p, "/"+rt.rawMediaID) || rt.legacy {
				t.Fatalf("parseRoute(%q) = %+v", p, rt)
			}
		default:
			if rt.rawServer != "" || rt.rawMediaID != "" || rt.hasFileName {
				t.Fatalf("parseRoute(%q) = %+v: parameters on a parameterless endpoint", p, rt)
			}
		}
		allowed := false
		for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut} {
			allowed = allowed || rt.allows(m)
		}
		if !allowed || allowHeaders[rt.ep] == nil {
			t.Fatalf("parseRoute(%q) = %+v: endpoint allows no method", p, rt)
		}
		if rt.allows(http.MethodDelete) || rt.allows("") {
			t.Fatalf("parseRoute(%q) = %+v allows DELETE", p, rt)
		}
	})
}

// FuzzUnescapeSegment checks that a decoded segment is never a dot
// segment, never holds '/' or NUL, is the input itself when nothing was
// escaped, and that escaping a decoded value decodes back to it.
func FuzzUnescapeSegment(f *testing.F) {
	for _, s := range []string{"abc", "a%20b", "%2e%2e", "%2E", "..", ".", "a%2Fb", "a%00", "%zz", "%", "caf%C3%A9", "a+b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		v, ok := unescapeSegment(raw)
		if !ok {
			if v != "" {
				t.Fatalf("unescapeSegment(%q) = %q, false", raw, v)
			}
			return
		}
		if v == "." || v == ".." || strings.ContainsAny(v, "/\x00") {
			t.Fatalf("unescapeSegment(%q) = %q", raw, v)
		}
		if !strings.Contains(raw, "%") && v != raw {
			t.Fatalf("unescapeSegment(%q) = %q without escapes", raw, v)
		}
		if want, err := url.PathUnescape(raw); err != nil || want != v {
			t.Fatalf("unescapeSegment(%q) = %q, url.PathUnescape gives %q, %v", raw, v, want, err)
		}
		if again, ok := unescapeSegment(url.PathEscape(v)); !ok || again != v {
			t.Fatalf("unescapeSegment(PathEscape(%q)) = %q, %v", v, again, ok)
		}
	})
}

// FuzzParseRange checks that a satisfiable range lies inside the content,
// that a range is unsatisfiable only when it starts at or past the end (or
// asks for the empty suffix), that other units and lists are ignored, and
// that formatting a parsed range and parsing it again gives the same
// range.
func FuzzParseRange(f *testing.F) {
	for _, v := range []string{"bytes=0-0", "bytes=0-", "bytes=-5", "bytes=5-1", "bytes=0-9999999999999999999",
		"BYTES= 1 - 2 ", "bytes=1-2,3-4", "items=0-1", "bytes=-0", "bytes=100-", "bytes=--1", "bytes=+1-2", "bytes="} {
		f.Add(v, int64(100))
	}
	f.Add("bytes=0-", int64(0))
	f.Fuzz(func(t *testing.T, v string, size int64) {
		if size < 0 {
			size = -(size + 1)
		}
		start, length, kind := parseRange(v, size)
		switch kind {
		case rangeIgnored:
			if start != 0 || length != 0 {
				t.Fatalf("parseRange(%q, %d) ignored with %d+%d", v, size, start, length)
			}
		case rangeUnsatisfiable:
			if start != 0 || length != 0 {
				t.Fatalf("parseRange(%q, %d) unsatisfiable with %d+%d", v, size, start, length)
			}
		case rangeSatisfiable:
			if start < 0 || length < 1 || length > size-start {
				t.Fatalf("parseRange(%q, %d) = %d+%d outside the content", v, size, start, length)
			}
			end := start + length - 1
			again := "bytes=" + strconv.FormatInt(start, 10) + "-" + strconv.FormatInt(end, 10)
			if s2, l2, k2 := parseRange(again, size); k2 != rangeSatisfiable || s2 != start || l2 != length {
				t.Fatalf("parseRange(%q, %d) = %d+%d, but %q gives %d+%d (%d)", v, size, start, length, again, s2, l2, k2)
			}
			cr := contentRange(start, length, size)
			if want := "bytes " + strconv.FormatInt(start, 10) + "-" + strconv.FormatInt(end, 10) + "/" + strconv.FormatInt(size, 10); cr != want {
				t.Fatalf("contentRange = %q, want %q", cr, want)
			}
		default:
			t.Fatalf("parseRange(%q, %d) kind %d", v, size, kind)
		}
		if len(v) < 6 || !strings.EqualFold(v[:6], "bytes=") || strings.Contains(v, ",") {
			if kind != rangeIgnored {
				t.Fatalf("parseRange(%q, %d) not ignored", v, size)
			}
		}
	})
}

// FuzzThumbnailParams checks that accepted parameters are in range and
// survive a round trip through a query string, and that refusals are 400.
func FuzzThumbnailParams(f *testing.F) {
	for _, q := range []string{"width=32&height=32", "width=32&height=32&method=crop&animated=true", "width=0&height=1",
		"width=99999999999999999999&height=1", "width=1&height=1&method=fit", "width=%31&height=1", "height=1", "width=-1&height=1&animated=yes"} {
		f.Add(q)
	}
	f.Fuzz(func(t *testing.T, q string) {
		p, merr := parseThumbnailParams(q)
		if merr != nil {
			if merr.Status != http.StatusBadRequest {
				t.Fatalf("parseThumbnailParams(%q) status %d", q, merr.Status)
			}
			return
		}
		if p.width < 1 || p.width > 1<<16 || p.height < 1 || p.height > 1<<16 {
			t.Fatalf("parseThumbnailParams(%q) = %+v", q, p)
		}
		if p.method != thumbnails.MethodCrop && p.method != thumbnails.MethodScale {
			t.Fatalf("parseThumbnailParams(%q) method %q", q, p.method)
		}
		again := url.Values{
			"width": {strconv.Itoa(p.width)}, "height": {strconv.Itoa(p.height)},
			"method": {string(p.method)}, "animated": {strconv.FormatBool(p.animated)},
		}.Encode()
		if p2, merr := parseThumbnailParams(again); merr != nil || p2 != p {
			t.Fatalf("parseThumbnailParams(%q) = %+v, but %q gives %+v, %v", q, p, again, p2, merr)
		}
	})
}

// FuzzDownloadTimeout checks that timeout_ms is either refused with 400 or
// gives a wait between 0 and the site's maximum, exactly the asked number
// of milliseconds when that is below the maximum.
func FuzzDownloadTimeout(f *testing.F) {
	for _, q := range []string{"timeout_ms=0", "timeout_ms=1500", "timeout_ms=-1", "timeout_ms=99999999999999999999999",
		"timeout_ms=", "timeout_ms=%zz", "fi.mau.msc2246.timeout_ms=10", "x=1", "timeout_ms=1e3", "timeout_ms=+5"} {
		f.Add(q, int64(60000))
	}
	f.Fuzz(func(t *testing.T, q string, maxMS int64) {
		maxMS = max(1, min(maxMS, 1<<40)) // a configured maximum is positive
		maxWait := time.Duration(maxMS) * time.Millisecond
		s := &Site{cfg: SiteConfig{MaxDownloadTimeout: maxWait}, downloadWait: min(DefaultDownloadTimeout, maxWait)}
		d, merr := s.downloadTimeout(q)
		if merr != nil {
			if merr.Status != http.StatusBadRequest {
				t.Fatalf("downloadTimeout(%q) status %d", q, merr.Status)
			}
			return
		}
		if d < 0 || d > maxWait {
			t.Fatalf("downloadTimeout(%q) = %s, max %s", q, d, maxWait)
		}
		v, found, _ := matrix.QueryParam(q, "timeout_ms")
		if !found {
			return
		}
		if n, err := strconv.ParseInt(v, 10, 64); err == nil && n >= 0 && n < maxMS && d != time.Duration(n)*time.Millisecond {
			t.Fatalf("downloadTimeout(%q) = %s, want %dms", q, d, n)
		}
	})
}
