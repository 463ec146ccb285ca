package matrix

import (
	"strings"
)

// inlineSafeTypes are the media types a browser may render inline (spec
// "Security considerations" of the content repository, MSC2702). Anything
// else is served as an attachment.
var inlineSafeTypes = [...]string{
	"text/css", "text/plain", "text/csv",
	"application/json", "application/ld+json",
	"image/jpeg", "image/gif", "image/png", "image/apng", "image/webp", "image/avif",
	"video/mp4", "video/webm", "video/ogg", "video/quicktime",
	"audio/mp4", "audio/webm", "audio/aac", "audio/mpeg", "audio/ogg",
	"audio/wave", "audio/wav", "audio/x-wav", "audio/x-pn-wav", "audio/flac", "audio/x-flac",
}

// InlineSafe reports whether contentType may be served inline: the whole
// value must be exactly one valid media type (RFC 9110 grammar: type "/"
// subtype, then any number of "; name=value" parameters whose value is a
// token or a quoted string, with optional spaces and tabs around), and its
// type/subtype, compared case-insensitively, must be in the spec's safe list.
// Anything else (a list such as "text/plain, text/html", of which browsers
// take the last type, an empty parameter, stray characters) is not safe.
func InlineSafe(contentType string) bool {
	mt, ok := singleMediaType(contentType)
	if !ok {
		return false
	}
	for _, t := range inlineSafeTypes {
		if strings.EqualFold(mt, t) {
			return true
		}
	}
	return false
}

// singleMediaType returns the type/subtype of s when s is exactly one valid
// media type with optional parameters, and false otherwise.
func singleMediaType(s string) (string, bool) {
	s = trimOWS(s)
	typ, rest := cutToken(s)
	if typ == "" || !strings.HasPrefix(rest, "/") {
		return "", false
	}
	sub, rest := cutToken(rest[1:])
	if sub == "" {
		return "", false
	}
	mt := s[:len(typ)+1+len(sub)]
	for {
		rest = trimOWS(rest)
		if rest == "" {
			return mt, true
		}
		if rest[0] != ';' {
			return "", false
		}
		var name string
		name, rest = cutToken(trimOWS(rest[1:]))
		if name == "" || !strings.HasPrefix(rest, "=") {
			return "", false
		}
		rest = rest[1:]
		if strings.HasPrefix(rest, `"`) {
			var ok bool
			if rest, ok = cutQuoted(rest); !ok {
				return "", false
			}
			continue
		}
		var val string
		if val, rest = cutToken(rest); val == "" {
			return "", false
		}
	}
}

// trimOWS trims spaces and tabs at both ends.
func trimOWS(s string) string { return strings.Trim(s, " \t") }

// cutToken splits s after its leading RFC 9110 token (possibly empty).
func cutToken(s string) (token, rest string) {
	i := 0
	for i < len(s) && isTokenChar(s[i]) {
		i++
	}
	return s[:i], s[i:]
}

// cutQuoted splits s, which starts with '"', after its quoted string; false
// when the string is not terminated or holds a forbidden byte.
func cutQuoted(s string) (rest string, ok bool) {
	for i := 1; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"':
			return s[i+1:], true
		case c == '\\':
			i++
			if i == len(s) || (s[i] < 0x20 && s[i] != '\t') || s[i] == 0x7f {
				return "", false
			}
		case (c < 0x20 && c != '\t') || c == 0x7f:
			return "", false
		}
	}
	return "", false
}

// isTokenChar reports whether c is an RFC 9110 tchar.
func isTokenChar(c byte) bool {
	return isAlnum(c) || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// bidiControls are the characters that change the display direction of
// text (Unicode Bidi_Control): in a file name they can make "gnp.exe" show
// as "exe.png".
const bidiControls = "\u061C\u200E\u200F\u202A\u202B\u202C\u202D\u202E\u2066\u2067\u2068\u2069"

// HasBidiControls reports whether s holds a bidirectional control character
// (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069).
func HasBidiControls(s string) bool { return strings.ContainsAny(s, bidiControls) }

// StripBidiControls returns s without its bidirectional control characters
// (see HasBidiControls), so that the name shown is the name's real order.
func StripBidiControls(s string) string {
	if !HasBidiControls(s) {
		return s
	}
	return strings.Map(func(r rune) rune {
		if strings.ContainsRune(bidiControls, r) {
			return -1
		}
		return r
	}, s)
}

// ContentDisposition builds the Content-Disposition header of a download:
// "inline" when contentType is inline-safe (see InlineSafe) or forceInline is
// set, "attachment" otherwise, followed by the file name when there is one.
// Bidirectional control characters are removed from the file name first (see
// StripBidiControls): rows stored before uploads stripped them, and names
// taken from a download URL or a remote server, may hold them.
//
// A file name that is an RFC 2616 token is sent as filename=name; any other
// name is sent in the RFC 5987 extended form (charset utf-8, empty language,
// percent-encoded UTF-8 bytes), which every current browser and Go's
// mime.ParseMediaType decode to the exact original name:
//
//	attachment; filename*=utf-8''%E2%98%95
func ContentDisposition(contentType, filename string, forceInline bool) string {
	disp := "attachment"
	if forceInline || InlineSafe(contentType) {
		disp = "inline"
	}
	filename = StripBidiControls(filename)
	if filename == "" {
		return disp
	}
	if isToken(filename) {
		return disp + "; filename=" + filename
	}
	var b strings.Builder
	b.Grow(len(disp) + len("; filename*=utf-8''") + 3*len(filename))
	b.WriteString(disp)
	b.WriteString("; filename*=utf-8''")
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(filename); i++ {
		c := filename[i]
		if isAttrChar(c) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&0x0f])
	}
	return b.String()
}

// isToken reports whether s is a non-empty RFC 9110 token.
func isToken(s string) bool {
	t, rest := cutToken(s)
	return t != "" && rest == ""
}

// isAttrChar reports whether c may appear unescaped in an RFC 5987 value.
func isAttrChar(c byte) bool {
	return isAlnum(c) || strings.IndexByte("!#$&+-.^_`|~", c) >= 0
}
