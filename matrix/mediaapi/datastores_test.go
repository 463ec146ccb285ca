package mediaapi

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"net/url"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
)

// objectStore is a file store that behaves like an object store: ranged reads
// (storage.RangeOpener), presigned URLs (storage.Presigner), and a switch
// that makes every operation fail as an unreachable backend.
type objectStore struct {
	*filestore.Store
	down       atomic.Bool
	rangeReads atomic.Int64
	lastRange  atomic.Value // string "offset/length"
	// cors is the bucket CORS configuration BucketCORS reports; nil: none.
	cors atomic.Pointer[[]storage.CORSRule]
}

func (o *objectStore) BucketCORS(context.Context) ([]storage.CORSRule, error) {
	if o.down.Load() {
		return nil, errBackendDown
	}
	rules := o.cors.Load()
	if rules == nil {
		return nil, storage.ErrNotFound
	}
	return *rules, nil
}

var errBackendDown = fmt.Errorf("dial tcp 127.0.0.1:9: connection refused: %w", storage.ErrUnavailable)

func (o *objectStore) Put(ctx context.Context, r io.Reader, opts storage.PutOptions) (storage.PutResult, error) {
	if o.down.Load() {
		return storage.PutResult{}, errBackendDown
	}
	return o.Store.Put(ctx, r, opts)
}

func (o *objectStore) Open(ctx context.Context, h string) (storage.Blob, error) {
	if o.down.Load() {
		return storage.Blob{}, errBackendDown
	}
	return o.Store.Open(ctx, h)
}

func (o *objectStore) Stat(ctx context.Context, h string) (int64, error) {
	if o.down.Load() {
		return 0, errBackendDown
	}
	return o.Store.Stat(ctx, h)
}

func (o *objectStore) OpenRange(ctx context.Context, h string, offset, length int64) (io.ReadCloser, error) {
	if o.down.Load() {
		return nil, errBackendDown
	}
	b, err := o.Store.Open(ctx, h)
	if err != nil {
		return nil, err
	}
	o.rangeReads.Add(1)
	o.lastRange.Store(fmt.Sprintf("%d/%d", offset, length))
	if _, err := b.Content.Seek(offset, io.SeekStart); err != nil {
		_ = b.Content.Close()
		return nil, err
	}
	// Not an *os.File: the copy goes through the buffered path.
	return struct {
		io.Reader
		io.Closer
	}{io.LimitReader(b.Content, length), b.Content}, nil
}

func (o *objectStore) PresignGet(_ context.Context, h string, ttl time.Duration, contentType, disposition string) (string, error) {
	q := url.Values{"X-Expires": {ttl.String()}, "response-content-type": {contentType}, "response-content-disposition": {disposition}}
	return "https://s3.example.net/bucket/blobs/" + h + "?" + q.Encode(), nil
}

// objectEnv is an env whose uploads go to an objectStore named "objects";
// the file store "default" takes no kinds.
func objectEnv(t *testing.T, opts ...envOption) (*env, *objectStore) {
	var obj *objectStore
	e := newEnvWithStores(t, func(dir string) []storage.Datastore {
		fs, err := filestore.New(filepath.Join(dir, "objects"))
		if err != nil {
			t.Fatal(err)
		}
		obj = &objectStore{Store: fs}
		return []storage.Datastore{{Name: "objects", Store: obj, Kinds: []storage.Kind{storage.KindLocal}}}
	}, opts...)
	return e, obj
}

func TestUploadGoesToTheKindsDatastore(t *testing.T) {
	e, obj := objectEnv(t)
	content := []byte("stored in the object store")
	id := e.upload("alice", content, "text/plain", "")
	m, err := e.meta.GetMedia(context.Background(), testServer, id)
	if err != nil || m.Datastore != "objects" {
		t.Fatalf("media datastore %q, %v; want objects", m.Datastore, err)
	}
	if len(e.blobFiles()) != 0 {
		t.Fatalf("the default file store got %d blobs", len(e.blobFiles()))
	}
	if _, err := obj.Stat(context.Background(), m.SHA256); err != nil {
		t.Fatalf("blob not in the object store: %v", err)
	}

	tests := []struct {
		name      string
		rangeHdr  string
		status    int
		body      string
		wantRange string
	}{
		{"whole", "", 200, string(content), "0/26"},
		{"first bytes", "bytes=0-5", 206, "stored", "0/6"},
		{"middle", "bytes=10-15", 206, "the ob", "10/6"},
		{"suffix", "bytes=-5", 206, "store", "21/5"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"}
			if tc.rangeHdr != "" {
				r.header = map[string]string{"Range": tc.rangeHdr}
			}
			rec := e.do(r)
			if rec.Code != tc.status || rec.Body.String() != tc.body {
				t.Fatalf("%d %q, want %d %q", rec.Code, rec.Body, tc.status, tc.body)
			}
			if got := obj.lastRange.Load(); got != tc.wantRange {
				t.Fatalf("store read range %v, want %s (one ranged read of exactly the range)", got, tc.wantRange)
			}
		})
	}
	before := obj.rangeReads.Load()
	rec := e.do(req{method: "HEAD", path: "/_matrix/media/v3/download/test/" + id})
	if rec.Code != 200 || rec.Header().Get("Content-Length") != "26" || obj.rangeReads.Load() != before {
		t.Fatalf("HEAD: %d, length %q, %d reads", rec.Code, rec.Header().Get("Content-Length"), obj.rangeReads.Load()-before)
	}
}

func TestDedupAcrossDatastores(t *testing.T) {
	// Bytes already stored in the file store are not written again to the
	// object store that now takes uploads.
	content := bytes.Repeat([]byte("same bytes "), 10000)
	e, obj := objectEnv(t)
	ctx := context.Background()
	res, err := e.blobs.Put(ctx, bytes.NewReader(content), storage.PutOptions{ExpectedSize: -1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.meta.RecordBlob(ctx, storage.BlobRecord{SHA256: res.SHA256, Size: res.Size, PrefixSHA256: res.PrefixSHA256,
		Datastore: DefaultDatastore, CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	id := e.upload("alice", content, "text/plain", "")
	m, err := e.meta.GetMedia(ctx, testServer, id)
	if err != nil || m.Datastore != DefaultDatastore || m.SHA256 != res.SHA256 {
		t.Fatalf("media %+v, %v; want it on the existing blob in %s", m, err, DefaultDatastore)
	}
	if _, err := obj.Stat(ctx, res.SHA256); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("the object store holds a copy: %v", err)
	}
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"})
	if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), content) {
		t.Fatalf("download: %d, %d bytes", rec.Code, rec.Body.Len())
	}
}

func TestDownloadFollowsAMigratedBlob(t *testing.T) {
	e, obj := objectEnv(t)
	ctx := context.Background()
	content := []byte("moving house")
	id := e.upload("alice", content, "text/plain", "")
	path := "/_matrix/client/v1/media/download/test/" + id
	if rec := e.do(req{method: "GET", path: path, token: "alice"}); rec.Code != 200 {
		t.Fatal(rec.Code) // now cached with datastore "objects"
	}
	m, _ := e.meta.GetMedia(ctx, testServer, id)
	// What a migration objects -> default does: copy, switch, delete.
	b, err := obj.Open(ctx, m.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.blobs.Put(ctx, b.Content, storage.PutOptions{ExpectedSize: -1}); err != nil {
		t.Fatal(err)
	}
	b.Content.Close()
	if err := e.meta.MoveBlob(ctx, m.SHA256, "objects", DefaultDatastore); err != nil {
		t.Fatal(err)
	}
	if err := obj.Delete(ctx, m.SHA256); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		rec := e.do(req{method: "GET", path: path, token: "alice"})
		if rec.Code != 200 || rec.Body.String() != string(content) {
			t.Fatalf("download %d after migration: %d %s", i, rec.Code, rec.Body)
		}
	}
}

func TestDatastoreUnavailable(t *testing.T) {
	e, obj := objectEnv(t)
	id := e.upload("alice", []byte("before the outage"), "text/plain", "")
	obj.down.Store(true)

	rec := e.do(req{method: "POST", path: "/_matrix/media/v3/upload", token: "alice", body: []byte("during the outage")})
	expectError(t, rec, 503, "M_UNKNOWN")
	if rec.Header().Get("Retry-After") == "" {
		t.Error("no Retry-After on 503")
	}
	rec = e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"})
	expectError(t, rec, 503, "M_UNKNOWN")

	// Nothing was recorded for the failed upload.
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(e.dir, "meta.db")+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow(`SELECT COUNT(*) FROM media`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("%d media rows, want only the one uploaded before the outage", n)
	}
	obj.down.Store(false)
	if rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"}); rec.Code != 200 {
		t.Fatalf("after the outage: %d", rec.Code)
	}
}

func TestRedirects(t *testing.T) {
	e, obj := objectEnv(t, func(_ *SiteConfig, o *RepositoryOptions) {
		o.Redirects = map[string]RedirectPolicy{"objects": {Lifetime: 2 * time.Minute}}
	})
	id := e.upload("alice", []byte("redirect me"), "text/plain", "?filename=a.txt")
	reads := obj.rangeReads.Load()
	tests := []struct {
		name, path, token string
		redirect          bool
	}{
		{"authenticated", "/_matrix/client/v1/media/download/test/" + id, "alice", true},
		{"authenticated with file name", "/_matrix/client/v1/media/download/test/" + id + "/b.txt", "alice", true},
		{"legacy without allow_redirect", "/_matrix/media/v3/download/test/" + id, "", false},
		{"legacy with allow_redirect=false", "/_matrix/media/v3/download/test/" + id + "?allow_redirect=false", "", false},
		{"legacy with allow_redirect=true", "/_matrix/media/v3/download/test/" + id + "?allow_redirect=true", "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := e.do(req{method: "GET", path: tc.path, token: tc.token})
			if !tc.redirect {
				if rec.Code != 200 || rec.Body.String() != "redirect me" {
					t.Fatalf("%d %q, want the bytes", rec.Code, rec.Body)
				}
				return
			}
			loc := rec.Header().Get("Location")
			if rec.Code != 307 || !strings.HasPrefix(loc, "https://s3.example.net/bucket/blobs/") || rec.Header().Get("Cache-Control") != "no-store" {
				t.Fatalf("%d Location %q Cache-Control %q", rec.Code, loc, rec.Header().Get("Cache-Control"))
			}
			u, _ := url.Parse(loc)
			wantName := "a.txt"
			if strings.HasSuffix(tc.path, "/b.txt") {
				wantName = "b.txt"
			}
			if u.Query().Get("X-Expires") != "2m0s" || u.Query().Get("response-content-type") != "text/plain" ||
				!strings.Contains(u.Query().Get("response-content-disposition"), wantName) {
				t.Fatalf("presigned with %v", u.Query())
			}
		})
	}
	// Unauthenticated requests never get a URL.
	rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id})
	expectError(t, rec, 401, "M_MISSING_TOKEN")
	if got := obj.rangeReads.Load() - reads; got != 2 {
		t.Fatalf("%d reads from the store; only the two non-redirected downloads should read", got)
	}
}

func TestRebaseForCDN(t *testing.T) {
	base, _ := url.Parse("https://cdn.example.org/media")
	got, err := rebase("http://127.0.0.1:9000/bucket/blobs/ab/cd/abcd?X-Amz-Signature=x%2By", base)
	if err != nil || got != "https://cdn.example.org/media/bucket/blobs/ab/cd/abcd?X-Amz-Signature=x%2By" {
		t.Fatalf("%q %v", got, err)
	}
}
