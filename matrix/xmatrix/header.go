package xmatrix

import (
	"fmt"
	"strings"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// Scheme is the authentication scheme of Matrix federation requests.
const Scheme = "X-Matrix"

// Auth holds the parameters of one X-Matrix Authorization header.
type Auth struct {
	// Origin is the sending server's name.
	Origin string
	// Destination is the receiving server's name; empty when the header
	// has none (allowed for compatibility with pre-v1.3 senders).
	Destination string
	// KeyID is the signing key's ID, e.g. "ed25519:a_AbCd".
	KeyID string
	// Signature is the unpadded base64 ed25519 signature.
	Signature string
}

// String formats a as an Authorization header value the way senders should:
// one space after the scheme, lower-case parameter names, quoted values,
// no whitespace around commas, destination omitted when empty. Quotes and
// backslashes in values (which valid values never contain) are escaped.
func (a Auth) String() string {
	var b strings.Builder
	b.WriteString(Scheme)
	b.WriteString(" origin=")
	writeQuoted(&b, a.Origin)
	if a.Destination != "" {
		b.WriteString(",destination=")
		writeQuoted(&b, a.Destination)
	}
	b.WriteString(",key=")
	writeQuoted(&b, a.KeyID)
	b.WriteString(",sig=")
	writeQuoted(&b, a.Signature)
	return b.String()
}

func writeQuoted(b *strings.Builder, s string) {
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
}

// isTchar reports whether c is an RFC 9110 token character.
func isTchar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// isXMatrix reports whether an Authorization header value uses the X-Matrix
// scheme (case-insensitive), whatever its parameters.
func isXMatrix(value string) bool {
	s := strings.TrimLeft(value, " \t")
	i := 0
	for i < len(s) && isTchar(s[i]) {
		i++
	}
	return strings.EqualFold(s[:i], Scheme)
}

// ParseAuthorization parses an X-Matrix Authorization header value
// following RFC 9110 §11.4 and the Matrix specification: the scheme is
// matched case-insensitively and followed by at least one space (or tab);
// parameters are comma-separated name=value pairs in any order with
// optional spaces or tabs around commas and "="; names are
// case-insensitive; values are tokens or quoted strings with backslash
// escapes, and unquoted values may contain ':' (and '/', '=' …; anything
// visible except ',' and '"'). Unknown parameters are ignored; "signature"
// is accepted as an alias of "sig". A missing or empty origin, key or sig,
// a repeated parameter, an origin that is not a valid server name or any
// syntax error yields an error wrapping ErrMalformedAuth. Destination is
// optional.
func ParseAuthorization(value string) (Auth, error) {
	a, err := parseAuthorization(value)
	if err != nil {
		return Auth{}, fmt.Errorf("parsing X-Matrix authorization: %w: %s", ErrMalformedAuth, err)
	}
	return a, nil
}

type headerParser struct {
	s string
	i int
}

func (p *headerParser) skipWS() {
	for p.i < len(p.s) && (p.s[p.i] == ' ' || p.s[p.i] == '\t') {
		p.i++
	}
}

func (p *headerParser) token() string {
	start := p.i
	for p.i < len(p.s) && isTchar(p.s[p.i]) {
		p.i++
	}
	return p.s[start:p.i]
}

// quoted parses a quoted-string starting at the opening quote.
func (p *headerParser) quoted() (string, error) {
	p.i++ // opening quote
	var b strings.Builder
	for p.i < len(p.s) {
		c := p.s[p.i]
		switch {
		case c == '"':
			p.i++
			return b.String(), nil
		case c == '\\':
			if p.i+1 >= len(p.s) {
				return "", fmt.Errorf("unterminated escape at offset %d", p.i)
			}
			e := p.s[p.i+1]
			if !(e == '\t' || e >= 0x20 && e != 0x7f) {
				return "", fmt.Errorf("invalid escaped character %#x at offset %d", e, p.i+1)
			}
			b.WriteByte(e)
			p.i += 2
		case c == '\t' || c >= 0x20 && c != 0x7f:
			b.WriteByte(c)
			p.i++
		default:
			return "", fmt.Errorf("invalid character %#x in quoted value at offset %d", c, p.i)
		}
	}
	return "", fmt.Errorf("unterminated quoted value")
}

// unquoted parses a bare value: visible characters except ',' and '"'.
func (p *headerParser) unquoted() string {
	start := p.i
	for p.i < len(p.s) {
		c := p.s[p.i]
		if c <= 0x20 || c == 0x7f || c == ',' || c == '"' {
			break
		}
		p.i++
	}
	return p.s[start:p.i]
}

func parseAuthorization(value string) (Auth, error) {
	p := &headerParser{s: strings.Trim(value, " \t")}
	if scheme := p.token(); !strings.EqualFold(scheme, Scheme) {
		return Auth{}, fmt.Errorf("scheme %q is not %s", scheme, Scheme)
	}
	if p.i < len(p.s) && p.s[p.i] != ' ' && p.s[p.i] != '\t' {
		return Auth{}, fmt.Errorf("no space after the scheme")
	}
	var a Auth
	seen := map[string]bool{}
	for {
		// Skip whitespace and empty list elements.
		for p.i < len(p.s) && (p.s[p.i] == ' ' || p.s[p.i] == '\t' || p.s[p.i] == ',') {
			p.i++
		}
		if p.i >= len(p.s) {
			break
		}
		name := strings.ToLower(p.token())
		if name == "" {
			return Auth{}, fmt.Errorf("unexpected character %q at offset %d", p.s[p.i], p.i)
		}
		p.skipWS()
		if p.i >= len(p.s) || p.s[p.i] != '=' {
			return Auth{}, fmt.Errorf("parameter %q has no value", name)
		}
		p.i++
		p.skipWS()
		var val string
		if p.i < len(p.s) && p.s[p.i] == '"' {
			var err error
			if val, err = p.quoted(); err != nil {
				return Auth{}, fmt.Errorf("parameter %q: %w", name, err)
			}
		} else if val = p.unquoted(); val == "" {
			return Auth{}, fmt.Errorf("parameter %q has no value", name)
		}
		p.skipWS()
		if p.i < len(p.s) && p.s[p.i] != ',' {
			return Auth{}, fmt.Errorf("unexpected character %q after parameter %q", p.s[p.i], name)
		}
		if name == "signature" {
			name = "sig"
		}
		var dst *string
		switch name {
		case "origin":
			dst = &a.Origin
		case "destination":
			dst = &a.Destination
		case "key":
			dst = &a.KeyID
		case "sig":
			dst = &a.Signature
		default:
			continue // unknown parameters are ignored
		}
		if seen[name] {
			return Auth{}, fmt.Errorf("parameter %q given twice", name)
		}
		seen[name] = true
		*dst = val
	}
	switch {
	case a.Origin == "":
		return Auth{}, fmt.Errorf("missing origin")
	case a.KeyID == "":
		return Auth{}, fmt.Errorf("missing key")
	case a.Signature == "":
		return Auth{}, fmt.Errorf("missing sig")
	case !matrix.ValidServerName(a.Origin):
		return Auth{}, fmt.Errorf("origin %q is not a valid server name", a.Origin)
	}
	return a, nil
}
