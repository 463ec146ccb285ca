package matrix

import (
	"strings"
	"testing"
)

func TestValidContentType(t *testing.T) {
	for ct, want := range map[string]bool{
		"":                           true,
		"image/png":                  true,
		"text/plain; charset=utf-8":  true,
		"text/plain;\tcharset=utf-8": true,
		strings.Repeat("a", 255):     true,
		strings.Repeat("a", 256):     false,
		"text/plain\r\nX-Evil: 1":    false,
		"image/p\x00ng":              false,
		"image/pngé":                 false,
		"image/png\x7f":              false,
	} {
		if got := ValidContentType(ct); got != want {
			t.Errorf("ValidContentType(%q) = %v, want %v", ct, got, want)
		}
	}
}

func TestValidFileName(t *testing.T) {
	for name, want := range map[string]bool{
		"":                       true,
		"cat.png":                true,
		"Ünïcödé 日本語.txt":        true,
		strings.Repeat("é", 127): true,
		strings.Repeat("é", 128): false,
		"a\nb":                   false,
		"a\x00b":                 false,
		"\xff\xfe.txt":           false,
		"tab\there":              false,
	} {
		if got := ValidFileName(name); got != want {
			t.Errorf("ValidFileName(%q) = %v, want %v", name, got, want)
		}
	}
}
