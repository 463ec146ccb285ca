package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// rangeReader reads a range of an object as consecutive parts of
// rangePartSize bytes with up to s.parallel ranged GetObjects in flight, for
// reads too large for one connection's throughput.
//
// The parts in flight are a queue in range order. At most one of them is
// streamed: its GetObject is opened ahead, and once it is the part being
// read, its body is read straight into the caller's buffers. The others are
// fetched into buffers of the store's budget, taken without waiting (at most
// s.parallel-1 per reader); the caller reads a buffered part as it fills. A
// part is added to the queue whenever one leaves it, so the connections
// stay busy while the caller reads. When the part being read is the only
// one and the budget gives no buffer for the next, it streams the whole rest
// of the range, as a single GetObject would.
//
// Bytes are returned strictly in order. Any failed part fails the read (after
// the SDK's own retries): Read returns the error and every later Read
// returns it too, so a download is cut, never ended early with a
// clean-looking end of file. Close, and the end of the context the reader
// was opened with, stop every GetObject and give back the buffers. Close may
// be called while a Read is blocked, to end it.
type rangeReader struct {
	s   *Store
	key string
	// ctx is the reader's context, cancelled by Close; every GetObject of
	// the reader uses it.
	ctx    context.Context
	cancel context.CancelFunc
	// end is the offset just past the range.
	end int64

	// mu is held by Read and by Close's clean-up, so Close waits for a Read
	// in progress, which the cancelled context ends.
	mu sync.Mutex
	// pos is the object offset of the next byte to return.
	pos int64
	// queue holds the parts in flight in order; the first starts at pos.
	queue []*rangePart
	// next is the offset of the first byte no part covers yet; end when the
	// whole range is assigned.
	next int64
	// fetches tracks the goroutines of the parts.
	fetches sync.WaitGroup
	// err is the first error, returned by every later Read.
	err error
	// closed is set by Close.
	closed bool
}

// rangePart is one part of a rangeReader: streamed (buf nil) or fetched
// into buf.
type rangePart struct {
	off, n int64
	buf    *[]byte
	// filled is how many bytes of a fetched part are in buf; the fetch
	// signals more (buffered, never blocking) after each read.
	filled atomic.Int64
	more   chan struct{}
	// done receives the outcome once: for a streamed part when its
	// GetObject has answered (then body is set), for a fetched part when
	// it is complete.
	done chan error
	body io.ReadCloser

	// The reader's own state of the part, under its mu.
	read     int64
	finished bool
	err      error
	// reopened is set once a streamed part's GetObject was opened again.
	reopened bool
}

// openParallel opens a rangeReader of length bytes of key from offset. It
// waits for the first part's GetObject to answer, so that a missing object
// or an unreachable S3 is reported here rather than by the first Read.
func (s *Store) openParallel(ctx context.Context, key string, offset, length int64) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(ctx)
	r := &rangeReader{s: s, key: key, ctx: ctx, cancel: cancel, end: offset + length, pos: offset, next: offset}
	r.mu.Lock()
	buf, ok := r.startStream()
	head := r.queue[0]
	err := head.wait(r.ctx)
	if err == nil {
		if ok {
			r.startFetch(buf)
		}
		r.fill()
	} else if ok {
		s.releaseRangeBuf(buf)
	}
	r.mu.Unlock()
	if err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// Read returns the next bytes of the range, in order.
func (r *rangeReader) Read(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return 0, errClosed
	}
	if r.err != nil {
		return 0, r.err
	}
	if r.pos >= r.end {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	n, err := r.read(p)
	if err != nil {
		r.err = fmt.Errorf("reading blob at %d: %w", r.pos, err)
		r.cancel()
		return n, r.err
	}
	return n, nil
}

// read is Read with r.mu held and bytes left in the range.
func (r *rangeReader) read(p []byte) (int, error) {
	if len(r.queue) == 0 {
		// fill always queues a part while the range has bytes left.
		return 0, fmt.Errorf("no part queued at %d: %w", r.pos, io.ErrUnexpectedEOF)
	}
	f := r.queue[0]
	if int64(len(p)) > f.n-f.read {
		p = p[:f.n-f.read]
	}
	var n int
	if f.buf == nil {
		if err := f.wait(r.ctx); err != nil {
			return 0, err
		}
		var err error
		n, err = f.body.Read(p)
		if n == 0 {
			if err == nil {
				return 0, nil
			}
			if err == io.EOF {
				// The body ended before its range's end.
				err = classify(io.ErrUnexpectedEOF)
			}
			if f.reopened || r.ctx.Err() != nil {
				return 0, err
			}
			// A streamed part may wait, opened, while the parts before it
			// are sent; if S3 dropped it meanwhile (or it broke off), open
			// it once more from the byte reached, as objectReader does.
			f.reopened = true
			f.body.Close()
			f.body = nil
			body, rerr := r.s.getObject(r.ctx, r.key, f.off+f.read, f.n-f.read)
			if rerr != nil {
				return 0, rerr
			}
			f.body = body
			return 0, nil
		}
	} else {
		for {
			if avail := f.filled.Load() - f.read; avail > 0 {
				n = copy(p, (*f.buf)[f.read:f.read+avail])
				break
			}
			if f.finished {
				if f.err != nil {
					return 0, f.err
				}
				return 0, classify(io.ErrUnexpectedEOF)
			}
			select {
			case f.err = <-f.done:
				f.finished = true
			case <-f.more:
			case <-r.ctx.Done():
				return 0, r.ctx.Err()
			}
		}
	}
	f.read += int64(n)
	r.pos += int64(n)
	if f.read == f.n {
		r.queue = r.queue[1:]
		if f.buf == nil {
			f.body.Close()
		} else {
			// The fetch writes nothing more into a full buffer.
			r.s.releaseRangeBuf(f.buf)
		}
		r.fill()
	}
	return n, nil
}

// wait waits for a streamed part's GetObject to answer, or for a fetched
// part to complete; it returns the part's error.
func (f *rangePart) wait(ctx context.Context) error {
	if !f.finished {
		select {
		case f.err = <-f.done:
			f.finished = true
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return f.err
}

// fill adds parts to the queue while the range has unassigned bytes and
// fewer than s.parallel parts are in flight: a streamed part when the queue
// has none, else a fetched part when the reader holds fewer than
// s.parallel-1 buffers and the budget has one free at once.
func (r *rangeReader) fill() {
	for r.next < r.end && len(r.queue) < r.s.parallel {
		streams := 0
		for _, f := range r.queue {
			if f.buf == nil {
				streams++
			}
		}
		if streams == 0 {
			if buf, ok := r.startStream(); ok {
				r.startFetch(buf)
			}
			continue
		}
		if len(r.queue)-streams >= r.s.parallel-1 {
			return
		}
		buf, ok := r.s.tryRangeBuf()
		if !ok {
			return
		}
		r.startFetch(buf)
	}
}

// startStream queues a streamed part at r.next and opens its GetObject in
// the background. A part that will be read first (the queue is empty) and
// finds no buffer for the part after it streams the rest of the range;
// otherwise it is one part long, and when the queue was empty, the buffer
// taken for the part after it is returned with ok set, for startFetch.
func (r *rangeReader) startStream() (buf *[]byte, ok bool) {
	ps := r.s.rangePartSize
	n := min(ps, r.end-r.next)
	if len(r.queue) == 0 && r.end-r.next > ps {
		if buf, ok = r.s.tryRangeBuf(); !ok {
			n = r.end - r.next
		}
	}
	f := &rangePart{off: r.next, n: n, done: make(chan error, 1)}
	r.next += n
	r.queue = append(r.queue, f)
	r.fetches.Add(1)
	go func() {
		defer r.fetches.Done()
		body, err := r.s.getObject(r.ctx, r.key, f.off, f.n)
		f.body = body
		f.done <- err
	}()
	return buf, ok
}

// startFetch queues a fetched part at r.next, read into buf in the
// background.
func (r *rangeReader) startFetch(buf *[]byte) {
	f := &rangePart{
		off: r.next, n: min(r.s.rangePartSize, r.end-r.next), buf: buf,
		more: make(chan struct{}, 1), done: make(chan error, 1),
	}
	r.next += f.n
	r.queue = append(r.queue, f)
	r.fetches.Add(1)
	go func() {
		defer r.fetches.Done()
		f.done <- r.fetch(f)
	}()
}

// fetchReadSize is the largest read of a fetched part's body, so that the
// reader can follow the part as it fills.
const fetchReadSize = 256 << 10

// fetch reads part f into its buffer.
func (r *rangeReader) fetch(f *rangePart) error {
	body, err := r.s.getObject(r.ctx, r.key, f.off, f.n)
	if err != nil {
		return err
	}
	defer body.Close()
	b := (*f.buf)[:f.n]
	var filled int64
	for filled < f.n {
		k, err := body.Read(b[filled:min(filled+fetchReadSize, f.n)])
		if k > 0 {
			filled += int64(k)
			f.filled.Store(filled)
			select {
			case f.more <- struct{}{}:
			default:
			}
		}
		if filled == f.n {
			return nil
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("reading part at %d: %w", f.off, classify(err))
		}
	}
	return nil
}

// Close stops every GetObject of the reader, waits for its fetches and
// gives their buffers back to the budget.
func (r *rangeReader) Close() error {
	r.cancel()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	r.fetches.Wait()
	for _, f := range r.queue {
		if f.body != nil {
			f.body.Close()
		}
		if f.buf != nil {
			r.s.releaseRangeBuf(f.buf)
		}
	}
	r.queue = nil
	return nil
}

// tryRangeBuf takes a buffer of rangePartSize bytes for a part read ahead,
// only if both the store's budget and the share of it that reads may hold
// have room at once.
func (s *Store) tryRangeBuf() (*[]byte, bool) {
	ps := s.rangePartSize
	if s.rangeHeld.Add(ps) > s.rangeMax {
		s.rangeHeld.Add(-ps)
		return nil, false
	}
	if !s.budget.TryAcquire(ps) {
		s.rangeHeld.Add(-ps)
		return nil, false
	}
	return s.rangePool.Get().(*[]byte), true
}

// releaseRangeBuf gives back a buffer taken by tryRangeBuf.
func (s *Store) releaseRangeBuf(b *[]byte) {
	s.rangePool.Put(b)
	s.budget.Release(s.rangePartSize)
	s.rangeHeld.Add(-s.rangePartSize)
}
