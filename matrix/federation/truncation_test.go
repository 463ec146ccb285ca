package federation

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestMediaClientDeclaredPartTooLarge: a media part announcing a length over
// MaxBytes fails Download itself, before any media byte is read, and the
// failure is remembered.
func TestMediaClientDeclaredPartTooLarge(t *testing.T) {
	f := newFakeRemote(t, serveMultipart("application/octet-stream", "", bigStream(5000)))
	c := newTestMediaClient(t, f, func(o *ClientOptions) { o.MaxBytes = 1000 })
	for i := range 2 {
		_, err := c.Download(context.Background(), f.name, "big", time.Second)
		if !errors.Is(err, ErrRemoteTooLarge) {
			t.Fatalf("attempt %d: err = %v, want ErrRemoteTooLarge", i, err)
		}
	}
	if n := len(f.requests()); n != 1 {
		t.Fatalf("%d requests, want 1 (the failure is remembered)", n)
	}
}

// TestMediaClientTooLargeMidStreamRemembered: media found over MaxBytes only
// while reading (no length announced) is remembered: a retry within
// FailureTTL fails at once, without a second download.
func TestMediaClientTooLargeMidStreamRemembered(t *testing.T) {
	f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
		_ = WriteMediaResponse(w, "application/octet-stream", "", strings.NewReader(bigStream(5000)), -1)
	})
	now := time.Unix(1_700_000_000, 0)
	c := newTestMediaClient(t, f, func(o *ClientOptions) {
		o.MaxBytes = 1000
		o.Now = func() time.Time { return now }
	})
	m, err := c.Download(context.Background(), f.name, "big", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if m.Size != -1 {
		t.Fatalf("size %d, want -1 (not announced)", m.Size)
	}
	_, err = io.ReadAll(m.Body)
	m.Body.Close()
	if !errors.Is(err, ErrRemoteTooLarge) {
		t.Fatalf("read err = %v", err)
	}
	if _, err := c.Download(context.Background(), f.name, "big", time.Second); !errors.Is(err, ErrRemoteTooLarge) {
		t.Fatalf("retry: err = %v, want ErrRemoteTooLarge from the failure cache", err)
	}
	if n := len(f.requests()); n != 1 {
		t.Fatalf("%d requests, want 1", n)
	}
	// After FailureTTL it is asked again.
	now = now.Add(DefaultFailureTTL + time.Second)
	m, err = c.Download(context.Background(), f.name, "big", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	m.Body.Close()
	if n := len(f.requests()); n != 2 {
		t.Fatalf("%d requests after the TTL, want 2", n)
	}
}

// TestMediaClientTruncatedMultipart: a federation answer cut before its
// closing delimiter (the connection closed cleanly, no length announced)
// is a failed read, never a complete body.
func TestMediaClientTruncatedMultipart(t *testing.T) {
	f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "multipart/mixed; boundary=xyz")
		w.WriteHeader(200)
		io.WriteString(w, "--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz\r\nContent-Type: image/png\r\n\r\nPNGDATA-but-cut")
	})
	c := newTestMediaClient(t, f, nil)
	m, err := c.Download(context.Background(), f.name, "cut", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Body.Close()
	if _, err := io.ReadAll(m.Body); !errors.Is(err, ErrUnavailable) || !errors.Is(err, ErrMalformed) {
		t.Fatalf("read err = %v, want ErrUnavailable wrapping ErrMalformed", err)
	}
}

// TestMediaClientPartLength: our own answers carry the media part's length,
// which the client reports as Size.
func TestMediaClientPartLength(t *testing.T) {
	f := newFakeRemote(t, serveMultipart("image/png", "", "0123456789"))
	c := newTestMediaClient(t, f, nil)
	m, err := c.Download(context.Background(), f.name, "ten", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if m.Size != 10 {
		t.Fatalf("size %d, want 10", m.Size)
	}
	if got := readAll(t, m); got != "0123456789" {
		t.Fatalf("body %q", got)
	}
}
