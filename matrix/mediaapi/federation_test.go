package mediaapi

import (
	"context"
	"crypto/rand"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// staticKeys serves one remote server's key.
type staticKeys struct {
	origin string
	key    xmatrix.SigningKey
}

func (s staticKeys) FetchKeys(_ context.Context, origin string, _ []string) (map[string]xmatrix.ServerKey, error) {
	if origin != s.origin {
		return nil, nil
	}
	return map[string]xmatrix.ServerKey{s.key.ID: {Public: s.key.Public(), ValidUntil: time.Now().Add(time.Hour)}}, nil
}

// fedEnv is an env whose site serves federation media, with the signing key
// of a remote server "remote.test" that the verifier trusts.
func fedEnv(t *testing.T) (*env, xmatrix.SigningKey) {
	t.Helper()
	serve, key := servesFederation(t)
	g, err := newTestGenerator()
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, serve, func(_ *SiteConfig, o *RepositoryOptions) { o.Thumbnailer = g })
	return e, key
}

// servesFederation is an envOption that makes the site serve federation
// media to "remote.test", whose signing key it returns.
func servesFederation(t *testing.T) (envOption, xmatrix.SigningKey) {
	t.Helper()
	key, err := xmatrix.GenerateSigningKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	v, err := xmatrix.NewVerifier(xmatrix.VerifierOptions{Names: []string{testServer}, Fetcher: staticKeys{"remote.test", key}})
	if err != nil {
		t.Fatal(err)
	}
	return func(c *SiteConfig, _ *RepositoryOptions) { c.Federation = &FederationConfig{Verifier: v} }, key
}

// fedGet sends a federation GET of uri signed by key as origin to dest.
func fedGet(t *testing.T, e *env, uri string, key xmatrix.SigningKey, origin, dest string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest("GET", "http://media.test"+uri, nil)
	r.RequestURI = uri
	if key.Private != nil {
		h, err := xmatrix.SignRequest("GET", uri, origin, dest, nil, key)
		if err != nil {
			t.Fatal(err)
		}
		r.Header.Set("Authorization", h)
	}
	rec := httptest.NewRecorder()
	e.site.ServeHTTP(rec, r)
	return rec
}

func TestFederationDownload(t *testing.T) {
	e, key := fedEnv(t)
	content := []byte("served to other servers")
	id := e.upload("alice", content, "text/plain", "?filename=note.txt")

	rec := fedGet(t, e, "/_matrix/federation/v1/media/download/"+id, key, "remote.test", testServer)
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	part, err := federation.ReadMediaResponse(rec.Header().Get("Content-Type"), rec.Body, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(part.Body)
	if string(body) != string(content) || part.ContentType != "text/plain" || string(part.Metadata) != "{}" ||
		!strings.Contains(part.ContentDisposition, "note.txt") {
		t.Fatalf("part %+v body %q", part, body)
	}

	// The unstable MSC3916 path too.
	if rec := fedGet(t, e, "/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/"+id, key, "remote.test", testServer); rec.Code != 200 {
		t.Fatalf("unstable: %d", rec.Code)
	}

	other, _ := xmatrix.GenerateSigningKey(rand.Reader)
	tests := []struct {
		name, uri, origin, dest string
		key                     xmatrix.SigningKey
		status                  int
		code                    string
	}{
		{"no signature", "/_matrix/federation/v1/media/download/" + id, "", "", xmatrix.SigningKey{}, 401, "M_UNAUTHORIZED"},
		{"wrong destination", "/_matrix/federation/v1/media/download/" + id, "remote.test", "elsewhere.test", key, 401, "M_UNAUTHORIZED"},
		{"unknown key", "/_matrix/federation/v1/media/download/" + id, "remote.test", testServer, other, 401, "M_UNAUTHORIZED"},
		{"unknown origin", "/_matrix/federation/v1/media/download/" + id, "stranger.test", testServer, key, 401, "M_UNAUTHORIZED"},
		{"unknown media", "/_matrix/federation/v1/media/download/nope", "remote.test", testServer, key, 404, "M_NOT_FOUND"},
		{"bad media id", "/_matrix/federation/v1/media/download/a%2Fb", "remote.test", testServer, key, 400, "M_INVALID_PARAM"},
		{"unknown endpoint", "/_matrix/federation/v1/media/config/x", "remote.test", testServer, key, 404, "M_UNRECOGNIZED"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			expectError(t, fedGet(t, e, tc.uri, tc.key, tc.origin, tc.dest), tc.status, tc.code)
		})
	}
	// A signature over another URI does not verify.
	r := httptest.NewRequest("GET", "http://media.test/_matrix/federation/v1/media/download/"+id, nil)
	h, _ := xmatrix.SignRequest("GET", "/_matrix/federation/v1/media/download/other", "remote.test", testServer, nil, key)
	r.Header.Set("Authorization", h)
	rec = httptest.NewRecorder()
	e.site.ServeHTTP(rec, r)
	expectError(t, rec, 401, "M_UNAUTHORIZED")
}

func TestFederationThumbnailAndPending(t *testing.T) {
	e, key := fedEnv(t)
	id := e.upload("alice", testJPEG(t, 800, 600), "image/jpeg", "")
	uri := "/_matrix/federation/v1/media/thumbnail/" + id + "?width=96&height=96&method=crop"
	rec := fedGet(t, e, uri, key, "remote.test", testServer)
	if rec.Code != 200 {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
	part, err := federation.ReadMediaResponse(rec.Header().Get("Content-Type"), rec.Body, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	fedBytes, _ := io.ReadAll(part.Body)
	// The client endpoint gives the same bytes for the same parameters.
	client := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=96&height=96&method=crop", token: "alice"})
	if part.ContentType != "image/jpeg" || string(fedBytes) != client.Body.String() {
		t.Fatalf("federation thumbnail %s (%d bytes) differs from the client one (%d bytes)", part.ContentType, len(fedBytes), client.Body.Len())
	}

	rec = e.do(req{method: "POST", path: "/_matrix/media/v1/create", token: "alice"})
	pending := mediaIDFromURI(t, rec, testServer)
	expectError(t, fedGet(t, e, "/_matrix/federation/v1/media/download/"+pending+"?timeout_ms=0", key, "remote.test", testServer), 504, "M_NOT_YET_UPLOADED")
}
