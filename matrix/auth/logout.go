package auth

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// maxLogoutBody bounds the request body forwarded to the homeserver: logout
// bodies are empty or "{}".
const maxLogoutBody = 64 << 10

// LogoutKind tells which logout endpoint a path is.
type LogoutKind int

// Logout endpoints.
const (
	// NotLogout: not a logout path.
	NotLogout LogoutKind = iota
	// LogoutOne: POST /_matrix/client/{r0,v3}/logout, ends one token.
	LogoutOne
	// LogoutAll: POST /_matrix/client/{r0,v3}/logout/all, ends every token
	// of the user.
	LogoutAll
)

// LogoutPath reports which logout endpoint path is, if any.
func LogoutPath(path string) LogoutKind {
	rest, ok := strings.CutPrefix(path, "/_matrix/client/")
	if !ok {
		return NotLogout
	}
	version, rest, _ := strings.Cut(rest, "/")
	if version != "v3" && version != "r0" {
		return NotLogout
	}
	switch rest {
	case "logout":
		return LogoutOne
	case "logout/all":
		return LogoutAll
	}
	return NotLogout
}

// hopHeaders are connection-level headers that a proxy does not forward.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// LogoutProxy forwards logout requests to the homeserver, answers with the
// homeserver's response as is, and when the homeserver confirmed the logout
// (2xx) drops the token — for logout/all, every cached token of its owner —
// from the token cache of this and, through the cache's publisher, every
// other instance.
type LogoutProxy struct {
	base   *url.URL
	client *http.Client
	site   *SiteAuthenticator
	logger *zap.Logger
}

// NewLogoutProxy returns a proxy to the homeserver at homeserverURL (the base
// URL of its client-server API). client makes the requests (its timeout
// bounds them; it must not follow redirects for the proxy to be transparent:
// NewLogoutProxy makes a copy that does not).
func NewLogoutProxy(homeserverURL string, client *http.Client, site *SiteAuthenticator, logger *zap.Logger) (*LogoutProxy, error) {
	u, err := url.Parse(homeserverURL)
	if err != nil {
		return nil, fmt.Errorf("parsing homeserver url: %w", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, errors.New("parsing homeserver url: need an http or https URL with a host")
	}
	if client == nil {
		client = &http.Client{Timeout: DefaultWhoamiTimeout}
	}
	c := *client
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	if logger == nil {
		logger = zap.NewNop()
	}
	u.Path = strings.TrimRight(u.Path, "/")
	return &LogoutProxy{base: u, client: &c, site: site, logger: logger}, nil
}

// ServeHTTP forwards one logout request. The caller has checked that the path
// is a logout path (LogoutPath).
func (p *LogoutProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	kind := LogoutPath(r.URL.Path)
	creds := RequestCredentials(r)

	// For logout/all, learn whose tokens to drop while the token still
	// works (from the cache, usually). A failure here is not the client's
	// problem: the homeserver decides about the logout itself.
	var userID string
	if kind == LogoutAll && creds.Token != "" && r.Method == http.MethodPost {
		if u, err := p.site.Authenticate(r.Context(), Credentials{Token: creds.Token}); err == nil {
			userID = u.UserID
		}
	}

	target := *p.base
	target.Path = p.base.Path + r.URL.Path
	target.RawPath = ""
	if r.URL.RawPath != "" {
		target.RawPath = p.base.EscapedPath() + r.URL.RawPath
	}
	target.RawQuery = r.URL.RawQuery
	var body io.Reader
	if r.Body != nil && r.Body != http.NoBody {
		body = http.MaxBytesReader(w, r.Body, maxLogoutBody)
	}
	out, err := http.NewRequestWithContext(r.Context(), r.Method, target.String(), body)
	if err != nil {
		matrix.WriteError(w, matrix.Unknown(http.StatusBadGateway, "Could not forward the logout to the homeserver"))
		return
	}
	out.Header = r.Header.Clone()
	removeHopHeaders(out.Header)
	out.ContentLength = r.ContentLength
	out.Host = r.Host
	setForwardedHeaders(out, r)

	start := time.Now()
	resp, err := p.client.Do(out)
	if err != nil {
		var mbe *http.MaxBytesError
		switch {
		case errors.As(err, &mbe):
			matrix.WriteError(w, matrix.TooLarge("Request body too large"))
		case r.Context().Err() != nil:
			// The client went away; nobody reads an answer.
		case isTimeout(err):
			p.logger.Warn("homeserver timed out on a logout", zap.Error(err))
			matrix.WriteError(w, matrix.Unknown(http.StatusGatewayTimeout, "The homeserver did not answer the logout in time"))
		default:
			p.logger.Warn("forwarding a logout to the homeserver failed", zap.Error(err))
			matrix.WriteError(w, matrix.Unknown(http.StatusBadGateway, "Could not forward the logout to the homeserver"))
		}
		return
	}
	defer resp.Body.Close()

	if resp.StatusCode >= 200 && resp.StatusCode < 300 && creds.Token != "" && r.Method == http.MethodPost {
		p.site.Logout(r.Context(), creds.Token, userID, kind == LogoutAll)
		p.logger.Debug("logout confirmed by the homeserver; token cache invalidated",
			zap.Bool("all", kind == LogoutAll), zap.String("user_id", userID),
			zap.Duration("homeserver_time", time.Since(start)))
	}

	h := w.Header()
	for k, vs := range resp.Header {
		h[k] = vs
	}
	removeHopHeaders(h)
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
}

// removeHopHeaders deletes connection-level headers, including those named
// by Connection.
func removeHopHeaders(h http.Header) {
	for _, v := range h.Values("Connection") {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopHeaders {
		h.Del(name)
	}
}

// setForwardedHeaders tells the homeserver who the client is, as Caddy's
// reverse_proxy does with its default of trusting no upstream proxy: headers
// the client sent are replaced, not extended.
func setForwardedHeaders(out, in *http.Request) {
	out.Header.Del("X-Forwarded-For")
	if ip, _, err := net.SplitHostPort(in.RemoteAddr); err == nil {
		out.Header.Set("X-Forwarded-For", ip)
	}
	proto := "http"
	if in.TLS != nil {
		proto = "https"
	}
	out.Header.Set("X-Forwarded-Proto", proto)
	out.Header.Set("X-Forwarded-Host", in.Host)
}

// isTimeout reports whether err is a timeout.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
