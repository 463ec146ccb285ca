package mediaapi

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

func gaugeValue(g prometheus.Gauge) float64 {
	var m dto.Metric
	_ = g.Write(&m)
	return m.GetGauge().GetValue()
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}

func TestParseRoute(t *testing.T) {
	tests := []struct {
		path   string
		ep     endpoint
		legacy bool
		server string
		id     string
		file   string
	}{
		{"/_matrix/media/v3/upload", epUpload, true, "", "", ""},
		{"/_matrix/media/r0/upload", epUpload, true, "", "", ""},
		{"/_matrix/media/v1/upload", epUpload, true, "", "", ""},
		{"/_matrix/media/v1/create", epCreate, true, "", "", ""},
		{"/_matrix/media/unstable/fi.mau.msc2246/create", epCreate, true, "", "", ""},
		{"/_matrix/media/v3/upload/s/i", epUploadPut, true, "s", "i", ""},
		{"/_matrix/media/r0/upload/s/i", epUploadPut, true, "s", "i", ""},
		{"/_matrix/media/unstable/fi.mau.msc2246/upload/s/i", epUploadPut, true, "s", "i", ""},
		{"/_matrix/media/v3/download/s/i", epDownload, true, "s", "i", ""},
		{"/_matrix/media/v3/download/s/i/f%20g", epDownload, true, "s", "i", "f%20g"},
		{"/_matrix/media/v3/config", epConfig, true, "", "", ""},
		{"/_matrix/client/v1/media/download/s%3A1/i", epDownload, false, "s%3A1", "i", ""},
		{"/_matrix/client/v1/media/download/s/i/f", epDownload, false, "s", "i", "f"},
		{"/_matrix/client/unstable/org.matrix.msc3916/media/download/s/i", epDownload, false, "s", "i", ""},
		{"/_matrix/client/v1/media/config", epConfig, false, "", "", ""},
		{"/_matrix/client/v1/media/create", epUnknown, false, "", "", ""},
		{"/_matrix/media/v3/download/s/i/f/g", epUnknown, false, "", "", ""},
		{"/_matrix/media/v3/download/s/i/f/g/h/i/j", epUnknown, false, "", "", ""},
		{"/_matrix/media/v3/upload/s", epUnknown, false, "", "", ""},
		{"/_matrix/media/v3/config/", epUnknown, false, "", "", ""},
		{"/_matrix/media/unstable/fi.mau.msc2246/upload/s", epUnknown, false, "", "", ""},
		{"/_matrix/federation/v1/media/download/i", epFedDownload, false, "", "i", ""},
		{"/_matrix/federation/v1/media/thumbnail/i", epFedThumbnail, false, "", "i", ""},
		{"/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/i", epFedDownload, false, "", "i", ""},
		{"/_matrix/federation/v1/media/download/s/i", epUnknown, false, "", "", ""},
		{"/_matrix/federation/v1/media/upload", epUnknown, false, "", "", ""},
		{"/other", epUnknown, false, "", "", ""},
	}
	for _, tc := range tests {
		rt := parseRoute(tc.path)
		if rt.ep != tc.ep || rt.legacy != tc.legacy || rt.rawServer != tc.server || rt.rawMediaID != tc.id || rt.rawFileName != tc.file {
			t.Errorf("parseRoute(%q) = %+v", tc.path, rt)
		}
	}
}

func TestParseRangeUnit(t *testing.T) {
	tests := []struct {
		v             string
		size          int64
		start, length int64
		kind          rangeKind
	}{
		{"bytes=0-9", 10, 0, 10, rangeSatisfiable},
		{"bytes=9-9", 10, 9, 1, rangeSatisfiable},
		{"bytes=10-", 10, 0, 0, rangeUnsatisfiable},
		{"bytes=-10", 10, 0, 10, rangeSatisfiable},
		{"bytes=-1", 10, 9, 1, rangeSatisfiable},
		{"bytes= 2 - 3 ", 10, 2, 2, rangeSatisfiable},
		{"bytes=-0", 10, 0, 0, rangeUnsatisfiable},
		{"bytes=-5", 0, 0, 0, rangeUnsatisfiable},
		{"bytes=", 10, 0, 0, rangeIgnored},
		{"bytes=-", 10, 0, 0, rangeIgnored},
		{"bytes=1", 10, 0, 0, rangeIgnored},
		{"bytes=+1-2", 10, 0, 0, rangeIgnored},
		{"bytes=1-2,", 10, 0, 0, rangeIgnored},
		{"bits=1-2", 10, 0, 0, rangeIgnored},
		{"bytes", 10, 0, 0, rangeIgnored},
	}
	for _, tc := range tests {
		s, l, k := parseRange(tc.v, tc.size)
		if k != tc.kind || (k == rangeSatisfiable && (s != tc.start || l != tc.length)) {
			t.Errorf("parseRange(%q, %d) = %d %d %d", tc.v, tc.size, s, l, k)
		}
	}
}

func TestHeaderKeysCanonical(t *testing.T) {
	h := http.Header{}
	setCORS(h)
	setMediaSecurity(h, true)
	for k := range h {
		if http.CanonicalHeaderKey(k) != k {
			t.Errorf("header key %q is not canonical", k)
		}
	}
	// Keys written directly in download.go and errors.
	for _, k := range []string{"Etag", "Last-Modified", "Accept-Ranges", "Content-Range", "Content-Disposition",
		"Content-Length", "Content-Type", "Allow", "Retry-After"} {
		if http.CanonicalHeaderKey(k) != k {
			t.Errorf("header key %q is not canonical", k)
		}
	}
	// A shared value must not be writable through append.
	v := h["Access-Control-Allow-Origin"]
	v2 := append(v, "x")
	if &v2[0] == &v[0] {
		t.Fatal("shared header slice has spare capacity")
	}
}

func TestMediaCache(t *testing.T) {
	c := newMediaCache(3)
	entry := func(id string) *mediaEntry { return newMediaEntry(storage.Media{MediaID: id, SHA256: id}) }
	for _, id := range []string{"a", "b", "c"} {
		c.put(mediaKey{"s", id}, entry(id))
	}
	// Use a and c; b is the only one not recently used.
	c.get(mediaKey{"s", "a"})
	c.get(mediaKey{"s", "c"})
	c.put(mediaKey{"s", "d"}, entry("d"))
	if c.len() != 3 {
		t.Fatalf("len %d", c.len())
	}
	if c.get(mediaKey{"s", "b"}) != nil {
		t.Fatal("b survived although it was the least recently used")
	}
	for _, id := range []string{"a", "c", "d"} {
		if e := c.get(mediaKey{"s", id}); e == nil || e.m.MediaID != id {
			t.Fatalf("%s evicted or wrong: %+v", id, e)
		}
	}
	// Many more insertions keep the bound.
	for i := 0; i < 100; i++ {
		c.put(mediaKey{"s", fmt.Sprint(i)}, entry(fmt.Sprint(i)))
	}
	if c.len() != 3 {
		t.Fatalf("len %d after churn", c.len())
	}
	c.remove(mediaKey{"s", "99"})
	c.remove(mediaKey{"s", "nope"})
	if c.len() != 2 || c.get(mediaKey{"s", "99"}) != nil {
		t.Fatalf("remove failed: len %d", c.len())
	}
	for _, id := range []string{"97", "98"} {
		if c.get(mediaKey{"s", id}) == nil {
			t.Fatalf("%s lost by remove", id)
		}
	}
	// Replacing keeps one entry.
	c.put(mediaKey{"s", "98"}, entry("98"))
	if c.len() != 2 {
		t.Fatalf("len %d after replace", c.len())
	}
}

func TestDownloadUsesCache(t *testing.T) {
	e := newEnv(t)
	id := e.upload("alice", []byte("cached"), "text/plain", "")
	pending := e.create("alice")
	before := e.meta.gets.Load()
	for i := 0; i < 5; i++ {
		if rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id}); rec.Code != 200 {
			t.Fatal(rec.Code)
		}
	}
	if n := e.meta.gets.Load() - before; n != 0 {
		t.Fatalf("%d store reads for downloads of a just-uploaded item", n)
	}
	// A restart (fresh repository) reads the store once, then caches.
	e.repo.Forget(testServer, id)
	for i := 0; i < 5; i++ {
		e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id})
	}
	if n := e.meta.gets.Load() - before; n != 1 {
		t.Fatalf("%d store reads after Forget, want 1", n)
	}
	// Pending rows are never cached.
	before = e.meta.gets.Load()
	for i := 0; i < 3; i++ {
		e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + pending + "?timeout_ms=0"})
	}
	if n := e.meta.gets.Load() - before; n != 3 {
		t.Fatalf("%d store reads for 3 pending lookups", n)
	}
	if e.repo.cache.get(mediaKey{testServer, pending}) != nil {
		t.Fatal("pending row cached")
	}

	// With the cache disabled every download reads the store.
	nc := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) { o.MediaCacheSize = -1 })
	id = nc.upload("alice", []byte("x"), "", "")
	before = nc.meta.gets.Load()
	for i := 0; i < 3; i++ {
		nc.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id})
	}
	if n := nc.meta.gets.Load() - before; n != 3 {
		t.Fatalf("%d store reads without cache", n)
	}
}

func TestMissingBlob(t *testing.T) {
	logs := &syncBuffer{}
	core := zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), logs, zap.DebugLevel)
	e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) { o.Logger = zap.New(core) })
	id := e.upload("alice", []byte("vanishing"), "", "")
	for _, f := range e.blobFiles() {
		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
	}
	rec := e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id})
	expectError(t, rec, 404, "M_NOT_FOUND")
	if !strings.Contains(logs.String(), "missing from its datastore") {
		t.Fatalf("missing blob not logged: %s", logs.String())
	}
}

func TestLogsNeverContainTokens(t *testing.T) {
	logs := &syncBuffer{}
	core := zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), logs, zap.DebugLevel)
	e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) { o.Logger = zap.New(core) })
	secret := "syt_c2VjcmV0_token"
	e.do(req{method: "GET", path: "/_matrix/media/v3/config", token: secret})
	e.do(req{method: "GET", path: "/_matrix/media/v3/config?access_token=" + secret})
	e.upload("alice", []byte("x"), "", "")
	if logs.String() == "" {
		t.Fatal("nothing logged at debug level")
	}
	if strings.Contains(logs.String(), secret) {
		t.Fatalf("token in logs: %s", logs.String())
	}
}

func TestMetrics(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewPedanticRegistry()
	for _, c := range e.repo.Metrics().Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	content := []byte("metrics!")
	id := e.upload("alice", content, "", "")
	e.upload("alice", content, "", "")
	e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id})
	e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/" + id, header: map[string]string{"Range": "bytes=0-1"}})
	e.do(req{method: "GET", path: "/_matrix/media/v3/download/test/nope"})
	e.do(req{method: "GET", path: "/_matrix/media/unknown"})
	e.do(req{method: "OPTIONS", path: "/_matrix/media/unknown"})

	m := e.repo.metrics
	checks := []struct {
		name string
		got  float64
		want float64
	}{
		{"upload 200", counterValue(m.counter(epUpload, 200)), 2},
		{"download 200", counterValue(m.counter(epDownload, 200)), 1},
		{"download 206", counterValue(m.counter(epDownload, 206)), 1},
		{"download 404", counterValue(m.counter(epDownload, 404)), 1},
		{"unknown 404", counterValue(m.counter(epUnknown, 404)), 1},
		{"options 204", counterValue(m.counter(epOptions, 204)), 1},
		{"upload bytes", counterValue(m.uploadBytes), 16},
		{"download bytes", counterValue(m.downloadBytes), 10},
		{"dedup hits", counterValue(m.dedupHits), 1},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, f := range families {
		names[f.GetName()] = true
		if f.GetName() == "caddy_matrix_media_request_duration_seconds" {
			for _, mm := range f.GetMetric() {
				if len(mm.GetLabel()) != 1 || mm.GetLabel()[0].GetName() != "endpoint" {
					t.Errorf("duration labels %v", mm.GetLabel())
				}
			}
		}
	}
	for _, n := range []string{"caddy_matrix_media_requests_total", "caddy_matrix_media_request_duration_seconds",
		"caddy_matrix_media_upload_bytes_total", "caddy_matrix_media_download_bytes_total",
		"caddy_matrix_media_dedup_hits_total", "caddy_matrix_media_pending_uploads_waiting"} {
		if !names[n] {
			t.Errorf("metric %s not gathered", n)
		}
	}
	// Status codes outside the cached range still count.
	m.counter(epUnknown, 999).Inc()
	if counterValue(m.counter(epUnknown, 999)) != 1 {
		t.Error("out-of-range status not counted")
	}
}

// TestRealServer serves downloads over a loopback connection, where the
// response writer's ReadFrom (sendfile) path is used.
func TestRealServer(t *testing.T) {
	e := newEnv(t)
	content := bytes.Repeat([]byte("0123456789abcdef"), 64<<10/16*3) // 192 KiB
	id := e.upload("alice", content, "application/octet-stream", "")
	srv := httptest.NewServer(e.site)
	defer srv.Close()

	get := func(path string, h map[string]string) (*http.Response, []byte) {
		t.Helper()
		r, _ := http.NewRequest("GET", srv.URL+path, nil)
		for k, v := range h {
			r.Header.Set(k, v)
		}
		resp, err := srv.Client().Do(r)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp, b
	}
	resp, b := get("/_matrix/media/v3/download/test/"+id, nil)
	if resp.StatusCode != 200 || !bytes.Equal(b, content) || resp.ContentLength != int64(len(content)) {
		t.Fatalf("full: %d %d bytes", resp.StatusCode, len(b))
	}
	resp, b = get("/_matrix/media/v3/download/test/"+id, map[string]string{"Range": "bytes=100000-"})
	if resp.StatusCode != 206 || !bytes.Equal(b, content[100000:]) {
		t.Fatalf("range: %d %d bytes", resp.StatusCode, len(b))
	}
	// Encoded segments arrive intact through a real server.
	resp, _ = get("/_matrix/media/v3/download/test/a%2Fb", nil)
	if resp.StatusCode != 400 {
		t.Fatalf("encoded slash: %d", resp.StatusCode)
	}
	resp, b = get("/_matrix/media/v3/download/test/"+id+"/%F0%9F%90%94", map[string]string{"Range": "bytes=0-3"})
	if resp.StatusCode != 206 || string(b) != "0123" || resp.Header.Get("Content-Disposition") != "attachment; filename*=utf-8''%F0%9F%90%94" {
		t.Fatalf("unicode file name: %d %q %q", resp.StatusCode, b, resp.Header.Get("Content-Disposition"))
	}
	// A chunked upload over the wire, larger than the limit.
	small := newEnv(t, func(c *SiteConfig, _ *RepositoryOptions) { c.MaxUploadSize = 1000 })
	srv2 := httptest.NewServer(small.site)
	defer srv2.Close()
	r, _ := http.NewRequest("POST", srv2.URL+"/_matrix/media/v3/upload", io.MultiReader(bytes.NewReader(content)))
	r.Header.Set("Authorization", "Bearer alice")
	resp, err := srv2.Client().Do(r)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 413 || resp.Header.Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("chunked over limit: %d", resp.StatusCode)
	}
	if files := small.blobFiles(); len(files) != 0 {
		t.Fatalf("stored %v", files)
	}
}
