package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Defaults of RedisOptions.
const (
	// DefaultRedisPrefix is the default RedisOptions.Prefix.
	DefaultRedisPrefix = "caddy-matrix-media:ratelimit:"
	// DefaultRedisTimeout is the default RedisOptions.Timeout.
	DefaultRedisTimeout = 250 * time.Millisecond
	// DefaultRedisRetryInterval is the default RedisOptions.RetryInterval.
	DefaultRedisRetryInterval = time.Second
)

// ErrRedisDown is what RedisOptions.OnFailOpen receives for decisions taken
// without asking Redis, during RetryInterval after a failure.
var ErrRedisDown = errors.New("redis was unreachable moments ago")

// RedisOptions configure a Redis limiter.
type RedisOptions struct {
	// Prefix starts every key, so that several applications can share one
	// Redis database. Default DefaultRedisPrefix.
	Prefix string
	// Timeout bounds one Take's round trip. Default 250ms.
	Timeout time.Duration
	// RetryInterval is how long, after a failed round trip, decisions are
	// taken without asking Redis (failing open at once instead of waiting
	// for a dead server on every request). The client reconnects on the
	// next attempt after it. Default 1s.
	RetryInterval time.Duration
	// Now is the clock. Default: Redis's own clock (TIME, read in the
	// script), so that instances with skewed clocks agree.
	Now func() time.Time
	// OnFailOpen is called for every decision taken without Redis (the
	// request was allowed), with the error. Default: nothing.
	OnFailOpen func(err error)
	// Logger receives one warning when Redis becomes unreachable and one
	// notice when it answers again. Default: no logs.
	Logger *zap.Logger
}

// RedisClient is what the Redis limiter needs of a client: scripts, and
// pipelines for batching (a *redis.Client or *redis.ClusterClient).
type RedisClient interface {
	redis.Scripter
	Pipeline() redis.Pipeliner
}

// Redis is a Limiter keeping its buckets in Redis, shared by every process
// that uses the same server and prefix. Each Take is one script run: a Lua
// script (EVALSHA; EVAL once after the server lost its script cache) that
// refills, decides and charges every bucket of the call atomically.
//
// Takes are batched: a Take that arrives while another round trip is in
// flight waits for it and then goes out with every other Take that queued
// meanwhile, as one pipeline (one write and one read for the batch), led by
// the first of them. Each Take is still its own script run, so its
// decision is exactly what it would be alone; under load the round trips
// (and their system calls on both sides) are shared, and no Take ever
// waits for more than the round trip in flight plus its own. A
// bucket is a hash {l: level, t: time in microseconds} whose expiry is the
// time it takes to be full again, so idle keys vanish on their own.
//
// When Redis cannot be reached, Take allows (fails open) and reports it to
// OnFailOpen. The keys of one call must be in one hash slot for Redis
// Cluster; plain servers and replicas work as they are.
type Redis struct {
	client  RedisClient
	prefix  string
	timeout time.Duration
	retry   time.Duration
	now     func() time.Time
	onFail  func(error)
	log     *zap.Logger

	// downUntil is when (Unix nanoseconds, by the local clock) Redis is
	// next asked after a failure; down is true between a failure and the
	// next success.
	downUntil atomic.Int64
	down      atomic.Bool

	// mu guards queue and flushing: the Takes waiting for the next round
	// trip, and whether one is in flight (or being handed over).
	mu       sync.Mutex
	queue    []*pendingTake
	flushing bool
}

// pendingTake is one Take's script run in a batch.
type pendingTake struct {
	keys []string
	args []any
	res  []any
	err  error
	// wake tells a queued Take that its result is in (false) or that it
	// leads the next round trip (true).
	wake chan bool
}

// takeScript refills, decides and charges. KEYS are the buckets; ARGV[1] is
// the time in microseconds (negative: the server's clock), then rate,
// burst, debt (0 or 1) and cost for each key. It answers
// {allowed, refused index (0-based, -1), wait in seconds as a string}.
var takeScript = redis.NewScript(`
local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local levels = {}
local refused = -1
local wait = 0
for i = 1, #KEYS do
  local rate = tonumber(ARGV[4*i-2])
  local burst = tonumber(ARGV[4*i-1])
  local debt = ARGV[4*i] == '1'
  local force = ARGV[4*i] == '2'
  local cost = tonumber(ARGV[4*i+1])
  local v = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = burst
  if v[1] and v[2] then
    local el = (now - tonumber(v[2])) / 1e6
    if el < 0 then el = 0 end
    level = math.min(burst, tonumber(v[1]) + el * rate)
  end
  levels[i] = level
  local w = -1
  if force then
    w = -1
  elseif debt then
    if level <= 0 then w = -level / rate end
  else
    local need = math.min(cost, burst)
    if level < need then w = (need - level) / rate end
  end
  if w >= 0 then
    if refused < 0 then refused = i - 1 end
    if w > wait then wait = w end
  end
end
if refused >= 0 then
  return {0, refused, tostring(wait)}
end
for i = 1, #KEYS do
  local rate = tonumber(ARGV[4*i-2])
  local burst = tonumber(ARGV[4*i-1])
  local cost = tonumber(ARGV[4*i+1])
  if cost > 0 then
    local level = levels[i] - cost
    if level >= burst then
      redis.call('DEL', KEYS[i])
    else
      redis.call('HSET', KEYS[i], 'l', tostring(level), 't', tostring(now))
      redis.call('PEXPIRE', KEYS[i], math.ceil((burst - level) / rate * 1000) + 1)
    end
  end
end
return {1, -1, '0'}
`)

// NewRedis returns a limiter on client (a *redis.Client, shared with other
// users of the same server; the limiter does not close it).
func NewRedis(client RedisClient, opts RedisOptions) *Redis {
	l := &Redis{
		client:  client,
		prefix:  opts.Prefix,
		timeout: opts.Timeout,
		retry:   opts.RetryInterval,
		now:     opts.Now,
		onFail:  opts.OnFailOpen,
		log:     opts.Logger,
	}
	if l.prefix == "" {
		l.prefix = DefaultRedisPrefix
	}
	if l.timeout <= 0 {
		l.timeout = DefaultRedisTimeout
	}
	if l.retry <= 0 {
		l.retry = DefaultRedisRetryInterval
	}
	if l.log == nil {
		l.log = zap.NewNop()
	}
	return l
}

// Take implements Limiter. It fails open: when Redis does not answer (or
// failed less than RetryInterval ago) the request is allowed.
func (l *Redis) Take(ctx context.Context, buckets ...Bucket) Decision {
	allowed := Decision{Allowed: true, Refused: -1}
	if len(buckets) == 0 {
		return allowed
	}
	if time.Now().UnixNano() < l.downUntil.Load() {
		l.failOpen(ErrRedisDown)
		return allowed
	}
	d, err := l.take(ctx, buckets)
	if err != nil {
		if ctx.Err() == nil {
			// A client that went away is not Redis's fault.
			l.downUntil.Store(time.Now().Add(l.retry).UnixNano())
			if !l.down.Swap(true) {
				l.log.Warn("redis unreachable: rate limits fail open (requests are allowed) until it answers again", zap.Error(err))
			}
		}
		l.failOpen(err)
		return allowed
	}
	if l.down.Swap(false) {
		l.log.Info("redis reachable again: rate limits shared again")
	}
	return d
}

// failOpen reports a decision taken without Redis.
func (l *Redis) failOpen(err error) {
	if l.onFail != nil {
		l.onFail(err)
	}
}

// run runs the script for keys and args in the next round trip (see
// Redis) and returns its answer. The round trip is bounded by the
// limiter's timeout, not by ctx: a batch carries other callers' Takes.
func (l *Redis) run(keys []string, args []any) ([]any, error) {
	p := &pendingTake{keys: keys, args: args}
	l.mu.Lock()
	if l.flushing {
		p.wake = make(chan bool, 1)
		l.queue = append(l.queue, p)
		l.mu.Unlock()
		if lead := <-p.wake; !lead {
			return p.res, p.err
		}
		l.mu.Lock() // this Take leads: it is first in the queue
	} else {
		l.flushing = true
		l.queue = append(l.queue, p)
	}
	batch := l.queue
	l.queue = nil
	l.mu.Unlock()

	l.flush(batch)
	for _, q := range batch {
		if q != p {
			q.wake <- false
		}
	}
	l.mu.Lock()
	if len(l.queue) > 0 {
		next := l.queue[0]
		l.mu.Unlock()
		next.wake <- true
	} else {
		l.flushing = false
		l.mu.Unlock()
	}
	return p.res, p.err
}

// flush runs the script for every Take of batch in one round trip (a
// pipeline of EVALSHA; a single Take runs alone), then again with EVAL for
// those the server had no script for.
func (l *Redis) flush(batch []*pendingTake) {
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	if len(batch) == 1 {
		p := batch[0]
		p.res, p.err = takeScript.Run(ctx, l.client, p.keys, p.args...).Slice()
		return
	}
	pipe := l.client.Pipeline()
	cmds := make([]*redis.Cmd, len(batch))
	for i, p := range batch {
		cmds[i] = takeScript.EvalSha(ctx, pipe, p.keys, p.args...)
	}
	_, _ = pipe.Exec(ctx) // errors are per command
	var missing []int
	for i, c := range cmds {
		batch[i].res, batch[i].err = c.Slice()
		if batch[i].err != nil && redis.HasErrorPrefix(batch[i].err, "NOSCRIPT") {
			missing = append(missing, i)
		}
	}
	if len(missing) == 0 {
		return
	}
	pipe = l.client.Pipeline()
	for _, i := range missing {
		cmds[i] = takeScript.Eval(ctx, pipe, batch[i].keys, batch[i].args...)
	}
	_, _ = pipe.Exec(ctx)
	for _, i := range missing {
		batch[i].res, batch[i].err = cmds[i].Slice()
	}
}

// take runs the script once for buckets.
func (l *Redis) take(ctx context.Context, buckets []Bucket) (Decision, error) {
	if err := ctx.Err(); err != nil {
		return Decision{}, err
	}
	keys := make([]string, len(buckets))
	args := make([]any, 0, 1+4*len(buckets))
	now := int64(-1)
	if l.now != nil {
		now = l.now().UnixMicro()
	}
	args = append(args, now)
	for i, b := range buckets {
		keys[i] = l.prefix + b.Key
		// The mode: "2" charges without a check (Force), "1" is a debt
		// rule, "0" a plain one.
		debt := "0"
		switch {
		case b.Force:
			debt = "2"
		case b.Rule.Debt:
			debt = "1"
		}
		args = append(args, strconv.FormatFloat(b.Rule.Rate, 'g', -1, 64), strconv.FormatFloat(b.Rule.Burst, 'g', -1, 64), debt,
			strconv.FormatFloat(b.Cost, 'g', -1, 64))
	}
	res, err := l.run(keys, args)
	if err != nil {
		return Decision{}, fmt.Errorf("rate limit script: %w", err)
	}
	if len(res) != 3 {
		return Decision{}, fmt.Errorf("rate limit script: unexpected answer %v", res)
	}
	ok, _ := res[0].(int64)
	refused, _ := res[1].(int64)
	ws, _ := res[2].(string)
	wait, err := strconv.ParseFloat(ws, 64)
	if err != nil {
		return Decision{}, fmt.Errorf("rate limit script: bad wait %q: %w", ws, err)
	}
	if ok == 1 {
		return Decision{Allowed: true, Refused: -1}, nil
	}
	if refused < 0 || int(refused) >= len(buckets) {
		return Decision{}, fmt.Errorf("rate limit script: refused bucket %d of %d", refused, len(buckets))
	}
	d := Decision{Refused: int(refused), RetryAfter: secondsToDuration(wait)}
	if d.RetryAfter <= 0 {
		d.RetryAfter = time.Nanosecond
	}
	if buckets[d.Refused].Rule.Debt {
		d.RetryAfter += time.Nanosecond
	}
	return d, nil
}

// Interface guard.
var _ Limiter = (*Redis)(nil)
