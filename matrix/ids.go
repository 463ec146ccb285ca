package matrix

import (
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// MaxMediaIDLength is the longest media ID accepted.
const MaxMediaIDLength = 255

// mediaIDLength is the length of generated media IDs (as Synapse: 24
// characters of [A-Za-z0-9], about 143 bits).
const mediaIDLength = 24

const mediaIDAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

// ValidMediaID reports whether s is a media ID we accept: 1 to 255 characters
// from [A-Za-z0-9_-], as the spec requires. It is the one media ID check of
// the module (routes, federation requests and the federation client use it;
// Dendrite also accepts '=', the spec does not).
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

// ErrInvalidServerName is returned (wrapped) by ParseServerName for a
// string that is not a server name.
var ErrInvalidServerName = errors.New("invalid server name")

// ServerName is a parsed, valid server name.
type ServerName struct {
	// Host is the DNS name as written, or the IP address of an IP literal
	// in its canonical form without brackets.
	Host string
	// IP is valid when the host is an IP literal: a dotted-quad IPv4
	// address or a bracketed IPv6 address.
	IP netip.Addr
	// Port is the explicit port in decimal without leading zeros (1–65535),
	// or "" when absent.
	Port string
}

// ParseServerName parses s against the server name grammar of the spec
// appendix:
//
//	server_name = hostname [ ":" port ]
//	port        = 1*5DIGIT
//	hostname    = IPv4address / "[" IPv6address "]" / dns-name
//	dns-name    = 1*255dns-char
//	dns-char    = DIGIT / ALPHA / "-" / "."
//
// The port must be in 1–65535, a bracketed IPv6 address must parse as one
// (no zone, not IPv4), and a dns-name must have a character other than '.'. An IPv4 address is also a dns-name; one that
// parses as an address sets IP. Errors wrap ErrInvalidServerName.
//
// It is the one server name check of the module: ValidServerName, the
// routes and server discovery all use it.
func ParseServerName(s string) (ServerName, error) {
	var sn ServerName
	rest := s
	if len(s) > 0 && s[0] == '[' {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return sn, fmt.Errorf("parsing server name %q: %w: unterminated IPv6 literal", s, ErrInvalidServerName)
		}
		ip, err := netip.ParseAddr(s[1:end])
		if err != nil || !ip.Is6() || ip.Zone() != "" {
			return sn, fmt.Errorf("parsing server name %q: %w: bad IPv6 literal", s, ErrInvalidServerName)
		}
		sn.Host, sn.IP, rest = ip.String(), ip, s[end+1:]
		if rest != "" && rest[0] != ':' {
			return sn, fmt.Errorf("parsing server name %q: %w: junk after IPv6 literal", s, ErrInvalidServerName)
		}
	} else {
		host := s
		if i := strings.IndexByte(s, ':'); i >= 0 {
			host, rest = s[:i], s[i:]
		} else {
			rest = ""
		}
		if len(host) == 0 || len(host) > 255 {
			return sn, fmt.Errorf("parsing server name %q: %w: bad host length", s, ErrInvalidServerName)
		}
		for i := 0; i < len(host); i++ {
			c := host[i]
			if !isAlnum(c) && c != '-' && c != '.' {
				return sn, fmt.Errorf("parsing server name %q: %w: bad character in host", s, ErrInvalidServerName)
			}
		}
		if strings.Trim(host, ".") == "" {
			// "." and ".." match dns-name but name no host, and as path
			// segments they are dot segments that no route can carry.
			return sn, fmt.Errorf("parsing server name %q: %w: no label in host", s, ErrInvalidServerName)
		}
		sn.Host = host
		// Only a dotted quad can be IPv4 (checked first: ParseAddr of a
		// DNS name allocates its error, on the download path).
		if strings.Trim(host, "0123456789.") == "" {
			if ip, err := netip.ParseAddr(host); err == nil && ip.Is4() {
				sn.IP = ip
			}
		}
	}
	if rest != "" {
		p := rest[1:]
		if len(p) == 0 || len(p) > 5 {
			return sn, fmt.Errorf("parsing server name %q: %w: bad port", s, ErrInvalidServerName)
		}
		n := 0
		for i := 0; i < len(p); i++ {
			if !isDigit(p[i]) {
				return sn, fmt.Errorf("parsing server name %q: %w: bad port", s, ErrInvalidServerName)
			}
			n = n*10 + int(p[i]-'0')
		}
		if n < 1 || n > 65535 {
			return sn, fmt.Errorf("parsing server name %q: %w: port out of range", s, ErrInvalidServerName)
		}
		sn.Port = p
		if p[0] == '0' {
			sn.Port = strconv.Itoa(n) // canonical form, without leading zeros
		}
	}
	return sn, nil
}

// ValidServerName reports whether s is a server name (see
// ParseServerName).
func ValidServerName(s string) bool {
	_, err := ParseServerName(s)
	return err == nil
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func isAlnum(c byte) bool {
	return isDigit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
}

// MaxUserIDLength is the longest user ID the spec allows, in bytes
// (including the '@' and the ':').
const MaxUserIDLength = 255

// ErrInvalidUserID is wrapped by every error of SplitUserID.
var ErrInvalidUserID = errors.New("invalid user ID")

// Errors of SplitUserID that callers answer with their own messages (as
// Synapse's admin API does). Both wrap ErrInvalidUserID; a bad server name
// wraps ErrInvalidServerName too.
var (
	// ErrUserIDNoSigil is a user ID that does not start with '@'.
	ErrUserIDNoSigil = fmt.Errorf("%w: does not start with '@'", ErrInvalidUserID)
	// ErrUserIDNoColon is a user ID without the ':' before the server name.
	ErrUserIDNoColon = fmt.Errorf("%w: no ':' before the server name", ErrInvalidUserID)
)

// SplitUserID splits a user ID "@localpart:server_name" into its localpart
// and its server name, as written (so "@" + localpart + ":" + serverName is
// userID again). It accepts at most MaxUserIDLength bytes, a localpart of
// the historical grammar (ValidLocalpart, which every homeserver still
// accepts for existing users) and a server name of ParseServerName. Errors
// wrap ErrInvalidUserID (and ErrUserIDNoSigil, ErrUserIDNoColon or
// ErrInvalidServerName where one of them is the reason).
func SplitUserID(userID string) (localpart, serverName string, err error) {
	rest, ok := strings.CutPrefix(userID, "@")
	if !ok {
		return "", "", fmt.Errorf("splitting user ID %q: %w", userID, ErrUserIDNoSigil)
	}
	localpart, serverName, ok = strings.Cut(rest, ":")
	if !ok {
		return "", "", fmt.Errorf("splitting user ID %q: %w", userID, ErrUserIDNoColon)
	}
	if len(userID) > MaxUserIDLength {
		return "", "", fmt.Errorf("splitting user ID %q: %w: longer than %d bytes", userID, ErrInvalidUserID, MaxUserIDLength)
	}
	if !ValidLocalpart(localpart) {
		return "", "", fmt.Errorf("splitting user ID %q: %w: bad localpart", userID, ErrInvalidUserID)
	}
	if _, err := ParseServerName(serverName); err != nil {
		return "", "", fmt.Errorf("splitting user ID %q: %w: %w", userID, ErrInvalidUserID, err)
	}
	return localpart, serverName, nil
}

// ValidLocalpart reports whether s is a user ID localpart of the historical
// grammar: one or more characters of printable ASCII other than ':'
// (0x21–0x39 and 0x3B–0x7E). The stricter grammar for new users is a subset.
func ValidLocalpart(s string) bool {
	if s == "" || len(s) > MaxUserIDLength {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x21 || c > 0x7e || c == ':' {
			return false
		}
	}
	return true
}

// mxcScheme starts every content URI.
const mxcScheme = "mxc://"

// ErrInvalidMXC is wrapped by every error of ParseMXC.
var ErrInvalidMXC = errors.New("invalid mxc URI")

// ParseMXC splits a content URI "mxc://<server_name>/<media_id>" into its
// server name (as written, checked by ParseServerName) and its media ID
// (checked by ValidMediaID). Nothing else is allowed: no further path
// segment, query or fragment (none of '/', '?', '#' is a media ID
// character). Errors wrap ErrInvalidMXC (and ErrInvalidServerName for a bad
// server name).
func ParseMXC(uri string) (serverName, mediaID string, err error) {
	rest, ok := strings.CutPrefix(uri, mxcScheme)
	if !ok {
		return "", "", fmt.Errorf("parsing %q: %w: does not start with %s", uri, ErrInvalidMXC, mxcScheme)
	}
	serverName, mediaID, ok = strings.Cut(rest, "/")
	if !ok {
		return "", "", fmt.Errorf("parsing %q: %w: no media ID", uri, ErrInvalidMXC)
	}
	if _, err := ParseServerName(serverName); err != nil {
		return "", "", fmt.Errorf("parsing %q: %w: %w", uri, ErrInvalidMXC, err)
	}
	if !ValidMediaID(mediaID) {
		return "", "", fmt.Errorf("parsing %q: %w: bad media ID", uri, ErrInvalidMXC)
	}
	return serverName, mediaID, nil
}
