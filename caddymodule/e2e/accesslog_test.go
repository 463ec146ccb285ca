package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAccessLogKeepsTokensOut runs the access-log configuration of the
// README's operator notes ("Access tokens in URLs and access logs") and
// checks that a token sent as ?access_token= reaches neither the access log
// nor Caddy's own output, while the control (the same requests on a site
// without the filter) shows that the token would be there otherwise.
func TestAccessLogKeepsTokensOut(t *testing.T) {
	const token = "token-alice"
	hs := newHomeserver(t, testTokens)
	cfg := newConfig(t, hs)
	filtered := filepath.Join(cfg.dataDir, "filtered.log")
	plain := filepath.Join(cfg.dataDir, "plain.log")
	site := func(name, logFile, format string) string {
		return fmt.Sprintf(`
http://%[1]s:%[2]d {
	log {
		output file %[3]s
		%[4]s
	}
	matrix_media {
		server_name %[1]s
		homeserver %[5]s
	}
	reverse_proxy %[6]s
}
`, name, cfg.httpPort, logFile, format, hs.srv.URL, hs.hostPort())
	}
	cfg.text = fmt.Sprintf(`(matrix_logs) {
	format filter {
		request>uri query {
			delete access_token
		}
		wrap json
	}
}

{
	admin 127.0.0.1:%d
	default_bind 127.0.0.1
	auto_https off
	persist_config off
	skip_install_trust
	http_port %d
	log default {
		import matrix_logs
	}
	matrix_media {
		database %s
		storage_path %s
	}
}
`, cfg.adminPort, cfg.httpPort, cfg.database, cfg.storagePath) +
		site("a.test", filtered, "import matrix_logs") +
		site("b.test", plain, "format json")
	inst := startCaddy(t, cfg)

	for _, host := range []string{"a.test", "b.test"} {
		base := fmt.Sprintf("http://127.0.0.1:%d", cfg.httpPort)
		req, err := http.NewRequest(http.MethodPost, base+"/_matrix/media/v3/upload?filename=x.txt&access_token="+token, strings.NewReader("logged "+host))
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		req.Header.Set("Content-Type", "text/plain")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: upload with ?access_token: %d %s", host, resp.StatusCode, body)
		}
		var up struct {
			ContentURI string `json:"content_uri"`
		}
		if err := json.Unmarshal(body, &up); err != nil || !strings.HasPrefix(up.ContentURI, "mxc://"+host+"/") {
			t.Fatalf("%s: upload answer %s (%v)", host, body, err)
		}
		id := strings.TrimPrefix(up.ContentURI, "mxc://"+host+"/")
		req, _ = http.NewRequest(http.MethodGet, base+"/_matrix/client/v1/media/download/"+host+"/"+id+"?access_token="+token, nil)
		req.Host = host
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ = io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(body) != "logged "+host {
			t.Fatalf("%s: authenticated download with ?access_token: %d %q", host, resp.StatusCode, body)
		}
	}
	inst.stop() // flushes and closes the log files

	read := func(p string) []byte {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	filteredLog, plainLog := read(filtered), read(plain)
	if !bytes.Contains(filteredLog, []byte("/_matrix/media/v3/upload?filename=x.txt")) ||
		!bytes.Contains(filteredLog, []byte("/_matrix/client/v1/media/download/a.test/")) {
		t.Fatalf("filtered access log lacks the requests:\n%s", filteredLog)
	}
	if bytes.Contains(filteredLog, []byte(token)) {
		t.Errorf("filtered access log contains the access token:\n%s", filteredLog)
	}
	if strings.Contains(inst.logs.String(), token) {
		t.Errorf("caddy's own output contains the access token:\n%s", lastLines([]byte(inst.logs.String()), 40))
	}
	// The control: without the filter the token is logged, which is what
	// the README warns about.
	if !bytes.Contains(plainLog, []byte("access_token="+token)) {
		t.Errorf("unfiltered access log does not show the token; the control proves nothing:\n%s", plainLog)
	}
}
