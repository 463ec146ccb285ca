package e2e

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
)

// outageLength is how long the backend stays down.
const outageLength = 10 * time.Second

// TestOutagePostgres stops the PostgreSQL server under upload and download
// load for 10 s and starts it again, without restarting Caddy.
func TestOutagePostgres(t *testing.T) {
	cluster := testpg.NewCluster(t)
	hs := newHomeserver(t, testTokens)
	cfg := newConfig(t, hs, site{serverName: "a.test"})
	cfg.database = "postgres {env.MATRIX_MEDIA_E2E_DSN}"
	cfg.appExtra = []string{"gc off"}
	inst := startCaddy(t, cfg, "MATRIX_MEDIA_E2E_DSN="+cluster.DSN())
	runOutage(t, inst, func() { cluster.Stop(t) }, func() { cluster.Start(t) })
}

// TestOutageS3 does the same with the S3 server (gofakes3 stopped, then
// served again on the same port with the same in-memory backend).
func TestOutageS3(t *testing.T) {
	srv := tests3.Start(t)
	hs := newHomeserver(t, testTokens)
	cfg := s3Config(t, hs, []string{s3Datastore("s3", srv, "kinds local"), "gc off"}, site{serverName: "a.test"})
	inst := startCaddy(t, cfg)
	runOutage(t, inst, srv.Stop, func() { srv.Restart(t) })
}

// outageLoad records what the load saw.
type outageLoad struct {
	mu       sync.Mutex
	uploaded map[string][]byte // media ID -> content, for every 200 upload
	ids      []string
	// unavailable counts 503 answers.
	unavailable int
	// bad lists answers that are neither 200 nor a 503 with a Matrix JSON
	// body, and requests that got no answer.
	bad []string
}

// check records one response.
func (l *outageLoad) check(what string, resp response, err error) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case err != nil:
		l.bad = append(l.bad, fmt.Sprintf("%s: no answer: %v", what, err))
		return false
	case resp.status == http.StatusOK:
		return true
	case resp.status == http.StatusServiceUnavailable && matrixJSON(resp):
		l.unavailable++
		return false
	default:
		l.bad = append(l.bad, fmt.Sprintf("%s: %v (%s)", what, resp, resp.header.Get("Content-Type")))
		return false
	}
}

// matrixJSON reports whether resp has a JSON body with an errcode and error.
func matrixJSON(resp response) bool {
	var e struct {
		ErrCode string `json:"errcode"`
		Error   string `json:"error"`
	}
	return headerHas(resp.header, "Content-Type", "application/json") &&
		json.Unmarshal(resp.body, &e) == nil && e.ErrCode != "" && e.Error != ""
}

// op uploads fresh content and downloads one earlier upload, recording both.
// It reports whether both were answered 200.
func (l *outageLoad) op(c *siteClient, rng *rand.Rand) bool {
	content := make([]byte, 1000+rng.IntN(50_000))
	for i := range content {
		content[i] = byte(rng.Uint32())
	}
	resp, err := c.do(request{method: http.MethodPost, path: "/_matrix/media/v3/upload", body: content, contentType: "application/octet-stream"})
	up := l.check("upload", resp, err)
	if up {
		id, err := c.parseMXC(resp.body)
		l.mu.Lock()
		if err != nil {
			l.bad = append(l.bad, err.Error())
		} else {
			l.uploaded[id] = content
			l.ids = append(l.ids, id)
		}
		l.mu.Unlock()
	}
	l.mu.Lock()
	id := l.ids[rng.IntN(len(l.ids))]
	want := l.uploaded[id]
	l.mu.Unlock()
	resp, err = c.do(request{method: http.MethodGet, path: c.downloadPath(id)})
	down := l.check("download "+id, resp, err)
	if down && string(resp.body) != string(want) {
		l.mu.Lock()
		l.bad = append(l.bad, fmt.Sprintf("download %s: %d bytes differ from the %d uploaded", id, len(resp.body), len(want)))
		l.mu.Unlock()
		return false
	}
	return up && down
}

// runOutage puts inst under upload/download load, runs stop, keeps the load
// on for outageLength, runs start, and checks that meanwhile every failure
// was a clean 503 with a Matrix JSON body, that service comes back in full
// without a restart, and that every upload answered 200 (before, during or
// after the outage) downloads byte-exact.
func runOutage(t *testing.T, inst *instance, stop, start func()) {
	const workers = 4
	c := newSiteClient(inst, "a.test", "token-alice", true)
	load := &outageLoad{uploaded: map[string][]byte{}}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 5 {
		if !load.op(c, rng) {
			t.Fatalf("before the outage: %v", load.bad)
		}
	}

	done := make(chan struct{})
	started := make(chan struct{}, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 5))
			for i := 0; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				load.op(c, rng)
				if i == 0 {
					started <- struct{}{}
				}
			}
		}()
	}
	for range workers {
		<-started
	}
	stop()
	time.Sleep(outageLength)
	start()

	// Full service again without a restart: the first success may take a
	// moment (connection pools notice the restart), then every request works.
	if !waitFor(time.Minute, func() bool { return load.op(c, rng) }) {
		t.Fatalf("no successful upload and download within a minute of the restart")
	}
	close(done)
	wg.Wait()
	load.mu.Lock()
	unavailable, bad := load.unavailable, load.bad
	load.bad = nil
	load.mu.Unlock()
	t.Logf("during the outage: %d answers 503; %d media uploaded in all", unavailable, len(load.ids))
	for _, b := range bad {
		t.Errorf("not a clean 503: %s", b)
	}
	if unavailable == 0 {
		t.Errorf("no request failed during the outage: the load did not reach the stopped backend")
	}
	for i := range 20 {
		if !load.op(c, rng) {
			t.Errorf("request %d after recovery failed: %v", i, load.bad)
		}
	}
	for id, want := range load.uploaded {
		if err := c.download(id, want); err != nil {
			t.Errorf("upload answered 200: %v", err)
		}
	}
}
