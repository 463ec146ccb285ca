package xmatrix

import (
	"errors"
	"testing"
)

func TestParseAuthorization(t *testing.T) {
	full := Auth{Origin: "domain", Destination: "media.example.org", KeyID: "ed25519:1", Signature: downloadSig}
	noDest := full
	noDest.Destination = ""
	tests := []struct {
		name string
		in   string
		want Auth
	}{
		{"canonical", `X-Matrix origin="domain",destination="media.example.org",key="ed25519:1",sig="` + downloadSig + `"`, full},
		{"re-ordered", `X-Matrix sig="` + downloadSig + `",key="ed25519:1",destination="media.example.org",origin="domain"`, full},
		{"unquoted with colons and slashes", `X-Matrix origin=domain,destination=media.example.org,key=ed25519:1,sig=` + downloadSig, full},
		{"mixed-case scheme and names", `x-MATRIX Origin="domain",DESTINATION="media.example.org",Key="ed25519:1",SiG="` + downloadSig + `"`, full},
		{"extra spaces and tabs", "X-Matrix  \t origin = \"domain\" ,\tdestination=\"media.example.org\" , key\t=\t\"ed25519:1\",  sig=\"" + downloadSig + "\"  ", full},
		{"escapes", `X-Matrix origin="do\main",destination="media.example.org",key="ed25519:\1",sig="` + downloadSig + `"`, full},
		{"unknown params ignored", `X-Matrix foo=bar,origin="domain",baz="qu,x\"",destination="media.example.org",key="ed25519:1",sig="` + downloadSig + `",zzz=1`, full},
		{"signature alias", `X-Matrix origin="domain",destination="media.example.org",key="ed25519:1",signature="` + downloadSig + `"`, full},
		{"destination optional", `X-Matrix origin="domain",key="ed25519:1",sig="` + downloadSig + `"`, noDest},
		{"empty list elements", `X-Matrix ,origin="domain",,key="ed25519:1", ,sig="` + downloadSig + `",`, noDest},
		{"origin with port", `X-Matrix origin="domain:8448",key="ed25519:1",sig="x"`, Auth{Origin: "domain:8448", KeyID: "ed25519:1", Signature: "x"}},
		{"padded unquoted sig", `X-Matrix origin=domain,key=ed25519:1,sig=abc=`, Auth{Origin: "domain", KeyID: "ed25519:1", Signature: "abc="}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseAuthorization(tt.in)
			if err != nil {
				t.Fatalf("ParseAuthorization: %v", err)
			}
			if got != tt.want {
				t.Fatalf("got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestParseAuthorizationErrors(t *testing.T) {
	tests := []struct{ name, in string }{
		{"empty", ``},
		{"other scheme", `Bearer abc`},
		{"scheme prefix only", `X-Matrixorigin="domain",key="ed25519:1",sig="x"`},
		{"no params", `X-Matrix`},
		{"missing origin", `X-Matrix key="ed25519:1",sig="x"`},
		{"missing key", `X-Matrix origin="domain",sig="x"`},
		{"missing sig", `X-Matrix origin="domain",key="ed25519:1"`},
		{"empty origin", `X-Matrix origin="",key="ed25519:1",sig="x"`},
		{"invalid origin", `X-Matrix origin="do main",key="ed25519:1",sig="x"`},
		{"invalid origin chars", `X-Matrix origin="a/b",key="ed25519:1",sig="x"`},
		{"duplicate origin", `X-Matrix origin="a",origin="b",key="ed25519:1",sig="x"`},
		{"sig and signature", `X-Matrix origin="a",key="ed25519:1",sig="x",signature="y"`},
		{"unterminated quote", `X-Matrix origin="domain,key="ed25519:1",sig="x`},
		{"missing comma", `X-Matrix origin="domain" key="ed25519:1",sig="x"`},
		{"no equals", `X-Matrix origin,key="ed25519:1",sig="x"`},
		{"empty unquoted", `X-Matrix origin=,key="ed25519:1",sig="x"`},
		{"control character", "X-Matrix origin=\"dom\x01ain\",key=\"ed25519:1\",sig=\"x\""},
		{"token68", `X-Matrix abc==`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseAuthorization(tt.in)
			if !errors.Is(err, ErrMalformedAuth) {
				t.Fatalf("ParseAuthorization(%q) = %+v, %v; want ErrMalformedAuth", tt.in, got, err)
			}
		})
	}
}

func TestAuthStringEscapes(t *testing.T) {
	a := Auth{Origin: "domain", KeyID: `ed25519:"x\`, Signature: "s\tig"}
	h := a.String()
	if want := `X-Matrix origin="domain",key="ed25519:\"x\\",sig="s` + "\t" + `ig"`; h != want {
		t.Fatalf("String() = %q, want %q", h, want)
	}
	got, err := ParseAuthorization(h)
	if err != nil || got != a {
		t.Fatalf("re-parse: %+v, %v", got, err)
	}
}

func FuzzParseAuthorization(f *testing.F) {
	seeds := []string{
		`X-Matrix origin="domain",destination="media.example.org",key="ed25519:1",sig="` + downloadSig + `"`,
		`x-matrix Origin=domain , key=ed25519:1 ,SIG=abc`,
		`X-Matrix origin="a\"b",key="k",sig="s",extra="\\"`,
		"X-Matrix\torigin=d,key=k,signature=s,destination=\"\"",
		`X-Matrix ,,origin="d:1",key=,sig=`,
		`Bearer x`,
	}
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		a, err := ParseAuthorization(in)
		if err != nil {
			if !errors.Is(err, ErrMalformedAuth) {
				t.Fatalf("error %v does not wrap ErrMalformedAuth", err)
			}
			return
		}
		if a.Origin == "" || a.KeyID == "" || a.Signature == "" {
			t.Fatalf("accepted %q with empty required fields: %+v", in, a)
		}
		again, err := ParseAuthorization(a.String())
		if err != nil {
			t.Fatalf("re-parse of %q (from %q): %v", a.String(), in, err)
		}
		if again != a {
			t.Fatalf("round trip of %q: %+v != %+v", in, again, a)
		}
	})
}
