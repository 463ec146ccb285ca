package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// getObject starts a GetObject of key from offset: length bytes, or to the
// end when length is negative. A missing object gives an error wrapping
// storage.ErrNotFound. The returned body reports the operation to the
// observer when it is closed. The GetObject fails with an error wrapping
// ErrUnavailable when its headers, or any read of its body, take longer than
// the store's read idle timeout.
func (s *Store) getObject(ctx context.Context, key string, offset, length int64) (io.ReadCloser, error) {
	in := &s3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)}
	switch {
	case length >= 0:
		in.Range = aws.String(fmt.Sprintf("bytes=%d-%d", offset, offset+length-1))
	case offset > 0:
		in.Range = aws.String(fmt.Sprintf("bytes=%d-", offset))
	}
	start := time.Now()
	ctx, cancel := context.WithCancelCause(ctx)
	dog := newWatchdog(s.readIdle, cancel)
	dog.arm()
	out, err := s.client.GetObject(ctx, in)
	idle := !dog.disarm()
	if err != nil {
		cancel(nil)
		if idle {
			err = fmt.Errorf("%w: %w", errIdle, err)
		}
		s.observe("GetObject", start, 0, err)
		if statusCode(err) == http.StatusNotFound {
			return nil, fmt.Errorf("getting object: %w", storage.ErrNotFound)
		}
		return nil, fmt.Errorf("getting object: %w", classify(err))
	}
	return &observedBody{s: s, body: out.Body, start: start, cancel: cancel, dog: dog}, nil
}

// errIdle is the error of a GetObject that received nothing for the read
// idle timeout.
var errIdle = fmt.Errorf("s3 sent nothing within the read idle timeout: %w", ErrUnavailable)

// watchdog cancels a GetObject's context when it is armed for longer than
// the idle timeout. A nil watchdog (timeout disabled) does nothing.
type watchdog struct {
	idle  time.Duration
	timer *time.Timer
	fired atomic.Bool
}

// newWatchdog returns a watchdog calling cancel(errIdle) when it fires; nil
// when idle is 0.
func newWatchdog(idle time.Duration, cancel context.CancelCauseFunc) *watchdog {
	if idle <= 0 {
		return nil
	}
	w := &watchdog{idle: idle}
	w.timer = time.AfterFunc(idle, func() {
		w.fired.Store(true)
		cancel(errIdle)
	})
	w.timer.Stop()
	return w
}

// arm starts the idle countdown.
func (w *watchdog) arm() {
	if w != nil {
		w.timer.Reset(w.idle)
	}
}

// disarm stops the countdown; false when it has fired (now or earlier).
func (w *watchdog) disarm() bool {
	if w == nil {
		return true
	}
	w.timer.Stop()
	return !w.fired.Load()
}

// observedBody is a GetObject body that reports the operation, with the
// bytes read and the first read error, when closed. Close may be called
// while a Read is blocked (to end it).
type observedBody struct {
	s      *Store
	body   io.ReadCloser
	start  time.Time
	cancel context.CancelCauseFunc
	dog    *watchdog
	mu     sync.Mutex
	n      int64
	err    error
	once   sync.Once
}

// Read reads from the object body; errors that show S3 failing (or sending
// nothing for the idle timeout) wrap ErrUnavailable.
func (b *observedBody) Read(p []byte) (int, error) {
	b.dog.arm()
	n, err := b.body.Read(p)
	idle := !b.dog.disarm()
	if err != nil && err != io.EOF {
		if idle {
			err = fmt.Errorf("%w: %w", errIdle, err)
		}
		err = classify(err)
	}
	b.mu.Lock()
	b.n += int64(n)
	if err != nil && err != io.EOF && b.err == nil {
		b.err = err
	}
	b.mu.Unlock()
	return n, err
}

// Close closes the body and reports the operation.
func (b *observedBody) Close() error {
	err := b.body.Close()
	b.cancel(nil)
	b.once.Do(func() {
		b.mu.Lock()
		n, rerr := b.n, b.err
		b.mu.Unlock()
		b.s.observe("GetObject", b.start, n, rerr)
	})
	return err
}

// Open returns the blob with the given hash after a HeadObject for its size.
// Blob.Content fetches the bytes lazily: the first Read issues a GetObject
// from the current offset and later Reads keep streaming that response until
// a Seek moves elsewhere. Its GetObjects use ctx, so the reader stops working
// when ctx ends. It also implements io.WriterTo with a 256 KiB buffer. A
// missing blob or a malformed hash gives an error wrapping
// storage.ErrNotFound.
func (s *Store) Open(ctx context.Context, sha256 string) (storage.Blob, error) {
	if err := ctx.Err(); err != nil {
		return storage.Blob{}, fmt.Errorf("opening blob: %w", err)
	}
	key, err := s.checkedKey(sha256)
	if err != nil {
		return storage.Blob{}, fmt.Errorf("opening blob: %w", err)
	}
	size, ok, err := s.head(ctx, key)
	if err != nil {
		return storage.Blob{}, fmt.Errorf("opening blob: %w", err)
	}
	if !ok {
		return storage.Blob{}, fmt.Errorf("opening blob %s: %w", sha256, storage.ErrNotFound)
	}
	return storage.Blob{Content: &objectReader{s: s, ctx: ctx, key: key, size: size}, Size: size}, nil
}

// objectReader reads an object lazily with ranged GetObjects. It is not safe
// for concurrent use (like an *os.File's offset).
type objectReader struct {
	s    *Store
	ctx  context.Context
	key  string
	size int64
	// off is the offset of the next byte to read.
	off int64
	// body streams the object from off; nil when no GetObject is open.
	body io.ReadCloser
	// closed is set by Close.
	closed bool
}

var (
	_ io.ReadSeekCloser = (*objectReader)(nil)
	_ io.WriterTo       = (*objectReader)(nil)
)

// errClosed is returned by a closed reader.
var errClosed = errors.New("reading blob: reader closed")

// Read reads from the current offset, opening a GetObject if none is
// streaming. A body that breaks off before the object's end is reopened once
// from the offset reached; the SDK's retryer retries the GetObject itself.
func (r *objectReader) Read(p []byte) (int, error) {
	if r.closed {
		return 0, errClosed
	}
	if r.off >= r.size {
		r.closeBody()
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	if int64(len(p)) > r.size-r.off {
		p = p[:r.size-r.off]
	}
	for attempt := 0; ; attempt++ {
		if r.body == nil {
			body, err := r.s.getObject(r.ctx, r.key, r.off, -1)
			if err != nil {
				return 0, fmt.Errorf("reading blob at %d: %w", r.off, err)
			}
			r.body = body
		}
		n, err := r.body.Read(p)
		r.off += int64(n)
		if n > 0 {
			// Keep streaming unless the body ended or failed; a failure then
			// shows on the next Read, which starts a fresh GetObject.
			if err != nil || r.off >= r.size {
				r.closeBody()
			}
			return n, nil
		}
		if err == nil {
			return 0, nil
		}
		r.closeBody()
		if err == io.EOF {
			// The body ended before the object's end.
			err = classify(io.ErrUnexpectedEOF)
		}
		if attempt > 0 || r.ctx.Err() != nil {
			return 0, fmt.Errorf("reading blob at %d: %w", r.off, err)
		}
	}
}

// WriteTo copies the rest of the object to w through a 256 KiB buffer (so
// that io.Copy does not use its 32 KiB default), and leaves the offset at the
// end.
func (r *objectReader) WriteTo(w io.Writer) (int64, error) {
	bufp := r.s.getChunk()
	defer r.s.putChunk(bufp)
	buf := *bufp
	var total int64
	for {
		n, err := r.Read(buf)
		if n > 0 {
			wn, werr := w.Write(buf[:n])
			total += int64(wn)
			if werr != nil {
				return total, werr
			}
			if wn != n {
				return total, io.ErrShortWrite
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// Seek sets the offset for the next Read. It issues no request; an open
// GetObject is closed when the offset changes. Seeking past the end is
// allowed, and reads there return io.EOF.
func (r *objectReader) Seek(offset int64, whence int) (int64, error) {
	if r.closed {
		return 0, errClosed
	}
	var abs int64
	switch whence {
	case io.SeekStart:
		abs = offset
	case io.SeekCurrent:
		abs = r.off + offset
	case io.SeekEnd:
		abs = r.size + offset
	default:
		return 0, fmt.Errorf("seeking blob: invalid whence %d", whence)
	}
	if abs < 0 {
		return 0, fmt.Errorf("seeking blob: negative offset %d", abs)
	}
	if abs != r.off {
		r.closeBody()
		r.off = abs
	}
	return abs, nil
}

// Close closes the GetObject in progress, if any.
func (r *objectReader) Close() error {
	r.closeBody()
	r.closed = true
	return nil
}

// closeBody closes the streaming body, if any.
func (r *objectReader) closeBody() {
	if r.body != nil {
		r.body.Close()
		r.body = nil
	}
}

// OpenRange returns length bytes of the blob from offset, fetched with one
// ranged GetObject, or, when length exceeds Config.ParallelPartSize and
// parallel reads are on, as parts with up to Config.ParallelParts ranged
// GetObjects in flight. The caller closes the reader; Close may be called
// while a Read is blocked, to end it. A missing blob or a
// malformed hash gives an error wrapping storage.ErrNotFound; a range that
// starts at or past the end of the blob is an error from S3.
func (s *Store) OpenRange(ctx context.Context, sha256 string, offset, length int64) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("opening blob range: %w", err)
	}
	key, err := s.checkedKey(sha256)
	if err != nil {
		return nil, fmt.Errorf("opening blob range: %w", err)
	}
	if offset < 0 || length < 0 {
		return nil, fmt.Errorf("opening blob range: invalid range %d+%d", offset, length)
	}
	if length == 0 {
		return io.NopCloser(eofReader{}), nil
	}
	var body io.ReadCloser
	if s.parallel > 1 && length > s.rangePartSize {
		body, err = s.openParallel(ctx, key, offset, length)
	} else {
		body, err = s.getObject(ctx, key, offset, length)
	}
	if err != nil {
		return nil, fmt.Errorf("opening blob range %s: %w", sha256, err)
	}
	return body, nil
}

// eofReader is an empty reader.
type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

// PresignGet returns a URL that fetches the blob with a plain GET for ttl,
// served with the given Content-Type and Content-Disposition (each omitted
// when empty) instead of the object's own. It signs locally and does not
// check that the blob exists; a malformed hash gives an error wrapping
// storage.ErrNotFound.
func (s *Store) PresignGet(ctx context.Context, sha256 string, ttl time.Duration, contentType, contentDisposition string) (string, error) {
	key, err := s.checkedKey(sha256)
	if err != nil {
		return "", fmt.Errorf("presigning blob URL: %w", err)
	}
	if ttl <= 0 {
		return "", fmt.Errorf("presigning blob URL: invalid lifetime %v", ttl)
	}
	in := &s3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)}
	if contentType != "" {
		in.ResponseContentType = aws.String(contentType)
	}
	if contentDisposition != "" {
		in.ResponseContentDisposition = aws.String(contentDisposition)
	}
	req, err := s.presign.PresignGetObject(ctx, in, s3.WithPresignExpires(ttl))
	if err != nil {
		return "", fmt.Errorf("presigning blob URL: %w", err)
	}
	return req.URL, nil
}
