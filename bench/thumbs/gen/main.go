// Command gen writes distinct photo-like JPEGs for the thumbnail load
// benchmark (bench/run-thumbs.sh): smooth colour gradients and low-frequency
// waves plus per-pixel noise, so that they compress roughly like camera
// photos (about 3–4 MB at 4000x3000 with the defaults), and every file has
// different bytes (the index seeds the pattern and the noise).
//
//	gen -dir /tmp/src -n 60 -first 0 -width 4000 -height 3000
//
// writes /tmp/src/src-0000.jpg … src-0059.jpg and prints the paths, one a
// line.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"image"
	"image/jpeg"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
)

// options are the command-line flags.
type options struct {
	dir           string
	n, first      int
	width, height int
	quality       int
	noise         int
}

func main() {
	var o options
	flag.StringVar(&o.dir, "dir", "", "output directory (required; created if missing)")
	flag.IntVar(&o.n, "n", 60, "number of images")
	flag.IntVar(&o.first, "first", 0, "index of the first image (seeds its content and names it)")
	flag.IntVar(&o.width, "width", 4000, "image width in pixels")
	flag.IntVar(&o.height, "height", 3000, "image height in pixels")
	flag.IntVar(&o.quality, "quality", 90, "JPEG quality (1-100)")
	flag.IntVar(&o.noise, "noise", 24, "peak-to-peak luma noise (0-255); more noise, larger files")
	flag.Parse()
	if o.dir == "" || o.n < 1 || o.width < 16 || o.height < 16 || o.quality < 1 || o.quality > 100 || o.noise < 0 || o.noise > 255 {
		flag.Usage()
		os.Exit(2)
	}
	paths, err := run(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gen: %v\n", err)
		os.Exit(1)
	}
	w := bufio.NewWriter(os.Stdout)
	for _, p := range paths {
		fmt.Fprintln(w, p)
	}
	if err := w.Flush(); err != nil {
		fmt.Fprintf(os.Stderr, "gen: writing paths: %v\n", err)
		os.Exit(1)
	}
}

// run writes the images with one goroutine per CPU and returns their paths
// in index order.
func run(o options) ([]string, error) {
	if err := os.MkdirAll(o.dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating output directory: %w", err)
	}
	paths := make([]string, o.n)
	errs := make([]error, o.n)
	next := make(chan int)
	var wg sync.WaitGroup
	for range runtime.NumCPU() {
		wg.Go(func() {
			for i := range next {
				idx := o.first + i
				paths[i] = filepath.Join(o.dir, fmt.Sprintf("src-%04d.jpg", idx))
				errs[i] = writeImage(paths[i], photo(idx, o), o.quality)
			}
		})
	}
	for i := range o.n {
		next <- i
	}
	close(next)
	wg.Wait()
	return paths, errors.Join(errs...)
}

// photo draws image idx: a diagonal luma gradient, two low-frequency waves
// whose phases and frequencies depend on idx, colour gradients, and uniform
// noise (luma ±noise/2, chroma a quarter of that). 4:2:0 YCbCr is what
// cameras write and what image/jpeg encodes without conversion.
func photo(idx int, o options) *image.YCbCr {
	rng := rand.New(rand.NewPCG(uint64(idx)+1, 0x7468756d6273)) // "thumbs"
	img := image.NewYCbCr(image.Rect(0, 0, o.width, o.height), image.YCbCrSubsampleRatio420)
	fx1, fy1 := 2+rng.Float64()*6, 1+rng.Float64()*5
	fx2, fy2 := 7+rng.Float64()*9, 5+rng.Float64()*9
	ph1, ph2 := rng.Float64()*2*math.Pi, rng.Float64()*2*math.Pi
	base := 40 + rng.Float64()*60
	w, h := float64(o.width), float64(o.height)
	for y := range o.height {
		v := float64(y) / h
		row := img.Y[y*img.YStride : y*img.YStride+o.width]
		for x := range row {
			u := float64(x) / w
			l := base + 90*(u+v)/2 +
				35*math.Sin(2*math.Pi*fx1*u+ph1)*math.Cos(2*math.Pi*fy1*v) +
				15*math.Sin(2*math.Pi*(fx2*u+fy2*v)+ph2)
			if o.noise > 0 {
				l += float64(rng.IntN(o.noise+1)) - float64(o.noise)/2
			}
			row[x] = clamp8(l)
		}
	}
	cn := o.noise / 4
	cw, ch := (o.width+1)/2, (o.height+1)/2
	for y := range ch {
		v := float64(y) / float64(ch)
		for x := range cw {
			u := float64(x) / float64(cw)
			cb := 128 + 40*(u-0.5) + 20*math.Sin(2*math.Pi*v+ph1)
			cr := 128 + 40*(v-0.5) + 20*math.Cos(2*math.Pi*u+ph2)
			if cn > 0 {
				cb += float64(rng.IntN(cn+1)) - float64(cn)/2
				cr += float64(rng.IntN(cn+1)) - float64(cn)/2
			}
			img.Cb[y*img.CStride+x] = clamp8(cb)
			img.Cr[y*img.CStride+x] = clamp8(cr)
		}
	}
	return img
}

// clamp8 rounds v to a byte, saturating.
func clamp8(v float64) uint8 {
	switch {
	case v <= 0:
		return 0
	case v >= 255:
		return 255
	}
	return uint8(v + 0.5)
}

// writeImage encodes img as a JPEG file at path, through a temporary file so
// that a failed run leaves no truncated image behind.
func writeImage(path string, img image.Image, quality int) error {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("creating %s: %w", tmp, err)
	}
	bw := bufio.NewWriterSize(f, 1<<20)
	err = jpeg.Encode(bw, img, &jpeg.Options{Quality: quality})
	if err == nil {
		err = bw.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("renaming %s: %w", tmp, err)
	}
	return nil
}
