package e2e

import (
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestTruncatedRemoteBehindEncode: a remote answer cut midway reaches a
// client of a site with "encode gzip zstd" in front of matrix_media as a
// broken response, over HTTP/1.1 and h2, never as a complete-looking 200
// (the encoder would otherwise end its stream cleanly).
func TestTruncatedRemoteBehindEncode(t *testing.T) {
	pki := newFedPKI(t)
	node := startFedNode(t, fedNodeOptions{pki: pki, keyFile: writeKeyFile(t), token: "tok", user: "@u:x",
		siteDirectives: "encode gzip zstd"})

	// The remote announces 1 MiB of text in its media part, sends 256 KiB
	// and closes the connection. The text is random hex: it compresses only
	// by half, so the encoder passes bytes (and the 200) on before the cut;
	// repetitive text would stay in the compressor's buffer and the client
	// would see the connection end before any header, which proves less.
	const announced, sent = 1 << 20, 256 << 10
	text := hex.EncodeToString(randomBytes(sent / 2))
	var requests atomic.Int64
	remote := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		if !strings.HasPrefix(r.URL.Path, "/_matrix/federation/v1/media/download/") {
			http.NotFound(w, r)
			return
		}
		if strings.HasSuffix(r.URL.Path, "/huge") {
			// Over the node's 4 MiB limit, without any announced length.
			w.Header().Set("Content-Type", "multipart/mixed; boundary=big")
			w.WriteHeader(http.StatusOK)
			_, _ = io.WriteString(w, "--big\r\nContent-Type: application/json\r\n\r\n{}\r\n--big\r\nContent-Type: application/octet-stream\r\n\r\n")
			chunk := strings.Repeat("x", 64<<10)
			for range (5 << 20) / len(chunk) {
				if _, err := io.WriteString(w, chunk); err != nil {
					return
				}
			}
			_, _ = io.WriteString(w, "\r\n--big--\r\n")
			return
		}
		w.Header().Set("Content-Type", "multipart/mixed; boundary=cut")
		w.WriteHeader(http.StatusOK)
		fmt.Fprintf(w, "--cut\r\nContent-Type: application/json\r\n\r\n{}\r\n--cut\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n", announced)
		_, _ = io.WriteString(w, text)
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}))
	remote.TLS = &tls.Config{Certificates: []tls.Certificate{pki.leaf}}
	remote.Config.ErrorLog = log.New(io.Discard, "", 0)
	remote.StartTLS()
	t.Cleanup(remote.Close)
	remoteName := remote.Listener.Addr().String()

	for i, proto := range []string{"HTTP/1.1", "h2"} {
		t.Run(proto, func(t *testing.T) {
			tr := &http.Transport{
				TLSClientConfig:   &tls.Config{RootCAs: pki.pool, MinVersion: tls.VersionTLS12},
				ForceAttemptHTTP2: proto == "h2",
			}
			t.Cleanup(tr.CloseIdleConnections)
			client := &http.Client{Timeout: time.Minute, Transport: tr}
			req, err := http.NewRequest(http.MethodGet, "https://"+node.serverName+downloadPath(remoteName, fmt.Sprintf("cut%d", i)), nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Authorization", "Bearer tok")
			// Asked explicitly, so the transport hands over the raw
			// compressed stream.
			req.Header.Set("Accept-Encoding", "gzip")
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("request: %v (the test needs the streamed 200 through encode)", err)
			}
			defer resp.Body.Close()
			if resp.Proto[:6] != map[string]string{"HTTP/1.1": "HTTP/1", "h2": "HTTP/2"}[proto] {
				t.Fatalf("negotiated %s, want %s", resp.Proto, proto)
			}
			if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Encoding") != "gzip" {
				t.Fatalf("status %d, Content-Encoding %q: the test needs the streamed 200 through encode",
					resp.StatusCode, resp.Header.Get("Content-Encoding"))
			}
			n, err := io.Copy(io.Discard, resp.Body)
			if err == nil {
				t.Fatalf("the truncated download ended cleanly after %d compressed bytes", n)
			}
			if errors.Is(err, io.EOF) {
				t.Fatalf("clean EOF after %d bytes", n)
			}
		})
	}
	if n := requests.Load(); n != 2 {
		t.Fatalf("%d requests to the remote, want 2 (nothing cached)", n)
	}

	// Over max_remote_size without an announced length: the first client's
	// response is cut midway; a retry within the failure TTL gets 502
	// M_TOO_LARGE at once, without a second download.
	before := requests.Load()
	if resp, err := node.client.do(request{method: http.MethodGet, path: downloadPath(remoteName, "huge")}); err == nil {
		t.Fatalf("over-size streamed download completed: %v", resp)
	}
	resp := node.client.must(t, request{method: http.MethodGet, path: downloadPath(remoteName, "huge")})
	if resp.status != http.StatusBadGateway || resp.errcode() != "M_TOO_LARGE" {
		t.Fatalf("retry of the over-size media: %v", resp)
	}
	if n := requests.Load() - before; n != 1 {
		t.Fatalf("%d downloads of the over-size media, want 1", n)
	}
	// Nothing was cached: a ranged request (not streamed) fails too.
	resp = node.client.must(t, request{method: http.MethodGet, path: "/_matrix/client/v1/media/download/" + remoteName + "/cut0?allow_redirect=false",
		header: map[string]string{"Range": "bytes=0-10"}})
	if resp.status != http.StatusBadGateway {
		t.Fatalf("retry of the truncated media: %v", resp)
	}
}
