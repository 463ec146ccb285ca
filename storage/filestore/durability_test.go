package filestore

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// syncEvent is one fsync seen by a syncWatch: the synced path, and whether
// the blob being watched existed under its final name at that moment.
type syncEvent struct {
	path        string
	finalExists bool
}

// syncWatch replaces a store's syncFile: it records every sync and can hold
// the first sync of one path until released.
type syncWatch struct {
	final string // blob path whose existence each event records
	hold  string // path whose first sync is held ("" holds none)

	mu      sync.Mutex
	events  []syncEvent
	held    chan struct{} // closed when the held sync has started
	release chan struct{} // closing it lets the held sync go on
	holding bool
}

func watchSyncs(s *Store, final, hold string) *syncWatch {
	w := &syncWatch{final: final, hold: hold, held: make(chan struct{}), release: make(chan struct{})}
	s.syncFile = func(f *os.File) error {
		_, err := os.Lstat(w.final)
		w.mu.Lock()
		w.events = append(w.events, syncEvent{path: f.Name(), finalExists: err == nil})
		block := f.Name() == w.hold && !w.holding
		if block {
			w.holding = true
		}
		w.mu.Unlock()
		if block {
			close(w.held)
			<-w.release
		}
		return f.Sync()
	}
	return w
}

// seen returns the events recorded so far.
func (w *syncWatch) seen() []syncEvent {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.events)
}

func mustPut(t *testing.T, s *Store, body []byte) storage.PutResult {
	t.Helper()
	res, err := s.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	return res
}

// TestPutSyncsBeforeReturning checks the crash-safety order of a new blob:
// its data is synced before it appears under its name, a new shard
// directory's parent is synced before the rename too, and the blob's
// directory is synced after it; Put returns only after all of them.
func TestPutSyncsBeforeReturning(t *testing.T) {
	for _, tc := range []struct {
		name     string
		preShard bool
	}{
		{"new shard", false},
		{"existing shard", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t)
			body := randomBytes(7, 100<<10)
			sum := hexSum(body)
			outer, inner := s.shardDirs(sum)
			if tc.preShard {
				if err := os.MkdirAll(inner, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			w := watchSyncs(s, s.blobPath(sum), "")
			if res := mustPut(t, s, body); res.Existed || res.SHA256 != sum {
				t.Fatalf("Put = %+v, want a new blob %s", res, sum)
			}
			ev := w.seen()
			var dataSynced, innerSynced bool
			parents := map[string]bool{}
			for i, e := range ev {
				switch {
				case filepath.Dir(e.path) == s.tmpDir:
					if e.finalExists {
						t.Errorf("temp file synced after the rename: %+v", ev)
					}
					dataSynced = true
				case e.path == inner && e.finalExists:
					if i != len(ev)-1 {
						t.Errorf("blob directory synced before other syncs: %+v", ev)
					}
					innerSynced = true
				case e.path == outer || e.path == s.blobDir:
					if e.finalExists {
						t.Errorf("shard parent %s synced after the rename: %+v", e.path, ev)
					}
					parents[e.path] = true
				default:
					t.Errorf("unexpected sync %+v", e)
				}
			}
			if !dataSynced || !innerSynced {
				t.Errorf("syncs %+v: data synced %v, blob directory synced after rename %v", ev, dataSynced, innerSynced)
			}
			wantParents := map[string]bool{}
			if !tc.preShard {
				wantParents = map[string]bool{outer: true, s.blobDir: true}
			}
			if fmt.Sprint(parents) != fmt.Sprint(wantParents) {
				t.Errorf("shard parents synced %v, want %v", parents, wantParents)
			}
		})
	}
}

// TestDuplicateOfUnsyncedBlobSyncsIt: an upload that finds its bytes
// already in place while the upload that put them there is still syncing
// their directory must not return (answer 200) before the blob is durable:
// it syncs the blob and its directory itself.
func TestDuplicateOfUnsyncedBlobSyncsIt(t *testing.T) {
	s := newStore(t)
	body := randomBytes(9, 64<<10)
	sum := hexSum(body)
	final := s.blobPath(sum)
	_, inner := s.shardDirs(sum)
	w := watchSyncs(s, final, inner)

	// The first upload renamed its blob and is syncing its directory.
	first := putHeld(t, s, w, body, "the first upload never synced its blob directory")
	before := len(w.seen())
	res := mustPut(t, s, body)
	if !res.Existed {
		t.Errorf("second Put = %+v, want Existed", res)
	}
	var file, dir bool
	for _, e := range w.seen()[before:] {
		file = file || e.path == final
		dir = dir || e.path == inner
	}
	if !file || !dir {
		t.Errorf("second Put returned without syncing the blob (%v) and its directory (%v): %+v", file, dir, w.seen()[before:])
	}
	close(w.release)
	if err := <-first; err != nil {
		t.Fatalf("first Put: %v", err)
	}
	if s.isSettling(final) {
		t.Error("blob still marked as settling after both uploads returned")
	}
}

// sameShardBodies returns two different bodies whose blobs share a shard
// directory.
func sameShardBodies(t *testing.T) ([]byte, []byte) {
	t.Helper()
	seen := map[string][]byte{}
	for i := range 1 << 20 {
		b := []byte(fmt.Sprintf("shard mate %d", i))
		shard := hexSum(b)[:4]
		if other, ok := seen[shard]; ok {
			return other, b
		}
		seen[shard] = b
	}
	t.Fatal("no two bodies share a shard")
	return nil, nil
}

// TestSharedNewShardSyncedBeforeUse: an upload whose shard directory was
// just created by another upload still syncing its parent syncs the parent
// itself before relying on the directory.
func TestSharedNewShardSyncedBeforeUse(t *testing.T) {
	s := newStore(t)
	a, b := sameShardBodies(t)
	outer, inner := s.shardDirs(hexSum(a))
	w := watchSyncs(s, s.blobPath(hexSum(b)), outer)

	// The first upload created the shard and is syncing its parent.
	first := putHeld(t, s, w, a, "the first upload never synced the new shard's parent")
	if _, err := os.Stat(inner); err != nil {
		t.Fatalf("shard directory not created: %v", err)
	}
	before := len(w.seen())
	if res := mustPut(t, s, b); res.Existed {
		t.Fatalf("second Put = %+v, want a new blob", res)
	}
	var parentSynced bool
	for _, e := range w.seen()[before:] {
		if e.path == outer && !e.finalExists {
			parentSynced = true
		}
	}
	if !parentSynced {
		t.Errorf("second Put did not sync the shard's parent before its rename: %+v", w.seen()[before:])
	}
	close(w.release)
	if err := <-first; err != nil {
		t.Fatalf("first Put: %v", err)
	}
}

// TestConcurrentPutsOfOneShard stores many blobs, some identical, from
// many goroutines at once (for -race) and checks every one is in place.
func TestConcurrentPutsOfOneShard(t *testing.T) {
	s := newStore(t)
	a, b := sameShardBodies(t)
	bodies := [][]byte{a, b, randomBytes(1, 1000), randomBytes(2, 300<<10)}
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for i := range 32 {
		wg.Go(func() {
			body := bodies[i%len(bodies)]
			res, err := s.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
			if err == nil && res.SHA256 != hexSum(body) {
				err = fmt.Errorf("stored as %s, want %s", res.SHA256, hexSum(body))
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for _, body := range bodies {
		got, err := os.ReadFile(s.blobPath(hexSum(body)))
		if err != nil || !bytes.Equal(got, body) {
			t.Errorf("blob %s: %v, equal %v", hexSum(body), err, bytes.Equal(got, body))
		}
	}
	if len(s.settling) != 0 {
		t.Errorf("settling left over: %v", s.settling)
	}
}

// putHeld starts a Put of body in the background and waits until w holds
// one of its syncs (failing with never when it does not within 10 s). The
// channel receives the Put's error.
func putHeld(t *testing.T, s *Store, w *syncWatch, body []byte, never string) <-chan error {
	t.Helper()
	first := make(chan error, 1)
	go func() {
		_, err := s.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
		first <- err
	}()
	select {
	case <-w.held:
	case <-time.After(10 * time.Second):
		t.Fatal(never)
	}
	return first
}
