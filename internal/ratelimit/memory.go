package ratelimit

import (
	"context"
	"hash/maphash"
	"sync"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/capped"
)

// DefaultMaxKeys is the default MemoryOptions.Max.
const DefaultMaxKeys = 100000

// memoryShards is how many independently locked parts a Memory has, so that
// concurrent requests for different keys rarely wait for each other.
const memoryShards = 16

// stackBuckets is how many buckets of one Take a Memory tracks without
// allocating: as many as a media request names (six: per IP and per user
// for the three classes of a download that fetches remote media), with
// room to spare; more are handled on the heap.
const stackBuckets = 8

// MemoryOptions configure a Memory limiter.
type MemoryOptions struct {
	// Max bounds the buckets held (default DefaultMaxKeys, about 200 bytes
	// each with a short key). Beyond it the least recently used bucket is
	// forgotten, which makes it full again: a flood of distinct keys costs
	// at most Max buckets of memory, at the price of forgetting old ones.
	Max int
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Memory is a Limiter holding its buckets in this process. It is safe for
// concurrent use.
//
// Buckets live in capped.Maps (the module's one bounded-cache type), one
// per shard, each bounded by Max/16 (so at most Max in all), least recently
// used evicted first: idle keys go first, and forgetting a bucket only
// refills it. A bucket found refilled when it is taken from, or left full,
// is deleted (a full bucket and no bucket are the same). Entries carry no
// expiry of their own: capped.Map drops expired entries only when they are
// looked up (which is when a bucket is refilled anyway) or in LRU order, so
// an expiry would buy nothing but clock reads. A shard's own mutex makes
// read-modify-write of its buckets atomic.
type Memory struct {
	now      func() time.Time
	perShard int
	seed     maphash.Seed
	shards   [memoryShards]memoryShard
}

type memoryShard struct {
	mu sync.Mutex
	m  *capped.Map[string, state]
}

// NewMemory returns an empty in-memory limiter.
func NewMemory(opts MemoryOptions) *Memory {
	if opts.Max <= 0 {
		opts.Max = DefaultMaxKeys
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	per := max(opts.Max/memoryShards, 1)
	l := &Memory{now: opts.Now, perShard: per, seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].m = capped.New[string, state](capped.Options[string, state]{Max: per, Now: opts.Now})
	}
	return l
}

// Len returns the number of buckets held (expired ones not yet dropped
// included).
func (l *Memory) Len() int {
	n := 0
	for i := range l.shards {
		n += l.shards[i].m.Len()
	}
	return n
}

// Max returns the most buckets the limiter holds (Max of the options,
// rounded down to a multiple of the shard count).
func (l *Memory) Max() int { return l.perShard * memoryShards }

// Take implements Limiter.
func (l *Memory) Take(_ context.Context, buckets ...Bucket) Decision {
	ns := l.now().UnixNano()
	// The shard of each bucket, and the shards to lock in ascending order
	// (buckets of one call are few), so that the call is atomic.
	var idx, order [stackBuckets]int
	var levels [stackBuckets]float64
	of, shards, lv := idx[:0], order[:0], levels[:0]
	if len(buckets) > len(idx) {
		of, shards, lv = make([]int, 0, len(buckets)), make([]int, 0, len(buckets)), make([]float64, 0, len(buckets))
	}
	for _, b := range buckets {
		i := l.shardOf(b.Key)
		of = append(of, i)
		shards = insertSorted(shards, i)
	}
	for _, i := range shards {
		l.shards[i].mu.Lock()
	}
	defer func() {
		for _, i := range shards {
			l.shards[i].mu.Unlock()
		}
	}()

	d := Decision{Allowed: true, Refused: -1}
	for i, b := range buckets {
		s, ok := l.shards[of[i]].m.Get(b.Key)
		level := refill(s, ok, b.Rule, ns)
		lv = append(lv, level)
		if ok2, wait := allows(level, b.Rule, b.Cost); !ok2 && !b.Force {
			if d.Allowed {
				d.Allowed, d.Refused = false, i
			}
			d.RetryAfter = max(d.RetryAfter, wait)
		}
	}
	if !d.Allowed {
		return d
	}
	for i, b := range buckets {
		level := lv[i] - b.Cost
		m := l.shards[of[i]].m
		if level >= b.Rule.Burst {
			m.Delete(b.Key)
			continue
		}
		if b.Cost != 0 {
			m.Put(b.Key, state{level: level, at: ns})
		}
	}
	return d
}

// shardOf returns the shard of key.
func (l *Memory) shardOf(key string) int {
	return int(maphash.String(l.seed, key) % memoryShards)
}

// insertSorted adds v to the sorted set s.
func insertSorted(s []int, v int) []int {
	for i, x := range s {
		if x == v {
			return s
		}
		if x > v {
			s = append(s, 0)
			copy(s[i+1:], s[i:])
			s[i] = v
			return s
		}
	}
	return append(s, v)
}

// Interface guard.
var _ Limiter = (*Memory)(nil)
