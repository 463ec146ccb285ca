// Package latency holds what the thumbnail benchmark programs (load and
// direct) share about latencies: percentiles, milliseconds, and the files
// bench/run-thumbs.sh pools them in.
package latency

import (
	"bufio"
	"fmt"
	"os"
	"slices"
	"time"
)

// Percentile returns the p-th percentile (nearest rank) of d; d is sorted in
// place.
func Percentile(d []time.Duration, p int) time.Duration {
	slices.Sort(d)
	rank := (p*len(d) + 99) / 100 // ceil(p/100 * n)
	return d[max(rank, 1)-1]
}

// Ms converts d to milliseconds.
func Ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// Append appends lat in milliseconds, one a line, to the file path (nothing
// when path is empty).
func Append(path string, lat []time.Duration) error {
	if path == "" {
		return nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("writing latencies: %w", err)
	}
	w := bufio.NewWriter(f)
	for _, d := range lat {
		fmt.Fprintf(w, "%.3f\n", Ms(d))
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("writing latencies: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing latencies: %w", err)
	}
	return nil
}
