package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"image"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/cluster"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// TestScaleOut runs three Caddy instances on one PostgreSQL database, one S3
// datastore and one Redis, behind a load balancer, and checks that they
// behave as one media repository: an asynchronous upload completed on one
// instance wakes a download waiting on another; a burst of first downloads
// of one remote item makes one federation request, and a burst of cold
// requests of one thumbnail one generation, whichever instances serve them;
// a logout on one instance is honoured by all, and so are a quarantine and
// a deletion through one instance's admin API; a background job whose
// instance is killed resumes on another and finishes; and killing an
// instance during uploads loses no answered upload and leaves nothing the
// collector cannot clean.
func TestScaleOut(t *testing.T) {
	cl := startCluster(t)

	t.Run("async upload wakes a download on another instance", func(t *testing.T) { checkClusterAsyncUpload(t, cl) })
	t.Run("one federation request for a burst of remote downloads", func(t *testing.T) { checkClusterRemoteBurst(t, cl) })
	t.Run("one generation for a burst of thumbnail requests", func(t *testing.T) { checkClusterThumbnailBurst(t, cl) })
	t.Run("logout through one instance", func(t *testing.T) { checkClusterLogout(t, cl) })
	t.Run("quarantine and deletion through one instance", func(t *testing.T) { checkClusterMediaAdmin(t, cl) })
	t.Run("job resumes after its instance is killed", func(t *testing.T) { checkClusterJobResumes(t, cl) })
	for i, inst := range cl.insts {
		select {
		case <-inst.exited:
			cl.restart(t, i)
		default:
		}
	}
	t.Run("instance killed during uploads", func(t *testing.T) { checkClusterKillDuringUploads(t, cl) })
}

// spread is the client of request i of a burst: instances A, B and C
// directly in turn, every fourth request through the load balancer.
func spread(cl *scaleCluster, token string) func(i int) (*siteClient, string) {
	clients := []*siteClient{cl.client(0, token), cl.client(1, token), cl.client(2, token), cl.lbClient(token)}
	names := append(slices.Clone(instanceNames), "LB")
	return func(i int) (*siteClient, string) { return clients[i%4], names[i%4] }
}

// checkClusterAsyncUpload creates a media ID on A, waits for it on C
// (timeout_ms) and uploads its content on B: C answers with the content,
// well within the coordinator's fallback wake-up bound.
func checkClusterAsyncUpload(t *testing.T, cl *scaleCluster) {
	a, b, c := cl.client(0, "token-alice"), cl.client(1, "token-alice"), cl.client(2, "token-alice")
	resp := a.must(t, request{method: http.MethodPost, path: "/_matrix/media/v1/create", body: []byte("{}"), contentType: "application/json"})
	if resp.status != http.StatusOK {
		t.Fatalf("create on A: %v", resp)
	}
	id, err := a.parseMXC(resp.body)
	if err != nil {
		t.Fatal(err)
	}

	type result struct {
		resp response
		err  error
		at   time.Time
	}
	done := make(chan result, 1)
	go func() {
		r, err := c.do(request{method: http.MethodGet, path: c.downloadPath(id) + "?timeout_ms=20000"})
		done <- result{r, err, time.Now()}
	}()
	waiting := func() bool {
		return metricValue(t, cl.insts[2], "caddy_matrix_media_pending_uploads_waiting") == 1
	}
	if !waitFor(10*time.Second, waiting) {
		t.Fatalf("no download waiting for mxc://a.test/%s on C after 10 s", id)
	}

	content := randomBytes(200_000)
	put := b.must(t, request{method: http.MethodPut, path: "/_matrix/media/v3/upload/a.test/" + id + "?filename=async.pdf",
		body: content, contentType: "application/pdf"})
	putAt := time.Now()
	if put.status != http.StatusOK || strings.TrimSpace(string(put.body)) != "{}" {
		t.Fatalf("PUT on B: %v, want 200 {}", put)
	}
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("the download waiting on C did not answer within 30 s of the PUT on B")
	}
	if r.err != nil {
		t.Fatalf("download waiting on C: %v", r.err)
	}
	latency := r.at.Sub(putAt)
	t.Logf("the download waiting on C answered %v after the PUT on B was answered", latency.Round(time.Microsecond))
	if r.resp.status != http.StatusOK || !bytes.Equal(r.resp.body, content) {
		t.Fatalf("download waiting on C: %v, want 200 with the %d bytes put on B", r.resp, len(content))
	}
	if got := r.resp.header.Get("Content-Type"); got != "application/pdf" {
		t.Errorf("Content-Type = %q, want application/pdf", got)
	}
	if got := r.resp.header.Get("Content-Disposition"); !strings.Contains(got, "async.pdf") {
		t.Errorf("Content-Disposition = %q, want the file name async.pdf", got)
	}
	if got := r.resp.header.Get("Content-Length"); got != fmt.Sprint(len(content)) {
		t.Errorf("Content-Length = %q, want %d", got, len(content))
	}
	// A notification wakes the waiter at once; were it lost, the
	// coordinator's fallback wake-up would, within its interval (plus the
	// time to read and send the content).
	if bound := cluster.DefaultFallbackInterval + time.Second; latency > bound {
		t.Errorf("the download waiting on C answered %v after the PUT on B, want within %v (the coordinator's fallback wake-up)", latency, bound)
	}
	if got := metricValue(t, cl.insts[2], "caddy_matrix_media_pending_uploads_waiting"); got != 0 {
		t.Errorf("C still counts %v downloads waiting", got)
	}
}

// checkClusterRemoteBurst sends 20 concurrent first downloads of one item
// of a remote origin, spread over the instances: the origin, which holds its
// answer until every request was sent, sees one federation request, and
// every client gets the bytes.
func checkClusterRemoteBurst(t *testing.T, cl *scaleCluster) {
	const clients = 20
	content := randomBytes(256 << 10)
	var (
		requests atomic.Int64
		sent     atomic.Int64
		allSent  = make(chan struct{})
	)
	origin := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/_matrix/federation/v1/media/download/burst" {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			_, _ = io.WriteString(w, `{"errcode":"M_NOT_FOUND","error":"Not found"}`)
			return
		}
		requests.Add(1)
		// Hold the answer until every client request was sent, and a
		// second more for them to reach the instances, so that they
		// overlap on every instance; at most 10 s in all.
		select {
		case <-allSent:
		case <-time.After(9 * time.Second):
		}
		select {
		case <-time.After(time.Second):
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "multipart/mixed; boundary=b0undary")
		_, _ = io.WriteString(w, "--b0undary\r\nContent-Type: application/json\r\n\r\n{}\r\n"+
			"--b0undary\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"burst.bin\"\r\n\r\n")
		_, _ = w.Write(content)
		_, _ = io.WriteString(w, "\r\n--b0undary--\r\n")
	}))
	origin.TLS = &tls.Config{Certificates: []tls.Certificate{cl.pki.leaf}, MinVersion: tls.VersionTLS12}
	origin.Config.ErrorLog = log.New(io.Discard, "", 0)
	origin.StartTLS()
	t.Cleanup(origin.Close)
	path := downloadPath(origin.Listener.Addr().String(), "burst")

	waitsBefore := clusterWaits(t, cl, "remote")
	client := spread(cl, "token-alice")
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		failures []string
	)
	for i := range clients {
		c, via := client(i)
		trace := &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) {
			if sent.Add(1) == clients {
				close(allSent)
			}
		}}
		wg.Go(func() {
			resp, err := c.do(request{method: http.MethodGet, path: path, ctx: httptrace.WithClientTrace(context.Background(), trace)})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				failures = append(failures, fmt.Sprintf("client %d (via %s): %v", i, via, err))
			case resp.status != http.StatusOK:
				failures = append(failures, fmt.Sprintf("client %d (via %s): %v", i, via, resp))
			case !bytes.Equal(resp.body, content):
				failures = append(failures, fmt.Sprintf("client %d (via %s): %d bytes that differ from the %d of the origin", i, via, len(resp.body), len(content)))
			}
		})
	}
	wg.Wait()
	for _, f := range failures {
		t.Error(f)
	}
	t.Logf("cluster waits for the remote fetch by instance: %v", diffWaits(clusterWaits(t, cl, "remote"), waitsBefore))
	if got := requests.Load(); got != 1 {
		t.Errorf("%d concurrent first downloads over 3 instances made %d federation requests reach the origin, want 1", clients, got)
	}
	// Every instance now serves it from the shared cache.
	for i := range cl.insts {
		if err := downloadVia(cl.client(i, "token-alice"), path, content); err != nil {
			t.Errorf("download on %s after the burst: %v", instanceNames[i], err)
		}
	}
	if got := requests.Load(); got != 1 {
		t.Errorf("after the burst, downloads on each instance made the origin see %d requests in all, want still 1", got)
	}
}

// clusterWaits returns, by instance, how often work of a kind found its
// cluster lock held and waited (caddy_matrix_media_cluster_waits_total).
func clusterWaits(t *testing.T, cl *scaleCluster, work string) []float64 {
	t.Helper()
	var out []float64
	for _, inst := range cl.insts {
		out = append(out, metricValue(t, inst, `caddy_matrix_media_cluster_waits_total{work="`+work+`"}`))
	}
	return out
}

// diffWaits names the growth of each instance's count since before.
func diffWaits(now, before []float64) map[string]float64 {
	out := map[string]float64{}
	for i := range now {
		out[instanceNames[i]] = now[i] - before[i]
	}
	return out
}

// downloadVia downloads path with c and checks the bytes.
func downloadVia(c *siteClient, path string, want []byte) error {
	resp, err := c.do(request{method: http.MethodGet, path: path})
	if err != nil {
		return err
	}
	if resp.status != http.StatusOK || !bytes.Equal(resp.body, want) {
		return fmt.Errorf("GET %s: %d with %d bytes, want 200 with the %d expected", path, resp.status, len(resp.body), len(want))
	}
	return nil
}

// checkClusterThumbnailBurst sends 20 concurrent cold requests of one
// thumbnail of one stored image, spread over the instances: one
// generation in all, and every client gets the same valid image.
func checkClusterThumbnailBurst(t *testing.T, cl *scaleCluster) {
	const clients = 20
	img := e2eJPEG(t, 2400, 1800)
	id, err := cl.lbClient("token-alice").upload(img, "image/jpeg", "photo.jpg")
	if err != nil {
		t.Fatal(err)
	}
	const generations = "caddy_matrix_media_thumbnail_generation_seconds_count"
	before := cl.metricSum(t, generations)
	waitsBefore := clusterWaits(t, cl, "thumbnail")
	path := "/_matrix/client/v1/media/thumbnail/a.test/" + id + "?width=320&height=240&method=scale"

	client := spread(cl, "token-alice")
	var (
		start  = make(chan struct{})
		wg     sync.WaitGroup
		bodies = make([][]byte, clients)
		errs   = make([]error, clients)
	)
	for i := range clients {
		c, via := client(i)
		wg.Go(func() {
			<-start
			resp, err := c.do(request{method: http.MethodGet, path: path})
			switch {
			case err != nil:
				errs[i] = fmt.Errorf("client %d (via %s): %w", i, via, err)
			case resp.status != http.StatusOK || resp.header.Get("Content-Type") != "image/jpeg":
				errs[i] = fmt.Errorf("client %d (via %s): %v (Content-Type %q), want 200 image/jpeg", i, via, resp, resp.header.Get("Content-Type"))
			default:
				bodies[i] = resp.body
			}
		})
	}
	close(start)
	wg.Wait()
	for i, b := range bodies {
		if errs[i] != nil {
			t.Error(errs[i])
			continue
		}
		cfg, format, err := image.DecodeConfig(bytes.NewReader(b))
		if err != nil || format != "jpeg" || cfg.Width != 320 || cfg.Height != 240 {
			t.Errorf("client %d: thumbnail decodes as %s %dx%d (%v), want a 320x240 jpeg", i, format, cfg.Width, cfg.Height, err)
		}
		if bodies[0] != nil && !bytes.Equal(b, bodies[0]) {
			t.Errorf("client %d got other thumbnail bytes than client 0: more than one generation was served", i)
		}
	}
	t.Logf("cluster waits for the generation by instance: %v", diffWaits(clusterWaits(t, cl, "thumbnail"), waitsBefore))
	if got := cl.metricSum(t, generations) - before; got != 1 {
		t.Errorf("%d concurrent cold requests of one thumbnail over 3 instances made %v generations, want 1", clients, got)
	}
}

// checkClusterLogout logs a token out through the load balancer: every
// instance, each of which validated (and cached) the token before, rejects
// it; the user's other token keeps working everywhere.
func checkClusterLogout(t *testing.T, cl *scaleCluster) {
	cfgReq := request{method: http.MethodGet, path: "/_matrix/client/v1/media/config"}
	var carol, bob []*siteClient
	for i := range cl.insts {
		carol = append(carol, cl.client(i, "token-carol"))
		bob = append(bob, cl.client(i, "token-bob"))
	}
	for i := range cl.insts {
		for _, c := range []*siteClient{carol[i], bob[i]} {
			if r := c.must(t, cfgReq); r.status != http.StatusOK {
				t.Fatalf("config on %s before the logout: %v", instanceNames[i], r)
			}
		}
	}
	whoamis := cl.hs.whoamis.Load()
	for i := range cl.insts {
		if r := carol[i].must(t, cfgReq); r.status != http.StatusOK {
			t.Fatalf("config on %s: %v", instanceNames[i], r)
		}
	}
	if n := cl.hs.whoamis.Load() - whoamis; n != 0 {
		t.Fatalf("the instances asked the homeserver %d times about a token they validated already: no cache to invalidate, the test proves nothing", n)
	}

	logout := cl.lbClient("token-carol").must(t, request{method: http.MethodPost, path: "/_matrix/client/v3/logout",
		body: []byte("{}"), contentType: "application/json"})
	if logout.status != http.StatusOK || string(logout.body) != "{}" || logout.header.Get(hsMarker) != "1" {
		t.Fatalf("logout through the load balancer: %v", logout)
	}
	loggedOut := time.Now()
	for i := range cl.insts {
		var last response
		rejected := waitFor(5*time.Second, func() bool {
			last = carol[i].must(t, cfgReq)
			return last.status == http.StatusUnauthorized && last.errcode() == "M_UNKNOWN_TOKEN"
		})
		if !rejected {
			t.Errorf("%s still answers %v to the logged-out token %v after the logout", instanceNames[i], last, time.Since(loggedOut))
			continue
		}
		t.Logf("%s rejects the logged-out token (checked %v after the logout)", instanceNames[i], time.Since(loggedOut).Round(time.Millisecond))
	}
	for i := range cl.insts {
		if r := bob[i].must(t, cfgReq); r.status != http.StatusOK {
			t.Errorf("another user's token on %s after the logout: %v", instanceNames[i], r)
		}
	}
}

// checkClusterMediaAdmin quarantines an item through A's admin API and
// deletes another through B's, after every instance served (and cached)
// both: all three refuse them. Unquarantined through C, the first is served
// again everywhere.
func checkClusterMediaAdmin(t *testing.T, cl *scaleCluster) {
	lb := cl.lbClient("token-alice")
	quarantined, deleted := randomBytes(5000), randomBytes(6000)
	qID, err := lb.upload(quarantined, "application/octet-stream", "")
	if err != nil {
		t.Fatal(err)
	}
	dID, err := lb.upload(deleted, "application/octet-stream", "")
	if err != nil {
		t.Fatal(err)
	}
	clients := []*siteClient{cl.client(0, "token-alice"), cl.client(1, "token-alice"), cl.client(2, "token-alice")}
	for i, c := range clients {
		for _, it := range []struct {
			id      string
			content []byte
		}{{qID, quarantined}, {dID, deleted}} {
			if err := c.download(it.id, it.content); err != nil {
				t.Fatalf("on %s before the admin actions: %v", instanceNames[i], err)
			}
		}
	}
	// refusedEverywhere waits until every instance answers 404 M_NOT_FOUND
	// for id.
	refusedEverywhere := func(id, what string) {
		t.Helper()
		start := time.Now()
		for i, c := range clients {
			var last response
			refused := waitFor(5*time.Second, func() bool {
				last = c.must(t, request{method: http.MethodGet, path: c.downloadPath(id)})
				return last.status == http.StatusNotFound && last.errcode() == "M_NOT_FOUND"
			})
			if !refused {
				t.Errorf("%s still answers %d (errcode %q, %d bytes) for the %s item %v after the admin call",
					instanceNames[i], last.status, last.errcode(), len(last.body), what, time.Since(start).Round(time.Millisecond))
			}
		}
		t.Logf("every instance refuses the %s item (checked within %v)", what, time.Since(start).Round(time.Millisecond))
	}

	var q struct {
		N int `json:"num_quarantined"`
	}
	if st, body := adminDo(t, cl.insts[0], http.MethodPost, "/matrix_media/quarantine", map[string][]string{"media": {"mxc://a.test/" + qID}}, &q); st != http.StatusOK || q.N != 1 {
		t.Fatalf("quarantine through A: %d %s", st, body)
	}
	refusedEverywhere(qID, "quarantined")
	if st, body := adminDo(t, cl.insts[1], http.MethodPost, "/matrix_media/delete", map[string][]string{"media": {"mxc://a.test/" + dID}}, nil); st != http.StatusOK {
		t.Fatalf("delete through B: %d %s", st, body)
	}
	refusedEverywhere(dID, "deleted")

	var u struct {
		N int `json:"num_unquarantined"`
	}
	if st, body := adminDo(t, cl.insts[2], http.MethodPost, "/matrix_media/unquarantine", map[string][]string{"media": {"mxc://a.test/" + qID}}, &u); st != http.StatusOK || u.N != 1 {
		t.Fatalf("unquarantine through C: %d %s", st, body)
	}
	for i, c := range clients {
		var err error
		if !waitFor(5*time.Second, func() bool { err = c.download(qID, quarantined); return err == nil }) {
			t.Errorf("%s does not serve the unquarantined item 5 s after the unquarantine: %v", instanceNames[i], err)
		}
	}
}

// checkClusterJobResumes starts a remote media purge on A over 1200 seeded
// items, holds the job's blob deletions in the S3 proxy once it is past its
// first batch, kills A, and checks that the job resumes on B or C from its
// saved cursor and finishes: every seeded item removed, no blob deleted
// twice, each item counted once by whoever committed its removal (the
// batch A was in the middle of is lost from the counters, not redone), and,
// after a collector run, no seeded blob left.
func checkClusterJobResumes(t *testing.T, cl *scaleCluster) {
	const (
		items     = 1200
		server    = "purge.test"
		passFirst = 550 // the first batch (500) and part of the second
	)
	ctx := context.Background()
	meta, err := sqlstore.Open(ctx, "postgres", cl.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer meta.Close()
	store := openS3Store(t, cl.s3)

	// Seed cached remote media last used two hours ago, each with a blob
	// of its own recorded an hour ago (past the 1 s grace).
	old := time.Now().Add(-2 * time.Hour)
	keys := make([]string, items)
	hashes := make([]string, items)
	var (
		next  atomic.Int64
		wg    sync.WaitGroup
		errMu sync.Mutex
		errs  []error
	)
	for range 8 {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < items; i = int(next.Add(1) - 1) {
				content := fmt.Appendf(nil, "remote media %d of the purge job, %x", i, randomBytes(16))
				err := seedRemote(ctx, meta, store, storage.Media{ServerName: server, MediaID: fmt.Sprintf("m%04d", i),
					ContentType: "application/octet-stream", CreatedAt: old, UploadedAt: old, Remote: true}, content, old.Add(time.Hour))
				if err != nil {
					errMu.Lock()
					errs = append(errs, err)
					errMu.Unlock()
					return
				}
				keys[i], hashes[i] = blobKey(content), sha256Hex(content)
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("seeding %d remote media: %v", items, errors.Join(errs...))
	}
	remaining := func() int {
		t.Helper()
		page, err := meta.ListOldMedia(ctx, storage.OldMediaQuery{ServerName: server, Remote: true, Before: time.Now(),
			IncludeQuarantined: true, IncludeProtected: true, Limit: items + 1})
		if err != nil {
			t.Fatal(err)
		}
		return len(page)
	}
	if n := remaining(); n != items {
		t.Fatalf("%d seeded remote media listed, want %d", n, items)
	}

	cl.s3p.holdDeletes(keys, passFirst)
	defer cl.s3p.release()
	a, b := cl.insts[0], cl.insts[1]
	var job adminJob
	st, body := adminDo(t, a, http.MethodPost, "/matrix_media/purge", map[string]int64{"before_ts": time.Now().Add(-time.Hour).UnixMilli()}, &job)
	if st != http.StatusAccepted || job.ID == "" || job.Kind != "purge_remote" {
		t.Fatalf("POST /matrix_media/purge on A: %d %s", st, body)
	}
	ownerA := job.Owner
	if !strings.Contains(ownerA, fmt.Sprintf("/%d/", a.cmd.Process.Pid)) {
		t.Fatalf("the job started on A is owned by %q, not by A (pid %d)", ownerA, a.cmd.Process.Pid)
	}
	getJob := func(inst *instance) adminJob {
		t.Helper()
		var j adminJob
		if st, body := adminDo(t, inst, http.MethodGet, "/matrix_media/jobs/"+job.ID, nil, &j); st != http.StatusOK {
			t.Fatalf("GET /matrix_media/jobs/%s: %d %s", job.ID, st, body)
		}
		return j
	}
	if !waitFor(2*time.Minute, func() bool { return len(cl.s3p.heldNow()) > 0 }) {
		t.Fatalf("the job never reached its second batch's blob deletions: %+v", getJob(b))
	}
	if j := getJob(b); j.State != "running" || j.Owner != ownerA {
		t.Fatalf("job before the kill: %+v, want running on A (%s)", j, ownerA)
	}

	held := cl.s3p.heldNow()
	cl.kill(t, 0)
	killedAt := time.Now()
	if !waitFor(10*time.Second, func() bool { return !cl.s3p.stillHeld(held) }) {
		t.Fatalf("the DELETEs A was sending when it was killed are still held 10 s later")
	}
	cl.s3p.release()
	// What A committed before it died. Nobody takes the job over before its
	// lease (renewed every third of it) runs out, and a runner that does
	// claims it (changes its owner) before it removes anything: the items
	// left are counted first, then the job is read, still A's.
	left := remaining()
	atKill := getJob(b)
	t.Logf("A killed with %d blob deletions held; the job had counted %d items, cursor %s; %d items not yet removed",
		len(held), atKill.Items, atKill.Cursor, left)
	if atKill.State != "running" || atKill.Owner != ownerA || atKill.Cursor == "" || left == 0 {
		t.Fatalf("job right after the kill: %+v with %d items left, want running, still A's, past its first batch with items left", atKill, left)
	}

	// The owners the job is seen with, in order: A until its lease runs
	// out, then the instance that resumed it (if seen before it finished).
	var (
		final  adminJob
		owners []string
	)
	finished := waitFor(clusterJobLease+clusterJobPoll+time.Minute, func() bool {
		final = getJob(b)
		if final.Owner != "" && (len(owners) == 0 || owners[len(owners)-1] != final.Owner) {
			owners = append(owners, final.Owner)
		}
		return final.State != "running"
	})
	if !finished {
		t.Fatalf("the job is not finished %v after A was killed: %+v", clusterJobLease+clusterJobPoll+time.Minute, final)
	}
	if final.State != "done" || final.Error != "" {
		t.Fatalf("job after the kill: %+v, want done", final)
	}
	livePIDs := []string{fmt.Sprintf("/%d/", cl.insts[1].cmd.Process.Pid), fmt.Sprintf("/%d/", cl.insts[2].cmd.Process.Pid)}
	for i, o := range owners {
		if i == 0 && o == ownerA {
			continue
		}
		if !strings.Contains(o, livePIDs[0]) && !strings.Contains(o, livePIDs[1]) {
			t.Errorf("after A was killed the job was owned by %s, neither B nor C (owners seen in order: %q)", o, owners)
		}
	}
	// The instance that resumed it says so, and finished it; the job ran
	// nowhere else.
	var resumedOn, doneOn []string
	for i := 1; i < len(cl.insts); i++ {
		for line := range strings.Lines(cl.insts[i].logs.String()) {
			if !strings.Contains(line, `"job":"`+job.ID+`"`) {
				continue
			}
			if strings.Contains(line, `"msg":"resuming job"`) {
				resumedOn = append(resumedOn, instanceNames[i])
			}
			if strings.Contains(line, `"msg":"job done"`) {
				doneOn = append(doneOn, instanceNames[i])
			}
		}
	}
	if len(resumedOn) != 1 || !slices.Equal(doneOn, resumedOn) {
		t.Errorf("the job was resumed on %v and finished on %v, want both once, on the same instance, B or C", resumedOn, doneOn)
	} else {
		t.Logf("the job resumed and finished on %s, done %v after A was killed; owners seen in order: %q",
			resumedOn[0], time.Since(killedAt).Round(time.Millisecond), owners)
	}
	if n := remaining(); n != 0 {
		t.Errorf("%d seeded remote media left after the job, want none", n)
	}
	// Rows are counted when their deletion commits, so the batch A died in
	// is counted too: every seeded item exactly once.
	if final.Items != items {
		t.Errorf("the job counted %d items, want the %d removed", final.Items, items)
	}
	if final.Items != atKill.Items+int64(left) {
		t.Errorf("the job counted %d items: %d before the kill and %d after, want %d after (each remaining item once)",
			final.Items, atKill.Items, final.Items-atKill.Items, left)
	}
	for k, n := range cl.s3p.deletes() {
		if n > 1 {
			t.Errorf("blob %s was deleted %d times", k, n)
		}
	}

	// The blobs of the batch A was in the middle of are left to the
	// collector.
	var rep struct {
		Error string `json:"error"`
	}
	if st, body := adminDo(t, b, http.MethodPost, "/matrix_media/gc", map[string]string{"grace": "0s"}, &rep); st != http.StatusOK || rep.Error != "" {
		t.Fatalf("POST /matrix_media/gc on B: %d %s", st, body)
	}
	stored := map[string]bool{}
	for _, k := range cl.s3.Objects(t) {
		stored[k] = true
	}
	for i, k := range keys {
		if stored[k] {
			t.Errorf("blob of seeded item %d still in S3 after the job and a collection", i)
		}
		if _, err := meta.GetBlob(ctx, hashes[i]); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("blob record of seeded item %d after the job and a collection: %v, want not found", i, err)
		}
	}
}

// adminJob is a background job of the admin API (GET /matrix_media/jobs).
type adminJob struct {
	ID     string `json:"id"`
	Kind   string `json:"kind"`
	State  string `json:"state"`
	Items  int64  `json:"items"`
	Cursor string `json:"cursor"`
	Error  string `json:"error"`
	Owner  string `json:"owner"`
}

// seedRemote stores content in store and records it and m (a ready remote
// item) in meta, the blob as created at blobCreated.
func seedRemote(ctx context.Context, meta *sqlstore.Store, store storage.BlobStore, m storage.Media, content []byte, blobCreated time.Time) error {
	b, err := store.Put(ctx, bytes.NewReader(content), storage.PutOptions{ExpectedSize: int64(len(content))})
	if err != nil {
		return fmt.Errorf("storing %s: %w", m.MediaID, err)
	}
	if _, err := meta.RecordBlob(ctx, storage.BlobRecord{SHA256: b.SHA256, Size: b.Size, PrefixSHA256: b.PrefixSHA256,
		Datastore: "s3", CreatedAt: blobCreated}); err != nil {
		return fmt.Errorf("recording the blob of %s: %w", m.MediaID, err)
	}
	m.State, m.SHA256, m.Size = storage.StateReady, b.SHA256, b.Size
	if err := meta.InsertMedia(ctx, m); err != nil {
		return fmt.Errorf("inserting %s: %w", m.MediaID, err)
	}
	return nil
}

// checkClusterKillDuringUploads kills B while 100 uploads run through the
// load balancer (and 5 more are stalled mid-body on B itself, so certainly
// in progress there): every upload answered 200 downloads byte-exact from
// A and C, no blob record lacks its bytes, and after a collection every blob
// in S3 is recorded and referenced.
func checkClusterKillDuringUploads(t *testing.T, cl *scaleCluster) {
	const (
		uploads   = 100
		stalled   = 5
		killAfter = 30
		victim    = 1
	)
	lb := cl.lbClient("token-alice")
	lb.http.Timeout = 2 * time.Minute
	contents := crashContents(uploads, 3)

	var (
		ok      atomic.Int64
		failed  atomic.Int64
		mu      sync.Mutex
		ids     = map[int]string{}
		killed  = make(chan struct{})
		release = make(chan struct{})
		reached = make(chan struct{}, uploads)
		wg      sync.WaitGroup
	)
	victimPort := cl.cfgs[victim].httpPort
	stalledClient := &http.Client{Timeout: 2 * time.Minute}
	for i := range uploads {
		wg.Go(func() {
			if i < stalled {
				stalledUpload(t, stalledClient, victimPort, contents[i], release, killed, reached)
				return
			}
			id, err := lb.upload(contents[i], "application/octet-stream", "")
			if err != nil {
				failed.Add(1)
				return
			}
			mu.Lock()
			ids[i] = id
			mu.Unlock()
			if ok.Add(1) == killAfter {
				reached <- struct{}{}
			}
		})
	}
	for range stalled + 1 {
		<-reached
	}
	cl.kill(t, victim)
	close(killed)
	close(release)
	wg.Wait()
	mu.Lock()
	answered := len(ids)
	mu.Unlock()
	t.Logf("killed B with %d of %d uploads through the load balancer answered 200 (%d failed; %d stalled on B)",
		answered, uploads-stalled, failed.Load(), stalled)
	if answered < killAfter {
		t.Fatalf("only %d uploads answered 200, want at least the %d before the kill", answered, killAfter)
	}

	survivors := []int{0, 2}
	checkAll := func(when string) {
		t.Helper()
		for _, s := range survivors {
			c := cl.client(s, "token-alice")
			for i, id := range ids {
				if err := c.download(id, contents[i]); err != nil {
					t.Errorf("upload %d (answered 200) on %s %s: %v", i, instanceNames[s], when, err)
				}
			}
		}
	}
	checkAll("after the kill")

	ctx := context.Background()
	meta, err := sqlstore.Open(ctx, "postgres", cl.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer meta.Close()
	store := openS3Store(t, cl.s3)
	checkRecordsHaveBytes(t, meta, store, "s3")

	out, err := exec.Command(caddyBinary(t), "matrix-media", "gc", "--grace", "0s",
		"--address", fmt.Sprintf("127.0.0.1:%d", cl.cfgs[0].adminPort)).CombinedOutput()
	if err != nil {
		t.Fatalf("caddy matrix-media gc on A: %v\n%s", err, out)
	}
	t.Logf("caddy matrix-media gc on A: %s", strings.TrimSpace(string(out)))
	checkRecordsHaveBytes(t, meta, store, "s3")
	checkBlobsReferenced(t, meta, store)
	checkAll("after the collection")
}

// TestScaleOutSQLiteSecondProcess starts a second Caddy on the SQLite file
// of a running one: SQLite cannot be shared between instances, so the
// second must refuse to start with an error naming the file and the first
// one's PID, and the first keeps serving.
func TestScaleOutSQLiteSecondProcess(t *testing.T) {
	hs := newHomeserver(t, testTokens)
	first := newConfig(t, hs, site{serverName: "a.test"})
	instA := startCaddy(t, first)

	second := newConfig(t, hs, site{serverName: "a.test"})
	second.database = first.database
	second.storagePath = first.storagePath
	instB := launchCaddy(t, second)
	deadline := time.Now().Add(2 * time.Minute)
	for !instB.waitExit(100 * time.Millisecond) {
		if instB.serving() {
			t.Fatalf("a second Caddy serves on the SQLite file of a running one:\n%s", lastLines([]byte(instB.logs.String()), 30))
		}
		if time.Now().After(deadline) {
			t.Fatalf("the second Caddy neither failed nor served within 2 minutes:\n%s", lastLines([]byte(instB.logs.String()), 30))
		}
	}
	logs := instB.logs.String()
	if instB.waitErr == nil {
		t.Errorf("the second Caddy exited successfully:\n%s", lastLines([]byte(logs), 30))
	}
	dbFile := strings.TrimPrefix(first.database, "sqlite ")
	if !strings.Contains(logs, dbFile) {
		t.Errorf("the second Caddy's error does not name the SQLite file %s:\n%s", dbFile, lastLines([]byte(logs), 30))
	}
	pidRE := regexp.MustCompile(`.*\b` + strconv.Itoa(instA.cmd.Process.Pid) + `\b.*`)
	if line := pidRE.FindString(logs); line == "" {
		t.Errorf("the second Caddy's error does not name the PID %d of the Caddy using the file:\n%s", instA.cmd.Process.Pid, lastLines([]byte(logs), 30))
	} else {
		t.Logf("the second Caddy refused to start: %s", line)
	}

	c := newSiteClient(instA, "a.test", "token-alice", true)
	content := randomBytes(10_000)
	id, err := c.upload(content, "application/octet-stream", "")
	if err != nil {
		t.Fatalf("upload on the first Caddy after the second was refused: %v", err)
	}
	if err := c.download(id, content); err != nil {
		t.Fatal(err)
	}
}
