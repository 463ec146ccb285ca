package matrix

import (
	"crypto/rand"
)

// MaxMediaIDLength is the longest media ID accepted.
const MaxMediaIDLength = 255

// mediaIDLength is the length of generated media IDs (as Synapse: 24
// characters of [A-Za-z0-9], about 143 bits).
const mediaIDLength = 24

const mediaIDAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// ValidMediaID reports whether s is a media ID we accept: 1 to 255 characters
// from [A-Za-z0-9_-], as the spec requires.
func ValidMediaID(s string) bool {
	if len(s) == 0 || len(s) > MaxMediaIDLength {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !isAlnum(c) && c != '_' && c != '-' {
			return false
		}
	}
	return true
}

// NewMediaID returns a fresh random media ID: 24 characters drawn uniformly
// from [A-Za-z0-9] using crypto/rand.
func NewMediaID() string {
	var out [mediaIDLength]byte
	var buf [32]byte
	n := 0
	for n < len(out) {
		// crypto/rand.Read never fails on supported platforms (it panics in
		// the irrecoverable case), so the error needs no handling.
		_, _ = rand.Read(buf[:])
		for _, b := range buf {
			// 248 = 4*62: rejecting 248..255 keeps every character equally
			// likely (no modulo bias).
			if b >= 248 {
				continue
			}
			out[n] = mediaIDAlphabet[b%62]
			n++
			if n == len(out) {
				break
			}
		}
	}
	return string(out[:])
}

// ValidServerName reports whether s matches the server name grammar of the
// spec appendix:
//
//	server_name = hostname [ ":" port ]
//	port        = 1*5DIGIT
//	hostname    = IPv4address / "[" IPv6address "]" / dns-name
//	IPv4address = 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT
//	IPv6address = 2*45IPv6char
//	IPv6char    = DIGIT / %x41-46 / %x61-66 / ":" / "."
//	dns-name    = 1*255dns-char
//	dns-char    = DIGIT / ALPHA / "-" / "."
//
// (An IPv4 address is also a dns-name, so it needs no separate rule here.)
func ValidServerName(s string) bool {
	host := s
	if len(s) > 0 && s[0] == '[' {
		end := -1
		for i := 1; i < len(s); i++ {
			if s[i] == ']' {
				end = i
				break
			}
		}
		if end < 0 {
			return false
		}
		ip := s[1:end]
		if len(ip) < 2 || len(ip) > 45 {
			return false
		}
		for i := 0; i < len(ip); i++ {
			c := ip[i]
			if !isDigit(c) && !(c >= 'A' && c <= 'F') && !(c >= 'a' && c <= 'f') && c != ':' && c != '.' {
				return false
			}
		}
		rest := s[end+1:]
		if rest == "" {
			return true
		}
		if rest[0] != ':' {
			return false
		}
		return validPort(rest[1:])
	}
	for i := 0; i < len(s); i++ {
		if s[i] == ':' {
			host = s[:i]
			if !validPort(s[i+1:]) {
				return false
			}
			break
		}
	}
	if len(host) == 0 || len(host) > 255 {
		return false
	}
	for i := 0; i < len(host); i++ {
		c := host[i]
		if !isAlnum(c) && c != '-' && c != '.' {
			return false
		}
	}
	return true
}

func validPort(p string) bool {
	if len(p) == 0 || len(p) > 5 {
		return false
	}
	for i := 0; i < len(p); i++ {
		if !isDigit(p[i]) {
			return false
		}
	}
	return true
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isAlnum(c byte) bool {
	return isDigit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
}
