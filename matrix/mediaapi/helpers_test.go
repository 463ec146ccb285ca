package mediaapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

const testServer = "test"

// fakeHomeserver answers whoami: alice and bob are users, guest is a guest,
// every other token is unknown.
func fakeHomeserver(t testing.TB) *httptest.Server {
	t.Helper()
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/_matrix/client/v3/account/whoami" {
			w.WriteHeader(http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		switch r.Header.Get("Authorization") {
		case "Bearer alice":
			_, _ = io.WriteString(w, `{"user_id":"@alice:test","device_id":"A"}`)
		case "Bearer bob":
			_, _ = io.WriteString(w, `{"user_id":"@bob:test","device_id":"B"}`)
		case "Bearer guest":
			_, _ = io.WriteString(w, `{"user_id":"@guest:test","is_guest":true}`)
		default:
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown token"}`)
		}
	}))
	t.Cleanup(hs.Close)
	return hs
}

// countingMeta counts GetMedia calls of the real metadata store.
type countingMeta struct {
	storage.MetadataStore
	gets atomic.Int64
	// failThumbnails, when set, fails InsertThumbnail.
	failThumbnails atomic.Bool
}

func (c *countingMeta) InsertThumbnail(ctx context.Context, t storage.Thumbnail) error {
	if c.failThumbnails.Load() {
		return fmt.Errorf("inserting thumbnail: %w", storage.ErrUnavailable)
	}
	return c.MetadataStore.InsertThumbnail(ctx, t)
}

func (c *countingMeta) GetMedia(ctx context.Context, server, id string) (storage.Media, error) {
	c.gets.Add(1)
	return c.MetadataStore.GetMedia(ctx, server, id)
}

// adminMeta is the metadata store of an env whose store supports
// takedown (storage.MediaAdmin): countingMeta plus the store's MediaAdmin,
// with the access batches it is given recorded (and failed on demand).
type adminMeta struct {
	*countingMeta
	storage.MediaAdmin

	mu           sync.Mutex
	mediaBatches [][]storage.Access
	thumbBatches [][]storage.Access
	// failAccess, when set, fails both Record methods.
	failAccess error
}

func (a *adminMeta) RecordAccess(ctx context.Context, acc []storage.Access) error {
	a.mu.Lock()
	a.mediaBatches = append(a.mediaBatches, slices.Clone(acc))
	fail := a.failAccess
	a.mu.Unlock()
	if fail != nil {
		return fail
	}
	return a.MediaAdmin.RecordAccess(ctx, acc)
}

func (a *adminMeta) RecordThumbnailAccess(ctx context.Context, acc []storage.Access) error {
	a.mu.Lock()
	a.thumbBatches = append(a.thumbBatches, slices.Clone(acc))
	fail := a.failAccess
	a.mu.Unlock()
	if fail != nil {
		return fail
	}
	return a.MediaAdmin.RecordThumbnailAccess(ctx, acc)
}

// batches returns copies of the access batches recorded so far.
func (a *adminMeta) batches() (media, thumbs [][]storage.Access) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.mediaBatches), slices.Clone(a.thumbBatches)
}

// env is a site on real stores (file store + SQLite) in a temp dir, with a
// fake homeserver.
type env struct {
	t     testing.TB
	dir   string
	blobs *filestore.Store
	sql   *sqlstore.Store
	meta  *countingMeta
	// admin is the repository's metadata store when the SQL store
	// supports takedown (nil otherwise).
	admin *adminMeta
	repo  *Repository
	site  *Site
	clock *testclock.Clock
	hs    *httptest.Server
}

type envOption func(*SiteConfig, *RepositoryOptions)

func newEnv(t testing.TB, opts ...envOption) *env {
	t.Helper()
	return newEnvWithStores(t, nil, opts...)
}

// newEnvWithStores is newEnv with more datastores: extra returns them, given
// the env's directory; the env's own file store ("default") takes no kinds
// when extra is set, so one of them must take local.
func newEnvWithStores(t testing.TB, extra func(dir string) []storage.Datastore, opts ...envOption) *env {
	t.Helper()
	return newEnvOn(t, nil, extra, opts...)
}

// newEnvOn is newEnvWithStores on the metadata store open returns (nil:
// SQLite in the env's directory).
func newEnvOn(t testing.TB, open func(testing.TB) *sqlstore.Store, extra func(dir string) []storage.Datastore, opts ...envOption) *env {
	t.Helper()
	dir := t.TempDir()
	blobs, err := filestore.New(filepath.Join(dir, "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	var sq *sqlstore.Store
	if open != nil {
		sq = open(t)
	} else {
		sq, err = sqlstore.OpenSQLite(context.Background(), filepath.Join(dir, "meta.db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sq.Close() })
	}
	meta := &countingMeta{MetadataStore: sq}
	cfg := SiteConfig{ServerName: testServer, MaxUploadSize: 1 << 20}
	ropts := RepositoryOptions{}
	for _, o := range opts {
		o(&cfg, &ropts)
	}
	all := []storage.Datastore{{Name: DefaultDatastore, Store: blobs, Kinds: []storage.Kind{storage.KindLocal}}}
	if extra != nil {
		all[0].Kinds = nil
		all = append(all, extra(dir)...)
	}
	stores, err := storage.NewDatastores(all...)
	if err != nil {
		t.Fatal(err)
	}
	var repoMeta storage.MetadataStore = meta
	var admin *adminMeta
	if ma, ok := any(sq).(storage.MediaAdmin); ok {
		admin = &adminMeta{countingMeta: meta, MediaAdmin: ma}
		repoMeta = admin
	}
	repo, err := NewRepository(stores, repoMeta, ropts)
	if err != nil {
		t.Fatal(err)
	}
	// Background work (thumbnails stored after they were answered, remote
	// media being stored) ends before the stores close and the directory
	// is removed (cleanups run last registered first).
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := repo.Drain(ctx); err != nil {
			t.Logf("background work still running at the end of the test: %v", err)
		}
	})
	// The repository's store is a wrapper: give it the SQL store's usage
	// counters.
	repo.quotas = sq
	clock := testclock.New(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	repo.now = clock.Now
	hs := fakeHomeserver(t)
	whoami, err := auth.NewWhoami(hs.URL, hs.Client())
	if err != nil {
		t.Fatal(err)
	}
	cache, err := auth.NewTokenCache(auth.CacheOptions{})
	if err != nil {
		t.Fatal(err)
	}
	authn, err := auth.NewSiteAuthenticator(auth.SiteOptions{Homeserver: hs.URL, Checker: whoami, Cache: cache})
	if err != nil {
		t.Fatal(err)
	}
	site, err := NewSite(cfg, repo, authn)
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, dir: dir, blobs: blobs, sql: sq, meta: meta, admin: admin, repo: repo, site: site, clock: clock, hs: hs}
}

// req describes a test request.
type req struct {
	method  string
	path    string
	token   string
	body    []byte
	chunked bool // send the body without Content-Length
	header  map[string]string
}

// do serves r directly with a recorder.
func (e *env) do(r req) *httptest.ResponseRecorder {
	return serve(e.site, r)
}

func serve(h http.Handler, r req) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, r.request())
	return rec
}

// request builds the HTTP request r describes.
func (r req) request() *http.Request {
	var body io.Reader
	if r.body != nil {
		body = bytes.NewReader(r.body)
	}
	hr := httptest.NewRequest(r.method, "http://media.test"+r.path, body)
	if r.chunked {
		hr.ContentLength = -1
		hr.Body = io.NopCloser(body)
	}
	if r.token != "" {
		hr.Header.Set("Authorization", "Bearer "+r.token)
	}
	for k, v := range r.header {
		hr.Header.Set(k, v)
	}
	return hr
}

// errcode returns the errcode of a JSON error body ("" when not JSON).
func errcode(rec *httptest.ResponseRecorder) string {
	var b struct {
		ErrCode string `json:"errcode"`
		Error   string `json:"error"`
	}
	if json.Unmarshal(rec.Body.Bytes(), &b) != nil {
		return ""
	}
	return b.ErrCode
}

// expectError asserts a Matrix JSON error with CORS headers.
func expectError(t testing.TB, rec *httptest.ResponseRecorder, status int, code string) {
	t.Helper()
	if rec.Code != status {
		t.Fatalf("status = %d, want %d; body %s", rec.Code, status, rec.Body.String())
	}
	if got := errcode(rec); got != code {
		t.Fatalf("errcode = %q, want %q; body %s", got, code, rec.Body.String())
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type = %q", ct)
	}
	var b map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil {
		t.Fatal(err)
	}
	if msg, _ := b["error"].(string); msg == "" {
		t.Fatalf("no error message in %s", rec.Body.String())
	}
	expectCORS(t, rec.Header())
}

func expectCORS(t testing.TB, h http.Header) {
	t.Helper()
	want := map[string]string{
		"Access-Control-Allow-Origin":  "*",
		"Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, DELETE, OPTIONS",
		"Access-Control-Allow-Headers": "X-Requested-With, Content-Type, Authorization, Date",
	}
	for k, v := range want {
		if got := h.Get(k); got != v {
			t.Fatalf("%s = %q, want %q", k, got, v)
		}
	}
	if !strings.Contains(h.Get("Access-Control-Expose-Headers"), "Content-Disposition") {
		t.Fatalf("Access-Control-Expose-Headers = %q", h.Get("Access-Control-Expose-Headers"))
	}
}

// upload uploads body and returns the media ID.
func (e *env) upload(token string, body []byte, contentType, filenameQuery string) string {
	e.t.Helper()
	r := req{method: "POST", path: "/_matrix/media/v3/upload" + filenameQuery, token: token, body: body}
	if contentType != "" {
		r.header = map[string]string{"Content-Type": contentType}
	}
	rec := e.do(r)
	if rec.Code != 200 {
		e.t.Fatalf("upload: %d %s", rec.Code, rec.Body.String())
	}
	return mediaIDFromURI(e.t, rec, testServer)
}

func mediaIDFromURI(t testing.TB, rec *httptest.ResponseRecorder, server string) string {
	t.Helper()
	var b struct {
		ContentURI string `json:"content_uri"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &b); err != nil {
		t.Fatalf("body %q: %v", rec.Body.String(), err)
	}
	prefix := "mxc://" + server + "/"
	if !strings.HasPrefix(b.ContentURI, prefix) {
		t.Fatalf("content_uri %q lacks %q", b.ContentURI, prefix)
	}
	id := strings.TrimPrefix(b.ContentURI, prefix)
	if len(id) != 24 {
		t.Fatalf("media id %q", id)
	}
	return id
}

// create reserves a media ID for token.
func (e *env) create(token string) string {
	e.t.Helper()
	rec := e.do(req{method: "POST", path: "/_matrix/media/v1/create", token: token, body: []byte("{}")})
	if rec.Code != 200 {
		e.t.Fatalf("create: %d %s", rec.Code, rec.Body.String())
	}
	return mediaIDFromURI(e.t, rec, testServer)
}

// blobFiles lists the blob files of the file store.
func (e *env) blobFiles() []string {
	e.t.Helper()
	var files []string
	err := filepath.WalkDir(e.blobs.Root(), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return files
}

// stubAuth is an Authenticator with a fixed answer.
type stubAuth struct {
	user auth.User
	err  error
}

func (s stubAuth) Authenticate(context.Context, auth.Credentials) (auth.User, error) {
	return s.user, s.err
}

// syncBuffer is a goroutine-safe log sink.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Sync() error { return nil }

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// needAdmin returns the env's takedown-capable store, or fails the test when
// the SQL store has none.
func (e *env) needAdmin() *adminMeta {
	e.t.Helper()
	if e.admin == nil {
		e.t.Fatal("the SQL store does not implement storage.MediaAdmin")
	}
	return e.admin
}
