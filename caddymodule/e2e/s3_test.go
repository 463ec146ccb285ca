package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dustin/go-humanize"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
)

// s3Datastore renders a "datastore <name> s3 { ... }" block of the global
// option for the fake S3 server srv, with extra lines (kinds, part_size,
// redirect...) inside the block.
func s3Datastore(name string, srv *tests3.Server, extra ...string) string {
	return s3DatastoreAt(name, srv.URL(), srv, extra...)
}

// s3DatastoreAt is s3Datastore reaching srv through endpoint (a proxy in
// front of it).
func s3DatastoreAt(name, endpoint string, srv *tests3.Server, extra ...string) string {
	lines := []string{
		"datastore " + name + " s3 {",
		"\tendpoint " + endpoint,
		"\tregion us-east-1",
		"\tbucket " + srv.Bucket(),
		"\tpath_style",
		"\taccess_key_id " + srv.AccessKey(),
		"\tsecret_access_key " + srv.SecretKey(),
	}
	for _, l := range extra {
		lines = append(lines, "\t"+l)
	}
	lines = append(lines, "}")
	return strings.Join(lines, "\n\t\t")
}

// s3Config returns a config of the given sites whose media go to the
// datastores in appExtra (no storage_path), accepting uploads up to 64 MiB.
func s3Config(t *testing.T, hs *homeserver, appExtra []string, sites ...site) config {
	cfg := newConfig(t, hs, sites...)
	cfg.noStoragePath = true
	cfg.maxUploadSize = "64MiB"
	cfg.appExtra = appExtra
	return cfg
}

// sha256Hex is the lowercase hex SHA-256 of b.
func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// blobKey is the object key (and file path under a file datastore) of the
// blob of content b.
func blobKey(b []byte) string {
	h := sha256Hex(b)
	return "blobs/" + h[0:2] + "/" + h[2:4] + "/" + h
}

// keysWithPrefix returns the keys of the bucket that start with prefix.
func keysWithPrefix(t *testing.T, srv *tests3.Server, prefix string) []string {
	t.Helper()
	var out []string
	for _, k := range srv.Objects(t) {
		if strings.HasPrefix(k, prefix) {
			out = append(out, k)
		}
	}
	return out
}

// fileBlobKeys returns the blob files under a file datastore's directory as
// slash-separated paths relative to it, sorted.
func fileBlobKeys(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(filepath.Join(dir, "blobs"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			rel, err := filepath.Rel(dir, p)
			if err != nil {
				return err
			}
			out = append(out, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walking %s: %v", dir, err)
	}
	slices.Sort(out)
	return out
}

// adminDo sends a request to Caddy's admin API and decodes a JSON answer into
// out (when not nil). It returns the status and the raw body.
func adminDo(t *testing.T, inst *instance, method, path string, body, out any) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", inst.cfg.adminPort, path), rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("admin %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("admin %s %s: reading body: %v", method, path, err)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("admin %s %s: %d: decoding %q: %v", method, path, resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode, data
}

// storeCount is one entry of GET /matrix_media/datastores.
type storeCount struct {
	Name  string `json:"name"`
	Blobs int64  `json:"blobs"`
	Bytes int64  `json:"bytes"`
}

// datastoreCounts returns GET /matrix_media/datastores by datastore name.
func datastoreCounts(t *testing.T, inst *instance) map[string]storeCount {
	t.Helper()
	var list []storeCount
	if st, body := adminDo(t, inst, http.MethodGet, "/matrix_media/datastores", nil, &list); st != http.StatusOK {
		t.Fatalf("GET /matrix_media/datastores: %d %s", st, body)
	}
	out := map[string]storeCount{}
	for _, d := range list {
		out[d.Name] = d
	}
	return out
}

// checkCounts fails the test unless the datastores hold exactly want blobs
// of wantBytes bytes (both keyed by datastore name).
func checkCounts(t *testing.T, inst *instance, want map[string][2]int64) {
	t.Helper()
	got := datastoreCounts(t, inst)
	if len(got) != len(want) {
		t.Errorf("datastores = %v, want %d of them", got, len(want))
	}
	for name, w := range want {
		g, ok := got[name]
		if !ok {
			t.Errorf("datastore %s missing from GET /matrix_media/datastores: %v", name, got)
			continue
		}
		if g.Blobs != w[0] || g.Bytes != w[1] {
			t.Errorf("datastore %s: %d blobs, %d bytes; want %d blobs, %d bytes", name, g.Blobs, g.Bytes, w[0], w[1])
		}
	}
}

// metricValue returns the value of one sample of Caddy's admin /metrics
// (series is the metric name with its labels, as exposed), or 0 if absent.
func metricValue(t *testing.T, inst *instance, series string) float64 {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", inst.cfg.adminPort))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("admin /metrics: %d %v", resp.StatusCode, err)
	}
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %q: %v", series, v, err)
			}
			return f
		}
	}
	return 0
}

// waitFor polls cond every 200 ms until it holds or timeout passes, and
// reports whether it held.
func waitFor(timeout time.Duration, cond func() bool) bool {
	for deadline := time.Now().Add(timeout); ; {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkS3Clean fails the test if the bucket holds tmp objects or multipart
// uploads in progress.
func checkS3Clean(t *testing.T, srv *tests3.Server) {
	t.Helper()
	if tmp := keysWithPrefix(t, srv, "tmp/"); len(tmp) != 0 {
		t.Errorf("tmp objects left in the bucket: %q", tmp)
	}
	if n := srv.MultipartUploads(t); n != 0 {
		t.Errorf("%d multipart uploads left in progress", n)
	}
}

func TestS3UploadDownloadRangeDedup(t *testing.T) {
	srv := tests3.Start(t)
	hs := newHomeserver(t, testTokens)
	cfg := s3Config(t, hs, []string{s3Datastore("s3", srv, "kinds local", "part_size 5MiB")},
		site{serverName: "a.test"}, site{serverName: "b.test"})
	inst := startCaddy(t, cfg)
	a := newSiteClient(inst, "a.test", "token-alice", true)
	b := newSiteClient(inst, "b.test", "token-bob", true)

	const size = 3 << 20
	content := randomBytes(size)
	idA, err := a.upload(content, "application/octet-stream", "")
	if err != nil {
		t.Fatal(err)
	}
	idB, err := b.upload(content, "application/octet-stream", "")
	if err != nil {
		t.Fatal(err)
	}

	t.Run("stored once", func(t *testing.T) {
		if got, want := keysWithPrefix(t, srv, "blobs/"), []string{blobKey(content)}; !slices.Equal(got, want) {
			t.Errorf("blob objects = %q, want %q", got, want)
		}
		if got := srv.Objects(t); len(got) != 1 {
			t.Errorf("bucket holds %q, want only the blob", got)
		}
		checkS3Clean(t, srv)
		checkCounts(t, inst, map[string][2]int64{"s3": {1, size}})
	})

	t.Run("download", func(t *testing.T) {
		for _, c := range []struct {
			client *siteClient
			id     string
		}{{a, idA}, {b, idB}} {
			if err := c.client.download(c.id, content); err != nil {
				t.Error(err)
			}
			legacy := "/_matrix/media/v3/download/" + c.client.serverName + "/" + c.id
			resp := c.client.must(t, request{method: http.MethodGet, path: legacy, noAuth: true})
			if resp.status != http.StatusOK || !bytes.Equal(resp.body, content) {
				t.Errorf("legacy download on %s: got %v", c.client.serverName, resp)
			}
			if got := resp.header.Get("Content-Length"); got != strconv.Itoa(size) {
				t.Errorf("legacy download on %s: Content-Length = %q, want %d", c.client.serverName, got, size)
			}
		}
	})

	t.Run("range", func(t *testing.T) {
		resp := a.must(t, request{method: http.MethodGet, path: a.downloadPath(idA), header: map[string]string{"Range": "bytes=1000-1999"}})
		if resp.status != http.StatusPartialContent || !bytes.Equal(resp.body, content[1000:2000]) {
			t.Fatalf("range request: got %d with %d bytes, want 206 with bytes 1000-1999", resp.status, len(resp.body))
		}
		if got, want := resp.header.Get("Content-Range"), fmt.Sprintf("bytes 1000-1999/%d", size); got != want {
			t.Errorf("Content-Range = %q, want %q", got, want)
		}
		if got := resp.header.Get("Content-Length"); got != "1000" {
			t.Errorf("Content-Length of the range = %q, want 1000", got)
		}
		// A range at the very end of the object.
		resp = b.must(t, request{method: http.MethodGet, path: b.downloadPath(idB), header: map[string]string{"Range": "bytes=-10"}})
		if resp.status != http.StatusPartialContent || !bytes.Equal(resp.body, content[size-10:]) {
			t.Errorf("suffix range request: got %d with %d bytes, want 206 with the last 10 bytes", resp.status, len(resp.body))
		}
	})

	t.Run("HEAD", func(t *testing.T) {
		resp := a.must(t, request{method: http.MethodHead, path: a.downloadPath(idA)})
		if resp.status != http.StatusOK || len(resp.body) != 0 {
			t.Fatalf("HEAD: got %v, want 200 with no body", resp)
		}
		if got := resp.header.Get("Content-Length"); got != strconv.Itoa(size) {
			t.Errorf("HEAD Content-Length = %q, want %d", got, size)
		}
	})

	t.Run("multipart", func(t *testing.T) {
		const bigSize = 12 << 20
		big := randomBytes(bigSize)
		partsBefore := metricValue(t, inst, `caddy_matrix_media_datastore_operations_total{datastore="s3",op="UploadPart",result="ok"}`)
		id, err := a.upload(big, "application/octet-stream", "big.bin")
		if err != nil {
			t.Fatal(err)
		}
		// 12 MiB in parts of 5 MiB: three parts.
		parts := metricValue(t, inst, `caddy_matrix_media_datastore_operations_total{datastore="s3",op="UploadPart",result="ok"}`) - partsBefore
		if parts != 3 {
			t.Errorf("the 12 MiB upload took %v UploadPart requests, want 3 (a multipart upload of 5 MiB parts)", parts)
		}
		if n := metricValue(t, inst, `caddy_matrix_media_datastore_operations_total{datastore="s3",op="CompleteMultipartUpload",result="ok"}`); n < 1 {
			t.Errorf("no CompleteMultipartUpload recorded")
		}
		if err := a.download(id, big); err != nil {
			t.Fatal(err)
		}
		resp := a.must(t, request{method: http.MethodGet, path: a.downloadPath(id), header: map[string]string{"Range": "bytes=5242870-5242889"}})
		if resp.status != http.StatusPartialContent || !bytes.Equal(resp.body, big[5242870:5242890]) {
			t.Errorf("range across a part boundary: got %d with %d bytes", resp.status, len(resp.body))
		}
		want := []string{blobKey(content), blobKey(big)}
		slices.Sort(want)
		if got := keysWithPrefix(t, srv, "blobs/"); !slices.Equal(got, want) {
			t.Errorf("blob objects = %q, want %q", got, want)
		}
		// The tmp object of the multipart upload is deleted right after the
		// copy into place (retried in the background should that fail).
		if !waitFor(10*time.Second, func() bool { return len(keysWithPrefix(t, srv, "tmp/")) == 0 }) {
			t.Errorf("tmp objects left: %q", keysWithPrefix(t, srv, "tmp/"))
		}
		checkS3Clean(t, srv)
		checkCounts(t, inst, map[string][2]int64{"s3": {2, size + bigSize}})
	})
}

// migrationJob is a job of the migration admin API.
type migrationJob struct {
	ID       string `json:"id"`
	Error    string `json:"error"`
	Progress struct {
		From, To                string
		TotalBlobs, DoneBlobs   int64
		FailedBlobs, TotalBytes int64
		DoneBytes               int64
		Running                 bool
		LastError               string
	} `json:"progress"`
}

func TestS3MigrationFileToS3AndBack(t *testing.T) {
	srv := tests3.Start(t)
	hs := newHomeserver(t, testTokens)
	diskDir := filepath.Join(t.TempDir(), "disk")
	cfg := s3Config(t, hs, []string{
		"datastore disk file " + diskDir + " {\n\t\t\tkinds local\n\t\t}",
		s3Datastore("s3", srv),
	}, site{serverName: "a.test"})
	inst := startCaddy(t, cfg)
	a := newSiteClient(inst, "a.test", "token-alice", true)

	// 20 distinct bodies from 1 byte to 2 MiB.
	sizes := []int{1, 2, 17, 100, 511, 1024, 4095, 4096, 4097, 10_000, 65_536, 100_000,
		262_144, 500_000, 1 << 20, 1<<20 + 1, 1_500_000, 1_999_999, 2<<20 - 1, 2 << 20}
	type item struct {
		id      string
		content []byte
	}
	var items []item
	var total int64
	var wantKeys []string
	for _, n := range sizes {
		c := randomBytes(n)
		id, err := a.upload(c, "application/octet-stream", "")
		if err != nil {
			t.Fatalf("uploading %d bytes: %v", n, err)
		}
		items = append(items, item{id, c})
		total += int64(n)
		wantKeys = append(wantKeys, blobKey(c))
	}
	slices.Sort(wantKeys)
	checkAll := func(t *testing.T) {
		t.Helper()
		for _, it := range items {
			resp := a.must(t, request{method: http.MethodGet, path: a.downloadPath(it.id)})
			if resp.status != http.StatusOK || sha256Hex(resp.body) != sha256Hex(it.content) {
				t.Errorf("download of %s (%d bytes): got %d, %d bytes with sha256 %s; want sha256 %s",
					it.id, len(it.content), resp.status, len(resp.body), sha256Hex(resp.body), sha256Hex(it.content))
			}
		}
	}
	if got := fileBlobKeys(t, diskDir); !slices.Equal(got, wantKeys) {
		t.Fatalf("disk blob files before the migration = %q, want %q", got, wantKeys)
	}
	checkCounts(t, inst, map[string][2]int64{"disk": {20, total}, "s3": {0, 0}})

	t.Run("CLI disk to s3", func(t *testing.T) {
		start := time.Now()
		cmd := exec.Command(caddyBinary(t), "matrix-media", "migrate", "--from", "disk", "--to", "s3",
			"--address", fmt.Sprintf("127.0.0.1:%d", cfg.adminPort))
		cmd.Dir = cfg.dataDir
		cmd.Env = append(os.Environ(), "HOME="+cfg.dataDir,
			"XDG_DATA_HOME="+filepath.Join(cfg.dataDir, "xdg-data"),
			"XDG_CONFIG_HOME="+filepath.Join(cfg.dataDir, "xdg-config"))
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("caddy matrix-media migrate: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
			}
		case <-time.After(3 * time.Minute):
			_ = cmd.Process.Kill()
			<-done
			t.Fatalf("caddy matrix-media migrate still running after 3 minutes\nstderr:\n%s", stderr.String())
		}
		t.Logf("CLI migration took %v\n%s", time.Since(start).Round(time.Millisecond), stderr.String())
		if !regexp.MustCompile(`(?m)^migration [0-9a-f]{16} started: disk -> s3$`).MatchString(stderr.String()) {
			t.Errorf("stderr lacks the start line:\n%s", stderr.String())
		}
		final := fmt.Sprintf("] 100%% 20/20 blobs, %s/%s", humanize.IBytes(uint64(total)), humanize.IBytes(uint64(total)))
		if !strings.Contains(stderr.String(), "[##############################"+final) {
			t.Errorf("stderr lacks the final progress line %q:\n%s", final, stderr.String())
		}

		checkCounts(t, inst, map[string][2]int64{"disk": {0, 0}, "s3": {20, total}})
		out, err := exec.Command(caddyBinary(t), "matrix-media", "datastores",
			"--address", fmt.Sprintf("127.0.0.1:%d", cfg.adminPort)).Output()
		if err != nil {
			t.Fatalf("caddy matrix-media datastores: %v", err)
		}
		var listed []string
		for line := range strings.Lines(string(out)) {
			listed = append(listed, strings.Join(strings.Fields(line), " "))
		}
		wantListed := []string{"disk 0 blobs 0 B", "s3 20 blobs " + humanize.IBytes(uint64(total))}
		if !slices.Equal(listed, wantListed) {
			t.Errorf("caddy matrix-media datastores printed %q, want %q", listed, wantListed)
		}
		if got := keysWithPrefix(t, srv, "blobs/"); !slices.Equal(got, wantKeys) {
			t.Errorf("blob objects = %q, want %q", got, wantKeys)
		}
		checkS3Clean(t, srv)
		checkAll(t)
		// The sources are deleted after a 30 s grace; the migration job
		// waits for those deletions, but allow some slack.
		if !waitFor(60*time.Second, func() bool { return len(fileBlobKeys(t, diskDir)) == 0 }) {
			t.Errorf("disk blob files left after the migration: %q", fileBlobKeys(t, diskDir))
		}
		checkAll(t)
	})

	t.Run("admin API s3 to disk", func(t *testing.T) {
		start := time.Now()
		var job migrationJob
		st, body := adminDo(t, inst, http.MethodPost, "/matrix_media/migrations", map[string]string{"from": "s3", "to": "disk"}, &job)
		if st != http.StatusAccepted || job.ID == "" || job.Progress.From != "s3" || job.Progress.To != "disk" {
			t.Fatalf("POST /matrix_media/migrations: %d %s", st, body)
		}
		// A second migration touching the same datastores is refused.
		if st, body := adminDo(t, inst, http.MethodPost, "/matrix_media/migrations", map[string]string{"from": "disk", "to": "s3"}, nil); st != http.StatusConflict {
			t.Errorf("concurrent POST /matrix_media/migrations: %d %s, want 409", st, body)
		}
		ok := waitFor(3*time.Minute, func() bool {
			st, body := adminDo(t, inst, http.MethodGet, "/matrix_media/migrations/"+job.ID, nil, &job)
			if st != http.StatusOK {
				t.Fatalf("GET /matrix_media/migrations/%s: %d %s", job.ID, st, body)
			}
			return !job.Progress.Running
		})
		if !ok {
			t.Fatalf("migration still running after 3 minutes: %+v", job)
		}
		t.Logf("admin API migration took %v", time.Since(start).Round(time.Millisecond))
		p := job.Progress
		if job.Error != "" || p.TotalBlobs != 20 || p.DoneBlobs != 20 || p.FailedBlobs != 0 ||
			p.TotalBytes != total || p.DoneBytes != total || p.LastError != "" {
			t.Errorf("finished job = %+v, want 20 of 20 blobs (%d bytes) moved, no failures", job, total)
		}
		var jobs []migrationJob
		if st, body := adminDo(t, inst, http.MethodGet, "/matrix_media/migrations", nil, &jobs); st != http.StatusOK || len(jobs) != 2 || jobs[0].ID != job.ID {
			t.Errorf("GET /matrix_media/migrations: %d %s, want both jobs, newest (%s) first", st, body, job.ID)
		}

		checkCounts(t, inst, map[string][2]int64{"disk": {20, total}, "s3": {0, 0}})
		if got := fileBlobKeys(t, diskDir); !slices.Equal(got, wantKeys) {
			t.Errorf("disk blob files = %q, want %q", got, wantKeys)
		}
		checkAll(t)
		if !waitFor(60*time.Second, func() bool { return len(keysWithPrefix(t, srv, "blobs/")) == 0 }) {
			t.Errorf("blob objects left in the bucket after the migration: %q", keysWithPrefix(t, srv, "blobs/"))
		}
		if got := srv.Objects(t); len(got) != 0 {
			t.Errorf("bucket not empty after migrating back: %q", got)
		}
		checkS3Clean(t, srv)
		checkAll(t)
	})
}

// slowUpload sends a POST upload of size random bytes over a raw connection,
// writing chunks with pauses, and reports the bytes written so far in sent.
// The response is read concurrently, so an early answer (before the body is
// fully sent) is seen as it arrives; it is delivered on the returned channel
// (or the error that prevented reading it).
func slowUpload(t *testing.T, c *siteClient, size int, sent *atomic.Int64) (<-chan *http.Response, <-chan error, func()) {
	t.Helper()
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", c.port))
	if err != nil {
		t.Fatal(err)
	}
	_ = conn.SetDeadline(time.Now().Add(3 * time.Minute))
	req, err := http.NewRequest(http.MethodPost, "/_matrix/media/v3/upload", nil)
	if err != nil {
		t.Fatal(err)
	}
	head := fmt.Sprintf("POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"+
		"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", c.serverName, c.port, c.token, size)
	if _, err := io.WriteString(conn, head); err != nil {
		t.Fatal(err)
	}
	go func() {
		chunk := randomBytes(128 << 10)
		for sent.Load() < int64(size) {
			n := min(len(chunk), size-int(sent.Load()))
			if _, err := conn.Write(chunk[:n]); err != nil {
				return // the server answered and closed, or the test ended
			}
			sent.Add(int64(n))
			time.Sleep(5 * time.Millisecond)
		}
	}()
	respc := make(chan *http.Response, 1)
	errc := make(chan error, 1)
	go func() {
		resp, err := http.ReadResponse(bufio.NewReader(conn), req)
		if err != nil {
			errc <- err
			return
		}
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			errc <- fmt.Errorf("reading the response body: %w", err)
			return
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
		respc <- resp
	}()
	return respc, errc, func() { _ = conn.Close() }
}

func TestS3DiesMidUpload(t *testing.T) {
	srv := tests3.Start(t)
	hs := newHomeserver(t, testTokens)
	cfg := s3Config(t, hs, []string{s3Datastore("s3", srv, "kinds local", "part_size 5MiB")}, site{serverName: "a.test"})
	inst := startCaddy(t, cfg)
	a := newSiteClient(inst, "a.test", "token-alice", true)

	before := randomBytes(1 << 20)
	beforeID, err := a.upload(before, "application/octet-stream", "")
	if err != nil {
		t.Fatal(err)
	}

	const size = 40 << 20
	var sent atomic.Int64
	respc, errc, closeConn := slowUpload(t, a, size, &sent)
	defer closeConn()
	if !waitFor(2*time.Minute, func() bool { return sent.Load() >= 12<<20 }) {
		t.Fatalf("only %d bytes of the upload sent after 2 minutes", sent.Load())
	}
	srv.Stop()
	stopped := time.Now()
	t.Logf("S3 stopped after %d bytes were sent", sent.Load())

	select {
	case resp := <-respc:
		took := time.Since(stopped)
		body, _ := io.ReadAll(resp.Body)
		r := response{status: resp.StatusCode, header: resp.Header, body: body}
		t.Logf("upload answered %v %s after S3 stopped (%d of %d bytes sent); Retry-After %q",
			took.Round(time.Millisecond), r, sent.Load(), size, resp.Header.Get("Retry-After"))
		if r.status != http.StatusBadGateway && r.status != http.StatusServiceUnavailable {
			t.Errorf("upload while S3 is down: got %v, want 502 or 503", r)
		}
		if r.errcode() != "M_UNKNOWN" || !headerHas(resp.Header, "Content-Type", "application/json") {
			t.Errorf("upload while S3 is down: got %v (Content-Type %q), want a Matrix JSON error M_UNKNOWN", r, resp.Header.Get("Content-Type"))
		}
		if took > 30*time.Second {
			t.Errorf("the upload was answered %v after S3 stopped, want within 30s", took)
		}
		if sent.Load() >= size {
			t.Errorf("the whole body was sent before the answer; the failure was not seen mid-upload")
		}
	case err := <-errc:
		t.Fatalf("upload while S3 is down: no HTTP response after %v: %v", time.Since(stopped), err)
	case <-time.After(90 * time.Second):
		t.Fatalf("upload while S3 is down: no answer %v after S3 stopped (%d bytes sent)", time.Since(stopped), sent.Load())
	}
	closeConn()

	srv.Restart(t)
	t.Logf("right after S3 restarted: %d multipart uploads in progress, tmp objects %q",
		srv.MultipartUploads(t), keysWithPrefix(t, srv, "tmp/"))
	if err := a.download(beforeID, before); err != nil {
		t.Errorf("download of media uploaded before the outage: %v", err)
	}
	cleaned := waitFor(60*time.Second, func() bool {
		return srv.MultipartUploads(t) == 0 && len(keysWithPrefix(t, srv, "tmp/")) == 0
	})
	if !cleaned {
		t.Errorf("after 60 s: %d multipart uploads in progress, tmp objects %q",
			srv.MultipartUploads(t), keysWithPrefix(t, srv, "tmp/"))
	}
	if got, want := keysWithPrefix(t, srv, "blobs/"), []string{blobKey(before)}; !slices.Equal(got, want) {
		t.Errorf("blob objects = %q, want only %q", got, want)
	}
	checkCounts(t, inst, map[string][2]int64{"s3": {1, int64(len(before))}})

	// S3 is back: uploads work again, including multipart ones.
	after := randomBytes(6 << 20)
	afterID, err := a.upload(after, "application/octet-stream", "")
	if err != nil {
		t.Fatalf("upload after S3 came back: %v", err)
	}
	if err := a.download(afterID, after); err != nil {
		t.Error(err)
	}
	checkS3Clean(t, srv)
	checkCounts(t, inst, map[string][2]int64{"s3": {2, int64(len(before) + len(after))}})
}

func TestS3Redirect(t *testing.T) {
	srv := tests3.Start(t)
	hs := newHomeserver(t, testTokens)
	cfg := s3Config(t, hs, []string{s3Datastore("s3", srv, "kinds local", "redirect 1m")}, site{serverName: "a.test"})
	inst := startCaddy(t, cfg)
	a := newSiteClient(inst, "a.test", "token-alice", true)

	content := randomBytes(300_000)
	id, err := a.upload(content, "image/png", "pic.png")
	if err != nil {
		t.Fatal(err)
	}
	legacy := "/_matrix/media/v3/download/a.test/" + id

	// fetch follows a presigned URL with a plain client: no Matrix token.
	fetch := func(t *testing.T, loc string) {
		t.Helper()
		if !strings.HasPrefix(loc, srv.URL()+"/"+srv.Bucket()+"/"+blobKey(content)+"?") {
			t.Fatalf("Location = %q, want a presigned URL of %s/%s/%s", loc, srv.URL(), srv.Bucket(), blobKey(content))
		}
		if !strings.Contains(loc, "X-Amz-Signature=") || !strings.Contains(loc, "X-Amz-Expires=60") {
			t.Errorf("Location = %q, want a presigned URL valid 60 s", loc)
		}
		resp, err := http.Get(loc)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK || !bytes.Equal(body, content) {
			t.Errorf("GET of the presigned URL: %d with %d bytes, want 200 with the %d uploaded", resp.StatusCode, len(body), len(content))
		}
	}

	t.Run("authenticated", func(t *testing.T) {
		resp := a.must(t, request{method: http.MethodGet, path: a.downloadPath(id)})
		if resp.status != http.StatusTemporaryRedirect {
			t.Fatalf("authenticated download: got %v, want 307", resp)
		}
		if got := resp.header.Get("Cache-Control"); got != "no-store" {
			t.Errorf("Cache-Control of the redirect = %q, want no-store", got)
		}
		fetch(t, resp.header.Get("Location"))

		// No token, no redirect: the URL is only handed out after auth.
		resp = a.must(t, request{method: http.MethodGet, path: a.downloadPath(id), noAuth: true})
		if resp.status != http.StatusUnauthorized || resp.header.Get("Location") != "" {
			t.Errorf("unauthenticated download: got %v (Location %q), want 401 and no Location", resp, resp.header.Get("Location"))
		}
	})

	t.Run("legacy", func(t *testing.T) {
		resp := a.must(t, request{method: http.MethodGet, path: legacy, noAuth: true})
		if resp.status != http.StatusOK || !bytes.Equal(resp.body, content) {
			t.Errorf("legacy download without allow_redirect: got %d with %d bytes, want 200 with the content", resp.status, len(resp.body))
		}
		resp = a.must(t, request{method: http.MethodGet, path: legacy + "?allow_redirect=true", noAuth: true})
		if resp.status != http.StatusTemporaryRedirect {
			t.Fatalf("legacy download with allow_redirect=true: got %v, want 307", resp)
		}
		fetch(t, resp.header.Get("Location"))
	})
}
