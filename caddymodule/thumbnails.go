package caddymodule

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"
)

// ThumbnailsConfig configures thumbnail generation (libvips), shared by every
// site. Thumbnails are on by default with the spec's suggested sizes.
type ThumbnailsConfig struct {
	// Disabled turns the thumbnail endpoints off (they answer 404
	// M_UNRECOGNIZED). Default false.
	Disabled bool `json:"disabled,omitempty"`

	// Sizes are the pre-defined sizes; a request gets the smallest one at
	// least as large (same method first). Default: 32x32 crop, 96x96 crop,
	// 320x240 scale, 640x480 scale, 800x600 scale.
	Sizes []ThumbnailSizeConfig `json:"sizes,omitempty"`

	// Dynamic generates the requested size itself, rounded up to a coarse
	// step (32 px up to 256, 64 up to 1024, 128 above) so that requests for
	// 600, 601, 602… share one thumbnail. Default false (pre-defined sizes).
	Dynamic bool `json:"dynamic,omitempty"`

	// MaxDynamic caps each side of dynamic sizes. Default 1600.
	MaxDynamic int `json:"max_dynamic,omitempty"`

	// Formats are extra output formats ("webp", "avif") served to clients
	// whose Accept header lists them. Default: none (JPEG, PNG for
	// PNG/GIF sources, animated WebP).
	Formats []string `json:"formats,omitempty"`

	// Pregenerate makes the pre-defined sizes right after an image upload,
	// in the background, one upload at a time and only while the generator
	// has no queue. Default false.
	Pregenerate bool `json:"pregenerate,omitempty"`

	// Remote is "generate" (fetch the original of remote media and
	// thumbnail it here) or "fetch" (ask the remote server for its
	// thumbnail; the original is used when it cannot make one). Default
	// "generate".
	Remote string `json:"remote,omitempty"`

	// MaxPixels is the largest image decoded (width × height × frames);
	// larger ones get 413 M_TOO_LARGE, checked on the header before any
	// decoding. Default 32000000.
	MaxPixels int64 `json:"max_pixels,omitempty"`

	// MaxSourceBytes is the largest media thumbnailed. Default 64 MiB.
	MaxSourceBytes int64 `json:"max_source_bytes,omitempty"`

	// AllowHEIF accepts HEIC and AVIF sources. Default false.
	AllowHEIF bool `json:"allow_heif,omitempty"`

	// MaxFrames caps the frames of animated thumbnails. Default 100.
	MaxFrames int `json:"max_frames,omitempty"`

	// Workers is how many thumbnails are generated at once. Default: the
	// number of CPUs.
	Workers int `json:"workers,omitempty"`

	// Queue is how many generations may wait for a worker; beyond it
	// clients get 429 M_LIMIT_EXCEEDED with Retry-After. Default 4 × Workers.
	Queue int `json:"queue,omitempty"`

	// MaxMemory bounds the bytes of thumbnail sources held in memory at
	// once, across all generations: a source is admitted by its size (a
	// source larger than MaxMemory takes all of it) before it is read, and
	// one that finds no room within a second gets 429 M_LIMIT_EXCEEDED with
	// Retry-After. Default 256 MiB.
	MaxMemory int64 `json:"max_memory,omitempty"`

	// Timeout bounds one generation (reading the source, waiting for a
	// worker, generating, storing); past it the request gets 504 M_UNKNOWN
	// and the next request for the thumbnail starts anew. Default 1m.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// QuarantinePlaceholder is the path of an image file (JPEG, PNG, GIF
	// or WebP, at most 1 MiB) served with 200 instead of 404 M_NOT_FOUND
	// for thumbnail requests of quarantined media, so that clients show
	// a "removed" picture. Downloads of quarantined media still answer
	// 404. Read once when the configuration loads. Default: none (404).
	QuarantinePlaceholder string `json:"quarantine_placeholder,omitempty"`
}

// ThumbnailSizeConfig is one pre-defined thumbnail size.
type ThumbnailSizeConfig struct {
	// Width of the box in pixels. Required.
	Width int `json:"width"`
	// Height of the box in pixels. Required.
	Height int `json:"height"`
	// Method is "crop" or "scale". Required.
	Method string `json:"method"`
}

// thumbnailSettings are the validated thumbnail settings: the generator's
// options and the repository's policy.
type thumbnailSettings struct {
	disabled  bool
	generator thumbnails.Options
	policy    mediaapi.ThumbnailPolicy
	maxSource int64
	maxMemory int64
	timeout   time.Duration
	// placeholder and placeholderType: the quarantine placeholder image.
	placeholder     []byte
	placeholderType string
}

// maxPlaceholderSize bounds the quarantine placeholder image.
const maxPlaceholderSize = 1 << 20

// loadPlaceholder reads the quarantine placeholder image at path and
// detects its type from its bytes: only JPEG, PNG, GIF and WebP are
// accepted.
func loadPlaceholder(path string) ([]byte, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, "", fmt.Errorf("thumbnails: quarantine_placeholder: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPlaceholderSize+1))
	if err != nil {
		return nil, "", fmt.Errorf("thumbnails: quarantine_placeholder: reading %s: %w", path, err)
	}
	if len(b) > maxPlaceholderSize {
		return nil, "", fmt.Errorf("thumbnails: quarantine_placeholder: %s is larger than %d bytes", path, maxPlaceholderSize)
	}
	switch ct := http.DetectContentType(b); ct {
	case "image/jpeg", "image/png", "image/gif", "image/webp":
		return b, ct, nil
	default:
		return nil, "", fmt.Errorf("thumbnails: quarantine_placeholder: %s is %s, not a JPEG, PNG, GIF or WebP image", path, ct)
	}
}

// resolveThumbnails validates c (nil: defaults).
func resolveThumbnails(c *ThumbnailsConfig) (thumbnailSettings, error) {
	if c == nil {
		c = &ThumbnailsConfig{}
	}
	var s thumbnailSettings
	if c.Disabled {
		s.disabled = true
		return s, nil
	}
	for _, v := range []struct {
		name string
		val  int64
	}{{"max_dynamic", int64(c.MaxDynamic)}, {"max_pixels", c.MaxPixels}, {"max_source_bytes", c.MaxSourceBytes},
		{"max_frames", int64(c.MaxFrames)}, {"workers", int64(c.Workers)}, {"queue", int64(c.Queue)},
		{"max_memory", c.MaxMemory}, {"timeout", int64(c.Timeout)}} {
		if v.val < 0 {
			return s, fmt.Errorf("thumbnails: %s must not be negative", v.name)
		}
	}
	for _, sz := range c.Sizes {
		m := thumbnails.Method(sz.Method)
		if sz.Width < 1 || sz.Height < 1 || (m != thumbnails.MethodCrop && m != thumbnails.MethodScale) {
			return s, fmt.Errorf("thumbnails: invalid size %dx%d %q (want positive sides and crop or scale)", sz.Width, sz.Height, sz.Method)
		}
		s.policy.Sizes = append(s.policy.Sizes, mediaapi.ThumbnailSize{Width: sz.Width, Height: sz.Height, Method: m})
	}
	for _, f := range c.Formats {
		switch thumbnails.Format(f) {
		case thumbnails.FormatWebP, thumbnails.FormatAVIF:
			s.policy.Formats = append(s.policy.Formats, thumbnails.Format(f))
		default:
			return s, fmt.Errorf("thumbnails: unknown output format %q (want webp or avif)", f)
		}
	}
	s.policy.Dynamic, s.policy.MaxDynamic, s.policy.Pregenerate = c.Dynamic, c.MaxDynamic, c.Pregenerate
	switch c.Remote {
	case "", "generate":
	case "fetch":
		s.policy.FetchRemote = true
	default:
		return s, fmt.Errorf("thumbnails: remote must be generate or fetch, got %q", c.Remote)
	}
	s.generator = thumbnails.Options{
		MaxPixels: c.MaxPixels, MaxSourceBytes: c.MaxSourceBytes, AllowHEIF: c.AllowHEIF,
		MaxFrames: c.MaxFrames, Workers: c.Workers, Queue: c.Queue,
	}
	s.maxSource = c.MaxSourceBytes
	s.maxMemory = c.MaxMemory
	s.timeout = time.Duration(c.Timeout)
	if c.QuarantinePlaceholder != "" {
		var err error
		if s.placeholder, s.placeholderType, err = loadPlaceholder(c.QuarantinePlaceholder); err != nil {
			return s, err
		}
	}
	return s, nil
}

// key is the part of the resources' pool key that thumbnails decide.
func (s thumbnailSettings) key() string {
	b, err := json.Marshal(struct {
		D bool
		G thumbnails.Options
		P mediaapi.ThumbnailPolicy
		M int64
		B int64
		T time.Duration
	}{s.disabled, s.generator, s.policy, s.maxSource, s.maxMemory, s.timeout})
	if err != nil {
		panic(fmt.Sprintf("encoding thumbnail settings: %v", err))
	}
	return string(b)
}
