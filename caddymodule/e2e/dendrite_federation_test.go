package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testdendrite"
)

// dendriteClient talks to Dendrite's client API over its plain HTTP
// listener, as one logged-in user.
type dendriteClient struct {
	http  *http.Client
	base  string
	token string
}

// dendriteClientLogin logs localpart in straight at Dendrite.
func dendriteClientLogin(t *testing.T, d *testdendrite.Dendrite, localpart, password string) *dendriteClient {
	t.Helper()
	c := &dendriteClient{
		http: &http.Client{Timeout: time.Minute, Transport: &http.Transport{Proxy: nil}},
		base: d.URL(),
	}
	body, err := json.Marshal(map[string]any{
		"type":       "m.login.password",
		"identifier": map[string]string{"type": "m.id.user", "user": localpart},
		"password":   password,
	})
	if err != nil {
		t.Fatal(err)
	}
	resp := c.must(t, request{method: http.MethodPost, path: "/_matrix/client/v3/login",
		body: body, contentType: "application/json", noAuth: true})
	var r struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.Unmarshal(resp.body, &r); err != nil || resp.status != http.StatusOK || r.AccessToken == "" {
		t.Fatalf("login of %s at dendrite: %v (decoding: %v)", localpart, resp, err)
	}
	c.token = r.AccessToken
	return c
}

// must sends req to Dendrite and reads the whole response; a transport
// error fails the test.
func (c *dendriteClient) must(t *testing.T, req request) response {
	t.Helper()
	var body io.Reader
	if req.body != nil {
		body = bytes.NewReader(req.body)
	}
	hr, err := http.NewRequest(req.method, c.base+req.path, body)
	if err != nil {
		t.Fatal(err)
	}
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
		t.Fatalf("%s %s at dendrite: %v", req.method, req.path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s at dendrite: reading body: %v", req.method, req.path, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: data}
}

// upload uploads content to Dendrite and returns its media ID, checking
// that the content URI names serverName.
func (c *dendriteClient) upload(t *testing.T, serverName string, content []byte, contentType, filename string) string {
	t.Helper()
	resp := c.must(t, request{method: http.MethodPost, path: "/_matrix/media/v3/upload?filename=" + url.QueryEscape(filename),
		body: content, contentType: contentType})
	if resp.status != http.StatusOK {
		t.Fatalf("upload at dendrite: %v", resp)
	}
	var r struct {
		ContentURI string `json:"content_uri"`
	}
	if err := json.Unmarshal(resp.body, &r); err != nil {
		t.Fatalf("upload at dendrite: decoding %q: %v", resp.body, err)
	}
	id, ok := strings.CutPrefix(r.ContentURI, "mxc://"+serverName+"/")
	if !ok || id == "" || strings.Contains(id, "/") {
		t.Fatalf("upload at dendrite: content_uri %q does not name %s", r.ContentURI, serverName)
	}
	return id
}

// dendriteDownloads is Dendrite's count of full downloads it answered with
// code, by type: "authed_federation" (/_matrix/federation/v1/media/download),
// "unauthed" (the legacy /_matrix/media/v3/download, which a federating
// server calls too) or "authed_client".
func dendriteDownloads(t *testing.T, d *testdendrite.Dendrite, typ string, code int) float64 {
	t.Helper()
	resp, err := http.Get(d.URL() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("dendrite /metrics: %s", resp.Status)
	}
	v, err := findSample(resp.Body, "dendrite_mediaapi_download", map[string]string{"type": typ, "code": fmt.Sprint(code)})
	if err != nil {
		t.Fatalf("dendrite metrics: %v", err)
	}
	return v
}

// TestDendriteFederation federates the module with a real homeserver,
// Dendrite v0.13.8, over TLS on loopback. Dendrite's server name is
// "127.0.0.1:<its https port>", the module's "127.0.0.1:<caddy's port>";
// both serve certificates of the test CA for 127.0.0.1.
//
// Both directions are checked: media uploaded to Dendrite is downloaded
// through the module (which signs its request with X-Matrix, verified by
// Dendrite against the key the module's homeserver publishes through
// Caddy), and media uploaded to the module is downloaded through Dendrite
// (whose X-Matrix request the module verifies against the key Dendrite
// publishes). The endpoints used are read from both sides' metrics.
//
// Two trust setups for Dendrite's outbound TLS: the test CA as its only
// root (the module's certificate is validated), and
// disable_tls_validation: true. The control is a Dendrite that trusts only
// the system's roots: it can neither fetch the module's media nor the key
// the module signs with, so both directions must fail.
func TestDendriteFederation(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts func(pki fedPKI) testdendrite.FederationOptions
	}{
		{"dendrite trusts the test CA", func(pki fedPKI) testdendrite.FederationOptions {
			return testdendrite.FederationOptions{CertFile: pki.certFile, KeyFile: pki.keyFile, RootCAFile: pki.caFile}
		}},
		{"dendrite without TLS validation", func(pki fedPKI) testdendrite.FederationOptions {
			return testdendrite.FederationOptions{CertFile: pki.certFile, KeyFile: pki.keyFile, DisableTLSValidation: true}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { checkDendriteFederation(t, tc.opts) })
	}
	t.Run("dendrite does not trust the module's certificate", checkDendriteUntrusted)
}

// dendritePeer is a federating Dendrite with one logged-in user, and a
// federating module node, both with certificates of one test CA.
type dendritePeer struct {
	d    *testdendrite.Dendrite
	name string // Dendrite's server name
	dave *dendriteClient
	a    *fedNode
}

func startDendritePeer(t *testing.T, opts func(pki fedPKI) testdendrite.FederationOptions) dendritePeer {
	t.Helper()
	caddyBinary(t) // build (or skip under -short) before starting Dendrite
	const davePassword = "dave-password-1"
	pki := newFedPKI(t)
	fed := opts(pki)
	d := testdendrite.Start(t, testdendrite.Options{Federation: &fed, Metrics: true})
	d.CreateUser(t, "dave", davePassword, false)
	p := dendritePeer{
		d:    d,
		name: d.ServerName(),
		dave: dendriteClientLogin(t, d, "dave", davePassword),
		a:    startFedNode(t, fedNodeOptions{pki: pki, keyFile: writeKeyFile(t), token: "token-alice", user: "@alice:a"}),
	}
	if want := strings.TrimPrefix(d.FederationURL(), "https://"); p.name != want {
		t.Fatalf("dendrite's server name %q, want its https address %q", p.name, want)
	}
	return p
}

func checkDendriteFederation(t *testing.T, opts func(pki fedPKI) testdendrite.FederationOptions) {
	p := startDendritePeer(t, opts)
	d, dendriteName, dave, a := p.d, p.name, p.dave, p.a

	t.Run("Dendrite's media downloaded through the module", func(t *testing.T) {
		content := randomBytes(300 << 10)
		const contentType = "application/pdf"
		id := dave.upload(t, dendriteName, content, contentType, "minutes.pdf")
		fedBefore := dendriteDownloads(t, d, "authed_federation", http.StatusOK)
		legacyBefore := dendriteDownloads(t, d, "unauthed", http.StatusOK)
		fetchedBefore := a.remoteFetches(t, "ok")

		path := downloadPath(dendriteName, id)
		for i := range 2 {
			resp := a.client.must(t, request{method: http.MethodGet, path: path})
			if resp.status != http.StatusOK {
				t.Fatalf("download %d of mxc://%s/%s on %s: got %v, want 200", i, dendriteName, id, a.serverName, resp)
			}
			if !bytes.Equal(resp.body, content) {
				t.Fatalf("download %d: got %d bytes that differ from the %d uploaded to dendrite", i, len(resp.body), len(content))
			}
			if got := resp.header.Get("Content-Type"); got != contentType {
				t.Errorf("download %d: Content-Type = %q, want %q", i, got, contentType)
			}
		}
		fedServed := dendriteDownloads(t, d, "authed_federation", http.StatusOK) - fedBefore
		legacyServed := dendriteDownloads(t, d, "unauthed", http.StatusOK) - legacyBefore
		t.Logf("dendrite answered %v federation (/_matrix/federation/v1/media/download) and %v legacy (/_matrix/media/v3/download) downloads for the module",
			fedServed, legacyServed)
		if fedServed != 1 || legacyServed != 0 {
			t.Errorf("dendrite answered %v federation and %v legacy downloads for 2 client downloads on %s, want 1 and 0 (the second from the module's cache)",
				fedServed, legacyServed, a.serverName)
		}
		if got := a.remoteFetches(t, "ok") - fetchedBefore; got != 1 {
			t.Errorf("%s made %v successful remote fetches, want 1", a.serverName, got)
		}
		if a.hs.keyRequests.Load() == 0 {
			t.Errorf("dendrite verified %s's X-Matrix request without fetching its key (from its homeserver, through its Caddy)", a.serverName)
		}

		// A thumbnail of Dendrite's image is made by the module from the
		// original, fetched once.
		img := e2ePNG(t, 300, 200)
		imgID := dave.upload(t, dendriteName, img, "image/png", "photo.png")
		fedBefore = dendriteDownloads(t, d, "authed_federation", http.StatusOK)
		thumb := a.client.must(t, request{method: http.MethodGet,
			path: fmt.Sprintf("/_matrix/client/v1/media/thumbnail/%s/%s?width=32&height=32&method=crop", dendriteName, imgID)})
		if thumb.status != http.StatusOK || thumb.header.Get("Content-Type") != "image/png" {
			t.Fatalf("thumbnail of Dendrite's image on %s: got %v, want 200 image/png", a.serverName, thumb)
		}
		if cfg, _, err := image.DecodeConfig(bytes.NewReader(thumb.body)); err != nil || cfg.Width != 32 || cfg.Height != 32 {
			t.Errorf("thumbnail of Dendrite's image: %dx%d (%v), want a 32x32 PNG", cfg.Width, cfg.Height, err)
		}
		if got := dendriteDownloads(t, d, "authed_federation", http.StatusOK) - fedBefore; got != 1 {
			t.Errorf("dendrite answered %v federation downloads for a thumbnail on %s, want 1 (the original)", got, a.serverName)
		}

		// A media ID Dendrite does not have is a 404 on the module.
		resp := a.client.must(t, request{method: http.MethodGet, path: downloadPath(dendriteName, "nosuchmediaatdendrite")})
		wantStatus(t, "download of unknown Dendrite media", resp, http.StatusNotFound, "M_NOT_FOUND")
	})

	t.Run("module's media downloaded through Dendrite", func(t *testing.T) {
		content := randomBytes(200 << 10)
		const contentType = "application/pdf"
		id := a.client.upload(t, content, contentType, "")
		fedBefore := a.fedRequests(t, "federation_download", http.StatusOK)
		legacyBefore := a.metric(t, "caddy_matrix_media_requests_total", map[string]string{"endpoint": "download", "code": "200"})

		for i, path := range []string{
			"/_matrix/client/v1/media/download/" + a.serverName + "/" + id,
			"/_matrix/client/v1/media/download/" + a.serverName + "/" + id, // from Dendrite's copy
			"/_matrix/media/v3/download/" + a.serverName + "/" + id,
		} {
			resp := dave.must(t, request{method: http.MethodGet, path: path})
			if resp.status != http.StatusOK {
				t.Fatalf("download %d of mxc://%s/%s through dendrite (%s): got %v, want 200", i, a.serverName, id, path, resp)
			}
			if !bytes.Equal(resp.body, content) {
				t.Fatalf("download %d through dendrite: got %d bytes that differ from the %d uploaded to the module", i, len(resp.body), len(content))
			}
			if got := resp.header.Get("Content-Type"); got != contentType {
				t.Errorf("download %d through dendrite: Content-Type = %q, want %q (from the media part of the module's multipart answer)", i, got, contentType)
			}
		}
		fedServed := a.fedRequests(t, "federation_download", http.StatusOK) - fedBefore
		legacyServed := a.metric(t, "caddy_matrix_media_requests_total", map[string]string{"endpoint": "download", "code": "200"}) - legacyBefore
		t.Logf("%s answered %v federation and %v legacy downloads for dendrite", a.serverName, fedServed, legacyServed)
		if fedServed != 1 || legacyServed != 0 {
			t.Errorf("%s answered %v federation and %v legacy downloads for 3 downloads through dendrite, want 1 and 0 (later ones from dendrite's copy)",
				a.serverName, fedServed, legacyServed)
		}
		for _, reason := range []string{"missing", "malformed", "wrong_destination", "no_key", "bad_signature", "error"} {
			if got := a.metric(t, "caddy_matrix_media_federation_verification_failures_total", map[string]string{"reason": reason}); got != 0 {
				t.Errorf("%s refused %v inbound federation requests with reason %q, want none", a.serverName, got, reason)
			}
		}

		// Media the module does not have is a 404 through Dendrite.
		resp := dave.must(t, request{method: http.MethodGet, path: "/_matrix/client/v1/media/download/" + a.serverName + "/nosuchmediaatthemodule"})
		wantStatus(t, "download of unknown module media through dendrite", resp, http.StatusNotFound, "M_NOT_FOUND")
	})
}

// checkDendriteUntrusted runs Dendrite with TLS validation against the
// system's roots only, which do not hold the test CA.
func checkDendriteUntrusted(t *testing.T) {
	p := startDendritePeer(t, func(pki fedPKI) testdendrite.FederationOptions {
		return testdendrite.FederationOptions{CertFile: pki.certFile, KeyFile: pki.keyFile}
	})
	d, a := p.d, p.a

	// The module → Dendrite: Dendrite cannot fetch the module's key, so it
	// refuses the module's signed request.
	content := randomBytes(4096)
	id := p.dave.upload(t, p.name, content, "text/plain", "note.txt")
	viaModule := a.client.must(t, request{method: http.MethodGet, path: downloadPath(p.name, id)})
	if viaModule.status == http.StatusOK {
		t.Errorf("download of Dendrite's media on %s while Dendrite cannot verify its requests: got %v, want a failure", a.serverName, viaModule)
	}
	for _, typ := range []string{"authed_federation", "unauthed"} {
		if got := dendriteDownloads(t, d, typ, http.StatusOK); got != 0 {
			t.Errorf("dendrite answered %v %s downloads, want none", got, typ)
		}
	}
	if got := a.hs.keyRequests.Load(); got != 0 {
		t.Errorf("the module's key was fetched %d times through its Caddy, want none (Dendrite must refuse its certificate)", got)
	}

	// Dendrite → the module: the TLS handshake fails, no request arrives.
	mid := a.client.upload(t, content, "text/plain", "")
	viaDendrite := p.dave.must(t, request{method: http.MethodGet, path: "/_matrix/client/v1/media/download/" + a.serverName + "/" + mid})
	if viaDendrite.status == http.StatusOK {
		t.Errorf("download of the module's media through a Dendrite that does not trust its certificate: got %v, want a failure", viaDendrite)
	}
	for _, ep := range []string{"federation_download", "download"} {
		if got := a.metric(t, "caddy_matrix_media_requests_total", map[string]string{"endpoint": ep, "code": "200"}); got != 0 {
			t.Errorf("%s answered %v %s requests with 200, want none", a.serverName, got, ep)
		}
	}
	t.Logf("refused as expected: through the module %v; through dendrite %v", viaModule, viaDendrite)
}
