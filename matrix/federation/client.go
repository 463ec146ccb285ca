package federation

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/capped"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// Sentinel errors of MediaClient. Every error returned by Download,
// Thumbnail or a Media body wraps exactly one of them (callers map them to
// HTTP status codes); remote error answers additionally wrap a *RemoteError.
var (
	// ErrNotFound: the remote answered 404 (M_NOT_FOUND), or the media ID
	// is not valid.
	ErrNotFound = errors.New("remote media not found")
	// ErrNotYetUploaded: the remote answered 504 M_NOT_YET_UPLOADED (an
	// asynchronous upload that is still pending).
	ErrNotYetUploaded = errors.New("remote media not yet uploaded")
	// ErrRemoteTooLarge: the remote answered 413, or 502 M_TOO_LARGE, or
	// the media is larger than ClientOptions.MaxBytes.
	ErrRemoteTooLarge = errors.New("remote media too large")
	// ErrUnavailable: the remote could not be reached or answered with an
	// error (network error, timeout, 5xx, 429, malformed answer, denied
	// redirect, other 4xx), its circuit breaker is open, or a recent
	// failure of the same media is remembered.
	ErrUnavailable = errors.New("remote media unavailable")
)

// Observer results passed to ClientOptions.Observer.
const (
	// ResultOK: the media was delivered (reported when its body is closed,
	// with the number of bytes read, even if the caller stopped early).
	ResultOK = "ok"
	// ResultNotFound: ErrNotFound (remote 404 or invalid input).
	ResultNotFound = "not_found"
	// ResultNotYetUploaded: ErrNotYetUploaded.
	ResultNotYetUploaded = "not_yet_uploaded"
	// ResultTooLarge: ErrRemoteTooLarge, before or while reading the body.
	ResultTooLarge = "too_large"
	// ResultUnavailable: ErrUnavailable from a request that was made, or a
	// read error of the body.
	ResultUnavailable = "unavailable"
	// ResultBreakerOpen: rejected without a request by an open breaker.
	ResultBreakerOpen = "breaker_open"
	// ResultCachedFailure: answered from the failure cache.
	ResultCachedFailure = "cached_failure"
	// ResultCanceled: the caller's context ended first.
	ResultCanceled = "canceled"
)

// Defaults of ClientOptions.
const (
	// DefaultClientTimeout is the default ClientOptions.Timeout.
	DefaultClientTimeout = 5 * time.Minute
	// DefaultHeaderTimeout is the default ClientOptions.HeaderTimeout.
	DefaultHeaderTimeout = 30 * time.Second
	// DefaultMaxBytes is the default ClientOptions.MaxBytes (100 MiB).
	DefaultMaxBytes = 100 << 20
	// DefaultFailureTTL is the default ClientOptions.FailureTTL.
	DefaultFailureTTL = 30 * time.Second
	// DefaultBreakerThreshold is the default ClientOptions.BreakerThreshold.
	DefaultBreakerThreshold = 5
	// DefaultBreakerCooldown is the default ClientOptions.BreakerCooldown.
	DefaultBreakerCooldown = 30 * time.Second
	// DefaultRemoteWait is the timeout_ms sent when Download or Thumbnail
	// is given a timeout <= 0 (the spec default of 20 s).
	DefaultRemoteWait = 20 * time.Second
)

// Internal bounds.
const (
	maxErrorBodyBytes = 64 << 10
	maxTargetClients  = 1024
	maxFailureEntries = 10000
)

// ClientOptions configures a MediaClient.
type ClientOptions struct {
	// Origin is our server name, the origin of the X-Matrix signatures.
	// Required.
	Origin string
	// Key signs the outbound requests. Required.
	Key xmatrix.SigningKey
	// Resolver finds where a server name is reached. Default
	// &Resolver{HTTPClient: NewClient(Guard, TLSConfig, 30s)}.
	Resolver *Resolver
	// Guard is the SSRF policy applied to every dial: the resolved
	// federation addresses, Location URLs and redirects. Default Guard{}
	// (public addresses only, https redirects only).
	Guard Guard
	// TLSConfig is the base client TLS configuration; it is cloned and its
	// ServerName set per target. Default nil: system roots, TLS 1.2+.
	TLSConfig *tls.Config
	// Timeout bounds one whole Download/Thumbnail call including reading
	// the body (all hops, fallback and redirects). Default 5 minutes.
	Timeout time.Duration
	// HeaderTimeout bounds the wait for response headers of each request,
	// in addition to the timeout_ms the remote is allowed to wait for a
	// pending upload. Default 30 s.
	HeaderTimeout time.Duration
	// MaxBytes is the largest media accepted; reading more from a Media
	// body yields ErrRemoteTooLarge. Default 100 MiB.
	MaxBytes int64
	// FailureTTL is how long a failed fetch (not found, unavailable, or
	// over MaxBytes, also when that is only found while reading the body)
	// of one media (and thumbnail parameters) is remembered and answered
	// without a request. Default 30 s; negative disables the cache.
	FailureTTL time.Duration
	// BreakerThreshold is the number of consecutive failures of one remote
	// server after which its circuit breaker opens. Default 5.
	BreakerThreshold int
	// BreakerCooldown is how long an open breaker rejects requests before
	// one trial request is let through. Default 30 s.
	BreakerCooldown time.Duration
	// Now returns the current time, for the failure cache and the
	// breakers. Default time.Now.
	Now func() time.Time
	// Observer, if set, is called once per Download/Thumbnail call with
	// the outcome (one of the Result* constants), the number of media
	// bytes delivered and the duration. For a successful call it is called
	// when the Media body is closed. Default none.
	Observer func(result string, bytes int64, d time.Duration)
}

// RemoteError is the error answer of a remote server. It is wrapped
// together with one of the sentinel errors.
type RemoteError struct {
	// Status is the HTTP status code.
	Status int
	// Errcode is the Matrix errcode of a JSON error body, if any.
	Errcode string
	// Message is the "error" member of a JSON error body, if any.
	Message string
}

// Error implements error.
func (e *RemoteError) Error() string {
	s := "remote answered " + strconv.Itoa(e.Status)
	if e.Errcode != "" {
		s += " " + e.Errcode
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Media is a fetched remote media (or thumbnail).
type Media struct {
	// ContentType is the media's Content-Type as sent by the remote ("" if
	// none).
	ContentType string
	// ContentDisposition is the media's Content-Disposition, if any.
	ContentDisposition string
	// Size is the length in bytes when the remote announced it, else -1.
	Size int64
	// Body streams the media. Reading more than MaxBytes yields an error
	// wrapping ErrRemoteTooLarge; other read failures wrap ErrUnavailable.
	// The caller must close it.
	Body io.ReadCloser
}

// MediaClient downloads media and thumbnails from other homeservers over
// federation (/_matrix/federation/v1/media/…, falling back to the legacy
// /_matrix/media/v3/… endpoints). It keeps one HTTP transport per resolved
// target, a per-server circuit breaker and a short-lived failure cache. It
// does not coalesce concurrent fetches of the same media (callers do). It
// is safe for concurrent use.
type MediaClient struct {
	opts     ClientOptions
	resolver *Resolver
	tlsBase  *tls.Config
	// location fetches Location URLs (at most MaxRedirects redirects).
	location *http.Client
	// legacyRedirect follows a legacy endpoint redirect (the first hop is
	// already spent).
	legacyRedirect *http.Client

	mu      sync.Mutex
	targets map[string]*http.Client
	// breakers holds the breakers of servers with recent failures (guarded
	// by mu as well, for read-modify-write), least recently used evicted.
	breakers *capped.Map[string, *breaker]
	// failures remembers failed fetches by mediaRequest.key until
	// FailureTTL.
	failures *capped.Map[string, error]
}

// NewMediaClient builds a MediaClient, applying the defaults documented on
// ClientOptions. Origin and Key are required.
func NewMediaClient(opts ClientOptions) (*MediaClient, error) {
	if !matrix.ValidServerName(opts.Origin) {
		return nil, fmt.Errorf("creating media client: origin %q is not a valid server name", opts.Origin)
	}
	if opts.Key.ID == "" || len(opts.Key.Private) == 0 {
		return nil, errors.New("creating media client: a signing key is required")
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultClientTimeout
	}
	if opts.HeaderTimeout <= 0 {
		opts.HeaderTimeout = DefaultHeaderTimeout
	}
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = DefaultMaxBytes
	}
	if opts.FailureTTL == 0 {
		opts.FailureTTL = DefaultFailureTTL
	}
	if opts.BreakerThreshold <= 0 {
		opts.BreakerThreshold = DefaultBreakerThreshold
	}
	if opts.BreakerCooldown <= 0 {
		opts.BreakerCooldown = DefaultBreakerCooldown
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	c := &MediaClient{
		opts:     opts,
		resolver: opts.Resolver,
		targets:  map[string]*http.Client{},
		breakers: capped.New(capped.Options[string, *breaker]{Max: maxFailureEntries, Now: opts.Now}),
		failures: capped.New(capped.Options[string, error]{Max: maxFailureEntries, Now: opts.Now}),
	}
	if opts.TLSConfig != nil {
		c.tlsBase = opts.TLSConfig.Clone()
	} else {
		c.tlsBase = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if c.resolver == nil {
		c.resolver = &Resolver{HTTPClient: NewClient(opts.Guard, c.tlsBase, 30*time.Second)}
	}
	plainTLS := c.tlsBase.Clone()
	plainTLS.ServerName = ""
	c.location = NewClient(opts.Guard, plainTLS, 0)
	guard := opts.Guard
	c.legacyRedirect = &http.Client{
		Transport: c.location.Transport,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= MaxRedirects {
				return fmt.Errorf("following redirect to %s: stopped after %d redirects", req.URL.Redacted(), MaxRedirects)
			}
			return guard.checkRedirect(req, via)
		},
	}
	return c, nil
}

// CloseIdleConnections closes the idle connections of every cached
// transport.
func (c *MediaClient) CloseIdleConnections() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, cl := range c.targets {
		cl.CloseIdleConnections()
	}
	c.location.CloseIdleConnections()
}

// mediaRequest is one Download or Thumbnail call.
type mediaRequest struct {
	server, mediaID string
	wait            time.Duration
	thumb           bool
	width, height   int
	method          string
	animated        bool
}

// key identifies the request in the failure cache.
func (r mediaRequest) key() string {
	k := r.server + "\x00" + r.mediaID
	if r.thumb {
		k += "\x00" + strconv.Itoa(r.width) + "x" + strconv.Itoa(r.height) + "\x00" + r.method + "\x00" + strconv.FormatBool(r.animated)
	}
	return k
}

// what names the request in error messages.
func (r mediaRequest) what() string {
	if r.thumb {
		return "thumbnail of " + r.server + "/" + r.mediaID
	}
	return "media " + r.server + "/" + r.mediaID
}

// thumbQuery returns the thumbnail parameters as a query prefix.
func (r mediaRequest) thumbQuery() string {
	q := "width=" + strconv.Itoa(r.width) + "&height=" + strconv.Itoa(r.height)
	if r.method != "" {
		q += "&method=" + url.QueryEscape(r.method)
	}
	return q + "&animated=" + strconv.FormatBool(r.animated)
}

// timeoutMS is the timeout_ms query value.
func (r mediaRequest) timeoutMS() string {
	return strconv.FormatInt(r.wait.Milliseconds(), 10)
}

// federationURI is the request target of the federation endpoint.
func (r mediaRequest) federationURI() string {
	if r.thumb {
		return "/_matrix/federation/v1/media/thumbnail/" + r.mediaID + "?" + r.thumbQuery() + "&timeout_ms=" + r.timeoutMS()
	}
	return "/_matrix/federation/v1/media/download/" + r.mediaID + "?timeout_ms=" + r.timeoutMS()
}

// legacyURI is the request target of the deprecated media endpoint, with
// allow_remote=false (routing-loop prevention, required by the spec).
func (r mediaRequest) legacyURI() string {
	server := url.PathEscape(r.server)
	if r.thumb {
		return "/_matrix/media/v3/thumbnail/" + server + "/" + r.mediaID + "?" + r.thumbQuery() +
			"&allow_remote=false&timeout_ms=" + r.timeoutMS() + "&allow_redirect=true"
	}
	return "/_matrix/media/v3/download/" + server + "/" + r.mediaID +
		"?allow_remote=false&timeout_ms=" + r.timeoutMS() + "&allow_redirect=true"
}

// Download fetches mediaID from server. timeout is how long the remote may
// wait for a pending asynchronous upload (sent as timeout_ms; <= 0 means
// DefaultRemoteWait).
func (c *MediaClient) Download(ctx context.Context, server, mediaID string, timeout time.Duration) (Media, error) {
	return c.fetch(ctx, mediaRequest{server: server, mediaID: mediaID, wait: timeout})
}

// Thumbnail fetches a thumbnail of mediaID from server with the given
// parameters (method "crop" or "scale"; empty omits it). timeout is as for
// Download.
func (c *MediaClient) Thumbnail(ctx context.Context, server, mediaID string, width, height int, method string, animated bool, timeout time.Duration) (Media, error) {
	return c.fetch(ctx, mediaRequest{
		server: server, mediaID: mediaID, wait: timeout,
		thumb: true, width: width, height: height, method: method, animated: animated,
	})
}

// observe reports one outcome to the Observer, if any.
func (c *MediaClient) observe(result string, n int64, start time.Time) {
	if c.opts.Observer != nil {
		c.opts.Observer(result, n, time.Since(start))
	}
}

// resultOf maps an error to an Observer result.
func resultOf(err error) string {
	switch {
	case err == nil:
		return ResultOK
	case errors.Is(err, ErrNotFound):
		return ResultNotFound
	case errors.Is(err, ErrNotYetUploaded):
		return ResultNotYetUploaded
	case errors.Is(err, ErrRemoteTooLarge):
		return ResultTooLarge
	default:
		return ResultUnavailable
	}
}

// fetch runs one Download or Thumbnail call: validation, failure cache,
// breaker, the remote fetch, and bookkeeping of the outcome.
func (c *MediaClient) fetch(ctx context.Context, r mediaRequest) (Media, error) {
	start := time.Now()
	if r.wait <= 0 {
		r.wait = DefaultRemoteWait
	}
	if !matrix.ValidServerName(r.server) {
		c.observe(ResultNotFound, 0, start)
		return Media{}, fmt.Errorf("fetching %s: %w: %w", r.what(), ErrNotFound, ErrInvalidServerName)
	}
	if !matrix.ValidMediaID(r.mediaID) {
		c.observe(ResultNotFound, 0, start)
		return Media{}, fmt.Errorf("fetching %s: %w: invalid media ID", r.what(), ErrNotFound)
	}
	key := r.key()
	if err := c.cachedFailure(key); err != nil {
		c.observe(ResultCachedFailure, 0, start)
		return Media{}, fmt.Errorf("fetching %s: recent failure remembered: %w", r.what(), err)
	}
	if !c.breakerAllow(r.server) {
		c.observe(ResultBreakerOpen, 0, start)
		return Media{}, fmt.Errorf("fetching %s: %w: circuit breaker open for %s", r.what(), ErrUnavailable, r.server)
	}

	st := &fetchState{}
	cctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	st.add(cancel)
	m, err := c.fetchRemote(cctx, st, r)
	if err != nil {
		st.release()
		if ctx.Err() != nil {
			// The caller gave up: says nothing about the remote.
			c.breakerDone(r.server, outcomeNeutral)
			c.observe(ResultCanceled, 0, start)
			return Media{}, fmt.Errorf("fetching %s: %w: %w", r.what(), ErrUnavailable, ctx.Err())
		}
		if countsAsFailure(err) {
			c.breakerDone(r.server, outcomeFailure)
		} else {
			c.breakerDone(r.server, outcomeSuccess)
		}
		if errors.Is(err, ErrNotFound) || errors.Is(err, ErrUnavailable) || errors.Is(err, ErrRemoteTooLarge) {
			c.rememberFailure(key, err)
		}
		c.observe(resultOf(err), 0, start)
		return Media{}, fmt.Errorf("fetching %s: %w", r.what(), err)
	}
	c.breakerDone(r.server, outcomeSuccess)
	m.Body = &mediaBody{
		r:       m.Body,
		ctx:     cctx,
		release: st.release,
		done: func(n int64, err error) {
			c.observe(resultOf(err), n, start)
		},
		// Media found over the limit only while reading (no length was
		// announced) is remembered like any failed fetch: a retry within
		// FailureTTL fails at once instead of downloading it again.
		tooLarge: func(err error) { c.rememberFailure(key, err) },
	}
	return m, nil
}

// countsAsFailure reports whether err says the remote is unhealthy: an
// unavailability that is not an ordinary 4xx answer of a live server.
func countsAsFailure(err error) bool {
	if !errors.Is(err, ErrUnavailable) {
		return false
	}
	var re *RemoteError
	if errors.As(err, &re) {
		return re.Status >= 500 || re.Status == http.StatusTooManyRequests
	}
	return true
}

// fetchState collects the cleanups of one fetch (contexts to cancel,
// bodies to close), run when the media body is closed or on error.
type fetchState struct {
	mu       sync.Mutex
	cleanups []func()
	released bool
}

// add registers a cleanup.
func (s *fetchState) add(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cleanups = append(s.cleanups, f)
}

// release runs the cleanups once, newest first.
func (s *fetchState) release() {
	s.mu.Lock()
	if s.released {
		s.mu.Unlock()
		return
	}
	s.released = true
	fs := s.cleanups
	s.cleanups = nil
	s.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

// fetchRemote resolves the server and tries the federation endpoint, then
// the legacy endpoint when the federation one is unknown to the remote.
func (c *MediaClient) fetchRemote(ctx context.Context, st *fetchState, r mediaRequest) (Media, error) {
	target, err := c.resolver.Resolve(ctx, r.server)
	if err != nil {
		return Media{}, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	if len(target.Addrs) == 0 {
		return Media{}, fmt.Errorf("%w: resolving %s: no addresses", ErrUnavailable, r.server)
	}
	client := c.targetClient(target)
	resp, err := c.doSigned(ctx, st, client, target, r.server, r.federationURI(), r.wait)
	if err != nil {
		return Media{}, err
	}
	if resp.StatusCode == http.StatusOK {
		return c.readMultipart(ctx, st, resp)
	}
	body := readErrorBody(resp)
	if !isUnknownEndpoint(resp.StatusCode, body) {
		return Media{}, fmt.Errorf("federation endpoint: %w", classify(resp.StatusCode, body))
	}
	// Fallback to the deprecated endpoint.
	resp, err = c.doSigned(ctx, st, client, target, r.server, r.legacyURI(), r.wait)
	if err != nil {
		return Media{}, fmt.Errorf("legacy endpoint: %w", err)
	}
	if isRedirect(resp.StatusCode) {
		loc, err := resp.Location()
		resp.Body.Close()
		if err != nil {
			return Media{}, fmt.Errorf("legacy endpoint: %w: redirect without valid Location", ErrUnavailable)
		}
		resp, err = c.getPlain(ctx, st, c.legacyRedirect, loc)
		if err != nil {
			return Media{}, fmt.Errorf("legacy endpoint redirect: %w", err)
		}
	}
	return c.readRaw(st, resp, "legacy endpoint")
}

// isRedirect reports whether status is a redirect that carries Location.
func isRedirect(status int) bool {
	switch status {
	case http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther,
		http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
		return true
	}
	return false
}

// errHeaderTimeout is the cancellation cause when response headers take
// too long.
var errHeaderTimeout = errors.New("timed out waiting for response headers")

// roundTrip sends req on client with a header timeout of headerWait; the
// request context stays alive (for the body) until st is released.
func (c *MediaClient) roundTrip(ctx context.Context, st *fetchState, client *http.Client, req *http.Request, headerWait time.Duration) (*http.Response, error) {
	hctx, hcancel := context.WithCancelCause(ctx)
	st.add(func() { hcancel(context.Canceled) })
	timer := time.AfterFunc(headerWait, func() { hcancel(errHeaderTimeout) })
	resp, err := client.Do(req.WithContext(hctx))
	fired := !timer.Stop()
	if err != nil {
		if cause := context.Cause(hctx); cause != nil && ctx.Err() == nil {
			err = fmt.Errorf("%w (%w)", cause, err)
		}
		return nil, fmt.Errorf("%w: requesting %s: %w", ErrUnavailable, req.URL.Redacted(), err)
	}
	st.add(func() { resp.Body.Close() })
	if fired {
		resp.Body.Close()
		return nil, fmt.Errorf("%w: requesting %s: %w", ErrUnavailable, req.URL.Redacted(), errHeaderTimeout)
	}
	return resp, nil
}

// doSigned sends an X-Matrix signed GET for uri to target.
func (c *MediaClient) doSigned(ctx context.Context, st *fetchState, client *http.Client, target Target, destination, uri string, wait time.Duration) (*http.Response, error) {
	u, err := url.Parse("https://" + target.Host + uri)
	if err != nil {
		return nil, fmt.Errorf("%w: building request URL: %w", ErrUnavailable, err)
	}
	req, err := http.NewRequest(http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("%w: building request: %w", ErrUnavailable, err)
	}
	req.Host = target.Host
	// Sign exactly the request target Go will send.
	auth, err := xmatrix.SignRequest(http.MethodGet, req.URL.RequestURI(), c.opts.Origin, destination, nil, c.opts.Key)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	req.Header.Set("Authorization", auth)
	return c.roundTrip(ctx, st, client, req, c.opts.HeaderTimeout+wait)
}

// getPlain GETs u without authentication through the SSRF-guarded client,
// after checking the scheme and any IP literal before any dial.
func (c *MediaClient) getPlain(ctx context.Context, st *fetchState, client *http.Client, u *url.URL) (*http.Response, error) {
	req, err := http.NewRequest(http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("%w: building request: %w", ErrUnavailable, err)
	}
	if req.URL.Host == "" {
		return nil, fmt.Errorf("%w: URL %s has no host", ErrUnavailable, req.URL.Redacted())
	}
	if err := c.opts.Guard.checkRedirect(req, nil); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return c.roundTrip(ctx, st, client, req, c.opts.HeaderTimeout)
}

// readMultipart handles a 200 answer of the federation endpoint.
func (c *MediaClient) readMultipart(ctx context.Context, st *fetchState, resp *http.Response) (Media, error) {
	part, err := ReadMediaResponse(resp.Header.Get("Content-Type"), resp.Body, c.opts.MaxBytes)
	if errors.Is(err, ErrTooLarge) {
		// The media part announced a length over the limit.
		return Media{}, fmt.Errorf("federation endpoint: %w: %w", ErrRemoteTooLarge, err)
	}
	if err != nil {
		return Media{}, fmt.Errorf("federation endpoint: %w: %w", ErrUnavailable, err)
	}
	if part.Location != "" {
		resp.Body.Close()
		u, err := url.Parse(part.Location)
		if err != nil {
			return Media{}, fmt.Errorf("federation endpoint: %w: invalid Location: %w", ErrUnavailable, err)
		}
		lresp, err := c.getPlain(ctx, st, c.location, u)
		if err != nil {
			return Media{}, fmt.Errorf("fetching Location: %w", err)
		}
		return c.readRaw(st, lresp, "Location")
	}
	return Media{
		ContentType:        part.ContentType,
		ContentDisposition: part.ContentDisposition,
		Size:               part.Size,
		Body:               io.NopCloser(part.Body),
	}, nil
}

// readRaw handles an answer whose body is the media itself (Location URL,
// legacy endpoint).
func (c *MediaClient) readRaw(st *fetchState, resp *http.Response, what string) (Media, error) {
	if resp.StatusCode != http.StatusOK {
		body := readErrorBody(resp)
		return Media{}, fmt.Errorf("%s: %w", what, classify(resp.StatusCode, body))
	}
	if resp.ContentLength > c.opts.MaxBytes {
		resp.Body.Close()
		return Media{}, fmt.Errorf("%s: %w: %d bytes announced, limit %d", what, ErrRemoteTooLarge, resp.ContentLength, c.opts.MaxBytes)
	}
	return Media{
		ContentType:        resp.Header.Get("Content-Type"),
		ContentDisposition: resp.Header.Get("Content-Disposition"),
		Size:               resp.ContentLength,
		Body:               io.NopCloser(&limitedBody{r: resp.Body, remaining: c.opts.MaxBytes}),
	}, nil
}

// readErrorBody reads (at most maxErrorBodyBytes of) an error answer and
// closes it.
func readErrorBody(resp *http.Response) []byte {
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBodyBytes))
	return b
}

// parseMatrixError extracts errcode and error from a JSON error body. ok is
// false when the body is not a JSON object.
func parseMatrixError(body []byte) (errcode, message string, ok bool) {
	var e struct {
		Errcode string `json:"errcode"`
		Error   string `json:"error"`
	}
	if err := json.Unmarshal(body, &e); err != nil {
		return "", "", false
	}
	return e.Errcode, e.Error, true
}

// isUnknownEndpoint decides whether the federation media endpoint is
// unknown to the remote, so that the legacy endpoint must be tried. The
// spec says "404 M_UNRECOGNIZED"; like Synapse's is_unknown_endpoint we also
// accept 404/405 whose body is empty or not JSON (reverse proxies, older
// servers) and 405 or 400 with errcode M_UNRECOGNIZED. A 404 M_NOT_FOUND
// (the media does not exist) never falls back.
func isUnknownEndpoint(status int, body []byte) bool {
	errcode, _, isJSON := parseMatrixError(body)
	switch status {
	case http.StatusNotFound, http.StatusMethodNotAllowed:
		return !isJSON || errcode == "M_UNRECOGNIZED"
	case http.StatusBadRequest:
		return errcode == "M_UNRECOGNIZED"
	}
	return false
}

// classify maps a non-200 answer to an error wrapping a sentinel and a
// *RemoteError.
func classify(status int, body []byte) error {
	errcode, msg, _ := parseMatrixError(body)
	re := &RemoteError{Status: status, Errcode: errcode, Message: msg}
	var sentinel error
	switch {
	case status == http.StatusNotFound:
		sentinel = ErrNotFound
	case status == http.StatusGatewayTimeout && (errcode == "M_NOT_YET_UPLOADED" || errcode == "FI.MAU.MSC2246_NOT_YET_UPLOADED"):
		sentinel = ErrNotYetUploaded
	case status == http.StatusRequestEntityTooLarge,
		status == http.StatusBadGateway && errcode == "M_TOO_LARGE":
		sentinel = ErrRemoteTooLarge
	default:
		sentinel = ErrUnavailable
	}
	return fmt.Errorf("%w: %w", sentinel, re)
}

// mediaBody is the Media.Body handed to callers: it maps read errors to the
// sentinels, releases the fetch resources on Close and reports the outcome
// once.
type mediaBody struct {
	r io.ReadCloser
	// ctx is the fetch context: an EOF seen after it ended may be a
	// truncation (a legacy or Location body of unknown length read after
	// its deadline), so it is reported as an error.
	ctx     context.Context
	release func()
	done    func(n int64, err error)
	// tooLarge is called (once) when reading finds the media over the
	// size limit.
	tooLarge func(err error)

	mu     sync.Mutex
	n      int64
	err    error
	closed bool
}

// Read implements io.Reader.
func (b *mediaBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if errors.Is(err, io.EOF) && b.ctx.Err() != nil {
		err = fmt.Errorf("reading remote media: %w: body cut short: %w", ErrUnavailable, context.Cause(b.ctx))
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.n += int64(n)
	if err != nil && !errors.Is(err, io.EOF) {
		switch {
		case errors.Is(err, ErrTooLarge):
			err = fmt.Errorf("reading remote media: %w: %w", ErrRemoteTooLarge, err)
		case errors.Is(err, ErrRemoteTooLarge), errors.Is(err, ErrUnavailable):
		default:
			err = fmt.Errorf("reading remote media: %w: %w", ErrUnavailable, err)
		}
		if b.err == nil {
			b.err = err
			if b.tooLarge != nil && errors.Is(err, ErrRemoteTooLarge) {
				b.tooLarge(err)
			}
		}
	}
	return n, err
}

// Close implements io.Closer.
func (b *mediaBody) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	n, err := b.n, b.err
	b.mu.Unlock()
	b.release()
	if b.done != nil {
		b.done(n, err)
	}
	return nil
}

// targetClient returns the cached HTTP client for target: its transport
// dials target.Addrs in order through the Guard whatever the URL host, and
// verifies the certificate for TLSServerName (the IP for IP literals,
// without SNI). It does not follow redirects.
func (c *MediaClient) targetClient(t Target) *http.Client {
	key := t.Host + "\x00" + t.TLSServerName + "\x00" + strings.Join(t.Addrs, ",")
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.targets[key]; ok {
		return cl
	}
	if len(c.targets) >= maxTargetClients {
		for k, cl := range c.targets {
			cl.CloseIdleConnections()
			delete(c.targets, k)
			if len(c.targets) < maxTargetClients/2 {
				break
			}
		}
	}
	cfg := c.tlsBase.Clone()
	cfg.ServerName = t.TLSServerName
	if cfg.ServerName == "" {
		// IP literal: verify the certificate for the IP; crypto/tls sends
		// no SNI for IP addresses.
		host := t.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		cfg.ServerName = strings.Trim(host, "[]")
	}
	addrs := append([]string(nil), t.Addrs...)
	guard := c.opts.Guard
	tr := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var errs []error
			for _, a := range addrs {
				conn, err := guard.DialContext(ctx, network, a)
				if err == nil {
					return conn, nil
				}
				errs = append(errs, err)
				if ctx.Err() != nil {
					break
				}
			}
			return nil, fmt.Errorf("dialing target %s: %w", t.Host, errors.Join(errs...))
		},
		TLSClientConfig:     cfg,
		TLSHandshakeTimeout: 10 * time.Second,
		// HTTP/1.1: media bodies are large and read by one request per
		// connection; Go's HTTP/2 framing and flow control cost a fifth of
		// the CPU of a fetch here, and connections are cheap.
		TLSNextProto:           map[string]func(string, *tls.Conn) http.RoundTripper{},
		ReadBufferSize:         256 << 10,
		MaxIdleConns:           16,
		MaxIdleConnsPerHost:    4,
		IdleConnTimeout:        90 * time.Second,
		MaxResponseHeaderBytes: 64 << 10,
	}
	cl := &http.Client{
		Transport: tr,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
	c.targets[key] = cl
	return cl
}

// cachedFailure returns the remembered failure of key, if still valid.
func (c *MediaClient) cachedFailure(key string) error {
	if c.opts.FailureTTL < 0 {
		return nil
	}
	err, _ := c.failures.Get(key)
	return err
}

// rememberFailure stores err for key for FailureTTL.
func (c *MediaClient) rememberFailure(key string, err error) {
	if c.opts.FailureTTL < 0 {
		return
	}
	c.failures.PutTTL(key, err, c.opts.FailureTTL)
}

// breaker is the circuit breaker of one remote server: it opens after
// threshold consecutive failures, rejects requests for the cooldown, then
// lets one trial request through (half-open); the trial's success closes
// it, its failure re-opens it.
type breaker struct {
	failures  int
	openUntil time.Time
	probing   bool
}

// outcome is what one fetch tells the breaker.
type outcome int

const (
	outcomeSuccess outcome = iota
	outcomeFailure
	outcomeNeutral
)

// breakerAllow reports whether a request to server may be sent now. A
// half-open breaker lets exactly one trial request through.
func (c *MediaClient) breakerAllow(server string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, ok := c.breakers.Get(server)
	if !ok || b.failures < c.opts.BreakerThreshold {
		return true
	}
	if c.opts.Now().Before(b.openUntil) || b.probing {
		return false
	}
	b.probing = true
	return true
}

// breakerDone records the outcome of a fetch of server. Servers without
// failures have no entry.
func (c *MediaClient) breakerDone(server string, o outcome) {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, ok := c.breakers.Get(server)
	switch o {
	case outcomeSuccess:
		c.breakers.Delete(server)
	case outcomeNeutral:
		if ok {
			b.probing = false
		}
	case outcomeFailure:
		if !ok {
			b = &breaker{}
			c.breakers.Put(server, b)
		}
		b.failures++
		b.probing = false
		if b.failures >= c.opts.BreakerThreshold {
			b.openUntil = c.opts.Now().Add(c.opts.BreakerCooldown)
		}
	}
}
