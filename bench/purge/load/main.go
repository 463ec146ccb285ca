// Command load is the client of the purge benchmark (bench/run-purge.sh). It
// runs uploads and downloads of local media at fixed rates against one site
// of a running Caddy, first alone ("before" phase, -before long), then while
// a remote media cache purge runs ("during" phase), and optionally for -after
// once it is done ("after" phase, a control): it asks for the purge
// with Synapse's admin API,
//
//	POST /_synapse/admin/v1/purge_media_cache?before_ts=<ms>
//
// as a media admin (-admin-token), which answers {"deleted": n} once the
// purge job is done, and keeps the load running until that answer. Meanwhile
// it follows the job's progress through Caddy's admin API
// (GET /matrix_media/jobs).
//
// The load is open-loop: every 1/rate seconds one request of each kind
// starts, whatever the previous ones are doing, so a purge that blocked
// uploads or downloads would show as latency (and as requests not started
// because -max-inflight of that kind were still running, counted as
// "skipped"), not as fewer requests. Uploads send -upload-size fresh random
// bytes each (POST /_matrix/media/v3/upload); downloads fetch, round robin,
// -local media uploaded before the phases (GET
// /_matrix/client/v1/media/download/...), and check their bytes.
//
// It prints a table of phases and kinds (requests, errors, skipped, req/s,
// p50, p99 and max latency in ms), the purge's progress samples, and the
// purge's rate:
//
//	purge: deleted 100000 items in 181.2 s: 552 items/s (job …: items 100000, bytes 102400000, done)
//
// It exits with status 1 when the purge fails, deletes another number of
// items than -expect (when set), or any request fails.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Bounds of the flags.
const (
	maxRate       = 10_000
	maxUploadSize = 64 << 20
	maxLocal      = 10_000
	maxInflight   = 1024
)

// maxAnswer bounds the JSON answers read (uploads, purge, jobs).
const maxAnswer = 1 << 20

// options are the command-line flags.
type options struct {
	base         string
	serverName   string
	token        string
	adminToken   string
	caddyAdmin   string
	beforeTS     int64
	expect       int64
	before       time.Duration
	after        time.Duration
	uploadRate   float64
	downloadRate float64
	uploadSize   int
	local        int
	maxInflight  int
}

func main() {
	var o options
	flag.StringVar(&o.base, "base", "", "base URL of the media site, e.g. http://127.0.0.1:8080 (required)")
	flag.StringVar(&o.serverName, "server-name", "localhost", "Matrix server name of the site")
	flag.StringVar(&o.token, "token", "bench", "access token of the uploading user")
	flag.StringVar(&o.adminToken, "admin-token", "", "media admin token of the site (required)")
	flag.StringVar(&o.caddyAdmin, "caddy-admin", "", "Caddy admin API base URL, e.g. http://127.0.0.1:2019 (required)")
	flag.Int64Var(&o.beforeTS, "before-ts", 0, "purge cutoff, ms since the epoch (required)")
	flag.Int64Var(&o.expect, "expect", -1, "items the purge must delete (-1: not checked)")
	flag.DurationVar(&o.before, "before", 15*time.Second, "length of the phase before the purge")
	flag.DurationVar(&o.after, "after", 0, "length of the phase after the purge (0: none)")
	flag.Float64Var(&o.uploadRate, "upload-rate", 10, "uploads started per second")
	flag.Float64Var(&o.downloadRate, "download-rate", 50, "downloads started per second")
	flag.IntVar(&o.uploadSize, "upload-size", 64<<10, "bytes per upload and per downloaded media")
	flag.IntVar(&o.local, "local", 50, "local media uploaded first, the downloads' targets")
	flag.IntVar(&o.maxInflight, "max-inflight", 64, "requests of one kind running at once before further starts are skipped")
	flag.Parse()
	if err := o.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		flag.Usage()
		os.Exit(2)
	}
	if err := run(context.Background(), o); err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		os.Exit(1)
	}
}

// validate bounds the flags.
func (o options) validate() error {
	switch {
	case o.base == "" || o.adminToken == "" || o.caddyAdmin == "" || o.beforeTS <= 0:
		return errors.New("-base, -admin-token, -caddy-admin and -before-ts are required")
	case o.uploadRate <= 0 || o.uploadRate > maxRate || o.downloadRate <= 0 || o.downloadRate > maxRate:
		return fmt.Errorf("rates must be above 0 and at most %d", maxRate)
	case o.uploadSize < 1 || o.uploadSize > maxUploadSize:
		return fmt.Errorf("-upload-size must be from 1 to %d", maxUploadSize)
	case o.local < 1 || o.local > maxLocal:
		return fmt.Errorf("-local must be from 1 to %d", maxLocal)
	case o.maxInflight < 1 || o.maxInflight > maxInflight:
		return fmt.Errorf("-max-inflight must be from 1 to %d", maxInflight)
	case o.before <= 0 || o.after < 0:
		return errors.New("-before must be positive and -after not negative")
	}
	return nil
}

// Phases and kinds of requests.
const (
	phaseBefore = iota
	phaseDuring
	phaseAfter
	phases
)

const (
	kindUpload = iota
	kindDownload
	kinds
)

var (
	phaseNames = [phases]string{"before", "during", "after"}
	kindNames  = [kinds]string{"upload", "download"}
)

// stats are the outcomes of one kind of request in one phase.
type stats struct {
	mu      sync.Mutex
	lat     []time.Duration
	errors  int
	skipped int
	// firstErr is kept for the report.
	firstErr error
}

func (s *stats) add(d time.Duration, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.errors++
		if s.firstErr == nil {
			s.firstErr = err
		}
		return
	}
	s.lat = append(s.lat, d)
}

func (s *stats) skip() {
	s.mu.Lock()
	s.skipped++
	s.mu.Unlock()
}

// localMedia is one uploaded media item the downloads fetch.
type localMedia struct {
	id   string
	sum  [sha256.Size]byte
	size int
}

// bench holds the run's state.
type bench struct {
	o      options
	client *http.Client
	media  []localMedia
	// phase is the phase requests starting now count in.
	phase atomic.Int32
	stats [phases][kinds]stats
	// elapsed is the length of each phase.
	elapsed [phases]time.Duration
}

// run uploads the local media, runs the two phases and prints the report.
func run(ctx context.Context, o options) error {
	b := &bench{o: o, client: &http.Client{
		Timeout:   time.Minute,
		Transport: &http.Transport{MaxIdleConnsPerHost: 2 * o.maxInflight, DisableCompression: true},
	}}
	for range o.local {
		m, err := b.uploadOne(ctx)
		if err != nil {
			return fmt.Errorf("uploading the downloads' media: %w", err)
		}
		b.media = append(b.media, m)
	}

	loadCtx, stopLoad := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { b.drive(loadCtx, kindUpload, o.uploadRate) })
	wg.Go(func() { b.drive(loadCtx, kindDownload, o.downloadRate) })

	start := time.Now()
	select {
	case <-time.After(o.before):
	case <-ctx.Done():
	}
	b.elapsed[phaseBefore] = time.Since(start)
	b.phase.Store(phaseDuring)
	res := b.purge(ctx)
	b.elapsed[phaseDuring] = res.elapsed
	if o.after > 0 {
		b.phase.Store(phaseAfter)
		start = time.Now()
		select {
		case <-time.After(o.after):
		case <-ctx.Done():
		}
		b.elapsed[phaseAfter] = time.Since(start)
	}
	stopLoad()
	wg.Wait()

	b.report(res)
	var errs []error
	if res.err != nil {
		errs = append(errs, fmt.Errorf("purge: %w", res.err))
	} else if o.expect >= 0 && res.deleted != o.expect {
		errs = append(errs, fmt.Errorf("purge deleted %d items, want %d", res.deleted, o.expect))
	}
	for p := range phases {
		for k := range kinds {
			if s := &b.stats[p][k]; s.errors > 0 {
				errs = append(errs, fmt.Errorf("%s %s: %d failed, first: %w", phaseNames[p], kindNames[k], s.errors, s.firstErr))
			}
		}
	}
	return errors.Join(errs...)
}

// drive starts one request of kind every 1/rate seconds until ctx ends,
// at most o.maxInflight at once, and waits for those running.
func (b *bench) drive(ctx context.Context, kind int, rate float64) {
	t := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer t.Stop()
	var (
		inflight atomic.Int64
		wg       sync.WaitGroup
		n        int
	)
	defer wg.Wait()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s := &b.stats[b.phase.Load()][kind]
		if inflight.Load() >= int64(b.o.maxInflight) {
			s.skip()
			continue
		}
		inflight.Add(1)
		i := n
		n++
		wg.Go(func() {
			defer inflight.Add(-1)
			start := time.Now()
			var err error
			if kind == kindUpload {
				_, err = b.uploadOne(context.WithoutCancel(ctx))
			} else {
				err = b.downloadOne(context.WithoutCancel(ctx), b.media[i%len(b.media)])
			}
			s.add(time.Since(start), err)
		})
	}
}

// contentURI finds the media ID in an upload's answer.
var contentURI = regexp.MustCompile(`"content_uri"\s*:\s*"mxc://[^/"]+/([A-Za-z0-9_-]+)"`)

// uploadOne uploads o.uploadSize fresh random bytes and returns the media.
func (b *bench) uploadOne(ctx context.Context) (localMedia, error) {
	body := make([]byte, b.o.uploadSize)
	if _, err := rand.Read(body); err != nil {
		return localMedia{}, fmt.Errorf("random bytes: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, b.o.base+"/_matrix/media/v3/upload?filename=bench.bin", bytes.NewReader(body))
	if err != nil {
		return localMedia{}, fmt.Errorf("upload: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+b.o.token)
	req.Header.Set("Content-Type", "application/octet-stream")
	status, answer, err := do(b.client, req)
	if err != nil {
		return localMedia{}, fmt.Errorf("upload: %w", err)
	}
	if status != http.StatusOK {
		return localMedia{}, fmt.Errorf("upload: status %d: %.200s", status, answer)
	}
	m := contentURI.FindSubmatch(answer)
	if m == nil {
		return localMedia{}, fmt.Errorf("upload: no content_uri in %.200s", answer)
	}
	return localMedia{id: string(m[1]), sum: sha256.Sum256(body), size: len(body)}, nil
}

// downloadOne downloads m and checks its bytes.
func (b *bench) downloadOne(ctx context.Context, m localMedia) error {
	u := b.o.base + "/_matrix/client/v1/media/download/" + url.PathEscape(b.o.serverName) + "/" + m.id
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("download: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+b.o.token)
	resp, err := b.client.Do(req)
	if err != nil {
		return fmt.Errorf("download %s: %w", m.id, err)
	}
	defer resp.Body.Close()
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(resp.Body, int64(m.size)+1))
	if err != nil {
		return fmt.Errorf("download %s: reading: %w", m.id, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("download %s: status %d", m.id, resp.StatusCode)
	}
	if n != int64(m.size) || !bytes.Equal(h.Sum(nil), m.sum[:]) {
		return fmt.Errorf("download %s: got %d bytes that differ from the upload", m.id, n)
	}
	return nil
}

// do sends req with c and returns the status and up to maxAnswer bytes of
// the body.
func do(c *http.Client, req *http.Request) (int, []byte, error) {
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
	if err != nil {
		return 0, nil, fmt.Errorf("reading answer: %w", err)
	}
	return resp.StatusCode, body, nil
}

// job is the part of Caddy's admin API job view the report uses.
type job struct {
	ID         string     `json:"id"`
	Kind       string     `json:"kind"`
	State      string     `json:"state"`
	Items      int64      `json:"items"`
	Bytes      int64      `json:"bytes"`
	Error      string     `json:"error"`
	CreatedAt  time.Time  `json:"created_at"`
	FinishedAt *time.Time `json:"finished_at"`
}

// sample is the purge job's progress at one time.
type sample struct {
	at    time.Duration
	items int64
}

// purgeResult is the outcome of the purge.
type purgeResult struct {
	deleted int64
	elapsed time.Duration
	samples []sample
	job     *job
	err     error
}

// purge asks for the purge, follows its job every second until the answer
// comes, and returns the outcome.
func (b *bench) purge(ctx context.Context) purgeResult {
	var res purgeResult
	start := time.Now()
	type answer struct {
		deleted int64
		err     error
	}
	done := make(chan answer, 1)
	go func() {
		n, err := b.askPurge(ctx)
		done <- answer{n, err}
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case a := <-done:
			res.elapsed = time.Since(start)
			res.deleted, res.err = a.deleted, a.err
			if j, err := b.purgeJob(ctx, start); err == nil {
				res.job = j
			} else if res.err == nil {
				res.err = err
			}
			return res
		case <-tick.C:
			if j, err := b.purgeJob(ctx, start); err == nil {
				res.samples = append(res.samples, sample{at: time.Since(start), items: j.Items})
			}
		}
	}
}

// askPurge sends Synapse's purge_media_cache and returns "deleted".
func (b *bench) askPurge(ctx context.Context) (int64, error) {
	u := b.o.base + "/_synapse/admin/v1/purge_media_cache?before_ts=" + strconv.FormatInt(b.o.beforeTS, 10)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, http.NoBody)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+b.o.adminToken)
	status, body, err := do(&http.Client{Timeout: 2 * time.Hour}, req)
	if err != nil {
		return 0, err
	}
	if status != http.StatusOK {
		return 0, fmt.Errorf("status %d: %.300s", status, body)
	}
	var out struct {
		Deleted *int64 `json:"deleted"`
	}
	if err := json.Unmarshal(body, &out); err != nil || out.Deleted == nil {
		return 0, fmt.Errorf("answer without \"deleted\": %.300s", body)
	}
	return *out.Deleted, nil
}

// purgeJob returns the newest purge_remote job created since start (less a
// second of clock rounding), from Caddy's admin API.
func (b *bench) purgeJob(ctx context.Context, start time.Time) (*job, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.o.caddyAdmin+"/matrix_media/jobs?limit=10", nil)
	if err != nil {
		return nil, err
	}
	status, body, err := do(b.client, req)
	if err != nil {
		return nil, fmt.Errorf("listing jobs: %w", err)
	}
	if status != http.StatusOK {
		return nil, fmt.Errorf("listing jobs: status %d: %.300s", status, body)
	}
	var js []job
	if err := json.Unmarshal(body, &js); err != nil {
		return nil, fmt.Errorf("listing jobs: %w", err)
	}
	for i := range js {
		if js[i].Kind == "purge_remote" && !js[i].CreatedAt.Before(start.Add(-time.Second)) {
			return &js[i], nil
		}
	}
	return nil, errors.New("listing jobs: no purge_remote job since the purge was asked for")
}

// report prints the table, the progress samples and the purge's rate.
func (b *bench) report(res purgeResult) {
	fmt.Printf("%-7s %-9s %7s %7s %8s %8s %8s %8s %8s\n", "phase", "kind", "ok", "errors", "skipped", "req/s", "p50_ms", "p99_ms", "max_ms")
	for p := range phases {
		if b.elapsed[p] == 0 {
			continue
		}
		for k := range kinds {
			s := &b.stats[p][k]
			slices.Sort(s.lat)
			rate := float64(len(s.lat)) / b.elapsed[p].Seconds()
			fmt.Printf("%-7s %-9s %7d %7d %8d %8.1f %8.1f %8.1f %8.1f\n", phaseNames[p], kindNames[k],
				len(s.lat), s.errors, s.skipped, rate, ms(percentile(s.lat, 50)), ms(percentile(s.lat, 99)), ms(percentile(s.lat, 100)))
		}
	}
	fmt.Printf("phases: before %.1f s, during %.1f s, after %.1f s\n",
		b.elapsed[phaseBefore].Seconds(), b.elapsed[phaseDuring].Seconds(), b.elapsed[phaseAfter].Seconds())
	for _, s := range res.samples {
		fmt.Printf("progress %.0f s: %d items\n", s.at.Seconds(), s.items)
	}
	if res.err != nil {
		fmt.Printf("purge: failed after %.1f s: %v\n", res.elapsed.Seconds(), res.err)
		return
	}
	line := fmt.Sprintf("purge: deleted %d items in %.1f s: %.0f items/s", res.deleted, res.elapsed.Seconds(),
		float64(res.deleted)/res.elapsed.Seconds())
	if j := res.job; j != nil {
		line += fmt.Sprintf(" (job %s: items %d, bytes %d, %s", j.ID, j.Items, j.Bytes, j.State)
		if j.FinishedAt != nil {
			d := j.FinishedAt.Sub(j.CreatedAt)
			line += fmt.Sprintf(", ran %.1f s: %.0f items/s", d.Seconds(), float64(j.Items)/d.Seconds())
		}
		line += ")"
	}
	fmt.Println(line)
}

// percentile returns the p-th percentile (nearest rank) of sorted d, 0 when
// d is empty.
func percentile(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	rank := (p*len(d) + 99) / 100 // ceil(p/100 * n)
	return d[max(rank, 1)-1]
}

// ms converts d to milliseconds.
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
