package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestEarlyRefusalsThroughCaddy checks, on the xcaddy-built Caddy, that
// uploads refused from their headers (over the size limit, no or unknown
// token) are answered at once while the client has sent only the headers,
// with and without Expect: 100-continue. (Caddy wraps the request body,
// which takes away net/http's own shortcut for large unread bodies: without
// Connection: close the server would first wait for 256 KiB of body.)
func TestEarlyRefusalsThroughCaddy(t *testing.T) {
	hs := newHomeserver(t, testTokens)
	cfg := newConfig(t, hs, site{serverName: "a.test", maxUploadSize: "1MiB"})
	inst := startCaddy(t, cfg)
	addr := fmt.Sprintf("127.0.0.1:%d", cfg.httpPort)
	host := fmt.Sprintf("a.test:%d", cfg.httpPort)
	tests := []struct {
		name, token string
		length      int64
		status      int
		code        string
	}{
		{"over the limit", "token-alice", 1<<20 + 1, 413, "M_TOO_LARGE"},
		{"far over the limit", "token-alice", 1 << 30, 413, "M_TOO_LARGE"},
		{"no token", "", 100000, 401, "M_MISSING_TOKEN"},
		{"unknown token", "token-nobody", 100000, 401, "M_UNKNOWN_TOKEN"},
	}
	for _, tc := range tests {
		for _, expect := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/expect=%v", tc.name, expect), func(t *testing.T) {
				conn, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				var b strings.Builder
				fmt.Fprintf(&b, "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: %s\r\nContent-Type: image/png\r\nContent-Length: %d\r\n", host, tc.length)
				if tc.token != "" {
					fmt.Fprintf(&b, "Authorization: Bearer %s\r\n", tc.token)
				}
				if expect {
					b.WriteString("Expect: 100-continue\r\n")
				}
				b.WriteString("\r\n")
				if _, err := io.WriteString(conn, b.String()); err != nil {
					t.Fatal(err)
				}
				// Only a bound for a broken server: the body never comes.
				_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
				resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
				if err != nil {
					t.Fatalf("no response while only the headers were sent: %v\n%s", err, lastLines([]byte(inst.logs.String()), 20))
				}
				defer resp.Body.Close()
				if resp.StatusCode == http.StatusContinue {
					t.Fatal("100 Continue for a request refused from its headers")
				}
				var body struct {
					ErrCode string `json:"errcode"`
				}
				if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != tc.status || body.ErrCode != tc.code || !resp.Close {
					t.Fatalf("%d %s (close %v), want %d %s with Connection: close", resp.StatusCode, body.ErrCode, resp.Close, tc.status, tc.code)
				}
			})
		}
	}
}
