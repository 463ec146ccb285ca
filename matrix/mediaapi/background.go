package mediaapi

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"

	"go.uber.org/zap"
)

// Errors of work the repository runs on its own (see Repository.Go).
var (
	// ErrPanicked is wrapped by the error of work that panicked; the panic
	// was recovered, logged with its stack and counted in
	// caddy_matrix_media_panics_total.
	ErrPanicked = errors.New("panic recovered")
	// ErrShuttingDown is the error of work refused because the repository
	// is draining (Drain was called).
	ErrShuttingDown = errors.New("media repository is shutting down")
)

// backgroundWork counts the work that runs outside of any request (pre-
// generation, thumbnail generations and remote stores that outlive their
// first client, the pending-expiry loop, migrations) so that the stores are
// closed only once it has finished. Unlike a sync.WaitGroup it may gain
// holds while Drain waits: once draining it refuses new goroutines but not
// the work that running work (or a request still in flight) does on its own
// goroutine.
type backgroundWork struct {
	mu       sync.Mutex
	n        int
	draining bool
	// idle is closed when draining and n drops to zero; idleClosed tells
	// whether it was.
	idle       chan struct{}
	idleClosed bool
}

// hold registers one piece of work. A new goroutine (nested false) is
// refused when draining, in which case it must not start; nested work (on
// the goroutine of work already held, or of a request) always is held.
// Every successful hold is paired with one done.
func (b *backgroundWork) hold(nested bool) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.draining && !nested {
		return false
	}
	b.n++
	return true
}

// done ends a hold.
func (b *backgroundWork) done() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.n--
	if b.n == 0 && b.draining && !b.idleClosed {
		b.idleClosed = true
		close(b.idle)
	}
}

// drain refuses new holds and returns a channel closed once none is left.
func (b *backgroundWork) drain() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.draining {
		b.draining = true
		b.idle = make(chan struct{})
		if b.n == 0 {
			b.idleClosed = true
			close(b.idle)
		}
	}
	return b.idle
}

// running returns the number of holds.
func (b *backgroundWork) running() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n
}

// Go runs fn in a new goroutine that holds the repository's stores open
// (Drain waits for it) and recovers a panic: it is logged at error level with
// its stack and counted in caddy_matrix_media_panics_total{where}, and only fn
// is lost. Go returns false, without running fn, when the repository is
// draining. where names the work in logs and metrics (a fixed word such as
// "thumbnail_pregeneration", never an ID).
//
// Every goroutine that may outlive the request that started it is started
// through Go (or, when already on its own goroutine, runs through run).
func (r *Repository) Go(where string, fn func()) bool {
	if !r.bg.hold(false) {
		return false
	}
	go func() {
		defer r.bg.done()
		_ = r.safely(where, func() error { fn(); return nil })
	}()
	return true
}

// run runs fn on the calling goroutine like Go does on a new one: holding
// the stores open (also while draining: the caller is a request or work
// already held) and turning a panic into an error wrapping ErrPanicked. Use
// it for work that may go on after its caller stopped waiting, such as a
// coalesced generation.
func (r *Repository) run(where string, fn func() error) error {
	r.bg.hold(true)
	defer r.bg.done()
	return r.safely(where, fn)
}

// safely calls fn and turns a panic into an error wrapping ErrPanicked,
// logged with its stack and counted.
func (r *Repository) safely(where string, fn func() error) (err error) {
	defer func() {
		if v := recover(); v != nil {
			r.metrics.panics.WithLabelValues(where).Inc()
			r.logger.Error("panic recovered", zap.String("where", where), zap.Any("panic", v),
				zap.ByteString("stack", debug.Stack()))
			err = fmt.Errorf("%s: %w: %v", where, ErrPanicked, v)
		}
	}()
	return fn()
}

// Drain stops the repository from starting background work (Go returns
// false from now on) and waits until the work already running has finished
// or ctx is done; then it returns ctx's error. Work already running may
// still finish what it does on its own goroutine. Once the work has
// finished, the reads noted since the last access flush are written
// (FlushAccess). Call it once no request uses the repository any more,
// before closing the stores it was built on; calling it again waits again.
func (r *Repository) Drain(ctx context.Context) error {
	select {
	case <-r.bg.drain():
		// Reads noted by requests after the access flush loop stopped.
		if err := r.FlushAccess(ctx); err != nil {
			r.logger.Warn("recording media access times at shutdown failed", zap.Error(err))
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("draining background work (%d still running): %w", r.bg.running(), ctx.Err())
	}
}

// goFinish runs fn through Go and always hands its outcome to finish, on
// fn's goroutine: fn's error, an error wrapping ErrPanicked when fn panicked,
// or (on the caller's goroutine) one wrapping ErrShuttingDown when the
// repository is draining and fn was not run. Use it for work that others
// wait on (a flight's leader), so that a panic or a refusal never leaves
// them waiting:
//
//	var e *mediaEntry
//	s.repo.goFinish("remote_fetch", func() (err error) {
//		e, err = s.repo.fetchRemote(ctx, ...)
//		return err
//	}, func(err error) { s.repo.finishRemote(key, f, e, err) })
func (r *Repository) goFinish(where string, fn func() error, finish func(error)) {
	started := r.Go(where, func() {
		finish(r.safely(where, fn))
	})
	if !started {
		finish(fmt.Errorf("%s: %w", where, ErrShuttingDown))
	}
}
