package mediaapi

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// discardWriter is a ResponseWriter that throws the body away, to measure the
// handler alone.
type discardWriter struct {
	h      http.Header
	status int
}

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) WriteHeader(s int)           { d.status = s }
func (d *discardWriter) Write(p []byte) (int, error) { return len(p), nil }
func (d *discardWriter) ReadFrom(r io.Reader) (int64, error) {
	return io.Copy(io.Discard, r)
}

// benchEnv uploads 100 KiB and returns its media ID.
func benchEnv(b *testing.B) (*env, string, []byte) {
	e := newEnv(b)
	content := bytes.Repeat([]byte("0123456789ABCDEF"), 100<<10/16)
	id := e.upload("alice", content, "image/png", "?filename=bench.png")
	return e, id, content
}

// BenchmarkDownload100KiB measures downloads of one 100 KiB media item:
// "handler-*" call ServeHTTP with a discarding writer (allocations of the
// handler itself); "loopback-*" go through a real HTTP/1.1 server and client
// at concurrency 32, where the body is sent with sendfile; "loopback-servecontent"
// is net/http's static file serving of the same bytes, for reference.
//
// "legacy" is the unauthenticated endpoint; "v1" the authenticated one with
// the real authenticator (token cache in front of whoami against an httptest
// homeserver), warmed by one request first: v1/legacy is the cost of auth.
func BenchmarkDownload100KiB(b *testing.B) {
	e, id, content := benchEnv(b)
	legacyPath := "/_matrix/media/v3/download/test/" + id
	v1Path := "/_matrix/client/v1/media/download/test/" + id
	warm := httptest.NewRequest("GET", v1Path, nil)
	warm.Header.Set("Authorization", "Bearer alice")
	if rec := httptest.NewRecorder(); func() int { e.site.ServeHTTP(rec, warm); return rec.Code }() != 200 {
		b.Fatal("warming the token cache failed")
	}

	handler := func(name, path, token string) {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(content)))
			b.RunParallel(func(pb *testing.PB) {
				r := httptest.NewRequest("GET", path, nil)
				if token != "" {
					r.Header.Set("Authorization", "Bearer "+token)
				}
				w := &discardWriter{}
				for pb.Next() {
					w.h = make(http.Header, 24)
					e.site.ServeHTTP(w, r)
					if w.status != 200 {
						b.Fatalf("status %d", w.status)
					}
				}
			})
		})
	}
	handler("handler-legacy", legacyPath, "")
	handler("handler-v1", v1Path, "alice")

	dir := b.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "bench.png"), content, 0o644); err != nil {
		b.Fatal(err)
	}
	fileServer := http.FileServer(http.Dir(dir))

	loopback := func(name string, h http.Handler, path, token string) {
		b.Run(name, func(b *testing.B) {
			srv := httptest.NewServer(h)
			defer srv.Close()
			tr := &http.Transport{MaxIdleConns: 64, MaxIdleConnsPerHost: 64, DisableCompression: true}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr}
			b.ReportAllocs()
			b.SetBytes(int64(len(content)))
			b.SetParallelism(max(1, 32/runtime.GOMAXPROCS(0)))
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, 32<<10)
				req, _ := http.NewRequest("GET", srv.URL+path, nil)
				if token != "" {
					req.Header.Set("Authorization", "Bearer "+token)
				}
				for pb.Next() {
					resp, err := client.Do(req)
					if err != nil {
						b.Fatal(err)
					}
					n, _ := io.CopyBuffer(io.Discard, resp.Body, buf)
					resp.Body.Close()
					if resp.StatusCode != 200 || n != int64(len(content)) {
						b.Fatalf("status %d, %d bytes", resp.StatusCode, n)
					}
				}
			})
		})
	}
	loopback("loopback-legacy", e.site, legacyPath, "")
	loopback("loopback-v1", e.site, v1Path, "alice")
	loopback("loopback-servecontent", fileServer, "/bench.png", "")
}

// BenchmarkUpload measures whole uploads of distinct 256 KiB bodies
// (POST /_matrix/media/v3/upload) through the Site handler, on a real file
// store and each metadata database: authentication (token cache warm),
// ingest (prefix lookup, write, record), the quarantine check and the media
// row. No quota rule applies. Each body differs in its first bytes, so every
// upload writes a new blob.
func BenchmarkUpload(b *testing.B) {
	for _, backend := range []string{"sqlite", "postgres"} {
		b.Run(backend, func(b *testing.B) {
			var open func(testing.TB) *sqlstore.Store
			if backend == "postgres" {
				open = func(t testing.TB) *sqlstore.Store {
					s, err := sqlstore.OpenPostgres(context.Background(), testpg.DSN(t))
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { _ = s.Close() })
					return s
				}
			}
			e := newEnvOn(b, open, nil)
			body := bytes.Repeat([]byte("u"), 256<<10)
			n := 0
			upload := func() {
				n++
				copy(body, strconv.Itoa(n)+"/")
				hr := httptest.NewRequest("POST", "http://media.test/_matrix/media/v3/upload?filename=a.bin", bytes.NewReader(body))
				hr.Header.Set("Authorization", "Bearer alice")
				hr.Header.Set("Content-Type", "application/octet-stream")
				w := &discardWriter{h: make(http.Header, 8)}
				e.site.ServeHTTP(w, hr)
				if w.status != 0 && w.status != 200 {
					b.Fatalf("upload: status %d", w.status)
				}
			}
			upload() // warms the token cache and the statement caches
			b.SetBytes(int64(len(body)))
			b.ReportAllocs()
			for b.Loop() {
				upload()
			}
		})
	}
}
