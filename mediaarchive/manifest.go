package mediaarchive

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"unicode/utf8"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// Bounds of manifest.json that readers enforce.
const (
	// maxItemJSON bounds one JSON value of the manifest (an item, or a
	// header field), so that decoding allocates at most a few times that.
	maxItemJSON = 1 << 20
	// maxManifestBytes bounds the whole manifest (about eight million
	// items); it bounds the time a hostile archive (a deflate bomb) can
	// take, memory being bounded by maxItemJSON.
	maxManifestBytes = 4 << 30
	// maxFieldBytes bounds the upload name and content type of an item.
	maxFieldBytes = 64 << 10
)

// ErrInvalidArchive reports an archive that is not a valid media archive.
var ErrInvalidArchive = errors.New("not a valid media archive")

// errValueTooLarge is returned by windowReader when a JSON value exceeds
// maxItemJSON.
var errValueTooLarge = fmt.Errorf("a JSON value of the manifest exceeds %d bytes", maxItemJSON)

// windowReader gives a json.Decoder at most maxItemJSON bytes past the
// start of the value being decoded (reset before every value), and at most
// maxManifestBytes in all.
type windowReader struct {
	r io.Reader
	// read counts the bytes given out; limit is where the window ends.
	read, limit int64
}

func (w *windowReader) Read(p []byte) (int, error) {
	if w.read >= w.limit {
		if w.limit >= maxManifestBytes {
			return 0, fmt.Errorf("the manifest exceeds %d bytes", int64(maxManifestBytes))
		}
		return 0, errValueTooLarge
	}
	if room := w.limit - w.read; int64(len(p)) > room {
		p = p[:room]
	}
	n, err := w.r.Read(p)
	w.read += int64(n)
	return n, err
}

// manifestDecoder streams manifest.json: its header fields, then each item.
type manifestDecoder struct {
	win *windowReader
	dec *json.Decoder
}

func newManifestDecoder(r io.Reader) *manifestDecoder {
	win := &windowReader{r: r}
	dec := json.NewDecoder(win)
	dec.DisallowUnknownFields()
	return &manifestDecoder{win: win, dec: dec}
}

// open lets the decoder read up to maxItemJSON bytes past what it has
// consumed.
func (d *manifestDecoder) open() {
	d.win.limit = min(d.dec.InputOffset()+maxItemJSON, maxManifestBytes)
}

// token reads the next JSON token.
func (d *manifestDecoder) token() (json.Token, error) {
	d.open()
	return d.dec.Token()
}

// value decodes the next JSON value into v.
func (d *manifestDecoder) value(v any) error {
	d.open()
	return d.dec.Decode(v)
}

// delim reads the next token and checks that it is want.
func (d *manifestDecoder) delim(want json.Delim) error {
	tok, err := d.token()
	if err != nil {
		return err
	}
	if got, ok := tok.(json.Delim); !ok || got != want {
		return fmt.Errorf("expected %q, found %v", want, tok)
	}
	return nil
}

// readManifest decodes manifest.json from r, calling onHeader once the
// format, version and export subject are read (before any item), then
// onItem for each item with its index. The header fields must come before
// "items", each at most once; unknown fields are refused. It returns the
// header. Errors wrap ErrInvalidArchive, except the callbacks' errors, which
// are returned as they are.
func readManifest(r io.Reader, onHeader func(Manifest) error, onItem func(int, Item) error) (Manifest, error) {
	h, err := decodeManifest(newManifestDecoder(r), onHeader, onItem)
	var cb callbackError
	switch {
	case err == nil:
		return h, nil
	case errors.As(err, &cb):
		return h, cb.err
	case errors.Is(err, ErrInvalidArchive):
		return h, err
	default:
		return h, fmt.Errorf("%w: reading %s: %w", ErrInvalidArchive, ManifestName, err)
	}
}

// callbackError carries an error of a readManifest callback, which
// readManifest returns as it is.
type callbackError struct{ err error }

func (c callbackError) Error() string { return c.err.Error() }

func decodeManifest(d *manifestDecoder, onHeader func(Manifest) error, onItem func(int, Item) error) (Manifest, error) {
	var h Manifest
	if err := d.delim('{'); err != nil {
		return h, err
	}
	seen := map[string]bool{}
	headerDone := false
	for d.dec.More() {
		tok, err := d.token()
		if err != nil {
			return h, err
		}
		key, _ := tok.(string)
		if seen[key] {
			return h, fmt.Errorf("field %q given twice", key)
		}
		seen[key] = true
		switch key {
		case "format":
			err = d.value(&h.Format)
		case "version":
			err = d.value(&h.Version)
		case "created_at":
			err = d.value(&h.CreatedAt)
		case "export":
			err = d.value(&h.Export)
		case "totals":
			err = d.value(&h.Totals)
		case "items":
			if !seen["format"] || !seen["version"] || !seen["export"] {
				return h, errors.New(`"items" before "format", "version" and "export"`)
			}
			if err := checkHeader(h); err != nil {
				return h, err
			}
			headerDone = true
			if onHeader != nil {
				if err := onHeader(h); err != nil {
					return h, callbackError{err}
				}
			}
			err = d.items(onItem)
		default:
			return h, fmt.Errorf("unknown field %q", key)
		}
		if err != nil {
			return h, err
		}
	}
	if err := d.delim('}'); err != nil {
		return h, err
	}
	if !headerDone {
		return h, errors.New(`no "items"`)
	}
	d.open()
	if _, err := d.dec.Token(); !errors.Is(err, io.EOF) {
		return h, errors.New("data after the manifest object")
	}
	return h, nil
}

// items decodes the items array.
func (d *manifestDecoder) items(onItem func(int, Item) error) error {
	if err := d.delim('['); err != nil {
		return err
	}
	for i := 0; d.dec.More(); i++ {
		var it Item
		if err := d.value(&it); err != nil {
			return fmt.Errorf("item %d: %w", i, err)
		}
		if err := checkItem(it); err != nil {
			return fmt.Errorf("%w: item %d (%.300q): %w", ErrInvalidArchive, i, it.MXC, err)
		}
		if onItem != nil {
			if err := onItem(i, it); err != nil {
				return callbackError{err}
			}
		}
	}
	return d.delim(']')
}

// checkHeader checks the manifest's format, version and subject.
func checkHeader(h Manifest) error {
	if h.Format != Format {
		return fmt.Errorf("%w: format %.100q, want %q", ErrInvalidArchive, h.Format, Format)
	}
	if h.Version != Version {
		return fmt.Errorf("%w: version %d, this reader knows version %d", ErrInvalidArchive, h.Version, Version)
	}
	s := h.Export
	switch {
	case !matrix.ValidServerName(s.ServerName):
		return fmt.Errorf("%w: export server name %.300q is not a server name", ErrInvalidArchive, s.ServerName)
	case s.Kind == KindServer && s.UserID == "":
	case s.Kind == KindUser && validUserID(s.UserID):
	default:
		return fmt.Errorf("%w: export subject %.300q/%.300q is neither a user nor a server", ErrInvalidArchive, s.Kind, s.UserID)
	}
	return nil
}

// checkItem checks one item: IDs with the matrix validators, the SHA-256's
// syntax, bounded fields, and archive paths that are clean, relative, in
// their directory, and never "manifest.json" or "index.html".
func checkItem(it Item) error {
	switch {
	case !matrix.ValidServerName(it.ServerName):
		return errors.New("invalid server name")
	case !matrix.ValidMediaID(it.MediaID):
		return errors.New("invalid media ID")
	case it.MXC != "mxc://"+it.ServerName+"/"+it.MediaID:
		return errors.New("mxc URI does not match the server name and media ID")
	case it.UserID != "" && !validUserID(it.UserID):
		return errors.New("invalid user ID")
	case !validSHA256(it.SHA256):
		return errors.New("sha256 is not 64 lowercase hex digits")
	case it.Size < 0:
		return errors.New("negative size")
	case len(it.UploadName) > maxFieldBytes || len(it.ContentType) > maxFieldBytes ||
		len(it.QuarantinedBy) > maxFieldBytes || len(it.Error) > maxFieldBytes:
		return fmt.Errorf("a field exceeds %d bytes", maxFieldBytes)
	case it.QuarantinedBy != "" && !it.Quarantined:
		return errors.New("quarantined_by set on an item that is not quarantined")
	}
	if it.File != "" && !validEntryPath(it.File, mediaDir) {
		return fmt.Errorf("file %.300q is not a safe path under %s", it.File, mediaDir)
	}
	if it.Thumbnail != "" && !validEntryPath(it.Thumbnail, thumbnailDir) {
		return fmt.Errorf("thumbnail %.300q is not a safe path under %s", it.Thumbnail, thumbnailDir)
	}
	return nil
}

// validUserID reports whether s is a user ID (matrix.SplitUserID).
func validUserID(s string) bool {
	_, _, err := matrix.SplitUserID(s)
	return err == nil
}

// validSHA256 reports whether s is 64 lowercase hex digits.
func validSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// validEntryPath reports whether p is a clean relative path under dir, of
// valid UTF-8 without control characters or backslashes, whose segments are
// neither empty nor dot segments.
func validEntryPath(p, dir string) bool {
	if len(p) > 4096 || !utf8.ValidString(p) || !strings.HasPrefix(p, dir) || path.Clean(p) != p {
		return false
	}
	if strings.ContainsFunc(p, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '\\' }) {
		return false
	}
	for _, seg := range strings.Split(p[len(dir):], "/") {
		if seg == "" || seg == "." || seg == ".." {
			return false
		}
	}
	return true
}
