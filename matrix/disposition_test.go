package matrix

import (
	"mime"
	"testing"
)

// A Content-Type that is a list, or anything but exactly one valid media
// type, is never inline-safe: browsers take the last type of a list.
func TestInlineSafeWholeValue(t *testing.T) {
	tests := []struct {
		ct   string
		want bool
	}{
		{"text/plain", true},
		{"text/plain; charset=utf-8", true},
		{"text/plain;charset=utf-8", true},
		{"text/plain ; charset=utf-8 ", true},
		{`text/plain; charset="utf-8"`, true},
		{`text/plain; charset="a,b;c"`, true},
		{"image/png;x=y", true},
		{"image/png; a=b; c=d", true},
		{"IMAGE/PNG", true},
		{"\ttext/plain\t", true},

		{"text/plain; charset=utf-8, text/html", false},
		{"text/plain;,text/html", false},
		{"image/png;x=y,text/html", false},
		{"image/png,text/html", false},
		{"image/png, image/png", false},
		{"text/plain, text/plain", false},
		{"image/png;x=y, text/html", false},
		{`text/plain; charset="utf-8", text/html`, false},
		{`text/plain; charset="unterminated`, false},
		{`text/plain; charset="x\"`, false},
		{"text/plain;", false},
		{"text/plain; ;", false},
		{"text/plain; charset", false},
		{"text/plain; charset=", false},
		{"text/plain; =utf-8", false},
		{"text/plain; charset=utf 8", false},
		{"text/plain; charset=utf-8 x", false},
		{"text/plain x", false},
		{"text /plain", false},
		{"text/ plain", false},
		{"text/", false},
		{"/plain", false},
		{"text", false},
		{"text/plain/x", false},
		{"text/plain\x00", false},
		{"text/plain\n", false},
		{"text/plain;\ntext/html", false},
		{"", false},
	}
	for _, tc := range tests {
		if got := InlineSafe(tc.ct); got != tc.want {
			t.Errorf("InlineSafe(%q) = %v, want %v", tc.ct, got, tc.want)
		}
		if !tc.want {
			if got := ContentDisposition(tc.ct, "", false); got != "attachment" {
				t.Errorf("ContentDisposition(%q) = %q, want attachment", tc.ct, got)
			}
		}
	}
}

// Bidirectional controls let an uploader show "exe.png" for a name that
// ends in ".exe": they never reach a Content-Disposition.
func TestContentDispositionStripsBidiControls(t *testing.T) {
	tests := []struct {
		name, want string
	}{
		{"invoice\u202Egnp.exe", "invoicegnp.exe"},
		{"\u202Aa\u202Bb\u202Cc\u202Dd\u202Ee.txt", "abcde.txt"},
		{"\u2066a\u2067b\u2068c\u2069d.txt", "abcd.txt"},
		{"a\u200Eb\u200Fc\u061Cd.txt", "abcd.txt"},
		{"\u202E", ""},
		{"plain.txt", "plain.txt"},
		{"ملف.txt", "ملف.txt"},
		{"a\u200Db.txt", "a\u200Db.txt"}, // a joiner is not a direction control
	}
	for _, tc := range tests {
		if got := StripBidiControls(tc.name); got != tc.want {
			t.Errorf("StripBidiControls(%q) = %q, want %q", tc.name, got, tc.want)
		}
		if HasBidiControls(tc.want) {
			t.Errorf("HasBidiControls(%q) = true", tc.want)
		}
		h := ContentDisposition("application/pdf", tc.name, false)
		if tc.want == "" {
			if h != "attachment" {
				t.Errorf("ContentDisposition(%q) = %q, want attachment", tc.name, h)
			}
			continue
		}
		_, params, err := mime.ParseMediaType(h)
		if err != nil {
			t.Fatalf("ParseMediaType(%q): %v", h, err)
		}
		if params["filename"] != tc.want {
			t.Errorf("ContentDisposition(%q): filename %q, want %q", tc.name, params["filename"], tc.want)
		}
	}
	if !HasBidiControls("x\u2067y") || HasBidiControls("xy") {
		t.Error("HasBidiControls")
	}
}
