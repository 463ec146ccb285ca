package thumbnails

/*
#cgo pkg-config: vips
#include <stdlib.h>
#include <string.h>
#include <vips/vips.h>
#include <malloc.h>

// cmm_configure applies the process-wide libvips settings this package
// relies on. libvips itself was initialised by bimg's init().
// cmm_arena_max runs when the program is loaded, before any thread exists:
// glibc gives threads that malloc their own arenas (64 MiB regions that keep
// freed memory), and fixes the arena limit when the second arena is made, so
// it must be set first. Two arenas is what MALLOC_ARENA_MAX=2 gives, without
// asking operators for it.
__attribute__((constructor)) static void cmm_arena_max(void) {
	mallopt(M_ARENA_MAX, 2);
}

// cmm_trim returns freed heap memory of every arena to the system.
static void cmm_trim(void) {
	malloc_trim(0);
}

static void cmm_configure(void) {
	vips_cache_set_max(0);
	vips_cache_set_max_mem(0);
	vips_concurrency_set(1);
	vips_block_untrusted_set(TRUE);
}

// cmm_error copies and clears the libvips error buffer.
static char *cmm_error(void) {
	char *s = g_strdup(vips_error_buffer());
	vips_error_clear();
	return s;
}

// cmm_header reads the header of a HEIF/AVIF buffer (lazy load, no pixels).
static int cmm_header(void *buf, size_t len, int *w, int *h, int *bands, char **err) {
	VipsImage *img = NULL;
	int ret = 0;
	if (vips_heifload_buffer(buf, len, &img, NULL)) {
		*err = cmm_error();
		ret = -1;
	} else {
		*w = img->Xsize;
		*h = img->Ysize;
		*bands = img->Bands;
		g_object_unref(img);
	}
	vips_thread_shutdown();
	return ret;
}

// cmm_animated_webp loads the first n pages of an animated GIF/WebP,
// resizes every page to exactly fw×fh, centre-crops each page to cw×ch when
// crop is set, drops a meaningless alpha band, and saves an animated WebP.
static int cmm_animated_webp(void *buf, size_t len, int n, int fw, int fh, int crop, int cw, int ch,
		int keep_alpha, int q, void **out, size_t *out_len, int *ow, int *oh, int *pages, char **err) {
	VipsImage *img = NULL, *tmp = NULL;
	VipsImage **parts = NULL;
	char opts[32];
	int ret = -1, ph, np = 0, i;
	snprintf(opts, sizeof(opts), "n=%d", n);
	if (vips_thumbnail_buffer(buf, len, &img, fw,
			"height", fh,
			"size", VIPS_SIZE_FORCE,
			"no_rotate", TRUE,
			"option_string", opts,
			NULL))
		goto done;
	ph = vips_image_get_page_height(img);
	if (ph <= 0 || img->Ysize % ph != 0) {
		vips_error("cmm", "bad page height %d for height %d", ph, img->Ysize);
		goto done;
	}
	np = img->Ysize / ph;
	if (crop && (cw < img->Xsize || ch < ph)) {
		int left, top;
		if (cw > img->Xsize)
			cw = img->Xsize;
		if (ch > ph)
			ch = ph;
		left = (img->Xsize - cw) / 2;
		top = (ph - ch) / 2;
		parts = g_new0(VipsImage *, np);
		for (i = 0; i < np; i++)
			if (vips_extract_area(img, &parts[i], left, i * ph + top, cw, ch, NULL))
				goto done;
		if (vips_arrayjoin(parts, &tmp, np, "across", 1, NULL))
			goto done;
		g_object_unref(img);
		img = tmp;
		tmp = NULL;
		vips_image_set_int(img, VIPS_META_PAGE_HEIGHT, ch);
		ph = ch;
	}
	if (!keep_alpha && img->Bands == 4) {
		if (vips_extract_band(img, &tmp, 0, "n", 3, NULL))
			goto done;
		g_object_unref(img);
		img = tmp;
		tmp = NULL;
	}
	if (vips_webpsave_buffer(img, out, out_len,
			"Q", q,
			"strip", TRUE,
			NULL))
		goto done;
	*ow = img->Xsize;
	*oh = ph;
	*pages = img->Ysize / ph;
	ret = 0;
done:
	if (ret != 0)
		*err = cmm_error();
	if (parts) {
		for (i = 0; i < np; i++)
			if (parts[i])
				g_object_unref(parts[i]);
		g_free(parts);
	}
	if (tmp)
		g_object_unref(tmp);
	if (img)
		g_object_unref(img);
	vips_thread_shutdown();
	return ret;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"

	"github.com/h2non/bimg"
)

// configureVips applies the process-wide libvips settings (operation cache
// off, libvips concurrency 1 per operation, untrusted loaders such as SVG,
// PDF and ImageMagick blocked). libvips is process-global, so New runs this
// through a package-level sync.Once; that Once is the only package-level
// state. vips_init itself already ran in bimg's package init().
func configureVips() {
	C.cmm_configure()
}

// trimMalloc gives freed C heap memory back to the system (libvips frees its
// decode buffers, but glibc keeps them mapped otherwise).
func trimMalloc() {
	C.cmm_trim()
}

// vipsError turns a C error string from cmm_error into a Go error and frees
// it.
func vipsError(s *C.char) error {
	if s == nil {
		return errors.New("unknown libvips error")
	}
	defer C.g_free(C.gpointer(s))
	return errors.New(C.GoString(s))
}

// probeVips reads a HEIF/AVIF header through libvips without decoding
// pixels.
func probeVips(src []byte, format Format) (Info, error) {
	var w, h, bands C.int
	var cerr *C.char
	if C.cmm_header(unsafe.Pointer(&src[0]), C.size_t(len(src)), &w, &h, &bands, &cerr) != 0 {
		return Info{}, fmt.Errorf("reading %s header: %w: %w", format, vipsError(cerr), ErrUnsupported)
	}
	return Info{
		Format:      format,
		Width:       int(w),
		Height:      int(h),
		Frames:      1,
		Orientation: 1,
		HasAlpha:    bands == 2 || bands == 4,
	}, nil
}

// animatedWebP runs the animated pipeline: the first n pages, each resized
// to exactly fw×fh, then (crop) centre-cropped to cw×ch, saved as animated
// WebP with quality q. keepAlpha false drops the alpha band libvips adds to
// opaque GIFs.
func animatedWebP(src []byte, n, fw, fh int, crop bool, cw, ch int, keepAlpha bool, q int) (data []byte, outW, outH, pages int, err error) {
	var (
		out            unsafe.Pointer
		outLen         C.size_t
		ow, oh, cpages C.int
		cerr           *C.char
	)
	rc := C.cmm_animated_webp(unsafe.Pointer(&src[0]), C.size_t(len(src)), C.int(n), C.int(fw), C.int(fh),
		cbool(crop), C.int(cw), C.int(ch), cbool(keepAlpha), C.int(q),
		&out, &outLen, &ow, &oh, &cpages, &cerr)
	if rc != 0 {
		return nil, 0, 0, 0, fmt.Errorf("generating animated webp: %w", vipsError(cerr))
	}
	defer C.g_free(C.gpointer(out))
	return C.GoBytes(out, C.int(outLen)), int(ow), int(oh), int(cpages), nil
}

// cbool converts a Go bool to a C int.
func cbool(b bool) C.int {
	if b {
		return 1
	}
	return 0
}

// MemoryStats is libvips' own allocation tracking, for metrics and leak
// checks. It does not include glibc arenas or Go memory; watch process RSS
// for those.
type MemoryStats struct {
	// Bytes is the memory libvips currently tracks as allocated.
	Bytes int64
	// Highwater is the most memory libvips has tracked at once.
	Highwater int64
	// Allocations is the number of live tracked allocations.
	Allocations int64
}

// VipsMemory reports libvips' tracked memory. With the operation cache off
// (as New sets it) Bytes should return to about zero between thumbnails;
// growth across many generations indicates a leak in the C path.
func VipsMemory() MemoryStats {
	m := bimg.VipsMemory()
	return MemoryStats{Bytes: m.Memory, Highwater: m.MemoryHighwater, Allocations: m.Allocations}
}
