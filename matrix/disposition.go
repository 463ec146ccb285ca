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

// InlineSafe reports whether contentType may be served inline: its
// type/subtype, with parameters stripped, surrounding whitespace trimmed and
// compared case-insensitively, is in the spec's safe list.
func InlineSafe(contentType string) bool {
	mt := contentType
	if i := strings.IndexByte(mt, ';'); i >= 0 {
		mt = mt[:i]
	}
	mt = strings.TrimSpace(mt)
	for _, t := range inlineSafeTypes {
		if strings.EqualFold(mt, t) {
			return true
		}
	}
	return false
}

// ContentDisposition builds the Content-Disposition header of a download:
// "inline" when contentType is inline-safe (see InlineSafe) or forceInline is
// set, "attachment" otherwise, followed by the file name when there is one.
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

// isToken reports whether s is a non-empty RFC 2616 token: visible ASCII
// (33-126) without separators.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 33 || c > 126 || strings.IndexByte(`()<>@,;:\"/[]?={}`, c) >= 0 {
			return false
		}
	}
	return true
}

// isAttrChar reports whether c may appear unescaped in an RFC 5987 value.
func isAttrChar(c byte) bool {
	return isAlnum(c) || strings.IndexByte("!#$&+-.^_`|~", c) >= 0
}
