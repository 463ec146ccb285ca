package auth

import (
	"crypto/subtle"
	"fmt"
	"os"
	"regexp"

	"gopkg.in/yaml.v3"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// Namespace is one entry of an appservice registration's namespaces: a
// regular expression over user IDs, room aliases or room IDs.
type Namespace struct {
	// Exclusive reports whether the appservice claims the namespace for
	// itself alone. It does not change what the appservice may act as.
	Exclusive bool `yaml:"exclusive"`
	// Regex is the pattern. It is compiled with Go's regexp package (RE2
	// syntax, so no look-arounds or back-references) and matched at the
	// start of the string only, like Python's re.match in Synapse.
	Regex string `yaml:"regex"`
}

// Registration is an appservice registration file, as given to the
// homeserver (Application Service API). Unknown fields are ignored.
type Registration struct {
	// ID uniquely names the appservice. Required.
	ID string `yaml:"id"`
	// URL is where the homeserver pushes events; empty (or null) when the
	// appservice only sends. Not used by the media repository.
	URL string `yaml:"url"`
	// ASToken is the token the appservice authenticates with. Required.
	ASToken string `yaml:"as_token"`
	// HSToken is the token the homeserver authenticates with towards the
	// appservice. Not used by the media repository.
	HSToken string `yaml:"hs_token"`
	// SenderLocalpart is the localpart of the appservice's own user, which
	// requests act as when they do not assert another user. Required.
	SenderLocalpart string `yaml:"sender_localpart"`
	// UserNamespaces are the user IDs the appservice may act as
	// (namespaces.users in the file).
	UserNamespaces []Namespace `yaml:"-"`
	// AliasNamespaces are namespaces.aliases. Not used by the media
	// repository beyond validation.
	AliasNamespaces []Namespace `yaml:"-"`
	// RoomNamespaces are namespaces.rooms. Not used by the media repository
	// beyond validation.
	RoomNamespaces []Namespace `yaml:"-"`
	// RateLimited is the rate_limited field; nil when absent (the
	// homeserver's default).
	RateLimited *bool `yaml:"rate_limited,omitempty"`
	// Protocols are the third-party protocols the appservice bridges.
	Protocols []string `yaml:"protocols,omitempty"`
}

// registrationNamespaces is the namespaces object of a registration file.
type registrationNamespaces struct {
	Users   []Namespace `yaml:"users,omitempty"`
	Aliases []Namespace `yaml:"aliases,omitempty"`
	Rooms   []Namespace `yaml:"rooms,omitempty"`
}

// registrationPlain has Registration's fields without its methods, so that
// the (un)marshallers below do not recurse.
type registrationPlain Registration

// registrationFile is the on-disk shape of a registration.
type registrationFile struct {
	registrationPlain `yaml:",inline"`
	Namespaces        registrationNamespaces `yaml:"namespaces"`
}

// UnmarshalYAML implements yaml.Unmarshaler: it reads the nested namespaces
// object into the flat namespace fields.
func (r *Registration) UnmarshalYAML(value *yaml.Node) error {
	var f registrationFile
	if err := value.Decode(&f); err != nil {
		return err
	}
	*r = Registration(f.registrationPlain)
	r.UserNamespaces = f.Namespaces.Users
	r.AliasNamespaces = f.Namespaces.Aliases
	r.RoomNamespaces = f.Namespaces.Rooms
	return nil
}

// MarshalYAML implements yaml.Marshaler, writing the registration file
// layout back.
func (r Registration) MarshalYAML() (any, error) {
	return registrationFile{
		registrationPlain: registrationPlain(r),
		Namespaces: registrationNamespaces{
			Users:   r.UserNamespaces,
			Aliases: r.AliasNamespaces,
			Rooms:   r.RoomNamespaces,
		},
	}, nil
}

// String describes the registration without its tokens, so that logging
// one with %v or %+v does not leak them.
func (r Registration) String() string {
	return fmt.Sprintf("appservice registration %q (sender %q, %d user namespaces)", r.ID, r.SenderLocalpart, len(r.UserNamespaces))
}

// ParseRegistration parses and validates a registration file: id, as_token
// and sender_localpart are required, sender_localpart must be a valid
// localpart, as_token must be sendable as a bearer token, and every namespace
// regex must compile. Errors never contain the tokens.
func ParseRegistration(data []byte) (Registration, error) {
	var r Registration
	if err := yaml.Unmarshal(data, &r); err != nil {
		return Registration{}, fmt.Errorf("parsing appservice registration: %w", err)
	}
	if err := r.validate(); err != nil {
		return Registration{}, err
	}
	return r, nil
}

// LoadRegistration reads and parses the registration file at path.
func LoadRegistration(path string) (Registration, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Registration{}, fmt.Errorf("reading appservice registration: %w", err)
	}
	r, err := ParseRegistration(data)
	if err != nil {
		return Registration{}, fmt.Errorf("%s: %w", path, err)
	}
	return r, nil
}

// validate checks the fields ParseRegistration requires.
func (r *Registration) validate() error {
	prefix := "validating appservice registration"
	if r.ID != "" {
		prefix += " " + fmt.Sprintf("%q", r.ID)
	}
	switch {
	case r.ID == "":
		return fmt.Errorf("%s: missing id", prefix)
	case r.ASToken == "":
		return fmt.Errorf("%s: missing as_token", prefix)
	case r.SenderLocalpart == "":
		return fmt.Errorf("%s: missing sender_localpart", prefix)
	}
	if !validTokenChars(r.ASToken) {
		return fmt.Errorf("%s: as_token has characters not allowed in a bearer token", prefix)
	}
	if !matrix.ValidLocalpart(r.SenderLocalpart) {
		return fmt.Errorf("%s: sender_localpart %q is not a valid localpart", prefix, r.SenderLocalpart)
	}
	kinds := []struct {
		name string
		ns   []Namespace
	}{
		{"users", r.UserNamespaces},
		{"aliases", r.AliasNamespaces},
		{"rooms", r.RoomNamespaces},
	}
	for _, k := range kinds {
		for i, ns := range k.ns {
			if ns.Regex == "" {
				return fmt.Errorf("%s: namespaces.%s[%d]: missing regex", prefix, k.name, i)
			}
			if _, err := compileNamespace(ns.Regex); err != nil {
				return fmt.Errorf("%s: namespaces.%s[%d]: %w", prefix, k.name, i, err)
			}
		}
	}
	return nil
}

// compileNamespace compiles a namespace regex so that it only matches at the
// start of the string, as Synapse's re.match does. A trailing "$" in the
// pattern still anchors the end.
func compileNamespace(expr string) (*regexp.Regexp, error) {
	// The bare pattern is compiled first: it must be valid on its own (a
	// pattern like "a)|(b" only becomes valid once wrapped), and its error
	// shows what the registration says.
	if _, err := regexp.Compile(expr); err != nil {
		return nil, fmt.Errorf("compiling regex %q: %w", expr, err)
	}
	re, err := regexp.Compile(`^(?:` + expr + `)`)
	if err != nil {
		return nil, fmt.Errorf("compiling regex %q: %w", expr, err)
	}
	return re, nil
}

// appservice is one registration ready for lookups.
type appservice struct {
	id      string
	asToken string
	sender  string
	users   []*regexp.Regexp
}

// Appservices authenticates requests made with appservice as_tokens, without
// any homeserver call. It is immutable after NewAppservices and safe for
// concurrent use.
//
// Namespace regexes follow Synapse: a user ID is in a namespace when the
// regex matches at the start of it (Python's re.match, not re.search and not
// a full match), so "@irc_.*" accepts "@irc_bob:example.org" and a regex
// without a trailing "$" accepts any suffix. As in Synapse, the exclusive
// flag does not restrict which users the appservice itself may act as.
type Appservices struct {
	serverName string
	byHash     map[TokenHash]*appservice
}

// NewAppservices prepares the registrations of the homeserver serverName
// (the part of user IDs after the colon, e.g. "example.org"). It rejects an
// invalid server name, invalid registrations, duplicate ids and duplicate
// as_tokens.
func NewAppservices(serverName string, regs []Registration) (*Appservices, error) {
	if !matrix.ValidServerName(serverName) {
		return nil, fmt.Errorf("creating appservices: invalid server name %q", serverName)
	}
	a := &Appservices{serverName: serverName, byHash: make(map[TokenHash]*appservice, len(regs))}
	ids := make(map[string]bool, len(regs))
	for i := range regs {
		r := regs[i]
		if err := r.validate(); err != nil {
			return nil, fmt.Errorf("creating appservices: %w", err)
		}
		if ids[r.ID] {
			return nil, fmt.Errorf("creating appservices: duplicate appservice id %q", r.ID)
		}
		ids[r.ID] = true
		h := HashToken(r.ASToken)
		if other, dup := a.byHash[h]; dup {
			return nil, fmt.Errorf("creating appservices: appservices %q and %q have the same as_token", other.id, r.ID)
		}
		as := &appservice{
			id:      r.ID,
			asToken: r.ASToken,
			sender:  "@" + r.SenderLocalpart + ":" + serverName,
		}
		if len(as.sender) > matrix.MaxUserIDLength {
			return nil, fmt.Errorf("creating appservices: appservice %q: sender user ID is longer than %d bytes", r.ID, matrix.MaxUserIDLength)
		}
		for j, ns := range r.UserNamespaces {
			re, err := compileNamespace(ns.Regex)
			if err != nil {
				return nil, fmt.Errorf("creating appservices: appservice %q: namespaces.users[%d]: %w", r.ID, j, err)
			}
			as.users = append(as.users, re)
		}
		a.byHash[h] = as
	}
	return a, nil
}

// Len returns the number of registrations.
func (a *Appservices) Len() int { return len(a.byHash) }

// Authenticate implements AppserviceAuthenticator. A token that is no
// registration's as_token gives (User{}, false, nil). For an as_token, the
// user is the appservice's sender unless c.AssertedUserID names another: that
// must be a valid user ID on this server that is the sender or matches one of
// the registration's user namespaces, else the error wraps ErrForbidden
// (isAppservice stays true). The lookup indexes by SHA-256 of the token and
// then compares in constant time, so its timing reveals nothing about
// registered tokens. Unlike Synapse it cannot check that the asserted user
// was registered.
func (a *Appservices) Authenticate(c Credentials) (user User, isAppservice bool, err error) {
	if a == nil || c.Token == "" {
		return User{}, false, nil
	}
	as, ok := a.byHash[HashToken(c.Token)]
	if !ok || subtle.ConstantTimeCompare([]byte(c.Token), []byte(as.asToken)) != 1 {
		return User{}, false, nil
	}
	if c.AssertedUserID == "" || c.AssertedUserID == as.sender {
		return User{UserID: as.sender, AppserviceID: as.id}, true, nil
	}
	uid := c.AssertedUserID
	_, server, err := matrix.SplitUserID(uid)
	if err != nil {
		return User{}, true, fmt.Errorf("checking appservice %q user_id: not a valid user ID: %w: %w", as.id, ErrForbidden, err)
	}
	if server != a.serverName {
		return User{}, true, fmt.Errorf("checking appservice %q user_id: %q is not on this server (%s): %w", as.id, uid, a.serverName, ErrForbidden)
	}
	for _, re := range as.users {
		if re.MatchString(uid) {
			return User{UserID: uid, AppserviceID: as.id}, true, nil
		}
	}
	return User{}, true, fmt.Errorf("checking appservice %q user_id: %q is neither the sender nor in the appservice's user namespaces: %w", as.id, uid, ErrForbidden)
}

// Interface guard.
var _ AppserviceAuthenticator = (*Appservices)(nil)
