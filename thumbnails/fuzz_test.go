package thumbnails

import (
	"bytes"
	"encoding/binary"
	"errors"
	"image"
	"testing"
)

// vp8xWebP returns a WebP with only a VP8X header declaring a w×h canvas
// (flags as given): enough for the header reader, not a complete image.
func vp8xWebP(w, h int, flags byte, extra []byte) []byte {
	chunk := make([]byte, 18)
	copy(chunk, "VP8X")
	binary.LittleEndian.PutUint32(chunk[4:], 10)
	chunk[8] = flags
	chunk[12], chunk[13], chunk[14] = byte(w-1), byte((w-1)>>8), byte((w-1)>>16)
	chunk[15], chunk[16], chunk[17] = byte(h-1), byte((h-1)>>8), byte((h-1)>>16)
	body := append([]byte("WEBP"), chunk...)
	body = append(body, extra...)
	out := []byte("RIFF")
	out = binary.LittleEndian.AppendUint32(out, uint32(len(body)))
	return append(out, body...)
}

// FuzzProbe feeds arbitrary bytes to Probe and to each container walker.
// Nothing may panic; Probe's errors wrap ErrUnsupported or ErrTooLarge; an
// accepted image has a Go-readable format matching its magic bytes, the
// dimensions image.DecodeConfig reads, at most DefaultMaxPixels, at least
// one frame and an EXIF orientation in 1–8 (1 unless JPEG).
func FuzzProbe(f *testing.F) {
	small := gradient(7, 5)
	f.Add(encodePNG(f, small))
	f.Add(alphaPNG(f, 3, 2))
	f.Add(encodeJPEG(f, small, 80))
	f.Add(withOrientation(encodeJPEG(f, small, 80), 6))
	f.Add(animatedGIF(f, 4, 3, 3))
	f.Add(bombPNG(100000, 100000))
	f.Add(vp8xWebP(16, 9, 0x10, nil))
	f.Add(vp8xWebP(16, 9, 0x02, []byte("ANIM\x06\x00\x00\x00\x00\x00\x00\x00\x00\x00ANMF\x00\x00\x00\x00")))
	jpg := encodeJPEG(f, small, 80)
	f.Add(jpg[:len(jpg)-2]) // no EOI
	f.Add([]byte("GIF89a"))
	f.Add([]byte("\x00\x00\x00\x18ftypavif\x00\x00\x00\x00mif1avif"))
	f.Fuzz(func(t *testing.T, src []byte) {
		info, err := Probe(src)
		// A walker must survive any input with its format's magic bytes
		// (its one precondition), whatever the header reader would say.
		walkers := map[Format]func([]byte, *Info) error{FormatJPEG: walkJPEG, FormatPNG: walkPNG, FormatGIF: walkGIF, FormatWebP: walkWebP}
		if walk := walkers[sniff(src)]; walk != nil {
			var i Info
			_ = walk(src, &i)
		}
		if err != nil {
			if !errors.Is(err, ErrUnsupported) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("Probe: error %v wraps neither ErrUnsupported nor ErrTooLarge", err)
			}
			return
		}
		switch info.Format {
		case FormatJPEG, FormatPNG, FormatGIF, FormatWebP:
		default:
			t.Fatalf("Probe accepted format %q", info.Format)
		}
		if sniff(src) != info.Format {
			t.Fatalf("Probe says %q, magic bytes say %q", info.Format, sniff(src))
		}
		if info.Width < 1 || info.Height < 1 || int64(info.Width)*int64(info.Height) > DefaultMaxPixels || info.Frames < 1 {
			t.Fatalf("Probe = %+v", info)
		}
		if info.Orientation < 1 || info.Orientation > 8 || info.Format != FormatJPEG && info.Orientation != 1 {
			t.Fatalf("Probe = %+v: orientation", info)
		}
		cfg, name, err := image.DecodeConfig(bytes.NewReader(src))
		if err != nil || Format(name) != info.Format || cfg.Width != info.Width || cfg.Height != info.Height {
			t.Fatalf("Probe = %+v, image.DecodeConfig = %s %dx%d, %v", info, name, cfg.Width, cfg.Height, err)
		}
	})
}
