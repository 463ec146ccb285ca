package mediaadmin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// Server names of the tests: two sites sharing the stores, and a remote
// server whose media are cached.
const (
	siteA  = "a.example"
	siteB  = "b.example"
	remote = "remote.example"
)

// Access tokens the test homeserver knows.
const (
	tokAdmin   = "tok-admin"   // @admin:a.example, a media admin by the static list
	tokHSAdmin = "tok-hsadmin" // @boss:a.example, a homeserver admin (detected)
	tokUser    = "tok-user"    // @alice:a.example, a plain user
	tokGuest   = "tok-guest"   // @guest:a.example, a guest
)

const (
	userAdmin   = "@admin:" + siteA
	userHSAdmin = "@boss:" + siteA
	userAlice   = "@alice:" + siteA
	userBob     = "@bob:" + siteA
	userCarol   = "@carol:" + siteA
)

// backends are the metadata stores every test runs against.
var backends = []struct {
	name string
	dsn  func(t testing.TB) string
}{
	{"sqlite", func(t testing.TB) string { return filepath.Join(t.TempDir(), "meta.db") }},
	{"postgres", func(t testing.TB) string { return testpg.DSN(t) }},
}

// eachBackend runs f once per metadata store.
func eachBackend(t *testing.T, f func(t *testing.T, driver string)) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { f(t, b.name) })
	}
}

// testHomeserver is a real HTTP homeserver for the tests: whoami, Synapse's
// "is admin" API, the room media list and profiles.
type testHomeserver struct {
	srv *httptest.Server

	mu sync.Mutex
	// roomMedia answers GET /_synapse/admin/v1/room/{roomId}/media with
	// {"local": ..., "remote": ...} when roomAnswer is empty; otherwise
	// roomAnswer is written with roomStatus.
	roomMedia  map[string][2][]string
	roomStatus int
	roomAnswer string
	// profiles answers GET /_matrix/client/v3/profile/{userId}; absent
	// users get 404, users in profileFail 500.
	profiles    map[string]map[string]any
	profileFail map[string]bool
	// requests records request paths (escaped).
	requests []string
}

// hsUsers are the homeserver's tokens.
var hsUsers = map[string]struct {
	userID string
	guest  bool
	admin  bool
}{
	tokAdmin:   {userID: userAdmin},
	tokHSAdmin: {userID: userHSAdmin, admin: true},
	tokUser:    {userID: userAlice},
	tokGuest:   {userID: "@guest:" + siteA, guest: true},
}

func newHomeserver(t *testing.T) *testHomeserver {
	hs := &testHomeserver{roomMedia: map[string][2][]string{}, profiles: map[string]map[string]any{}, profileFail: map[string]bool{}}
	hs.srv = httptest.NewServer(http.HandlerFunc(hs.serve))
	t.Cleanup(hs.srv.Close)
	return hs
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func matrixErr(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, map[string]string{"errcode": code, "error": msg})
}

func (hs *testHomeserver) serve(w http.ResponseWriter, r *http.Request) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	hs.requests = append(hs.requests, r.URL.EscapedPath())
	tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	u, known := hsUsers[tok]
	if !known {
		matrixErr(w, http.StatusUnauthorized, "M_UNKNOWN_TOKEN", "Unknown token")
		return
	}
	path := r.URL.Path
	switch {
	case path == "/_matrix/client/v3/account/whoami":
		writeJSON(w, http.StatusOK, map[string]any{"user_id": u.userID, "is_guest": u.guest})
	case strings.HasPrefix(path, "/_synapse/admin/v1/users/") && strings.HasSuffix(path, "/admin"):
		if !u.admin {
			matrixErr(w, http.StatusForbidden, "M_FORBIDDEN", "You are not a server admin")
			return
		}
		target := strings.TrimSuffix(strings.TrimPrefix(path, "/_synapse/admin/v1/users/"), "/admin")
		writeJSON(w, http.StatusOK, map[string]any{"admin": hsUsers[tokHSAdmin].userID == target})
	case strings.HasPrefix(path, "/_synapse/admin/v1/room/") && strings.HasSuffix(path, "/media"):
		if hs.roomAnswer != "" {
			w.WriteHeader(hs.roomStatus)
			_, _ = io.WriteString(w, hs.roomAnswer)
			return
		}
		if !u.admin {
			matrixErr(w, http.StatusForbidden, "M_FORBIDDEN", "You are not a server admin")
			return
		}
		room := strings.TrimSuffix(strings.TrimPrefix(path, "/_synapse/admin/v1/room/"), "/media")
		lists := hs.roomMedia[room]
		writeJSON(w, http.StatusOK, map[string]any{"local": orEmpty(lists[0]), "remote": orEmpty(lists[1])})
	case strings.HasPrefix(path, "/_matrix/client/v3/profile/"):
		user := strings.TrimPrefix(path, "/_matrix/client/v3/profile/")
		if hs.profileFail[user] {
			matrixErr(w, http.StatusInternalServerError, "M_UNKNOWN", "boom")
			return
		}
		p, ok := hs.profiles[user]
		if !ok {
			matrixErr(w, http.StatusNotFound, "M_NOT_FOUND", "Profile was not found")
			return
		}
		writeJSON(w, http.StatusOK, p)
	default:
		matrixErr(w, http.StatusNotFound, "M_UNRECOGNIZED", "Unrecognized request")
	}
}

func orEmpty(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func (hs *testHomeserver) set(f func(hs *testHomeserver)) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	f(hs)
}

// invalidations records the Invalidator calls.
type invalidations struct {
	mu       sync.Mutex
	forgot   []storage.MediaRef
	contents []string
}

func (i *invalidations) Forget(serverName, mediaID string) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.forgot = append(i.forgot, storage.MediaRef{ServerName: serverName, MediaID: mediaID})
}

func (i *invalidations) ForgetContent(_ context.Context, sha256 string) error {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.contents = append(i.contents, sha256)
	return nil
}

func (i *invalidations) forgotContent(sha string) bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	return slices.Contains(i.contents, sha)
}

func (i *invalidations) forgotRef(ref storage.MediaRef) bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	return slices.Contains(i.forgot, ref)
}

// env is a service on real stores with the admin API of two sites served
// over HTTP.
type env struct {
	t       *testing.T
	meta    *sqlstore.Store
	admin   storage.MediaAdmin
	stores  *storage.Datastores
	files   *filestore.Store
	svc     *Service
	metrics *Metrics
	inv     *invalidations
	hs      *testHomeserver
	sites   map[string]*httptest.Server
}

type envOptions struct {
	purger RemotePurger
	// noHomeserver leaves SiteConfig.HomeserverURL empty.
	noHomeserver bool
	// export and allowUserExport are SiteConfig.Export and
	// SiteConfig.AllowUserExport of both sites.
	export          ExportFunc
	allowUserExport bool
}

func newEnv(t *testing.T, driver string, opts ...envOptions) *env {
	t.Helper()
	var o envOptions
	if len(opts) > 0 {
		o = opts[0]
	}
	ctx := context.Background()
	var dsn string
	for _, b := range backends {
		if b.name == driver {
			dsn = b.dsn(t)
		}
	}
	meta, err := sqlstore.Open(ctx, driver, dsn)
	if err != nil {
		t.Fatalf("opening %s store: %v", driver, err)
	}
	t.Cleanup(func() { _ = meta.Close() })
	files, err := filestore.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	stores, err := storage.NewDatastores(storage.Datastore{Name: "files", Store: files, Kinds: []storage.Kind{storage.KindLocal}})
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, meta: meta, stores: stores, files: files, metrics: NewMetrics(), inv: &invalidations{}, hs: newHomeserver(t), sites: map[string]*httptest.Server{}}
	if ma, ok := any(meta).(storage.MediaAdmin); ok {
		e.admin = ma
	}
	e.svc, err = New(Options{
		Meta: meta, Stores: stores, Invalidator: e.inv, Purger: o.purger,
		DeleteGrace: -1, BatchSize: 2, Logger: zap.NewNop(), Metrics: e.metrics,
		// A second ahead, so that blobs claimed by the test's uploads are
		// older than the deletion cutoff.
		Now: func() time.Time { return time.Now().Add(time.Second) },
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	whoami, err := auth.NewWhoami(e.hs.srv.URL, e.hs.srv.Client())
	if err != nil {
		t.Fatal(err)
	}
	cache, err := auth.NewTokenCache(auth.CacheOptions{})
	if err != nil {
		t.Fatal(err)
	}
	authn, err := auth.NewSiteAuthenticator(auth.SiteOptions{Homeserver: e.hs.srv.URL, Checker: whoami, Cache: cache})
	if err != nil {
		t.Fatal(err)
	}
	admins, err := auth.NewAdminPolicy(auth.AdminOptions{
		Admins: []string{userAdmin}, DetectHomeserverAdmins: true,
		HomeserverURL: e.hs.srv.URL, Client: e.hs.srv.Client(),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{siteA, siteB} {
		cfg := SiteConfig{ServerName: name, Auth: authn, Admins: admins, Service: e.svc, Client: e.hs.srv.Client(),
			Export: o.export, AllowUserExport: o.allowUserExport}
		if !o.noHomeserver {
			cfg.HomeserverURL = e.hs.srv.URL
		}
		api, err := NewSiteAPI(cfg)
		if err != nil {
			t.Fatal(err)
		}
		srv := httptest.NewServer(api)
		t.Cleanup(srv.Close)
		e.sites[name] = srv
	}
	return e
}

// media describes a media item to create.
type media struct {
	server, id, user string
	content          string
	remote           bool
	created          time.Time
	filename         string
	contentType      string
	protected        bool
}

// put stores m's content and row and returns the row as stored.
func (e *env) put(m media) storage.Media {
	e.t.Helper()
	ctx := context.Background()
	kind := storage.KindLocal
	if m.remote {
		kind = storage.KindRemote
	}
	res, err := storage.IngestTo(ctx, e.stores, e.meta, kind, strings.NewReader(m.content), storage.PutOptions{ExpectedSize: int64(len(m.content))})
	if err != nil {
		e.t.Fatalf("ingesting %s: %v", m.id, err)
	}
	if m.created.IsZero() {
		m.created = time.Now().Add(-time.Minute)
	}
	if m.contentType == "" {
		m.contentType = "text/plain"
	}
	row := storage.Media{
		ServerName: m.server, MediaID: m.id, State: storage.StateReady, UserID: m.user,
		SHA256: res.SHA256, Size: res.Size, ContentType: m.contentType, Filename: m.filename,
		CreatedAt: m.created, UploadedAt: m.created, Remote: m.remote, Protected: m.protected,
	}
	if err := e.meta.InsertMedia(ctx, row); err != nil {
		e.t.Fatalf("inserting %s: %v", m.id, err)
	}
	got, err := e.meta.GetMedia(ctx, m.server, m.id)
	if err != nil {
		e.t.Fatalf("reading back %s: %v", m.id, err)
	}
	return got
}

// thumbnail stores a thumbnail of ref with its own blob and returns the
// blob's hash.
func (e *env) thumbnail(ref storage.Media, content string) string {
	e.t.Helper()
	ctx := context.Background()
	res, err := storage.IngestTo(ctx, e.stores, e.meta, storage.KindThumbnails, strings.NewReader(content), storage.PutOptions{ExpectedSize: int64(len(content))})
	if err != nil {
		e.t.Fatal(err)
	}
	err = e.meta.InsertThumbnail(ctx, storage.Thumbnail{
		ThumbnailKey: storage.ThumbnailKey{ServerName: ref.ServerName, MediaID: ref.MediaID, Width: 32, Height: 32, Method: "scale"},
		ContentType:  "image/png", SHA256: res.SHA256, Size: res.Size, ActualWidth: 32, ActualHeight: 32, CreatedAt: time.Now(),
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return res.SHA256
}

// get returns the stored row of server/id, or fails the test.
func (e *env) get(server, id string) storage.Media {
	e.t.Helper()
	m, err := e.meta.GetMedia(context.Background(), server, id)
	if err != nil {
		e.t.Fatalf("GetMedia(%s/%s): %v", server, id, err)
	}
	return m
}

// gone reports whether server/id has no row.
func (e *env) gone(server, id string) bool {
	e.t.Helper()
	_, err := e.meta.GetMedia(context.Background(), server, id)
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		e.t.Fatalf("GetMedia(%s/%s): %v", server, id, err)
	}
	return errors.Is(err, storage.ErrNotFound)
}

// blobExists reports whether the file datastore holds sha's bytes.
func (e *env) blobExists(sha string) bool {
	e.t.Helper()
	_, err := e.files.Stat(context.Background(), sha)
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		e.t.Fatal(err)
	}
	return err == nil
}

// response is an admin API answer.
type response struct {
	status int
	header http.Header
	body   map[string]any
	raw    string
}

// do calls the admin API of site with token ("" for none); path is relative
// to /_synapse/admin/v1/.
func (e *env) do(site, method, path, token string) response {
	e.t.Helper()
	req, err := http.NewRequest(method, e.sites[site].URL+adminPrefix+path, strings.NewReader("{}"))
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := e.sites[site].Client().Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	r := response{status: resp.StatusCode, header: resp.Header, raw: string(raw)}
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &r.body); err != nil {
			e.t.Fatalf("%s %s: body %q is not a JSON object: %v", method, path, raw, err)
		}
	}
	return r
}

// expect checks an answer's status and, for errors, its errcode.
func (r response) expect(t *testing.T, status int, errcode string) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status %d, want %d; body %s", r.status, status, r.raw)
	}
	if errcode != "" && r.body["errcode"] != errcode {
		t.Fatalf("errcode %v, want %s; body %s", r.body["errcode"], errcode, r.raw)
	}
}

// esc escapes a path parameter.
func esc(s string) string { return url.PathEscape(s) }

// ids returns the media_id of each object of a JSON list.
func ids(list any) []string {
	var out []string
	for _, v := range list.([]any) {
		out = append(out, v.(map[string]any)["media_id"].(string))
	}
	return out
}

// strs converts a JSON list of strings.
func strs(list any) []string {
	out := []string{}
	for _, v := range list.([]any) {
		out = append(out, v.(string))
	}
	return out
}

// refused reports whether server/id is refused (quarantined, unprotected).
func (e *env) refused(server, id string) bool {
	e.t.Helper()
	m := e.get(server, id)
	return m.Refused()
}
