package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"image"
	_ "image/png" // decodes the thumbnails
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// startFedPair starts two federating Caddys, A and B, each with its fake
// homeserver. A's signing key comes from the binary's generate-key command,
// B's from the test.
func startFedPair(t *testing.T) (pki fedPKI, a, b *fedNode) {
	t.Helper()
	pki = newFedPKI(t)
	a = startFedNode(t, fedNodeOptions{pki: pki, keyFile: cliKeyFile(t), token: "token-alice", user: "@alice:a"})
	b = startFedNode(t, fedNodeOptions{pki: pki, keyFile: writeKeyFile(t), token: "token-bob", user: "@bob:b"})
	return pki, a, b
}

// TestFederationTwoCaddies runs federation between two xcaddy-built Caddys
// over TLS on loopback: each fetches the other's media over
// /_matrix/federation/v1/media/download with X-Matrix (verified with the key
// the other's homeserver publishes), caches it, thumbnails it locally, makes
// one fetch for a burst of first requests, and refuses unauthenticated
// inbound requests.
func TestFederationTwoCaddies(t *testing.T) {
	_, a, b := startFedPair(t)

	t.Run("download A's media on B", func(t *testing.T) { checkRemoteDownload(t, a, b) })
	t.Run("download B's media on A", func(t *testing.T) { checkRemoteDownload(t, b, a) })
	t.Run("remote thumbnail", func(t *testing.T) { checkRemoteThumbnail(t, a, b) })
	t.Run("burst", func(t *testing.T) { checkRemoteBurst(t, a, b) })
	t.Run("inbound verification", func(t *testing.T) { checkInboundVerification(t, a, b) })
}

// checkRemoteDownload uploads on origin and downloads through remote: the
// first download is fetched over federation, later ones come from remote's
// cache.
func checkRemoteDownload(t *testing.T, origin, remote *fedNode) {
	content := randomBytes(1 << 20)
	const contentType = "application/pdf"
	id := origin.client.upload(t, content, contentType, "report.pdf")
	servedBefore := origin.fedRequests(t, "federation_download", http.StatusOK)
	fetchedBefore := remote.remoteFetches(t, "ok")

	path := downloadPath(origin.serverName, id)
	for i := range 3 {
		resp := remote.client.must(t, request{method: http.MethodGet, path: path})
		if resp.status != http.StatusOK {
			t.Fatalf("download %d of mxc://%s/%s on %s: got %v, want 200", i, origin.serverName, id, remote.serverName, resp)
		}
		if !bytes.Equal(resp.body, content) {
			t.Fatalf("download %d: got %d bytes that differ from the %d uploaded", i, len(resp.body), len(content))
		}
		if got := resp.header.Get("Content-Type"); got != contentType {
			t.Errorf("download %d: Content-Type = %q, want %q", i, got, contentType)
		}
		if got := resp.header.Get("Content-Disposition"); !strings.Contains(got, "report.pdf") {
			t.Errorf("download %d: Content-Disposition = %q, want the uploaded file name report.pdf", i, got)
		}
		// The first download streams while the remote copy is stored, with
		// no length when the remote's multipart part announced none; later
		// ones are served from the cache with their length.
		if got := resp.header.Get("Content-Length"); (i > 0 || got != "") && got != fmt.Sprint(len(content)) {
			t.Errorf("download %d: Content-Length = %q, want %d", i, got, len(content))
		}
	}
	if got := origin.fedRequests(t, "federation_download", http.StatusOK) - servedBefore; got != 1 {
		t.Errorf("%s answered %v federation downloads for 3 client downloads on %s, want 1 (later ones from the cache)", origin.serverName, got, remote.serverName)
	}
	if got := remote.remoteFetches(t, "ok") - fetchedBefore; got != 1 {
		t.Errorf("%s made %v successful remote fetches, want 1", remote.serverName, got)
	}
	if remote.hs.keyRequests.Load() == 0 {
		t.Errorf("%s verified %s's request without fetching %s's keys (from its homeserver, through its Caddy)", origin.serverName, remote.serverName, remote.serverName)
	}

	// The origin's own copy is untouched, and a range request of the
	// cached copy is served by the remote.
	resp := origin.client.must(t, request{method: http.MethodGet, path: path})
	if resp.status != http.StatusOK || !bytes.Equal(resp.body, content) {
		t.Errorf("local download on %s: got %v", origin.serverName, resp)
	}
	resp = remote.client.must(t, request{method: http.MethodGet, path: path, header: map[string]string{"Range": "bytes=1000-1999"}})
	if resp.status != http.StatusPartialContent || !bytes.Equal(resp.body, content[1000:2000]) {
		t.Errorf("range download of the cached copy on %s: got %v, want 206 with bytes 1000-1999", remote.serverName, resp)
	}
}

// checkRemoteThumbnail thumbnails origin's image on remote: remote fetches
// the original once and makes the thumbnail itself.
func checkRemoteThumbnail(t *testing.T, origin, remote *fedNode) {
	img := e2ePNG(t, 300, 300)
	id := origin.client.upload(t, img, "image/png", "logo.png")
	downloadsBefore := origin.fedRequests(t, "federation_download", http.StatusOK)
	thumbsBefore := origin.fedRequests(t, "federation_thumbnail", http.StatusOK)

	thumb := func(w, h int) []byte {
		t.Helper()
		path := fmt.Sprintf("/_matrix/client/v1/media/thumbnail/%s/%s?width=%d&height=%d&method=scale", origin.serverName, id, w, h)
		resp := remote.client.must(t, request{method: http.MethodGet, path: path})
		if resp.status != http.StatusOK {
			t.Fatalf("remote thumbnail %dx%d on %s: got %v, want 200", w, h, remote.serverName, resp)
		}
		if ct := resp.header.Get("Content-Type"); ct != "image/png" {
			t.Fatalf("remote thumbnail %dx%d: Content-Type %q, want image/png", w, h, ct)
		}
		return resp.body
	}
	small := thumb(32, 32)
	cfg, format, err := image.DecodeConfig(bytes.NewReader(small))
	if err != nil || format != "png" {
		t.Fatalf("remote thumbnail is not a PNG: %v %q", err, format)
	}
	// The spec's 32x32 crop / 96x96 crop / 320x240 scale sizes: a 32x32
	// scale request is served by the nearest scale size, 240x240 for a
	// square original (as for local media, see TestThumbnails).
	if cfg.Width != 240 || cfg.Height != 240 {
		t.Errorf("remote thumbnail is %dx%d, want 240x240", cfg.Width, cfg.Height)
	}
	if again := thumb(32, 32); !bytes.Equal(again, small) {
		t.Errorf("second remote thumbnail differs from the first")
	}
	thumb(800, 600) // never upscaled, another size from the same original

	if got := origin.fedRequests(t, "federation_thumbnail", http.StatusOK) - thumbsBefore; got != 0 {
		t.Errorf("%s answered %v federation thumbnail requests, want 0 (thumbnails made on %s)", origin.serverName, got, remote.serverName)
	}
	if got := origin.fedRequests(t, "federation_download", http.StatusOK) - downloadsBefore; got != 1 {
		t.Errorf("%s answered %v federation downloads for the thumbnails, want 1 (the original, once)", origin.serverName, got)
	}
	// The original is then served from the cache.
	resp := remote.client.must(t, request{method: http.MethodGet, path: downloadPath(origin.serverName, id)})
	if resp.status != http.StatusOK || !bytes.Equal(resp.body, img) {
		t.Errorf("download of the thumbnailed remote original: got %v", resp)
	}
	if got := origin.fedRequests(t, "federation_download", http.StatusOK) - downloadsBefore; got != 1 {
		t.Errorf("%s answered %v federation downloads, want still 1", origin.serverName, got)
	}
}

// checkRemoteBurst fires concurrent first downloads of one remote item:
// one federation request reaches the origin, every client gets the bytes.
func checkRemoteBurst(t *testing.T, origin, remote *fedNode) {
	const clients = 20
	content := randomBytes(512 << 10)
	id := origin.client.upload(t, content, "application/octet-stream", "")
	before := origin.fedRequests(t, "federation_download", http.StatusOK)
	path := downloadPath(origin.serverName, id)

	var (
		start    = make(chan struct{})
		wg       sync.WaitGroup
		mu       sync.Mutex
		failures []string
	)
	for i := range clients {
		wg.Go(func() {
			<-start
			resp, err := remote.client.do(request{method: http.MethodGet, path: path})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				failures = append(failures, fmt.Sprintf("client %d: %v", i, err))
			case resp.status != http.StatusOK:
				failures = append(failures, fmt.Sprintf("client %d: %v", i, resp))
			case !bytes.Equal(resp.body, content):
				failures = append(failures, fmt.Sprintf("client %d: %d bytes that differ from the %d uploaded", i, len(resp.body), len(content)))
			}
		})
	}
	close(start)
	wg.Wait()
	for _, f := range failures {
		t.Error(f)
	}
	if got := origin.fedRequests(t, "federation_download", http.StatusOK) - before; got != 1 {
		t.Errorf("%d concurrent first downloads on %s made %v federation downloads reach %s, want 1", clients, remote.serverName, got, origin.serverName)
	}
}

// checkInboundVerification sends federation requests to origin directly:
// without X-Matrix, signed with a key the claimed origin does not publish,
// and (the control) signed with remote's real key.
func checkInboundVerification(t *testing.T, origin, remote *fedNode) {
	content := randomBytes(4096)
	id := origin.client.upload(t, content, "application/octet-stream", "")
	uri := "/_matrix/federation/v1/media/download/" + id
	signed := func(key xmatrix.SigningKey) map[string]string {
		h, err := xmatrix.SignRequest(http.MethodGet, uri, remote.serverName, origin.serverName, nil, key)
		if err != nil {
			t.Fatal(err)
		}
		return map[string]string{"Authorization": h}
	}
	rogue, err := xmatrix.GenerateSigningKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	// A key ID B publishes, with the wrong private key.
	forged := rogue
	forged.ID = remote.key.ID

	tests := []struct {
		name   string
		header map[string]string
		status int
		// reason is the label of the verification failure counted.
		reason string
	}{
		{"unsigned", nil, http.StatusUnauthorized, "missing"},
		{"unpublished key", signed(rogue), http.StatusUnauthorized, "no_key"},
		{"published key ID, wrong key", signed(forged), http.StatusUnauthorized, "bad_signature"},
		{"signed by the remote", signed(remote.key), http.StatusOK, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			failures := func() float64 {
				return origin.metric(t, "caddy_matrix_media_federation_verification_failures_total", map[string]string{"reason": tc.reason})
			}
			before := failures()
			resp := origin.client.must(t, request{method: http.MethodGet, path: uri, noAuth: true, header: tc.header})
			if resp.status != tc.status {
				t.Fatalf("got %v, want %d", resp, tc.status)
			}
			if tc.status != http.StatusOK {
				if resp.errcode() != "M_UNAUTHORIZED" {
					t.Errorf("errcode %q, want M_UNAUTHORIZED: %v", resp.errcode(), resp)
				}
				if got := failures() - before; got != 1 {
					t.Errorf("verification failures with reason %q grew by %v, want 1", tc.reason, got)
				}
				return
			}
			if ct := resp.header.Get("Content-Type"); !strings.HasPrefix(ct, "multipart/mixed") {
				t.Errorf("Content-Type %q, want multipart/mixed", ct)
			}
			if !bytes.Contains(resp.body, content) {
				t.Errorf("signed federation download lacks the content: %v", resp)
			}
		})
	}
}

// TestFederationLegacyFallback fetches media from a remote that only has
// the deprecated /_matrix/media/v3 endpoints: the federation endpoint
// answers 404 M_UNRECOGNIZED, and the Caddy falls back to the legacy
// download with allow_remote=false, still signed.
func TestFederationLegacyFallback(t *testing.T) {
	pki := newFedPKI(t)
	a := startFedNode(t, fedNodeOptions{pki: pki, keyFile: writeKeyFile(t), token: "token-alice", user: "@alice:a"})

	content := randomBytes(300 << 10)
	const (
		mediaID     = "xyz"
		contentType = "application/pdf"
	)
	var (
		mu          sync.Mutex
		fedRequests atomic.Int64
		legacy      []*http.Request
		serverName  string
	)
	legacySrv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/_matrix/federation/v1/media/") {
			fedRequests.Add(1)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			_, _ = fmt.Fprint(w, `{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`)
			return
		}
		mu.Lock()
		legacy = append(legacy, r.Clone(r.Context()))
		name := serverName
		mu.Unlock()
		if r.URL.Path != "/_matrix/media/v3/download/"+name+"/"+mediaID {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			_, _ = fmt.Fprint(w, `{"errcode":"M_NOT_FOUND","error":"Not found"}`)
			return
		}
		w.Header().Set("Content-Type", contentType)
		w.Header().Set("Content-Disposition", "inline; filename=legacy.pdf")
		w.Header().Set("Content-Length", fmt.Sprint(len(content)))
		_, _ = w.Write(content)
	}))
	legacySrv.TLS = &tls.Config{Certificates: []tls.Certificate{pki.leaf}, MinVersion: tls.VersionTLS12}
	legacySrv.StartTLS()
	t.Cleanup(legacySrv.Close)
	mu.Lock()
	serverName = legacySrv.Listener.Addr().String()
	mu.Unlock()

	resp := a.client.must(t, request{method: http.MethodGet, path: downloadPath(serverName, mediaID)})
	if resp.status != http.StatusOK || !bytes.Equal(resp.body, content) {
		t.Fatalf("download of mxc://%s/%s on %s: got %v, want 200 with the %d legacy bytes", serverName, mediaID, a.serverName, resp, len(content))
	}
	if got := resp.header.Get("Content-Type"); got != contentType {
		t.Errorf("Content-Type = %q, want %q", got, contentType)
	}
	if fedRequests.Load() == 0 {
		t.Errorf("the federation endpoint was never tried before the legacy one")
	}
	legacyRequests := func() []*http.Request {
		mu.Lock()
		defer mu.Unlock()
		return append([]*http.Request(nil), legacy...)
	}
	seen := legacyRequests()
	if len(seen) != 1 {
		t.Fatalf("legacy endpoint got %d requests, want 1", len(seen))
	}
	r := seen[0]
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		t.Fatalf("legacy request query %q: %v", r.URL.RawQuery, err)
	}
	if got := q.Get("allow_remote"); got != "false" {
		t.Errorf("legacy request allow_remote = %q, want false (query %q)", got, r.URL.RawQuery)
	}
	auth, err := xmatrix.ParseAuthorization(r.Header.Get("Authorization"))
	if err != nil {
		t.Fatalf("legacy request Authorization %q: %v", r.Header.Get("Authorization"), err)
	}
	if auth.Origin != a.serverName || auth.Destination != serverName || auth.KeyID != a.key.ID {
		t.Errorf("legacy request X-Matrix origin=%q destination=%q key=%q, want %q %q %q",
			auth.Origin, auth.Destination, auth.KeyID, a.serverName, serverName, a.key.ID)
	}

	// Cached: a second download makes no request.
	resp = a.client.must(t, request{method: http.MethodGet, path: downloadPath(serverName, mediaID)})
	if resp.status != http.StatusOK || !bytes.Equal(resp.body, content) {
		t.Errorf("second download: got %v", resp)
	}
	if n := len(legacyRequests()); n != 1 {
		t.Errorf("second download reached the remote: %d legacy requests, want 1", n)
	}
}
