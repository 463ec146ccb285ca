// Command s3server is a stand-alone S3-compatible server for the S3 load
// benchmark (bench/run-s3.sh): gofakes3 with its in-memory backend on a
// 127.0.0.1 port, with one bucket created at start. It prints "ready" on
// standard output once it listens and serves until it is interrupted or
// terminated. It does not check request signatures, so any credentials work.
//
// With -conn-rate, every accepted connection's writes are paced to that many
// bytes per second, as a model of S3's per-connection throughput (AWS
// documents tens of MB/s per connection and recommends parallel byte-range
// GETs); clients then go faster only with more connections.
//
// GET /_stats (no bucket name starts with "_") answers the requests served
// so far by method, as "name value" lines ("requests 12", "GET 5", "PUT 4",
// ...), for benchmarks that count S3 requests per media request.
//
// Usage:
//
//	s3server -port 9000 -bucket media [-conn-rate 100MB]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 to listen on (default 0: any free port, printed with ready)")
	bucket := flag.String("bucket", "media", "bucket to create at start")
	connRate := flag.String("conn-rate", "", "cap on each connection's sent bytes per second, e.g. 100MB (decimal) or 64MiB; default none")
	flag.Parse()
	rate, err := parseRate(*connRate)
	if err != nil {
		fmt.Fprintln(os.Stderr, "s3server:", err)
		os.Exit(2)
	}
	if err := run(*port, *bucket, rate); err != nil {
		fmt.Fprintln(os.Stderr, "s3server:", err)
		os.Exit(1)
	}
}

// run serves the fake S3 on 127.0.0.1:port until SIGINT or SIGTERM, pacing
// each connection's writes to rate bytes per second when rate > 0.
func run(port int, bucket string, rate int64) error {
	backend := s3mem.New()
	if err := backend.CreateBucket(bucket); err != nil {
		return fmt.Errorf("creating bucket %q: %w", bucket, err)
	}
	fake := gofakes3.New(backend, gofakes3.WithLogger(gofakes3.DiscardLog()))
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	if rate > 0 {
		ln = pacedListener{Listener: ln, rate: rate}
	}
	srv := &http.Server{Handler: newCounting(fake.Server()), ReadHeaderTimeout: 10 * time.Second}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	fmt.Println("ready", ln.Addr().String())

	select {
	case err := <-errc:
		return fmt.Errorf("serving: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("shutting down: %w", err)
	}
	return nil
}

// parseRate parses a byte rate such as "100MB", "64MiB" or "1000000"; ""
// is 0 (no cap).
func parseRate(v string) (int64, error) {
	if v == "" {
		return 0, nil
	}
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1}} {
		if strings.HasSuffix(v, u.suffix) {
			v, mult = strings.TrimSuffix(v, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseFloat(v, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("invalid -conn-rate %q", v)
	}
	return int64(n * float64(mult)), nil
}

// pacedListener accepts connections whose writes are paced to rate bytes
// per second each.
type pacedListener struct {
	net.Listener
	rate int64
}

// Accept wraps the next connection.
func (l pacedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &pacedConn{Conn: c, rate: l.rate}, nil
}

// pacedConn sends at most rate bytes per second on average: each write of
// up to pacingChunk bytes waits until the previous ones have used up their
// time, with pacingCredit of catching up.
type pacedConn struct {
	net.Conn
	rate int64
	// next is when the next chunk may be sent.
	next time.Time
}

// pacingChunk is the largest piece written at once.
const pacingChunk = 64 << 10

// pacingCredit is how far a connection may fall behind its schedule and
// catch up: it absorbs sleeps that overshoot (without it, every late
// wake-up was lost and a 100 MB/s cap delivered about 52 MB/s here), but
// a connection idle for longer gets no more than this much burst.
const pacingCredit = 20 * time.Millisecond

// Write sends p in paced chunks.
func (c *pacedConn) Write(p []byte) (int, error) {
	total := 0
	for len(p) > 0 {
		n := min(len(p), pacingChunk)
		now := time.Now()
		if c.next.After(now) {
			time.Sleep(c.next.Sub(now))
		} else if lag := now.Sub(c.next); lag > pacingCredit {
			c.next = now.Add(-pacingCredit)
		}
		w, err := c.Conn.Write(p[:n])
		total += w
		c.next = c.next.Add(time.Duration(float64(w) / float64(c.rate) * float64(time.Second)))
		if err != nil {
			return total, err
		}
		p = p[n:]
	}
	return total, nil
}

// counting is the S3 handler with request counts by method and the
// /_stats endpoint.
type counting struct {
	next http.Handler
	mu   sync.Mutex
	n    map[string]int64
}

// newCounting wraps next.
func newCounting(next http.Handler) *counting {
	return &counting{next: next, n: map[string]int64{}}
}

// ServeHTTP answers /_stats, or counts the request and passes it on.
func (c *counting) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	if r.URL.Path == "/_stats" {
		var b strings.Builder
		total := int64(0)
		for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodPut, http.MethodPost, http.MethodDelete} {
			fmt.Fprintf(&b, "%s %d\n", m, c.n[m])
			total += c.n[m]
		}
		c.mu.Unlock()
		fmt.Fprintf(w, "requests %d\n%s", total, b.String())
		return
	}
	c.n[r.Method]++
	c.mu.Unlock()
	c.next.ServeHTTP(w, r)
}
