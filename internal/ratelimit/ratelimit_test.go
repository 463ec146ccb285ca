package ratelimit

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testredis"
)

var t0 = time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)

// step is one Take (or clock advance) of a table test.
type step struct {
	advance time.Duration
	cost    float64
	buckets []Bucket
	// costs, when set, are the buckets' own costs (instead of cost).
	costs   []float64
	allowed bool
	refused int
	// retry is the expected RetryAfter, within a millisecond.
	retry time.Duration
}

var (
	perSecond3 = Rule{Rate: 1, Burst: 3}
	bytes100   = Rule{Rate: 10, Burst: 100, Debt: true}
)

func b(key string, r Rule) []Bucket { return []Bucket{{Key: key, Rule: r}} }

// manyBuckets returns n request buckets prefix0, prefix1...
func manyBuckets(prefix string, n int) []Bucket {
	bs := make([]Bucket, n)
	for i := range bs {
		bs[i] = Bucket{Key: prefix + strconv.Itoa(i), Rule: perSecond3}
	}
	return bs
}

// forced marks every bucket Force.
func forced(bs []Bucket) []Bucket {
	out := make([]Bucket, len(bs))
	for i, b := range bs {
		b.Force = true
		out[i] = b
	}
	return out
}

// withCost sets the cost of every bucket.
func withCost(bs []Bucket, cost float64) []Bucket {
	out := make([]Bucket, len(bs))
	for i, b := range bs {
		b.Cost = cost
		out[i] = b
	}
	return out
}

var limiterCases = []struct {
	name  string
	steps []step
}{
	{"request rule: burst, then refill", []step{
		{cost: 1, buckets: b("a", perSecond3), allowed: true},
		{cost: 1, buckets: b("a", perSecond3), allowed: true},
		{cost: 1, buckets: b("a", perSecond3), allowed: true},
		{cost: 1, buckets: b("a", perSecond3), refused: 0, retry: time.Second},
		{advance: 500 * time.Millisecond, cost: 1, buckets: b("a", perSecond3), refused: 0, retry: 500 * time.Millisecond},
		{advance: 500 * time.Millisecond, cost: 1, buckets: b("a", perSecond3), allowed: true},
		{cost: 1, buckets: b("a", perSecond3), refused: 0, retry: time.Second},
		{cost: 1, buckets: b("other", perSecond3), allowed: true},
		// Refilled to the burst, never beyond.
		{advance: time.Hour, cost: 3, buckets: b("a", perSecond3), allowed: true},
		{cost: 1, buckets: b("a", perSecond3), refused: 0, retry: time.Second},
	}},
	{"volume rule: debt lets one large cost through", []step{
		{cost: 500, buckets: b("v", bytes100), allowed: true},
		// Level -400: 40 s until positive again.
		{cost: 1, buckets: b("v", bytes100), refused: 0, retry: 40 * time.Second},
		{cost: 0, buckets: b("v", bytes100), refused: 0, retry: 40 * time.Second},
		{advance: 39 * time.Second, cost: 0, buckets: b("v", bytes100), refused: 0, retry: time.Second},
		{advance: 1001 * time.Millisecond, cost: 0, buckets: b("v", bytes100), allowed: true},
		{cost: 1, buckets: b("v", bytes100), allowed: true},
		// Level 0.01 - 1: 99 ms until positive.
		{cost: 0, buckets: b("v", bytes100), refused: 0, retry: 99 * time.Millisecond},
	}},
	{"a forced charge is never refused and always taken", []step{
		{cost: 3, buckets: b("f", perSecond3), allowed: true},
		// Empty, yet the forced charges are taken: the level goes to -2.
		{cost: 1, buckets: forced(b("f", perSecond3)), allowed: true},
		{cost: 1, buckets: forced(b("f", perSecond3)), allowed: true},
		// 3 s until a whole token again.
		{cost: 1, buckets: b("f", perSecond3), refused: 0, retry: 3 * time.Second},
		{advance: 3 * time.Second, cost: 1, buckets: b("f", perSecond3), allowed: true},
		// A forced bucket does not refuse the other buckets of its Take.
		{cost: 500, buckets: append(forced(b("v2", bytes100)), b("f2", perSecond3)...), allowed: true},
		{cost: 1, buckets: b("v2", bytes100), refused: 0, retry: 40 * time.Second},
	}},
	{"a peek charges nothing", []step{
		{cost: 0, buckets: b("p", perSecond3), allowed: true},
		{cost: 3, buckets: b("p", perSecond3), allowed: true},
		// A request rule needs min(cost, burst): zero is always there.
		{cost: 0, buckets: b("p", perSecond3), allowed: true},
		{cost: 0, buckets: b("p2", bytes100), allowed: true},
		{cost: 100, buckets: b("p2", bytes100), allowed: true},
		{cost: 0, buckets: b("p2", bytes100), refused: 0, retry: 0},
	}},
	{"several buckets: all or nothing", []step{
		{cost: 3, buckets: b("user", perSecond3), allowed: true},
		{cost: 1, buckets: []Bucket{{Key: "ip", Rule: perSecond3}, {Key: "user", Rule: perSecond3}}, refused: 1, retry: time.Second},
		// The IP bucket was not charged by the refusal.
		{cost: 3, buckets: b("ip", perSecond3), allowed: true},
		{advance: 2 * time.Second, cost: 1, buckets: []Bucket{{Key: "ip", Rule: perSecond3}, {Key: "user", Rule: perSecond3}}, allowed: true},
		{cost: 1, buckets: []Bucket{{Key: "ip", Rule: perSecond3}, {Key: "user", Rule: perSecond3}}, allowed: true},
		{cost: 1, buckets: []Bucket{{Key: "ip", Rule: perSecond3}, {Key: "user", Rule: perSecond3}}, refused: 0, retry: time.Second},
	}},
	{"a request and its bytes in one call", []step{
		{buckets: []Bucket{{Key: "n", Rule: perSecond3}, {Key: "bytes", Rule: bytes100}}, costs: []float64{1, 250}, allowed: true},
		// Bytes in debt: refused, and the request bucket not charged.
		{buckets: []Bucket{{Key: "n", Rule: perSecond3}, {Key: "bytes", Rule: bytes100}}, costs: []float64{1, 0}, refused: 1, retry: 15 * time.Second},
		{cost: 2, buckets: b("n", perSecond3), allowed: true},
		{cost: 1, buckets: b("n", perSecond3), refused: 0, retry: time.Second},
	}},
	{"more buckets than a Take tracks on the stack: every one decided and charged", []step{
		{cost: 3, buckets: manyBuckets("k", stackBuckets+2), allowed: true},
		{cost: 1, buckets: b("k"+strconv.Itoa(stackBuckets+1), perSecond3), refused: 0, retry: time.Second},
		// The last bucket refuses; none of the others is charged.
		{cost: 1, buckets: append(manyBuckets("x", stackBuckets+1), b("k"+strconv.Itoa(stackBuckets+1), perSecond3)...), refused: stackBuckets + 1, retry: time.Second},
		{cost: 3, buckets: manyBuckets("x", stackBuckets+1), allowed: true},
	}},
	{"a cost above a request rule's burst needs a full bucket and is charged whole", []step{
		{cost: 10, buckets: b("big", perSecond3), allowed: true},
		// Level -7 + 3: 7 s until the burst (3) is back.
		{advance: 3 * time.Second, cost: 10, buckets: b("big", perSecond3), refused: 0, retry: 7 * time.Second},
		{advance: 10 * time.Second, cost: 10, buckets: b("big", perSecond3), allowed: true},
	}},
}

// runCases runs every case on a fresh limiter from mk.
func runCases(t *testing.T, mk func(t *testing.T, clock *testclock.Clock) Limiter) {
	for _, tc := range limiterCases {
		t.Run(tc.name, func(t *testing.T) {
			clock := testclock.New(t0)
			l := mk(t, clock)
			for i, s := range tc.steps {
				clock.Advance(s.advance)
				bs := withCost(s.buckets, s.cost)
				for j, c := range s.costs {
					bs[j].Cost = c
				}
				d := l.Take(context.Background(), bs...)
				if d.Allowed != s.allowed {
					t.Fatalf("step %d: Allowed = %v, want %v (%+v)", i, d.Allowed, s.allowed, d)
				}
				if s.allowed {
					continue
				}
				if d.Refused != s.refused {
					t.Errorf("step %d: Refused = %d, want %d", i, d.Refused, s.refused)
				}
				if diff := d.RetryAfter - s.retry; diff < -time.Millisecond || diff > time.Millisecond {
					t.Errorf("step %d: RetryAfter = %s, want %s", i, d.RetryAfter, s.retry)
				}
			}
		})
	}
}

func TestMemory(t *testing.T) {
	runCases(t, func(t *testing.T, c *testclock.Clock) Limiter {
		return NewMemory(MemoryOptions{Max: 1000, Now: c.Now})
	})
}

func TestRedis(t *testing.T) {
	srv := testredis.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { client.Close() })
	n := 0
	runCases(t, func(t *testing.T, c *testclock.Clock) Limiter {
		n++
		var failed atomic.Int64
		t.Cleanup(func() {
			if failed.Load() != 0 {
				t.Errorf("%d decisions failed open", failed.Load())
			}
		})
		return NewRedis(client, RedisOptions{Prefix: fmt.Sprintf("case%d:", n), Now: c.Now,
			OnFailOpen: func(error) { failed.Add(1) }})
	})
}

func TestRuleValid(t *testing.T) {
	for _, tc := range []struct {
		r  Rule
		ok bool
	}{
		{Rule{Rate: 1, Burst: 1}, true},
		{Rule{Rate: 0.001, Burst: 0.5, Debt: true}, true},
		{Rule{Rate: 0, Burst: 1}, false},
		{Rule{Rate: -1, Burst: 1}, false},
		{Rule{Rate: 1, Burst: 0}, false},
		{Rule{Rate: 1, Burst: 0.5}, false},
	} {
		if err := tc.r.Valid(); (err == nil) != tc.ok {
			t.Errorf("%+v.Valid() = %v, want ok %v", tc.r, err, tc.ok)
		}
	}
}

// TestMemoryExpiresFullBuckets checks that a bucket found full again is
// forgotten, and that peeks and full buckets store nothing.
func TestMemoryExpiresFullBuckets(t *testing.T) {
	clock := testclock.New(t0)
	l := NewMemory(MemoryOptions{Max: 1600, Now: clock.Now})
	ctx := context.Background()
	l.Take(ctx, withCost(b("peek", perSecond3), 0)...)
	if l.Len() != 0 {
		t.Fatalf("a peek stored a bucket: Len = %d", l.Len())
	}
	l.Take(ctx, withCost(b("k", perSecond3), 2)...)
	if l.Len() != 1 {
		t.Fatalf("Len = %d after a take, want 1", l.Len())
	}
	clock.Advance(2 * time.Second)
	// Refilled: a peek finds it full and drops it.
	if d := l.Take(ctx, withCost(b("k", perSecond3), 0)...); !d.Allowed || l.Len() != 0 {
		t.Fatalf("refilled bucket: %+v, Len %d", d, l.Len())
	}
	if d := l.Take(ctx, withCost(b("k", perSecond3), 3)...); !d.Allowed {
		t.Fatalf("bucket not refilled after 2s: %+v", d)
	}
}

// TestMemoryFlood floods a limiter with a million distinct keys: it never
// holds more than Max buckets, and the heap stays bounded.
func TestMemoryFlood(t *testing.T) {
	const maxKeys, keys = 10000, 1000000
	clock := testclock.New(t0)
	l := NewMemory(MemoryOptions{Max: maxKeys, Now: clock.Now})
	ctx := context.Background()
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	var peak uint64
	rule := Rule{Rate: 0.001, Burst: 5}
	for i := range keys {
		l.Take(ctx, Bucket{Key: "ip:" + strconv.Itoa(i), Rule: rule, Cost: 1})
		if i%100000 == 99999 {
			if n := l.Len(); n > l.Max() {
				t.Fatalf("after %d keys: %d buckets, more than Max %d", i+1, n, l.Max())
			}
			peak = max(peak, heap())
		}
	}
	if l.Len() > maxKeys {
		t.Fatalf("%d buckets, want at most %d", l.Len(), maxKeys)
	}
	after := heap()
	t.Logf("1e6 distinct keys, Max %d: %d buckets held; heap %d KiB before, %d KiB after, peak %d KiB (%.0f bytes per bucket)",
		maxKeys, l.Len(), before>>10, after>>10, peak>>10, float64(after-before)/float64(l.Len()))
	// Generous: a bucket is about 200 bytes; a leak of a million keys
	// would be far above this.
	if after > before+uint64(maxKeys)*1000 {
		t.Errorf("heap grew by %d bytes for %d buckets", after-before, maxKeys)
	}
	// The most recent keys are still limited, the oldest were forgotten.
	if d := l.Take(ctx, Bucket{Key: "ip:" + strconv.Itoa(keys-1), Rule: rule, Cost: 5}); d.Allowed {
		t.Error("the most recent key's bucket was forgotten")
	}
	if d := l.Take(ctx, Bucket{Key: "ip:0", Rule: rule, Cost: 5}); !d.Allowed {
		t.Error("the oldest key's bucket was kept")
	}
}

// TestMemoryConcurrent takes from one bucket from many goroutines: exactly
// the burst is allowed.
func TestMemoryConcurrent(t *testing.T) {
	clock := testclock.New(t0)
	takeConcurrently(t, NewMemory(MemoryOptions{Now: clock.Now}), 8, 50)
}

// takeConcurrently has workers goroutines take each times from two buckets
// of burst 100 (two keys per Take) and checks that exactly the burst was
// allowed.
func takeConcurrently(t *testing.T, l Limiter, workers, each int) {
	t.Helper()
	rule := Rule{Rate: 1e-6, Burst: 100}
	var allowed atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range each {
				if l.Take(context.Background(), Bucket{Key: "x", Rule: rule, Cost: 1}, Bucket{Key: "y", Rule: rule, Cost: 1}).Allowed {
					allowed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if allowed.Load() != 100 {
		t.Fatalf("%d allowed, want exactly the burst 100", allowed.Load())
	}
}

// TestRedisShared checks that two limiters (two instances) on one Redis
// share their buckets, that keys expire when full again, that a stopped
// Redis fails open (counted) and that a restarted one is shared again.
func TestRedisShared(t *testing.T) {
	srv := testredis.Start(t)
	newClient := func() *redis.Client {
		c := redis.NewClient(&redis.Options{Addr: srv.Addr(), MaxRetries: -1})
		t.Cleanup(func() { c.Close() })
		return c
	}
	var failA, failB atomic.Int64
	a := NewRedis(newClient(), RedisOptions{RetryInterval: 20 * time.Millisecond, OnFailOpen: func(error) { failA.Add(1) }})
	bl := NewRedis(newClient(), RedisOptions{RetryInterval: 20 * time.Millisecond, OnFailOpen: func(error) { failB.Add(1) }})
	ctx := context.Background()
	rule := Rule{Rate: 0.01, Burst: 3}
	bk := Bucket{Key: "ip:192.0.2.1", Rule: rule, Cost: 1}
	peek := Bucket{Key: bk.Key, Rule: rule}
	for i := range 3 {
		if !a.Take(ctx, bk).Allowed {
			t.Fatalf("take %d through A refused", i+1)
		}
	}
	d := bl.Take(ctx, bk)
	if d.Allowed {
		t.Fatal("B allowed a request of a bucket A emptied")
	}
	if d.RetryAfter < 99*time.Second || d.RetryAfter > 101*time.Second {
		t.Errorf("RetryAfter = %s, want about 100s", d.RetryAfter)
	}
	// The key expires when the bucket would be full: 300 s.
	pttl, err := newClient().PTTL(ctx, DefaultRedisPrefix+bk.Key).Result()
	if err != nil || pttl < 290*time.Second || pttl > 301*time.Second {
		t.Errorf("PTTL = %s, %v; want about 300s", pttl, err)
	}
	if failA.Load()+failB.Load() != 0 {
		t.Fatalf("fail-opens while Redis was up: %d, %d", failA.Load(), failB.Load())
	}

	srv.Stop()
	for i := range 5 {
		if !a.Take(ctx, bk).Allowed {
			t.Fatalf("take %d with Redis stopped refused: must fail open", i+1)
		}
	}
	if failA.Load() != 5 {
		t.Errorf("fail-opens counted: %d, want 5", failA.Load())
	}

	srv.Restart(t)
	// Redis is asked again after RetryInterval, and the clients reconnect.
	deadline := time.Now().Add(10 * time.Second)
	for {
		before := failA.Load()
		a.Take(ctx, peek)
		if failA.Load() == before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("A did not reach the restarted Redis")
		}
		time.Sleep(25 * time.Millisecond)
	}
	for i := range 3 {
		if !a.Take(ctx, bk).Allowed {
			t.Fatalf("take %d after restart refused (the restarted server is empty)", i+1)
		}
	}
	for time.Now().Before(deadline) {
		before := failB.Load()
		d = bl.Take(ctx, bk)
		if failB.Load() == before {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	if d.Allowed {
		t.Fatal("after the restart, B allowed a request of a bucket A emptied")
	}
}

func BenchmarkTake(b *testing.B) {
	rule := Rule{Rate: 1e9, Burst: 1e9}
	run := func(b *testing.B, l Limiter) {
		keys := make([]string, 1024)
		for i := range keys {
			keys[i] = "ip:198.51.100." + strconv.Itoa(i)
		}
		ctx := context.Background()
		b.ReportAllocs()
		b.ResetTimer()
		i := 0
		for b.Loop() {
			if !l.Take(ctx, Bucket{Key: keys[i&1023], Rule: rule, Cost: 1}).Allowed {
				b.Fatal("refused")
			}
			i++
		}
	}
	b.Run("memory", func(b *testing.B) { run(b, NewMemory(MemoryOptions{})) })
	b.Run("memory_parallel", func(b *testing.B) {
		l := NewMemory(MemoryOptions{})
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				l.Take(context.Background(), Bucket{Key: "k" + strconv.Itoa(i&255), Rule: rule, Cost: 1})
				i++
			}
		})
	})
	b.Run("redis", func(b *testing.B) {
		srv := testredis.Start(b)
		c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
		b.Cleanup(func() { c.Close() })
		var failed atomic.Int64
		run(b, NewRedis(c, RedisOptions{OnFailOpen: func(error) { failed.Add(1) }}))
		if failed.Load() != 0 {
			b.Fatalf("%d fail-opens", failed.Load())
		}
	})
	// 32 concurrent callers, as under load: their Takes share round trips.
	b.Run("redis_parallel", func(b *testing.B) {
		srv := testredis.Start(b)
		c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
		b.Cleanup(func() { c.Close() })
		var failed atomic.Int64
		l := NewRedis(c, RedisOptions{OnFailOpen: func(error) { failed.Add(1) }})
		b.ReportAllocs()
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				if !l.Take(context.Background(), Bucket{Key: "k" + strconv.Itoa(i&255), Rule: rule, Cost: 1}).Allowed {
					b.Error("refused")
				}
				i++
			}
		})
		if failed.Load() != 0 {
			b.Fatalf("%d fail-opens", failed.Load())
		}
	})
}

// holdHook holds the first single command (the first Take's round trip)
// until release is closed, and records the size of every pipeline of
// scripts (not the client's own connection set-up).
type holdHook struct {
	once      sync.Once
	release   chan struct{}
	pipelines chan int
}

func (h *holdHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *holdHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.once.Do(func() { <-h.release })
		return next(ctx, cmd)
	}
}

func (h *holdHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if len(cmds) > 0 && cmds[0].Name() == "evalsha" {
			h.pipelines <- len(cmds)
		}
		return next(ctx, cmds)
	}
}

// TestRedisBatches checks that Takes arriving during a round trip go out
// together in the next one, each decided as if alone.
func TestRedisBatches(t *testing.T) {
	srv := testredis.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { client.Close() })
	hook := &holdHook{release: make(chan struct{}), pipelines: make(chan int, 16)}
	client.AddHook(hook)
	l := NewRedis(client, RedisOptions{OnFailOpen: func(err error) { t.Errorf("failed open: %v", err) }})
	rule := Rule{Rate: 1e-6, Burst: 11}
	take := func() bool {
		return l.Take(context.Background(), Bucket{Key: "batch", Rule: rule, Cost: 1}).Allowed
	}
	var allowed atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		if take() {
			allowed.Add(1)
		}
	})
	// Wait until the first Take is in flight, then queue ten more.
	waitFor(t, func() bool { l.mu.Lock(); defer l.mu.Unlock(); return l.flushing })
	for range 10 {
		wg.Go(func() {
			if take() {
				allowed.Add(1)
			}
		})
	}
	waitFor(t, func() bool { l.mu.Lock(); defer l.mu.Unlock(); return len(l.queue) == 10 })
	close(hook.release)
	wg.Wait()
	if got := <-hook.pipelines; got != 10 {
		t.Fatalf("the queued Takes went out in a pipeline of %d commands, want 10", got)
	}
	if allowed.Load() != 11 {
		t.Fatalf("%d allowed, want 11 (the burst)", allowed.Load())
	}
	if take() {
		t.Fatal("a 12th Take was allowed past the burst")
	}
	// The server forgot the script: a batch falls back to EVAL.
	if err := client.ScriptFlush(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	var refused atomic.Int64
	for range 8 {
		wg.Go(func() {
			if !take() {
				refused.Add(1)
			}
		})
	}
	wg.Wait()
	if refused.Load() != 8 {
		t.Fatalf("%d of 8 refused after SCRIPT FLUSH, want 8 (and no fail-open)", refused.Load())
	}
}

// TestRedisConcurrent checks that concurrent Takes on one Redis, batched,
// allow exactly the burst.
func TestRedisConcurrent(t *testing.T) {
	srv := testredis.Start(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { client.Close() })
	takeConcurrently(t, NewRedis(client, RedisOptions{OnFailOpen: func(err error) { t.Errorf("failed open: %v", err) }}), 16, 20)
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10 s")
		}
		time.Sleep(time.Millisecond)
	}
}
