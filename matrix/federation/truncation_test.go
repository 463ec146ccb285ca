package federation

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
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

// TestMediaClientSizedPartCut: an answer whose media part announced its
// length but whose connection ends before all of it (or right after it,
// without the closing delimiter) is a failed read over a real connection,
// never a complete body; one with more bytes than announced fails too.
func TestMediaClientSizedPartCut(t *testing.T) {
	media := strings.Repeat("0123456789abcdef", 1<<14) // 256 KiB, more than a read buffer
	head := "--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz\r\nContent-Type: image/png\r\nContent-Length: " +
		strconv.Itoa(len(media)) + "\r\n\r\n"
	for _, tc := range []struct {
		name, body string
	}{
		{name: "cut within the length", body: head + media[:len(media)/2]},
		{name: "cut right after the length", body: head + media},
		{name: "cut inside the closing delimiter", body: head + media + "\r\n--xy"},
		{name: "more than announced", body: head + media + "extra\r\n--xyz--\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeRemote(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "multipart/mixed; boundary=xyz")
				w.WriteHeader(200)
				io.WriteString(w, tc.body)
			})
			c := newTestMediaClient(t, f, nil)
			m, err := c.Download(context.Background(), f.name, "cut", time.Second)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Body.Close()
			if m.Size != int64(len(media)) {
				t.Fatalf("size %d, want %d", m.Size, len(media))
			}
			got, err := io.ReadAll(m.Body)
			if !errors.Is(err, ErrUnavailable) || !errors.Is(err, ErrMalformed) {
				t.Fatalf("read err = %v after %d bytes, want ErrUnavailable wrapping ErrMalformed", err, len(got))
			}
			if !strings.HasPrefix(media, string(got)) {
				t.Fatalf("read %d bytes that are not the media's first", len(got))
			}
		})
	}
}

// TestMediaClientFetchesOverHTTP1: media is fetched over HTTP/1.1 even from
// a server offering HTTP/2 (large bodies stream with far less overhead on
// Go's HTTP/1.1 client), on one kept-alive connection for consecutive
// fetches, and a body of announced length arrives whole.
func TestMediaClientFetchesOverHTTP1(t *testing.T) {
	media := strings.Repeat("0123456789abcdef", 1<<16) // 1 MiB
	var (
		mu     sync.Mutex
		protos []string
		conns  int
	)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		protos = append(protos, r.Proto)
		mu.Unlock()
		_ = WriteMediaResponse(w, "application/octet-stream", "", strings.NewReader(media), int64(len(media)))
	}))
	srv.EnableHTTP2 = true
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			mu.Lock()
			conns++
			mu.Unlock()
		}
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	if !slices.Contains(srv.TLS.NextProtos, "h2") {
		t.Fatalf("test server offers %v, want h2 among them", srv.TLS.NextProtos)
	}
	f := &fakeRemote{srv: srv, name: srv.Listener.Addr().String()}
	c := newTestMediaClient(t, f, nil)
	for i := range 2 {
		m, err := c.Download(context.Background(), f.name, "media", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got := readAll(t, m); got != media {
			t.Fatalf("fetch %d: %d bytes, want the %d of the media", i, len(got), len(media))
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(protos, []string{"HTTP/1.1", "HTTP/1.1"}) {
		t.Fatalf("requests made over %v, want HTTP/1.1 twice", protos)
	}
	if conns != 1 {
		t.Fatalf("%d connections, want 1 (kept alive)", conns)
	}
}
