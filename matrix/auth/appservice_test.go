package auth

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// mautrixRegistration is a registration as mautrix bridges generate it.
const mautrixRegistration = `id: whatsapp
url: http://127.0.0.1:29318
as_token: wGbe8x1vDq9lUtHGFY3t2BRb0y6WQEQyJ8KcGkCj7WtTa9mAhZRfmnxbE2R5VrLq
hs_token: Kb5sPz7U0fx2E4KqXHcbWJqQv3JBrRN9Td0wYpbd2mGmvsP2zuSxkF8i6tLaQeLy
sender_localpart: sh-whatsappbot
rate_limited: false
namespaces:
    users:
        - regex: ^@whatsappbot:example\.org$
          exclusive: true
        - regex: ^@whatsapp_.*:example\.org$
          exclusive: true
    aliases: []
    rooms: []
de.sorunome.msc2409.push_ephemeral: true
receive_ephemeral: true
push_ephemeral: true
org.matrix.msc3202: true
protocols:
    - whatsapp
`

func TestParseRegistrationMautrix(t *testing.T) {
	r, err := ParseRegistration([]byte(mautrixRegistration))
	if err != nil {
		t.Fatalf("ParseRegistration: %v", err)
	}
	if r.ID != "whatsapp" || r.URL != "http://127.0.0.1:29318" || r.SenderLocalpart != "sh-whatsappbot" {
		t.Errorf("id/url/sender = %q %q %q", r.ID, r.URL, r.SenderLocalpart)
	}
	if !strings.HasPrefix(r.ASToken, "wGbe8x1v") || !strings.HasPrefix(r.HSToken, "Kb5sPz7U") {
		t.Errorf("tokens not parsed: as %d bytes, hs %d bytes", len(r.ASToken), len(r.HSToken))
	}
	want := []Namespace{
		{Exclusive: true, Regex: `^@whatsappbot:example\.org$`},
		{Exclusive: true, Regex: `^@whatsapp_.*:example\.org$`},
	}
	if len(r.UserNamespaces) != len(want) {
		t.Fatalf("user namespaces = %+v, want %+v", r.UserNamespaces, want)
	}
	for i := range want {
		if r.UserNamespaces[i] != want[i] {
			t.Errorf("user namespace %d = %+v, want %+v", i, r.UserNamespaces[i], want[i])
		}
	}
	if len(r.AliasNamespaces) != 0 || len(r.RoomNamespaces) != 0 {
		t.Errorf("alias/room namespaces = %+v %+v, want none", r.AliasNamespaces, r.RoomNamespaces)
	}
	if r.RateLimited == nil || *r.RateLimited {
		t.Errorf("rate_limited = %v, want false", r.RateLimited)
	}
	if len(r.Protocols) != 1 || r.Protocols[0] != "whatsapp" {
		t.Errorf("protocols = %v", r.Protocols)
	}

	for _, verb := range []string{"%v", "%+v", "%s"} {
		if s := fmt.Sprintf(verb, r); strings.Contains(s, r.ASToken) || strings.Contains(s, r.HSToken) || !strings.Contains(s, "whatsapp") {
			t.Errorf("Sprintf(%s) = %q: leaks a token or lacks the id", verb, s)
		}
	}

	// The registration survives a marshal/parse round trip in file layout.
	out, err := yaml.Marshal(r)
	if err != nil {
		t.Fatalf("yaml.Marshal: %v", err)
	}
	if !strings.Contains(string(out), "namespaces:") || !strings.Contains(string(out), "users:") {
		t.Errorf("marshalled registration lacks the namespaces layout:\n%s", out)
	}
	r2, err := ParseRegistration(out)
	if err != nil {
		t.Fatalf("re-parsing marshalled registration: %v\n%s", err, out)
	}
	if r2.ID != r.ID || r2.ASToken != r.ASToken || len(r2.UserNamespaces) != 2 || r2.UserNamespaces[1] != want[1] {
		t.Errorf("round trip = %+v, want %+v", r2, r)
	}
}

func TestParseRegistrationErrors(t *testing.T) {
	const ok = `id: bridge
as_token: astoken
hs_token: hstoken
sender_localpart: bot
namespaces:
  users:
    - exclusive: true
      regex: '@b_.*'
`
	if _, err := ParseRegistration([]byte(ok)); err != nil {
		t.Fatalf("valid registration rejected: %v", err)
	}
	tests := []struct {
		name    string
		data    string
		wantErr string
	}{
		{"empty", ``, "missing id"},
		{"missing id", strings.Replace(ok, "id: bridge\n", "", 1), "missing id"},
		{"missing as_token", strings.Replace(ok, "as_token: astoken\n", "", 1), "missing as_token"},
		{"missing sender_localpart", strings.Replace(ok, "sender_localpart: bot\n", "", 1), "missing sender_localpart"},
		{"bad sender_localpart", strings.Replace(ok, "sender_localpart: bot", "sender_localpart: 'b:t'", 1), "not a valid localpart"},
		{"as_token with space", strings.Replace(ok, "as_token: astoken", "as_token: 'as token'", 1), "not allowed in a bearer token"},
		{"bad user regex", strings.Replace(ok, `'@b_.*'`, `'@b_(.*'`, 1), "namespaces.users[0]"},
		{"regex valid only when wrapped", strings.Replace(ok, `'@b_.*'`, `'a)|(b'`, 1), "namespaces.users[0]"},
		{"lookahead unsupported", strings.Replace(ok, `'@b_.*'`, `'@(?!admin).*'`, 1), "compiling regex"},
		{"missing regex", strings.Replace(ok, `      regex: '@b_.*'`+"\n", "", 1), "missing regex"},
		{"bad room regex", ok + "  rooms:\n    - exclusive: false\n      regex: '['\n", "namespaces.rooms[0]"},
		{"not yaml", "id: [unclosed", "parsing appservice registration"},
		{"wrong type", "id: {a: b}\nas_token: x\nsender_localpart: y\n", "parsing appservice registration"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseRegistration([]byte(tt.data))
			if err == nil {
				t.Fatalf("ParseRegistration succeeded, want error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "astoken") || strings.Contains(err.Error(), "hstoken") {
				t.Errorf("error leaks a token: %q", err)
			}
		})
	}
}

func TestLoadRegistration(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "registration.yaml")
	if err := os.WriteFile(path, []byte(mautrixRegistration), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := LoadRegistration(path)
	if err != nil {
		t.Fatalf("LoadRegistration: %v", err)
	}
	if r.ID != "whatsapp" || len(r.UserNamespaces) != 2 {
		t.Errorf("loaded %+v", r)
	}
	if _, err := LoadRegistration(filepath.Join(dir, "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: err = %v, want ErrNotExist", err)
	}
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("id: x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadRegistration(bad); err == nil || !strings.Contains(err.Error(), "bad.yaml") {
		t.Errorf("invalid file: err = %v, want error naming the file", err)
	}
}

func testRegistrations(t *testing.T) []Registration {
	t.Helper()
	wa, err := ParseRegistration([]byte(mautrixRegistration))
	if err != nil {
		t.Fatal(err)
	}
	irc := Registration{
		ID:              "irc",
		ASToken:         "irc-as-token-0123456789",
		SenderLocalpart: "ircbot",
		UserNamespaces: []Namespace{
			// Synapse-style start-anchored match: no "^" or "$" needed.
			{Exclusive: true, Regex: `@irc_[a-z]+:example\.org`},
		},
	}
	return []Registration{wa, irc}
}

func TestAppserviceAuthenticate(t *testing.T) {
	regs := testRegistrations(t)
	as, err := NewAppservices("example.org", regs)
	if err != nil {
		t.Fatalf("NewAppservices: %v", err)
	}
	if as.Len() != 2 {
		t.Errorf("Len = %d, want 2", as.Len())
	}
	waToken, ircToken := regs[0].ASToken, regs[1].ASToken
	tests := []struct {
		name      string
		creds     Credentials
		wantAS    bool
		wantUser  User
		wantErr   error
		errSubstr string
	}{
		{
			name:     "sender without user_id",
			creds:    Credentials{Token: waToken},
			wantAS:   true,
			wantUser: User{UserID: "@sh-whatsappbot:example.org", AppserviceID: "whatsapp"},
		},
		{
			name:     "sender asserted explicitly",
			creds:    Credentials{Token: waToken, AssertedUserID: "@sh-whatsappbot:example.org"},
			wantAS:   true,
			wantUser: User{UserID: "@sh-whatsappbot:example.org", AppserviceID: "whatsapp"},
		},
		{
			name:     "namespaced user",
			creds:    Credentials{Token: waToken, AssertedUserID: "@whatsapp_4915112345678:example.org"},
			wantAS:   true,
			wantUser: User{UserID: "@whatsapp_4915112345678:example.org", AppserviceID: "whatsapp"},
		},
		{
			name:     "second namespace entry",
			creds:    Credentials{Token: waToken, AssertedUserID: "@whatsappbot:example.org"},
			wantAS:   true,
			wantUser: User{UserID: "@whatsappbot:example.org", AppserviceID: "whatsapp"},
		},
		{
			name:      "user outside namespace",
			creds:     Credentials{Token: waToken, AssertedUserID: "@alice:example.org"},
			wantAS:    true,
			wantErr:   ErrForbidden,
			errSubstr: "neither the sender nor in the appservice's user namespaces",
		},
		{
			name:      "other appservice's user",
			creds:     Credentials{Token: waToken, AssertedUserID: "@irc_bob:example.org"},
			wantAS:    true,
			wantErr:   ErrForbidden,
			errSubstr: "namespaces",
		},
		{
			name:      "user on another server",
			creds:     Credentials{Token: waToken, AssertedUserID: "@whatsapp_1:evil.org"},
			wantAS:    true,
			wantErr:   ErrForbidden,
			errSubstr: "not on this server",
		},
		{
			name:      "malformed user ID",
			creds:     Credentials{Token: waToken, AssertedUserID: "whatsapp_1:example.org"},
			wantAS:    true,
			wantErr:   ErrForbidden,
			errSubstr: "not a valid user ID",
		},
		{
			name:      "empty localpart",
			creds:     Credentials{Token: waToken, AssertedUserID: "@:example.org"},
			wantAS:    true,
			wantErr:   ErrForbidden,
			errSubstr: "not a valid user ID",
		},
		{
			name:      "no server name",
			creds:     Credentials{Token: waToken, AssertedUserID: "@whatsapp_1"},
			wantAS:    true,
			wantErr:   ErrForbidden,
			errSubstr: "not a valid user ID",
		},
		{
			name:      "too long",
			creds:     Credentials{Token: waToken, AssertedUserID: "@whatsapp_" + strings.Repeat("1", 250) + ":example.org"},
			wantAS:    true,
			wantErr:   ErrForbidden,
			errSubstr: "not a valid user ID",
		},
		{
			name:     "second registration, start-anchored regex",
			creds:    Credentials{Token: ircToken, AssertedUserID: "@irc_bob:example.org"},
			wantAS:   true,
			wantUser: User{UserID: "@irc_bob:example.org", AppserviceID: "irc"},
		},
		{
			name:     "second registration sender",
			creds:    Credentials{Token: ircToken},
			wantAS:   true,
			wantUser: User{UserID: "@ircbot:example.org", AppserviceID: "irc"},
		},
		{
			// re.match semantics: the regex must match at the start, not
			// anywhere in the user ID.
			name:      "regex does not match mid-string",
			creds:     Credentials{Token: ircToken, AssertedUserID: "@x@irc_bob:example.org"},
			wantAS:    true,
			wantErr:   ErrForbidden,
			errSubstr: "namespaces",
		},
		{
			name:      "second registration cannot act for the first",
			creds:     Credentials{Token: ircToken, AssertedUserID: "@whatsapp_1:example.org"},
			wantAS:    true,
			wantErr:   ErrForbidden,
			errSubstr: "namespaces",
		},
		{
			name:   "unknown token",
			creds:  Credentials{Token: "syt_YWxpY2U_notanastoken"},
			wantAS: false,
		},
		{
			name:   "unknown token with user_id is ignored",
			creds:  Credentials{Token: "syt_YWxpY2U_notanastoken", AssertedUserID: "@whatsapp_1:example.org"},
			wantAS: false,
		},
		{
			name:   "prefix of an as_token",
			creds:  Credentials{Token: waToken[:len(waToken)-1]},
			wantAS: false,
		},
		{
			name:   "empty token",
			creds:  Credentials{},
			wantAS: false,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, isAS, err := as.Authenticate(tt.creds)
			if isAS != tt.wantAS {
				t.Errorf("isAppservice = %v, want %v", isAS, tt.wantAS)
			}
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.errSubstr) {
					t.Errorf("err %q does not contain %q", err, tt.errSubstr)
				}
				if strings.Contains(err.Error(), tt.creds.Token) {
					t.Errorf("err leaks the token: %q", err)
				}
				if u != (User{}) {
					t.Errorf("user = %+v on error, want zero", u)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if u != tt.wantUser {
				t.Errorf("user = %+v, want %+v", u, tt.wantUser)
			}
		})
	}
}

func TestNewAppservicesErrors(t *testing.T) {
	regs := testRegistrations(t)
	dupID := regs[1]
	dupID.ID = regs[0].ID
	dupToken := regs[1]
	dupToken.ASToken = regs[0].ASToken
	badRegex := regs[1]
	badRegex.UserNamespaces = []Namespace{{Regex: "(("}}
	noToken := regs[1]
	noToken.ASToken = ""
	tests := []struct {
		name       string
		serverName string
		regs       []Registration
		wantErr    string
	}{
		{"duplicate id", "example.org", []Registration{regs[0], dupID}, "duplicate appservice id"},
		{"duplicate as_token", "example.org", []Registration{regs[0], dupToken}, "same as_token"},
		{"bad regex", "example.org", []Registration{badRegex}, "compiling regex"},
		{"missing as_token", "example.org", []Registration{noToken}, "missing as_token"},
		{"bad server name", "exa mple.org", regs, "invalid server name"},
		{"empty server name", "", regs, "invalid server name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewAppservices(tt.serverName, tt.regs)
			if err == nil {
				t.Fatalf("NewAppservices succeeded, want error containing %q", tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), regs[0].ASToken) {
				t.Errorf("error leaks a token: %q", err)
			}
		})
	}
	// No registrations is valid and matches nothing.
	as, err := NewAppservices("example.org:8448", nil)
	if err != nil {
		t.Fatalf("NewAppservices(nil): %v", err)
	}
	if _, isAS, err := as.Authenticate(Credentials{Token: regs[0].ASToken}); isAS || err != nil {
		t.Errorf("empty Appservices: isAS=%v err=%v", isAS, err)
	}
}

func TestAppserviceServerNameWithPort(t *testing.T) {
	regs := testRegistrations(t)
	as, err := NewAppservices("localhost:8448", regs[1:])
	if err != nil {
		t.Fatal(err)
	}
	u, _, err := as.Authenticate(Credentials{Token: regs[1].ASToken})
	if err != nil || u.UserID != "@ircbot:localhost:8448" {
		t.Errorf("sender = %q, %v; want @ircbot:localhost:8448", u.UserID, err)
	}
	// The namespace is for example.org, and the server must be ours anyway.
	if _, _, err := as.Authenticate(Credentials{Token: regs[1].ASToken, AssertedUserID: "@irc_bob:localhost"}); !errors.Is(err, ErrForbidden) {
		t.Errorf("user on server without port: err = %v, want ErrForbidden", err)
	}
}
