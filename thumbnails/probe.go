package thumbnails

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"image"
	_ "image/gif"  // registers the GIF header decoder for image.DecodeConfig
	_ "image/jpeg" // registers the JPEG header decoder for image.DecodeConfig
	_ "image/png"  // registers the PNG header decoder for image.DecodeConfig

	_ "golang.org/x/image/webp" // registers the WebP header decoder for image.DecodeConfig
)

// Info is what Probe learns from the header and container structure of an
// image, without decoding any pixels.
type Info struct {
	// Format is the sniffed source format.
	Format Format
	// Width and Height are the stored pixel dimensions (for animations the
	// canvas), before any EXIF orientation is applied.
	Width, Height int
	// Frames is the number of frames: 1 for still images, the number of
	// image descriptors for GIF and of ANMF chunks for animated WebP.
	Frames int
	// Orientation is the EXIF orientation (1–8) of a JPEG; 1 for every other
	// format (libheif applies HEIF transformations itself).
	Orientation int
	// HasAlpha reports transparency: a PNG alpha channel or tRNS chunk, a
	// transparent colour in the first GIF frame, a WebP alpha flag.
	HasAlpha bool
}

// Probe sniffs src and reads its header with the package defaults
// (DefaultMaxPixels for one frame, DefaultMaxSourceBytes, HEIF/AVIF not
// allowed). It decodes no pixels, so it is safe and fast on decompression
// bombs. It returns an error wrapping ErrUnsupported for anything that is not
// a complete JPEG, PNG, GIF or WebP and ErrTooLarge when the limits are
// exceeded.
func Probe(src []byte) (Info, error) {
	return probe(src, Options{}.withDefaults())
}

// probe implements Probe with the given (defaulted) options. The pixel limit
// is checked against a single frame here; Generate checks the frames it will
// actually decode.
func probe(src []byte, opts Options) (Info, error) {
	if len(src) == 0 {
		return Info{}, fmt.Errorf("probing image: empty input: %w", ErrUnsupported)
	}
	if int64(len(src)) > opts.MaxSourceBytes {
		return Info{}, fmt.Errorf("probing image: %d bytes over the limit of %d: %w", len(src), opts.MaxSourceBytes, ErrTooLarge)
	}
	format := sniff(src)
	var (
		info Info
		err  error
	)
	switch format {
	case FormatJPEG, FormatPNG, FormatGIF, FormatWebP:
		info, err = probeGo(src, format, opts.MaxPixels)
	case FormatHEIF, FormatAVIF:
		if !opts.AllowHEIF {
			return Info{}, fmt.Errorf("probing image: %s sources are disabled: %w", format, ErrUnsupported)
		}
		info, err = probeVips(src, format)
	default:
		return Info{}, fmt.Errorf("probing image: unknown magic bytes: %w", ErrUnsupported)
	}
	if err != nil {
		return Info{}, err
	}
	if err := checkPixels(info.Width, info.Height, 1, opts.MaxPixels); err != nil {
		return Info{}, err
	}
	return info, nil
}

// checkPixels returns ErrTooLarge when w*h*frames exceeds maxPixels, without
// overflowing.
func checkPixels(w, h, frames int, maxPixels int64) error {
	if w <= 0 || h <= 0 || frames <= 0 {
		return fmt.Errorf("checking pixels: invalid size %dx%d×%d: %w", w, h, frames, ErrUnsupported)
	}
	px := int64(w) * int64(h) // both < 2^31, so this cannot overflow
	if px > maxPixels || px > maxPixels/int64(frames) {
		return fmt.Errorf("checking pixels: %dx%d×%d frames over the limit of %d pixels: %w", w, h, frames, maxPixels, ErrTooLarge)
	}
	return nil
}

// sniff identifies the format from magic bytes only. It returns "" for
// anything else (SVG, PDF, text, TIFF, ...).
func sniff(b []byte) Format {
	switch {
	case len(b) >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF:
		return FormatJPEG
	case len(b) >= 8 && bytes.Equal(b[:8], []byte("\x89PNG\r\n\x1a\n")):
		return FormatPNG
	case len(b) >= 6 && (bytes.Equal(b[:6], []byte("GIF87a")) || bytes.Equal(b[:6], []byte("GIF89a"))):
		return FormatGIF
	case len(b) >= 16 && bytes.Equal(b[:4], []byte("RIFF")) && bytes.Equal(b[8:12], []byte("WEBP")):
		return FormatWebP
	case len(b) >= 16 && bytes.Equal(b[4:8], []byte("ftyp")):
		return sniffFtyp(b)
	}
	return ""
}

// sniffFtyp classifies an ISO-BMFF ftyp box by its major and compatible
// brands.
func sniffFtyp(b []byte) Format {
	size := int(binary.BigEndian.Uint32(b[:4]))
	if size < 16 || size > len(b) || size > 4096 {
		return ""
	}
	var heif bool
	for off := 8; off+4 <= size; off += 4 {
		if off == 12 { // minor version
			continue
		}
		switch string(b[off : off+4]) {
		case "avif", "avis":
			return FormatAVIF
		case "heic", "heix", "heim", "heis", "hevc", "hevx":
			heif = true
		}
	}
	if heif {
		return FormatHEIF
	}
	return ""
}

// probeGo reads JPEG, PNG, GIF and WebP headers with image.DecodeConfig and
// walks the container structure (no pixel decoding) to find frames, alpha,
// orientation and truncation.
func probeGo(src []byte, format Format, maxPixels int64) (Info, error) {
	cfg, name, err := image.DecodeConfig(bytes.NewReader(src))
	if err != nil {
		return Info{}, fmt.Errorf("reading %s header: %v: %w", format, err, ErrUnsupported)
	}
	if Format(name) != format {
		return Info{}, fmt.Errorf("reading %s header: decoded as %q: %w", format, name, ErrUnsupported)
	}
	info := Info{Format: format, Width: cfg.Width, Height: cfg.Height, Frames: 1, Orientation: 1}
	// Reject bombs before walking the rest of the file.
	if err := checkPixels(info.Width, info.Height, 1, maxPixels); err != nil {
		return Info{}, err
	}
	switch format {
	case FormatJPEG:
		err = walkJPEG(src, &info)
	case FormatPNG:
		err = walkPNG(src, &info)
	case FormatGIF:
		err = walkGIF(src, &info)
	case FormatWebP:
		err = walkWebP(src, &info)
	}
	if err != nil {
		return Info{}, err
	}
	return info, nil
}

var errTruncated = errors.New("truncated or corrupt structure")

// walkJPEG walks the marker segments up to the first SOS, reads the EXIF
// orientation from APP1 and requires an EOI marker after the scan data (so a
// truncated JPEG is rejected; libvips would silently render it grey).
// Inside entropy-coded data 0xFF is always followed by 0x00 or RSTn, so the
// first FF D9 after SOS is the real EOI. Trailing bytes after EOI are allowed.
func walkJPEG(b []byte, info *Info) error {
	pos := 2
	for {
		if pos >= len(b) || b[pos] != 0xFF {
			return fmt.Errorf("walking jpeg markers at %d: %w: %w", pos, errTruncated, ErrUnsupported)
		}
		for pos < len(b) && b[pos] == 0xFF { // fill bytes
			pos++
		}
		if pos >= len(b) {
			return fmt.Errorf("walking jpeg markers: %w: %w", errTruncated, ErrUnsupported)
		}
		marker := b[pos]
		pos++
		if marker == 0x01 || (marker >= 0xD0 && marker <= 0xD8) { // standalone markers
			continue
		}
		if marker == 0xD9 {
			return fmt.Errorf("walking jpeg markers: EOI before scan data: %w", ErrUnsupported)
		}
		if pos+2 > len(b) {
			return fmt.Errorf("walking jpeg markers: %w: %w", errTruncated, ErrUnsupported)
		}
		segLen := int(binary.BigEndian.Uint16(b[pos : pos+2]))
		if segLen < 2 || pos+segLen > len(b) {
			return fmt.Errorf("walking jpeg markers: segment 0x%02X overruns the file: %w: %w", marker, errTruncated, ErrUnsupported)
		}
		seg := b[pos+2 : pos+segLen]
		pos += segLen
		switch marker {
		case 0xE1:
			if info.Orientation == 1 && bytes.HasPrefix(seg, []byte("Exif\x00\x00")) {
				info.Orientation = exifOrientation(seg[6:])
			}
		case 0xDA:
			if !bytes.Contains(b[pos:], []byte{0xFF, 0xD9}) {
				return fmt.Errorf("walking jpeg scan data: no EOI marker: %w: %w", errTruncated, ErrUnsupported)
			}
			return nil
		}
	}
}

// exifOrientation reads tag 0x0112 from IFD0 of a TIFF-structured EXIF
// block. It returns 1 for anything missing or invalid.
func exifOrientation(t []byte) int {
	if len(t) < 8 {
		return 1
	}
	var bo binary.ByteOrder
	switch string(t[:4]) {
	case "II*\x00":
		bo = binary.LittleEndian
	case "MM\x00*":
		bo = binary.BigEndian
	default:
		return 1
	}
	ifd := int64(bo.Uint32(t[4:8]))
	if ifd < 8 || ifd+2 > int64(len(t)) {
		return 1
	}
	n := int(bo.Uint16(t[ifd : ifd+2]))
	for i := 0; i < n; i++ {
		e := ifd + 2 + int64(i)*12
		if e+12 > int64(len(t)) {
			return 1
		}
		if bo.Uint16(t[e:e+2]) != 0x0112 {
			continue
		}
		if bo.Uint16(t[e+2:e+4]) != 3 { // SHORT
			return 1
		}
		v := int(bo.Uint16(t[e+8 : e+10]))
		if v < 1 || v > 8 {
			return 1
		}
		return v
	}
	return 1
}

// walkPNG walks the chunks up to IEND (without checking CRCs), noting alpha
// from the colour type or a tRNS chunk. A missing IEND means truncation.
func walkPNG(b []byte, info *Info) error {
	pos := 8
	first := true
	for {
		if pos+8 > len(b) {
			return fmt.Errorf("walking png chunks: no IEND: %w: %w", errTruncated, ErrUnsupported)
		}
		n := int64(binary.BigEndian.Uint32(b[pos : pos+4]))
		typ := string(b[pos+4 : pos+8])
		end := int64(pos) + 8 + n + 4
		if n > 1<<31-1 || end > int64(len(b)) {
			return fmt.Errorf("walking png chunks: %s overruns the file: %w: %w", typ, errTruncated, ErrUnsupported)
		}
		data := b[pos+8 : pos+8+int(n)]
		switch {
		case first && typ != "IHDR":
			return fmt.Errorf("walking png chunks: first chunk is %q: %w", typ, ErrUnsupported)
		case typ == "IHDR":
			if len(data) != 13 {
				return fmt.Errorf("walking png chunks: bad IHDR: %w", ErrUnsupported)
			}
			if ct := data[9]; ct == 4 || ct == 6 {
				info.HasAlpha = true
			}
		case typ == "tRNS":
			info.HasAlpha = true
		case typ == "IEND":
			return nil
		}
		first = false
		pos = int(end)
	}
}

// walkGIF walks the GIF block structure without LZW decoding: it counts
// image descriptors (frames) and notes whether the first frame has a
// transparent colour. Running out of data inside a block means truncation; a
// missing trailer after complete blocks is tolerated.
func walkGIF(b []byte, info *Info) error {
	trunc := func(what string) error {
		return fmt.Errorf("walking gif blocks: %s: %w: %w", what, errTruncated, ErrUnsupported)
	}
	if len(b) < 13 {
		return trunc("header")
	}
	pos := 13
	if b[10]&0x80 != 0 {
		pos += 3 << (uint(b[10]&0x07) + 1)
	}
	frames := 0
	transparentNext := false
	// skipSubBlocks returns the position after the block terminator.
	skipSubBlocks := func(p int) (int, bool) {
		for {
			if p >= len(b) {
				return p, false
			}
			n := int(b[p])
			p++
			if n == 0 {
				return p, true
			}
			p += n
		}
	}
	for pos < len(b) {
		switch b[pos] {
		case 0x21: // extension
			if pos+2 > len(b) {
				return trunc("extension")
			}
			label := b[pos+1]
			if label == 0xF9 && pos+4 <= len(b) && b[pos+2] == 4 {
				transparentNext = b[pos+3]&0x01 != 0
			}
			next, ok := skipSubBlocks(pos + 2)
			if !ok {
				return trunc("extension data")
			}
			pos = next
		case 0x2C: // image descriptor
			if pos+10 > len(b) {
				return trunc("image descriptor")
			}
			packed := b[pos+9]
			pos += 10
			if packed&0x80 != 0 {
				pos += 3 << (uint(packed&0x07) + 1)
			}
			pos++ // LZW minimum code size
			next, ok := skipSubBlocks(pos)
			if !ok {
				return trunc("image data")
			}
			pos = next
			if frames == 0 {
				info.HasAlpha = transparentNext
			}
			transparentNext = false
			frames++
		case 0x3B: // trailer
			pos = len(b)
		default:
			return fmt.Errorf("walking gif blocks: unknown block 0x%02X: %w", b[pos], ErrUnsupported)
		}
	}
	if frames == 0 {
		return trunc("no image data")
	}
	info.Frames = frames
	return nil
}

// walkWebP walks the RIFF chunks: the RIFF size must fit in the buffer,
// VP8X flags give alpha and animation, ANMF chunks are counted as frames.
func walkWebP(b []byte, info *Info) error {
	riff := int64(binary.LittleEndian.Uint32(b[4:8]))
	if riff < 4 || 8+riff > int64(len(b)) {
		return fmt.Errorf("walking webp chunks: RIFF size %d over %d bytes: %w: %w", riff, len(b), errTruncated, ErrUnsupported)
	}
	end := int(8 + riff)
	pos := 12
	animated := false
	anmf := 0
	for pos+8 <= end {
		typ := string(b[pos : pos+4])
		n := int64(binary.LittleEndian.Uint32(b[pos+4 : pos+8]))
		next := int64(pos) + 8 + n + n&1
		if int64(pos)+8+n > int64(end) {
			return fmt.Errorf("walking webp chunks: %s overruns the file: %w: %w", typ, errTruncated, ErrUnsupported)
		}
		data := b[pos+8 : pos+8+int(n)]
		switch typ {
		case "VP8X":
			if len(data) >= 1 {
				info.HasAlpha = info.HasAlpha || data[0]&0x10 != 0
				animated = data[0]&0x02 != 0
			}
		case "VP8L":
			// 0x2F signature, then 14+14 bits of size, then the alpha_is_used bit.
			if len(data) >= 5 && data[4]&0x10 != 0 {
				info.HasAlpha = true
			}
		case "ALPH":
			info.HasAlpha = true
		case "ANMF":
			anmf++
		}
		pos = int(next)
	}
	if animated {
		if anmf == 0 {
			return fmt.Errorf("walking webp chunks: animation without frames: %w", ErrUnsupported)
		}
		info.Frames = anmf
	}
	return nil
}
