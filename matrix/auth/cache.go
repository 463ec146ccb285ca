package auth

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Defaults of CacheOptions.
const (
	// DefaultTokenCacheSize is the default CacheOptions.MaxEntries.
	DefaultTokenCacheSize = 100000
	// DefaultTokenTTL is the default CacheOptions.TTL.
	DefaultTokenTTL = 5 * time.Minute
	// DefaultNegativeTokenTTL is the default CacheOptions.NegativeTTL.
	DefaultNegativeTokenTTL = 30 * time.Second
)

// CacheOptions configure a TokenCache.
type CacheOptions struct {
	// MaxEntries bounds the number of cached tokens (valid and invalid
	// together); the least recently used entry is evicted beyond it.
	// Default DefaultTokenCacheSize (100000, roughly 20 MB).
	MaxEntries int
	// TTL is how long a valid token is trusted without asking the homeserver
	// again. It is also the longest a token revoked behind the cache's back
	// (logged out directly at the homeserver, not through a site) keeps
	// working for media. Default DefaultTokenTTL (5m).
	TTL time.Duration
	// NegativeTTL is how long a token the homeserver rejected is rejected
	// without asking again. Default DefaultNegativeTokenTTL (30s).
	NegativeTTL time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Metrics receives cache and homeserver metrics. Default: none.
	Metrics *Metrics
	// Logger logs invalidations and homeserver failures. Default: no logs.
	Logger *zap.Logger
}

// cacheKey identifies one token of one homeserver.
type cacheKey struct {
	homeserver string
	token      TokenHash
}

// userKey identifies one user of one homeserver.
type userKey struct {
	homeserver string
	userID     string
}

// cacheEntry is one cached answer: a user (valid) or a rejection.
type cacheEntry struct {
	key     cacheKey
	user    User
	valid   bool
	expires time.Time
}

// flight is one homeserver check that concurrent callers for the same token
// wait on.
type flight struct {
	done chan struct{}
	user User
	err  error
}

// TokenCache caches homeserver answers about access tokens: valid tokens for
// TTL, rejected ones for NegativeTTL, at most MaxEntries in all, least recently
// used evicted first. It is shared by every site (entries are namespaced by
// homeserver), concurrent checks of one token make a single homeserver call,
// and it keeps a circuit breaker per homeserver.
//
// Its LRU list is its own rather than an internal/capped.Map (the module's
// bounded-cache type): every entry that enters or leaves it (eviction and
// replacement included) also updates the per-user index used by
// Invalidate, under the same lock as the in-flight checks and the
// invalidation epoch. A capped.Map has a lock of its own, so the hit path
// (219 ns, one allocation, measured by BenchmarkTokenCacheHit) would take
// two locks and the index would be kept consistent through callbacks run
// under the inner one.
//
// Tokens are held only as TokenHash. Invalidate drops tokens (after a logout)
// and hands the invalidation to the Publisher, if any, so that other instances
// drop them too; Apply takes invalidations from such instances.
type TokenCache struct {
	maxEntries  int
	ttl         atomic.Int64 // time.Duration
	negativeTTL atomic.Int64 // time.Duration
	now         func() time.Time
	metrics     *Metrics
	logger      *zap.Logger
	publisher   atomic.Pointer[publisherBox]

	mu      sync.Mutex
	lru     *list.List // of *cacheEntry, most recent first
	entries map[cacheKey]*list.Element
	byUser  map[userKey]map[TokenHash]struct{}
	flights map[cacheKey]*flight
	// epoch counts invalidations. A check that started before an
	// invalidation does not cache its answer, which may predate it.
	epoch    uint64
	breakers map[string]*Breaker
}

// publisherBox lets an interface value live in an atomic.Pointer.
type publisherBox struct{ p Publisher }

// NewTokenCache returns an empty cache.
func NewTokenCache(opts CacheOptions) (*TokenCache, error) {
	if opts.MaxEntries < 0 || opts.TTL < 0 || opts.NegativeTTL < 0 {
		return nil, errors.New("creating token cache: sizes and lifetimes must not be negative")
	}
	if opts.MaxEntries == 0 {
		opts.MaxEntries = DefaultTokenCacheSize
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	c := &TokenCache{
		maxEntries: opts.MaxEntries,
		now:        opts.Now,
		metrics:    opts.Metrics,
		logger:     opts.Logger,
		lru:        list.New(),
		entries:    make(map[cacheKey]*list.Element),
		byUser:     make(map[userKey]map[TokenHash]struct{}),
		flights:    make(map[cacheKey]*flight),
		breakers:   make(map[string]*Breaker),
	}
	c.SetTTLs(opts.TTL, opts.NegativeTTL)
	return c, nil
}

// SetTTLs changes the lifetimes of entries cached from now on (a config
// reload keeps the cache but may change them). Zero means the default.
func (c *TokenCache) SetTTLs(ttl, negativeTTL time.Duration) {
	if ttl <= 0 {
		ttl = DefaultTokenTTL
	}
	if negativeTTL <= 0 {
		negativeTTL = DefaultNegativeTokenTTL
	}
	c.ttl.Store(int64(ttl))
	c.negativeTTL.Store(int64(negativeTTL))
}

// SetPublisher sets where local invalidations are published (nil: nowhere).
func (c *TokenCache) SetPublisher(p Publisher) {
	if p == nil {
		c.publisher.Store(nil)
		return
	}
	c.publisher.Store(&publisherBox{p: p})
}

// Metrics returns the metrics the cache reports to (may be nil).
func (c *TokenCache) Metrics() *Metrics { return c.metrics }

// Len returns the number of cached entries.
func (c *TokenCache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

// Breaker returns the circuit breaker of homeserver, creating it with opts
// the first time. Later calls return the same breaker with its options
// updated, so its state survives config reloads.
func (c *TokenCache) Breaker(homeserver string, opts BreakerOptions) *Breaker {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, ok := c.breakers[homeserver]
	if !ok {
		if opts.Now == nil {
			opts.Now = c.now
		}
		b = NewBreaker(opts)
		c.breakers[homeserver] = b
		return b
	}
	b.setOptions(opts)
	return b
}

// Check returns the owner of token on homeserver, from the cache or by asking
// checker. Only answers are cached (a user, or ErrUnknownToken); homeserver
// failures are not, and are counted by the homeserver's breaker when breaker
// is not nil. A gate, when not nil, is asked before a new homeserver check
// is started (a refusal is a *FailedChecksError, and the homeserver is not
// asked) and told when the homeserver rejected the token; cached answers
// and checks already in flight do not involve it.
func (c *TokenCache) Check(ctx context.Context, homeserver string, token string, checker TokenChecker, breaker *Breaker, gate CheckGate) (User, error) {
	key := cacheKey{homeserver: homeserver, token: HashToken(token)}
	now := c.now()

	c.mu.Lock()
	if user, found, err := c.lookupLocked(key, now); found {
		c.mu.Unlock()
		c.metrics.hit(err == nil)
		return user, err
	}
	c.metrics.miss()
	f, waiting := c.flights[key]
	if !waiting && gate != nil {
		// Asked without the lock (the gate may be remote). Meanwhile
		// another caller may have checked the same token (its answer is
		// now cached) or started checking it (a flight), so both are
		// looked at again afterwards: the homeserver is asked at most
		// once per token however the callers interleave.
		c.mu.Unlock()
		if ok, retry := gate.AllowCheck(ctx); !ok {
			return User{}, &FailedChecksError{RetryAfter: retry}
		}
		c.mu.Lock()
		if user, found, err := c.lookupLocked(key, c.now()); found {
			c.mu.Unlock()
			return user, err
		}
		f, waiting = c.flights[key]
	}
	if !waiting {
		f = &flight{done: make(chan struct{})}
		c.flights[key] = f
		epoch := c.epoch
		c.mu.Unlock()
		go c.fly(ctx, key, token, epoch, f, checker, breaker, gate)
	} else {
		c.mu.Unlock()
	}
	select {
	case <-f.done:
		return f.user, f.err
	case <-ctx.Done():
		return User{}, fmt.Errorf("checking access token: %w: %w", ErrHomeserverTimeout, ctx.Err())
	}
}

// lookupLocked returns the cached answer about key, if one is still fresh
// at now (found): the user, or an error wrapping ErrUnknownToken. A stale entry is
// dropped. c.mu must be held.
func (c *TokenCache) lookupLocked(key cacheKey, now time.Time) (user User, found bool, err error) {
	el, ok := c.entries[key]
	if !ok {
		return User{}, false, nil
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.removeLocked(el)
		return User{}, false, nil
	}
	c.lru.MoveToFront(el)
	if !e.valid {
		return User{}, true, fmt.Errorf("checking access token: rejected by the homeserver (cached): %w", ErrUnknownToken)
	}
	return e.user, true, nil
}

// fly performs one homeserver check for every caller waiting on f. It runs
// detached from the first caller's cancellation (others may still wait); the
// checker's own timeout bounds it.
func (c *TokenCache) fly(ctx context.Context, key cacheKey, token string, epoch uint64, f *flight, checker TokenChecker, breaker *Breaker, gate CheckGate) {
	ctx = context.WithoutCancel(ctx)
	var (
		user User
		err  error
	)
	if breaker != nil {
		if err = breaker.Allow(); err != nil {
			c.metrics.whoamiRejected()
		}
	}
	if err == nil {
		start := c.now()
		user, err = checker.CheckToken(ctx, token)
		c.metrics.whoami(c.now().Sub(start), err)
		if breaker != nil {
			breaker.Record(err == nil || errors.Is(err, ErrUnknownToken))
		}
		if gate != nil && errors.Is(err, ErrUnknownToken) {
			gate.CheckFailed(ctx)
		}
	}
	f.user, f.err = user, err

	c.mu.Lock()
	delete(c.flights, key)
	if c.epoch == epoch {
		switch {
		case err == nil:
			c.insertLocked(key, user, true, c.now().Add(time.Duration(c.ttl.Load())))
		case errors.Is(err, ErrUnknownToken):
			c.insertLocked(key, User{}, false, c.now().Add(time.Duration(c.negativeTTL.Load())))
		}
	}
	c.mu.Unlock()
	close(f.done)
}

// insertLocked adds or replaces the entry of key and evicts beyond
// maxEntries. c.mu must be held.
func (c *TokenCache) insertLocked(key cacheKey, user User, valid bool, expires time.Time) {
	if el, ok := c.entries[key]; ok {
		c.removeLocked(el)
	}
	e := &cacheEntry{key: key, user: user, valid: valid, expires: expires}
	c.entries[key] = c.lru.PushFront(e)
	if valid {
		uk := userKey{homeserver: key.homeserver, userID: user.UserID}
		set := c.byUser[uk]
		if set == nil {
			set = make(map[TokenHash]struct{}, 1)
			c.byUser[uk] = set
		}
		set[key.token] = struct{}{}
	}
	for c.lru.Len() > c.maxEntries {
		c.removeLocked(c.lru.Back())
		c.metrics.evicted()
	}
	c.metrics.setEntries(c.lru.Len())
}

// removeLocked drops one entry. c.mu must be held.
func (c *TokenCache) removeLocked(el *list.Element) {
	e := c.lru.Remove(el).(*cacheEntry)
	delete(c.entries, e.key)
	if e.valid {
		uk := userKey{homeserver: e.key.homeserver, userID: e.user.UserID}
		if set := c.byUser[uk]; set != nil {
			delete(set, e.key.token)
			if len(set) == 0 {
				delete(c.byUser, uk)
			}
		}
	}
	c.metrics.setEntries(c.lru.Len())
}

// Invalidate applies inv locally, then publishes it to other instances. It is
// called after the homeserver confirmed a logout.
func (c *TokenCache) Invalidate(ctx context.Context, inv Invalidation) {
	c.apply(inv, "local")
	if box := c.publisher.Load(); box != nil {
		if err := box.p.Publish(ctx, inv); err != nil {
			c.logger.Warn("publishing token invalidation to other instances failed; they keep the token until it expires from their cache",
				zap.Error(err))
		}
	}
}

// Apply applies an invalidation received from another instance.
func (c *TokenCache) Apply(inv Invalidation) { c.apply(inv, "remote") }

// apply marks the named tokens as rejected (the homeserver has revoked them,
// so the next use needs no homeserver call), and makes checks in flight not
// cache their answers.
func (c *TokenCache) apply(inv Invalidation, source string) {
	kind := "token"
	expires := c.now().Add(time.Duration(c.negativeTTL.Load()))
	c.mu.Lock()
	c.epoch++
	if inv.UserID != "" {
		kind = "user"
		uk := userKey{homeserver: inv.Homeserver, userID: inv.UserID}
		tokens := make([]TokenHash, 0, len(c.byUser[uk]))
		for t := range c.byUser[uk] {
			tokens = append(tokens, t)
		}
		for _, t := range tokens {
			c.insertLocked(cacheKey{homeserver: inv.Homeserver, token: t}, User{}, false, expires)
		}
	}
	if inv.Token != (TokenHash{}) {
		c.insertLocked(cacheKey{homeserver: inv.Homeserver, token: inv.Token}, User{}, false, expires)
	}
	c.mu.Unlock()
	c.metrics.invalidated(kind, source)
}

// Purge drops every entry. It is used when invalidations may have been missed
// (the connection to the other instances was lost for a while).
func (c *TokenCache) Purge() {
	c.mu.Lock()
	c.epoch++
	n := c.lru.Len()
	c.lru.Init()
	clear(c.entries)
	clear(c.byUser)
	c.mu.Unlock()
	c.metrics.setEntries(0)
	c.metrics.invalidated("purge", "remote")
	c.logger.Info("token cache purged: invalidations from other instances may have been missed", zap.Int("entries", n))
}
