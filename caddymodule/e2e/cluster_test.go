package e2e

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testredis"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
)

// Lease and poll interval of the cluster's job runners (the jobs global
// option), and so how soon a job whose instance died resumes elsewhere.
const (
	clusterJobLease = 3 * time.Second
	clusterJobPoll  = 500 * time.Millisecond
)

// clusterTokens are the access tokens of the cluster's homeserver. The
// logout test consumes "token-carol".
func clusterTokens() map[string]string {
	return map[string]string{
		"token-alice": "@alice:a.test",
		"token-bob":   "@bob:a.test",
		"token-carol": "@carol:a.test",
	}
}

// scaleCluster is three Caddy instances serving one site, a.test, on one
// PostgreSQL database, one S3 datastore (reached through s3p) and one Redis,
// behind a fourth Caddy load-balancing over them round-robin, all on
// loopback. Tests talk to the load balancer (lbClient) or, when they need to
// choose, to one instance (client).
type scaleCluster struct {
	// insts are the instances, "A", "B" and "C"; restart replaces one.
	insts []*instance
	cfgs  []config
	// env is every instance's extra environment (the database DSN).
	env   []string
	lb    *instance
	hs    *homeserver
	s3    *tests3.Server
	s3p   *s3Proxy
	redis *testredis.Server
	dsn   string
	pki   fedPKI
}

// instanceNames names cluster.insts in messages.
var instanceNames = []string{"A", "B", "C"}

// startCluster starts the shared services, the three instances and the load
// balancer. The instances federate (signing key, trusted test CA, loopback
// allowed), so that they can fetch remote media from a test origin.
func startCluster(t *testing.T) *scaleCluster {
	t.Helper()
	cl := &scaleCluster{
		hs:    newHomeserver(t, clusterTokens()),
		s3:    tests3.Start(t),
		redis: testredis.Start(t),
		dsn:   testpg.DSN(t),
		pki:   newFedPKI(t),
	}
	cl.s3p = newS3Proxy(t, cl.s3)
	cl.env = []string{"MATRIX_MEDIA_E2E_DSN=" + cl.dsn}
	keyFile := writeKeyFile(t)
	for range instanceNames {
		cfg := s3Config(t, cl.hs, []string{
			s3DatastoreAt("s3", cl.s3p.url(), cl.s3, "kinds local"),
			"redis " + cl.redis.URL(),
			// Long enough that only an invalidation makes an instance
			// forget a token it validated.
			"token_cache_ttl 10m",
			// The background collector stays off: tests run it when they
			// want it. Its grace is also the retention jobs'.
			"gc {\n\t\t\toff\n\t\t\tgrace 1s\n\t\t}",
			fmt.Sprintf("jobs {\n\t\t\tlease %v\n\t\t\tpoll_interval %v\n\t\t}", clusterJobLease, clusterJobPoll),
			"thumbnails {\n\t\t\tworkers 2\n\t\t}",
			"federation {\n\t\t\ttrusted_ca_file " + cl.pki.caFile + "\n\t\t\tallowed_networks 127.0.0.0/8 ::1/128\n\t\t}",
		}, site{serverName: "a.test", extra: []string{"signing_key " + keyFile}})
		cfg.database = "postgres {env.MATRIX_MEDIA_E2E_DSN}"
		cl.cfgs = append(cl.cfgs, cfg)
	}
	// One at a time: the first creates the schema.
	for _, cfg := range cl.cfgs {
		cl.insts = append(cl.insts, startCaddy(t, cfg, cl.env...))
	}
	cl.lb = startLoadBalancer(t, cl.cfgs)
	return cl
}

// startLoadBalancer starts a Caddy that proxies every request to the
// instances' HTTP ports, round-robin, without sticky sessions. A request
// that cannot reach an instance (dial error: a killed instance) is tried
// on another; the failed instance is avoided for a while.
func startLoadBalancer(t *testing.T, upstreams []config) *instance {
	t.Helper()
	dir := t.TempDir()
	cfg := config{adminPort: freePort(t), httpPort: freePort(t), dataDir: dir}
	var to []string
	for _, u := range upstreams {
		to = append(to, fmt.Sprintf("127.0.0.1:%d", u.httpPort))
	}
	cfg.text = fmt.Sprintf(`{
	admin 127.0.0.1:%d
	default_bind 127.0.0.1
	auto_https off
	persist_config off
	skip_install_trust
	http_port %d
	https_port %d
}

http://:%d {
	reverse_proxy %s {
		lb_policy round_robin
		lb_try_duration 10s
		fail_duration 30s
	}
}
`, cfg.adminPort, cfg.httpPort, cfg.httpPort+1, cfg.httpPort, strings.Join(to, " "))
	return startCaddy(t, cfg)
}

// client is a client of a.test on instance i, directly.
func (cl *scaleCluster) client(i int, token string) *siteClient {
	return newSiteClient(cl.insts[i], "a.test", token, true)
}

// lbClient is a client of a.test through the load balancer.
func (cl *scaleCluster) lbClient(token string) *siteClient {
	return newSiteClient(cl.lb, "a.test", token, true)
}

// restart starts instance i again on its config, after it was killed. It
// must be called from the top-level test's goroutine (the instance outlives
// the subtest that killed the previous one).
func (cl *scaleCluster) restart(t *testing.T, i int) {
	t.Helper()
	select {
	case <-cl.insts[i].exited:
	default:
		t.Fatalf("restarting instance %s, which is still running", instanceNames[i])
	}
	cl.insts[i] = startCaddy(t, cl.cfgs[i], cl.env...)
}

// kill kills instance i with SIGKILL and waits for it to be gone.
func (cl *scaleCluster) kill(t *testing.T, i int) {
	t.Helper()
	if err := cl.insts[i].cmd.Process.Kill(); err != nil {
		t.Fatalf("killing instance %s: %v", instanceNames[i], err)
	}
	<-cl.insts[i].exited
}

// metricSum is the sum over the running instances of one sample of their
// admin /metrics (see metricValue).
func (cl *scaleCluster) metricSum(t *testing.T, series string) float64 {
	t.Helper()
	var sum float64
	for _, inst := range cl.insts {
		sum += metricValue(t, inst, series)
	}
	return sum
}

// s3Proxy stands between the instances and the fake S3 server. It passes
// every request on, and can count and hold back the DELETEs of a watched
// set of keys: after the first passFirst of them, they wait until released
// (or until their client goes away, in which case they are dropped,
// never reaching S3).
type s3Proxy struct {
	srv    *http.Server
	addr   string
	rp     *httputil.ReverseProxy
	bucket string

	mu        sync.Mutex
	watched   map[string]bool
	passFirst int
	admitted  int
	forwarded map[string]int
	// holding is closed by release; nil when nothing is held back.
	holding chan struct{}
	// held are the requests waiting, by sequence number.
	held    map[int]bool
	nextSeq int
}

func newS3Proxy(t *testing.T, srv *tests3.Server) *s3Proxy {
	t.Helper()
	target, err := url.Parse(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	p := &s3Proxy{bucket: srv.Bucket(), forwarded: map[string]int{}, held: map[int]bool{}}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			// gofakes3 checks no signature, but keep what was signed.
			pr.Out.Host = pr.In.Host
		},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	p.srv = &http.Server{Handler: p, ReadHeaderTimeout: time.Minute}
	go func() { _ = p.srv.Serve(ln) }()
	t.Cleanup(func() { _ = p.srv.Close() })
	return p
}

// url is the proxy's endpoint.
func (p *s3Proxy) url() string { return "http://" + p.addr }

// holdDeletes starts watching keys: their DELETEs are counted, and those
// after the first passFirst are held back until release.
func (p *s3Proxy) holdDeletes(keys []string, passFirst int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.watched = map[string]bool{}
	for _, k := range keys {
		p.watched[k] = true
	}
	p.passFirst, p.admitted = passFirst, 0
	p.forwarded = map[string]int{}
	p.holding = make(chan struct{})
}

// release lets the held DELETEs (and later ones) through; watched keys stay
// counted.
func (p *s3Proxy) release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.holding != nil {
		close(p.holding)
		p.holding = nil
	}
}

// heldNow returns the sequence numbers of the requests held at this moment.
func (p *s3Proxy) heldNow() []int {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []int
	for seq := range p.held {
		out = append(out, seq)
	}
	return out
}

// stillHeld reports whether any of seqs is still held.
func (p *s3Proxy) stillHeld(seqs []int) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range seqs {
		if p.held[s] {
			return true
		}
	}
	return false
}

// deletes returns how many DELETEs of each watched key reached S3.
func (p *s3Proxy) deletes() map[string]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]int, len(p.forwarded))
	for k, n := range p.forwarded {
		out[k] = n
	}
	return out
}

func (p *s3Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	key := strings.TrimPrefix(r.URL.Path, "/"+p.bucket+"/")
	if r.Method != http.MethodDelete {
		p.rp.ServeHTTP(w, r)
		return
	}
	p.mu.Lock()
	if !p.watched[key] {
		p.mu.Unlock()
		p.rp.ServeHTTP(w, r)
		return
	}
	p.admitted++
	hold := p.holding
	if p.admitted <= p.passFirst {
		hold = nil
	}
	seq := p.nextSeq
	p.nextSeq++
	if hold != nil {
		p.held[seq] = true
	}
	p.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-r.Context().Done():
		}
		p.mu.Lock()
		delete(p.held, seq)
		p.mu.Unlock()
		if r.Context().Err() != nil {
			// The client is gone (a killed instance): S3 never sees it.
			return
		}
	}
	p.mu.Lock()
	p.forwarded[key]++
	p.mu.Unlock()
	p.rp.ServeHTTP(w, r)
}
