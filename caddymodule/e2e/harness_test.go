// Package e2e tests the real thing: a Caddy binary built with xcaddy from this
// repository, configured with a Caddyfile of two Matrix media sites in front
// of a fake homeserver, driven over loopback HTTP. It holds tests only.
//
// The binary is built once per test binary (the first build of a machine takes
// minutes; later ones reuse Go's build cache). When the tests run with -race,
// Caddy is built with the race detector too, and any race it reports fails
// the test that ran it. A build that fails fails the tests: they never skip
// for a missing toolchain, only under -short.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

const (
	modulePath   = "github.com/caddy-matrix-media/caddy-matrix-media"
	caddyVersion = "v2.11.9"
	// envLogDir names a directory where the full output of a Caddy whose
	// test failed is written (only the last lines go to the test log).
	envLogDir = "MATRIX_MEDIA_E2E_LOG_DIR"
)

// buildDir holds the built binary; TestMain removes it.
var buildDir string

func TestMain(m *testing.M) {
	code := m.Run()
	if err := testpg.Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "stopping postgres: %v\n", err)
	}
	if buildDir != "" {
		_ = os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// built is the result of the one xcaddy build of this test binary.
var built struct {
	once sync.Once
	path string
	err  error
}

// caddyBinary returns the path of Caddy built with this module, building it
// on first use. It fails the test if the build fails.
func caddyBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test with an xcaddy build; skipped under -short")
	}
	built.once.Do(func() { built.path, built.err = buildCaddy() })
	if built.err != nil {
		t.Fatalf("building caddy with xcaddy: %v", built.err)
	}
	return built.path
}

// buildCaddy runs xcaddy build for this repository into a temp directory.
func buildCaddy() (string, error) {
	xcaddy, err := findXcaddy()
	if err != nil {
		return "", err
	}
	root, err := repoRoot()
	if err != nil {
		return "", err
	}
	buildDir, err = os.MkdirTemp("", "matrix-media-e2e-")
	if err != nil {
		return "", fmt.Errorf("creating build dir: %w", err)
	}
	out := filepath.Join(buildDir, "caddy")
	cmd := exec.Command(xcaddy, "build", caddyVersion,
		"--with", modulePath+"@v0.0.0="+root,
		"--output", out)
	cmd.Dir = buildDir
	// xcaddy disables cgo unless CGO_ENABLED is exactly 1; SQLite needs it.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if raceEnabled {
		cmd.Env = append(cmd.Env, "XCADDY_RACE_DETECTOR=1")
	}
	// xcaddy builds with -trimpath unless build flags are given; -trimpath
	// changes every package's build ID, so nothing that "go test" already
	// compiled (Caddy's core, this module's dependencies) would be reused
	// from Go's build cache. Same flags as go test, minus debug symbols,
	// plus the tags xcaddy sets by default (they leave unused database
	// drivers out of Caddy's PKI storage).
	cmd.Env = append(cmd.Env, "XCADDY_GO_BUILD_FLAGS=-ldflags='-w -s' -tags=nobadger,nomysql,nopgx")
	logs, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s: %w\n%s", strings.Join(cmd.Args, " "), err, lastLines(logs, 40))
	}
	return out, nil
}

// findXcaddy looks for xcaddy in PATH, then in Go's install directory.
func findXcaddy() (string, error) {
	if p, err := exec.LookPath("xcaddy"); err == nil {
		return p, nil
	}
	for _, v := range []string{"GOBIN", "GOPATH"} {
		out, err := exec.Command("go", "env", v).Output()
		if err != nil {
			continue
		}
		dir := strings.TrimSpace(string(out))
		if dir == "" {
			continue
		}
		if v == "GOPATH" {
			dir = filepath.Join(filepath.SplitList(dir)[0], "bin")
		}
		p := filepath.Join(dir, "xcaddy")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("xcaddy not found in PATH nor in $(go env GOBIN) or $(go env GOPATH)/bin; run ./xcaddy.sh deps")
}

// repoRoot returns the repository root (two levels above this package), after
// checking that it holds this module.
func repoRoot() (string, error) {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		return "", fmt.Errorf("resolving repository root: %w", err)
	}
	gomod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		return "", fmt.Errorf("reading go.mod: %w", err)
	}
	if !bytes.Contains(gomod, []byte("module "+modulePath+"\n")) {
		return "", fmt.Errorf("%s/go.mod is not module %s", root, modulePath)
	}
	return root, nil
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// homeserver is a fake Matrix homeserver: whoami for known tokens, and a
// versions endpoint that proves a request reached it through reverse_proxy.
type homeserver struct {
	srv     *httptest.Server
	mu      sync.Mutex
	tokens  map[string]string // access token -> user ID
	whoamis atomic.Int64
}

// hsMarker is a response header only the fake homeserver sets.
const hsMarker = "X-Fake-Homeserver"

func newHomeserver(t *testing.T, tokens map[string]string) *homeserver {
	t.Helper()
	hs := &homeserver{tokens: tokens}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /_matrix/client/v3/account/whoami", func(w http.ResponseWriter, r *http.Request) {
		hs.whoamis.Add(1)
		token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		hs.mu.Lock()
		user, known := hs.tokens[token]
		hs.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if !ok || !known {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown access token"}`)
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"user_id": user, "device_id": "E2EDEVICE"})
	})
	mux.HandleFunc("POST /_matrix/client/v3/logout", func(w http.ResponseWriter, r *http.Request) {
		token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		hs.mu.Lock()
		_, known := hs.tokens[token]
		delete(hs.tokens, token)
		hs.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set(hsMarker, "1")
		if !known {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown access token"}`)
			return
		}
		_, _ = io.WriteString(w, `{}`)
	})
	mux.HandleFunc("/_matrix/client/versions", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(hsMarker, "1")
		w.Header().Set("Content-Type", "application/json")
		_, _ = fmt.Fprintf(w, `{"versions":["v1.11"],"host":%q}`, r.Host)
	})
	hs.srv = httptest.NewServer(mux)
	t.Cleanup(hs.srv.Close)
	return hs
}

// hostPort is the homeserver's 127.0.0.1:port.
func (hs *homeserver) hostPort() string { return strings.TrimPrefix(hs.srv.URL, "http://") }

// site is one site block of the test Caddyfile.
type site struct {
	serverName    string
	maxUploadSize string // Caddyfile size; empty for the app default
	// extra are extra lines of the site's matrix_media block.
	extra []string
}

// config is what a test Caddyfile is generated from.
type config struct {
	adminPort int
	httpPort  int
	dataDir   string
	// database is the matrix_media "database" line arguments, e.g.
	// "sqlite /x/media.db" or "postgres {env.E2E_DSN}".
	database    string
	storagePath string
	// noStoragePath leaves the storage_path line out of the Caddyfile, for
	// configs that declare datastores in appExtra (the two cannot be
	// combined). storagePath is then unused by Caddy.
	noStoragePath bool
	// maxUploadSize is the app's (global) max_upload_size.
	maxUploadSize string
	// appExtra are extra lines of the matrix_media global option.
	appExtra   []string
	homeserver *homeserver
	sites      []site
	// text, when not empty, is the whole Caddyfile, used as is instead of
	// one rendered from the fields above (adminPort, httpPort and dataDir
	// must still be set: startCaddy waits for an answer on the admin port
	// and a listener on httpPort).
	text string
}

// caddyfile renders the configuration.
func (c config) caddyfile() string {
	if c.text != "" {
		return c.text
	}
	var b strings.Builder
	storageLine := "storage_path " + c.storagePath
	if c.noStoragePath {
		storageLine = ""
	}
	fmt.Fprintf(&b, `{
	admin 127.0.0.1:%d
	default_bind 127.0.0.1
	auto_https off
	persist_config off
	skip_install_trust
	http_port %d
	https_port %d
	matrix_media {
		database %s
		%s
		max_upload_size %s
		%s
	}
}
`, c.adminPort, c.httpPort, c.httpPort+1, c.database, storageLine, c.maxUploadSize, strings.Join(c.appExtra, "\n\t\t"))
	for _, s := range c.sites {
		fmt.Fprintf(&b, `
http://%s:%d {
	matrix_media {
		server_name %s
		homeserver %s
`, s.serverName, c.httpPort, s.serverName, c.homeserver.srv.URL)
		if s.maxUploadSize != "" {
			fmt.Fprintf(&b, "\t\tmax_upload_size %s\n", s.maxUploadSize)
		}
		for _, l := range s.extra {
			fmt.Fprintf(&b, "\t\t%s\n", l)
		}
		fmt.Fprintf(&b, `	}
	reverse_proxy %s
}
`, c.homeserver.hostPort())
	}
	return b.String()
}

// instance is a running Caddy process.
type instance struct {
	t      *testing.T
	cfg    config
	cmd    *exec.Cmd
	logs   *syncBuffer
	exited chan struct{}
	// waitErr is the process's exit status, valid once exited is closed.
	waitErr error
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a process's
// stdout and stderr and reads by the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// newConfig returns a config with fresh ports and directories under
// t.TempDir(), using SQLite.
func newConfig(t *testing.T, hs *homeserver, sites ...site) config {
	dir := t.TempDir()
	return config{
		adminPort:     freePort(t),
		httpPort:      freePort(t),
		dataDir:       dir,
		database:      "sqlite " + filepath.Join(dir, "media.db"),
		storagePath:   filepath.Join(dir, "media"),
		maxUploadSize: "2MiB",
		homeserver:    hs,
		sites:         sites,
	}
}

// startCaddy writes the Caddyfile, starts Caddy on it and waits until it
// serves. extraEnv is added to Caddy's environment. The process is stopped
// gracefully when the test ends; a data race it reported fails the test.
func startCaddy(t *testing.T, cfg config, extraEnv ...string) *instance {
	t.Helper()
	inst := launchCaddy(t, cfg, extraEnv...)
	inst.waitReady()
	return inst
}

// launchCaddy is startCaddy without the wait: it returns once the process
// started, for tests that expect it to fail (see waitExit).
func launchCaddy(t *testing.T, cfg config, extraEnv ...string) *instance {
	t.Helper()
	bin := caddyBinary(t)
	path := filepath.Join(cfg.dataDir, "Caddyfile")
	if err := os.WriteFile(path, []byte(cfg.caddyfile()), 0o600); err != nil {
		t.Fatal(err)
	}
	inst := &instance{t: t, cfg: cfg, logs: new(syncBuffer), exited: make(chan struct{})}
	inst.cmd = exec.Command(bin, "run", "--config", path, "--adapter", "caddyfile")
	inst.cmd.Dir = cfg.dataDir
	inst.cmd.Env = append(os.Environ(),
		"XDG_DATA_HOME="+filepath.Join(cfg.dataDir, "xdg-data"),
		"XDG_CONFIG_HOME="+filepath.Join(cfg.dataDir, "xdg-config"),
		"HOME="+cfg.dataDir,
		// Make the race detector report, not exit, so the test reads it.
		"GORACE=halt_on_error=0",
	)
	inst.cmd.Env = append(inst.cmd.Env, extraEnv...)
	inst.cmd.Stdout = inst.logs
	inst.cmd.Stderr = inst.logs
	if err := inst.cmd.Start(); err != nil {
		t.Fatalf("starting caddy: %v", err)
	}
	go func() {
		inst.waitErr = inst.cmd.Wait()
		close(inst.exited)
	}()
	t.Cleanup(inst.stop)
	return inst
}

// waitExit waits up to timeout for the process to exit and reports whether
// it did.
func (inst *instance) waitExit(timeout time.Duration) bool {
	select {
	case <-inst.exited:
		return true
	case <-time.After(timeout):
		return false
	}
}

// waitReady polls the admin endpoint and the site port until both answer.
func (inst *instance) waitReady() {
	t := inst.t
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		select {
		case <-inst.exited:
			t.Fatalf("caddy exited during startup (%v):\n%s", inst.waitErr, lastLines([]byte(inst.logs.String()), 60))
		default:
		}
		if inst.serving() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy not ready after 2 minutes:\n%s", lastLines([]byte(inst.logs.String()), 60))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// serving reports whether Caddy answers on its admin endpoint and accepts
// connections on its HTTP port.
func (inst *instance) serving() bool {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/config/", inst.cfg.adminPort))
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", inst.cfg.httpPort))
	if err != nil {
		return false
	}
	_ = conn.Close()
	return resp.StatusCode == http.StatusOK
}

// stop interrupts Caddy, waits for it to exit and checks its output.
func (inst *instance) stop() {
	t := inst.t
	select {
	case <-inst.exited:
	default:
		_ = inst.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-inst.exited:
		case <-time.After(time.Minute):
			_ = inst.cmd.Process.Kill()
			<-inst.exited
			t.Errorf("caddy did not exit within a minute of SIGINT")
		}
	}
	logs := inst.logs.String()
	if strings.Contains(logs, "WARNING: DATA RACE") {
		t.Errorf("caddy reported a data race:\n%s", logs)
	}
	if strings.Contains(logs, "panic:") || strings.Contains(logs, "\"panic\"") {
		t.Errorf("caddy logged a panic:\n%s", lastLines([]byte(logs), 80))
	}
	if t.Failed() {
		t.Logf("caddy output (last lines):\n%s", lastLines([]byte(logs), 80))
		if dir := os.Getenv(envLogDir); dir != "" {
			name := filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "_")+".caddy.log")
			if err := os.WriteFile(name, []byte(logs), 0o644); err != nil {
				t.Logf("writing caddy output: %v", err)
			} else {
				t.Logf("full caddy output: %s", name)
			}
		}
	}
}

// reload loads cfg into the running Caddy through the admin API, forcing a
// reload even when the config is unchanged. cfg must keep the instance's
// ports (inst.cfg is not changed, so that clients may read it meanwhile).
func (inst *instance) reload(cfg config) error {
	req, err := http.NewRequest(http.MethodPost,
		fmt.Sprintf("http://127.0.0.1:%d/load", inst.cfg.adminPort), strings.NewReader(cfg.caddyfile()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	// What "caddy reload --force" sends: reload even an identical config.
	req.Header.Set("Cache-Control", "must-revalidate")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	if err != nil {
		return fmt.Errorf("posting /load: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("posting /load: %s: %s", resp.Status, body)
	}
	return nil
}

// countBlobs counts the content files under the storage path's blob tree.
func countBlobs(t *testing.T, storagePath string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(filepath.Join(storagePath, "blobs"), func(_ string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			n++
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walking blob store: %v", err)
	}
	return n
}
