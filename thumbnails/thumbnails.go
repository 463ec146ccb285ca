// Package thumbnails generates Matrix media thumbnails with libvips through
// github.com/h2non/bimg, bounded in input size, pixels and concurrency.
//
// Safety model: the source is sniffed by magic bytes (JPEG, PNG, GIF, WebP,
// and HEIF/AVIF only when Options.AllowHEIF is set); everything else is
// rejected with ErrUnsupported before libvips sees it. Headers are read in
// pure Go (image.DecodeConfig plus structure walks, no pixel decoding), so
// decompression bombs are rejected with ErrTooLarge in microseconds, and
// truncated JPEG/PNG/GIF/WebP files are rejected instead of being rendered
// grey. libvips runs with the operation cache off, concurrency 1 per
// operation and untrusted loaders (SVG, PDF, ImageMagick) blocked.
//
// Requirements: CGO_ENABLED=1, a C compiler and libvips ≥ 8.13 with its
// pkg-config file (Debian: libvips-dev to build, libvips42 at run time).
// Importing this package initialises libvips (bimg's init), costing about
// 45 ms and 30 MiB RSS. Long-running servers should run with
// MALLOC_ARENA_MAX=2 (or jemalloc) to keep glibc arenas from holding freed
// libvips memory. Large sources may spill to TMPDIR (libvips' disc
// threshold, 100 MB by default).
package thumbnails

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/h2non/bimg"
)

// Method is the thumbnailing method of the Matrix thumbnail API.
type Method string

const (
	// MethodCrop scales the source to cover the box and centre-crops it to
	// the requested aspect ratio.
	MethodCrop Method = "crop"
	// MethodScale returns the largest size that keeps the aspect ratio and
	// fits inside the box.
	MethodScale Method = "scale"
)

// Format is an image format, used for sources and outputs.
type Format string

const (
	// FormatJPEG is JPEG (image/jpeg).
	FormatJPEG Format = "jpeg"
	// FormatPNG is PNG (image/png).
	FormatPNG Format = "png"
	// FormatGIF is GIF (image/gif); a source format only.
	FormatGIF Format = "gif"
	// FormatWebP is WebP (image/webp), still or animated.
	FormatWebP Format = "webp"
	// FormatHEIF is HEIC/HEIF (image/heic); a source format only, and only
	// with Options.AllowHEIF.
	FormatHEIF Format = "heif"
	// FormatAVIF is AVIF (image/avif); a source format with
	// Options.AllowHEIF, and an output format on request.
	FormatAVIF Format = "avif"
)

// ContentType returns the MIME type of the format.
func (f Format) ContentType() string {
	switch f {
	case FormatHEIF:
		return "image/heic"
	case "":
		return ""
	}
	return "image/" + string(f)
}

// Defaults for Options fields left at zero.
const (
	DefaultMaxPixels      int64 = 32_000_000
	DefaultMaxSourceBytes int64 = 64 << 20
	DefaultMaxFrames            = 100
	DefaultJPEGQuality          = 80
	DefaultWebPQuality          = 75
	DefaultAVIFQuality          = 50
)

// Errors returned by Generate and Probe; test with errors.Is.
var (
	// ErrUnsupported means the input is not an image this package
	// thumbnails: unknown magic, SVG, PDF, text, zero bytes, truncated or
	// corrupt data, or HEIF/AVIF when not allowed. HTTP: 400 M_UNKNOWN.
	ErrUnsupported = errors.New("unsupported or corrupt image")
	// ErrTooLarge means the source exceeds MaxSourceBytes or MaxPixels.
	// HTTP: 413 M_TOO_LARGE (502 for remote media).
	ErrTooLarge = errors.New("image too large to thumbnail")
	// ErrBusy means all workers are busy and the wait queue is full.
	// HTTP: 429 M_LIMIT_EXCEEDED.
	ErrBusy = errors.New("thumbnailer busy")
	// ErrSmallerThanRequest means the source already fits the requested box
	// and is a browser-safe type (JPEG, PNG, GIF, WebP) that may be served
	// as is: the caller should serve the original bytes (never upscale).
	// It is not returned for animated sources when a still thumbnail is
	// required (Animated false, or a non-animatable Output).
	ErrSmallerThanRequest = errors.New("source is not larger than the requested thumbnail")
	// ErrInvalidRequest means the Request itself is invalid (size ≤ 0,
	// unknown method or output format). HTTP: 400 M_INVALID_PARAM.
	ErrInvalidRequest = errors.New("invalid thumbnail request")
)

// Request describes one thumbnail.
type Request struct {
	// Width and Height are the requested box in pixels, both ≥ 1.
	Width, Height int
	// Method is MethodCrop or MethodScale.
	Method Method
	// Animated asks for an animated thumbnail (animated WebP) when the
	// source is an animated GIF or WebP; on still sources it is ignored.
	Animated bool
	// Output is the output format. "" is automatic: PNG for PNG and GIF
	// sources or any source with transparency, JPEG otherwise, animated WebP for
	// animated output. Callers may ask for FormatJPEG, FormatPNG, FormatWebP
	// or FormatAVIF (when the client's Accept header allows); an explicit
	// JPEG or PNG makes the output still.
	Output Format
}

// Options configures a Generator. Zero fields take the documented default.
type Options struct {
	// MaxPixels is the largest width*height*frames decoded for one
	// thumbnail (frames = 1 for still output, min(frames, MaxFrames) for
	// animated output). Default 32_000_000.
	MaxPixels int64
	// MaxSourceBytes is the largest accepted source. Default 64 MiB.
	MaxSourceBytes int64
	// AllowHEIF enables HEIC and AVIF sources (decoded by libheif). Default
	// false.
	AllowHEIF bool
	// MaxFrames caps the frames of animated output; longer animations are
	// cut to their first MaxFrames frames. Default 100.
	MaxFrames int
	// JPEGQuality is the JPEG output quality (1–100). Default 80.
	JPEGQuality int
	// WebPQuality is the WebP output quality (1–100). Default 75.
	WebPQuality int
	// AVIFQuality is the AVIF output quality (1–100). Default 50.
	AVIFQuality int
	// Workers is the number of concurrent generations. Default
	// runtime.NumCPU().
	Workers int
	// Queue is the number of generations that may wait for a worker before
	// Generate returns ErrBusy. Default 4*Workers.
	Queue int
}

// withDefaults fills zero fields.
func (o Options) withDefaults() Options {
	if o.MaxPixels <= 0 {
		o.MaxPixels = DefaultMaxPixels
	}
	if o.MaxSourceBytes <= 0 {
		o.MaxSourceBytes = DefaultMaxSourceBytes
	}
	if o.MaxFrames <= 0 {
		o.MaxFrames = DefaultMaxFrames
	}
	if o.JPEGQuality <= 0 {
		o.JPEGQuality = DefaultJPEGQuality
	}
	if o.WebPQuality <= 0 {
		o.WebPQuality = DefaultWebPQuality
	}
	if o.AVIFQuality <= 0 {
		o.AVIFQuality = DefaultAVIFQuality
	}
	if o.Workers <= 0 {
		o.Workers = runtime.NumCPU()
	}
	if o.Queue <= 0 {
		o.Queue = 4 * o.Workers
	}
	return o
}

// Result is a generated thumbnail.
type Result struct {
	// Data is the encoded thumbnail.
	Data []byte
	// ContentType is the MIME type of Data.
	ContentType string
	// Width and Height are the thumbnail's displayed size (after EXIF
	// orientation), per frame for animations.
	Width, Height int
	// Animated is true when Data is an animated WebP.
	Animated bool
	// Frames is the number of frames in Data (1 for still images).
	Frames int
}

// Stats is a snapshot of the Generator's load.
type Stats struct {
	// Running is the number of generations holding a worker.
	Running int
	// Queued is the number of generations waiting for a worker.
	Queued int
}

// Generator makes thumbnails with bounded concurrency. It is safe for
// concurrent use.
type Generator struct {
	opts    Options
	slots   chan struct{}
	running atomic.Int64
	queued  atomic.Int64
	// testHookRunning, when set, runs after a worker slot is taken and
	// before libvips is called (tests use it to hold workers).
	testHookRunning func()
}

// vipsOnce guards configureVips: libvips is process-global, so its settings
// are applied once per process. It is the package's only global state.
var vipsOnce sync.Once

// New returns a Generator. The first call configures libvips for the whole
// process (cache off, concurrency 1, untrusted loaders blocked).
func New(opts Options) (*Generator, error) {
	opts = opts.withDefaults()
	if opts.JPEGQuality > 100 || opts.WebPQuality > 100 || opts.AVIFQuality > 100 {
		return nil, fmt.Errorf("creating thumbnail generator: quality over 100")
	}
	vipsOnce.Do(configureVips)
	return &Generator{opts: opts, slots: make(chan struct{}, opts.Workers)}, nil
}

// Stats reports how many generations are running and waiting.
func (g *Generator) Stats() Stats {
	return Stats{Running: int(g.running.Load()), Queued: int(g.queued.Load())}
}

// Probe is like the package-level Probe but with the Generator's limits
// (MaxSourceBytes, MaxPixels for one frame, AllowHEIF).
func (g *Generator) Probe(src []byte) (Info, error) {
	return probe(src, g.opts)
}

// acquire takes a worker slot, waiting in the bounded queue if needed.
func (g *Generator) acquire(ctx context.Context) error {
	select {
	case g.slots <- struct{}{}:
		g.running.Add(1)
		return nil
	default:
	}
	if g.queued.Add(1) > int64(g.opts.Queue) {
		g.queued.Add(-1)
		return fmt.Errorf("waiting for a thumbnail worker: %d queued: %w", g.opts.Queue, ErrBusy)
	}
	defer g.queued.Add(-1)
	select {
	case g.slots <- struct{}{}:
		g.running.Add(1)
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for a thumbnail worker: %w", ctx.Err())
	}
}

// release gives a worker slot back. The last worker to finish trims the C
// heap, so that RSS falls back after a burst instead of staying at its peak.
func (g *Generator) release() {
	if g.running.Add(-1) == 0 {
		trimMalloc()
	}
	<-g.slots
}

// Generate makes one thumbnail of src. Header checks run before queueing;
// the libvips work runs on one of Options.Workers slots. ctx cancels
// waiting for a slot, not a running libvips operation. src must not be
// modified while Generate runs.
func (g *Generator) Generate(ctx context.Context, src []byte, req Request) (Result, error) {
	if err := validateRequest(req); err != nil {
		return Result{}, err
	}
	info, err := g.Probe(src)
	if err != nil {
		return Result{}, err
	}
	p := plan(info, req)
	p.frames = min(p.frames, g.opts.MaxFrames)
	if p.useOriginal {
		return Result{}, fmt.Errorf("planning %dx%d %s thumbnail of %dx%d %s: %w", req.Width, req.Height, req.Method, info.Width, info.Height, info.Format, ErrSmallerThanRequest)
	}
	if err := checkPixels(info.Width, info.Height, p.frames, g.opts.MaxPixels); err != nil {
		return Result{}, err
	}
	if err := g.acquire(ctx); err != nil {
		return Result{}, err
	}
	defer g.release()
	if g.testHookRunning != nil {
		g.testHookRunning()
	}
	if err := ctx.Err(); err != nil {
		return Result{}, fmt.Errorf("starting thumbnail: %w", err)
	}
	if p.animated {
		return g.generateAnimated(src, info, p)
	}
	return g.generateStill(src, info, p)
}

// validateRequest checks the request fields.
func validateRequest(req Request) error {
	if req.Width <= 0 || req.Height <= 0 {
		return fmt.Errorf("validating request: size %dx%d: %w", req.Width, req.Height, ErrInvalidRequest)
	}
	if req.Method != MethodCrop && req.Method != MethodScale {
		return fmt.Errorf("validating request: method %q: %w", req.Method, ErrInvalidRequest)
	}
	switch req.Output {
	case "", FormatJPEG, FormatPNG, FormatWebP, FormatAVIF:
	default:
		return fmt.Errorf("validating request: output %q: %w", req.Output, ErrInvalidRequest)
	}
	return nil
}

// generateAnimated runs the cgo animated-WebP pipeline.
func (g *Generator) generateAnimated(src []byte, info Info, p thumbPlan) (Result, error) {
	fw, fh := p.loadW, p.loadH
	if p.crop {
		fw, fh = p.coverW, p.coverH
	}
	data, w, h, pages, err := animatedWebP(src, p.frames, fw, fh, p.crop, p.loadW, p.loadH, info.HasAlpha, g.opts.WebPQuality)
	if err != nil {
		return Result{}, fmt.Errorf("generating thumbnail: %w: %w", err, ErrUnsupported)
	}
	return Result{Data: data, ContentType: FormatWebP.ContentType(), Width: w, Height: h, Animated: pages > 1, Frames: pages}, nil
}

// bimgTypes maps output formats to bimg types.
var bimgTypes = map[Format]bimg.ImageType{
	FormatJPEG: bimg.JPEG,
	FormatPNG:  bimg.PNG,
	FormatWebP: bimg.WEBP,
	FormatAVIF: bimg.AVIF,
}

// generateStill resizes with bimg in the stored orientation
// (NoAutoRotate keeps JPEG shrink-on-load working) and then applies the
// EXIF orientation to the small result with a second, lossless-input pass.
func (g *Generator) generateStill(src []byte, info Info, p thumbPlan) (Result, error) {
	opts := bimg.Options{
		Width:         p.loadW,
		Height:        p.loadH,
		Crop:          p.crop,
		Gravity:       bimg.GravityCentre,
		NoAutoRotate:  true,
		StripMetadata: true,
		Type:          bimgTypes[p.output],
		Quality:       g.quality(p.output),
	}
	if p.output == FormatJPEG {
		// Flatten any alpha band (bimg only does so when it exists) onto
		// white rather than letting the JPEG saver drop it.
		opts.Background = bimg.Color{R: 255, G: 255, B: 255}
	}
	if p.output == FormatAVIF {
		// bimg's zero Speed means libvips effort 9 (slowest); 5 maps to
		// libvips' default effort 4.
		opts.Speed = 5
	}
	angle, flip := orientationOps(info.Orientation)
	rotate := angle != 0 || flip
	if rotate {
		// Lossless, fast intermediate; the final encode happens after
		// rotating.
		opts.Type = bimg.PNG
		opts.Compression = 1
	}
	out, err := bimg.Resize(src, opts)
	if err != nil {
		return Result{}, fmt.Errorf("resizing %s: %v: %w", info.Format, err, ErrUnsupported)
	}
	if rotate {
		out, err = bimg.Resize(out, bimg.Options{
			Rotate:        angle,
			Flip:          flip,
			NoAutoRotate:  true,
			StripMetadata: true,
			Type:          bimgTypes[p.output],
			Quality:       g.quality(p.output),
			Background:    opts.Background,
			Speed:         opts.Speed,
		})
		if err != nil {
			return Result{}, fmt.Errorf("rotating thumbnail: %v: %w", err, ErrUnsupported)
		}
	}
	res := Result{Data: out, ContentType: p.output.ContentType(), Width: p.outW, Height: p.outH, Frames: 1}
	if p.output != FormatAVIF {
		oi, err := probe(out, Options{}.withDefaults())
		if err != nil {
			return Result{}, fmt.Errorf("checking generated thumbnail: %w", err)
		}
		res.Width, res.Height = oi.Width, oi.Height
	}
	return res, nil
}

// quality returns the configured quality for an output format.
func (g *Generator) quality(f Format) int {
	switch f {
	case FormatWebP:
		return g.opts.WebPQuality
	case FormatAVIF:
		return g.opts.AVIFQuality
	}
	return g.opts.JPEGQuality
}

// orientationOps maps an EXIF orientation to bimg's rotate-then-mirror
// operations: bimg rotates clockwise first, then Flip mirrors left-right.
func orientationOps(o int) (bimg.Angle, bool) {
	switch o {
	case 2:
		return 0, true
	case 3:
		return bimg.D180, false
	case 4:
		return bimg.D180, true
	case 5:
		return bimg.D90, true
	case 6:
		return bimg.D90, false
	case 7:
		return bimg.D270, true
	case 8:
		return bimg.D270, false
	}
	return 0, false
}
