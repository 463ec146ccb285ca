// Command direct is the in-process baseline of the thumbnail load benchmark
// (bench/run-thumbs.sh): it makes one thumbnail of every file named on the
// command line with the same thumbnails.Generator the module uses, c at a
// time, and prints the throughput and latencies in the format of bench/thumbs/load:
//
//	direct -workers 2 -c 2 -width 320 -height 240 -method scale /tmp/src/*.jpg
//	10.41 188.2 240.7 60
//
// that is thumbnails per second, p50 and p99 latency in milliseconds, and the
// number of thumbnails. The files are read into memory before the clock
// starts (the module reads its source from its datastore, a page-cached file
// in the benchmark); one untimed thumbnail of the first file runs first, so
// that libvips' one-time start-up is not counted.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/bench/thumbs/latency"
	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"
)

// options are the command-line flags.
type options struct {
	// latOut, when set, is a file each latency (ms) is appended to, one a
	// line, so that callers can pool the latencies of several runs.
	latOut        string
	workers, c    int
	width, height int
	method        string
	files         []string
}

func main() {
	var o options
	flag.IntVar(&o.workers, "workers", 2, "thumbnails.Options.Workers")
	flag.IntVar(&o.c, "c", 2, "concurrent Generate calls")
	flag.IntVar(&o.width, "width", 320, "requested width")
	flag.IntVar(&o.height, "height", 240, "requested height")
	flag.StringVar(&o.method, "method", "scale", "crop or scale")
	flag.StringVar(&o.latOut, "lat-out", "", "append every latency in milliseconds, one a line, to this file")
	flag.Parse()
	o.files = flag.Args()
	if len(o.files) == 0 || o.workers < 1 || o.c < 1 {
		fmt.Fprintln(os.Stderr, "usage: direct [flags] file...")
		flag.PrintDefaults()
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "direct: %v\n", err)
		os.Exit(1)
	}
}

// run loads the files, generates the thumbnails and prints the summary.
func run(o options) error {
	srcs := make([][]byte, len(o.files))
	for i, f := range o.files {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("reading source: %w", err)
		}
		srcs[i] = b
	}
	g, err := thumbnails.New(thumbnails.Options{Workers: o.workers})
	if err != nil {
		return fmt.Errorf("creating generator: %w", err)
	}
	req := thumbnails.Request{Width: o.width, Height: o.height, Method: thumbnails.Method(o.method)}
	ctx := context.Background()
	if _, err := g.Generate(ctx, srcs[0], req); err != nil {
		return fmt.Errorf("warming up: %w", err)
	}

	lat := make([]time.Duration, len(srcs))
	errs := make([]error, len(srcs))
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range o.c {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= len(srcs) {
					return
				}
				t := time.Now()
				res, err := g.Generate(ctx, srcs[i], req)
				lat[i] = time.Since(t)
				if err == nil && (len(res.Data) == 0 || res.Width > o.width || res.Height > o.height) {
					err = fmt.Errorf("unexpected %dx%d result of %d bytes", res.Width, res.Height, len(res.Data))
				}
				if err != nil {
					errs[i] = fmt.Errorf("thumbnailing %s: %w", o.files[i], err)
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	if err := latency.Append(o.latOut, lat); err != nil {
		return err
	}
	fmt.Printf("%.2f %.1f %.1f %d\n", float64(len(srcs))/elapsed.Seconds(), latency.Ms(latency.Percentile(lat, 50)), latency.Ms(latency.Percentile(lat, 99)), len(srcs))
	return nil
}
