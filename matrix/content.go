package matrix

import (
	"unicode"
	"unicode/utf8"
)

// MaxContentTypeLength bounds stored Content-Type values, in bytes.
const MaxContentTypeLength = 255

// MaxFileNameLength bounds stored file names, in bytes.
const MaxFileNameLength = 255

// ValidContentType reports whether ct can be stored as a media item's
// Content-Type, whoever supplied it (an uploader, a remote server, an
// import): at most MaxContentTypeLength visible-ASCII characters (spaces
// and tabs allowed). It is the one such check of the module.
func ValidContentType(ct string) bool {
	if len(ct) > MaxContentTypeLength {
		return false
	}
	for i := 0; i < len(ct); i++ {
		c := ct[i]
		if (c < 0x20 && c != '\t') || c >= 0x7f {
			return false
		}
	}
	return true
}

// ValidFileName reports whether name can be stored and echoed as a file
// name: valid UTF-8, at most MaxFileNameLength bytes, no control
// characters. It is the one such check of the module.
func ValidFileName(name string) bool {
	if len(name) > MaxFileNameLength || !utf8.ValidString(name) {
		return false
	}
	for _, c := range name {
		if unicode.IsControl(c) {
			return false
		}
	}
	return true
}
