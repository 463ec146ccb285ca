package userglob

import "testing"

func TestMatch(t *testing.T) {
	tests := []struct {
		pat, s string
		want   bool
	}{
		{"@*:example.org", "@alice:example.org", true},
		{"@*:example.org", "@alice:example.org.evil", false},
		{"@*:example.org", "@alice:other.org", false},
		{"@bot_*:example.org", "@bot_irc:example.org", true},
		{"@bot_*:example.org", "@bot_:example.org", true},
		{"@bot_*:example.org", "@alice:example.org", false},
		{"@alice:example.org", "@alice:example.org", true},
		{"@alice:example.org", "@alice:example.orgx", false},
		{"@alice:example.org", "@Alice:example.org", false},
		{"*", "", true},
		{"*", "@anything:x", true},
		{"@?:x", "@é:x", true},
		{"@?:x", "@ab:x", false},
		{"@*b*c:x", "@abxbyc:x", true},
		{"@*b*c:x", "@abxbyd:x", false},
		{"*:*", "@a:b", true},
		{"**", "x", true},
		{"@a*", "@", false},
	}
	for _, tt := range tests {
		if got := MustCompile(tt.pat).Match(tt.s); got != tt.want {
			t.Errorf("%q.Match(%q) = %t, want %t", tt.pat, tt.s, got, tt.want)
		}
	}
}

func TestCompileRejects(t *testing.T) {
	for _, p := range []string{"", "@a b:x", "@a\t:x", "@a\x00:x", "\xff", string(make([]byte, MaxLength+1))} {
		if _, err := Compile(p); err == nil {
			t.Errorf("Compile(%q) accepted", p)
		}
	}
}

func FuzzMatch(f *testing.F) {
	f.Add("@*:example.org", "@alice:example.org")
	f.Add("*a*b?c", "xaybzc")
	f.Fuzz(func(t *testing.T, pat, s string) {
		p, err := Compile(pat)
		if err != nil {
			return
		}
		m := p.Match(s)
		if p.literal && m != (pat == s) {
			t.Fatalf("literal %q vs %q", pat, s)
		}
		if pat == "*" && !m {
			t.Fatal("* must match everything")
		}
	})
}
