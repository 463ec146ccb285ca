package retention

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/jobs"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// backends open a metadata database; open returns a new handle on it (for
// PostgreSQL, a new connection pool: another instance).
var backends = []struct {
	name  string
	newDB func(t *testing.T) (driver, dsn string)
}{
	{"sqlite", func(t *testing.T) (string, string) { return "sqlite", filepath.Join(t.TempDir(), "meta.db") }},
	{"postgres", func(t *testing.T) (string, string) { return "postgres", testpg.DSN(t) }},
}

const remoteServer = "remote.example"

// fixture is a metadata store, one file datastore taking every kind, and a
// clock an hour ahead of real time (so that every blob the test wrote was
// claimed longer ago than the grace).
type fixture struct {
	driver, dsn string
	meta        *sqlstore.Store
	files       storage.BlobStore
	ds          *storage.Datastores
	clock       *testclock.Clock
	// now is the clock's start: media ages are relative to it.
	now time.Time
	// forgotten records the media the services told caches to forget.
	forgotMu  sync.Mutex
	forgotten map[storage.MediaRef]int
}

// forgot returns how many times each media item was forgotten.
func (fx *fixture) forgot() map[storage.MediaRef]int {
	fx.forgotMu.Lock()
	defer fx.forgotMu.Unlock()
	out := make(map[storage.MediaRef]int, len(fx.forgotten))
	for k, v := range fx.forgotten {
		out[k] = v
	}
	return out
}

func newFixture(t *testing.T, newDB func(*testing.T) (driver, dsn string)) *fixture {
	t.Helper()
	driver, dsn := newDB(t)
	now := time.Now().Add(time.Hour).Truncate(time.Millisecond)
	fx := &fixture{driver: driver, dsn: dsn, clock: testclock.New(now), now: now}
	fx.meta = fx.open(t)
	files, err := filestore.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	fx.files = files
	fx.ds, err = storage.NewDatastores(storage.Datastore{Name: "files", Store: files,
		Kinds: []storage.Kind{storage.KindLocal, storage.KindRemote, storage.KindThumbnails}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fx.ds.Close() })
	return fx
}

// open opens a handle on the fixture's database, closed when the test ends.
func (fx *fixture) open(t *testing.T) *sqlstore.Store {
	t.Helper()
	s, err := sqlstore.Open(context.Background(), fx.driver, fx.dsn)
	if err != nil {
		t.Fatalf("opening %s: %v", fx.driver, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// item describes a media row to create.
type item struct {
	server, id string
	remote     bool
	body       string
	// age is how long before fx.now it was created; accessed, when not 0,
	// how long before fx.now it was last read.
	age, accessed time.Duration
	protected     bool
}

// add stores the item's blob and row, and its last access.
func (fx *fixture) add(t *testing.T, it item) storage.MediaRef {
	t.Helper()
	ctx := context.Background()
	kind := storage.KindLocal
	if it.remote {
		kind = storage.KindRemote
	}
	blob, err := storage.IngestTo(ctx, fx.ds, fx.meta, kind, strings.NewReader(it.body), storage.PutOptions{ExpectedSize: int64(len(it.body))})
	if err != nil {
		t.Fatalf("IngestTo: %v", err)
	}
	created := fx.now.Add(-it.age)
	m := storage.Media{ServerName: it.server, MediaID: it.id, State: storage.StateReady, SHA256: blob.SHA256, Size: blob.Size,
		ContentType: "image/png", CreatedAt: created, UploadedAt: created, Remote: it.remote, Protected: it.protected}
	if !it.remote {
		m.UserID = "@alice:" + it.server
	}
	if err := fx.meta.InsertMedia(ctx, m); err != nil {
		t.Fatalf("InsertMedia(%s): %v", it.id, err)
	}
	ref := storage.MediaRef{ServerName: it.server, MediaID: it.id}
	if it.accessed != 0 {
		if err := fx.meta.RecordAccess(ctx, []storage.Access{{MediaRef: ref, At: fx.now.Add(-it.accessed)}}); err != nil {
			t.Fatal(err)
		}
	}
	return ref
}

// thumb adds a thumbnail of ref created age before fx.now and returns its
// blob hash.
func (fx *fixture) thumb(t *testing.T, ref storage.MediaRef, width int, body string, age time.Duration) string {
	t.Helper()
	ctx := context.Background()
	blob, err := storage.IngestTo(ctx, fx.ds, fx.meta, storage.KindThumbnails, strings.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
	if err != nil {
		t.Fatalf("IngestTo: %v", err)
	}
	th := storage.Thumbnail{
		ThumbnailKey: storage.ThumbnailKey{ServerName: ref.ServerName, MediaID: ref.MediaID, Width: width, Height: width, Method: "scale"},
		ContentType:  "image/jpeg", SHA256: blob.SHA256, Size: blob.Size, ActualWidth: width, ActualHeight: width, CreatedAt: fx.now.Add(-age),
	}
	if err := fx.meta.InsertThumbnail(ctx, th); err != nil {
		t.Fatalf("InsertThumbnail: %v", err)
	}
	return blob.SHA256
}

// hashOf returns the blob hash of a media row.
func (fx *fixture) hashOf(t *testing.T, ref storage.MediaRef) string {
	t.Helper()
	m, err := fx.meta.GetMedia(context.Background(), ref.ServerName, ref.MediaID)
	if err != nil {
		t.Fatal(err)
	}
	return m.SHA256
}

// mediaExists reports whether the row exists.
func (fx *fixture) mediaExists(t *testing.T, ref storage.MediaRef) bool {
	t.Helper()
	_, err := fx.meta.GetMedia(context.Background(), ref.ServerName, ref.MediaID)
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

// blobExists reports whether the blob's record and bytes exist, failing
// when only one of them does.
func (fx *fixture) blobExists(t *testing.T, sha string) bool {
	t.Helper()
	ctx := context.Background()
	_, recErr := fx.meta.GetBlob(ctx, sha)
	_, statErr := fx.files.Stat(ctx, sha)
	for _, err := range []error{recErr, statErr} {
		if err != nil && !errors.Is(err, storage.ErrNotFound) {
			t.Fatal(err)
		}
	}
	if (recErr == nil) != (statErr == nil) {
		t.Fatalf("blob %s: record error %v, bytes error %v", sha[:8], recErr, statErr)
	}
	return recErr == nil
}

// thumbExists reports whether ref has a thumbnail of that width.
func (fx *fixture) thumbExists(t *testing.T, ref storage.MediaRef, width int) bool {
	t.Helper()
	_, err := fx.meta.GetThumbnail(context.Background(), storage.ThumbnailKey{ServerName: ref.ServerName, MediaID: ref.MediaID,
		Width: width, Height: width, Method: "scale"})
	if err != nil && !errors.Is(err, storage.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

// service builds a runner (owner) and a retention service on meta, both
// closed when the test ends.
func (fx *fixture) service(t *testing.T, meta Store, owner string, batch int, poll time.Duration) (*Service, *jobs.Runner) {
	t.Helper()
	if poll == 0 {
		poll = time.Hour
	}
	r, err := jobs.New(jobs.Options{Store: meta.(storage.JobStore), Owner: owner, Now: fx.clock.Now, Lease: time.Minute, PollInterval: poll})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	s, err := New(Options{Meta: meta, Stores: fx.ds, Runner: r, Grace: time.Millisecond, BatchSize: batch, Now: fx.clock.Now,
		Forget: func(ref storage.MediaRef) {
			fx.forgotMu.Lock()
			defer fx.forgotMu.Unlock()
			if fx.forgotten == nil {
				fx.forgotten = make(map[storage.MediaRef]int)
			}
			fx.forgotten[ref]++
		}})
	if err != nil {
		t.Fatal(err)
	}
	return s, r
}

// waitJob waits for a job with a generous bound.
func waitJob(t *testing.T, r *jobs.Runner, id string) storage.Job {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	j, err := r.Wait(ctx, id)
	if err != nil {
		t.Fatalf("Wait(%s): %v", id, err)
	}
	return j
}

const day = 24 * time.Hour

// body returns n bytes unique to name.
func body(name string, n int) string {
	s := name + ":" + strings.Repeat("x", n)
	return s[:n]
}

// TestPurgeRemote purges remote media last accessed before a time: only old
// remote rows go (quarantined included, protected kept, local media kept),
// with their thumbnails and the blobs nothing else references.
func TestPurgeRemote(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			fx := newFixture(t, be.newDB)
			ctx := context.Background()
			r := func(id string, age, accessed time.Duration) item {
				return item{server: remoteServer, id: id, remote: true, body: body(id, 100), age: age, accessed: accessed}
			}
			old1 := fx.add(t, r("old1", 20*day, 0))
			old2 := fx.add(t, r("old2", 30*day, 10*day))
			oldQ := fx.add(t, r("oldquarantined", 20*day, 0))
			recent := fx.add(t, r("recent", 30*day, day)) // created long ago, read yesterday
			fresh := fx.add(t, r("fresh", day, 0))
			prot := fx.add(t, item{server: remoteServer, id: "protected", remote: true, body: body("protected", 100), age: 20 * day, protected: true})
			local := fx.add(t, item{server: "example.org", id: "local", body: body("local", 100), age: 20 * day})
			// A remote copy sharing its bytes with local media: the row goes,
			// the blob stays.
			shared := fx.add(t, item{server: remoteServer, id: "oldshared", remote: true, body: body("local", 100), age: 20 * day})
			thumbOld1 := fx.thumb(t, old1, 32, body("thumb-old1", 50), 20*day)
			if _, err := fx.meta.QuarantineContent(ctx, storage.Quarantine{SHA256: fx.hashOf(t, oldQ), By: "@admin:example.org", At: fx.now}); err != nil {
				t.Fatal(err)
			}
			hashes := map[storage.MediaRef]string{}
			for _, ref := range []storage.MediaRef{old1, old2, oldQ, recent, fresh, prot, local, shared} {
				hashes[ref] = fx.hashOf(t, ref)
			}

			svc, runner := fx.service(t, fx.meta, "a", 2, 0)
			n, err := svc.PurgeRemote(ctx, fx.now.Add(-5*day), "@admin:example.org")
			if err != nil {
				t.Fatalf("PurgeRemote: %v", err)
			}
			if n != 4 {
				t.Errorf("PurgeRemote removed %d media, want 4", n)
			}
			for ref, want := range map[storage.MediaRef]bool{
				old1: false, old2: false, oldQ: false, shared: false,
				recent: true, fresh: true, prot: true, local: true,
			} {
				if got := fx.mediaExists(t, ref); got != want {
					t.Errorf("media %s exists = %v, want %v", ref.MediaID, got, want)
				}
				wantBlob := want || ref == shared
				if got := fx.blobExists(t, hashes[ref]); got != wantBlob {
					t.Errorf("blob of %s exists = %v, want %v", ref.MediaID, got, wantBlob)
				}
			}
			if fx.thumbExists(t, old1, 32) || fx.blobExists(t, thumbOld1) {
				t.Error("the thumbnail of a purged item (or its blob) is still there")
			}
			// Every removed item, and only those, was dropped from caches.
			if got, want := fx.forgot(), map[storage.MediaRef]int{old1: 1, old2: 1, oldQ: 1, shared: 1}; !maps.Equal(got, want) {
				t.Errorf("forgotten media %v, want %v", got, want)
			}
			js, err := runner.List(ctx, 10)
			if err != nil || len(js) != 1 {
				t.Fatalf("List = %v, %v; want one job", js, err)
			}
			j := js[0]
			// Freed: three 100-byte blobs and the 50-byte thumbnail blob.
			if j.Kind != KindPurgeRemote || j.State != storage.JobDone || j.Items != 4 || j.Bytes != 350 || j.RequestedBy != "@admin:example.org" {
				t.Errorf("job = %+v, want a done purge_remote of 4 items and 350 bytes", j)
			}
		})
	}
}

// TestRetentionPolicy applies each rule of a policy through the retention
// job, with an injected clock.
func TestRetentionPolicy(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			t.Run("remote_max_bytes keeps the most recently used", func(t *testing.T) {
				fx := newFixture(t, be.newDB)
				var refs []storage.MediaRef
				// r0 was read longest ago, r4 most recently; r1 was created
				// last but read early, r3 never read (its creation counts).
				for i, accessed := range []time.Duration{9 * day, 8 * day, 7 * day, 0, 2 * day} {
					id := fmt.Sprintf("r%d", i)
					age := 10 * day
					if i == 1 {
						age = 8*day + time.Hour
					}
					if i == 3 {
						age = 3 * day
					}
					refs = append(refs, fx.add(t, item{server: remoteServer, id: id, remote: true, body: body(id, 100), age: age, accessed: accessed}))
				}
				prot := fx.add(t, item{server: remoteServer, id: "protected", remote: true, body: body("protected", 100), age: 30 * day, protected: true})
				svc, runner := fx.service(t, fx.meta, "a", 2, 0)
				svc.SetPolicy(Policy{RemoteMaxBytes: 300})
				j := runRetention(t, svc, runner)
				// 600 bytes, budget 300: the three least recently used go
				// (the protected one cannot).
				want := map[string]bool{"r0": false, "r1": false, "r2": false, "r3": true, "r4": true}
				for _, ref := range refs {
					if got := fx.mediaExists(t, ref); got != want[ref.MediaID] {
						t.Errorf("%s exists = %v, want %v", ref.MediaID, got, want[ref.MediaID])
					}
				}
				if !fx.mediaExists(t, prot) {
					t.Error("protected remote media evicted")
				}
				if j.Items != 3 || j.Bytes != 300 {
					t.Errorf("job = %+v, want 3 items and 300 bytes", j)
				}
				if _, size, _ := fx.meta.RemoteCacheSize(context.Background()); size != 300 {
					t.Errorf("remote cache = %d bytes, want 300", size)
				}
			})
			t.Run("remote_max_age", func(t *testing.T) {
				fx := newFixture(t, be.newDB)
				old := fx.add(t, item{server: remoteServer, id: "old", remote: true, body: body("old", 10), age: 40 * day, accessed: 31 * day})
				kept := fx.add(t, item{server: remoteServer, id: "kept", remote: true, body: body("kept", 10), age: 40 * day, accessed: 29 * day})
				local := fx.add(t, item{server: "example.org", id: "local", body: body("local", 10), age: 400 * day})
				svc, runner := fx.service(t, fx.meta, "a", 0, 0)
				svc.SetPolicy(Policy{RemoteMaxAge: 30 * day})
				j := runRetention(t, svc, runner)
				if fx.mediaExists(t, old) || !fx.mediaExists(t, kept) || !fx.mediaExists(t, local) {
					t.Errorf("after retention: old %v kept %v local %v; want only old gone",
						fx.mediaExists(t, old), fx.mediaExists(t, kept), fx.mediaExists(t, local))
				}
				if j.Items != 1 || j.Bytes != 10 {
					t.Errorf("job = %+v, want 1 item of 10 bytes", j)
				}
			})
			t.Run("thumbnail_max_age", func(t *testing.T) {
				fx := newFixture(t, be.newDB)
				idle := fx.add(t, item{server: "example.org", id: "idle", body: body("idle", 10), age: 60 * day, accessed: 40 * day})
				never := fx.add(t, item{server: "example.org", id: "never", body: body("never", 10), age: 60 * day})
				busy := fx.add(t, item{server: "example.org", id: "busy", body: body("busy", 10), age: 60 * day, accessed: day})
				idleThumb := fx.thumb(t, idle, 32, body("t-idle", 20), 50*day)
				neverOld := fx.thumb(t, never, 32, body("t-never-old", 20), 50*day)
				neverNew := fx.thumb(t, never, 64, body("t-never-new", 20), day)
				busyThumb := fx.thumb(t, busy, 32, body("t-busy", 20), 50*day)
				// A thumbnail whose bytes equal another item's content: the
				// thumbnail goes, the blob stays.
				sharedThumb := fx.thumb(t, idle, 96, body("busy", 10), 50*day)
				svc, runner := fx.service(t, fx.meta, "a", 2, 0)
				svc.SetPolicy(Policy{ThumbnailMaxAge: 30 * day})
				j := runRetention(t, svc, runner)
				for _, c := range []struct {
					ref   storage.MediaRef
					width int
					sha   string
					want  bool
				}{
					{idle, 32, idleThumb, false}, {idle, 96, sharedThumb, false}, {never, 32, neverOld, false},
					{never, 64, neverNew, true}, {busy, 32, busyThumb, true},
				} {
					if got := fx.thumbExists(t, c.ref, c.width); got != c.want {
						t.Errorf("thumbnail %s/%d exists = %v, want %v", c.ref.MediaID, c.width, got, c.want)
					}
					wantBlob := c.want || c.sha == sharedThumb
					if got := fx.blobExists(t, c.sha); got != wantBlob {
						t.Errorf("blob of thumbnail %s/%d exists = %v, want %v", c.ref.MediaID, c.width, got, wantBlob)
					}
				}
				for _, ref := range []storage.MediaRef{idle, never, busy} {
					if !fx.mediaExists(t, ref) {
						t.Errorf("media %s removed with its thumbnails", ref.MediaID)
					}
				}
				if j.Items != 3 || j.Bytes != 40 {
					t.Errorf("job = %+v, want 3 thumbnails and 40 bytes", j)
				}
			})
			t.Run("off and one at a time", func(t *testing.T) {
				fx := newFixture(t, be.newDB)
				fx.add(t, item{server: remoteServer, id: "r", remote: true, body: body("r", 10), age: 40 * day})
				hook := &hookStore{Store: fx.meta}
				svc, runner := fx.service(t, hook, "a", 0, 0)
				ctx := context.Background()
				if _, started, err := svc.StartRetention(ctx, "retention"); started || err != nil {
					t.Fatalf("StartRetention with the policy off: started %v, %v", started, err)
				}
				svc.SetPolicy(Policy{RemoteMaxAge: day, Interval: time.Hour})
				reached, release := hook.blockList(1, false)
				first, started, err := svc.StartRetention(ctx, "retention")
				if !started || err != nil {
					t.Fatalf("StartRetention: started %v, %v", started, err)
				}
				<-reached
				// Another instance (another service and runner on the same
				// database) finds it running.
				other, _ := fx.service(t, fx.open(t), "b", 0, 0)
				other.SetPolicy(svc.Policy())
				got, started, err := other.StartRetention(ctx, "retention")
				if started || err != nil || got.ID != first.ID {
					t.Errorf("second StartRetention: %+v started %v, %v; want the running job %s", got, started, err, first.ID)
				}
				close(release)
				if j := waitJob(t, runner, first.ID); j.State != storage.JobDone || j.Items != 1 {
					t.Errorf("retention job = %+v, want done with 1 item", j)
				}
				// The same interval again: the slot's job exists already.
				if _, started, err := other.StartRetention(ctx, "retention"); started || err != nil {
					t.Errorf("StartRetention in the same interval: started %v, %v", started, err)
				}
				fx.clock.Advance(time.Hour)
				if _, started, err := other.StartRetention(ctx, "retention"); !started || err != nil {
					t.Errorf("StartRetention in the next interval: started %v, %v", started, err)
				}
			})
		})
	}
}

// runRetention runs one retention job to its end.
func runRetention(t *testing.T, svc *Service, runner *jobs.Runner) storage.Job {
	t.Helper()
	j, started, err := svc.StartRetention(context.Background(), "retention")
	if err != nil || !started {
		t.Fatalf("StartRetention: started %v, %v", started, err)
	}
	j = waitJob(t, runner, j.ID)
	if j.State != storage.JobDone || j.Kind != KindRetention {
		t.Fatalf("retention job = %+v, want done", j)
	}
	return j
}

// TestRunScheduler checks that the scheduler starts retention jobs on its
// own once a policy is set.
func TestRunScheduler(t *testing.T) {
	fx := newFixture(t, backends[0].newDB)
	ref := fx.add(t, item{server: remoteServer, id: "r", remote: true, body: body("r", 10), age: 40 * day})
	svc, runner := fx.service(t, fx.meta, "a", 0, 0)
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); svc.RunScheduler(ctx) }()
	defer func() { stop(); <-done }()
	svc.SetPolicy(Policy{RemoteMaxAge: day, Interval: 5 * time.Millisecond})
	deadline := time.Now().Add(time.Minute)
	for {
		js, err := runner.List(ctx, 10)
		if err != nil {
			t.Fatal(err)
		}
		if len(js) > 0 {
			if j := waitJob(t, runner, js[len(js)-1].ID); j.Kind != KindRetention || j.State != storage.JobDone || j.RequestedBy != "retention" {
				t.Fatalf("scheduled job = %+v", j)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no retention job started within a minute")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if fx.mediaExists(t, ref) {
		t.Error("the scheduled retention job left old remote media")
	}
}

// hookStore wraps the metadata store to pause or break a job at a chosen
// call, and records what DeleteMedia deleted.
type hookStore struct {
	*sqlstore.Store

	mu        sync.Mutex
	listCalls int
	// onList, when set, runs before ListOldMedia with the call number.
	onList   func(ctx context.Context, call int) error
	delCalls int
	// onDelete, when set, runs before DeleteMedia with the call number.
	onDelete func(ctx context.Context, call int) error
	// deleted counts each media row deleted through this handle.
	deleted map[storage.MediaRef]int
}

func (h *hookStore) ListOldMedia(ctx context.Context, q storage.OldMediaQuery) ([]storage.Media, error) {
	h.mu.Lock()
	h.listCalls++
	call, hook := h.listCalls, h.onList
	h.mu.Unlock()
	if hook != nil {
		if err := hook(ctx, call); err != nil {
			return nil, err
		}
	}
	return h.Store.ListOldMedia(ctx, q)
}

func (h *hookStore) DeleteMedia(ctx context.Context, refs []storage.MediaRef, tombstone bool, at time.Time) (storage.DeletedMedia, error) {
	h.mu.Lock()
	h.delCalls++
	call, hook := h.delCalls, h.onDelete
	h.mu.Unlock()
	if hook != nil {
		if err := hook(ctx, call); err != nil {
			return storage.DeletedMedia{}, err
		}
	}
	del, err := h.Store.DeleteMedia(ctx, refs, tombstone, at)
	h.mu.Lock()
	if h.deleted == nil {
		h.deleted = map[storage.MediaRef]int{}
	}
	for _, m := range del.Media {
		h.deleted[storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID}]++
	}
	h.mu.Unlock()
	return del, err
}

// blockList makes ListOldMedia call n signal reached and wait for release
// (or, with honourCtx, the end of its context, returning its error).
func (h *hookStore) blockList(n int, honourCtx bool) (reached <-chan struct{}, release chan struct{}) {
	r, rel := make(chan struct{}), make(chan struct{})
	h.mu.Lock()
	h.onList = blockAt(n, honourCtx, r, rel)
	h.mu.Unlock()
	return r, rel
}

// blockDelete does the same for DeleteMedia.
func (h *hookStore) blockDelete(n int, honourCtx bool) (reached <-chan struct{}, release chan struct{}) {
	r, rel := make(chan struct{}), make(chan struct{})
	h.mu.Lock()
	h.onDelete = blockAt(n, honourCtx, r, rel)
	h.mu.Unlock()
	return r, rel
}

func blockAt(n int, honourCtx bool, reached, release chan struct{}) func(context.Context, int) error {
	return func(ctx context.Context, call int) error {
		if call != n {
			return nil
		}
		close(reached)
		if !honourCtx {
			<-release
			return nil
		}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// TestPurgeResumes interrupts a purge in the middle of a batch, by stopping
// its runner (a restart) or by hanging it until its lease expires (a dead
// instance): another runner on the same database resumes it from its
// cursor, the totals add up and nothing is deleted twice.
func TestPurgeResumes(t *testing.T) {
	for _, be := range backends {
		for _, how := range []string{"stopped", "dead holder"} {
			t.Run(be.name+"/"+how, func(t *testing.T) {
				fx := newFixture(t, be.newDB)
				var want []storage.MediaRef
				for i := range 7 {
					id := fmt.Sprintf("m%d", i)
					want = append(want, fx.add(t, item{server: remoteServer, id: id, remote: true, body: body(id, 10), age: 20 * day}))
				}
				keep := fx.add(t, item{server: remoteServer, id: "new", remote: true, body: body("new", 10), age: day})
				hookA := &hookStore{Store: fx.meta}
				svcA, runnerA := fx.service(t, hookA, "a", 2, 0)
				// The second batch's deletion stops (or hangs).
				reached, release := hookA.blockDelete(2, how == "stopped")
				hookB := &hookStore{Store: fx.open(t)}
				_, runnerB := fx.service(t, hookB, "b", 2, 2*time.Millisecond)

				ctx := context.Background()
				job, err := svcA.StartPurgeRemote(ctx, fx.now.Add(-5*day), "caddy-admin-api")
				if err != nil {
					t.Fatal(err)
				}
				<-reached
				mid, _ := runnerB.Get(ctx, job.ID)
				if mid.Items != 2 || mid.Cursor == "" {
					t.Fatalf("at the second batch: %+v, want 2 items and a cursor", mid)
				}
				var aDone chan struct{}
				if how == "stopped" {
					runnerA.Close() // cancels the batch; the job is released
					fx.clock.Advance(time.Second)
				} else {
					fx.clock.Advance(time.Minute + time.Second) // a's lease expires
				}
				runCtx, stop := context.WithCancel(ctx)
				bDone := make(chan struct{})
				go func() { defer close(bDone); runnerB.Run(runCtx) }()
				defer func() { stop(); <-bDone }()
				got := waitJob(t, runnerB, job.ID)
				if how == "dead holder" {
					// a wakes up and finishes its batch: it deletes nothing
					// (b did) and stops at its next Save.
					aDone = make(chan struct{})
					go func() { defer close(aDone); close(release); runnerA.Close() }()
					<-aDone
				}
				final, _ := runnerB.Get(ctx, job.ID)
				if got.State != storage.JobDone || final.State != storage.JobDone || final.Items != 7 || final.Bytes != 70 {
					t.Errorf("job = %+v (then %+v), want done with 7 items and 70 bytes", got, final)
				}
				for _, ref := range want {
					if fx.mediaExists(t, ref) {
						t.Errorf("%s not purged", ref.MediaID)
					}
					if n := hookA.deleted[ref] + hookB.deleted[ref]; n != 1 {
						t.Errorf("%s deleted %d times (a %d, b %d), want once", ref.MediaID, n, hookA.deleted[ref], hookB.deleted[ref])
					}
				}
				if !fx.mediaExists(t, keep) {
					t.Error("recent remote media purged")
				}
				var onB []string
				for ref := range hookB.deleted {
					onB = append(onB, ref.MediaID)
				}
				sort.Strings(onB)
				if len(hookA.deleted) != 2 || len(onB) != 5 {
					t.Errorf("a deleted %d, b deleted %v; want 2 on a and the 5 others on b", len(hookA.deleted), onB)
				}
			})
		}
	}
}

// TestSetGrace: blobs claimed within the grace period in force (changed on
// reload with SetGrace) are left to the orphan collector, older ones go
// with their rows; 0 restores the default.
func TestSetGrace(t *testing.T) {
	fx := newFixture(t, backends[0].newDB)
	ctx := context.Background()
	first := fx.add(t, item{server: remoteServer, id: "first", remote: true, body: body("first", 100), age: 20 * day})
	firstHash := fx.hashOf(t, first)
	svc, _ := fx.service(t, fx.meta, "a", 10, 0)
	svc.SetGrace(40 * day)
	if got := svc.currentGrace(); got != 40*day {
		t.Fatalf("grace = %v after SetGrace(40 days)", got)
	}
	if n, err := svc.PurgeRemote(ctx, fx.now.Add(-5*day), "@admin:example.org"); err != nil || n != 1 {
		t.Fatalf("PurgeRemote = %d, %v; want 1", n, err)
	}
	if fx.mediaExists(t, first) || !fx.blobExists(t, firstHash) {
		t.Fatalf("with a 40-day grace: media exists %v, blob exists %v; want the row gone and the blob kept",
			fx.mediaExists(t, first), fx.blobExists(t, firstHash))
	}
	svc.SetGrace(0)
	if got := svc.currentGrace(); got != DefaultGrace {
		t.Fatalf("grace = %v after SetGrace(0), want %v", got, DefaultGrace)
	}
	svc.SetGrace(time.Millisecond)
	second := fx.add(t, item{server: remoteServer, id: "second", remote: true, body: body("second", 100), age: 20 * day})
	secondHash := fx.hashOf(t, second)
	if n, err := svc.PurgeRemote(ctx, fx.now.Add(-5*day), "@admin:example.org"); err != nil || n != 1 {
		t.Fatalf("PurgeRemote = %d, %v; want 1", n, err)
	}
	if fx.mediaExists(t, second) || fx.blobExists(t, secondHash) {
		t.Fatal("with a 1 ms grace the blob of a purged item should be gone with its row")
	}
}
