// Package testdendrite runs a real Matrix homeserver, Dendrite v0.13.8, for
// tests: one throwaway process per call to Start, with SQLite databases (or
// one PostgreSQL database, Options.Database) and an in-memory JetStream in
// the test's temporary directory, serving the client API over plain HTTP on
// a free loopback port.
//
// Its configuration file (ConfigPath) and media directory (MediaPath) stay
// in place after Stop, for tests that read Dendrite's stores, such as the
// media importer's.
//
// Everything that would reach beyond loopback is off: federation, presence,
// identity servers, TURN, Sentry, stats reporting, DNS caching and key
// perspectives. Registration is closed; accounts are made with the shared
// secret admin API (CreateUser). Rate limiting is off.
//
// Federation can be turned on (Options.Federation): Dendrite then also
// serves HTTPS on a second loopback port, its server name defaults to
// "127.0.0.1:<that port>", and it federates over TLS with the peers the test
// makes it talk to (Dendrite's outbound federation is HTTPS only).
//
// The binaries dendrite and generate-keys must be installed (see
// InstallCommand); when they are missing the test fails, it never skips.
package testdendrite

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Version is the Dendrite release this package is written for.
const Version = "v0.13.8"

// InstallCommand installs the two Dendrite binaries this package runs
// (dendrite and generate-keys) into $(go env GOPATH)/bin. It needs cgo
// (SQLite).
const InstallCommand = "go install github.com/matrix-org/dendrite/cmd/{dendrite,generate-keys}@" + Version

// Timeouts.
const (
	// startTimeout bounds the wait for /_matrix/client/versions to answer.
	startTimeout = 30 * time.Second
	// stopTimeout is how long Dendrite gets to exit after SIGTERM before it
	// is killed.
	stopTimeout = 10 * time.Second
	// startAttempts is how often Start tries a new port when the one it
	// picked was taken meanwhile.
	startAttempts = 3
)

// Options configure Start. The zero value is valid.
type Options struct {
	// ServerName is the homeserver's server name, the domain part of its
	// user IDs. Default "localhost", or "127.0.0.1:<https port>" with
	// Federation.
	ServerName string
	// SharedSecret is client_api.registration_shared_secret, used by
	// CreateUser. Default: 32 random bytes, hex-encoded.
	SharedSecret string
	// Federation, when not nil, turns federation on. Default nil: federation
	// is disabled and only the plain HTTP client listener runs.
	Federation *FederationOptions
	// Metrics turns on global.metrics: Dendrite's Prometheus metrics are
	// served without authentication at /metrics on the HTTP listener
	// (URL()+"/metrics"). Default false.
	Metrics bool
	// Database, when set, is a PostgreSQL connection string (for example
	// testpg.DSN(t); lib/pq's rules, so add sslmode=disable for a server
	// without TLS) written as global.database.connection_string, and no
	// component has a database of its own: every one uses it, as in
	// Dendrite's single-database setup. Default "": one SQLite file per
	// component in the test's temporary directory.
	Database string
}

// FederationOptions turn federation on. Dendrite then serves its client and
// federation APIs over HTTPS too, on a free loopback port (FederationURL),
// and, unless Options.ServerName is set, its server name is
// "127.0.0.1:<https port>", so that peers reach it without well-known or SRV
// lookups.
type FederationOptions struct {
	// CertFile is the PEM certificate chain of the HTTPS listener (dendrite
	// -tls-cert). Required.
	CertFile string
	// KeyFile is the PEM private key of CertFile (dendrite -tls-key).
	// Required.
	KeyFile string
	// DisableTLSValidation is federation_api.disable_tls_validation: Dendrite
	// accepts any certificate from the servers it federates with. Default
	// false.
	DisableTLSValidation bool
	// RootCAFile, when set, is a PEM file of the certificate authorities
	// Dendrite trusts for outbound TLS, instead of the system's (passed as
	// SSL_CERT_FILE). Default "": the system's roots.
	RootCAFile string
	// KeyValidityPeriod is global.key_validity_period, how long the keys
	// Dendrite publishes are valid. Default 168h.
	KeyValidityPeriod time.Duration
}

// Dendrite is a running Dendrite process. It is stopped when the test that
// started it ends.
type Dendrite struct {
	url          string
	fedURL       string // "" when federation is off
	serverName   string
	sharedSecret string
	dir          string
	configPath   string
	logPath      string
	client       *http.Client

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error // valid once exited is closed
	stopped bool  // Stop was called (or the test's cleanup ran)
}

// Start runs Dendrite for the test and waits until its client API answers.
// It fails the test when the binaries are missing or Dendrite does not come
// up; the log file is printed when the test fails.
func Start(t testing.TB, opts Options) *Dendrite {
	t.Helper()
	if opts.ServerName == "" && opts.Federation == nil {
		opts.ServerName = "localhost"
	}
	if opts.SharedSecret == "" {
		opts.SharedSecret = randomHex(32)
	}
	if f := opts.Federation; f != nil {
		if f.CertFile == "" || f.KeyFile == "" {
			t.Fatal("testdendrite: Options.Federation needs CertFile and KeyFile")
		}
		if f.KeyValidityPeriod == 0 {
			f.KeyValidityPeriod = 168 * time.Hour
		}
	}
	dendriteBin := findBinary(t, "dendrite")
	keysBin := findBinary(t, "generate-keys")

	dir := t.TempDir()
	keyPath := filepath.Join(dir, "matrix_key.pem")
	if out, err := exec.Command(keysBin, "--private-key", keyPath).CombinedOutput(); err != nil {
		t.Fatalf("generating the dendrite signing key: %v\n%s", err, out)
	}
	configPath := filepath.Join(dir, "dendrite.yaml")
	if opts.Federation == nil {
		if err := os.WriteFile(configPath, []byte(configYAML(dir, keyPath, opts)), 0o600); err != nil {
			t.Fatalf("writing the dendrite config: %v", err)
		}
	} // else written by start, once the HTTPS port (maybe the server name) is known

	d := &Dendrite{
		serverName:   opts.ServerName,
		sharedSecret: opts.SharedSecret,
		dir:          dir,
		configPath:   configPath,
		logPath:      filepath.Join(dir, "dendrite.log"),
		client: &http.Client{
			Timeout:   30 * time.Second,
			Transport: &http.Transport{Proxy: nil},
		},
	}
	began := time.Now()
	for attempt := 1; ; attempt++ {
		err := d.start(t, dendriteBin, configPath, keyPath, opts)
		if err == nil {
			break
		}
		if errors.Is(err, errPortTaken) && attempt < startAttempts {
			t.Logf("dendrite: %v; retrying on another port", err)
			continue
		}
		t.Fatalf("starting dendrite: %v\n%s", err, d.logTail(60))
	}
	if d.fedURL != "" {
		t.Logf("dendrite %s serving %s at %s and %s, ready in %v", Version, d.serverName, d.url, d.fedURL, time.Since(began).Round(time.Millisecond))
		return d
	}
	t.Logf("dendrite %s serving %s at %s, ready in %v", Version, d.serverName, d.url, time.Since(began).Round(time.Millisecond))
	return d
}

// errPortTaken is a start that failed because its port was taken.
var errPortTaken = errors.New("http port taken")

// start runs one Dendrite process on a fresh port (two with federation) and
// waits for it. With federation it first writes the config, whose server
// name may depend on the HTTPS port. On success it registers the cleanup
// that stops it; on failure the process has exited.
func (d *Dendrite) start(t testing.TB, bin, configPath, keyPath string, opts Options) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	var fedArgs []string
	if f := opts.Federation; f != nil {
		httpsPort, err := freePort()
		if err != nil {
			return err
		}
		httpsAddr := fmt.Sprintf("127.0.0.1:%d", httpsPort)
		d.fedURL = "https://" + httpsAddr
		if opts.ServerName == "" {
			opts.ServerName = httpsAddr
		}
		d.serverName = opts.ServerName
		if err := os.WriteFile(configPath, []byte(configYAML(d.dir, keyPath, opts)), 0o600); err != nil {
			return fmt.Errorf("writing the config: %w", err)
		}
		fedArgs = []string{"-https-bind-address", httpsAddr, "-tls-cert", f.CertFile, "-tls-key", f.KeyFile}
	}
	logFile, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("opening the log file: %w", err)
	}
	// The process holds its own descriptor; ours is closed once it started.
	defer logFile.Close()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	d.url = "http://" + addr
	d.cmd = exec.Command(bin, append([]string{"-config", configPath, "-http-bind-address", addr}, fedArgs...)...)
	d.cmd.Dir = d.dir
	d.cmd.Env = append(os.Environ(), "HOME="+d.dir, "PPROFLISTEN=")
	if f := opts.Federation; f != nil && f.RootCAFile != "" {
		d.cmd.Env = append(d.cmd.Env, "SSL_CERT_FILE="+f.RootCAFile, "SSL_CERT_DIR=")
	}
	d.cmd.Stdout = logFile
	d.cmd.Stderr = logFile
	if err := d.cmd.Start(); err != nil {
		return fmt.Errorf("running %s: %w", bin, err)
	}
	d.exited = make(chan struct{})
	go func() {
		d.waitErr = d.cmd.Wait()
		close(d.exited)
	}()
	if err := d.waitReady(); err != nil {
		d.kill()
		if strings.Contains(d.logTail(20), "address already in use") {
			return fmt.Errorf("%w: %s %s: %w", errPortTaken, addr, d.fedURL, err)
		}
		return err
	}
	t.Cleanup(func() {
		if !d.stopped {
			d.stopped = true
			d.terminate(t)
		}
		if t.Failed() {
			t.Logf("dendrite log (%s, last lines):\n%s", d.logPath, d.logTail(100))
		}
	})
	return nil
}

// waitReady polls GET /_matrix/client/versions until it answers 200, and
// with federation then GET /_matrix/key/v2/server on the HTTPS listener
// (whose certificate is not checked here: only its readiness is).
func (d *Dendrite) waitReady() error {
	deadline := time.Now().Add(startTimeout)
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{
		Proxy:             nil,
		DisableKeepAlives: true,
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // readiness probe only
	}}
	urls := []string{d.url + "/_matrix/client/versions"}
	if d.fedURL != "" {
		urls = append(urls, d.fedURL+"/_matrix/key/v2/server")
	}
	for _, u := range urls {
		for {
			select {
			case <-d.exited:
				return fmt.Errorf("dendrite exited during startup: %v", d.waitErr)
			default:
			}
			resp, err := client.Get(u)
			if err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				_ = resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("GET %s did not answer 200 within %v (last error: %v)", u, startTimeout, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

// kill ends the process at once and waits for it.
func (d *Dendrite) kill() {
	_ = d.cmd.Process.Kill()
	<-d.exited
}

// Stop ends Dendrite now (SIGTERM, then a kill after stopTimeout) and waits
// for it, so that the test can read its databases and media files at rest.
// Its files stay until the test ends. A second Stop does nothing; the
// test's cleanup no longer stops it.
func (d *Dendrite) Stop(t testing.TB) {
	t.Helper()
	if d.stopped {
		return
	}
	d.stopped = true
	d.terminate(t)
}

// terminate sends SIGTERM, waits up to stopTimeout, then kills. It reports
// a process that exited before it was asked to.
func (d *Dendrite) terminate(t testing.TB) {
	select {
	case <-d.exited:
		t.Errorf("dendrite exited before it was stopped: %v", d.waitErr)
	default:
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.exited:
		case <-time.After(stopTimeout):
			t.Logf("dendrite did not exit within %v of SIGTERM; killing it", stopTimeout)
			d.kill()
		}
	}
}

// logTail returns the last n lines of the log file.
func (d *Dendrite) logTail(n int) string {
	b, err := os.ReadFile(d.logPath)
	if err != nil {
		return fmt.Sprintf("(reading the dendrite log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// URL is the base URL of the client API, http://127.0.0.1:port.
func (d *Dendrite) URL() string { return d.url }

// HostPort is the client API's address, 127.0.0.1:port.
func (d *Dendrite) HostPort() string { return strings.TrimPrefix(d.url, "http://") }

// FederationURL is the base URL of the HTTPS listener serving the
// federation (and client) APIs, https://127.0.0.1:port; "" when federation
// is off.
func (d *Dendrite) FederationURL() string { return d.fedURL }

// ServerName is the homeserver's server name.
func (d *Dendrite) ServerName() string { return d.serverName }

// LogPath is the path of the file holding Dendrite's output.
func (d *Dendrite) LogPath() string { return d.logPath }

// ConfigPath is the path of the dendrite.yaml Dendrite runs with. Its
// relative paths are none: every path in it is absolute.
func (d *Dendrite) ConfigPath() string { return d.configPath }

// MediaPath is the media API's base_path, where Dendrite keeps uploaded and
// cached media files.
func (d *Dendrite) MediaPath() string { return filepath.Join(d.dir, "media") }

// CreateUser registers an account through the shared secret admin API
// (/_synapse/admin/v1/register) and returns its user ID. Dendrite wants
// passwords of at least 8 characters. It fails the test on error.
func (d *Dendrite) CreateUser(t testing.TB, localpart, password string, admin bool) string {
	t.Helper()
	userID, err := d.createUser(context.Background(), localpart, password, admin)
	if err != nil {
		t.Fatalf("creating dendrite user %q: %v", localpart, err)
	}
	return userID
}

func (d *Dendrite) createUser(ctx context.Context, localpart, password string, admin bool) (string, error) {
	registerURL := d.url + "/_synapse/admin/v1/register"
	var nonce struct {
		Nonce string `json:"nonce"`
	}
	if err := d.doJSON(ctx, http.MethodGet, registerURL, nil, &nonce); err != nil {
		return "", fmt.Errorf("getting a registration nonce: %w", err)
	}
	kind := "notadmin"
	if admin {
		kind = "admin"
	}
	mac := hmac.New(sha1.New, []byte(d.sharedSecret))
	mac.Write([]byte(strings.Join([]string{nonce.Nonce, localpart, password, kind}, "\x00")))
	req := map[string]any{
		"nonce":    nonce.Nonce,
		"username": localpart,
		"password": password,
		"admin":    admin,
		"mac":      hex.EncodeToString(mac.Sum(nil)),
	}
	var resp struct {
		UserID string `json:"user_id"`
	}
	if err := d.doJSON(ctx, http.MethodPost, registerURL, req, &resp); err != nil {
		return "", fmt.Errorf("registering: %w", err)
	}
	if resp.UserID == "" {
		return "", errors.New("registering: the response has no user_id")
	}
	return resp.UserID, nil
}

// Login logs localpart in with its password (m.login.password) and returns
// the new access token. It fails the test on error.
func (d *Dendrite) Login(t testing.TB, localpart, password string) string {
	t.Helper()
	req := map[string]any{
		"type":       "m.login.password",
		"identifier": map[string]string{"type": "m.id.user", "user": localpart},
		"password":   password,
	}
	var resp struct {
		AccessToken string `json:"access_token"`
	}
	if err := d.doJSON(context.Background(), http.MethodPost, d.url+"/_matrix/client/v3/login", req, &resp); err != nil {
		t.Fatalf("logging %q in to dendrite: %v", localpart, err)
	}
	if resp.AccessToken == "" {
		t.Fatalf("logging %q in to dendrite: the response has no access_token", localpart)
	}
	return resp.AccessToken
}

// UploadMedia uploads body through Dendrite's own media API (POST
// /_matrix/media/v3/upload) with the access token, the file name (omitted
// when empty) and the content type (no header when empty), and returns the
// mxc:// URI Dendrite answers. It fails the test on error.
func (d *Dendrite) UploadMedia(t testing.TB, token, filename, contentType string, body []byte) string {
	t.Helper()
	u := d.url + "/_matrix/media/v3/upload"
	if filename != "" {
		u += "?filename=" + url.QueryEscape(filename)
	}
	req, err := http.NewRequest(http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		t.Fatalf("building the upload request: %v", err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := d.client.Do(req)
	if err != nil {
		t.Fatalf("uploading %q to dendrite: %v", filename, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading dendrite's upload response: %v", err)
	}
	var r struct {
		ContentURI string `json:"content_uri"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(data, &r) != nil || !strings.HasPrefix(r.ContentURI, "mxc://") {
		t.Fatalf("uploading %q to dendrite: %s: %s", filename, resp.Status, data)
	}
	return r.ContentURI
}

// doJSON sends body (if not nil) as JSON and decodes a 200 response into out.
func (d *Dendrite) doJSON(ctx context.Context, method, url string, body, out any) error {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("encoding the request: %w", err)
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, r)
	if err != nil {
		return fmt.Errorf("building the request: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return fmt.Errorf("doing %s %s: %w", method, url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("reading the response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s: %s", method, url, resp.Status, data)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decoding %q: %w", data, err)
	}
	return nil
}

// findBinary looks for name in PATH, then in $(go env GOBIN) and
// $(go env GOPATH)/bin. It fails the test with the install command when the
// binary is nowhere.
func findBinary(t testing.TB, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	var dirs []string
	if out, err := exec.Command("go", "env", "GOBIN", "GOPATH").Output(); err == nil {
		lines := strings.Split(string(out), "\n")
		if len(lines) > 0 && strings.TrimSpace(lines[0]) != "" {
			dirs = append(dirs, strings.TrimSpace(lines[0]))
		}
		if len(lines) > 1 && strings.TrimSpace(lines[1]) != "" {
			dirs = append(dirs, filepath.Join(filepath.SplitList(strings.TrimSpace(lines[1]))[0], "bin"))
		}
	}
	for _, dir := range dirs {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	t.Fatalf("the Dendrite binary %q is not in PATH nor in %v; install Dendrite %s with:\n\tCGO_ENABLED=1 %s",
		name, dirs, Version, InstallCommand)
	return ""
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("finding a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// randomHex returns n random bytes, hex-encoded.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails
	return hex.EncodeToString(b)
}

// configYAML renders the Dendrite configuration: SQLite files in dir (or
// the one PostgreSQL database of Options.Database), nothing
// that reaches beyond loopback, closed registration with a shared secret, no
// rate limits. Logging goes to stderr only (captured into the log file).
// Options.Federation turns federation on; Options.Metrics the metrics.
func configYAML(dir, keyPath string, opts Options) string {
	db := func(name string) string { return fmt.Sprintf("%q", "file:"+filepath.Join(dir, name+".db")) }
	globalDB := ""
	if opts.Database != "" {
		// Every component's empty connection string falls back to the
		// global one.
		db = func(string) string { return `""` }
		globalDB = fmt.Sprintf("  database:\n    connection_string: %q\n    max_open_conns: 20\n    max_idle_conns: 2\n", opts.Database)
	}
	keyValidity := "168h0m0s"
	disableFederation, disableTLSValidation := true, false
	if f := opts.Federation; f != nil {
		keyValidity = f.KeyValidityPeriod.String()
		disableFederation, disableTLSValidation = false, f.DisableTLSValidation
	}
	return fmt.Sprintf(`version: 2
global:
  server_name: %[1]q
  private_key: %[2]q
  key_validity_period: %[14]s
  disable_federation: %[15]t
  presence:
    enable_inbound: false
    enable_outbound: false
  trusted_third_party_id_servers: []
  jetstream:
    storage_path: %[3]q
    in_memory: true
    topic_prefix: Dendrite
  metrics:
    enabled: %[17]t
  sentry:
    enabled: false
  dns_cache:
    enabled: false
  server_notices:
    enabled: false
  report_stats:
    enabled: false
  cache:
    max_size_estimated: 64mb
    max_age: 1h
%[18]sapp_service_api:
  config_files: []
client_api:
  registration_disabled: true
  registration_shared_secret: %[4]q
  guests_disabled: true
  enable_registration_captcha: false
  turn:
    turn_uris: []
  rate_limiting:
    enabled: false
federation_api:
  database:
    connection_string: %[5]s
  key_perspectives: []
  send_max_retries: 1
  disable_tls_validation: %[16]t
key_server:
  database:
    connection_string: %[6]s
media_api:
  database:
    connection_string: %[7]s
  base_path: %[8]q
  max_file_size_bytes: 10485760
  dynamic_thumbnails: false
room_server:
  database:
    connection_string: %[9]s
sync_api:
  database:
    connection_string: %[10]s
  search:
    enabled: false
user_api:
  bcrypt_cost: 4
  account_database:
    connection_string: %[11]s
relay_api:
  database:
    connection_string: %[12]s
mscs:
  mscs: []
  database:
    connection_string: %[13]s
tracing:
  enabled: false
logging: []
`,
		opts.ServerName, keyPath, filepath.Join(dir, "jetstream"), opts.SharedSecret,
		db("federationapi"), db("keyserver"), db("mediaapi"), filepath.Join(dir, "media"),
		db("roomserver"), db("syncapi"), db("userapi"), db("relayapi"), db("mscs"),
		keyValidity, disableFederation, disableTLSValidation, opts.Metrics, globalDB)
}
