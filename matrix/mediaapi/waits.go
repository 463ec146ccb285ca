package mediaapi

import (
	"sync"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage/cluster"
)

// waitRegistry counts, within this process, the downloads waiting for one
// pending media item (their wake-ups come from the cluster coordinator, so
// that a PUT on any instance wakes them), and serializes concurrent PUTs of
// the same item here (the loser gets 409 before its body, as in Synapse;
// across instances, completing the row is conditional and the loser gets
// 409 after it).
type waitRegistry struct {
	mu      sync.Mutex
	waiters map[mediaKey]int
	putting map[mediaKey]struct{}
}

func (w *waitRegistry) init() {
	w.waiters = make(map[mediaKey]int)
	w.putting = make(map[mediaKey]struct{})
}

// mediaTopic is the cluster topic published when the pending item k gets
// its content.
func mediaTopic(k mediaKey) string { return "media/" + k.server + "/" + k.id }

// subscribe subscribes to the completion of k through c; the returned
// function ends the subscription and must be called once.
func (w *waitRegistry) subscribe(c cluster.Coordinator, k mediaKey) (*cluster.Subscription, func()) {
	sub := c.Subscribe(mediaTopic(k))
	w.mu.Lock()
	w.waiters[k]++
	w.mu.Unlock()
	return sub, func() {
		sub.Close()
		w.mu.Lock()
		if w.waiters[k]--; w.waiters[k] <= 0 {
			delete(w.waiters, k)
		}
		w.mu.Unlock()
	}
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
	return w.waiters[k]
}
