// Package userglob matches Matrix user IDs against simple glob patterns
// (`@*:example.org`, `@bot_*:example.org`, `@alice:example.org`). It is the
// one glob matcher of the module: quota rules (and anything else that picks
// users by pattern) use it, so that every pattern means the same thing.
//
// Syntax: `*` matches any run of characters (none included), `?` exactly one
// character (one Unicode code point); every other character matches itself,
// case-sensitively (user IDs are case-sensitive). There is no escaping and
// there are no character classes: user IDs cannot contain `*` or `?`.
package userglob

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// MaxLength bounds a pattern, as the Matrix spec bounds user IDs (255 bytes).
const MaxLength = 255

// Pattern is a validated glob pattern.
type Pattern struct {
	src string
	// literal is true when the pattern has no wildcard (exact match).
	literal bool
}

// Compile validates a pattern: non-empty, valid UTF-8 of at most MaxLength
// bytes, without whitespace or control characters.
func Compile(pattern string) (Pattern, error) {
	switch {
	case pattern == "":
		return Pattern{}, errors.New("empty user pattern")
	case len(pattern) > MaxLength:
		return Pattern{}, fmt.Errorf("user pattern %.40q... is longer than %d bytes", pattern, MaxLength)
	case !utf8.ValidString(pattern):
		return Pattern{}, fmt.Errorf("user pattern %q is not valid UTF-8", pattern)
	}
	for _, c := range pattern {
		if unicode.IsSpace(c) || unicode.IsControl(c) {
			return Pattern{}, fmt.Errorf("user pattern %q contains whitespace or a control character", pattern)
		}
	}
	return Pattern{src: pattern, literal: !strings.ContainsAny(pattern, "*?")}, nil
}

// MustCompile is Compile that panics on an invalid pattern (for tests and
// constants).
func MustCompile(pattern string) Pattern {
	p, err := Compile(pattern)
	if err != nil {
		panic(err)
	}
	return p
}

// String returns the pattern as written.
func (p Pattern) String() string { return p.src }

// Match reports whether s matches the whole pattern. It runs in
// O(len(pattern)*len(s)) at worst (no backtracking blow-up).
func (p Pattern) Match(s string) bool {
	if p.literal {
		return p.src == s
	}
	return match(p.src, s)
}

// match is the classic greedy wildcard matcher with a single backtrack
// point (the last star), which is linear-time per star.
func match(pat, s string) bool {
	var pi, si int
	star, mark := -1, 0
	for si < len(s) {
		if pi < len(pat) {
			switch pat[pi] {
			case '*':
				star, mark = pi, si
				pi++
				continue
			case '?':
				_, n := utf8.DecodeRuneInString(s[si:])
				pi++
				si += n
				continue
			default:
				if pat[pi] == s[si] {
					pi++
					si++
					continue
				}
			}
		}
		if star < 0 {
			return false
		}
		// Let the last star swallow one more code point and retry.
		_, n := utf8.DecodeRuneInString(s[mark:])
		mark += n
		pi, si = star+1, mark
	}
	for pi < len(pat) && pat[pi] == '*' {
		pi++
	}
	return pi == len(pat)
}
