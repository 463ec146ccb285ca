// Package cluster coordinates the instances that share one metadata
// database, so that several behave as one: wake-ups on named topics (a
// pending upload completed on another instance) and cluster-wide locks that
// free themselves when their holder dies (one remote fetch or one thumbnail
// generation at a time, one instance running periodic work). It knows
// neither Matrix nor Caddy.
//
// Two Coordinators are provided: Local, for one process (SQLite, tests),
// and Postgres, through PostgreSQL LISTEN/NOTIFY and session advisory locks
// held on connections of its own.
//
// Postgres opens two connections per instance, outside the metadata
// store's pool (count them against max_connections): a listener, which is
// reconnected with a bounded backoff when it breaks, and a session, which
// sends the notifications and holds the locks. A lock lives as long as its
// session: when the session ends (PostgreSQL restarted, the backend was
// killed, a query ran past its timeout) PostgreSQL frees the lock and the
// holder's Lost channel is closed within about HealthInterval. Lock names
// map to negative keys of the single-bigint advisory lock space, apart from
// sqlstore's positive keys (see lockKey).
//
// Notifications are hints, never the state itself: one may be lost (a
// connection broke), so subscribers re-read the state they wait for when
// woken, and are also woken when the coordinator may have missed
// notifications (it reconnected) and, as a bound, every FallbackInterval.
package cluster

import (
	"cmp"
	"context"
	"errors"
	"strings"
	"sync"
	"time"
)

// DefaultFallbackInterval is how often every subscriber is woken anyway,
// so that a lost notification delays a waiter by at most this long.
const DefaultFallbackInterval = 5 * time.Second

// ErrClosed is returned by a closed Coordinator.
var ErrClosed = errors.New("cluster coordinator closed")

// Coordinator is what the instances sharing a database use to coordinate.
// It is safe for concurrent use.
type Coordinator interface {
	// Publish wakes the subscribers of topic on every instance, this one
	// included. It is best effort: callers publish after the state change
	// is committed, and subscribers re-read that state when woken.
	Publish(ctx context.Context, topic string) error
	// Subscribe returns a subscription to topic. The caller must Close it.
	Subscribe(topic string) *Subscription
	// Handle calls fn with every topic published that starts with prefix
	// (a change other instances must apply: an invalidation), on the
	// goroutine that delivers it, so fn must be quick; and with "" when
	// notifications may have been lost (fn must then assume anything
	// changed). stop ends the calls.
	Handle(prefix string, fn func(topic string)) (stop func())
	// TryLock takes the cluster-wide lock called name when no one (on any
	// instance, this one included) holds it. It does not wait: acquired is
	// false when the lock is held.
	TryLock(ctx context.Context, name string) (lock Lock, acquired bool, err error)
	// Close releases the locks held and ends the subscriptions' wake-ups.
	Close() error
}

// Lock is a held cluster-wide lock.
type Lock interface {
	// Lost is closed when the lock may no longer be held (the session that
	// held it ended), so another instance may take it: the holder should
	// stop the work the lock guards, or accept that it may be done twice.
	Lost() <-chan struct{}
	// Release frees the lock. It is idempotent.
	Release()
}

// Subscription receives the wake-ups of one topic. C has a buffer of one:
// wake-ups that arrive while one is pending are merged.
type Subscription struct {
	// C receives a value when the topic may have changed.
	C <-chan struct{}

	c     chan struct{}
	topic string
	hub   *Hub
	once  sync.Once
}

// Close ends the subscription; C receives nothing after it.
func (s *Subscription) Close() {
	s.once.Do(func() { s.hub.remove(s) })
}

func (s *Subscription) wake() {
	select {
	case s.c <- struct{}{}:
	default:
	}
}

// Hub is the in-process part of every Coordinator: the subscriptions of this
// process, by topic. Coordinators deliver to it what they receive. While it
// has subscribers, one goroutine wakes them all every Fallback, so that a
// lost notification delays a waiter by at most that long without any waiter
// polling on its own; it ends when the last subscription is closed.
type Hub struct {
	// Fallback is how often every subscriber is woken anyway. Zero means
	// DefaultFallbackInterval; negative, never. Set it before the first
	// Subscribe.
	Fallback time.Duration

	mu       sync.Mutex
	subs     map[string]map[*Subscription]struct{}
	ticking  bool
	handlers map[*handler]struct{}
}

// handler is a Handle registration.
type handler struct {
	prefix string
	fn     func(topic string)
}

// Handle registers fn for the topics starting with prefix (see
// Coordinator.Handle).
func (h *Hub) Handle(prefix string, fn func(topic string)) func() {
	hd := &handler{prefix: prefix, fn: fn}
	h.mu.Lock()
	if h.handlers == nil {
		h.handlers = make(map[*handler]struct{})
	}
	h.handlers[hd] = struct{}{}
	h.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			h.mu.Lock()
			delete(h.handlers, hd)
			h.mu.Unlock()
		})
	}
}

// handle calls the handlers matching topic ("" matches all), outside the
// hub's lock.
func (h *Hub) handle(topic string) {
	h.mu.Lock()
	var fns []func(string)
	for hd := range h.handlers {
		if topic == "" || strings.HasPrefix(topic, hd.prefix) {
			fns = append(fns, hd.fn)
		}
	}
	h.mu.Unlock()
	for _, fn := range fns {
		fn(topic)
	}
}

// Subscribe adds a subscription to topic.
func (h *Hub) Subscribe(topic string) *Subscription {
	c := make(chan struct{}, 1)
	s := &Subscription{C: c, c: c, topic: topic, hub: h}
	h.mu.Lock()
	if h.subs == nil {
		h.subs = make(map[string]map[*Subscription]struct{})
	}
	set := h.subs[topic]
	if set == nil {
		set = make(map[*Subscription]struct{})
		h.subs[topic] = set
	}
	set[s] = struct{}{}
	if !h.ticking && h.Fallback >= 0 {
		h.ticking = true
		go h.runFallback(cmp.Or(h.Fallback, DefaultFallbackInterval))
	}
	h.mu.Unlock()
	return s
}

// runFallback wakes every subscriber every interval while there are any.
func (h *Hub) runFallback(interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for range t.C {
		h.mu.Lock()
		if len(h.subs) == 0 {
			h.ticking = false
			h.mu.Unlock()
			return
		}
		h.wakeAllLocked()
		h.mu.Unlock()
	}
}

func (h *Hub) remove(s *Subscription) {
	h.mu.Lock()
	if set := h.subs[s.topic]; set != nil {
		delete(set, s)
		if len(set) == 0 {
			delete(h.subs, s.topic)
		}
	}
	h.mu.Unlock()
}

// Deliver wakes the subscribers of topic and calls its handlers.
func (h *Hub) Deliver(topic string) {
	h.mu.Lock()
	for s := range h.subs[topic] {
		s.wake()
	}
	h.mu.Unlock()
	if topic != "" {
		h.handle(topic)
	}
}

// DeliverAll wakes every subscriber and calls every handler with "":
// notifications may have been lost.
func (h *Hub) DeliverAll() {
	h.mu.Lock()
	h.wakeAllLocked()
	h.mu.Unlock()
	h.handle("")
}

func (h *Hub) wakeAllLocked() {
	for _, set := range h.subs {
		for s := range set {
			s.wake()
		}
	}
}

// Subscribers counts the subscriptions (for tests and metrics).
func (h *Hub) Subscribers() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, set := range h.subs {
		n += len(set)
	}
	return n
}

// localLocks are the locks held in this process, by name. Every
// Coordinator keeps them, so that two holders in one process exclude each
// other (PostgreSQL session locks are re-entrant within their session).
type localLocks struct {
	mu   sync.Mutex
	held map[string]struct{}
}

func (l *localLocks) tryTake(name string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.held[name]; ok {
		return false
	}
	if l.held == nil {
		l.held = make(map[string]struct{})
	}
	l.held[name] = struct{}{}
	return true
}

func (l *localLocks) drop(name string) {
	l.mu.Lock()
	delete(l.held, name)
	l.mu.Unlock()
}

// Local is the Coordinator of a single process: its notifications and
// locks reach no other instance. It is what a SQLite store uses, which is
// single-instance anyway.
type Local struct {
	hub    Hub
	locks  localLocks
	mu     sync.Mutex
	closed bool
}

// NewLocal returns a Local coordinator whose subscribers are also woken
// every fallback (zero: DefaultFallbackInterval; negative: never), in case a
// change was made without a Publish.
func NewLocal(fallback time.Duration) *Local {
	l := &Local{}
	l.hub.Fallback = fallback
	return l
}

// Publish implements Coordinator.
func (l *Local) Publish(_ context.Context, topic string) error {
	if l.isClosed() {
		return ErrClosed
	}
	l.hub.Deliver(topic)
	return nil
}

func (l *Local) isClosed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// Subscribe implements Coordinator.
func (l *Local) Subscribe(topic string) *Subscription { return l.hub.Subscribe(topic) }

// Handle implements Coordinator.
func (l *Local) Handle(prefix string, fn func(topic string)) func() { return l.hub.Handle(prefix, fn) }

// TryLock implements Coordinator.
func (l *Local) TryLock(_ context.Context, name string) (Lock, bool, error) {
	if l.isClosed() {
		return nil, false, ErrClosed
	}
	if !l.locks.tryTake(name) {
		return nil, false, nil
	}
	return &localLock{name: name, locks: &l.locks, lost: make(chan struct{})}, true, nil
}

// Close implements Coordinator.
func (l *Local) Close() error {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	return nil
}

// localLock is a Lock of a Local coordinator: never lost.
type localLock struct {
	name  string
	locks *localLocks
	lost  chan struct{}
	once  sync.Once
}

func (l *localLock) Lost() <-chan struct{} { return l.lost }
func (l *localLock) Release()              { l.once.Do(func() { l.locks.drop(l.name) }) }

// Interface guard.
var _ Coordinator = (*Local)(nil)
