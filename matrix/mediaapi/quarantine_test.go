package mediaapi

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// takedownEnv is a site "test" with a sibling site "b.test", a remote
// fetcher, federation and thumbnails, on a store that supports takedown.
type takedownEnv struct {
	*env
	admin *adminMeta
	fr    *fakeRemote
	b     *Site
	key   xmatrix.SigningKey
}

func newTakedownEnv(t *testing.T, opts ...envOption) *takedownEnv {
	t.Helper()
	key, err := xmatrix.GenerateSigningKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	v, err := xmatrix.NewVerifier(xmatrix.VerifierOptions{Names: []string{testServer}, Fetcher: staticKeys{"remote.test", key}})
	if err != nil {
		t.Fatal(err)
	}
	g, err := newTestGenerator()
	if err != nil {
		t.Fatal(err)
	}
	fr := &fakeRemote{media: map[string][]byte{}}
	e := newEnv(t, append([]envOption{func(c *SiteConfig, o *RepositoryOptions) {
		c.Remote = fr
		c.Federation = &FederationConfig{Verifier: v}
		o.Thumbnailer = g
		o.MaxRemoteSize = 1 << 20
	}}, opts...)...)
	admin := e.needAdmin()
	b, err := NewSite(SiteConfig{ServerName: "b.test", Remote: fr}, e.repo, e.site.auth)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return &takedownEnv{env: e, admin: admin, fr: fr, b: b, key: key}
}

func hashOf(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// quarantine quarantines content and invalidates the cache, as the admin
// layer does.
func (e *takedownEnv) quarantine(content []byte) {
	e.t.Helper()
	ctx := context.Background()
	if _, err := e.admin.QuarantineContent(ctx, storage.Quarantine{SHA256: hashOf(content), By: "@admin:test", At: e.clock.Now()}); err != nil {
		e.t.Fatal(err)
	}
	if err := e.repo.ForgetContent(ctx, hashOf(content)); err != nil {
		e.t.Fatal(err)
	}
}

func (e *takedownEnv) unquarantine(content []byte) {
	e.t.Helper()
	ctx := context.Background()
	if _, err := e.admin.UnquarantineContent(ctx, hashOf(content)); err != nil {
		e.t.Fatal(err)
	}
	if err := e.repo.ForgetContent(ctx, hashOf(content)); err != nil {
		e.t.Fatal(err)
	}
}

// mediaCheck is one request for a media item and what it must serve when
// the item is not refused.
type mediaCheck struct {
	name string
	// site serves the request; fed sends it over federation instead.
	site *Site
	fed  bool
	path string
	// want is the download body; nil for thumbnails and federation
	// (status only).
	want []byte
}

// run serves the check and asserts 200 (with the body) or 404 M_NOT_FOUND.
func (e *takedownEnv) run(t *testing.T, c mediaCheck, served bool) {
	t.Helper()
	var rec *httptest.ResponseRecorder
	if c.fed {
		rec = fedGet(t, e.env, c.path, e.key, "remote.test", testServer)
	} else {
		token := "alice"
		if strings.HasPrefix(c.path, "/_matrix/media/") {
			token = ""
		}
		rec = serve(c.site, req{method: "GET", path: c.path, token: token})
	}
	if !served {
		expectError(t, rec, http.StatusNotFound, "M_NOT_FOUND")
		return
	}
	if rec.Code != http.StatusOK {
		t.Fatalf("%s: status %d, want 200: %.200s", c.name, rec.Code, rec.Body.String())
	}
	if c.want != nil && !bytes.Equal(rec.Body.Bytes(), c.want) {
		t.Fatalf("%s: body of %d bytes differs", c.name, rec.Body.Len())
	}
}

// TestQuarantineByContent: quarantining content refuses every item with
// those bytes (two sites, a remote copy, their thumbnails, federation) once
// the cache is told (ForgetContent), spares protected items and unrelated
// content, and unquarantining restores everything.
func TestQuarantineByContent(t *testing.T) {
	e := newTakedownEnv(t)
	ctx := context.Background()
	photo := testJPEG(t, 640, 480)
	other := testJPEG(t, 320, 240)
	idA := e.upload("alice", photo, "image/jpeg", "")
	rec := serve(e.b, req{method: "POST", path: "/_matrix/media/v3/upload", token: "alice", body: photo,
		header: map[string]string{"Content-Type": "image/jpeg"}})
	if rec.Code != 200 {
		t.Fatalf("upload to b.test: %d %s", rec.Code, rec.Body)
	}
	idB := mediaIDFromURI(t, rec, "b.test")
	idC := e.upload("alice", other, "image/jpeg", "")
	e.fr.media["other.test/r"] = photo
	e.fr.media["other.test/u"] = other

	thumb := "?width=96&height=96&method=crop"
	refused := []mediaCheck{
		{name: "legacy download", site: e.site, path: "/_matrix/media/v3/download/test/" + idA, want: photo},
		{name: "download", site: e.site, path: "/_matrix/client/v1/media/download/test/" + idA, want: photo},
		{name: "download with file name", site: e.site, path: "/_matrix/client/v1/media/download/test/" + idA + "/x.jpg", want: photo},
		{name: "legacy thumbnail", site: e.site, path: "/_matrix/media/v3/thumbnail/test/" + idA + thumb},
		{name: "thumbnail", site: e.site, path: "/_matrix/client/v1/media/thumbnail/test/" + idA + thumb},
		{name: "sibling media through b", site: e.b, path: "/_matrix/client/v1/media/download/test/" + idA, want: photo},
		{name: "b's copy through b", site: e.b, path: "/_matrix/client/v1/media/download/b.test/" + idB, want: photo},
		{name: "b's copy through test", site: e.site, path: "/_matrix/client/v1/media/download/b.test/" + idB, want: photo},
		{name: "b's copy thumbnail", site: e.site, path: "/_matrix/client/v1/media/thumbnail/b.test/" + idB + thumb},
		{name: "remote copy", site: e.site, path: "/_matrix/client/v1/media/download/other.test/r", want: photo},
		{name: "remote copy, legacy", site: e.site, path: "/_matrix/media/v3/download/other.test/r", want: photo},
		{name: "remote copy thumbnail", site: e.site, path: "/_matrix/client/v1/media/thumbnail/other.test/r" + thumb},
		{name: "federation download", fed: true, path: "/_matrix/federation/v1/media/download/" + idA},
		{name: "federation thumbnail", fed: true, path: "/_matrix/federation/v1/media/thumbnail/" + idA + thumb},
	}
	unrelated := []mediaCheck{
		{name: "other local media", site: e.site, path: "/_matrix/client/v1/media/download/test/" + idC, want: other},
		{name: "other local thumbnail", site: e.site, path: "/_matrix/client/v1/media/thumbnail/test/" + idC + thumb},
		{name: "other remote media", site: e.site, path: "/_matrix/client/v1/media/download/other.test/u", want: other},
		{name: "other federation download", fed: true, path: "/_matrix/federation/v1/media/download/" + idC},
	}
	runAll := func(t *testing.T, checks []mediaCheck, served bool) {
		t.Helper()
		for _, c := range checks {
			t.Run(c.name, func(t *testing.T) { e.run(t, c, served) })
		}
	}

	// Everything served, and cached (rows and thumbnails), before.
	t.Run("before", func(t *testing.T) {
		runAll(t, refused, true)
		runAll(t, unrelated, true)
	})

	e.quarantine(photo)
	t.Run("quarantined", func(t *testing.T) {
		runAll(t, refused, false)
		runAll(t, unrelated, true)
	})

	// A remote item fetched now whose bytes turn out quarantined is stored
	// (with the quarantine on its row) and refused: whether streamed
	// (download) or not (thumbnail).
	e.fr.media["other.test/r2"] = photo
	e.fr.media["other.test/r3"] = photo
	t.Run("fresh remote copies", func(t *testing.T) {
		e.run(t, mediaCheck{name: "download", site: e.site, path: "/_matrix/client/v1/media/download/other.test/r2"}, false)
		e.run(t, mediaCheck{name: "thumbnail", site: e.site, path: "/_matrix/client/v1/media/thumbnail/other.test/r3" + thumb}, false)
		for _, id := range []string{"r2", "r3"} {
			m, err := e.sql.GetMedia(ctx, "other.test", id)
			if err != nil || m.QuarantinedBy != "@admin:test" || !m.Refused() || m.SHA256 != hashOf(photo) {
				t.Fatalf("row of %s: %+v, %v; want it stored and quarantined", id, m, err)
			}
		}
	})

	// Protected media is never refused.
	t.Run("protected", func(t *testing.T) {
		if err := e.admin.SetProtected(ctx, storage.MediaRef{ServerName: testServer, MediaID: idA}, true); err != nil {
			t.Fatal(err)
		}
		e.repo.Forget(testServer, idA)
		runAll(t, refused[:5], true)
		e.run(t, refused[len(refused)-2], true) // federation download
		e.run(t, refused[len(refused)-1], true) // federation thumbnail
		e.run(t, refused[6], false)             // b's copy is not protected
		if err := e.admin.SetProtected(ctx, storage.MediaRef{ServerName: testServer, MediaID: idA}, false); err != nil {
			t.Fatal(err)
		}
		e.repo.Forget(testServer, idA)
		e.run(t, refused[0], false)
	})

	e.unquarantine(photo)
	t.Run("unquarantined", func(t *testing.T) {
		runAll(t, refused, true)
		runAll(t, unrelated, true)
		e.run(t, mediaCheck{name: "fresh copy", site: e.site, path: "/_matrix/client/v1/media/download/other.test/r2", want: photo}, true)
	})
	if n := e.fr.calls.Load(); n != 4 {
		t.Fatalf("%d remote fetches, want 4 (r, u, r2, r3: each once)", n)
	}
}

// TestQuarantineCachedRowIsStale documents why ForgetContent exists: a row
// cached before the quarantine is served until the cache is told.
func TestQuarantineCachedRowIsStale(t *testing.T) {
	e := newTakedownEnv(t)
	content := []byte("cached before the quarantine")
	id := e.upload("alice", content, "text/plain", "")
	path := "/_matrix/client/v1/media/download/test/" + id
	if rec := e.do(req{method: "GET", path: path, token: "alice"}); rec.Code != 200 {
		t.Fatalf("before: %d", rec.Code)
	}
	if _, err := e.admin.QuarantineContent(context.Background(), storage.Quarantine{SHA256: hashOf(content), By: "@admin:test", At: e.clock.Now()}); err != nil {
		t.Fatal(err)
	}
	if rec := e.do(req{method: "GET", path: path, token: "alice"}); rec.Code != 200 {
		t.Fatalf("cached row: %d, want 200 until ForgetContent", rec.Code)
	}
	if err := e.repo.ForgetContent(context.Background(), hashOf(content)); err != nil {
		t.Fatal(err)
	}
	expectError(t, e.do(req{method: "GET", path: path, token: "alice"}), 404, "M_NOT_FOUND")
}

// TestQuarantinedRemoteStreamIsCut: content quarantined before it was ever
// stored here cannot be recognised before its last byte; its first streamed
// download is cut before that byte (the client never gets a complete
// response), the row is stored, and later requests get 404.
func TestQuarantinedRemoteStreamIsCut(t *testing.T) {
	e := newTakedownEnv(t)
	content := bytes.Repeat([]byte("never stored here "), 10000)
	e.fr.media["other.test/q"] = content
	e.quarantine(content)
	path := "/_matrix/client/v1/media/download/other.test/q"
	func() {
		var rec *httptest.ResponseRecorder
		defer func() {
			if v := recover(); v != http.ErrAbortHandler {
				t.Fatalf("recovered %v, want http.ErrAbortHandler (the response must be cut)", v)
			}
			if rec != nil {
				t.Fatal("the handler returned normally")
			}
		}()
		rec = e.do(req{method: "GET", path: path, token: "alice"})
	}()
	m, err := e.sql.GetMedia(context.Background(), "other.test", "q")
	if err != nil || !m.Refused() {
		t.Fatalf("row: %+v, %v; want it stored and refused", m, err)
	}
	expectError(t, e.do(req{method: "GET", path: path, token: "alice"}), 404, "M_NOT_FOUND")
	if n := e.fr.calls.Load(); n != 1 {
		t.Fatalf("%d fetches, want 1", n)
	}
}

// TestQuarantinePlaceholder: with a placeholder configured, thumbnails of
// quarantined media get it; downloads still get 404.
func TestQuarantinePlaceholder(t *testing.T) {
	placeholder := testPNG(t, 8, 8)
	e := newTakedownEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.QuarantinePlaceholder = placeholder
		o.QuarantinePlaceholderType = "image/png"
	})
	photo := testJPEG(t, 200, 200)
	id := e.upload("alice", photo, "image/jpeg", "")
	e.quarantine(photo)
	for _, path := range []string{
		"/_matrix/client/v1/media/thumbnail/test/" + id + "?width=96&height=96",
		"/_matrix/media/v3/thumbnail/test/" + id + "?width=96&height=96",
	} {
		rec := e.do(req{method: "GET", path: path, token: "alice"})
		if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), placeholder) || rec.Header().Get("Content-Type") != "image/png" ||
			rec.Header().Get("Cache-Control") != "no-store" {
			t.Fatalf("%s: %d %q %d bytes", path, rec.Code, rec.Header().Get("Content-Type"), rec.Body.Len())
		}
	}
	expectError(t, e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"}), 404, "M_NOT_FOUND")
	// Unknown media is still 404, not the placeholder.
	expectError(t, e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/nope?width=96&height=96", token: "alice"}), 404, "M_NOT_FOUND")
}

// TestQuarantinedUploadRefused: an upload (POST, or PUT of a /create ID) of
// quarantined bytes is refused with 403 M_FORBIDDEN, and no media row
// refers to them.
func TestQuarantinedUploadRefused(t *testing.T) {
	e := newTakedownEnv(t)
	ctx := context.Background()
	content := []byte("uploaded once, then taken down")
	e.upload("alice", content, "text/plain", "")
	fresh := []byte("quarantined before anyone uploaded it")
	e.quarantine(content)
	e.quarantine(fresh)

	for _, tc := range []struct {
		name    string
		body    []byte
		chunked bool
	}{
		{"known content", content, false},
		{"known content, chunked", content, true},
		{"content never stored", fresh, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := rowsWithHash(t, e, hashOf(tc.body))
			rec := e.do(req{method: "POST", path: "/_matrix/media/v3/upload", token: "alice", body: tc.body, chunked: tc.chunked})
			expectError(t, rec, http.StatusForbidden, "M_FORBIDDEN")
			if !strings.Contains(rec.Body.String(), "quarantined") {
				t.Fatalf("body %s", rec.Body)
			}
			if after := rowsWithHash(t, e, hashOf(tc.body)); after != before {
				t.Fatalf("%d rows with the content after the refused upload, %d before", after, before)
			}

			id := e.create("alice")
			rec = e.do(req{method: "PUT", path: "/_matrix/media/v3/upload/test/" + id, token: "alice", body: tc.body, chunked: tc.chunked})
			expectError(t, rec, http.StatusForbidden, "M_FORBIDDEN")
			m, err := e.sql.GetMedia(ctx, testServer, id)
			if err != nil || m.State != storage.StatePending || m.SHA256 != "" {
				t.Fatalf("reserved ID after a refused PUT: %+v, %v; want still pending", m, err)
			}
		})
	}
	// Other content still uploads, also to a reserved ID.
	e.upload("alice", []byte("harmless"), "text/plain", "")
	id := e.create("alice")
	if rec := e.do(req{method: "PUT", path: "/_matrix/media/v3/upload/test/" + id, token: "alice", body: []byte("harmless too")}); rec.Code != 200 {
		t.Fatalf("PUT of other content: %d %s", rec.Code, rec.Body)
	}
	// Lifting the quarantine allows the upload again.
	e.unquarantine(fresh)
	e.upload("alice", fresh, "text/plain", "")
}

// rowsWithHash counts the ready media rows whose content is sha.
func rowsWithHash(t *testing.T, e *takedownEnv, sha string) int {
	t.Helper()
	rows, err := e.admin.ListMediaByHash(context.Background(), sha, storage.MediaRef{}, 100)
	if err != nil {
		t.Fatal(err)
	}
	return len(rows)
}

// TestForgetDropsThumbnails: Forget and ForgetContent drop the cached
// thumbnails of the items they drop, and nothing else.
func TestForgetDropsThumbnails(t *testing.T) {
	e, _ := thumbEnv(t, ThumbnailPolicy{})
	photo := testJPEG(t, 640, 480)
	other := testJPEG(t, 320, 240)
	id1 := e.upload("alice", photo, "image/jpeg", "")
	id2 := e.upload("alice", other, "image/jpeg", "")
	for _, id := range []string{id1, id2} {
		for _, size := range []string{"?width=32&height=32&method=crop", "?width=96&height=96&method=crop"} {
			if rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + size, token: "alice"}); rec.Code != 200 {
				t.Fatalf("thumbnail: %d", rec.Code)
			}
		}
	}
	waitThumbnailsStored(t, e.repo)
	if n := e.repo.thumbCache.len(); n != 4 {
		t.Fatalf("%d cached thumbnails, want 4", n)
	}
	e.repo.Forget(testServer, id1)
	if n, m := e.repo.thumbCache.len(), e.repo.cache.len(); n != 2 || m != 1 {
		t.Fatalf("after Forget: %d thumbnails, %d rows cached; want 2 and 1", n, m)
	}
	if err := e.repo.ForgetContent(context.Background(), hashOf(other)); err != nil {
		t.Fatal(err)
	}
	if n, m := e.repo.thumbCache.len(), e.repo.cache.len(); n != 0 || m != 0 {
		t.Fatalf("after ForgetContent: %d thumbnails, %d rows cached; want none", n, m)
	}
	// A row read before an invalidation is not cached after it.
	gen := e.repo.cacheGen.Load()
	e.repo.Forget(testServer, "unrelated")
	e.repo.cachePut(gen, mediaKey{testServer, id1}, newMediaEntry(storage.Media{ServerName: testServer, MediaID: id1}))
	if e.repo.cache.get(mediaKey{testServer, id1}) != nil {
		t.Fatal("a row read before an invalidation was cached")
	}
	if _, err := e.sql.GetMedia(context.Background(), testServer, id1); errors.Is(err, storage.ErrNotFound) {
		t.Fatal("Forget deleted the row")
	}
}
