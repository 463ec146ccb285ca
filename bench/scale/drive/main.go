// Command drive is the HTTP client of the scale benchmark
// (bench/run-scale.sh). It sends one kind of request, c at a time over
// keep-alive connections, checks every answer, and prints one line:
//
//	<requests/s> <p50 ms> <p99 ms> <requests>
//
// Modes (-mode):
//
//   - upload: POST /_matrix/media/v3/upload of -n bodies to -base: the
//     files listed in -files (one path a line, -n = their number), or -n
//     distinct random bodies of -size bytes; the media IDs are written to
//     -ids-out, one a line, in order.
//   - get: GET every path listed in -paths (relative to -base); each answer
//     must be 200, and exactly -size bytes when -size is set, and of a
//     Content-Type starting with -type when -type is set.
//   - async: -n times: POST /_matrix/media/v1/create on instance i (the
//     i-th of the comma-separated -bases, round robin), a download of the
//     new ID waiting on the next instance (legacy endpoint, timeout_ms
//     30000), and after -delay the PUT of a random -size body on instance i;
//     the latency is from the PUT's start to the waiting download's last
//     byte, which must be the PUT's body. A second line, "wake <p50 ms>
//     <p99 ms>", is the time from the PUT's answer to the download's answer
//     (0 when the download answered first).
//
// Every request carries "Authorization: Bearer bench" (the benchmark's
// stand-in homeserver accepts it).
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/bench/thumbs/latency"
)

// options are the command-line flags.
type options struct {
	mode, base, bases, files, paths, idsOut, typ string
	n, size, c                                   int
	delay                                        time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.mode, "mode", "", "upload, get or async (required)")
	flag.StringVar(&o.base, "base", "", "base URL (upload, get)")
	flag.StringVar(&o.bases, "bases", "", "comma-separated base URLs of the instances (async)")
	flag.StringVar(&o.files, "files", "", "file listing the files to upload, one a line (upload; default: random bodies)")
	flag.StringVar(&o.paths, "paths", "", "file listing URL paths, one a line (get)")
	flag.StringVar(&o.idsOut, "ids-out", "", "file the uploaded media IDs are written to (upload)")
	flag.StringVar(&o.typ, "type", "", "Content-Type prefix every answer must have (get)")
	flag.IntVar(&o.n, "n", 100, "requests (upload of random bodies, async)")
	flag.IntVar(&o.size, "size", 0, "body size in bytes (upload, async; get: expected size, 0 = any)")
	flag.IntVar(&o.c, "c", 1, "concurrent requests")
	flag.DurationVar(&o.delay, "delay", 20*time.Millisecond, "time between the waiting download's start and the PUT (async)")
	flag.Parse()
	if o.c < 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "drive: %v\n", err)
		os.Exit(1)
	}
}

// run performs the mode's requests and prints the summary.
func run(o options) error {
	client := &http.Client{
		Timeout:   2 * time.Minute,
		Transport: &http.Transport{MaxIdleConnsPerHost: 2 * o.c, DisableCompression: true},
	}
	var (
		n    int
		do   func(i int) (time.Duration, error)
		wake []time.Duration
		ids  []string
	)
	switch o.mode {
	case "upload":
		var files []string
		if o.files != "" {
			var err error
			if files, err = readLines(o.files); err != nil {
				return err
			}
			o.n = len(files)
		}
		n = o.n
		ids = make([]string, n)
		do = func(i int) (time.Duration, error) {
			var body []byte
			ct := "application/octet-stream"
			if files != nil {
				var err error
				if body, err = os.ReadFile(files[i]); err != nil {
					return 0, fmt.Errorf("reading %s: %w", files[i], err)
				}
				ct = "image/jpeg"
			} else {
				body = randomBody(o.size)
			}
			t := time.Now()
			id, err := upload(client, http.MethodPost, o.base+"/_matrix/media/v3/upload", ct, body)
			ids[i] = id
			return time.Since(t), err
		}
	case "get":
		paths, err := readLines(o.paths)
		if err != nil {
			return err
		}
		n = len(paths)
		do = func(i int) (time.Duration, error) {
			t := time.Now()
			body, resp, err := get(client, o.base+paths[i])
			d := time.Since(t)
			if err != nil {
				return d, err
			}
			if o.size > 0 && len(body) != o.size {
				return d, fmt.Errorf("GET %s: %d bytes, want %d", paths[i], len(body), o.size)
			}
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, o.typ) {
				return d, fmt.Errorf("GET %s: Content-Type %q, want a type starting with %q", paths[i], ct, o.typ)
			}
			return d, nil
		}
	case "async":
		bases := strings.Split(o.bases, ",")
		n = o.n
		wake = make([]time.Duration, n)
		do = func(i int) (time.Duration, error) {
			return asyncOne(client, bases[i%len(bases)], bases[(i+1)%len(bases)], o.size, o.delay, &wake[i])
		}
	default:
		return fmt.Errorf("unknown -mode %q", o.mode)
	}
	if n == 0 {
		return errors.New("no requests")
	}
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range o.c {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				lat[i], errs[i] = do(i)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if o.idsOut != "" {
		if err := os.WriteFile(o.idsOut, []byte(strings.Join(ids, "\n")+"\n"), 0o600); err != nil {
			return fmt.Errorf("writing the IDs: %w", err)
		}
	}
	fmt.Printf("%.2f %.2f %.2f %d\n", float64(n)/elapsed.Seconds(), latency.Ms(latency.Percentile(lat, 50)), latency.Ms(latency.Percentile(lat, 99)), n)
	if wake != nil {
		fmt.Printf("wake %.2f %.2f\n", latency.Ms(latency.Percentile(wake, 50)), latency.Ms(latency.Percentile(wake, 99)))
	}
	return nil
}

// asyncOne creates a media ID on base, waits for it on waitBase, PUTs a
// body on base after delay, and returns the time from the PUT's start to the
// waiting download's answer; *wake is set to the time from the PUT's answer
// to the download's answer.
func asyncOne(client *http.Client, base, waitBase string, size int, delay time.Duration, wake *time.Duration) (time.Duration, error) {
	req, err := http.NewRequest(http.MethodPost, base+"/_matrix/media/v1/create", nil)
	if err != nil {
		return 0, fmt.Errorf("making the create request: %w", err)
	}
	req.Header.Set("Authorization", "Bearer bench")
	resp, err := client.Do(req)
	if err != nil {
		return 0, fmt.Errorf("create: %w", err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("create: status %d: %.200s (%v)", resp.StatusCode, b, err)
	}
	var created struct {
		URI string `json:"content_uri"`
	}
	if err := json.Unmarshal(b, &created); err != nil {
		return 0, fmt.Errorf("create: %w", err)
	}
	serverID, ok := strings.CutPrefix(created.URI, "mxc://")
	if !ok {
		return 0, fmt.Errorf("create: content_uri %q", created.URI)
	}
	body := randomBody(size)
	type answer struct {
		body []byte
		at   time.Time
		err  error
	}
	got := make(chan answer, 1)
	go func() {
		b, _, err := get(client, waitBase+"/_matrix/media/v3/download/"+serverID+"?timeout_ms=30000")
		got <- answer{b, time.Now(), err}
	}()
	time.Sleep(delay)
	t := time.Now()
	if _, err := upload(client, http.MethodPut, base+"/_matrix/media/v3/upload/"+serverID, "application/octet-stream", body); err != nil {
		return 0, err
	}
	putDone := time.Now()
	a := <-got
	if a.err != nil {
		return 0, fmt.Errorf("waiting download: %w", a.err)
	}
	if !bytes.Equal(a.body, body) {
		return 0, fmt.Errorf("waiting download of %s: %d bytes that differ from the PUT's %d", serverID, len(a.body), len(body))
	}
	*wake = max(0, a.at.Sub(putDone))
	return a.at.Sub(t), nil
}

// upload sends body with method to url and returns the media ID of the
// answer (POST) or "" (PUT, whose answer is {}).
func upload(client *http.Client, method, url, ct string, body []byte) (string, error) {
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		return "", fmt.Errorf("making the upload request: %w", err)
	}
	req.Header.Set("Authorization", "Bearer bench")
	req.Header.Set("Content-Type", ct)
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", method, url, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return "", fmt.Errorf("%s %s: reading the answer: %w", method, url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s %s: status %d: %.200s", method, url, resp.StatusCode, b)
	}
	if method == http.MethodPut {
		return "", nil
	}
	var out struct {
		URI string `json:"content_uri"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return "", fmt.Errorf("%s %s: %w", method, url, err)
	}
	i := strings.LastIndexByte(out.URI, '/')
	if !strings.HasPrefix(out.URI, "mxc://") || i < 0 {
		return "", fmt.Errorf("%s %s: content_uri %q", method, url, out.URI)
	}
	return out.URI[i+1:], nil
}

// get fetches url with the benchmark's token and checks for 200.
func get(client *http.Client, url string) ([]byte, *http.Response, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("making the request: %w", err)
	}
	req.Header.Set("Authorization", "Bearer bench")
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("GET %s: %w", url, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, nil, fmt.Errorf("GET %s: reading: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("GET %s: status %d: %.200s", url, resp.StatusCode, b)
	}
	return b, resp, nil
}

// randomBody returns size random bytes.
func randomBody(size int) []byte {
	b := make([]byte, size)
	_, _ = rand.Read(b)
	return b
}

// readLines returns the non-empty lines of a file.
func readLines(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
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
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return lines, nil
}
