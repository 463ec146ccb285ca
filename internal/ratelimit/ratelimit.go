// Package ratelimit implements token buckets: per key, a level that refills
// at a fixed rate up to a burst, from which requests take a cost. It knows
// neither Matrix nor Caddy: callers name their buckets with keys and pass
// the rule of each bucket with every call, so that the stores hold nothing
// but levels.
//
// Two Limiters are provided: Memory (per process, bounded by an LRU of at
// most Max buckets, see NewMemory) and Redis (shared by every process
// using the same Redis server, one round trip per Take, failing open when
// Redis cannot be reached, see NewRedis).
//
// A bucket that has refilled to its burst is the same as no bucket at all,
// so stores may forget it then: a memory bucket found full is deleted (and
// the least recently used go first when room is needed), a Redis key gets
// the time it takes to be full again as its expiry.
//
// Two kinds of rule: request rules (Debt false) allow a request when the
// bucket holds its whole cost, normally 1; volume rules (Debt true, for
// bytes) allow a request while the level is above zero and charge its
// whole cost, which may take the level below zero. A byte budget therefore
// never refuses one large file forever: it is let through when the bucket
// is positive, and the debt delays what follows.
package ratelimit

import (
	"context"
	"errors"
	"math"
	"time"
)

// Rule is the shape of a bucket.
type Rule struct {
	// Rate is how many tokens the bucket regains per second. Must be
	// positive.
	Rate float64
	// Burst is the bucket's capacity, and its level when it is first used.
	// Must be positive (at least 1 for request rules).
	Burst float64
	// Debt makes the rule a volume rule: a request is allowed while the
	// level is above zero and is charged its whole cost, even beyond the
	// level. Without Debt a request needs its cost (at most Burst) in the
	// bucket.
	Debt bool
}

// Valid reports whether the rule can be used.
func (r Rule) Valid() error {
	switch {
	case !(r.Rate > 0) || math.IsInf(r.Rate, 0):
		return errors.New("rate must be positive")
	case !(r.Burst > 0) || math.IsInf(r.Burst, 0):
		return errors.New("burst must be positive")
	case !r.Debt && r.Burst < 1:
		return errors.New("burst of a request rule must be at least 1")
	}
	return nil
}

// Bucket names one bucket, its rule and what a request takes from it.
type Bucket struct {
	// Key identifies the bucket in the store.
	Key string
	// Rule is its shape.
	Rule Rule
	// Cost is what the request takes (not negative): 1 for a request,
	// its bytes for a volume; 0 asks whether the bucket would allow
	// anything without charging it.
	Cost float64
	// Force charges Cost without asking whether the bucket allows it, for
	// what already happened (the bytes of an upload received without a
	// length, a token the homeserver rejected): such a charge is never
	// refused, so it cannot be lost to a concurrent request that emptied
	// the bucket, and it never refuses the other buckets of its Take.
	Force bool
}

// Decision is the outcome of a Take.
type Decision struct {
	// Allowed is true when every bucket's cost was taken.
	Allowed bool
	// Refused is the index of the (first) bucket that refused, when not
	// Allowed.
	Refused int
	// RetryAfter, when not Allowed, is how long until the refusing buckets
	// would allow the same request (the longest of them).
	RetryAfter time.Duration
}

// Limiter takes costs from buckets.
type Limiter interface {
	// Take takes each bucket's cost when every bucket allows its own, and
	// nothing otherwise (atomically for the buckets of one call). It
	// never fails: a store that cannot answer allows (fails open) and
	// reports it its own way. Buckets must have valid rules and costs
	// that are not negative.
	Take(ctx context.Context, buckets ...Bucket) Decision
}

// state is a bucket's level at a time (Unix nanoseconds).
type state struct {
	level float64
	at    int64
}

// refill returns the level of s at now under rule (a missing bucket is
// full).
func refill(s state, ok bool, rule Rule, now int64) float64 {
	if !ok {
		return rule.Burst
	}
	el := float64(now-s.at) / 1e9
	if el < 0 {
		el = 0
	}
	return math.Min(rule.Burst, s.level+el*rule.Rate)
}

// allows reports whether a bucket at level allows cost under rule, and if
// not, how long until it would.
func allows(level float64, rule Rule, cost float64) (bool, time.Duration) {
	if rule.Debt {
		if level > 0 {
			return true, 0
		}
		// Until the level is above zero again (one nanosecond past).
		return false, secondsToDuration(-level/rule.Rate) + time.Nanosecond
	}
	need := math.Min(cost, rule.Burst)
	if level >= need {
		return true, 0
	}
	return false, secondsToDuration((need - level) / rule.Rate)
}

// secondsToDuration converts seconds to a Duration, rounding up and
// saturating.
func secondsToDuration(s float64) time.Duration {
	ns := math.Ceil(s * 1e9)
	if ns >= math.MaxInt64 {
		return time.Duration(math.MaxInt64)
	}
	return time.Duration(ns)
}
