package auth

import (
	"errors"
	"fmt"
	"sync"
	"time"
)

// Defaults of BreakerOptions.
const (
	// DefaultBreakerThreshold is the default BreakerOptions.Threshold.
	DefaultBreakerThreshold = 5
	// DefaultBreakerCooldown is the default BreakerOptions.Cooldown.
	DefaultBreakerCooldown = 10 * time.Second
)

// ErrCircuitOpen is returned (wrapped, together with
// ErrHomeserverUnavailable) while a homeserver's breaker is open: the check
// was not attempted.
var ErrCircuitOpen = errors.New("homeserver circuit open")

// BreakerOptions configure a Breaker.
type BreakerOptions struct {
	// Threshold is how many consecutive failed homeserver calls (errors,
	// 5xx, timeouts) open the breaker. Default DefaultBreakerThreshold (5).
	Threshold int
	// Cooldown is how long an open breaker refuses calls before it lets one
	// probe call through. Default DefaultBreakerCooldown (10s).
	Cooldown time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Breaker is a circuit breaker for one homeserver: after Threshold
// consecutive failures it refuses calls for Cooldown, so that a dead
// homeserver costs requests an immediate 502 instead of a timeout each; then
// one probe call decides whether it closes again.
type Breaker struct {
	mu        sync.Mutex
	threshold int
	cooldown  time.Duration
	now       func() time.Time
	failures  int
	openUntil time.Time
	probing   bool
}

// NewBreaker returns a closed breaker.
func NewBreaker(opts BreakerOptions) *Breaker {
	b := &Breaker{}
	b.setOptions(opts)
	return b
}

// setOptions applies opts, with defaults, keeping the state.
func (b *Breaker) setOptions(opts BreakerOptions) {
	if opts.Threshold <= 0 {
		opts.Threshold = DefaultBreakerThreshold
	}
	if opts.Cooldown <= 0 {
		opts.Cooldown = DefaultBreakerCooldown
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.threshold = opts.Threshold
	b.cooldown = opts.Cooldown
	if opts.Now != nil {
		b.now = opts.Now
	}
	if b.now == nil {
		b.now = time.Now
	}
}

// Allow reports whether a call may be made now. It returns an error wrapping
// ErrCircuitOpen and ErrHomeserverUnavailable while the breaker is open, or
// while its single probe call is in flight. Every nil return must be followed
// by one Record.
func (b *Breaker) Allow() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.failures < b.threshold {
		return nil
	}
	now := b.now()
	if now.Before(b.openUntil) || b.probing {
		wait := b.openUntil.Sub(now)
		if wait < 0 {
			wait = 0
		}
		return &CircuitOpenError{RetryAfter: wait}
	}
	b.probing = true
	return nil
}

// Record reports the outcome of an allowed call: success is any answer from
// the homeserver, including a rejected token.
func (b *Breaker) Record(success bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.probing = false
	if success {
		b.failures = 0
		return
	}
	b.failures++
	if b.failures >= b.threshold {
		b.openUntil = b.now().Add(b.cooldown)
	}
}

// Open reports whether the breaker currently refuses calls.
func (b *Breaker) Open() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.failures >= b.threshold && b.now().Before(b.openUntil)
}

// CircuitOpenError is the error of a call refused by an open breaker.
type CircuitOpenError struct {
	// RetryAfter is how long until the breaker lets a probe call through.
	RetryAfter time.Duration
}

// Error describes the refusal.
func (e *CircuitOpenError) Error() string {
	return fmt.Sprintf("checking access token: %v: %v (retry in %s)", ErrHomeserverUnavailable, ErrCircuitOpen, e.RetryAfter.Round(time.Second))
}

// Unwrap makes errors.Is match ErrCircuitOpen and ErrHomeserverUnavailable.
func (e *CircuitOpenError) Unwrap() []error {
	return []error{ErrCircuitOpen, ErrHomeserverUnavailable}
}
