package federation

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// keyQuery is a decoded /_matrix/key/v2/query body.
type keyQuery = map[string]map[string]map[string]map[string]int64

// notaryServer answers POST /_matrix/key/v2/query with a Server Keys object
// for originName listing originKey, self-signed by selfSigner and
// countersigned by notarySigner on behalf of notaryName. It records the
// decoded query bodies in queries.
type notaryServer struct {
	t                      *testing.T
	notaryName, originName string
	originKey              xmatrix.SigningKey
	notarySigner           xmatrix.SigningKey

	mu         sync.Mutex
	selfSigner xmatrix.SigningKey
	pad        int // bytes of padding added to the answer
	queries    []keyQuery
}

// set changes the self-signing key and the padding.
func (s *notaryServer) set(selfSigner xmatrix.SigningKey, pad int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.selfSigner, s.pad = selfSigner, pad
}

func (s *notaryServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/_matrix/key/v2/query" || r.Method != http.MethodPost {
		http.NotFound(w, r)
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		http.Error(w, "content type "+ct, http.StatusBadRequest)
		return
	}
	var q keyQuery
	if err := json.NewDecoder(r.Body).Decode(&q); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	s.queries = append(s.queries, q)
	selfSigner, pad := s.selfSigner, s.pad
	s.mu.Unlock()
	obj := map[string]any{
		"server_name":     s.originName,
		"valid_until_ts":  time.Now().Add(time.Hour).UnixMilli(),
		"verify_keys":     map[string]any{s.originKey.ID: map[string]any{"key": s.originKey.PublicBase64()}},
		"old_verify_keys": map[string]any{},
	}
	if err := xmatrix.SignJSON(obj, s.originName, selfSigner); err != nil {
		s.t.Error(err)
	}
	if err := xmatrix.SignJSON(obj, s.notaryName, s.notarySigner); err != nil {
		s.t.Error(err)
	}
	resp := map[string]any{"server_keys": []any{obj}}
	if pad > 0 {
		resp["padding"] = strings.Repeat("x", pad)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
}

func (s *notaryServer) seenQueries() []keyQuery {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]keyQuery(nil), s.queries...)
}

func TestNotaryFetcher(t *testing.T) {
	const origin = "remote.test"
	notaryKey, _ := xmatrix.GenerateSigningKey(rand.Reader)
	originKey, _ := xmatrix.GenerateSigningKey(rand.Reader)
	stranger, _ := xmatrix.GenerateSigningKey(rand.Reader)
	f := newFakeRemote(t, nil)
	ns := &notaryServer{t: t, notaryName: f.name, originName: origin, originKey: originKey, selfSigner: originKey, notarySigner: notaryKey}
	f.setHandler(ns.ServeHTTP)
	c := newTestMediaClient(t, f, nil)
	notary := xmatrix.Notary{ServerName: f.name, KeyID: notaryKey.ID, Public: notaryKey.Public()}

	before := time.Now()
	keys, err := c.NotaryFetcher(notary).FetchKeys(context.Background(), origin, []string{originKey.ID})
	if err != nil {
		t.Fatalf("FetchKeys: %v", err)
	}
	if k, ok := keys[originKey.ID]; !ok || len(keys) != 1 || !k.Public.Equal(originKey.Public()) || !k.ValidUntil.After(before) {
		t.Fatalf("keys %+v", keys)
	}
	if r := f.requests(); len(r) != 1 || r[0].host != f.name || r[0].auth != "" || r[0].sni != "" {
		t.Fatalf("requests %+v", r)
	}
	qs := ns.seenQueries()
	if len(qs) != 1 || len(qs[0]["server_keys"]) != 1 {
		t.Fatalf("queries %+v", qs)
	}
	crit, ok := qs[0]["server_keys"][origin][originKey.ID]
	if !ok || crit["minimum_valid_until_ts"] < before.UnixMilli() || crit["minimum_valid_until_ts"] > time.Now().UnixMilli() {
		t.Fatalf("query %+v", qs[0])
	}

	// No key IDs: all keys of the origin are asked for.
	if _, err := c.NotaryFetcher(notary).FetchKeys(context.Background(), origin, nil); err != nil {
		t.Fatal(err)
	}
	if qs := ns.seenQueries(); len(qs) != 2 || qs[1]["server_keys"][origin] == nil || len(qs[1]["server_keys"][origin]) != 0 {
		t.Fatalf("query without key IDs %+v", qs)
	}

	// Answers the notary did not sign with the configured key, or that the
	// origin did not sign, are refused.
	wrongKey := notary
	wrongKey.Public = stranger.Public()
	if _, err := c.NotaryFetcher(wrongKey).FetchKeys(context.Background(), origin, nil); !errors.Is(err, xmatrix.ErrBadSignature) {
		t.Fatalf("wrong notary key: %v", err)
	}
	ns.set(stranger, 0)
	if _, err := c.NotaryFetcher(notary).FetchKeys(context.Background(), origin, nil); !errors.Is(err, xmatrix.ErrBadSignature) {
		t.Fatalf("missing self-signature: %v", err)
	}
	ns.set(originKey, 0)

	// The notary speaks about remote.test: asking about another server
	// gives no keys.
	keys, err = c.NotaryFetcher(notary).FetchKeys(context.Background(), "other.test", nil)
	if err != nil || len(keys) != 0 {
		t.Fatalf("other server = %v, %v", keys, err)
	}

	// Oversized answers, errors and invalid names.
	ns.set(originKey, maxKeyResponse)
	if _, err := c.NotaryFetcher(notary).FetchKeys(context.Background(), origin, nil); err == nil || !strings.Contains(err.Error(), "bytes") {
		t.Fatalf("oversized answer: %v", err)
	}
	f.setHandler(serveError(500, "oops"))
	if _, err := c.NotaryFetcher(notary).FetchKeys(context.Background(), origin, nil); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("500: %v", err)
	}
	if _, err := c.NotaryFetcher(notary).FetchKeys(context.Background(), "bad name", nil); !errors.Is(err, ErrInvalidServerName) {
		t.Fatalf("invalid origin: %v", err)
	}
	if _, err := c.NotaryFetcher(xmatrix.Notary{ServerName: "", KeyID: notary.KeyID, Public: notary.Public}).FetchKeys(context.Background(), origin, nil); !errors.Is(err, ErrInvalidServerName) {
		t.Fatalf("invalid notary name: %v", err)
	}
}

// TestNotaryThenDirect chains a failing notary with the direct fetcher and
// verifies a request end to end.
func TestNotaryThenDirect(t *testing.T) {
	notaryKey, _ := xmatrix.GenerateSigningKey(rand.Reader)
	notaryRemote := newFakeRemote(t, serveError(502, "down"))
	origin := newFakeRemote(t, nil)
	origin.setHandler(serveKeys(t, origin.name, testKey, testKey))
	c := newTestMediaClient(t, notaryRemote, func(o *ClientOptions) {
		pool := x509.NewCertPool()
		pool.AddCert(notaryRemote.srv.Certificate())
		pool.AddCert(origin.srv.Certificate())
		o.TLSConfig = &tls.Config{RootCAs: pool}
	})
	notary := xmatrix.Notary{ServerName: notaryRemote.name, KeyID: notaryKey.ID, Public: notaryKey.Public()}
	v, err := xmatrix.NewVerifier(xmatrix.VerifierOptions{
		Names:   []string{"us.test"},
		Fetcher: &xmatrix.ChainFetcher{Fetchers: []xmatrix.KeyFetcher{c.NotaryFetcher(notary), c}},
	})
	if err != nil {
		t.Fatal(err)
	}
	const uri = "/_matrix/federation/v1/media/download/x"
	req, _ := http.NewRequest("GET", "https://us.test"+uri, nil)
	h, _ := xmatrix.SignRequest("GET", uri, origin.name, "us.test", nil, testKey)
	req.Header.Set("Authorization", h)
	if got, err := v.Verify(context.Background(), req, uri, nil); err != nil || got != origin.name {
		t.Fatalf("Verify = %q, %v", got, err)
	}
	if n, m := len(notaryRemote.requests()), len(origin.requests()); n != 1 || m != 1 {
		t.Fatalf("notary asked %d times, origin %d times; want 1 and 1", n, m)
	}
}
