package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/s3store"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// crashSetup is one store combination of TestCrashDuringUploads: a config
// and what Caddy needs in its environment, plus direct handles on the same
// stores for the test's inspection.
type crashSetup struct {
	cfg       config
	env       []string
	driver    string
	dsn       string
	datastore string
	openStore func(t *testing.T) storage.BlobStore
}

// TestCrashDuringUploads kills Caddy with SIGKILL while 100 uploads are in
// flight (some of them stalled mid-body, so certainly in progress), restarts
// it on the same stores, and checks: every upload that was answered 200
// downloads byte-exact; no blob record points at missing bytes; and after
// `caddy matrix-media gc --grace 0s`, every blob left in the datastore has a
// record that something references. Crash leftovers of the window between a
// blob write and its record (bytes without a record, a record without a
// reference) are also planted directly, so that the collector provably
// removes both kinds whatever moment the kill hit.
func TestCrashDuringUploads(t *testing.T) {
	t.Run("files+sqlite", func(t *testing.T) {
		hs := newHomeserver(t, testTokens)
		cfg := newConfig(t, hs, site{serverName: "a.test"})
		cfg.appExtra = []string{"gc off"}
		runCrash(t, crashSetup{
			cfg: cfg, driver: "sqlite", dsn: filepath.Join(cfg.dataDir, "media.db"), datastore: "default",
			openStore: func(t *testing.T) storage.BlobStore {
				s, err := filestore.New(cfg.storagePath)
				if err != nil {
					t.Fatal(err)
				}
				return s
			},
		})
	})
	t.Run("s3+postgres", func(t *testing.T) {
		srv := tests3.Start(t)
		dsn := testpg.DSN(t)
		hs := newHomeserver(t, testTokens)
		cfg := s3Config(t, hs, []string{s3Datastore("s3", srv, "kinds local"), "gc off"}, site{serverName: "a.test"})
		cfg.database = "postgres {env.MATRIX_MEDIA_E2E_DSN}"
		runCrash(t, crashSetup{
			cfg: cfg, env: []string{"MATRIX_MEDIA_E2E_DSN=" + dsn}, driver: "postgres", dsn: dsn, datastore: "s3",
			openStore: func(t *testing.T) storage.BlobStore { return openS3Store(t, srv) },
		})
	})
}

// stalledBody sends the first half of content, then blocks until release is
// closed, then fails (the connection is gone by then).
type stalledBody struct {
	r       io.Reader
	sent    chan<- struct{}
	release <-chan struct{}
	once    sync.Once
}

func (b *stalledBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err == io.EOF {
		b.once.Do(func() { close(b.sent) })
		<-b.release
		return 0, errors.New("released")
	}
	return n, err
}

func runCrash(t *testing.T, s crashSetup) {
	const (
		uploads   = 100
		stalled   = 5
		killAfter = 30
	)
	inst := startCaddy(t, s.cfg, s.env...)
	client := newSiteClient(inst, "a.test", "token-alice", true)
	client.http.Timeout = 2 * time.Minute

	contents := crashContents(uploads, 1)

	var (
		ok      atomic.Int64
		mu      sync.Mutex
		ids     = map[int]string{}
		killed  = make(chan struct{})
		release = make(chan struct{})
		reached = make(chan struct{}, uploads)
		wg      sync.WaitGroup
	)
	for i := range uploads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i < stalled {
				stalledUpload(t, client.http, inst.cfg.httpPort, contents[i], release, killed, reached)
				return
			}
			id, err := client.upload(contents[i], "application/octet-stream", "")
			if err == nil {
				mu.Lock()
				ids[i] = id
				mu.Unlock()
				if ok.Add(1) == killAfter {
					reached <- struct{}{}
				}
			}
		}()
	}
	// Kill once the stalled uploads are mid-body and 30 uploads succeeded.
	for range stalled + 1 {
		<-reached
	}
	if err := inst.cmd.Process.Kill(); err != nil {
		t.Fatalf("killing caddy: %v", err)
	}
	<-inst.exited
	close(killed)
	close(release)
	wg.Wait()
	mu.Lock()
	answered := len(ids)
	mu.Unlock()
	t.Logf("killed caddy with %d of %d uploads answered 200", answered, uploads)
	if answered >= uploads-stalled {
		t.Fatalf("every upload finished before the kill; the test did not crash anything in flight")
	}

	// Restart on the same stores.
	inst2 := startCaddy(t, s.cfg, s.env...)
	client2 := newSiteClient(inst2, "a.test", "token-alice", true)
	for i, id := range ids {
		if err := client2.download(id, contents[i]); err != nil {
			t.Errorf("upload %d answered 200 before the crash: %v", i, err)
		}
	}

	ctx := context.Background()
	meta, err := sqlstore.Open(ctx, s.driver, s.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer meta.Close()
	store := s.openStore(t)
	checkRecordsHaveBytes(t, meta, store, s.datastore)

	// Plant the two kinds of leftovers of the write window: bytes without a
	// record, and a record nothing references.
	unrecorded, err := store.Put(ctx, bytes.NewReader([]byte("crash leftover without a record")), storage.PutOptions{ExpectedSize: -1})
	if err != nil {
		t.Fatal(err)
	}
	unreferenced, err := store.Put(ctx, bytes.NewReader([]byte("crash leftover without a reference")), storage.PutOptions{ExpectedSize: -1})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := meta.RecordBlob(ctx, storage.BlobRecord{SHA256: unreferenced.SHA256, Size: unreferenced.Size,
		PrefixSHA256: unreferenced.PrefixSHA256, Datastore: s.datastore, CreatedAt: time.Now().Add(-time.Minute)}); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(caddyBinary(t), "matrix-media", "gc", "--grace", "0s",
		"--address", fmt.Sprintf("127.0.0.1:%d", inst2.cfg.adminPort)).CombinedOutput()
	if err != nil {
		t.Fatalf("caddy matrix-media gc: %v\n%s", err, out)
	}
	t.Logf("caddy matrix-media gc: %s", strings.TrimSpace(string(out)))
	if !strings.HasPrefix(string(out), "removed ") {
		t.Errorf("gc output %q does not report what it removed", out)
	}
	for _, h := range []string{unrecorded.SHA256, unreferenced.SHA256} {
		if _, err := store.Stat(ctx, h); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("planted leftover %s still stored after gc: %v", h[:8], err)
		}
	}
	checkRecordsHaveBytes(t, meta, store, s.datastore)
	checkBlobsReferenced(t, meta, store)
	for i, id := range ids {
		if err := client2.download(id, contents[i]); err != nil {
			t.Errorf("upload %d after gc: %v", i, err)
		}
	}
}

// openS3Store opens the fake S3 server's bucket directly, for the test's
// inspection; it is closed when the test ends.
func openS3Store(t *testing.T, srv *tests3.Server) *s3store.Store {
	t.Helper()
	s, err := s3store.New(context.Background(), s3store.Config{
		Endpoint: srv.URL(), Region: "us-east-1", Bucket: srv.Bucket(), PathStyle: true,
		AccessKeyID: srv.AccessKey(), SecretAccessKey: srv.SecretKey(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// checkRecordsHaveBytes fails the test for every blob record of datastore
// whose bytes are missing from store.
func checkRecordsHaveBytes(t *testing.T, meta *sqlstore.Store, store storage.BlobStore, datastore string) {
	t.Helper()
	ctx := context.Background()
	after, n := "", 0
	for {
		page, err := meta.ListBlobs(ctx, datastore, after, 500)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range page {
			n++
			if size, err := store.Stat(ctx, b.SHA256); err != nil || size != b.Size {
				t.Errorf("blob record %s (%d bytes) has no matching bytes: size %d, %v", b.SHA256[:8], b.Size, size, err)
			}
		}
		if len(page) < 500 {
			break
		}
		after = page[len(page)-1].SHA256
	}
	if n == 0 {
		t.Errorf("no blob records in datastore %s", datastore)
	}
}

// checkBlobsReferenced fails the test for every blob in store that has no
// record, or whose record nothing references.
func checkBlobsReferenced(t *testing.T, meta *sqlstore.Store, store storage.BlobStore) {
	t.Helper()
	ctx := context.Background()
	err := store.(storage.Lister).List(ctx, func(b storage.StoredBlob) error {
		if _, err := meta.GetBlob(ctx, b.SHA256); err != nil {
			t.Errorf("stored blob %s has no record after gc: %v", b.SHA256[:8], err)
			return nil
		}
		if n, err := meta.CountBlobReferences(ctx, b.SHA256); err != nil || n == 0 {
			t.Errorf("stored blob %s is referenced %d times after gc (%v)", b.SHA256[:8], n, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// crashContents returns n upload bodies of 1 KB to 300 KB, random from
// seed, every tenth a copy of an earlier one (dedup under the crash too).
func crashContents(n int, seed uint64) [][]byte {
	rng := rand.New(rand.NewPCG(seed, seed+1))
	contents := make([][]byte, n)
	for i := range contents {
		if i%10 == 9 {
			contents[i] = contents[i-5]
			continue
		}
		contents[i] = make([]byte, 1000+rng.IntN(300_000))
		for j := range contents[i] {
			contents[i][j] = byte(rng.Uint32())
		}
	}
	return contents
}

// stalledUpload sends the first half of body as an upload (as alice, to
// a.test) to the Caddy listening on port and stalls there: once the half is
// sent it signals reached, then waits for killed (Caddy was killed) and for
// the request to fail; an answer is an error. release ends the stall.
func stalledUpload(t *testing.T, client *http.Client, port int, body []byte, release, killed <-chan struct{}, reached chan<- struct{}) {
	sent := make(chan struct{})
	req, _ := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/_matrix/media/v3/upload", port),
		&stalledBody{r: bytes.NewReader(body[:len(body)/2]), sent: sent, release: release})
	req.Host = fmt.Sprintf("a.test:%d", port)
	req.ContentLength = int64(len(body))
	req.Header.Set("Authorization", "Bearer token-alice")
	done := make(chan struct{})
	go func() {
		defer close(done)
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			t.Errorf("stalled upload to port %d got an answer: %s", port, resp.Status)
		}
	}()
	<-sent
	reached <- struct{}{}
	<-killed
	<-done
}
