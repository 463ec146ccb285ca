// Command hs is the stand-in homeserver behind one federating site of the
// federation benchmark (bench/run-federation.sh). On a 127.0.0.1 port it
// answers:
//
//   - GET /_matrix/client/v3/account/whoami: any bearer token is the user
//     given with -user (401 M_MISSING_TOKEN without one);
//   - GET /_matrix/key/v2/server: the site's server keys, the public half of
//     the first key of -key (a Synapse or Dendrite key file, as written by
//     "caddy matrix-media generate-key"), signed with it as -server-name.
//
// It prints "ready <addr>" on standard output once it listens and serves
// until it is interrupted or terminated.
//
// Usage:
//
//	hs -port 8008 -server-name 127.0.0.1:8443 -key signing.key -user @bench:a
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 to listen on (default 0: any free port, printed with ready)")
	serverName := flag.String("server-name", "", "Matrix server name of the site (required), e.g. 127.0.0.1:8443")
	keyFile := flag.String("key", "", "signing key file of the site (required)")
	user := flag.String("user", "@bench:localhost", "user ID whoami answers for every token")
	flag.Parse()
	if err := run(*port, *serverName, *keyFile, *user); err != nil {
		fmt.Fprintln(os.Stderr, "hs:", err)
		os.Exit(1)
	}
}

// run serves the stand-in homeserver on 127.0.0.1:port until SIGINT or
// SIGTERM.
func run(port int, serverName, keyFile, user string) error {
	if serverName == "" || keyFile == "" {
		return errors.New("-server-name and -key are required")
	}
	keys, err := xmatrix.LoadSigningKeys(keyFile)
	if err != nil {
		return fmt.Errorf("loading the signing key: %w", err)
	}
	if len(keys) == 0 {
		return fmt.Errorf("loading the signing key: %s holds no key", keyFile)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	srv := &http.Server{Handler: newMux(serverName, keys[0], user), ReadHeaderTimeout: 10 * time.Second}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	fmt.Println("ready", ln.Addr().String())

	select {
	case err := <-errc:
		return fmt.Errorf("serving: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("shutting down: %w", err)
	}
	return nil
}

// newMux routes whoami and the server keys endpoint.
func newMux(serverName string, key xmatrix.SigningKey, user string) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /_matrix/client/v3/account/whoami", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); !ok || token == "" {
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errcode":"M_MISSING_TOKEN","error":"Missing access token"}`)
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"user_id": user, "device_id": "BENCH"})
	})
	mux.HandleFunc("GET /_matrix/key/v2/server", func(w http.ResponseWriter, r *http.Request) {
		obj := map[string]any{
			"server_name":     serverName,
			"valid_until_ts":  time.Now().Add(time.Hour).UnixMilli(),
			"verify_keys":     map[string]any{key.ID: map[string]any{"key": key.PublicBase64()}},
			"old_verify_keys": map[string]any{},
		}
		if err := xmatrix.SignJSON(obj, serverName, key); err != nil {
			http.Error(w, fmt.Sprintf("signing the server keys: %v", err), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(obj)
	})
	return mux
}
