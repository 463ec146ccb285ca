package xmatrix

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
)

func TestCanonicalBytes(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		// The examples of the specification's "Canonical JSON" appendix.
		{"empty object", `{}`, `{}`},
		{"spacing", "{\n    \"one\": 1,\n    \"two\": \"Two\"\n}", `{"one":1,"two":"Two"}`},
		{"sorting", "{\n    \"b\": \"2\",\n    \"a\": \"1\"\n}", `{"a":"1","b":"2"}`},
		{"sorting compact", `{"b":"2","a":"1"}`, `{"a":"1","b":"2"}`},
		{"nested", `{
    "auth": {
        "success": true,
        "mxid": "@john.doe:example.com",
        "profile": {
            "display_name": "John Doe",
            "three_pids": [
                {"medium": "email", "address": "john.doe@example.org"},
                {"medium": "msisdn", "address": "123456789"}
            ]
        }
    }
}`, `{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}`},
		{"unicode raw", `{"a": "日本語"}`, `{"a":"日本語"}`},
		{"unicode keys by code point", `{"本": 2, "日": 1}`, `{"日":1,"本":2}`},
		{"unicode escape decoded", `{"a": "\u65E5"}`, `{"a":"日"}`},
		{"null", `{"a": null}`, `{"a":null}`},
		{"minus zero and exponent", `{"a": -0, "b": 1e10}`, `{"a":0,"b":10000000000}`},
		// Escapes.
		{"control escapes", `{"a":"\u0000\u0001\u001f\u007f"}`, "{\"a\":\"\\u0000\\u0001\\u001f\x7f\"}"},
		{"short escapes", `["\b\f\n\r\t\"\\\/"]`, `["\b\f\n\r\t\"\\/"]`},
		{"line separators raw", `["\u2028\u2029"]`, "[\"\u2028\u2029\"]"},
		{"html not escaped", `["<&>"]`, `["<&>"]`},
		{"astral", `["\ud83d\ude00"]`, `["😀"]`},
		// Numbers.
		{"max int", `[9007199254740991,-9007199254740991]`, `[9007199254740991,-9007199254740991]`},
		{"integral spellings", `[1.0,1.50e1,1E+2,0e99,-0.0,120e-1]`, `[1,15,100,0,0,12]`},
		// Sorting by code point, not by UTF-16 unit: U+FF61 < U+1F600.
		{"code point order", `{"😀":1,"｡":2,"a":3,"B":4}`, `{"B":4,"a":3,"｡":2,"😀":1}`},
		{"arrays keep order", `[3,1,2,[],{}]`, `[3,1,2,[],{}]`},
		{"scalars", `true`, `true`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := CanonicalBytes([]byte(tt.in))
			if err != nil {
				t.Fatalf("CanonicalBytes: %v", err)
			}
			if string(got) != tt.want {
				t.Fatalf("got  %s\nwant %s", got, tt.want)
			}
		})
	}
}

func TestCanonicalBytesRejects(t *testing.T) {
	tests := []struct{ name, in string }{
		{"float", `{"a":1.5}`},
		{"negative exponent", `[1e-1]`},
		{"too large", `[9007199254740992]`},
		{"too small", `[-9007199254740992]`},
		{"huge exponent", `[1e999999999999]`},
		{"tiny exponent", `[1e-999999999999]`},
		{"large exponent", `[1e16]`},
		{"duplicate key", `{"a":1,"a":2}`},
		{"trailing data", `{} {}`},
		{"not JSON", `{`},
		{"empty", ``},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := CanonicalBytes([]byte(tt.in))
			if err == nil {
				t.Fatalf("CanonicalBytes(%s) = %s, want error", tt.in, got)
			}
		})
	}
}

func TestCanonicalGoValues(t *testing.T) {
	tests := []struct {
		name    string
		in      any
		want    string
		wantErr bool
	}{
		{"float64 integral", map[string]any{"a": float64(3), "b": math.Copysign(0, -1)}, `{"a":3,"b":0}`, false},
		{"float64 fraction", []any{0.5}, "", true},
		{"NaN", []any{math.NaN()}, "", true},
		{"Inf", []any{math.Inf(1)}, "", true},
		{"float64 out of range", []any{float64(1 << 53)}, "", true},
		{"ints", []any{int(1), int64(-2)}, `[1,-2]`, false},
		{"int64 out of range", []any{int64(1 << 53)}, "", true},
		{"other Go integer types", []any{int32(3)}, "", true},
		{"json.Number", []any{json.Number("42")}, `[42]`, false},
		{"bad json.Number", []any{json.Number("4x")}, "", true},
		{"invalid utf8", []any{"\xff"}, "", true},
		{"invalid utf8 key", map[string]any{"\xff": 1}, "", true},
		{"unsupported type", []any{struct{}{}}, "", true},
		{"nil", nil, `null`, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Canonical(tt.in)
			if tt.wantErr {
				if err == nil || !errors.Is(err, ErrNotCanonicalizable) {
					t.Fatalf("Canonical = %s, %v; want ErrNotCanonicalizable", got, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Canonical: %v", err)
			}
			if string(got) != tt.want {
				t.Fatalf("got %s, want %s", got, tt.want)
			}
		})
	}
}

func TestCanonicalDepthLimit(t *testing.T) {
	deep := strings.Repeat("[", maxDepth+2) + strings.Repeat("]", maxDepth+2)
	if _, err := CanonicalBytes([]byte(deep)); err == nil {
		t.Fatal("deeply nested document accepted")
	}
	ok := strings.Repeat("[", 100) + strings.Repeat("]", 100)
	if got, err := CanonicalBytes([]byte(ok)); err != nil || string(got) != ok {
		t.Fatalf("nesting 100: %s, %v", got, err)
	}
}

// TestCanonicalKeyServerVector checks the canonical form of the key/v2/server
// vector from xmatrix-vectors.txt.
func TestCanonicalKeyServerVector(t *testing.T) {
	in := `{"server_name":"domain","valid_until_ts":1700000000000,
 "verify_keys":{"ed25519:1":{"key":"XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"}},
 "old_verify_keys":{}}`
	want := `{"old_verify_keys":{},"server_name":"domain","valid_until_ts":1700000000000,"verify_keys":{"ed25519:1":{"key":"XGX0JRS2Af3be3knz2fBiRbApjm2Dh61gXDJA8kcJNI"}}}`
	got, err := CanonicalBytes([]byte(in))
	if err != nil || string(got) != want {
		t.Fatalf("got %s, %v\nwant %s", got, err, want)
	}
}

func FuzzCanonicalBytes(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":[1,2,{"b":null}]}`, `[1e10,-0]`, `"\u0001"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		out, err := CanonicalBytes(raw)
		if err != nil {
			return
		}
		// Canonical output is valid JSON and a fixed point.
		again, err := CanonicalBytes(out)
		if err != nil || string(again) != string(out) {
			t.Fatalf("not a fixed point: %q -> %q -> %q (%v)", raw, out, again, err)
		}
	})
}
