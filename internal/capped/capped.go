// Package capped provides Map, a size-bounded, concurrency-safe map with
// least-recently-used eviction and an optional expiry per entry. It is the
// one bounded-cache type of the module: remembered fetch failures, circuit
// breakers, verify keys, server discovery answers and URL previews all keep
// their entries in a Map, so that "bounded" means the same thing everywhere
// (at most Max entries; the least recently used goes first); the in-memory
// rate-limit buckets (internal/ratelimit) are kept in Maps too. The token
// cache (matrix/auth) and the media row cache (matrix/mediaapi) are
// deliberate exceptions: their doc comments say why.
//
// Expiry is checked lazily against an injected clock: an expired entry is
// never returned, and is removed when it is looked up or when room is
// needed. Room is made in LRU order alone, whether the victim has expired
// or not.
package capped

import (
	"sync"
	"time"
)

// Options configure a Map.
type Options[K comparable, V any] struct {
	// Max is the most entries the map holds (required, > 0). Adding a new
	// key to a full map evicts the least recently used entry.
	Max int
	// Now is the clock entries expire against. Default time.Now.
	Now func() time.Time
}

// Map is a bounded LRU map from K to V with an optional expiry per entry.
// It is safe for concurrent use. Create it with New.
type Map[K comparable, V any] struct {
	max int
	now func() time.Time

	mu      sync.Mutex
	entries map[K]*node[K, V]
	// head is the sentinel of a circular list, most recently used first.
	head node[K, V]
	// free is one spare node kept from the last removal, so that a full
	// map's steady state (evict one, add one) allocates no node.
	free *node[K, V]
}

// node is one entry and its place in the LRU list.
type node[K comparable, V any] struct {
	prev, next *node[K, V]
	key        K
	value      V
	// expires is when the entry stops being returned; zero means never.
	expires time.Time
}

// New returns an empty Map. It panics when opts.Max is not positive (a
// programming error: every cache has a fixed bound).
func New[K comparable, V any](opts Options[K, V]) *Map[K, V] {
	if opts.Max <= 0 {
		panic("capped: Max must be positive")
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	m := &Map[K, V]{
		max:     opts.Max,
		now:     opts.Now,
		entries: make(map[K]*node[K, V], min(opts.Max, 1024)),
	}
	m.head.prev, m.head.next = &m.head, &m.head
	return m
}

// Get returns the live value of key and marks it most recently used. An
// expired entry is removed and reported as absent.
func (m *Map[K, V]) Get(key K) (V, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n, ok := m.entries[key]
	if !ok {
		var zero V
		return zero, false
	}
	if !n.expires.IsZero() && !m.now().Before(n.expires) {
		m.removeLocked(n)
		var zero V
		return zero, false
	}
	m.moveToFrontLocked(n)
	return n.value, true
}

// Put stores value under key with no expiry, as the most recently used
// entry.
func (m *Map[K, V]) Put(key K, value V) { m.PutUntil(key, value, time.Time{}) }

// PutTTL stores value under key until ttl from now (by the map's clock).
func (m *Map[K, V]) PutTTL(key K, value V, ttl time.Duration) {
	m.PutUntil(key, value, m.now().Add(ttl))
}

// PutUntil stores value under key until expires (the zero time: never), as
// the most recently used entry. A new key in a full map evicts the least
// recently used entry first.
func (m *Map[K, V]) PutUntil(key K, value V, expires time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if n, ok := m.entries[key]; ok {
		n.value, n.expires = value, expires
		m.moveToFrontLocked(n)
		return
	}
	if len(m.entries) >= m.max {
		m.removeLocked(m.head.prev)
	}
	n := m.free
	if n != nil {
		m.free = nil
	} else {
		n = new(node[K, V])
	}
	n.key, n.value, n.expires = key, value, expires
	m.entries[key] = n
	m.pushFrontLocked(n)
}

// Delete removes key, if present.
func (m *Map[K, V]) Delete(key K) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if n, ok := m.entries[key]; ok {
		m.removeLocked(n)
	}
}

// Len returns the number of entries, expired ones not yet removed
// included.
func (m *Map[K, V]) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.entries)
}

// removeLocked unlinks n and forgets it. m.mu must be held.
func (m *Map[K, V]) removeLocked(n *node[K, V]) {
	delete(m.entries, n.key)
	n.prev.next, n.next.prev = n.next, n.prev
	var zero node[K, V]
	*n = zero // drop references to the key and value
	m.free = n
}

// pushFrontLocked links n as the most recently used node. m.mu must be
// held.
func (m *Map[K, V]) pushFrontLocked(n *node[K, V]) {
	n.prev, n.next = &m.head, m.head.next
	m.head.next.prev = n
	m.head.next = n
}

// moveToFrontLocked makes n the most recently used node. m.mu must be held.
func (m *Map[K, V]) moveToFrontLocked(n *node[K, V]) {
	if m.head.next == n {
		return
	}
	n.prev.next, n.next.prev = n.next, n.prev
	m.pushFrontLocked(n)
}
