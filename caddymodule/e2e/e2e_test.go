package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

// Access tokens the fake homeserver knows.
var testTokens = map[string]string{
	"token-alice": "@alice:a.test",
	"token-bob":   "@bob:b.test",
}

// Sizes the test config gives the sites.
const (
	siteAMaxUpload = 1 << 20 // a.test: max_upload_size 1MiB
	appMaxUpload   = 2 << 20 // app default, used by b.test: 2MiB
)

func twoSites() []site {
	return []site{{serverName: "a.test", maxUploadSize: "1MiB"}, {serverName: "b.test"}}
}

// randomBytes returns n random bytes (crypto/rand.Read never fails).
func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

func TestBinaryHasModules(t *testing.T) {
	out, err := exec.Command(caddyBinary(t), "list-modules").CombinedOutput()
	if err != nil {
		t.Fatalf("caddy list-modules: %v\n%s", err, out)
	}
	for _, id := range []string{"matrix_media", "http.handlers.matrix_media"} {
		found := false
		for line := range strings.Lines(string(out)) {
			if strings.TrimSpace(line) == id {
				found = true
			}
		}
		if !found {
			t.Errorf("caddy list-modules does not list %s:\n%s", id, out)
		}
	}
}

func TestTwoSitesSQLite(t *testing.T) {
	hs := newHomeserver(t, testTokens)
	cfg := newConfig(t, hs, twoSites()...)
	inst := startCaddy(t, cfg)
	a := newSiteClient(inst, "a.test", "token-alice", true)
	b := newSiteClient(inst, "b.test", "token-bob", true)

	t.Run("a.test", func(t *testing.T) { exerciseSite(t, a, siteAMaxUpload) })
	t.Run("b.test", func(t *testing.T) { exerciseSite(t, b, appMaxUpload) })
	t.Run("reverse_proxy", func(t *testing.T) { checkProxied(t, a, b) })
	t.Run("dedup", func(t *testing.T) { checkDedup(t, cfg.storagePath, a, b) })
	t.Run("siblings", func(t *testing.T) { checkSiblings(t, a, b) })
	t.Run("metrics", func(t *testing.T) { checkMetrics(t, inst) })
}

// checkMetrics checks that the module's metrics are served by Caddy's admin
// /metrics endpoint and counted the requests made so far.
func checkMetrics(t *testing.T, inst *instance) {
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", inst.cfg.adminPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("admin /metrics: %d %v", resp.StatusCode, err)
	}
	for _, want := range []string{
		"caddy_matrix_media_requests_total{",
		"caddy_matrix_media_upload_bytes_total ",
		"caddy_matrix_media_dedup_hits_total 1",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("admin /metrics lacks %q", want)
		}
	}
}

func TestTwoSitesPostgres(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped under -short")
	}
	dsn := testpg.DSN(t)
	hs := newHomeserver(t, testTokens)
	cfg := newConfig(t, hs, twoSites()...)
	// The DSN reaches Caddy through the environment, resolved by the app.
	cfg.database = "postgres {env.MATRIX_MEDIA_E2E_DSN}"
	inst := startCaddy(t, cfg, "MATRIX_MEDIA_E2E_DSN="+dsn)
	defer func() {
		if strings.Contains(inst.logs.String(), dsn) {
			t.Errorf("caddy logged the database DSN")
		}
	}()
	a := newSiteClient(inst, "a.test", "token-alice", true)
	b := newSiteClient(inst, "b.test", "token-bob", true)

	t.Run("a.test", func(t *testing.T) { exerciseSite(t, a, siteAMaxUpload) })
	t.Run("b.test", func(t *testing.T) { exerciseSite(t, b, appMaxUpload) })
	t.Run("reverse_proxy", func(t *testing.T) { checkProxied(t, a, b) })
	t.Run("dedup", func(t *testing.T) { checkDedup(t, cfg.storagePath, a, b) })
}

// exerciseSite runs the media API of one site through its main paths.
func exerciseSite(t *testing.T, c *siteClient, maxUpload int) {
	content := []byte("hello from " + c.serverName + " " + rand.Text())
	id, err := c.upload(content, "text/plain", "hello.txt")
	if err != nil {
		t.Fatal(err)
	}

	t.Run("download", func(t *testing.T) {
		resp := c.must(t, request{method: http.MethodGet, path: c.downloadPath(id)})
		if resp.status != http.StatusOK || !bytes.Equal(resp.body, content) {
			t.Fatalf("download: got %v, want 200 %q", resp, content)
		}
		if got := resp.header.Get("Content-Type"); !strings.HasPrefix(got, "text/plain") {
			t.Errorf("Content-Type = %q, want text/plain", got)
		}
		if got := resp.header.Get("Content-Disposition"); got != "inline; filename=hello.txt" {
			t.Errorf("Content-Disposition = %q, want inline; filename=hello.txt", got)
		}
		if got := resp.header.Get("Content-Length"); got != strconv.Itoa(len(content)) {
			t.Errorf("Content-Length = %q, want %d", got, len(content))
		}

		resp = c.must(t, request{method: http.MethodGet, path: c.downloadPath(id) + "/other%20name.txt"})
		if resp.status != http.StatusOK || !bytes.Equal(resp.body, content) {
			t.Fatalf("download with file name: got %v", resp)
		}
		if got := resp.header.Get("Content-Disposition"); got != "inline; filename*=utf-8''other%20name.txt" {
			t.Errorf("Content-Disposition with file name = %q, want inline; filename*=utf-8''other%%20name.txt", got)
		}

		legacy := "/_matrix/media/v3/download/" + c.serverName + "/" + id
		resp = c.must(t, request{method: http.MethodGet, path: legacy, noAuth: true})
		if resp.status != http.StatusOK || !bytes.Equal(resp.body, content) {
			t.Errorf("legacy unauthenticated download: got %v", resp)
		}
	})

	t.Run("auth", func(t *testing.T) {
		resp := c.must(t, request{method: http.MethodGet, path: c.downloadPath(id), noAuth: true})
		if resp.status != http.StatusUnauthorized || resp.errcode() != "M_MISSING_TOKEN" {
			t.Errorf("download without token: got %v, want 401 M_MISSING_TOKEN", resp)
		}
		resp = c.must(t, request{method: http.MethodGet, path: c.downloadPath(id), noAuth: true,
			header: map[string]string{"Authorization": "Bearer not-a-token"}})
		if resp.status != http.StatusUnauthorized || resp.errcode() != "M_UNKNOWN_TOKEN" {
			t.Errorf("download with unknown token: got %v, want 401 M_UNKNOWN_TOKEN", resp)
		}
		resp = c.must(t, request{method: http.MethodGet, path: c.downloadPath("doesNotExist")})
		if resp.status != http.StatusNotFound || resp.errcode() != "M_NOT_FOUND" {
			t.Errorf("download of unknown media: got %v, want 404 M_NOT_FOUND", resp)
		}
	})

	t.Run("config", func(t *testing.T) {
		resp := c.must(t, request{method: http.MethodGet, path: "/_matrix/client/v1/media/config"})
		var cfg map[string]int64
		if resp.status != http.StatusOK || json.Unmarshal(resp.body, &cfg) != nil {
			t.Fatalf("config: got %v", resp)
		}
		if cfg["m.upload.size"] != int64(maxUpload) {
			t.Errorf("m.upload.size = %d, want %d", cfg["m.upload.size"], maxUpload)
		}
		resp = c.must(t, request{method: http.MethodPost, path: "/_matrix/media/v3/upload",
			body: make([]byte, maxUpload+1), contentType: "application/octet-stream"})
		if resp.status != http.StatusRequestEntityTooLarge || resp.errcode() != "M_TOO_LARGE" {
			t.Errorf("upload of max_upload_size+1 bytes: got %v, want 413 M_TOO_LARGE", resp)
		}
	})

	t.Run("async upload", func(t *testing.T) {
		before := time.Now().UnixMilli()
		resp := c.must(t, request{method: http.MethodPost, path: "/_matrix/media/v1/create",
			body: []byte("{}"), contentType: "application/json"})
		if resp.status != http.StatusOK {
			t.Fatalf("create: got %v", resp)
		}
		asyncID, err := c.parseMXC(resp.body)
		if err != nil {
			t.Fatal(err)
		}
		var created struct {
			UnusedExpiresAt int64 `json:"unused_expires_at"`
		}
		if err := json.Unmarshal(resp.body, &created); err != nil || created.UnusedExpiresAt <= before {
			t.Errorf("create: unused_expires_at = %d, want a time after %d", created.UnusedExpiresAt, before)
		}
		data := randomBytes(3000)
		put := request{method: http.MethodPut, path: "/_matrix/media/v3/upload/" + c.serverName + "/" + asyncID + "?filename=async.bin",
			body: data, contentType: "application/octet-stream"}
		resp = c.must(t, put)
		if resp.status != http.StatusOK || strings.TrimSpace(string(resp.body)) != "{}" {
			t.Fatalf("PUT upload: got %v, want 200 {}", resp)
		}
		resp = c.must(t, put)
		if resp.status != http.StatusConflict || resp.errcode() != "M_CANNOT_OVERWRITE_MEDIA" {
			t.Errorf("second PUT upload: got %v, want 409 M_CANNOT_OVERWRITE_MEDIA", resp)
		}
		resp = c.must(t, request{method: http.MethodGet, path: c.downloadPath(asyncID)})
		if resp.status != http.StatusOK || !bytes.Equal(resp.body, data) {
			t.Fatalf("download of async upload: got %v", resp)
		}
		if got := resp.header.Get("Content-Disposition"); got != "attachment; filename=async.bin" {
			t.Errorf("Content-Disposition = %q, want attachment; filename=async.bin", got)
		}
	})

	t.Run("range", func(t *testing.T) {
		resp := c.must(t, request{method: http.MethodGet, path: c.downloadPath(id), header: map[string]string{"Range": "bytes=2-5"}})
		if resp.status != http.StatusPartialContent || !bytes.Equal(resp.body, content[2:6]) {
			t.Fatalf("range download: got %v, want 206 %q", resp, content[2:6])
		}
		if got, want := resp.header.Get("Content-Range"), fmt.Sprintf("bytes 2-5/%d", len(content)); got != want {
			t.Errorf("Content-Range = %q, want %q", got, want)
		}
	})

	t.Run("security and CORS headers", func(t *testing.T) {
		resp := c.must(t, request{method: http.MethodGet, path: c.downloadPath(id)})
		if resp.status != http.StatusOK {
			t.Fatalf("download: got %v", resp)
		}
		for _, h := range []struct{ name, want string }{
			{"Access-Control-Allow-Origin", "*"},
			{"Content-Security-Policy", "sandbox"},
			{"Content-Security-Policy", "default-src 'none'"},
			{"Cross-Origin-Resource-Policy", "cross-origin"},
			{"X-Content-Type-Options", "nosniff"},
		} {
			if !headerHas(resp.header, h.name, h.want) {
				t.Errorf("%s = %q, want it to contain %q", h.name, resp.header.Get(h.name), h.want)
			}
		}
		resp = c.must(t, request{method: http.MethodOptions, path: c.downloadPath(id), noAuth: true, header: map[string]string{
			"Origin":                         "https://app.example",
			"Access-Control-Request-Method":  "GET",
			"Access-Control-Request-Headers": "authorization",
		}})
		if resp.status != http.StatusOK && resp.status != http.StatusNoContent {
			t.Errorf("CORS preflight: got %v, want 200 or 204", resp)
		}
		if !headerHas(resp.header, "Access-Control-Allow-Origin", "*") ||
			!headerHas(resp.header, "Access-Control-Allow-Methods", "GET") ||
			!headerHas(resp.header, "Access-Control-Allow-Headers", "Authorization") {
			t.Errorf("CORS preflight headers: %v", resp.header)
		}
	})

	t.Run("HEAD", func(t *testing.T) {
		resp := c.must(t, request{method: http.MethodHead, path: c.downloadPath(id)})
		if resp.status != http.StatusOK || len(resp.body) != 0 {
			t.Fatalf("HEAD: got %v, want 200 with no body", resp)
		}
		if got := resp.header.Get("Content-Length"); got != strconv.Itoa(len(content)) {
			t.Errorf("HEAD Content-Length = %q, want %d", got, len(content))
		}
	})
}

// checkProxied checks that non-media paths reach the homeserver through
// reverse_proxy on every site, with the site's Host.
func checkProxied(t *testing.T, clients ...*siteClient) {
	for _, c := range clients {
		resp := c.must(t, request{method: http.MethodGet, path: "/_matrix/client/versions", noAuth: true})
		if resp.status != http.StatusOK || resp.header.Get(hsMarker) != "1" {
			t.Errorf("%s: /_matrix/client/versions: got %v, want 200 from the homeserver", c.serverName, resp)
			continue
		}
		var v struct {
			Host string `json:"host"`
		}
		if err := json.Unmarshal(resp.body, &v); err != nil || !strings.HasPrefix(v.Host, c.serverName+":") {
			t.Errorf("%s: homeserver saw Host %q, want %s:<port>", c.serverName, v.Host, c.serverName)
		}
	}
}

// checkDedup uploads the same bytes on two sites and checks that they are
// stored once.
func checkDedup(t *testing.T, storagePath string, a, b *siteClient) {
	content := randomBytes(200 << 10)
	before := countBlobs(t, storagePath)
	idA, err := a.upload(content, "application/octet-stream", "")
	if err != nil {
		t.Fatal(err)
	}
	if got := countBlobs(t, storagePath); got != before+1 {
		t.Fatalf("blob files after the first upload: %d, want %d", got, before+1)
	}
	idB, err := b.upload(content, "application/octet-stream", "")
	if err != nil {
		t.Fatal(err)
	}
	if got := countBlobs(t, storagePath); got != before+1 {
		t.Errorf("blob files after the same bytes were uploaded on the other site: %d, want still %d", got, before+1)
	}
	if err := a.download(idA, content); err != nil {
		t.Error(err)
	}
	if err := b.download(idB, content); err != nil {
		t.Error(err)
	}
}

// TestReloadUnderLoad reloads the config repeatedly while clients upload and
// download on both sites: every request must get a correct response, every
// upload must stay downloadable, and each reload must take effect.
//
// One allowance, for Caddy itself rather than this module: while a reload
// hands the listening socket from the old server to the new one, Caddy
// v2.11.9 sometimes accepts a connection on the old server after that server
// began shutting down, and Go's http.Server then closes it without a response
// (the client sees EOF or a reset). A bare Caddy with only "respond" in its
// Caddyfile drops such connections just the same. Requests that got no HTTP
// response at all are therefore sent again (a few times at most, and
// counted); any response that arrives must be right.
func TestReloadUnderLoad(t *testing.T) {
	hs := newHomeserver(t, testTokens)
	cfg := newConfig(t, hs, twoSites()...)
	inst := startCaddy(t, cfg)

	type uploaded struct {
		c       *siteClient
		id      string
		content []byte
	}
	const (
		workers    = 6
		iterations = 30
		// minReloads is the least number of reloads; reloading goes on
		// until the workers are done, up to maxReloads.
		minReloads = 6
		maxReloads = 500
		// retries is how often a request without any response is re-sent.
		retries = 5
	)
	var retried atomic.Int64
	newClient := func(serverName, token string) *siteClient {
		// New connections per request: a keep-alive connection closed by the
		// old server between two requests would fail a POST in the client.
		c := newSiteClient(inst, serverName, token, false)
		c.noResponseRetries = retries
		c.retried = &retried
		return c
	}
	var (
		mu       sync.Mutex
		failures []string
		uploads  []uploaded
		attempts int
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Sprintf(format, args...))
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var working atomic.Int64
	working.Store(workers)
	for w := range workers {
		wg.Go(func() {
			defer working.Add(-1)
			sites := []*siteClient{newClient("a.test", "token-alice"), newClient("b.test", "token-bob")}
			for i := 0; i < iterations; i++ {
				select {
				case <-stop:
					return
				default:
				}
				c := sites[(w+i)%2]
				mu.Lock()
				attempts++
				mu.Unlock()
				content := randomBytes(1 + (w*7919+i*104729)%(64<<10))
				id, err := c.upload(content, "application/octet-stream", "")
				if err != nil {
					fail("worker %d iteration %d: %v", w, i, err)
					continue
				}
				mu.Lock()
				uploads = append(uploads, uploaded{c, id, content})
				mu.Unlock()
				if err := c.download(id, content); err != nil {
					fail("worker %d iteration %d: %v", w, i, err)
				}
			}
		})
	}

	// Alternate b.test's max_upload_size so that each reload is observable.
	probe := newClient("b.test", "token-bob")
	reloads := 0
	for r := 0; r < maxReloads && (r < minReloads || working.Load() > 0); r++ {
		reloads++
		next := cfg
		next.sites = twoSites()
		size := 3 << 20
		if r%2 == 1 {
			size = 4 << 20
		}
		next.sites[1].maxUploadSize = strconv.Itoa(size)
		if err := inst.reload(next); err != nil {
			close(stop)
			wg.Wait()
			t.Fatalf("reload %d: %v", r, err)
		}
		resp, err := probe.do(request{method: http.MethodGet, path: "/_matrix/client/v1/media/config"})
		if err != nil {
			fail("config after reload %d: %v", r, err)
			continue
		}
		var got map[string]int64
		if resp.status != http.StatusOK || json.Unmarshal(resp.body, &got) != nil || got["m.upload.size"] != int64(size) {
			fail("config after reload %d: got %v, want m.upload.size %d", r, resp, size)
		}
	}
	wg.Wait()
	t.Logf("%d reloads; %d requests re-sent after getting no response", reloads, retried.Load())

	for _, f := range failures {
		t.Error(f)
	}
	if want := workers * iterations; attempts != want {
		t.Errorf("workers made %d upload attempts, want %d", attempts, want)
	}
	for _, u := range uploads {
		if err := u.c.download(u.id, u.content); err != nil {
			t.Errorf("after the reloads: %v", err)
		}
	}
	if !strings.Contains(inst.logs.String(), `"reused":true`) {
		t.Errorf("no reload reused the matrix_media stores (no \"reused\":true in the logs)")
	}
}
