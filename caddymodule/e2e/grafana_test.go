package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
	"gopkg.in/yaml.v3"
)

// The operator files under contrib/ checked by TestDashboardAndAlerts.
const (
	dashboardFile = "contrib/grafana/matrix-media.json"
	alertsFile    = "contrib/prometheus/alerts.yml"
	alertTestFile = "contrib/prometheus/alerts_test.yml"
)

// unscrapedMetrics are the metric names the dashboard or the alert rules may
// use although the workload of TestDashboardAndAlerts cannot make them
// appear, each with the reason. Names of the module (caddy_matrix_media_*)
// are also checked to be registered by its Go sources (see
// registeredMetricNames): a CounterVec without children has no line at all in
// /metrics, not even # HELP, so /metrics cannot prove them. Histogram names
// are listed without their _bucket/_count/_sum suffix.
var unscrapedMetrics = map[string]string{
	"caddy_matrix_media_token_invalidations_total":              "needs a logout or a Redis invalidation",
	"caddy_matrix_media_remote_fetches_total":                   "needs a remote homeserver to fetch from (federation)",
	"caddy_matrix_media_federation_verification_failures_total": "needs inbound federation requests",
	"caddy_matrix_media_admission_rejections_total":             "needs remote fetches beyond their bounds",
	"caddy_matrix_media_panics_total":                           "needs a panic",
	"caddy_matrix_media_cluster_waits_total":                    "needs two requests for the same remote media or thumbnail at once",
	"caddy_matrix_media_gc_runs_total":                          "needs a GC run (first one a while after startup)",
	"caddy_matrix_media_gc_blobs_removed_total":                 "needs orphan blobs and a GC run",
	"caddy_matrix_media_gc_bytes_removed_total":                 "needs orphan blobs and a GC run",
	"caddy_matrix_media_jobs_created_total":                     "needs a background job (admin API)",
	"caddy_matrix_media_job_runs_started_total":                 "needs a background job",
	"caddy_matrix_media_job_runs_finished_total":                "needs a background job",
	"caddy_matrix_media_job_items_removed_total":                "needs a background job",
	"caddy_matrix_media_job_bytes_removed_total":                "needs a background job",
	"caddy_matrix_media_job_errors_total":                       "needs a failing background job",
	"caddy_matrix_media_job_run_duration_seconds":               "needs a background job",
	// The cluster counters exist only with the PostgreSQL coordinator
	// (several instances), which this single SQLite instance does not use.
	"caddy_matrix_media_cluster_lock_attempts_total":  "PostgreSQL cluster coordinator only",
	"caddy_matrix_media_cluster_locks_acquired_total": "PostgreSQL cluster coordinator only",
	"caddy_matrix_media_cluster_locks_lost_total":     "PostgreSQL cluster coordinator only",
	"caddy_matrix_media_cluster_reconnects_total":     "PostgreSQL cluster coordinator only",
	"caddy_matrix_media_cluster_round_trips_total":    "PostgreSQL cluster coordinator only",
	"caddy_matrix_media_cluster_publishes_total":      "PostgreSQL cluster coordinator only",
	"caddy_matrix_media_cluster_notifications_total":  "PostgreSQL cluster coordinator only",
}

// fedPanels are the dashboard panels whose every target must return series
// after the workload (the workload feeds them): a query that parses but
// selects nothing (a wrong label name or value) fails there.
var fedPanels = []string{
	"Request rate by endpoint",
	"Errors by endpoint and status",
	"Latency p50 by endpoint",
	"Latency p99 by endpoint",
	"Upload and download bytes",
	"Dedup hits",
	"Datastore bytes",
	"Datastore operations",
	"Datastore latency p99",
	"Free space of file datastores",
	"Token cache hit ratio",
	"Homeserver whoami latency",
	"Homeserver whoami results",
	"Thumbnail generation time",
	"Thumbnail workers and queue",
	"Thumbnail rejections",
	"Quota and rate-limit rejections",
}

// TestDashboardAndAlerts proves the Grafana dashboard and the alert rules
// against a real Prometheus scraping a real Caddy: promtool checks and unit
// tests the rules; then every dashboard target and every rule expression is
// evaluated by Prometheus after a short workload (no query may fail), the
// rules are loaded by that Prometheus and must evaluate without error, and
// every metric name they use must be one Caddy exposes or a listed,
// registered one (unscrapedMetrics).
func TestDashboardAndAlerts(t *testing.T) {
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	promtool, prometheus := requireBinary(t, "promtool"), requireBinary(t, "prometheus")
	alerts := filepath.Join(root, alertsFile)

	t.Run("promtool", func(t *testing.T) {
		for _, args := range [][]string{
			{"check", "rules", alerts},
			{"test", "rules", filepath.Join(root, alertTestFile)},
		} {
			out, err := exec.Command(promtool, args...).CombinedOutput()
			if err != nil {
				t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
	})

	dash := readDashboard(t, filepath.Join(root, dashboardFile))
	rules := readRuleExprs(t, alerts)

	srv := tests3.Start(t)
	hs := newHomeserver(t, testTokens)
	// Uploads go to S3, thumbnails to a file datastore (whose free space
	// the disk alert reads).
	disk := "datastore disk file " + t.TempDir() + " {\n\t\t\tkinds thumbnails\n\t\t}"
	cfg := s3Config(t, hs, []string{s3Datastore("s3", srv, "kinds local"), disk, "thumbnails {\n\t\t\tworkers 1\n\t\t}"},
		site{serverName: "a.test"},
		site{serverName: "b.test", extra: []string{"rate_limits {\n\t\t\tdownload per_ip 1/1h\n\t\t}"}})
	start := time.Now()
	inst := startCaddy(t, cfg)
	t.Logf("caddy built and started in %v", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	prom := startPrometheus(t, prometheus, inst.cfg.adminPort, alerts)
	dashboardWorkload(t, inst)
	prom.waitScraped(t)
	t.Logf("prometheus started, workload run and scraped in %v", time.Since(start).Round(time.Millisecond))

	scraped := map[string]bool{}
	for _, n := range prom.labelValues(t, "__name__") {
		scraped[n] = true
	}
	registered := registeredMetricNames(t, root)

	t.Run("names", func(t *testing.T) {
		var exprs []string
		for _, tg := range dash {
			exprs = append(exprs, tg.expr)
		}
		exprs = append(exprs, rules...)
		used := map[string]bool{}
		for _, e := range exprs {
			for _, n := range metricNames(t, e) {
				used[n] = true
			}
		}
		for _, n := range slices.Sorted(maps.Keys(used)) {
			if scraped[n] {
				continue
			}
			base := histogramBase(n)
			reason, listed := unscrapedMetrics[base]
			switch {
			case !listed:
				t.Errorf("%s is neither scraped from Caddy nor in unscrapedMetrics", n)
			case strings.HasPrefix(base, "caddy_matrix_media_") && !registered[base]:
				t.Errorf("%s (unscraped: %s) is not a metric name of the module's sources", n, reason)
			}
		}
		for _, n := range slices.Sorted(maps.Keys(unscrapedMetrics)) {
			if !used[n] && !used[n+"_bucket"] && !used[n+"_count"] {
				t.Errorf("unscrapedMetrics lists %s, which the dashboard and the rules do not use", n)
			}
			if scraped[n] || scraped[n+"_count"] {
				// Not an error: some appear by timing (a GC run).
				t.Logf("unscrapedMetrics lists %s, which this run scraped", n)
			}
		}
	})

	t.Run("dashboard queries", func(t *testing.T) {
		empty := map[string]bool{}
		for _, tg := range dash {
			n, err := prom.query(tg.expr)
			if err != nil {
				t.Errorf("panel %q target %s: %v\n%s", tg.panel, tg.refID, err, tg.expr)
				continue
			}
			if n == 0 {
				empty[tg.panel] = true
			}
		}
		for _, p := range fedPanels {
			if !slices.ContainsFunc(dash, func(tg dashTarget) bool { return tg.panel == p }) {
				t.Errorf("fedPanels names %q, which is no panel of the dashboard", p)
			}
			if empty[p] {
				t.Errorf("panel %q has a target without series after the workload", p)
			}
		}
	})

	t.Run("rule queries", func(t *testing.T) {
		for _, e := range rules {
			if _, err := prom.query(e); err != nil {
				t.Errorf("%v\n%s", err, e)
			}
		}
		prom.checkRuleHealth(t, len(rules))
	})
}

// requireBinary returns the path of a Prometheus tool, failing the test with
// the way to install it when it is missing.
func requireBinary(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found (%v): run ./xcaddy.sh deps (Debian package prometheus)", name, err)
	}
	return p
}

// dashTarget is one query of a dashboard panel, its template variables
// substituted.
type dashTarget struct {
	panel, refID, expr string
}

// dashboardVars are the values given to the dashboard's variables: all
// instances and sites, and a range fit for 1 s scrapes.
var dashboardVars = strings.NewReplacer(
	"$__rate_interval", "1m",
	"${instance}", ".*", "$instance", ".*",
	"${server_name}", ".*", "$server_name", ".*",
)

// readDashboard reads the dashboard and returns its targets, checking the
// shape Grafana 10+ imports.
func readDashboard(t *testing.T, path string) []dashTarget {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	type target struct {
		RefID      string `json:"refId"`
		Expr       string `json:"expr"`
		Datasource struct {
			Type string `json:"type"`
			UID  string `json:"uid"`
		} `json:"datasource"`
	}
	type panel struct {
		Type    string   `json:"type"`
		Title   string   `json:"title"`
		Targets []target `json:"targets"`
		Panels  []panel  `json:"panels"`
	}
	var d struct {
		SchemaVersion int     `json:"schemaVersion"`
		UID           string  `json:"uid"`
		Panels        []panel `json:"panels"`
		Templating    struct {
			List []struct {
				Name  string `json:"name"`
				Type  string `json:"type"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if d.SchemaVersion < 38 || d.UID == "" {
		t.Errorf("schemaVersion %d, uid %q: want 38 or later and a uid", d.SchemaVersion, d.UID)
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
		if v.Name == "datasource" && v.Query != "prometheus" {
			t.Errorf("datasource variable queries %v, want prometheus", v.Query)
		}
	}
	if want := map[string]string{"datasource": "datasource", "instance": "query", "server_name": "query"}; !maps.Equal(vars, want) {
		t.Errorf("template variables %v, want %v", vars, want)
	}
	var out []dashTarget
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no target", p.Title)
			}
			for _, tg := range p.Targets {
				if tg.Datasource.Type != "prometheus" || tg.Datasource.UID != "${datasource}" {
					t.Errorf("panel %q target %s: datasource %+v, want the ${datasource} variable", p.Title, tg.RefID, tg.Datasource)
				}
				expr := dashboardVars.Replace(tg.Expr)
				if strings.Contains(expr, "$") {
					t.Errorf("panel %q target %s: unknown variable in %s", p.Title, tg.RefID, tg.Expr)
				}
				out = append(out, dashTarget{panel: p.Title, refID: tg.RefID, expr: expr})
			}
		}
	}
	walk(d.Panels)
	if len(out) == 0 {
		t.Fatal("the dashboard has no targets")
	}
	return out
}

// readRuleExprs returns the expressions of the alert rules file; it fails
// on a rule that is no alert or has no runbook annotation.
func readRuleExprs(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var f struct {
		Groups []struct {
			Rules []struct {
				Alert       string            `yaml:"alert"`
				Expr        string            `yaml:"expr"`
				Annotations map[string]string `yaml:"annotations"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var out []string
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			for _, a := range []string{"summary", "description", "runbook"} {
				if strings.TrimSpace(r.Annotations[a]) == "" {
					t.Errorf("alert %q has no %s annotation", r.Alert, a)
				}
			}
			out = append(out, r.Expr)
		}
	}
	if len(out) == 0 {
		t.Fatalf("%s has no rules", path)
	}
	return out
}

// metricNameRE matches the metric names of the module and of node_exporter
// in a PromQL expression; selectorRE matches any identifier opening a label
// selector or a range, to catch names of other prefixes.
var (
	metricNameRE = regexp.MustCompile(`\b(?:caddy|node)_[a-z0-9_]+\b`)
	selectorRE   = regexp.MustCompile(`\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]`)
)

// metricNames returns the metric names an expression selects.
func metricNames(t *testing.T, expr string) []string {
	t.Helper()
	names := metricNameRE.FindAllString(expr, -1)
	for _, m := range selectorRE.FindAllStringSubmatch(expr, -1) {
		if !slices.Contains(names, m[1]) {
			t.Errorf("expression selects %s, a name of no known prefix: %s", m[1], expr)
		}
	}
	return names
}

// histogramBase strips a histogram series suffix.
func histogramBase(n string) string {
	for _, s := range []string{"_bucket", "_count", "_sum"} {
		if b, ok := strings.CutSuffix(n, s); ok {
			return b
		}
	}
	return n
}

// registeredMetricNames returns caddy_matrix_media_<name> for every string
// literal <name> of the module's non-test Go files that declare collectors
// of the matrix_media subsystem. Metric names are literals there (Name:
// "x", or a helper's first argument such as opts("x", ...)), so a name of
// the dashboard that is no literal of those files is no metric.
func registeredMetricNames(t *testing.T, root string) map[string]bool {
	t.Helper()
	lit := regexp.MustCompile(`"([a-z][a-z0-9_]*)"`)
	names := map[string]bool{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if strings.HasPrefix(d.Name(), ".") || d.Name() == "e2e" {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if !strings.Contains(string(b), `Subsystem: "matrix_media"`) {
			return nil
		}
		for _, m := range lit.FindAllStringSubmatch(string(b), -1) {
			names["caddy_matrix_media_"+m[1]] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !names["caddy_matrix_media_requests_total"] || !names["caddy_matrix_media_job_errors_total"] {
		t.Fatalf("metric names not found in the sources under %s", root)
	}
	return names
}

// dashboardWorkload makes the main series exist: uploads (one a duplicate),
// downloads, a 404, a rejected token, a thumbnail and an unthumbnailable
// file, and a rate-limited download on b.test.
func dashboardWorkload(t *testing.T, inst *instance) {
	t.Helper()
	a := newSiteClient(inst, "a.test", "token-alice", true)
	content := randomBytes(64 << 10)
	id, err := a.upload(content, "application/octet-stream", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.upload(content, "application/octet-stream", ""); err != nil {
		t.Fatal(err)
	}
	if err := a.download(id, content); err != nil {
		t.Fatal(err)
	}
	if r := a.must(t, request{method: http.MethodGet, path: a.downloadPath("nosuchmedia")}); r.status != http.StatusNotFound {
		t.Fatalf("missing media: %v", r)
	}
	bad := newSiteClient(inst, "a.test", "token-unknown", true)
	if r := bad.must(t, request{method: http.MethodPost, path: "/_matrix/media/v3/upload", body: []byte("x"), contentType: "text/plain"}); r.status != http.StatusUnauthorized {
		t.Fatalf("upload with an unknown token: %v", r)
	}
	photo, err := a.upload(e2eJPEG(t, 640, 480), "image/jpeg", "photo.jpg")
	if err != nil {
		t.Fatal(err)
	}
	text, err := a.upload([]byte("not an image"), "text/plain", "")
	if err != nil {
		t.Fatal(err)
	}
	thumb := func(id string) string {
		return "/_matrix/client/v1/media/thumbnail/a.test/" + id + "?width=96&height=96&method=crop"
	}
	if r := a.must(t, request{method: http.MethodGet, path: thumb(photo)}); r.status != http.StatusOK {
		t.Fatalf("thumbnail: %v", r)
	}
	if r := a.must(t, request{method: http.MethodGet, path: thumb(text)}); r.status != http.StatusBadRequest {
		t.Fatalf("thumbnail of text: %v", r)
	}
	b := newSiteClient(inst, "b.test", "token-bob", true)
	bid, err := b.upload([]byte("limited"), "text/plain", "")
	if err != nil {
		t.Fatal(err)
	}
	if r := b.must(t, request{method: http.MethodGet, path: b.downloadPath(bid)}); r.status != http.StatusOK {
		t.Fatalf("first download on b.test: %v", r)
	}
	if r := b.must(t, request{method: http.MethodGet, path: b.downloadPath(bid)}); r.status != http.StatusTooManyRequests {
		t.Fatalf("second download on b.test, over its rate limit: %v", r)
	}
}

// prometheusServer is a running Prometheus scraping one Caddy.
type prometheusServer struct {
	base  string
	cmd   *exec.Cmd
	logs  *syncBuffer
	exits chan struct{}
}

// startPrometheus runs Prometheus on a loopback port with its storage in a
// temporary directory, scraping Caddy's admin /metrics every second and
// evaluating the rules file every second.
func startPrometheus(t *testing.T, bin string, adminPort int, rules string) *prometheusServer {
	t.Helper()
	dir := t.TempDir()
	conf := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - %q
scrape_configs:
  - job_name: caddy
    static_configs:
      - targets: ["127.0.0.1:%d"]
`, rules, adminPort)
	confPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p := &prometheusServer{base: "http://" + addr, logs: new(syncBuffer), exits: make(chan struct{})}
	p.cmd = exec.Command(bin,
		"--config.file="+confPath,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr,
		"--log.level=warn")
	p.cmd.Dir = dir
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting prometheus: %v", err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.exits)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exits:
		case <-time.After(30 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.exits
		}
		if t.Failed() {
			t.Logf("prometheus output (last lines):\n%s", lastLines([]byte(p.logs.String()), 40))
		}
	})
	ok := waitFor(30*time.Second, func() bool {
		resp, err := http.Get(p.base + "/-/ready")
		if err != nil {
			return false
		}
		_ = resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if !ok {
		t.Fatalf("prometheus not ready in 30 s:\n%s", lastLines([]byte(p.logs.String()), 40))
	}
	return p
}

// apiResponse is the envelope of Prometheus' HTTP API.
type apiResponse struct {
	Status    string          `json:"status"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Data      json.RawMessage `json:"data"`
	Warnings  []string        `json:"warnings"`
}

// get calls an API path with a GET and returns its data, or the API's
// error.
func (p *prometheusServer) get(path string, form url.Values) (json.RawMessage, error) {
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(p.base + path + "?" + form.Encode())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var r apiResponse
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, fmt.Errorf("%s: %s: %w: %.200s", path, resp.Status, err, body)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s: %s: %s: %s", path, resp.Status, r.ErrorType, r.Error)
	}
	if len(r.Warnings) > 0 {
		return nil, fmt.Errorf("%s: warnings %q", path, r.Warnings)
	}
	return r.Data, nil
}

// query evaluates an instant query now and returns how many series or
// values it gave.
func (p *prometheusServer) query(expr string) (int, error) {
	data, err := p.get("/api/v1/query", url.Values{"query": {expr}})
	if err != nil {
		return 0, err
	}
	var d struct {
		ResultType string            `json:"resultType"`
		Result     []json.RawMessage `json:"result"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		return 0, fmt.Errorf("decoding the result: %w", err)
	}
	if d.ResultType == "scalar" || d.ResultType == "string" {
		return 1, nil
	}
	return len(d.Result), nil
}

// queryValue evaluates an instant query that must give one sample and
// returns its value; ok is false when it gave none.
func (p *prometheusServer) queryValue(t *testing.T, expr string) (v float64, ok bool) {
	t.Helper()
	data, err := p.get("/api/v1/query", url.Values{"query": {expr}})
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Result []struct {
			Value [2]any `json:"value"`
		} `json:"result"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatalf("%s: %v", expr, err)
	}
	if len(d.Result) == 0 {
		return 0, false
	}
	s, _ := d.Result[0].Value[1].(string)
	if _, err := fmt.Sscan(s, &v); err != nil {
		t.Fatalf("%s: value %q: %v", expr, s, err)
	}
	return v, true
}

// waitScraped waits until Prometheus scraped Caddy successfully and every
// request counter has at least three samples in the last minute, so that
// rate() over 1m has something to work on after the workload.
func (p *prometheusServer) waitScraped(t *testing.T) {
	t.Helper()
	var last string
	ok := waitFor(40*time.Second, func() bool {
		if up, ok := p.queryValue(t, `up{job="caddy"}`); !ok || up != 1 {
			last = fmt.Sprintf("up = %v (%v)", up, ok)
			return false
		}
		// Request counters are created by the workload, the last ones
		// by its last request.
		n, ok := p.queryValue(t, `min(count_over_time(caddy_matrix_media_requests_total[1m]))`)
		last = fmt.Sprintf("fewest samples of a request counter in the last minute: %v (%v)", n, ok)
		return ok && n >= 3
	})
	if !ok {
		t.Fatalf("prometheus did not scrape caddy in time: %s\n%s", last, lastLines([]byte(p.logs.String()), 40))
	}
}

// labelValues returns the values of a label over every stored series.
func (p *prometheusServer) labelValues(t *testing.T, label string) []string {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(p.base + "/api/v1/label/" + label + "/values")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct {
		Status string   `json:"status"`
		Data   []string `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil || r.Status != "success" {
		t.Fatalf("label values of %s: %v %q", label, err, r.Status)
	}
	return r.Data
}

// rules returns the rules Prometheus loaded.
func (p *prometheusServer) rules(t *testing.T) []promRule {
	t.Helper()
	data, err := p.get("/api/v1/rules", nil)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Groups []struct {
			Rules []promRule `json:"rules"`
		} `json:"groups"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatal(err)
	}
	var out []promRule
	for _, g := range d.Groups {
		out = append(out, g.Rules...)
	}
	return out
}

// promRule is a rule as /api/v1/rules shows it.
type promRule struct {
	Name           string  `json:"name"`
	Query          string  `json:"query"`
	Health         string  `json:"health"`
	LastError      string  `json:"lastError"`
	EvaluationTime float64 `json:"evaluationTime"`
}

// checkRuleHealth waits until Prometheus evaluated every loaded rule and
// fails on any rule whose evaluation failed.
func (p *prometheusServer) checkRuleHealth(t *testing.T, want int) {
	t.Helper()
	var rs []promRule
	waitFor(10*time.Second, func() bool {
		rs = p.rules(t)
		return !slices.ContainsFunc(rs, func(r promRule) bool { return r.Health == "unknown" })
	})
	if len(rs) != want {
		t.Errorf("prometheus loaded %d rules, want %d", len(rs), want)
	}
	for _, r := range rs {
		if r.Health != "ok" || r.LastError != "" {
			t.Errorf("rule %s: health %q, error %q", r.Name, r.Health, r.LastError)
		}
	}
}
