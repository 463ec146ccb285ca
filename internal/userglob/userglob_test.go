package userglob

import (
	"regexp"
	"strings"
	"testing"
)

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

// reference compiles pat into the regular expression of its documented
// meaning: anchored at both ends, '*' any run of characters (newlines
// included), '?' one code point (an invalid byte counts as one, as it does
// for the regexp package), every other character itself.
func reference(pat string) *regexp.Regexp {
	var b strings.Builder
	b.WriteString(`(?s)\A`)
	for _, c := range pat {
		switch c {
		case '*':
			b.WriteString(`.*`)
		case '?':
			b.WriteString(`.`)
		default:
			b.WriteString(regexp.QuoteMeta(string(c)))
		}
	}
	b.WriteString(`\z`)
	return regexp.MustCompile(b.String())
}

// TestMatchAgreesWithReference runs the table of TestMatch and some
// backtracking cases through the reference regexp too.
func TestMatchAgreesWithReference(t *testing.T) {
	tests := []struct{ pat, s string }{
		{"@*:example.org", "@alice:example.org"},
		{"*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
		{"*a*a*a*b", "aaaaaaaaaaaaaaaab"},
		{"?*?", "é"},
		{"?*?", "éé"},
		{"@a?c", "@a\xffc"},
		{"*", "\xff\xfe"},
		{"a*b", "a\nb"},
		{"*.*", "xy"},
		{"[a]", "a"},
		{"a+", "aa"},
	}
	for _, tt := range tests {
		got := MustCompile(tt.pat).Match(tt.s)
		if want := reference(tt.pat).MatchString(tt.s); got != want {
			t.Errorf("%q.Match(%q) = %t, the reference says %t", tt.pat, tt.s, got, want)
		}
	}
}

// FuzzMatch checks Match against the reference regexp for every valid
// pattern and any subject.
func FuzzMatch(f *testing.F) {
	f.Add("@*:example.org", "@alice:example.org")
	f.Add("*a*b?c", "xaybzc")
	f.Add("?*?", "é")
	f.Add("@a?c", "@a\xffc")
	f.Add("*a*a*b", "aaaaaaaaaaaa")
	f.Fuzz(func(t *testing.T, pat, s string) {
		p, err := Compile(pat)
		if err != nil {
			return
		}
		got := p.Match(s)
		if want := reference(pat).MatchString(s); got != want {
			t.Fatalf("%q.Match(%q) = %t, the reference says %t", pat, s, got, want)
		}
		if p.literal && got != (pat == s) {
			t.Fatalf("literal %q vs %q", pat, s)
		}
	})
}
