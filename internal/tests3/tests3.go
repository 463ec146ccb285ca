// Package tests3 runs an S3-compatible server (gofakes3 with its in-memory
// backend) on a loopback port for tests. Code under test reaches it only over
// HTTP, exactly as it would reach a real S3 endpoint; the helpers that inspect
// the stored state (Objects, MultipartUploads) are for assertions.
//
// The server can be stopped, which drops every connection mid-request as a
// crashing S3 would, and restarted on the same port with the same backend, so
// objects and in-progress multipart uploads survive the outage.
package tests3

import (
	"context"
	"encoding/xml"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

// Fixed credentials: gofakes3 does not check signatures, but the SDK needs
// something to sign with.
const (
	accessKey = "tests3-access-key"
	secretKey = "tests3-secret-key"
	bucket    = "media"
)

// Server is a running (or stopped) fake S3 server. Its methods are safe for
// concurrent use.
type Server struct {
	// backend holds the objects; it outlives restarts.
	backend *s3mem.Backend
	// handler is the gofakes3 HTTP handler. It holds the in-progress multipart
	// uploads, so it too is kept across restarts.
	handler http.Handler
	// addr is the fixed host:port the server listens on.
	addr string

	mu sync.Mutex
	// srv is the current HTTP server; nil while stopped.
	srv *httptest.Server
	// cors is the bucket's CORS configuration as PUT (XML); nil when none.
	cors []byte
}

// Start runs a fake S3 server on a free 127.0.0.1 port with one empty bucket
// and stops it when the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	backend := s3mem.New()
	if err := backend.CreateBucket(bucket); err != nil {
		t.Fatalf("tests3: creating bucket: %v", err)
	}
	fake := gofakes3.New(backend, gofakes3.WithLogger(gofakes3.DiscardLog()))
	s := &Server{backend: backend}
	s.handler = s.withBucketCORS(fake.Server())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("tests3: listening: %v", err)
	}
	s.addr = ln.Addr().String()
	s.serve(ln)
	t.Cleanup(s.Stop)
	return s
}

// serve starts an HTTP server on ln.
func (s *Server) serve(ln net.Listener) {
	srv := httptest.NewUnstartedServer(s.handler)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
}

// URL returns the endpoint, e.g. "http://127.0.0.1:41234".
func (s *Server) URL() string { return "http://" + s.addr }

// Bucket returns the name of the bucket created by Start.
func (s *Server) Bucket() string { return bucket }

// AccessKey returns the access key ID to sign requests with (any value is
// accepted).
func (s *Server) AccessKey() string { return accessKey }

// SecretKey returns the secret access key to sign requests with.
func (s *Server) SecretKey() string { return secretKey }

// Stop closes the listener and every connection, including those in the middle
// of a request, as if S3 had died. Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv == nil {
		return
	}
	srv.CloseClientConnections()
	srv.Close()
}

// Restart serves again on the same port with the same backend, so objects and
// multipart uploads made before Stop are still there. Restarting a running
// server does nothing.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	running := s.srv != nil
	s.mu.Unlock()
	if running {
		return
	}
	var ln net.Listener
	var err error
	// The port was just released; binding it again normally succeeds at once
	// (Go sets SO_REUSEADDR), but allow a moment for the old sockets to go.
	for deadline := time.Now().Add(5 * time.Second); ; {
		ln, err = net.Listen("tcp", s.addr)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("tests3: listening again on %s: %v", s.addr, err)
	}
	s.serve(ln)
}

// Objects returns the keys of all objects in the bucket, sorted. It reads the
// backend directly, so it works while the server is stopped.
func (s *Server) Objects(t testing.TB) []string {
	t.Helper()
	var keys []string
	page := gofakes3.ListBucketPage{MaxKeys: 1000}
	for {
		list, err := s.backend.ListBucket(bucket, nil, page)
		if err != nil {
			t.Fatalf("tests3: listing objects: %v", err)
		}
		for _, c := range list.Contents {
			keys = append(keys, c.Key)
		}
		if !list.IsTruncated || list.NextMarker == "" {
			break
		}
		page = gofakes3.ListBucketPage{Marker: list.NextMarker, HasMarker: true, MaxKeys: 1000}
	}
	sort.Strings(keys)
	return keys
}

// listUploadsResult is the part of a ListMultipartUploads response that
// MultipartUploads needs.
type listUploadsResult struct {
	Uploads []struct {
		Key      string `xml:"Key"`
		UploadID string `xml:"UploadId"`
	} `xml:"Upload"`
	IsTruncated bool `xml:"IsTruncated"`
}

// MultipartUploads returns how many multipart uploads are in progress
// (initiated, neither completed nor aborted). gofakes3 keeps them in its HTTP
// handler rather than in the backend, so this asks the server with a plain
// ListMultipartUploads request: the server must be running (Restart it first
// after Stop).
func (s *Server) MultipartUploads(t testing.TB) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.URL()+"/"+bucket+"?uploads&max-uploads=1000", nil)
	if err != nil {
		t.Fatalf("tests3: building ListMultipartUploads request: %v", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("tests3: listing multipart uploads (is the server running?): %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("tests3: reading ListMultipartUploads response: %v", err)
	}
	// gofakes3 answers NoSuchUpload until the first upload in the bucket.
	if resp.StatusCode == http.StatusNotFound && strings.Contains(string(body), "<Code>NoSuchUpload</Code>") {
		return 0
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("tests3: ListMultipartUploads: status %d: %s", resp.StatusCode, body)
	}
	var out listUploadsResult
	if err := xml.Unmarshal(body, &out); err != nil {
		t.Fatalf("tests3: decoding ListMultipartUploads response: %v", err)
	}
	if out.IsTruncated {
		t.Fatalf("tests3: more than 1000 multipart uploads in progress")
	}
	return len(out.Uploads)
}

// String describes the server for test logs.
func (s *Server) String() string { return fmt.Sprintf("fake S3 at %s (bucket %s)", s.URL(), bucket) }

// withBucketCORS answers the bucket CORS API (GET, PUT and DELETE
// /<bucket>?cors), which gofakes3 lacks, and passes every other request to
// next. The configuration is kept as PUT, not interpreted: the server
// itself answers every origin (gofakes3's own CORS headers).
func (s *Server) withBucketCORS(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, ok := r.URL.Query()["cors"]; !ok || strings.Trim(r.URL.Path, "/") != bucket {
			next.ServeHTTP(w, r)
			return
		}
		switch r.Method {
		case http.MethodGet:
			s.mu.Lock()
			cfg := s.cors
			s.mu.Unlock()
			if cfg == nil {
				w.Header().Set("Content-Type", "application/xml")
				w.WriteHeader(http.StatusNotFound)
				fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchCORSConfiguration</Code><Message>The CORS configuration does not exist</Message><BucketName>%s</BucketName></Error>`, bucket)
				return
			}
			w.Header().Set("Content-Type", "application/xml")
			_, _ = w.Write(cfg)
		case http.MethodPut:
			b, err := io.ReadAll(io.LimitReader(r.Body, 1<<16))
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			s.mu.Lock()
			s.cors = b
			s.mu.Unlock()
		case http.MethodDelete:
			s.mu.Lock()
			s.cors = nil
			s.mu.Unlock()
			w.WriteHeader(http.StatusNoContent)
		default:
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		}
	})
}
