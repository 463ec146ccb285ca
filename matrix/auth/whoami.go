package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// whoamiPath is the client-server endpoint that names a token's owner.
const whoamiPath = "/_matrix/client/v3/account/whoami"

// maxWhoamiBody bounds how much of a homeserver answer is read. A whoami
// response is a few hundred bytes.
const maxWhoamiBody = 64 << 10

// DefaultWhoamiTimeout bounds one whoami round trip when NewWhoami is given a
// nil client.
const DefaultWhoamiTimeout = 10 * time.Second

// Whoami checks access tokens by asking the homeserver
// (GET /_matrix/client/v3/account/whoami). It does not cache: every call is a
// round trip; TokenCache puts a cache in front of it.
type Whoami struct {
	url    string
	client *http.Client
}

// NewWhoami returns a TokenChecker for the homeserver at homeserverURL
// (scheme and host, optionally a path prefix, e.g. "http://127.0.0.1:8008").
// client performs the requests; nil means a client with a
// DefaultWhoamiTimeout timeout.
func NewWhoami(homeserverURL string, client *http.Client) (*Whoami, error) {
	u, err := url.Parse(homeserverURL)
	if err != nil {
		return nil, fmt.Errorf("parsing homeserver url: %w", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("parsing homeserver url: scheme must be http or https, got %q", u.Scheme)
	}
	if u.Host == "" {
		return nil, errors.New("parsing homeserver url: no host")
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("parsing homeserver url: must not have a query or fragment")
	}
	if client == nil {
		client = &http.Client{Timeout: DefaultWhoamiTimeout}
	}
	base := strings.TrimRight(u.String(), "/")
	return &Whoami{url: base + whoamiPath, client: client}, nil
}

// whoamiResponse is the body of a successful whoami.
type whoamiResponse struct {
	UserID   string `json:"user_id"`
	DeviceID string `json:"device_id"`
	IsGuest  bool   `json:"is_guest"`
}

// CheckToken implements TokenChecker. The token never appears in returned
// errors.
func (w *Whoami) CheckToken(ctx context.Context, token string) (User, error) {
	if token == "" || !validTokenChars(token) {
		return User{}, fmt.Errorf("checking access token: malformed token: %w", ErrUnknownToken)
	}
	a, err := GetHomeserver(ctx, w.client, w.url, token, maxWhoamiBody, "whoami")
	if err != nil {
		return User{}, err
	}
	switch {
	case a.Status == http.StatusOK:
		var wr whoamiResponse
		if err := json.Unmarshal(a.Body, &wr); err != nil {
			return User{}, fmt.Errorf("decoding whoami response: %w: %w", ErrHomeserverUnavailable, err)
		}
		if _, _, err := matrix.SplitUserID(wr.UserID); err != nil {
			// A homeserver that names no valid user is broken, not a
			// proof of identity.
			return User{}, fmt.Errorf("decoding whoami response: user_id: %w: %w", ErrHomeserverUnavailable, err)
		}
		return User{UserID: wr.UserID, DeviceID: wr.DeviceID, IsGuest: wr.IsGuest}, nil
	case a.Status == http.StatusUnauthorized || a.Status == http.StatusForbidden:
		switch a.ErrCode {
		case "M_UNKNOWN_TOKEN", "M_MISSING_TOKEN":
			return User{}, fmt.Errorf("checking access token: homeserver answered %d %s: %w", a.Status, a.ErrCode, ErrUnknownToken)
		}
		return User{}, fmt.Errorf("checking access token: homeserver answered %d without a token error: %w", a.Status, ErrHomeserverUnavailable)
	default:
		return User{}, fmt.Errorf("checking access token: homeserver answered %d: %w", a.Status, ErrHomeserverUnavailable)
	}
}

// validTokenChars reports whether a token can be sent in a header at all:
// visible ASCII only.
func validTokenChars(t string) bool {
	for i := 0; i < len(t); i++ {
		if t[i] <= ' ' || t[i] >= 0x7f {
			return false
		}
	}
	return true
}

// Interface guard.
var _ TokenChecker = (*Whoami)(nil)
