package caddymodule

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// startHeldJob starts background work on res's repository that waits for
// gate and then writes a media row; its write error is sent on the returned
// channel. It returns once the work is registered.
func startHeldJob(t *testing.T, res *resources, blob storage.IngestResult, gate <-chan struct{}) <-chan error {
	t.Helper()
	written := make(chan error, 1)
	ok := res.repo.Go("test_job", func() {
		<-gate
		now := time.Now()
		written <- res.meta.InsertMedia(context.Background(), storage.Media{
			ServerName: "example.org", MediaID: "backgroundjob", State: storage.StateReady,
			SHA256: blob.SHA256, Size: blob.Size, Datastore: blob.Datastore, ContentType: "text/plain", CreatedAt: now, UploadedAt: now,
		})
	})
	if !ok {
		t.Fatal("background work refused on open resources")
	}
	return written
}

// waitDraining waits until the repository refuses new background work.
func waitDraining(res *resources) {
	for res.repo.Go("probe", func() {}) {
		time.Sleep(time.Millisecond)
	}
}

// When the last config is unloaded while background work runs, the stores
// are closed only after that work finished, and its write succeeds: within
// the bounded wait Destruct waits for it.
func TestResourcesCloseAfterBackgroundWork(t *testing.T) {
	for _, tc := range []struct {
		name      string
		drainWait time.Duration
	}{
		{"Destruct waits", time.Minute},
		{"Destruct returns, the close follows the work", time.Nanosecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, unload := provisionApp(t, *testAppConfig(t))
			res := a.res
			res.drainWait = tc.drainWait
			// The stores need the blob the job's row points at (foreign key).
			blob, err := storage.IngestTo(context.Background(), res.stores, res.meta, storage.KindLocal, strings.NewReader("job"), storage.PutOptions{ExpectedSize: 3})
			if err != nil {
				t.Fatal(err)
			}
			gate := make(chan struct{})
			written := startHeldJob(t, res, blob, gate)
			unloaded := make(chan struct{})
			go func() { defer close(unloaded); unload() }()
			waitDraining(res)
			if tc.drainWait < time.Second {
				<-unloaded // Destruct gave up waiting
			}
			select {
			case <-res.closed:
				t.Fatal("stores closed under running background work")
			default:
			}
			close(gate)
			if err := <-written; err != nil {
				t.Fatalf("background write after the unload: %v", err)
			}
			<-unloaded
			<-res.closed
			if res.closeErr != nil {
				t.Fatalf("closing stores: %v", res.closeErr)
			}
			if err := metaWorks(res); err == nil {
				t.Fatal("metadata store still answers after the close")
			}
		})
	}
}
