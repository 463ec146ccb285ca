package matrix

import (
	"errors"
	"mime"
	"net/url"
	"strings"
	"testing"
)

// FuzzServerName checks the one server name parser against itself and
// against independent readings of the grammar: ValidServerName agrees with
// ParseServerName; a parsed name is re-assembled from its parts into a name
// that parses to the same parts; an IP literal is an address net/netip
// accepts; the port is 1–65535; and every accepted name can be carried in a
// URL host.
func FuzzServerName(f *testing.F) {
	for _, s := range []string{
		"example.org", "example.org:8448", "1.2.3.4", "1.2.3.4:65535", "[::1]", "[2001:DB8::1]:443",
		"[::ffff:1.2.3.4]", "example.org:0", "example.org:65536", "example.org:08448", "[fe80::1%eth0]",
		"[192.0.2.1]", "2001:db8::1", ".", "..", "a..b", "", ":80", "[]", "[::1]x", "ex ample.org", "é.org",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		sn, err := ParseServerName(s)
		if got := ValidServerName(s); got != (err == nil) {
			t.Fatalf("ValidServerName(%q) = %v, ParseServerName error %v", s, got, err)
		}
		if err != nil {
			if !errors.Is(err, ErrInvalidServerName) {
				t.Fatalf("ParseServerName(%q) error %v does not wrap ErrInvalidServerName", s, err)
			}
			return
		}
		if sn.Host == "" || len(s) > 255+1+45+1+6 {
			t.Fatalf("ParseServerName(%q) = %+v", s, sn)
		}
		if sn.Port != "" {
			if !strings.HasSuffix(s, sn.Port) {
				t.Fatalf("port %q not taken from %q", sn.Port, s)
			}
			n := 0
			for _, c := range sn.Port {
				n = n*10 + int(c-'0')
			}
			if n < 1 || n > 65535 || sn.Port[0] == '0' {
				t.Fatalf("ParseServerName(%q) port %q", s, sn.Port)
			}
		}
		// Re-assemble the canonical form and parse it again.
		canon := sn.Host
		if sn.IP.Is6() {
			canon = "[" + canon + "]"
		}
		if sn.Port != "" {
			canon += ":" + sn.Port
		}
		again, err := ParseServerName(canon)
		if err != nil || again != sn {
			t.Fatalf("canonical form %q of %q parses to %+v, %v; want %+v", canon, s, again, err, sn)
		}
		if sn.IP.IsValid() {
			if sn.IP.Zone() != "" || sn.IP.String() != sn.Host {
				t.Fatalf("ParseServerName(%q) IP %v host %q", s, sn.IP, sn.Host)
			}
		} else if strings.ContainsAny(sn.Host, ":[]") {
			t.Fatalf("ParseServerName(%q) host %q", s, sn.Host)
		}
		// Every server name is a valid URL host (discovery builds
		// https://<host>/.well-known/matrix/server from it).
		u, err := url.Parse("https://" + s + "/")
		if err != nil {
			t.Fatalf("server name %q is not a URL host: %v", s, err)
		}
		if host := u.Hostname(); host != sn.Host && !sn.IP.Is6() {
			t.Fatalf("URL host of %q is %q, parsed host %q", s, host, sn.Host)
		}
	})
}

// FuzzMediaID checks ValidMediaID against the spec's rule written
// differently (every byte in [A-Za-z0-9_-], 1–255 bytes) and checks that an
// accepted ID is a single path segment that needs no escaping.
func FuzzMediaID(f *testing.F) {
	for _, s := range []string{"abcXYZ019_-", "a=b", "", "..", "a/b", "a%2Fb", strings.Repeat("x", 256), NewMediaID()} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want := len(s) >= 1 && len(s) <= MaxMediaIDLength &&
			strings.Trim(s, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-") == ""
		if got := ValidMediaID(s); got != want {
			t.Fatalf("ValidMediaID(%q) = %v, want %v", s, got, want)
		}
		if want && (url.PathEscape(s) != s || s == "." || s == "..") {
			t.Fatalf("valid media ID %q needs escaping", s)
		}
	})
}

// FuzzContentDisposition checks that the header is always well formed
// (printable ASCII, parsed by mime.ParseMediaType), that its disposition
// follows InlineSafe and forceInline, and that the file name comes back
// exactly.
func FuzzContentDisposition(f *testing.F) {
	f.Add("image/png", "cat.png", false)
	f.Add("text/html", "x.html", false)
	f.Add("text/plain; charset=utf-8", "☕ coffee.txt", false)
	f.Add("application/octet-stream", `a"b\c;d=e`, true)
	f.Add("", "", false)
	f.Add("IMAGE/PNG ; q=1", "\xff\xfe", false)
	f.Add("text/plain;,text/html", "x\r\ny", false)
	f.Fuzz(func(t *testing.T, contentType, filename string, forceInline bool) {
		h := ContentDisposition(contentType, filename, forceInline)
		for i := 0; i < len(h); i++ {
			if h[i] < 0x20 || h[i] > 0x7e {
				t.Fatalf("ContentDisposition(%q, %q) = %q: byte %#x", contentType, filename, h, h[i])
			}
		}
		disp, params, err := mime.ParseMediaType(h)
		if err != nil {
			t.Fatalf("ContentDisposition(%q, %q) = %q: %v", contentType, filename, h, err)
		}
		want := "attachment"
		if forceInline || InlineSafe(contentType) {
			want = "inline"
		}
		if disp != want {
			t.Fatalf("ContentDisposition(%q, %q, %v) disposition %q, want %q", contentType, filename, forceInline, disp, want)
		}
		// Bidirectional controls never reach a client (they can disguise
		// an extension); everything else of the name reads back exactly.
		name := StripBidiControls(filename)
		if name == "" {
			if len(params) != 0 {
				t.Fatalf("ContentDisposition(%q, %q) = %q has parameters", contentType, filename, h)
			}
			return
		}
		if got := params["filename"]; got != name {
			t.Fatalf("ContentDisposition(_, %q) = %q: file name reads back as %q, want %q", filename, h, got, name)
		}
	})
}

// FuzzQueryParam checks QueryParam against net/url's parser: a value found
// and well formed is the first value url.ParseQuery gives for the key, and
// a key it does not find is absent there. It also checks the round trip of
// an encoded value.
func FuzzQueryParam(f *testing.F) {
	f.Add("width=32&height=32&method=crop", "width", "a b&c")
	f.Add("timeout_ms=%zz", "timeout_ms", "")
	f.Add("a+b=1&a b=2", "a b", "+%")
	f.Add("x&x=1", "x", "1")
	f.Add("url=https%3A%2F%2Fexample.org%2F%3Fq%3D1", "url", "https://example.org/?q=1")
	f.Fuzz(func(t *testing.T, rawQuery, key, value string) {
		if key == "" {
			return // no caller asks for the empty key
		}
		v, found, ok := QueryParam(rawQuery, key)
		if !found && (v != "" || !ok) {
			t.Fatalf("QueryParam(%q, %q) = %q, %v, %v", rawQuery, key, v, found, ok)
		}
		if !strings.Contains(rawQuery, ";") {
			vals, _ := url.ParseQuery(rawQuery)
			switch {
			case found && ok:
				if len(vals[key]) == 0 || vals[key][0] != v {
					t.Fatalf("QueryParam(%q, %q) = %q, url.ParseQuery has %q", rawQuery, key, v, vals[key])
				}
			case !found:
				if len(vals[key]) != 0 {
					t.Fatalf("QueryParam(%q, %q) not found, url.ParseQuery has %q", rawQuery, key, vals[key])
				}
			}
		}
		q := url.Values{key: {value}}.Encode() + "&" + rawQuery
		if v, found, ok := QueryParam(q, key); !found || !ok || v != value {
			t.Fatalf("QueryParam(%q, %q) = %q, %v, %v, want %q", q, key, v, found, ok, value)
		}
	})
}

// FuzzUserID checks SplitUserID against the grammar read independently: an
// accepted ID is at most MaxUserIDLength bytes, splits into a localpart of
// printable ASCII without ':' and a server name ParseServerName accepts, and
// joins back to exactly the input; a refused one wraps ErrInvalidUserID.
func FuzzUserID(f *testing.F) {
	for _, s := range []string{
		"@alice:example.org", "@alice:[::1]:8448", "@a:b:c", "@:x", "@a:", "alice:x", "@a b:x", "@a\x00:x",
		"@" + strings.Repeat("a", 250) + ":x.org", "@é:x", "@a:[::1]:", "@a:::1",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		local, server, err := SplitUserID(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidUserID) || local != "" || server != "" {
				t.Fatalf("SplitUserID(%q) = %q, %q, %v", s, local, server, err)
			}
			return
		}
		if joined := "@" + local + ":" + server; joined != s {
			t.Fatalf("SplitUserID(%q) = %q, %q: joins to %q", s, local, server, joined)
		}
		if len(s) > MaxUserIDLength || local == "" || !ValidLocalpart(local) || !ValidServerName(server) {
			t.Fatalf("SplitUserID(%q) accepted %q, %q", s, local, server)
		}
		for i := 0; i < len(local); i++ {
			if c := local[i]; c <= ' ' || c >= 0x7f || c == ':' {
				t.Fatalf("SplitUserID(%q): localpart %q has %q", s, local, c)
			}
		}
	})
}

// FuzzMXC checks ParseMXC: an accepted URI is exactly "mxc://" + a server
// name ParseServerName accepts + "/" + a valid media ID, so it has no
// further segment, query or fragment; a refused one wraps ErrInvalidMXC.
func FuzzMXC(f *testing.F) {
	for _, s := range []string{
		"mxc://example.org/abc", "mxc://[::1]:8448/abc", "mxc://example.org/a/b", "mxc://example.org/a?b",
		"mxc://example.org/a#b", "mxc://example.org/", "mxc://example.org/a=b", "mxc:///a", "MXC://x/a", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		server, id, err := ParseMXC(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidMXC) || server != "" || id != "" {
				t.Fatalf("ParseMXC(%q) = %q, %q, %v", s, server, id, err)
			}
			return
		}
		if joined := "mxc://" + server + "/" + id; joined != s {
			t.Fatalf("ParseMXC(%q) = %q, %q: joins to %q", s, server, id, joined)
		}
		if !ValidServerName(server) || !ValidMediaID(id) || strings.ContainsAny(id, "/?#") {
			t.Fatalf("ParseMXC(%q) accepted %q, %q", s, server, id)
		}
	})
}
