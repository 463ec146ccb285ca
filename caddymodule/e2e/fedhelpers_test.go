package e2e

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// fedPKI is a test certificate authority and one leaf certificate for the
// loopback IPs, written as PEM files.
type fedPKI struct {
	caFile, certFile, keyFile string
	pool                      *x509.CertPool
	leaf                      tls.Certificate
}

// newFedPKI creates the CA and the leaf under t.TempDir().
func newFedPKI(t *testing.T) fedPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "matrix-media e2e test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(leafKey)
	if err != nil {
		t.Fatal(err)
	}
	p := fedPKI{
		caFile:   filepath.Join(dir, "ca.pem"),
		certFile: filepath.Join(dir, "cert.pem"),
		keyFile:  filepath.Join(dir, "key.pem"),
		pool:     x509.NewCertPool(),
	}
	p.pool.AddCert(ca)
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	for path, data := range map[string][]byte{
		p.caFile:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		p.certFile: certPEM,
		p.keyFile:  keyPEM,
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if p.leaf, err = tls.X509KeyPair(certPEM, keyPEM); err != nil {
		t.Fatal(err)
	}
	return p
}

// fedHomeserver is the fake homeserver behind one federating site: whoami
// for its tokens, and /_matrix/key/v2/server publishing the site's signing
// key (what a real homeserver does once the key is merged into its own).
type fedHomeserver struct {
	srv         *httptest.Server
	serverName  string
	key         xmatrix.SigningKey
	tokens      map[string]string
	keyRequests atomic.Int64
}

func newFedHomeserver(t *testing.T, serverName string, key xmatrix.SigningKey, tokens map[string]string) *fedHomeserver {
	t.Helper()
	hs := &fedHomeserver{serverName: serverName, key: key, tokens: tokens}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /_matrix/client/v3/account/whoami", func(w http.ResponseWriter, r *http.Request) {
		token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		user, ok := hs.tokens[token]
		w.Header().Set("Content-Type", "application/json")
		if !ok {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown access token"}`)
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"user_id": user, "device_id": "E2EDEVICE"})
	})
	mux.HandleFunc("GET /_matrix/key/v2/server", func(w http.ResponseWriter, r *http.Request) {
		hs.keyRequests.Add(1)
		obj := map[string]any{
			"server_name":     hs.serverName,
			"valid_until_ts":  time.Now().Add(time.Hour).UnixMilli(),
			"verify_keys":     map[string]any{hs.key.ID: map[string]any{"key": hs.key.PublicBase64()}},
			"old_verify_keys": map[string]any{},
		}
		if err := xmatrix.SignJSON(obj, hs.serverName, hs.key); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(obj)
	})
	hs.srv = httptest.NewServer(mux)
	t.Cleanup(hs.srv.Close)
	return hs
}

// fedNode is one federating Caddy serving one site, https://127.0.0.1:port,
// whose Matrix server name is "127.0.0.1:port".
type fedNode struct {
	inst       *instance
	serverName string
	port       int
	key        xmatrix.SigningKey
	hs         *fedHomeserver
	client     *fedClient
}

// fedNodeOptions describe a fedNode to start.
type fedNodeOptions struct {
	pki fedPKI
	// keyFile is the site's signing key file, already written.
	keyFile string
	// token and user are the one access token its homeserver knows.
	token, user string
	// siteDirectives are put in the site block before matrix_media (e.g.
	// "encode gzip zstd"). Default: none.
	siteDirectives string
}

// loadKeyFile reads the one signing key of a key file.
func loadKeyFile(t *testing.T, path string) xmatrix.SigningKey {
	t.Helper()
	keys, err := xmatrix.LoadSigningKeys(path)
	if err != nil || len(keys) != 1 {
		t.Fatalf("loading %s: %d keys, %v", path, len(keys), err)
	}
	return keys[0]
}

// writeKeyFile generates a signing key in the test and writes it in
// Synapse's format.
func writeKeyFile(t *testing.T) string {
	t.Helper()
	k, err := xmatrix.GenerateSigningKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "signing.key")
	if err := os.WriteFile(path, xmatrix.FormatSynapse(k), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// cliKeyFile writes a signing key with the built binary's
// "caddy matrix-media generate-key".
func cliKeyFile(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "signing.key")
	out, err := exec.Command(caddyBinary(t), "matrix-media", "generate-key", "--out", path).CombinedOutput()
	if err != nil {
		t.Fatalf("caddy matrix-media generate-key: %v\n%s", err, out)
	}
	return path
}

// startFedNode starts a federating Caddy on fresh ports.
func startFedNode(t *testing.T, o fedNodeOptions) *fedNode {
	t.Helper()
	dir := t.TempDir()
	port := freePort(t)
	n := &fedNode{serverName: fmt.Sprintf("127.0.0.1:%d", port), port: port, key: loadKeyFile(t, o.keyFile)}
	n.hs = newFedHomeserver(t, n.serverName, n.key, map[string]string{o.token: o.user})
	cfg := config{adminPort: freePort(t), httpPort: port, dataDir: dir}
	// http_port is never listened on (no http:// site, no redirects).
	cfg.text = fmt.Sprintf(`{
	admin 127.0.0.1:%d
	default_bind 127.0.0.1
	auto_https disable_redirects
	persist_config off
	skip_install_trust
	http_port %d
	https_port %d
	matrix_media {
		database sqlite %s
		storage_path %s
		max_upload_size 4MiB
		federation {
			trusted_ca_file %s
			allowed_networks 127.0.0.0/8 ::1/128
		}
	}
}

https://%s {
	tls %s %s
	%s
	matrix_media {
		server_name %s
		homeserver %s
		signing_key %s
	}
	reverse_proxy %s
}
`, cfg.adminPort, freePort(t), port,
		filepath.Join(dir, "media.db"), filepath.Join(dir, "media"), o.pki.caFile,
		n.serverName, o.pki.certFile, o.pki.keyFile, o.siteDirectives,
		n.serverName, n.hs.srv.URL, o.keyFile,
		strings.TrimPrefix(n.hs.srv.URL, "http://"))
	n.inst = startCaddy(t, cfg)
	n.client = newFedClient(o.pki, n.serverName, o.token)
	return n
}

// metric returns the value of the sample of name with exactly the given
// labels on the node's admin /metrics, 0 when there is none.
func (n *fedNode) metric(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", n.inst.cfg.adminPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("admin /metrics of %s: %s", n.serverName, resp.Status)
	}
	v, err := findSample(resp.Body, name, labels)
	if err != nil {
		t.Fatalf("metrics of %s: %v", n.serverName, err)
	}
	return v
}

// findSample scans a Prometheus text exposition for one sample. Label values
// in this module's metrics never hold commas or escaped quotes.
func findSample(r io.Reader, name string, labels map[string]string) (float64, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		series, value, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		metric, rest, hasLabels := strings.Cut(series, "{")
		if metric != name {
			continue
		}
		got := map[string]string{}
		if hasLabels {
			for pair := range strings.SplitSeq(strings.TrimSuffix(rest, "}"), ",") {
				k, v, _ := strings.Cut(pair, "=")
				got[k] = strings.Trim(v, `"`)
			}
		}
		if len(got) != len(labels) {
			continue
		}
		match := true
		for k, v := range labels {
			if got[k] != v {
				match = false
			}
		}
		if match {
			f, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
			if err != nil {
				return 0, fmt.Errorf("sample %q: %w", line, err)
			}
			return f, nil
		}
	}
	return 0, sc.Err()
}

// fedRequests is the count of answered inbound federation requests of an
// endpoint ("federation_download", "federation_thumbnail") with a status.
func (n *fedNode) fedRequests(t *testing.T, endpoint string, code int) float64 {
	return n.metric(t, "caddy_matrix_media_requests_total", map[string]string{"endpoint": endpoint, "code": strconv.Itoa(code)})
}

// remoteFetches is the count of remote fetches by result.
func (n *fedNode) remoteFetches(t *testing.T, result string) float64 {
	return n.metric(t, "caddy_matrix_media_remote_fetches_total", map[string]string{"result": result})
}

// fedClient is an HTTPS client of one node, trusting the test CA and
// connecting to the IP in the server name (no SNI, as a federating server
// does).
type fedClient struct {
	http       *http.Client
	serverName string
	token      string
}

func newFedClient(pki fedPKI, serverName, token string) *fedClient {
	return &fedClient{
		http: &http.Client{
			Timeout: time.Minute,
			Transport: &http.Transport{
				TLSClientConfig:     &tls.Config{RootCAs: pki.pool, MinVersion: tls.VersionTLS12},
				MaxIdleConnsPerHost: 32,
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		serverName: serverName,
		token:      token,
	}
}

// do sends req to the node and reads the whole response.
func (c *fedClient) do(req request) (response, error) {
	var body io.Reader
	if req.body != nil {
		body = bytes.NewReader(req.body)
	}
	hr, err := http.NewRequest(req.method, "https://"+c.serverName+req.path, body)
	if err != nil {
		return response{}, err
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
		return response{}, fmt.Errorf("%s %s on %s: %w", req.method, req.path, c.serverName, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, fmt.Errorf("%s %s on %s: reading body: %w", req.method, req.path, c.serverName, err)
	}
	return response{status: resp.StatusCode, header: resp.Header, body: data}, nil
}

// must is do that fails the test on a transport error.
func (c *fedClient) must(t *testing.T, req request) response {
	t.Helper()
	resp, err := c.do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// upload uploads content to the node and returns its media ID, checking
// that the content URI names the node.
func (c *fedClient) upload(t *testing.T, content []byte, contentType, filename string) string {
	t.Helper()
	path := "/_matrix/media/v3/upload"
	if filename != "" {
		path += "?filename=" + url.QueryEscape(filename)
	}
	resp := c.must(t, request{method: http.MethodPost, path: path, body: content, contentType: contentType})
	if resp.status != http.StatusOK {
		t.Fatalf("upload on %s: %v", c.serverName, resp)
	}
	var r struct {
		ContentURI string `json:"content_uri"`
	}
	if err := json.Unmarshal(resp.body, &r); err != nil {
		t.Fatalf("upload on %s: decoding %q: %v", c.serverName, resp.body, err)
	}
	id, ok := strings.CutPrefix(r.ContentURI, "mxc://"+c.serverName+"/")
	if !ok || id == "" || strings.Contains(id, "/") {
		t.Fatalf("upload on %s: content_uri %q does not name this server", c.serverName, r.ContentURI)
	}
	return id
}

// downloadPath is the authenticated client download path of mxc://server/id.
func downloadPath(server, id string) string {
	return "/_matrix/client/v1/media/download/" + server + "/" + id
}
