package matrix

import (
	"encoding/json"
	"errors"
	"mime"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestWriteError(t *testing.T) {
	tests := []struct {
		name       string
		err        *Error
		wantStatus int
		wantBody   map[string]any
		wantRetry  string
	}{
		{"not found", NotFound("no such media"), 404, map[string]any{"errcode": "M_NOT_FOUND", "error": "no such media"}, ""},
		{"unrecognized", Unrecognized("x"), 404, map[string]any{"errcode": "M_UNRECOGNIZED", "error": "x"}, ""},
		{"method", MethodNotAllowed("x"), 405, map[string]any{"errcode": "M_UNRECOGNIZED", "error": "x"}, ""},
		{"missing token", MissingToken("x"), 401, map[string]any{"errcode": "M_MISSING_TOKEN", "error": "x"}, ""},
		{"unknown token", UnknownToken("x"), 401, map[string]any{"errcode": "M_UNKNOWN_TOKEN", "error": "x"}, ""},
		{"forbidden", Forbidden("x"), 403, map[string]any{"errcode": "M_FORBIDDEN", "error": "x"}, ""},
		{"guest", GuestAccessForbidden("x"), 403, map[string]any{"errcode": "M_GUEST_ACCESS_FORBIDDEN", "error": "x"}, ""},
		{"too large", TooLarge("x"), 413, map[string]any{"errcode": "M_TOO_LARGE", "error": "x"}, ""},
		{"not yet", NotYetUploaded("x"), 504, map[string]any{"errcode": "M_NOT_YET_UPLOADED", "error": "x"}, ""},
		{"overwrite", CannotOverwriteMedia("x"), 409, map[string]any{"errcode": "M_CANNOT_OVERWRITE_MEDIA", "error": "x"}, ""},
		{"invalid", InvalidParam("x"), 400, map[string]any{"errcode": "M_INVALID_PARAM", "error": "x"}, ""},
		{"missing", MissingParam("x"), 400, map[string]any{"errcode": "M_MISSING_PARAM", "error": "x"}, ""},
		{"bad json", BadJSON("x"), 400, map[string]any{"errcode": "M_BAD_JSON", "error": "x"}, ""},
		{"not json", NotJSON("x"), 400, map[string]any{"errcode": "M_NOT_JSON", "error": "x"}, ""},
		{"unknown", Unknown(502, "x"), 502, map[string]any{"errcode": "M_UNKNOWN", "error": "x"}, ""},
		{"limit", LimitExceeded("slow down", 1500*time.Millisecond), 429,
			map[string]any{"errcode": "M_LIMIT_EXCEEDED", "error": "slow down", "retry_after_ms": float64(1500)}, "2"},
		{"extra", &Error{Status: 400, ErrCode: "M_X", Message: "m", Extra: map[string]any{"k": "v", "errcode": "evil"}}, 400,
			map[string]any{"errcode": "M_X", "error": "m", "k": "v"}, ""},
		{"quotes", NotFound(`a "quoted" <name>`), 404, map[string]any{"errcode": "M_NOT_FOUND", "error": `a "quoted" <name>`}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			rec.Header().Set("Access-Control-Allow-Origin", "*")
			WriteError(rec, tc.err)
			if rec.Code != tc.wantStatus {
				t.Fatalf("status = %d, want %d", rec.Code, tc.wantStatus)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q", ct)
			}
			if rec.Header().Get("Access-Control-Allow-Origin") != "*" {
				t.Errorf("pre-set header lost")
			}
			if got := rec.Header().Get("Retry-After"); got != tc.wantRetry {
				t.Errorf("Retry-After = %q, want %q", got, tc.wantRetry)
			}
			var body map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
				t.Fatalf("body %q: %v", rec.Body.String(), err)
			}
			if len(body) != len(tc.wantBody) {
				t.Errorf("body = %v, want %v", body, tc.wantBody)
			}
			for k, v := range tc.wantBody {
				if body[k] != v {
					t.Errorf("body[%q] = %v, want %v", k, body[k], v)
				}
			}
			if cl := rec.Header().Get("Content-Length"); cl != itoa(rec.Body.Len()) {
				t.Errorf("Content-Length = %q, body %d", cl, rec.Body.Len())
			}
		})
	}
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func TestErrorImplementsError(t *testing.T) {
	var err error = NotFound("gone")
	if !strings.Contains(err.Error(), "M_NOT_FOUND") || !strings.Contains(err.Error(), "404") {
		t.Fatalf("Error() = %q", err.Error())
	}
}

func TestValidServerName(t *testing.T) {
	valid := []string{
		"example.org", "example.org:8448", "localhost", "localhost:1", "1.2.3.4", "1.2.3.4:65535",
		"[::1]", "[::1]:8448", "[1234:5678::abcd]", "[::ffff:1.2.3.4]", "a-b.c", "999.1.1.1", "example.org:08448", "hs1", "EXAMPLE.org",
		strings.Repeat("a", 255), strings.Repeat("a", 255) + ":1",
	}
	invalid := []string{
		"", ":8448", "example.org:", "example.org:123456", "example.org:abc", "exa mple.org",
		"example.org/x", "ex_ample.org", "[::1", "[]", "[:]:", "[::1]x", "[::1]:", "[g::1]",
		"[" + strings.Repeat("1", 46) + "]", strings.Repeat("a", 256), "example.org:80:80",
		"example..org\x00", "üñí.org", "a@b", "1.2.3.4:99999", "example.org:0", "example.org:00000",
		"example.org:65536", "[1.2.3.4.5]", "[192.0.2.1]", "[example.org]", "[fe80::1%eth0]", "2001:db8::1", ".", "..", "...:80",
	}
	for _, s := range valid {
		if !ValidServerName(s) {
			t.Errorf("ValidServerName(%q) = false, want true", s)
		}
	}
	for _, s := range invalid {
		if ValidServerName(s) {
			t.Errorf("ValidServerName(%q) = true, want false", s)
		}
	}
}

func TestParseServerName(t *testing.T) {
	tests := []struct {
		in             string
		host, ip, port string
	}{
		{"example.org", "example.org", "", ""},
		{"example.org:08448", "example.org", "", "8448"},
		{"1.2.3.4", "1.2.3.4", "1.2.3.4", ""},
		{"01.2.3.4:1", "01.2.3.4", "", "1"}, // not an address: a dns-name
		{"[2001:DB8::1]:443", "2001:db8::1", "2001:db8::1", "443"},
		{"[::ffff:1.2.3.4]", "::ffff:1.2.3.4", "::ffff:1.2.3.4", ""},
	}
	for _, tc := range tests {
		sn, err := ParseServerName(tc.in)
		if err != nil {
			t.Errorf("ParseServerName(%q): %v", tc.in, err)
			continue
		}
		ip := ""
		if sn.IP.IsValid() {
			ip = sn.IP.String()
		}
		if sn.Host != tc.host || ip != tc.ip || sn.Port != tc.port {
			t.Errorf("ParseServerName(%q) = %q %q %q, want %q %q %q", tc.in, sn.Host, ip, sn.Port, tc.host, tc.ip, tc.port)
		}
	}
	if _, err := ParseServerName("a:0"); !errors.Is(err, ErrInvalidServerName) {
		t.Errorf("ParseServerName(a:0) error %v, want ErrInvalidServerName", err)
	}
}

func TestValidMediaID(t *testing.T) {
	valid := []string{"a", "abcXYZ019_-", strings.Repeat("x", 255)}
	invalid := []string{"", "a.b", "..", "a/b", "a%2Fb", "a b", "ä", "a\x00", strings.Repeat("x", 256), "a=b"}
	for _, s := range valid {
		if !ValidMediaID(s) {
			t.Errorf("ValidMediaID(%q) = false", s)
		}
	}
	for _, s := range invalid {
		if ValidMediaID(s) {
			t.Errorf("ValidMediaID(%q) = true", s)
		}
	}
}

func TestNewMediaID(t *testing.T) {
	seen := make(map[string]bool)
	counts := make(map[byte]int)
	for i := 0; i < 2000; i++ {
		id := NewMediaID()
		if len(id) != 24 {
			t.Fatalf("len(%q) = %d", id, len(id))
		}
		for j := 0; j < len(id); j++ {
			c := id[j]
			if !isAlnum(c) {
				t.Fatalf("id %q has %q", id, c)
			}
			counts[c]++
		}
		if !ValidMediaID(id) {
			t.Fatalf("generated invalid id %q", id)
		}
		if seen[id] {
			t.Fatalf("duplicate id %q", id)
		}
		seen[id] = true
	}
	// 48000 characters over 62 symbols: every symbol must appear (expected
	// ~774 each; missing one would mean a broken alphabet mapping).
	if len(counts) != 62 {
		t.Fatalf("only %d distinct characters used", len(counts))
	}
}

func TestInlineSafe(t *testing.T) {
	tests := map[string]bool{
		"image/png":                 true,
		"IMAGE/PNG":                 true,
		"Text/Plain; charset=utf-8": true,
		" text/plain ;charset=x":    true,
		"audio/x-flac":              true,
		"application/ld+json":       true,
		"image/svg+xml":             false,
		"image/svg":                 false,
		"text/html":                 false,
		"text/javascript":           false,
		"img/png":                   false,
		"":                          false,
		"application/octet-stream":  false,
		"image/pngx":                false,
	}
	for ct, want := range tests {
		if got := InlineSafe(ct); got != want {
			t.Errorf("InlineSafe(%q) = %v, want %v", ct, got, want)
		}
	}
	if len(inlineSafeTypes) != 26 {
		t.Fatalf("safe list has %d entries, spec has 26", len(inlineSafeTypes))
	}
}

func TestContentDispositionRoundTrip(t *testing.T) {
	names := []string{
		"ascii", "name with spaces", "name;with;semicolons", `"quoted"`, `back\slash`,
		"🐔", "☕", "%41", "a'b", strings.Repeat("ünïcødé-名前-", 12), "file.png", "a=b", "tab\there",
		"(paren)", "x*", "über.txt",
	}
	for _, name := range names {
		for _, ct := range []string{"image/png", "application/octet-stream"} {
			h := ContentDisposition(ct, name, false)
			disp, params, err := mime.ParseMediaType(h)
			if err != nil {
				t.Errorf("ParseMediaType(%q): %v", h, err)
				continue
			}
			wantDisp := "attachment"
			if ct == "image/png" {
				wantDisp = "inline"
			}
			if disp != wantDisp {
				t.Errorf("%q: disposition %q, want %q", h, disp, wantDisp)
			}
			if params["filename"] != name {
				t.Errorf("%q: filename %q, want %q", h, params["filename"], name)
			}
		}
	}
}

func TestContentDispositionExact(t *testing.T) {
	tests := []struct {
		ct, name string
		force    bool
		want     string
	}{
		{"image/png", "", false, "inline"},
		{"text/html", "", false, "attachment"},
		{"text/html", "", true, "inline"},
		{"text/plain", "also_ascii", false, "inline; filename=also_ascii"},
		{"application/pdf", "also_ascii", false, "attachment; filename=also_ascii"},
		{"application/pdf", "☕", false, "attachment; filename*=utf-8''%E2%98%95"},
		{"application/pdf", "a b", false, "attachment; filename*=utf-8''a%20b"},
		{"image/svg+xml", "x.svg", false, "attachment; filename=x.svg"},
	}
	for _, tc := range tests {
		if got := ContentDisposition(tc.ct, tc.name, tc.force); got != tc.want {
			t.Errorf("ContentDisposition(%q, %q, %v) = %q, want %q", tc.ct, tc.name, tc.force, got, tc.want)
		}
	}
}

func TestWriteErrorMarshalFallback(t *testing.T) {
	rec := httptest.NewRecorder()
	WriteError(rec, &Error{Status: 500, ErrCode: "M_UNKNOWN", Message: "m", Extra: map[string]any{"bad": func() {}}})
	if rec.Code != http.StatusInternalServerError {
		t.Fatalf("status %d", rec.Code)
	}
	var body map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body["errcode"] != "M_UNKNOWN" {
		t.Fatalf("body %q: %v", rec.Body.String(), err)
	}
}

// Validating the server name of a download (a DNS name or IPv4 address,
// with or without a port) allocates nothing: it runs on every request.
func TestValidServerNameAllocatesNothing(t *testing.T) {
	for _, name := range []string{"example.org", "matrix.example.org:8448", "1.2.3.4:443"} {
		if n := testing.AllocsPerRun(100, func() {
			if !ValidServerName(name) {
				t.Fatalf("%s refused", name)
			}
		}); n != 0 {
			t.Errorf("ValidServerName(%q) makes %v allocations, want 0", name, n)
		}
	}
}
