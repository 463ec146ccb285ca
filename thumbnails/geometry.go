package thumbnails

import "math"

// thumbPlan is the outcome of sizing a request against a source.
type thumbPlan struct {
	// useOriginal: serve the source bytes (ErrSmallerThanRequest).
	useOriginal bool
	// animated: produce an animated WebP of frames frames.
	animated bool
	// frames is how many frames will be decoded.
	frames int
	// output is the output format.
	output Format
	// crop: cover loadW×loadH and centre-crop; otherwise resize to exactly
	// loadW×loadH (which already keeps the aspect ratio).
	crop bool
	// loadW, loadH are the target size in the stored orientation.
	loadW, loadH int
	// coverW, coverH (crop only) are the stored-orientation size that
	// covers loadW×loadH with the source aspect ratio, before cropping.
	coverW, coverH int
	// outW, outH are the displayed (oriented) output size.
	outW, outH int
}

// plan sizes a thumbnail.
//
//   - Sizes are computed in the displayed orientation: for EXIF
//     orientations 5–8 the stored width and height are swapped, and the
//     stored-orientation target (loadW, loadH) is swapped back.
//   - scale: the largest size keeping the aspect ratio that fits inside
//     Width×Height, never larger than the source; the other dimension is
//     rounded down like Synapse (1000x673 in 32x32 gives 32x21).
//   - crop: exactly Width×Height when the source covers the box in both
//     dimensions. When it is smaller in one dimension, the result is the
//     largest centre crop with the requested aspect ratio that fits in the
//     source, without scaling (for example 50x200 cropped to 96x96 gives
//     50x50): the aspect the client asked for is kept and nothing is
//     upscaled.
//   - A source that fits inside the box in both dimensions is served as the
//     original if it is a browser-safe type and no still image has to be
//     made from an animation; otherwise it is re-encoded at its own size.
func plan(info Info, req Request) thumbPlan {
	p := thumbPlan{frames: 1, crop: req.Method == MethodCrop}
	animatable := info.Frames > 1 && (info.Format == FormatGIF || info.Format == FormatWebP)
	p.animated = req.Animated && animatable && (req.Output == "" || req.Output == FormatWebP)
	if p.animated {
		p.frames = info.Frames
	}
	switch {
	case req.Output != "":
		p.output = req.Output
	case p.animated:
		p.output = FormatWebP
	case info.HasAlpha, info.Format == FormatPNG, info.Format == FormatGIF:
		// Lossless sources (drawings, screenshots, logos) stay lossless, as
		// Synapse does (and Complement expects of a PNG); photos are JPEG.
		p.output = FormatPNG
	default:
		p.output = FormatJPEG
	}

	ew, eh := info.Width, info.Height
	swap := info.Orientation >= 5 && info.Orientation <= 8
	if swap {
		ew, eh = eh, ew
	}
	w, h := req.Width, req.Height
	switch {
	case ew <= w && eh <= h:
		safe := info.Format == FormatJPEG || info.Format == FormatPNG || info.Format == FormatGIF || info.Format == FormatWebP
		if safe && (!animatable || p.animated) {
			p.useOriginal = true
		}
		p.outW, p.outH = ew, eh
		p.crop = false
	case req.Method == MethodScale:
		// Compare w/ew with h/eh without floating point.
		if int64(w)*int64(eh) <= int64(h)*int64(ew) {
			p.outW, p.outH = w, floorDiv(int64(eh)*int64(w), int64(ew))
		} else {
			p.outW, p.outH = floorDiv(int64(ew)*int64(h), int64(eh)), h
		}
	case ew >= w && eh >= h:
		p.outW, p.outH = w, h
	default:
		s := math.Min(float64(ew)/float64(w), float64(eh)/float64(h))
		p.outW = clamp(int(math.Round(float64(w)*s)), 1, ew)
		p.outH = clamp(int(math.Round(float64(h)*s)), 1, eh)
	}
	p.outW = clamp(p.outW, 1, ew)
	p.outH = clamp(p.outH, 1, eh)
	p.loadW, p.loadH = p.outW, p.outH
	if swap {
		p.loadW, p.loadH = p.outH, p.outW
	}
	if p.crop {
		// Cover in the stored orientation: scale by the larger ratio,
		// rounding up so that both sides reach the box.
		sw, sh := int64(info.Width), int64(info.Height)
		lw, lh := int64(p.loadW), int64(p.loadH)
		if lw*sh >= lh*sw { // width-limited: full width, taller
			p.coverW, p.coverH = p.loadW, int((sh*lw+sw-1)/sw)
		} else {
			p.coverW, p.coverH = int((sw*lh+sh-1)/sh), p.loadH
		}
		p.coverW = clamp(p.coverW, p.loadW, info.Width)
		p.coverH = clamp(p.coverH, p.loadH, info.Height)
	}
	return p
}

// floorDiv returns a/b rounded down (as Synapse does), at least 1.
func floorDiv(a, b int64) int {
	v := int(a / b)
	if v < 1 {
		v = 1
	}
	return v
}

// clamp limits v to [lo, hi].
func clamp(v, lo, hi int) int {
	if v < lo {
		return lo
	}
	if v > hi {
		return hi
	}
	return v
}
