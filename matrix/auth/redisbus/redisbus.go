// Package redisbus spreads token-cache invalidations between instances over
// Redis pub/sub, so that every Caddy instance sharing one Redis drops a
// logged-out access token at once.
//
// Each Bus publishes auth.Invalidations on one channel and hands those
// published by other instances to a callback. Messages carry token hashes,
// never tokens. Pub/sub is fire-and-forget: messages sent while a subscriber
// is disconnected are lost, so after the subscription is re-established the
// Bus calls a resync callback and the caller should purge its whole cache.
package redisbus

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
)

// DefaultChannel is the pub/sub channel used when Options.Channel is empty.
const DefaultChannel = "caddy-matrix-media:auth-invalidations"

// publishTimeout caps how long Publish waits for Redis.
const publishTimeout = 2 * time.Second

// Backoff between failed attempts to receive (e.g. while Redis is down).
const (
	minRetryDelay = 50 * time.Millisecond
	maxRetryDelay = 5 * time.Second
)

// Options configure a Bus.
type Options struct {
	// Channel is the Redis pub/sub channel invalidations are published on.
	// Every instance that shares a token cache must use the same channel.
	// Default: "caddy-matrix-media:auth-invalidations".
	Channel string
	// Logger receives connection problems and dropped messages. Default: a
	// no-op logger.
	Logger *zap.Logger
}

// Bus publishes and receives token-cache invalidations over Redis pub/sub.
// It is safe for concurrent use.
type Bus struct {
	client  *redis.Client
	pubsub  *redis.PubSub
	channel string
	// origin identifies this Bus in the messages it publishes, so it can
	// skip its own.
	origin         string
	log            *zap.Logger
	onInvalidation func(auth.Invalidation)
	onResync       func()

	// stop ends the receive loop; done is closed when it has returned.
	stop context.CancelFunc
	done chan struct{}

	closeOnce sync.Once
	closeErr  error
}

// Bus implements auth.Publisher.
var _ auth.Publisher = (*Bus)(nil)

// message is the wire form of an invalidation: compact JSON.
type message struct {
	// Origin is the instance id of the publishing Bus.
	Origin string `json:"o"`
	// Homeserver is auth.Invalidation.Homeserver.
	Homeserver string `json:"h"`
	// Token is the hex-encoded token hash, empty when unset.
	Token string `json:"t,omitempty"`
	// UserID is auth.Invalidation.UserID, empty when unset.
	UserID string `json:"u,omitempty"`
}

// New connects to the Redis server at redisURL (redis:// or rediss://, as
// understood by redis.ParseURL), subscribes to the invalidation channel and
// starts receiving. ctx bounds connecting and subscribing only.
//
// onInvalidation is called, from a single goroutine and one message at a
// time, for every invalidation published by another Bus. onResync (may be
// nil) is called from the same goroutine whenever the subscription is
// re-established after the connection was lost: invalidations sent during the
// gap were missed, so the caller should drop its whole cache. Callbacks
// should return quickly.
//
// Errors never contain redisURL, which may hold a password.
func New(ctx context.Context, redisURL string, opts Options, onInvalidation func(auth.Invalidation), onResync func()) (*Bus, error) {
	if onInvalidation == nil {
		return nil, errors.New("creating redis invalidation bus: onInvalidation is nil")
	}
	ropts, err := redis.ParseURL(redisURL)
	if err != nil {
		// The parse error may quote the URL; do not pass it on.
		return nil, errors.New("creating redis invalidation bus: invalid redis URL")
	}
	origin, err := newOrigin()
	if err != nil {
		return nil, fmt.Errorf("creating redis invalidation bus: %w", err)
	}
	b := &Bus{
		channel:        opts.Channel,
		origin:         origin,
		log:            opts.Logger,
		onInvalidation: onInvalidation,
		onResync:       onResync,
		done:           make(chan struct{}),
	}
	if b.channel == "" {
		b.channel = DefaultChannel
	}
	if b.log == nil {
		b.log = zap.NewNop()
	}
	b.client = redis.NewClient(ropts)
	if err := b.client.Ping(ctx).Err(); err != nil {
		_ = b.client.Close()
		return nil, fmt.Errorf("connecting to redis at %s: %w", ropts.Addr, err)
	}
	b.pubsub = b.client.Subscribe(ctx)
	if err := b.subscribe(ctx); err != nil {
		_ = b.pubsub.Close()
		_ = b.client.Close()
		return nil, fmt.Errorf("subscribing to redis channel %q: %w", b.channel, err)
	}
	loopCtx, stop := context.WithCancel(context.Background())
	b.stop = stop
	go b.receive(loopCtx)
	return b, nil
}

// subscribe subscribes to the channel and waits for Redis to confirm, so
// that New returns only once messages are being delivered.
func (b *Bus) subscribe(ctx context.Context) error {
	if err := b.pubsub.Subscribe(ctx, b.channel); err != nil {
		return err
	}
	for {
		msg, err := b.pubsub.Receive(ctx)
		if err != nil {
			return err
		}
		if sub, ok := msg.(*redis.Subscription); ok && sub.Kind == "subscribe" && sub.Channel == b.channel {
			return nil
		}
	}
}

// newOrigin returns a random instance id.
func newOrigin() (string, error) {
	var id [16]byte
	if _, err := rand.Read(id[:]); err != nil {
		return "", fmt.Errorf("generating instance id: %w", err)
	}
	return hex.EncodeToString(id[:]), nil
}

// Publish sends inv to every other Bus on the channel. It waits at most 2s
// (less if ctx ends sooner). inv must name a homeserver and exactly one of
// a token and a user.
func (b *Bus) Publish(ctx context.Context, inv auth.Invalidation) error {
	if err := validate(inv); err != nil {
		return fmt.Errorf("publishing token invalidation: %w", err)
	}
	payload, err := json.Marshal(encode(b.origin, inv))
	if err != nil {
		return fmt.Errorf("publishing token invalidation: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	if err := b.client.Publish(ctx, b.channel, payload).Err(); err != nil {
		return fmt.Errorf("publishing token invalidation: %w", err)
	}
	return nil
}

// Client returns the bus's Redis client, for other users of the same
// server (the rate limiter). It stays usable until Close.
func (b *Bus) Client() *redis.Client { return b.client }

// Close stops receiving, waits for the receiving goroutine to end and closes
// the connections to Redis. Calling Close again returns the first result.
func (b *Bus) Close() error {
	b.closeOnce.Do(func() {
		b.stop()
		// Closing the subscription unblocks a pending Receive.
		err := b.pubsub.Close()
		<-b.done
		b.closeErr = errors.Join(err, b.client.Close())
		if b.closeErr != nil {
			b.closeErr = fmt.Errorf("closing redis invalidation bus: %w", b.closeErr)
		}
	})
	return b.closeErr
}

// receive hands incoming messages to the callbacks until ctx ends.
func (b *Bus) receive(ctx context.Context) {
	defer close(b.done)
	delay := minRetryDelay
	lost := false
	for {
		msg, err := b.pubsub.Receive(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			// go-redis drops the broken connection; the next Receive
			// dials again and resubscribes.
			if !lost {
				b.log.Warn("redis invalidation subscription lost; retrying", zap.String("channel", b.channel), zap.Error(err))
				lost = true
			} else {
				b.log.Debug("redis invalidation subscription still down", zap.Error(err))
			}
			t := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			delay = min(delay*2, maxRetryDelay)
			continue
		}
		delay = minRetryDelay
		switch m := msg.(type) {
		case *redis.Subscription:
			// The first subscription was confirmed in New, so any
			// later confirmation is a resubscription after a
			// reconnect.
			if m.Kind != "subscribe" || m.Channel != b.channel {
				continue
			}
			lost = false
			b.log.Info("redis invalidation subscription re-established; resyncing", zap.String("channel", b.channel))
			if b.onResync != nil {
				b.onResync()
			}
		case *redis.Message:
			b.handle(m.Payload)
		}
	}
}

// handle decodes one message and passes it on unless it is malformed or was
// sent by this Bus.
func (b *Bus) handle(payload string) {
	var m message
	if err := json.Unmarshal([]byte(payload), &m); err != nil {
		b.log.Warn("dropping malformed token invalidation", zap.Int("bytes", len(payload)), zap.Error(err))
		return
	}
	if m.Origin == b.origin {
		return
	}
	inv, err := decode(m)
	if err != nil {
		b.log.Warn("dropping malformed token invalidation", zap.String("origin", m.Origin), zap.Error(err))
		return
	}
	b.onInvalidation(inv)
}

// encode returns the wire form of inv.
func encode(origin string, inv auth.Invalidation) message {
	m := message{Origin: origin, Homeserver: inv.Homeserver, UserID: inv.UserID}
	if inv.Token != (auth.TokenHash{}) {
		m.Token = hex.EncodeToString(inv.Token[:])
	}
	return m
}

// decode checks a received message and returns its invalidation.
func decode(m message) (auth.Invalidation, error) {
	if m.Origin == "" {
		return auth.Invalidation{}, errors.New("no origin")
	}
	inv := auth.Invalidation{Homeserver: m.Homeserver, UserID: m.UserID}
	if m.Token != "" {
		if hex.DecodedLen(len(m.Token)) != len(inv.Token) {
			return auth.Invalidation{}, errors.New("token hash has the wrong length")
		}
		if _, err := hex.Decode(inv.Token[:], []byte(m.Token)); err != nil {
			return auth.Invalidation{}, fmt.Errorf("decoding token hash: %w", err)
		}
	}
	if err := validate(inv); err != nil {
		return auth.Invalidation{}, err
	}
	return inv, nil
}

// validate checks that inv names a homeserver and exactly one of a token
// and a user.
func validate(inv auth.Invalidation) error {
	hasToken := inv.Token != (auth.TokenHash{})
	hasUser := inv.UserID != ""
	switch {
	case inv.Homeserver == "":
		return errors.New("invalidation names no homeserver")
	case hasToken && hasUser:
		return errors.New("invalidation names both a token and a user")
	case !hasToken && !hasUser:
		return errors.New("invalidation names neither a token nor a user")
	}
	return nil
}
