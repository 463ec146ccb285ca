package federation

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// serveKeys answers /_matrix/key/v2/server for serverName with key, signed
// by signer.
func serveKeys(t *testing.T, serverName string, key, signer xmatrix.SigningKey) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/_matrix/key/v2/server" {
			http.NotFound(w, r)
			return
		}
		obj := map[string]any{
			"server_name":     serverName,
			"valid_until_ts":  time.Now().Add(time.Hour).UnixMilli(),
			"verify_keys":     map[string]any{key.ID: map[string]any{"key": key.PublicBase64()}},
			"old_verify_keys": map[string]any{},
		}
		if err := xmatrix.SignJSON(obj, serverName, signer); err != nil {
			t.Error(err)
		}
		_ = json.NewEncoder(w).Encode(obj)
	}
}

func TestFetchKeys(t *testing.T) {
	f := newFakeRemote(t, nil)
	f.setHandler(serveKeys(t, f.name, testKey, testKey))
	c := newTestMediaClient(t, f, nil)
	keys, err := c.FetchKeys(context.Background(), f.name, []string{testKey.ID})
	if err != nil {
		t.Fatal(err)
	}
	if k, ok := keys[testKey.ID]; !ok || !k.Public.Equal(testKey.Public()) {
		t.Fatalf("keys %v", keys)
	}
	if r := f.requests(); len(r) != 1 || r[0].auth != "" || r[0].host != f.name {
		t.Fatalf("requests %+v", r)
	}

	// A verifier built on it accepts a request signed by that server.
	v, err := xmatrix.NewVerifier(xmatrix.VerifierOptions{Names: []string{"us.test"}, Fetcher: c})
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", "https://us.test/_matrix/federation/v1/media/download/x", nil)
	h, _ := xmatrix.SignRequest("GET", "/_matrix/federation/v1/media/download/x", f.name, "us.test", nil, testKey)
	req.Header.Set("Authorization", h)
	if origin, err := v.Verify(context.Background(), req, "/_matrix/federation/v1/media/download/x", nil); err != nil || origin != f.name {
		t.Fatalf("verify: %q %v", origin, err)
	}

	// Keys signed by someone else, or for another server name, are refused.
	other, _ := xmatrix.GenerateSigningKey(rand.Reader)
	f.setHandler(serveKeys(t, f.name, testKey, other))
	if _, err := c.FetchKeys(context.Background(), f.name, nil); err == nil {
		t.Fatal("keys with a foreign signature accepted")
	}
	f.setHandler(serveKeys(t, "impostor.test", testKey, testKey))
	if _, err := c.FetchKeys(context.Background(), f.name, nil); err == nil {
		t.Fatal("keys of another server name accepted")
	}
	f.setHandler(serveError(500, "oops"))
	if _, err := c.FetchKeys(context.Background(), f.name, nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("500: %v", err)
	}
}
