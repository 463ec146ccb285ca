package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// siteClient talks to one site of a running Caddy: it connects to 127.0.0.1
// and names the site in the Host header.
type siteClient struct {
	http       *http.Client
	port       int
	serverName string
	token      string
	// noResponseRetries is how often a request that got no HTTP response at
	// all (the connection was closed or reset before any response byte) is
	// sent again. Zero everywhere except around reloads: see
	// TestReloadUnderLoad.
	noResponseRetries int
	// retried counts those retries; nil when noResponseRetries is zero.
	retried *atomic.Int64
}

func newSiteClient(inst *instance, serverName, token string, keepAlive bool) *siteClient {
	return &siteClient{
		http: &http.Client{
			Timeout:   time.Minute,
			Transport: &http.Transport{DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 16},
			// Redirects are asserted, never followed.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		port:       inst.cfg.httpPort,
		serverName: serverName,
		token:      token,
	}
}

// response is a fully read response.
type response struct {
	status int
	header http.Header
	body   []byte
}

// errcode returns the Matrix errcode of a JSON error body, or "".
func (r response) errcode() string {
	var e struct {
		ErrCode string `json:"errcode"`
	}
	_ = json.Unmarshal(r.body, &e)
	return e.ErrCode
}

func (r response) String() string {
	body := r.body
	if len(body) > 300 {
		body = append(body[:300:300], "..."...)
	}
	return fmt.Sprintf("%d %q", r.status, body)
}

// request describes one request; zero fields are left out.
type request struct {
	method      string
	path        string // path and query
	body        []byte
	contentType string
	header      map[string]string
	noAuth      bool
	// ctx, when not nil, is the request's context (one carrying an
	// httptrace.ClientTrace, for instance).
	ctx context.Context
}

// do sends req and reads the whole response.
func (c *siteClient) do(req request) (response, error) {
	for attempt := 0; ; attempt++ {
		resp, err := c.roundTrip(req)
		if err == nil || attempt >= c.noResponseRetries {
			return resp, err
		}
		var noResp errNoResponse
		if !errors.As(err, &noResp) {
			return resp, err
		}
		c.retried.Add(1)
	}
}

// errNoResponse is a request that got no HTTP response at all.
type errNoResponse struct{ err error }

func (e errNoResponse) Error() string { return e.err.Error() }
func (e errNoResponse) Unwrap() error { return e.err }

// roundTrip sends req once and reads the whole response.
func (c *siteClient) roundTrip(req request) (response, error) {
	var body io.Reader
	if req.body != nil {
		body = bytes.NewReader(req.body)
	}
	ctx := req.ctx
	if ctx == nil {
		ctx = context.Background()
	}
	hr, err := http.NewRequestWithContext(ctx, req.method, fmt.Sprintf("http://127.0.0.1:%d%s", c.port, req.path), body)
	if err != nil {
		return response{}, err
	}
	hr.Host = fmt.Sprintf("%s:%d", c.serverName, c.port)
	if req.contentType != "" {
		hr.Header.Set("Content-Type", req.contentType)
	}
	if !req.noAuth && c.token != "" {
		hr.Header.Set("Authorization", "Bearer "+c.token)
	}
	for k, v := range req.header {
		hr.Header.Set(k, v)
	}
	resp, err := c.http.Do(hr)
	if err != nil {
		return response{}, errNoResponse{fmt.Errorf("%s %s on %s: %w", req.method, req.path, c.serverName, err)}
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, fmt.Errorf("%s %s on %s: reading body: %w", req.method, req.path, c.serverName, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: data}, nil
}

// must is do that fails the test on a transport error.
func (c *siteClient) must(t *testing.T, req request) response {
	t.Helper()
	resp, err := c.do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

var mxcRE = regexp.MustCompile(`^mxc://([^/]+)/([A-Za-z0-9_-]+)$`)

// parseMXC checks that a JSON body holds a content_uri of this site and
// returns the media ID.
func (c *siteClient) parseMXC(body []byte) (string, error) {
	var r struct {
		ContentURI string `json:"content_uri"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return "", fmt.Errorf("decoding %q: %w", body, err)
	}
	m := mxcRE.FindStringSubmatch(r.ContentURI)
	if m == nil {
		return "", fmt.Errorf("content_uri %q is not an mxc URI", r.ContentURI)
	}
	if m[1] != c.serverName {
		return "", fmt.Errorf("content_uri %q has server name %q, want %q", r.ContentURI, m[1], c.serverName)
	}
	return m[2], nil
}

// upload uploads content and returns its media ID.
func (c *siteClient) upload(content []byte, contentType, filename string) (string, error) {
	path := "/_matrix/media/v3/upload"
	if filename != "" {
		path += "?filename=" + url.QueryEscape(filename)
	}
	resp, err := c.do(request{method: http.MethodPost, path: path, body: content, contentType: contentType})
	if err != nil {
		return "", err
	}
	if resp.status != http.StatusOK {
		return "", fmt.Errorf("upload on %s: %v", c.serverName, resp)
	}
	return c.parseMXC(resp.body)
}

// downloadPath is the authenticated download path of a media ID of this site.
func (c *siteClient) downloadPath(mediaID string) string {
	return "/_matrix/client/v1/media/download/" + c.serverName + "/" + mediaID
}

// download fetches a media item of this site and checks it equals want.
func (c *siteClient) download(mediaID string, want []byte) error {
	resp, err := c.do(request{method: http.MethodGet, path: c.downloadPath(mediaID)})
	if err != nil {
		return err
	}
	if resp.status != http.StatusOK {
		return fmt.Errorf("download %s on %s: %v", mediaID, c.serverName, resp)
	}
	if !bytes.Equal(resp.body, want) {
		return fmt.Errorf("download %s on %s: got %d bytes that differ from the %d uploaded", mediaID, c.serverName, len(resp.body), len(want))
	}
	return nil
}

// headerHas reports whether header name of h contains substr.
func headerHas(h http.Header, name, substr string) bool {
	return strings.Contains(h.Get(name), substr)
}
