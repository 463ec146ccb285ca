package s3store

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// stallingProxy forwards to a fake S3 server; while stall is set, a GET's
// response sends its headers and (from the start of the object) its first
// 1000 body bytes, then nothing until the client goes away, as an S3
// connection that stalls mid-body.
type stallingProxy struct {
	stall   atomic.Bool
	stalled atomic.Int64
	// release ends every stalled response (at the end of the test).
	release chan struct{}
}

func (p *stallingProxy) start(t *testing.T, target string) string {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !p.stall.Load() {
			rp.ServeHTTP(w, r)
			return
		}
		body := proxyHead(rp, w, r)
		if rg := r.Header.Get("Range"); rg == "" || strings.HasPrefix(rg, "bytes=0-") {
			// A read from the start gets some bytes; a reopened read
			// from further on gets none, so that reopening makes no
			// progress either.
			_, _ = w.Write(body[:min(len(body), 1000)])
		}
		w.(http.Flusher).Flush()
		p.stalled.Add(1)
		select {
		case <-r.Context().Done():
		case <-p.release:
		}
	}))
	t.Cleanup(srv.Close)
	p.release = make(chan struct{})
	t.Cleanup(func() { close(p.release) }) // runs before srv.Close
	return srv.URL
}

// A GetObject whose body stalls fails after ReadIdleTimeout with an error
// wrapping ErrUnavailable, instead of blocking its reader forever; the next
// read of the blob starts anew and succeeds.
func TestStalledBodyFailsAfterIdleTimeout(t *testing.T) {
	fake := tests3.Start(t)
	proxy := &stallingProxy{}
	endpoint := proxy.start(t, fake.URL())
	s, err := New(context.Background(), Config{
		Endpoint: endpoint, Bucket: fake.Bucket(), PathStyle: true,
		AccessKeyID: fake.AccessKey(), SecretAccessKey: fake.SecretKey(),
		RetryMaxBackoff: 20 * time.Millisecond, ReadIdleTimeout: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	data := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	res, err := s.Put(context.Background(), bytes.NewReader(data), storage.PutOptions{ExpectedSize: int64(len(data))})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background() // no deadline of the caller's: the store's own bound must hold

	proxy.stall.Store(true)
	rc, err := s.OpenRange(ctx, res.SHA256, 0, int64(len(data)))
	if err != nil {
		t.Fatalf("OpenRange: %v", err)
	}
	n, err := io.Copy(io.Discard, rc)
	rc.Close()
	if !errors.Is(err, storage.ErrUnavailable) || n >= int64(len(data)) {
		t.Fatalf("stalled ranged read: %d bytes, %v; want an error wrapping ErrUnavailable", n, err)
	}
	b, err := s.Open(ctx, res.SHA256)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	n, err = io.Copy(io.Discard, b.Content)
	b.Content.Close()
	if !errors.Is(err, storage.ErrUnavailable) || n >= int64(len(data)) {
		t.Fatalf("stalled read: %d bytes, %v; want an error wrapping ErrUnavailable", n, err)
	}
	if proxy.stalled.Load() < 2 {
		t.Fatalf("%d stalled responses, want at least 2", proxy.stalled.Load())
	}

	proxy.stall.Store(false)
	rc, err = s.OpenRange(ctx, res.SHA256, 0, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after the stall: %d bytes, %v", len(got), err)
	}
}

// proxyHead lets rp answer r into a recorder, sends the recorded status and
// headers on w, and returns the recorded body for the caller to send (or
// withhold) as its fault requires.
func proxyHead(rp http.Handler, w http.ResponseWriter, r *http.Request) []byte {
	rec := httptest.NewRecorder()
	rp.ServeHTTP(rec, r)
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	return rec.Body.Bytes()
}
