package caddymodule

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/ratelimit"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth/redisbus"

	"github.com/caddyserver/caddy/v2"
)

// authPool holds the token caches and Redis buses of every loaded config. Like
// resourcePool, a reload provisions the new config before cleaning up the old
// one, so an unchanged cache (same size) keeps every cached token, breaker
// state and metric value across reloads, and an unchanged Redis URL keeps its
// subscription.
var authPool = caddy.NewUsagePool()

// tokenCacheKey is the authPool key of a token cache of the given size.
func tokenCacheKey(size int) string { return "token-cache\x00" + strconv.Itoa(size) }

// busKey is the authPool key of a Redis bus feeding the cache under cacheKey.
// The URL may hold a password: keys are never logged.
func busKey(cacheKey, redisURL string) string { return "redis-bus\x00" + cacheKey + "\x00" + redisURL }

// pooledCache is a token cache in authPool.
type pooledCache struct {
	cache   *auth.TokenCache
	metrics *auth.Metrics
}

// Destruct implements caddy.Destructor; a cache holds nothing to close.
func (*pooledCache) Destruct() error { return nil }

// pooledBus is a Redis bus in authPool.
type pooledBus struct{ bus *redisbus.Bus }

// Destruct implements caddy.Destructor: it unsubscribes and disconnects.
func (b *pooledBus) Destruct() error { return b.bus.Close() }

// authState is what one App provision holds from authPool.
type authState struct {
	cache   *auth.TokenCache
	metrics *auth.Metrics
	// bus is the Redis bus, nil without redis.
	bus  *redisbus.Bus
	keys []string
	// limiter holds the rate-limit buckets (ratelimit.go).
	limiter ratelimit.Limiter
}

// acquireAuthState loads (or creates) the token cache and, when redisURL is
// set, the Redis bus that spreads invalidations between instances.
func acquireAuthState(ctx context.Context, size int, ttl, negativeTTL time.Duration, redisURL string, logger *zap.Logger) (*authState, error) {
	ck := tokenCacheKey(size)
	val, _, err := authPool.LoadOrNew(ck, func() (caddy.Destructor, error) {
		metrics := auth.NewMetrics()
		cache, err := auth.NewTokenCache(auth.CacheOptions{
			MaxEntries:  size,
			TTL:         ttl,
			NegativeTTL: negativeTTL,
			Metrics:     metrics,
			Logger:      logger,
		})
		if err != nil {
			return nil, err
		}
		return &pooledCache{cache: cache, metrics: metrics}, nil
	})
	if err != nil {
		return nil, fmt.Errorf("creating token cache: %w", err)
	}
	pc := val.(*pooledCache)
	pc.cache.SetTTLs(ttl, negativeTTL)
	st := &authState{cache: pc.cache, metrics: pc.metrics, keys: []string{ck}}
	if redisURL == "" {
		pc.cache.SetPublisher(nil)
		return st, nil
	}
	bk := busKey(ck, redisURL)
	val, _, err = authPool.LoadOrNew(bk, func() (caddy.Destructor, error) {
		dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		bus, err := redisbus.New(dialCtx, redisURL, redisbus.Options{Logger: logger},
			pc.cache.Apply, pc.cache.Purge)
		if err != nil {
			return nil, err
		}
		return &pooledBus{bus: bus}, nil
	})
	if err != nil {
		st.release()
		// The bus's errors never contain the URL.
		return nil, fmt.Errorf("connecting to redis: %w", err)
	}
	pc.cache.SetPublisher(val.(*pooledBus).bus)
	st.bus = val.(*pooledBus).bus
	st.keys = append(st.keys, bk)
	return st, nil
}

// release drops this provision's references; the last one closes the bus.
func (s *authState) release() error {
	var firstErr error
	for i := len(s.keys) - 1; i >= 0; i-- {
		if _, err := authPool.Delete(s.keys[i]); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	s.keys = nil
	return firstErr
}
