// Command load is the HTTP client of the thumbnail load benchmark
// (bench/run-thumbs.sh). It fetches every URL path listed in a file (one a
// line, relative to -base), c at a time over keep-alive connections, checks
// each answer, and prints the throughput and latencies:
//
//	load -base http://127.0.0.1:8080 -urls paths.txt -c 2
//	9.87 195.0 260.3 60
//
// that is requests per second, p50 and p99 latency in milliseconds, and the
// number of requests. Every answer must be 200 with Content-Type image/jpeg
// and a JPEG whose size matches the width, height and method of the URL's
// query (crop: exactly width×height; scale: inside the box and touching it),
// so a thumbnail that silently fell back to the original fails the run.
//
// With -rss-pid, it also prints "rss <done> <KiB>" lines: the VmRSS of that
// process before the first request and each time another -rss-every requests
// have completed.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"image"
	_ "image/jpeg" // registers the JPEG decoder for image.DecodeConfig
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/bench/thumbs/latency"
)

// options are the command-line flags.
type options struct {
	// latOut, when set, is a file each latency (ms) is appended to, one a
	// line, so that callers can pool the latencies of several runs.
	latOut   string
	base     string
	urls     string
	c        int
	rssPID   int
	rssEvery int
}

func main() {
	var o options
	flag.StringVar(&o.base, "base", "", "base URL, e.g. http://127.0.0.1:8080 (required)")
	flag.StringVar(&o.urls, "urls", "", "file of URL paths with query, one a line (required)")
	flag.IntVar(&o.c, "c", 2, "concurrent requests")
	flag.IntVar(&o.rssPID, "rss-pid", 0, "process whose VmRSS is sampled (0: none)")
	flag.IntVar(&o.rssEvery, "rss-every", 100, "sample VmRSS after every this many completed requests")
	flag.StringVar(&o.latOut, "lat-out", "", "append every latency in milliseconds, one a line, to this file")
	flag.Parse()
	if o.base == "" || o.urls == "" || o.c < 1 || o.rssEvery < 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "load: %v\n", err)
		os.Exit(1)
	}
}

// run performs the requests and prints the summary and RSS samples.
func run(o options) error {
	paths, err := readLines(o.urls)
	if err != nil {
		return err
	}
	if len(paths) == 0 {
		return fmt.Errorf("reading %s: no URL paths", o.urls)
	}
	client := &http.Client{
		Timeout:   5 * time.Minute,
		Transport: &http.Transport{MaxIdleConnsPerHost: o.c, DisableCompression: true},
	}
	var (
		rssMu   sync.Mutex
		samples []string
	)
	sample := func(done int) {
		if o.rssPID == 0 {
			return
		}
		kib, err := vmRSS(o.rssPID)
		rssMu.Lock()
		defer rssMu.Unlock()
		if err != nil {
			samples = append(samples, fmt.Sprintf("rss %d error: %v", done, err))
			return
		}
		samples = append(samples, fmt.Sprintf("rss %d %d", done, kib))
	}
	sample(0)

	lat := make([]time.Duration, len(paths))
	errs := make([]error, len(paths))
	var next, done atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range o.c {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(paths) {
					return
				}
				t := time.Now()
				errs[i] = fetch(client, o.base+paths[i])
				lat[i] = time.Since(t)
				if n := int(done.Add(1)); n%o.rssEvery == 0 || n == len(paths) {
					sample(n)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := latency.Append(o.latOut, lat); err != nil {
		return err
	}
	fmt.Printf("%.2f %.1f %.1f %d\n", float64(len(paths))/elapsed.Seconds(), latency.Ms(latency.Percentile(lat, 50)), latency.Ms(latency.Percentile(lat, 99)), len(paths))
	for _, s := range samples {
		fmt.Println(s)
	}
	return nil
}

// fetch GETs one thumbnail and checks it against the URL's query.
func fetch(client *http.Client, rawURL string) error {
	u, err := url.Parse(rawURL)
	if err != nil {
		return fmt.Errorf("parsing %s: %w", rawURL, err)
	}
	q := u.Query()
	w, werr := strconv.Atoi(q.Get("width"))
	h, herr := strconv.Atoi(q.Get("height"))
	if werr != nil || herr != nil {
		return fmt.Errorf("parsing %s: width and height must be integers", rawURL)
	}
	resp, err := client.Get(rawURL)
	if err != nil {
		return fmt.Errorf("fetching %s: %w", rawURL, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("reading %s: %w", rawURL, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("fetching %s: status %d: %.200s", rawURL, resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "image/jpeg" {
		return fmt.Errorf("fetching %s: Content-Type %q, want image/jpeg", rawURL, ct)
	}
	cfg, _, err := image.DecodeConfig(bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("decoding %s: %w", rawURL, err)
	}
	if !sizeMatches(cfg.Width, cfg.Height, w, h, q.Get("method")) {
		return fmt.Errorf("fetching %s: got %dx%d", rawURL, cfg.Width, cfg.Height)
	}
	return nil
}

// sizeMatches reports whether a gw×gh thumbnail answers a w×h request of a
// larger source: crop gives exactly w×h, scale fits inside and touches the
// box.
func sizeMatches(gw, gh, w, h int, method string) bool {
	if method == "crop" {
		return gw == w && gh == h
	}
	return gw <= w && gh <= h && (gw == w || gh == h)
}

// vmRSS reads the resident set size of pid in KiB from /proc.
func vmRSS(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, fmt.Errorf("reading process status: %w", err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parsing VmRSS %q: %w", v, err)
			}
			return n, nil
		}
	}
	return 0, fmt.Errorf("reading process status: no VmRSS line")
}

// readLines returns the non-empty lines of a file.
func readLines(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening URL list: %w", err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			lines = append(lines, l)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading URL list: %w", err)
	}
	return lines, nil
}
