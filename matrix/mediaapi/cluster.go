package mediaapi

import (
	"context"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage/cluster"
)

// publishTimeout bounds one cluster notification.
const publishTimeout = 5 * time.Second

// publish tells every instance that topic changed. A failure is logged and
// otherwise ignored: waiters re-read the state on the coordinator's
// fallback wake-up.
func (r *Repository) publish(ctx context.Context, topic string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), publishTimeout)
	defer cancel()
	if err := r.cluster.Publish(ctx, topic); err != nil {
		r.logger.Warn("cluster notification failed; waiters on other instances will notice later",
			zap.String("topic", topic), zap.Error(err))
	}
}

// turn is the right to do one piece of work cluster-wide (fetch one remote
// item, generate one thumbnail), given by waitTurn. end releases it and
// wakes the instances waiting for the work; it must be called once the
// work's result is visible to other instances (its row recorded), or once
// the work failed (then one of them takes its turn).
type turn struct {
	r     *Repository
	topic string
	// lock is nil when the coordinator failed and the work goes on
	// uncoordinated.
	lock cluster.Lock
}

// end releases the turn and publishes its topic. A nil turn does nothing.
func (t *turn) end() {
	if t == nil {
		return
	}
	if t.lock != nil {
		t.lock.Release()
	}
	t.r.publish(context.Background(), t.topic)
}

// waitTurn waits until the caller may do the work named topic (also the
// name of its cluster lock): it returns a turn when the caller holds the
// lock, or when the coordinator failed (the work is then done
// uncoordinated rather than refused). It returns a nil turn, and no error,
// once done reports that the work was done meanwhile (on another instance):
// done is checked after each wake-up and once more after the lock is
// taken, since the holder may have finished just before. Waiting ends with
// ctx.
func (r *Repository) waitTurn(ctx context.Context, topic string, done func(context.Context) (bool, error)) (*turn, error) {
	sub := r.cluster.Subscribe(topic)
	defer sub.Close()
	for {
		lock, ok, err := r.cluster.TryLock(ctx, topic)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			r.logger.Warn("cluster lock unavailable; doing the work without it",
				zap.String("work", topic), zap.Error(err))
			return &turn{r: r, topic: topic}, nil
		}
		if ok {
			if finished, err := done(ctx); finished || err != nil {
				lock.Release()
				return nil, err
			}
			return &turn{r: r, topic: topic, lock: lock}, nil
		}
		r.metrics.clusterWait(topicWork(topic))
		select {
		case <-sub.C:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if finished, err := done(ctx); finished || err != nil {
			return nil, err
		}
	}
}

// topicWork is the kind of work of a topic, for metrics: its first part.
func topicWork(topic string) string {
	for i := 0; i < len(topic); i++ {
		if topic[i] == '/' {
			return topic[:i]
		}
	}
	return topic
}

// pendingExpiryLock is the cluster lock of the pending-expiry sweep: one
// instance sweeps at a time.
const pendingExpiryLock = "task/pending_expiry"

// Cache invalidations travel between instances as topics under
// forgetTopicPrefix: forget/media/<server>/<id> (Forget) and
// forget/content/<sha256> (ForgetContent).
const (
	forgetTopicPrefix   = "forget/"
	forgetMediaPrefix   = forgetTopicPrefix + "media/"
	forgetContentPrefix = forgetTopicPrefix + "content/"
)

func forgetMediaTopic(server, id string) string { return forgetMediaPrefix + server + "/" + id }
func forgetContentTopic(sha256 string) string   { return forgetContentPrefix + sha256 }

// applyForget applies an invalidation published by any instance (this one
// included: applying it twice is harmless) to this process's caches. ""
// means invalidations may have been lost (the coordinator reconnected):
// every cached row is dropped.
func (r *Repository) applyForget(topic string) {
	switch {
	case topic == "":
		r.forgetAll()
	case strings.HasPrefix(topic, forgetContentPrefix):
		r.forgetContent(strings.TrimPrefix(topic, forgetContentPrefix))
	case strings.HasPrefix(topic, forgetMediaPrefix):
		// Server names and media IDs hold no '/'.
		server, id, ok := strings.Cut(strings.TrimPrefix(topic, forgetMediaPrefix), "/")
		if ok {
			r.forget(server, id)
		}
	}
}

// forgetAll empties the media and thumbnail row caches.
func (r *Repository) forgetAll() {
	if r.cache == nil {
		return
	}
	r.cacheGen.Add(1)
	r.cache.removeIf(func(mediaKey, *mediaEntry) bool { return true })
	r.thumbCache.removeIf(func(mediaKey, *mediaEntry) bool { return true })
}
