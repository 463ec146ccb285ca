package mediaapi

import (
	"sync"
)

// waitRegistry coordinates, within this process, the requests that concern
// one pending media item: downloads waiting for its content subscribe and are
// woken when a PUT completes it, and concurrent PUTs of the same item are
// serialized (the loser gets 409, as in Synapse).
type waitRegistry struct {
	mu      sync.Mutex
	waiters map[mediaKey]*waitList
	putting map[mediaKey]struct{}
}

// waitList is the broadcast channel of one media item: closed on completion.
type waitList struct {
	ch chan struct{}
	n  int
}

func (w *waitRegistry) init() {
	w.waiters = make(map[mediaKey]*waitList)
	w.putting = make(map[mediaKey]struct{})
}

// subscribe returns a channel closed when k is completed, and a function that
// must be called once the caller stops waiting.
func (w *waitRegistry) subscribe(k mediaKey) (<-chan struct{}, func()) {
	w.mu.Lock()
	wl := w.waiters[k]
	if wl == nil {
		wl = &waitList{ch: make(chan struct{})}
		w.waiters[k] = wl
	}
	wl.n++
	w.mu.Unlock()
	return wl.ch, func() {
		w.mu.Lock()
		wl.n--
		if wl.n == 0 && w.waiters[k] == wl {
			delete(w.waiters, k)
		}
		w.mu.Unlock()
	}
}

// notify wakes every subscriber of k.
func (w *waitRegistry) notify(k mediaKey) {
	w.mu.Lock()
	if wl := w.waiters[k]; wl != nil {
		close(wl.ch)
		delete(w.waiters, k)
	}
	w.mu.Unlock()
}

// tryLockPut marks k as being uploaded; false when another PUT holds it.
func (w *waitRegistry) tryLockPut(k mediaKey) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, busy := w.putting[k]; busy {
		return false
	}
	w.putting[k] = struct{}{}
	return true
}

// unlockPut releases a tryLockPut.
func (w *waitRegistry) unlockPut(k mediaKey) {
	w.mu.Lock()
	delete(w.putting, k)
	w.mu.Unlock()
}

// waiting returns how many downloads wait on k (for tests).
func (w *waitRegistry) waiting(k mediaKey) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	if wl := w.waiters[k]; wl != nil {
		return wl.n
	}
	return 0
}
