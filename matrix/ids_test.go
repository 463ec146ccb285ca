package matrix

import (
	"errors"
	"strings"
	"testing"
)

func TestSplitUserID(t *testing.T) {
	long := "@" + strings.Repeat("a", MaxUserIDLength-len("@:example.org")) + ":example.org"
	tests := []struct {
		in          string
		local, host string
		// wantErr is the most specific error the failure must wrap; nil
		// for a valid ID.
		wantErr error
	}{
		{"@alice:example.org", "alice", "example.org", nil},
		{"@alice:example.org:8448", "alice", "example.org:8448", nil},
		{"@alice:example.org:08448", "alice", "example.org:08448", nil},
		{"@alice:1.2.3.4", "alice", "1.2.3.4", nil},
		{"@alice:[::1]", "alice", "[::1]", nil},
		{"@alice:[2001:db8::1]:8448", "alice", "[2001:db8::1]:8448", nil},
		{"@Al!ce/=+~\"<>@x9;:example.org", "Al!ce/=+~\"<>@x9;", "example.org", nil},
		{"@_irc_bob.1-2:hs", "_irc_bob.1-2", "hs", nil},
		{long, long[1 : len(long)-len(":example.org")], "example.org", nil},

		{"", "", "", ErrUserIDNoSigil},
		{"alice:example.org", "", "", ErrUserIDNoSigil},
		{"#room:example.org", "", "", ErrUserIDNoSigil},
		{" @alice:example.org", "", "", ErrUserIDNoSigil},
		{"@alice", "", "", ErrUserIDNoColon},
		{"@", "", "", ErrUserIDNoColon},
		{"@:example.org", "", "", ErrInvalidUserID},
		{"@alice:", "", "", ErrInvalidServerName},
		{"@alice:exa mple.org", "", "", ErrInvalidServerName},
		{"@alice:example.org:", "", "", ErrInvalidServerName},
		{"@alice:example.org:0", "", "", ErrInvalidServerName},
		{"@alice:example.org:65536", "", "", ErrInvalidServerName},
		{"@alice:example.org:port", "", "", ErrInvalidServerName},
		{"@alice:example.org/x", "", "", ErrInvalidServerName},
		{"@alice:..", "", "", ErrInvalidServerName},
		{"@alice:é.org", "", "", ErrInvalidServerName},
		{"@alice:::1", "", "", ErrInvalidServerName},
		{"@alice:::1:8448", "", "", ErrInvalidServerName},
		{"@alice:[::1]8448", "", "", ErrInvalidServerName},
		{"@alice:[::1]:", "", "", ErrInvalidServerName},
		{"@alice:[fe80::1%eth0]:8448", "", "", ErrInvalidServerName},
		{"@alice:[1.2.3.4]:8448", "", "", ErrInvalidServerName},
		{long[:len(long)-len(".org")] + "x.org", "", "", ErrInvalidUserID},
		{"@" + strings.Repeat("a", 300) + ":example.org", "", "", ErrInvalidUserID},
		{"@al ice:example.org", "", "", ErrInvalidUserID},
		{"@al\x00ice:example.org", "", "", ErrInvalidUserID},
		{"@al\tice:example.org", "", "", ErrInvalidUserID},
		{"@alice\n:example.org", "", "", ErrInvalidUserID},
		{"@al\x7fice:example.org", "", "", ErrInvalidUserID},
		{"@alicé:example.org", "", "", ErrInvalidUserID},
		{"@alice:example.org\n", "", "", ErrInvalidServerName},
	}
	for _, tt := range tests {
		local, host, err := SplitUserID(tt.in)
		if tt.wantErr == nil {
			if err != nil || local != tt.local || host != tt.host {
				t.Errorf("SplitUserID(%q) = %q, %q, %v; want %q, %q", tt.in, local, host, err, tt.local, tt.host)
			}
			continue
		}
		if err == nil || local != "" || host != "" {
			t.Errorf("SplitUserID(%q) = %q, %q, %v; want an error", tt.in, local, host, err)
			continue
		}
		if !errors.Is(err, tt.wantErr) || !errors.Is(err, ErrInvalidUserID) {
			t.Errorf("SplitUserID(%q) error %v does not wrap %v and ErrInvalidUserID", tt.in, err, tt.wantErr)
		}
	}
}

func TestValidLocalpart(t *testing.T) {
	valid := []string{"a", "alice", "!", "~", "9", ";", "a=b/c", strings.Repeat("x", MaxUserIDLength)}
	invalid := []string{"", ":", "a:b", " ", "a b", "\x00", "\x20", "\x7f", "é", strings.Repeat("x", MaxUserIDLength+1)}
	for _, s := range valid {
		if !ValidLocalpart(s) {
			t.Errorf("ValidLocalpart(%q) = false", s)
		}
	}
	for _, s := range invalid {
		if ValidLocalpart(s) {
			t.Errorf("ValidLocalpart(%q) = true", s)
		}
	}
	// Every byte: exactly 0x21–0x39 and 0x3B–0x7E.
	for c := 0; c < 256; c++ {
		want := (c >= 0x21 && c <= 0x39) || (c >= 0x3b && c <= 0x7e)
		if got := ValidLocalpart(string([]byte{byte(c)})); got != want {
			t.Errorf("ValidLocalpart(%#x) = %v", c, got)
		}
	}
}

func TestParseMXC(t *testing.T) {
	tests := []struct {
		in         string
		server, id string
		wantErr    error
	}{
		{"mxc://example.org/abcXYZ019_-", "example.org", "abcXYZ019_-", nil},
		{"mxc://example.org:8448/a", "example.org:8448", "a", nil},
		{"mxc://1.2.3.4/a", "1.2.3.4", "a", nil},
		{"mxc://[::1]:8448/a", "[::1]:8448", "a", nil},
		{"mxc://example.org/" + strings.Repeat("x", MaxMediaIDLength), "example.org", strings.Repeat("x", MaxMediaIDLength), nil},

		{"", "", "", ErrInvalidMXC},
		{"mxc://", "", "", ErrInvalidMXC},
		{"mxc:/example.org/a", "", "", ErrInvalidMXC},
		{"MXC://example.org/a", "", "", ErrInvalidMXC},
		{"https://example.org/a", "", "", ErrInvalidMXC},
		{" mxc://example.org/a", "", "", ErrInvalidMXC},
		{"mxc://example.org", "", "", ErrInvalidMXC},
		{"mxc://example.org/", "", "", ErrInvalidMXC},
		{"mxc:///a", "", "", ErrInvalidServerName},
		{"mxc://exa mple.org/a", "", "", ErrInvalidServerName},
		{"mxc://example.org:0/a", "", "", ErrInvalidServerName},
		{"mxc://::1/a", "", "", ErrInvalidServerName},
		{"mxc://user@example.org/a", "", "", ErrInvalidServerName},
		{"mxc://example.org?x=1/a", "", "", ErrInvalidServerName},
		{"mxc://example.org/a/b", "", "", ErrInvalidMXC},
		{"mxc://example.org/a/", "", "", ErrInvalidMXC},
		{"mxc://example.org//a", "", "", ErrInvalidMXC},
		{"mxc://example.org/a?x=1", "", "", ErrInvalidMXC},
		{"mxc://example.org/a#frag", "", "", ErrInvalidMXC},
		{"mxc://example.org/a=b", "", "", ErrInvalidMXC},
		{"mxc://example.org/a%2Fb", "", "", ErrInvalidMXC},
		{"mxc://example.org/..", "", "", ErrInvalidMXC},
		{"mxc://example.org/a\n", "", "", ErrInvalidMXC},
		{"mxc://example.org/" + strings.Repeat("x", MaxMediaIDLength+1), "", "", ErrInvalidMXC},
	}
	for _, tt := range tests {
		server, id, err := ParseMXC(tt.in)
		if tt.wantErr == nil {
			if err != nil || server != tt.server || id != tt.id {
				t.Errorf("ParseMXC(%q) = %q, %q, %v; want %q, %q", tt.in, server, id, err, tt.server, tt.id)
			}
			continue
		}
		if err == nil || server != "" || id != "" {
			t.Errorf("ParseMXC(%q) = %q, %q, %v; want an error", tt.in, server, id, err)
			continue
		}
		if !errors.Is(err, tt.wantErr) || !errors.Is(err, ErrInvalidMXC) {
			t.Errorf("ParseMXC(%q) error %v does not wrap %v and ErrInvalidMXC", tt.in, err, tt.wantErr)
		}
	}
}
