package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// HomeserverAnswer is a homeserver's answer to one GET, read in full.
type HomeserverAnswer struct {
	// Status is the HTTP status code.
	Status int
	// Body is the whole body (at most the limit given to GetHomeserver).
	Body []byte
	// ErrCode and Message are the Matrix error of a non-200 answer; empty
	// when it carries none (a reverse proxy's HTML error page).
	ErrCode, Message string
}

// GetHomeserver makes one GET request to url with the access token and
// reads the whole answer, at most limit bytes. A failed round trip wraps
// ErrHomeserverTimeout or ErrHomeserverUnavailable, and so does a longer
// body; the token never appears in errors. what names the request in
// error messages ("whoami", "admin api", ...).
func GetHomeserver(ctx context.Context, client *http.Client, url, token string, limit int64, what string) (HomeserverAnswer, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return HomeserverAnswer{}, fmt.Errorf("building %s request: %w: %w", what, ErrHomeserverUnavailable, err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return HomeserverAnswer{}, classifyTransportError(what, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return HomeserverAnswer{}, classifyTransportError(what, err)
	}
	if int64(len(body)) > limit {
		return HomeserverAnswer{}, fmt.Errorf("reading %s answer: body over %d bytes: %w", what, limit, ErrHomeserverUnavailable)
	}
	a := HomeserverAnswer{Status: resp.StatusCode, Body: body}
	if a.Status != http.StatusOK {
		// Not every server answers errors in JSON (a reverse proxy's 404
		// page); ErrCode then stays empty.
		var eb struct {
			ErrCode string `json:"errcode"`
			Error   string `json:"error"`
		}
		_ = json.Unmarshal(body, &eb)
		a.ErrCode, a.Message = eb.ErrCode, eb.Error
	}
	return a, nil
}

// NoSuchAPI reports whether an answer says the homeserver lacks the
// endpoint (Dendrite, Conduit, or /_synapse not proxied): 404 without
// M_NOT_FOUND (M_UNRECOGNIZED, or no JSON at all from a reverse proxy),
// 405, or a 4xx M_UNRECOGNIZED.
func (a HomeserverAnswer) NoSuchAPI() bool {
	return (a.Status == http.StatusNotFound && a.ErrCode != matrix.CodeNotFound) ||
		a.Status == http.StatusMethodNotAllowed ||
		(a.ErrCode == matrix.CodeUnrecognized && a.Status >= 400 && a.Status < 500)
}

// Describe renders an answer's status and error for messages.
func (a HomeserverAnswer) Describe() string {
	s := strconv.Itoa(a.Status)
	if a.ErrCode != "" {
		s += " " + a.ErrCode
	}
	if a.Message != "" {
		s += ": " + a.Message
	}
	return s
}

// classifyTransportError maps a failed round trip to ErrHomeserverTimeout
// or ErrHomeserverUnavailable.
func classifyTransportError(what string, err error) error {
	var ne net.Error
	if errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout()) {
		return fmt.Errorf("calling %s: %w: %w", what, ErrHomeserverTimeout, err)
	}
	return fmt.Errorf("calling %s: %w: %w", what, ErrHomeserverUnavailable, err)
}
