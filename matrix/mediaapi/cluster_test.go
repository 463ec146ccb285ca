package mediaapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/http/httptest"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/cluster"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// coordinators gives instance i its cluster coordinator.
type coordinators func(t *testing.T, i int) cluster.Coordinator

// sharedLocal gives every instance one Local coordinator (fallback off).
func sharedLocal() coordinators {
	c := cluster.NewLocal(-1)
	return func(*testing.T, int) cluster.Coordinator { return c }
}

// postgresCoordinators gives every instance a Postgres coordinator of its
// own on one real database (fallback at an hour, so only notifications
// wake waiters).
func postgresCoordinators(t *testing.T) coordinators {
	dsn := testpg.DSN(t)
	return func(t *testing.T, i int) cluster.Coordinator {
		c, err := cluster.NewPostgres(context.Background(), dsn, cluster.PostgresOptions{FallbackInterval: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
}

// instances builds n repositories ("instances") sharing one metadata store
// and one blob store, as Caddy instances sharing a database do, each with
// the cluster coordinator coord gives it; configure adjusts each.
func instances(t *testing.T, n int, coord coordinators, configure envOption) []*env {
	t.Helper()
	dir := t.TempDir()
	sq, err := sqlstore.OpenSQLite(context.Background(), filepath.Join(dir, "shared.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sq.Close() })
	blobs, err := filestore.New(filepath.Join(dir, "shared-blobs"))
	if err != nil {
		t.Fatal(err)
	}
	shared := func(string) []storage.Datastore {
		return []storage.Datastore{{Name: "shared", Store: blobs,
			Kinds: []storage.Kind{storage.KindLocal, storage.KindRemote, storage.KindThumbnails}}}
	}
	envs := make([]*env, n)
	for i := range envs {
		c := coord(t, i)
		envs[i] = newEnvOn(t, func(testing.TB) *sqlstore.Store { return sq }, shared, func(sc *SiteConfig, o *RepositoryOptions) {
			o.Cluster = c
			configure(sc, o)
		})
	}
	return envs
}

// concurrently sends perInstance copies of r to every instance at once and
// returns the answers.
func concurrently(envs []*env, perInstance int, r req) []*httptest.ResponseRecorder {
	out := make([]*httptest.ResponseRecorder, len(envs)*perInstance)
	var wg sync.WaitGroup
	for i := range out {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = envs[i%len(envs)].do(r)
		}()
	}
	wg.Wait()
	return out
}

// clusterWaits sums the cluster waits counted by every instance for work.
func clusterWaits(envs []*env, work string) float64 {
	var n float64
	for _, e := range envs {
		n += counterValue(e.repo.metrics.clusterWaits.WithLabelValues(work))
	}
	return n
}

// TestClusterCoordination runs the cluster tests on a shared Local
// coordinator and on one real PostgreSQL coordinator per instance.
func TestClusterCoordination(t *testing.T) {
	for _, tc := range []struct {
		name   string
		coords func(t *testing.T) coordinators
	}{
		{"local", func(*testing.T) coordinators { return sharedLocal() }},
		{"postgres", postgresCoordinators},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Run("one remote fetch", func(t *testing.T) { testOneRemoteFetch(t, tc.coords(t)) })
			t.Run("one thumbnail generation", func(t *testing.T) { testOneThumbnailGeneration(t, tc.coords(t)) })
			t.Run("async upload on another instance", func(t *testing.T) { testAsyncUploadAcross(t, tc.coords(t)) })
			t.Run("cache invalidation", func(t *testing.T) { testInvalidationAcross(t, tc.coords(t)) })
		})
	}
}

// testOneRemoteFetch: concurrent first downloads of one remote item on
// three instances make one fetch; the other instances wait for its row and
// answer from it.
func testOneRemoteFetch(t *testing.T, coords coordinators) {
	fr := &fakeRemote{media: map[string][]byte{}, gate: make(chan struct{})}
	photo := testJPEG(t, 320, 240)
	fr.media["other.test/abc"] = photo
	envs := instances(t, 3, coords, func(c *SiteConfig, o *RepositoryOptions) {
		c.Remote = fr
		o.MaxRemoteSize = 1 << 20
	})
	// Hold the fetch until the two other instances wait for it (or, should
	// they fetch too, long enough for them to).
	go func() {
		waitUntil(5*time.Second, func() bool { return clusterWaits(envs, "remote") >= 2 })
		close(fr.gate)
	}()
	answers := concurrently(envs, 6, req{method: "GET", path: "/_matrix/client/v1/media/download/other.test/abc", token: "alice"})
	for i, rec := range answers {
		if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), photo) || rec.Header().Get("Content-Type") != "image/jpeg" {
			t.Fatalf("request %d (instance %d): %d, %d bytes, %q", i, i%3, rec.Code, rec.Body.Len(), rec.Header().Get("Content-Type"))
		}
	}
	if c := fr.calls.Load(); c != 1 {
		t.Fatalf("%d remote fetches for 18 concurrent first requests on 3 instances, want 1", c)
	}
	if w := clusterWaits(envs, "remote"); w < 2 {
		t.Fatalf("%v cluster waits, want one per instance that did not fetch", w)
	}
}

// TestClusterRemoteFetchRetriedWhenTheHolderFails: when the instance that
// fetches fails, a waiting instance takes its turn and fetches itself.
func TestClusterRemoteFetchRetriedWhenTheHolderFails(t *testing.T) {
	photo := testJPEG(t, 64, 48)
	fr := &fakeRemote{media: map[string][]byte{"other.test/x": photo}}
	coord := cluster.NewLocal(-1)
	envs := instances(t, 2, func(*testing.T, int) cluster.Coordinator { return coord }, func(c *SiteConfig, o *RepositoryOptions) {
		c.Remote = fr
		o.MaxRemoteSize = 1 << 20
	})
	// Instance 0 holds the turn (taken as instance 0 would) while instance
	// 1's request starts waiting; then the holder gives up.
	lock, ok, err := coord.TryLock(context.Background(), "remote/other.test/x")
	if err != nil || !ok {
		t.Fatalf("taking the lock: %v %v", ok, err)
	}
	got := make(chan *httptest.ResponseRecorder, 1)
	go func() {
		got <- envs[1].do(req{method: "GET", path: "/_matrix/client/v1/media/download/other.test/x", token: "alice"})
	}()
	if !waitUntil(10*time.Second, func() bool { return clusterWaits(envs, "remote") >= 1 }) {
		t.Fatal("the request did not wait for the lock held by the other instance")
	}
	lock.Release()
	if err := coord.Publish(context.Background(), "remote/other.test/x"); err != nil {
		t.Fatal(err)
	}
	select {
	case rec := <-got:
		if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), photo) {
			t.Fatalf("waiting instance: %d, %d bytes", rec.Code, rec.Body.Len())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting instance did not take its turn after the holder failed")
	}
	if c := fr.calls.Load(); c != 1 {
		t.Fatalf("%d fetches, want 1 (by the waiting instance)", c)
	}
}

// testOneThumbnailGeneration: concurrent cold requests of one thumbnail on
// three instances make one generation; the others answer from its stored
// row.
func testOneThumbnailGeneration(t *testing.T, coords coordinators) {
	g, err := newTestGenerator()
	if err != nil {
		t.Fatal(err)
	}
	ct := &countingThumbnailer{g: g, gate: make(chan struct{})}
	envs := instances(t, 3, coords, func(_ *SiteConfig, o *RepositoryOptions) { o.Thumbnailer = ct })
	id := envs[0].upload("alice", testJPEG(t, 640, 480), "image/jpeg", "")
	go func() {
		waitUntil(5*time.Second, func() bool { return clusterWaits(envs, "thumbnail") >= 2 })
		close(ct.gate)
	}()
	answers := concurrently(envs, 6, req{method: "GET", path: "/_matrix/client/v1/media/thumbnail/test/" + id + "?width=100&height=100&method=crop", token: "alice"})
	first := answers[0].Body.Bytes()
	for i, rec := range answers {
		if w, h, format := decodedSize(t, rec); rec.Code != 200 || w < 100 || h < 100 || format != "jpeg" || !bytes.Equal(rec.Body.Bytes(), first) {
			t.Fatalf("request %d (instance %d): %d %dx%d %s, the same bytes as the first: %v", i, i%3, rec.Code, w, h, format, bytes.Equal(rec.Body.Bytes(), first))
		}
	}
	if c := ct.calls.Load(); c != 1 {
		t.Fatalf("%d generations for 18 concurrent cold requests on 3 instances, want 1", c)
	}
}

// testAsyncUploadAcross: a download waiting on one instance for a pending
// item is answered when the PUT lands on another, by its notification (the
// coordinators' fallback is off or an hour long).
func testAsyncUploadAcross(t *testing.T, coords coordinators) {
	envs := instances(t, 2, coords, func(c *SiteConfig, _ *RepositoryOptions) { c.MaxDownloadTimeout = time.Hour })
	id := envs[0].create("alice")
	got := make(chan *httptest.ResponseRecorder, 1)
	go func() {
		got <- envs[1].do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id + "?timeout_ms=3600000", token: "bob"})
	}()
	if !waitUntil(10*time.Second, func() bool { return envs[1].repo.waits.waiting(mediaKey{testServer, id}) == 1 }) {
		t.Fatal("the download is not waiting")
	}
	put := envs[0].do(req{method: "PUT", path: "/_matrix/media/v3/upload/test/" + id, token: "alice", body: []byte("bytes put elsewhere"),
		header: map[string]string{"Content-Type": "text/plain"}})
	if put.Code != 200 {
		t.Fatalf("PUT: %d %s", put.Code, put.Body.String())
	}
	select {
	case dl := <-got:
		if dl.Code != 200 || dl.Body.String() != "bytes put elsewhere" || dl.Header().Get("Content-Type") != "text/plain" {
			t.Fatalf("waiting download: %d %q %q", dl.Code, dl.Body.String(), dl.Header().Get("Content-Type"))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the download waiting on the other instance was not woken by the PUT")
	}
}

// testInvalidationAcross: content quarantined through one instance is
// refused at once by another that had its row cached, and a deleted item's
// cached row is dropped there too.
func testInvalidationAcross(t *testing.T, coords coordinators) {
	envs := instances(t, 2, coords, func(*SiteConfig, *RepositoryOptions) {})
	body := []byte("soon quarantined")
	id := envs[0].upload("alice", body, "text/plain", "")
	path := "/_matrix/client/v1/media/download/test/" + id
	if rec := envs[1].do(req{method: "GET", path: path, token: "bob"}); rec.Code != 200 || rec.Body.String() != string(body) {
		t.Fatalf("download on the other instance: %d %q", rec.Code, rec.Body.String())
	}
	if envs[1].repo.cache.get(mediaKey{testServer, id}) == nil {
		t.Fatal("the other instance did not cache the row")
	}
	digest := sha256.Sum256(body)
	sum := hex.EncodeToString(digest[:])
	if _, err := envs[0].sql.QuarantineContent(context.Background(), storage.Quarantine{SHA256: sum, By: "@admin:test"}); err != nil {
		t.Fatal(err)
	}
	if err := envs[0].repo.ForgetContent(context.Background(), sum); err != nil {
		t.Fatal(err)
	}
	if !waitUntil(10*time.Second, func() bool { return envs[1].repo.cache.get(mediaKey{testServer, id}) == nil }) {
		t.Fatal("the other instance kept the quarantined content's row cached")
	}
	expectError(t, envs[1].do(req{method: "GET", path: path, token: "bob"}), 404, "M_NOT_FOUND")

	id2 := envs[0].upload("alice", []byte("soon deleted"), "text/plain", "")
	if rec := envs[1].do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id2, token: "bob"}); rec.Code != 200 {
		t.Fatalf("download on the other instance: %d", rec.Code)
	}
	envs[0].repo.Forget(testServer, id2)
	if !waitUntil(10*time.Second, func() bool { return envs[1].repo.cache.get(mediaKey{testServer, id2}) == nil }) {
		t.Fatal("the other instance kept the forgotten row cached")
	}
}

// TestClusterPendingExpiryOneSweeper: while one instance holds the
// pending-expiry lock, the others skip their sweeps.
func TestClusterPendingExpiryOneSweeper(t *testing.T) {
	coord := cluster.NewLocal(-1)
	envs := instances(t, 2, func(*testing.T, int) cluster.Coordinator { return coord },
		func(_ *SiteConfig, o *RepositoryOptions) { o.PendingCleanupInterval = 5 * time.Millisecond })
	e := envs[1]
	id := e.create("alice")
	e.clock.Advance(25 * time.Hour)
	lock, ok, err := coord.TryLock(context.Background(), pendingExpiryLock)
	if err != nil || !ok {
		t.Fatalf("taking the lock: %v %v", ok, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.repo.RunPendingExpiry(ctx); close(done) }()
	time.Sleep(50 * time.Millisecond)
	if _, err := e.sql.GetMedia(context.Background(), testServer, id); err != nil {
		t.Fatalf("the expired item was swept while another instance held the lock: %v", err)
	}
	lock.Release()
	if !waitUntil(5*time.Second, func() bool {
		_, err := e.sql.GetMedia(context.Background(), testServer, id)
		return err != nil
	}) {
		t.Fatal("the expired item was not swept once the lock was free")
	}
	cancel()
	<-done
}

// waitUntil polls cond until it holds or timeout passes.
func waitUntil(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return cond()
}
