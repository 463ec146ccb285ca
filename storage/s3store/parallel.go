package s3store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
)

// rangeReader reads a range of an object as consecutive parts of
// rangePartSize bytes with several ranged GetObjects in flight, for reads too
// large for one connection's throughput. The part at the read position (the
// head) streams straight from its GetObject body into the caller's buffers;
// up to ahead parts after it are fetched at the same time into buffers taken
// from the store's buffer budget, without waiting for it: a part that gets
// no buffer is not fetched ahead, and a head started with no buffer at all
// streams the whole rest of the range, as a single GetObject would. Bytes
// are returned strictly in order.
//
// Any failed part fails the read (after the SDK's own retries): Read returns
// the error and every later Read returns it too, so a download is cut, never
// ended early with a clean-looking end of file. Close, and the end of the
// context the reader was opened with, stop every GetObject and give back
// the buffers. Close may be called while a Read is blocked, to end it.
type rangeReader struct {
	s   *Store
	key string
	// ctx is the reader's context, cancelled by Close; every GetObject of
	// the reader uses it.
	ctx    context.Context
	cancel context.CancelFunc
	// end is the offset just past the range.
	end int64
	// ahead is the most part buffers the reader holds at once.
	ahead int

	// mu is held by Read and by Close's clean-up, so Close waits for a Read
	// in progress, which the cancelled context ends.
	mu sync.Mutex
	// pos is the object offset of the next byte to return.
	pos int64
	// body streams the head part up to bodyEnd; nil when the head is a
	// fetched part or nothing is open.
	body    io.ReadCloser
	bodyEnd int64
	// cur is the unread rest of the fetched head part, held in curBuf.
	cur    []byte
	curBuf *[]byte
	// pending are the parts fetched ahead, in order; they cover the offsets
	// from the head's end up to next.
	pending []*fetchedPart
	// next is the offset of the first byte no GetObject has been started
	// for; end when the whole range is assigned.
	next int64
	// fetches tracks the goroutines of pending parts.
	fetches sync.WaitGroup
	// err is the first error, returned by every later Read.
	err error
	// closed is set by Close.
	closed bool
}

// fetchedPart is one part read ahead into a buffer of the budget.
type fetchedPart struct {
	off, n int64
	buf    *[]byte
	// done receives the fetch's outcome once (buffered, so the fetch never
	// blocks).
	done chan error
}

// openParallel opens a rangeReader of length bytes of key from offset, and
// starts its first GetObjects, so that a missing object or an unreachable
// S3 is reported here rather than by the first Read.
func (s *Store) openParallel(ctx context.Context, key string, offset, length int64) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(ctx)
	r := &rangeReader{
		s: s, key: key, ctx: ctx, cancel: cancel,
		end: offset + length, ahead: s.parallel - 1,
		pos: offset, next: offset,
	}
	if err := r.startHead(); err != nil {
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
	for {
		if len(r.cur) > 0 {
			n := copy(p, r.cur)
			r.cur = r.cur[n:]
			r.pos += int64(n)
			if len(r.cur) == 0 {
				// No new fetch starts here: once the parts read ahead are
				// used up, the next head streams and the parts after it
				// are fetched together, so that the head is never a part
				// whose fetch started late.
				r.s.releaseRangeBuf(r.curBuf)
				r.cur, r.curBuf = nil, nil
			}
			return n, nil
		}
		if r.body != nil {
			if int64(len(p)) > r.bodyEnd-r.pos {
				p = p[:r.bodyEnd-r.pos]
			}
			n, err := r.body.Read(p)
			r.pos += int64(n)
			// Buffers that were short when the head started may be free now.
			r.fill()
			if r.pos >= r.bodyEnd {
				r.body.Close()
				r.body = nil
				err = nil
			}
			if n > 0 {
				return n, nil
			}
			if err == io.EOF {
				// The body ended before its range's end.
				err = classify(io.ErrUnexpectedEOF)
			}
			if err != nil {
				return 0, err
			}
			continue
		}
		if len(r.pending) == 0 {
			if err := r.startHead(); err != nil {
				return 0, err
			}
			continue
		}
		f := r.pending[0]
		var err error
		select {
		case err = <-f.done:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
		r.pending = r.pending[1:]
		if err != nil {
			r.s.releaseRangeBuf(f.buf)
			return 0, err
		}
		r.cur, r.curBuf = (*f.buf)[:f.n], f.buf
	}
}

// startHead opens the GetObject of the head at r.pos, when nothing is
// streaming or fetched there. With a buffer for the part after it, the
// head is one part and fetching ahead starts once the head's GetObject has
// answered (so a missing object costs one request); without one, the head
// streams the rest of the range.
func (r *rangeReader) startHead() error {
	n := r.end - r.pos
	var first *[]byte
	if n > r.s.rangePartSize && r.ahead > 0 {
		if b, ok := r.s.tryRangeBuf(); ok {
			first, n = b, r.s.rangePartSize
		}
	}
	body, err := r.s.getObject(r.ctx, r.key, r.pos, n)
	if err != nil {
		if first != nil {
			r.s.releaseRangeBuf(first)
		}
		return err
	}
	r.body, r.bodyEnd = body, r.pos+n
	r.next = r.bodyEnd
	if first != nil {
		r.startFetch(first)
		r.fill()
	}
	return nil
}

// fill starts fetching parts ahead while the range has unassigned bytes,
// the reader holds fewer than r.ahead buffers and the budget has room at
// once.
func (r *rangeReader) fill() {
	for r.next < r.end && r.held() < r.ahead {
		b, ok := r.s.tryRangeBuf()
		if !ok {
			return
		}
		r.startFetch(b)
	}
}

// held returns how many part buffers the reader holds.
func (r *rangeReader) held() int {
	n := len(r.pending)
	if r.curBuf != nil {
		n++
	}
	return n
}

// startFetch starts fetching the part at r.next into buf.
func (r *rangeReader) startFetch(buf *[]byte) {
	f := &fetchedPart{off: r.next, n: min(r.s.rangePartSize, r.end-r.next), buf: buf, done: make(chan error, 1)}
	r.next += f.n
	r.pending = append(r.pending, f)
	r.fetches.Add(1)
	go func() {
		defer r.fetches.Done()
		f.done <- r.fetch(f)
	}()
}

// fetch reads part f into its buffer.
func (r *rangeReader) fetch(f *fetchedPart) error {
	body, err := r.s.getObject(r.ctx, r.key, f.off, f.n)
	if err != nil {
		return err
	}
	defer body.Close()
	if _, err := io.ReadFull(body, (*f.buf)[:f.n]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("reading part at %d: %w", f.off, classify(err))
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
	if r.body != nil {
		r.body.Close()
		r.body = nil
	}
	r.fetches.Wait()
	for _, f := range r.pending {
		r.s.releaseRangeBuf(f.buf)
	}
	r.pending = nil
	if r.curBuf != nil {
		r.s.releaseRangeBuf(r.curBuf)
		r.cur, r.curBuf = nil, nil
	}
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
