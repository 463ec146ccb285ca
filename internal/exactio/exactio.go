// Package exactio reads a stream that announced its length: a reader that
// yields exactly that many bytes and fails when the stream ends early or
// goes on past it, so that a copy of it never ends cleanly with the wrong
// number of bytes. It knows nothing of where the stream comes from; callers
// give the error class that a wrong length means to them.
package exactio

import (
	"errors"
	"fmt"
	"io"
)

// Reader yields exactly the announced number of bytes of its source.
type Reader struct {
	r     io.Reader
	left  int64
	what  string
	class error
}

// NewReader returns a reader of exactly n bytes of r. A source that ends
// before n bytes fails with an error wrapping class and io.ErrUnexpectedEOF;
// one that has more than n bytes fails with an error wrapping class once the
// n bytes were read. what names the stream in error messages ("remote
// media", "media part").
func NewReader(r io.Reader, n int64, what string, class error) *Reader {
	return &Reader{r: r, left: n, what: what, class: class}
}

// Read implements io.Reader.
func (e *Reader) Read(p []byte) (int, error) {
	if e.left == 0 {
		// Everything announced was read: the source must be at its end.
		var one [1]byte
		n, err := e.r.Read(one[:])
		switch {
		case n > 0:
			return 0, fmt.Errorf("reading %s: %w: more bytes than announced", e.what, e.class)
		case err == nil:
			return 0, nil
		default:
			return 0, err
		}
	}
	if int64(len(p)) > e.left {
		p = p[:e.left]
	}
	n, err := e.r.Read(p)
	e.left -= int64(n)
	if errors.Is(err, io.EOF) {
		if e.left > 0 {
			return n, fmt.Errorf("reading %s: %w: %w (%d bytes missing)", e.what, e.class, io.ErrUnexpectedEOF, e.left)
		}
		err = nil
	}
	return n, err
}
