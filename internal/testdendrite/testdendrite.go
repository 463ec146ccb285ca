// Package testdendrite runs a real Matrix homeserver, Dendrite v0.13.8, for
// tests: one throwaway process per call to Start, with SQLite databases and
// an in-memory JetStream in the test's temporary directory, serving the
// client API over plain HTTP on a free loopback port.
//
// Everything that would reach beyond loopback is off: federation, presence,
// identity servers, TURN, Sentry, stats reporting, DNS caching and key
// perspectives. Registration is closed; accounts are made with the shared
// secret admin API (CreateUser). Rate limiting is off.
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
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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

// InstallCommand installs the Dendrite binaries this package runs (and the
// companion tools) into $(go env GOPATH)/bin. It needs cgo (SQLite).
const InstallCommand = "go install github.com/matrix-org/dendrite/cmd/{dendrite,generate-keys,generate-config,create-account}@" + Version

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
	// user IDs. Default "localhost".
	ServerName string
	// SharedSecret is client_api.registration_shared_secret, used by
	// CreateUser. Default: 32 random bytes, hex-encoded.
	SharedSecret string
}

// Dendrite is a running Dendrite process. It is stopped when the test that
// started it ends.
type Dendrite struct {
	url          string
	serverName   string
	sharedSecret string
	dir          string
	logPath      string
	client       *http.Client

	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error // valid once exited is closed
}

// Start runs Dendrite for the test and waits until its client API answers.
// It fails the test when the binaries are missing or Dendrite does not come
// up; the log file is printed when the test fails.
func Start(t testing.TB, opts Options) *Dendrite {
	t.Helper()
	if opts.ServerName == "" {
		opts.ServerName = "localhost"
	}
	if opts.SharedSecret == "" {
		opts.SharedSecret = randomHex(32)
	}
	dendriteBin := findBinary(t, "dendrite")
	keysBin := findBinary(t, "generate-keys")

	dir := t.TempDir()
	keyPath := filepath.Join(dir, "matrix_key.pem")
	if out, err := exec.Command(keysBin, "--private-key", keyPath).CombinedOutput(); err != nil {
		t.Fatalf("generating the dendrite signing key: %v\n%s", err, out)
	}
	configPath := filepath.Join(dir, "dendrite.yaml")
	if err := os.WriteFile(configPath, []byte(configYAML(dir, keyPath, opts)), 0o600); err != nil {
		t.Fatalf("writing the dendrite config: %v", err)
	}

	d := &Dendrite{
		serverName:   opts.ServerName,
		sharedSecret: opts.SharedSecret,
		dir:          dir,
		logPath:      filepath.Join(dir, "dendrite.log"),
		client: &http.Client{
			Timeout:   30 * time.Second,
			Transport: &http.Transport{Proxy: nil},
		},
	}
	began := time.Now()
	for attempt := 1; ; attempt++ {
		err := d.start(t, dendriteBin, configPath)
		if err == nil {
			break
		}
		if errors.Is(err, errPortTaken) && attempt < startAttempts {
			t.Logf("dendrite: %v; retrying on another port", err)
			continue
		}
		t.Fatalf("starting dendrite: %v\n%s", err, d.logTail(60))
	}
	t.Logf("dendrite %s serving %s at %s, ready in %v", Version, d.serverName, d.url, time.Since(began).Round(time.Millisecond))
	return d
}

// errPortTaken is a start that failed because its port was taken.
var errPortTaken = errors.New("http port taken")

// start runs one Dendrite process on a fresh port and waits for it. On
// success it registers the cleanup that stops it; on failure the process has
// exited.
func (d *Dendrite) start(t testing.TB, bin, configPath string) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	logFile, err := os.OpenFile(d.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("opening the log file: %w", err)
	}
	// The process holds its own descriptor; ours is closed once it started.
	defer logFile.Close()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	d.url = "http://" + addr
	d.cmd = exec.Command(bin, "-config", configPath, "-http-bind-address", addr)
	d.cmd.Dir = d.dir
	d.cmd.Env = append(os.Environ(), "HOME="+d.dir, "PPROFLISTEN=")
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
			return fmt.Errorf("%w: %s: %w", errPortTaken, addr, err)
		}
		return err
	}
	t.Cleanup(func() { d.stop(t) })
	return nil
}

// waitReady polls GET /_matrix/client/versions until it answers 200.
func (d *Dendrite) waitReady() error {
	deadline := time.Now().Add(startTimeout)
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	for {
		select {
		case <-d.exited:
			return fmt.Errorf("dendrite exited during startup: %v", d.waitErr)
		default:
		}
		resp, err := client.Get(d.url + "/_matrix/client/versions")
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("GET /_matrix/client/versions did not answer 200 within %v (last error: %v)", startTimeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kill ends the process at once and waits for it.
func (d *Dendrite) kill() {
	_ = d.cmd.Process.Kill()
	<-d.exited
}

// stop sends SIGTERM, waits up to stopTimeout, then kills. It reports a
// process that exited before the test ended, and prints the log of a failed
// test.
func (d *Dendrite) stop(t testing.TB) {
	select {
	case <-d.exited:
		t.Errorf("dendrite exited before the test ended: %v", d.waitErr)
	default:
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.exited:
		case <-time.After(stopTimeout):
			t.Logf("dendrite did not exit within %v of SIGTERM; killing it", stopTimeout)
			d.kill()
		}
	}
	if t.Failed() {
		t.Logf("dendrite log (%s, last lines):\n%s", d.logPath, d.logTail(100))
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

// ServerName is the homeserver's server name.
func (d *Dendrite) ServerName() string { return d.serverName }

// LogPath is the path of the file holding Dendrite's output.
func (d *Dendrite) LogPath() string { return d.logPath }

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

// configYAML renders the Dendrite configuration: SQLite files in dir, nothing
// that reaches beyond loopback, closed registration with a shared secret, no
// rate limits. Logging goes to stderr only (captured into the log file).
func configYAML(dir, keyPath string, opts Options) string {
	db := func(name string) string { return fmt.Sprintf("%q", "file:"+filepath.Join(dir, name+".db")) }
	return fmt.Sprintf(`version: 2
global:
  server_name: %[1]q
  private_key: %[2]q
  key_validity_period: 168h0m0s
  disable_federation: true
  presence:
    enable_inbound: false
    enable_outbound: false
  trusted_third_party_id_servers: []
  jetstream:
    storage_path: %[3]q
    in_memory: true
    topic_prefix: Dendrite
  metrics:
    enabled: false
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
app_service_api:
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
		db("roomserver"), db("syncapi"), db("userapi"), db("relayapi"), db("mscs"))
}
