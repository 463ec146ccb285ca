package cluster

import (
	"context"
	"crypto/rand"
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/jackc/pgx/v5"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// wait bounds every wait for something that must happen.
const wait = 10 * time.Second

// impl is a Coordinator implementation under the conformance suite.
type impl struct {
	name string
	// pair returns two coordinators acting as two instances of one
	// cluster, closed when the test ends.
	pair func(t *testing.T) (a, b Coordinator)
	// distinct says a and b are different coordinators (else they are the
	// same one twice).
	distinct bool
}

func impls() []impl {
	return []impl{
		{
			name: "Local",
			pair: func(t *testing.T) (Coordinator, Coordinator) {
				l := NewLocal(0)
				t.Cleanup(func() { _ = l.Close() })
				return l, l
			},
		},
		{
			name:     "Postgres",
			distinct: true,
			pair: func(t *testing.T) (Coordinator, Coordinator) {
				dsn := testpg.DSN(t)
				// No fallback wake-ups: every wake-up seen comes from a publish.
				opts := PostgresOptions{FallbackInterval: time.Hour}
				return newPostgres(t, dsn, opts), newPostgres(t, dsn, opts)
			},
		},
	}
}

// newPostgres returns a Postgres coordinator closed when the test ends.
func newPostgres(t *testing.T, dsn string, opts PostgresOptions) *Postgres {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	p, err := NewPostgres(ctx, dsn, opts)
	if err != nil {
		t.Fatalf("NewPostgres: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// topic returns a topic name unique to this call.
func topic(prefix string) string { return prefix + "/" + rand.Text() }

func subscribe(t *testing.T, c Coordinator, topic string) *Subscription {
	t.Helper()
	s := c.Subscribe(topic)
	t.Cleanup(s.Close)
	return s
}

func publish(t *testing.T, c Coordinator, topic string) {
	t.Helper()
	if err := c.Publish(context.Background(), topic); err != nil {
		t.Fatalf("Publish(%q): %v", topic, err)
	}
}

func waitWake(t *testing.T, s *Subscription, what string) {
	t.Helper()
	select {
	case <-s.C:
	case <-time.After(wait):
		t.Fatalf("%s: no wake-up within %v", what, wait)
	}
}

func drain(s *Subscription) {
	select {
	case <-s.C:
	default:
	}
}

func assertNoWake(t *testing.T, s *Subscription, what string) {
	t.Helper()
	select {
	case <-s.C:
		t.Fatalf("%s: unexpected wake-up", what)
	default:
	}
}

// barrier returns once every notification published before it has reached
// to: it publishes a fresh topic from from and waits for it on to. (Both
// implementations deliver in publish order; for Postgres from and to must
// be different coordinators, else the barrier arrives locally at once.)
func barrier(t *testing.T, from, to Coordinator) {
	t.Helper()
	tp := topic("barrier")
	s := subscribe(t, to, tp)
	publish(t, from, tp)
	waitWake(t, s, "barrier")
}

func mustLock(t *testing.T, c Coordinator, name string) Lock {
	t.Helper()
	l, ok, err := c.TryLock(context.Background(), name)
	if err != nil || !ok {
		t.Fatalf("TryLock(%q) = %v, %v; want the lock", name, ok, err)
	}
	return l
}

func mustNotLock(t *testing.T, c Coordinator, name string) {
	t.Helper()
	l, ok, err := c.TryLock(context.Background(), name)
	if err != nil || ok {
		if ok {
			l.Release()
		}
		t.Fatalf("TryLock(%q) = %v, %v; want false, held elsewhere", name, ok, err)
	}
}

// eventuallyLock retries TryLock until it succeeds (a lock freed by an
// ending session is free once PostgreSQL has ended it).
func eventuallyLock(t *testing.T, c Coordinator, name string) Lock {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		l, ok, err := c.TryLock(context.Background(), name)
		if err != nil {
			t.Fatalf("TryLock(%q): %v", name, err)
		}
		if ok {
			return l
		}
		if time.Now().After(deadline) {
			t.Fatalf("TryLock(%q) still refused after %v", name, wait)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func assertNotLost(t *testing.T, l Lock, what string) {
	t.Helper()
	select {
	case <-l.Lost():
		t.Fatalf("%s: Lost is closed", what)
	default:
	}
}

func waitLost(t *testing.T, l Lock, what string) {
	t.Helper()
	select {
	case <-l.Lost():
	case <-time.After(wait):
		t.Fatalf("%s: Lost not closed within %v", what, wait)
	}
}

func TestConformance(t *testing.T) {
	for _, im := range impls() {
		t.Run(im.name, func(t *testing.T) {
			t.Run("PublishReachesEveryInstance", func(t *testing.T) { testPublish(t, im) })
			t.Run("SubscriptionClose", func(t *testing.T) { testSubscriptionClose(t, im) })
			t.Run("LockExclusive", func(t *testing.T) { testLockExclusive(t, im) })
			t.Run("LockConcurrency", func(t *testing.T) { testLockConcurrency(t, im) })
			t.Run("Close", func(t *testing.T) { testClose(t, im) })
			t.Run("Handle", func(t *testing.T) { testHandle(t, im) })
		})
	}
}

func testPublish(t *testing.T, im impl) {
	a, b := im.pair(t)
	tp := topic("t")
	onA, onB := subscribe(t, a, tp), subscribe(t, b, tp)
	second := subscribe(t, b, tp)
	other := subscribe(t, b, topic("other"))
	otherOnA := subscribe(t, a, topic("other"))

	publish(t, a, tp)
	waitWake(t, onA, "subscriber on the publishing instance")
	waitWake(t, onB, "subscriber on the other instance")
	waitWake(t, second, "second subscriber of the topic")
	barrier(t, a, b)
	barrier(t, b, a)
	assertNoWake(t, other, "subscriber of another topic on the other instance")
	assertNoWake(t, otherOnA, "subscriber of another topic on the publishing instance")

	// And the other way round, on a fresh topic.
	tp2 := topic("t2")
	back := subscribe(t, a, tp2)
	publish(t, b, tp2)
	waitWake(t, back, "subscriber on the first instance, published by the second")
}

func testSubscriptionClose(t *testing.T, im impl) {
	a, b := im.pair(t)
	tp := topic("t")
	closed := b.Subscribe(tp)
	control := subscribe(t, b, tp)
	closed.Close()
	closed.Close() // idempotent
	drain(closed)

	publish(t, a, tp)
	waitWake(t, control, "subscriber still open")
	barrier(t, a, b)
	assertNoWake(t, closed, "closed subscription")

	// A closed subscription does not disturb a new one on the topic.
	again := subscribe(t, b, tp)
	publish(t, a, tp)
	waitWake(t, again, "new subscription after another was closed")
}

func testLockExclusive(t *testing.T, im impl) {
	a, b := im.pair(t)
	la := mustLock(t, a, "x")
	mustNotLock(t, b, "x") // across instances
	mustNotLock(t, a, "x") // within one instance
	ly := mustLock(t, b, "y")
	assertNotLost(t, la, "held lock")

	la.Release()
	lb := mustLock(t, b, "x")
	la.Release() // idempotent: must not free b's hold
	mustNotLock(t, a, "x")
	lb.Release()
	ly.Release()

	// Taken again after a Release, on the same instance, twice over.
	l := mustLock(t, a, "x")
	l.Release()
	l = mustLock(t, a, "x")
	assertNotLost(t, l, "lock taken again")
	l.Release()
	mustLock(t, b, "x").Release()
}

func testLockConcurrency(t *testing.T, im impl) {
	a, b := im.pair(t)
	const (
		workers = 8
		minIter = 30
	)
	var (
		holders  atomic.Int32
		acquired [2]atomic.Int64
		wg       sync.WaitGroup
	)
	coords := [2]Coordinator{a, b}
	deadline := time.Now().Add(wait)
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := coords[i%2]
			for iter := 0; ; iter++ {
				if iter >= minIter && acquired[0].Load() > 0 && acquired[1].Load() > 0 {
					return
				}
				if time.Now().After(deadline) {
					return
				}
				l, ok, err := c.TryLock(context.Background(), "hot")
				if err != nil {
					t.Errorf("TryLock: %v", err)
					return
				}
				if !ok {
					runtime.Gosched()
					continue
				}
				if n := holders.Add(1); n != 1 {
					t.Errorf("%d holders of one lock at once", n)
				}
				acquired[i%2].Add(1)
				runtime.Gosched()
				holders.Add(-1)
				l.Release()
			}
		}()
	}
	wg.Wait()
	if acquired[0].Load() == 0 || acquired[1].Load() == 0 {
		t.Fatalf("acquisitions per instance %d and %d within %v; want both > 0", acquired[0].Load(), acquired[1].Load(), wait)
	}
	// Nothing is left held.
	mustLock(t, a, "hot").Release()
}

func testClose(t *testing.T, im impl) {
	a, b := im.pair(t)
	la := mustLock(t, a, "x")
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, _, err := a.TryLock(context.Background(), "z"); !errors.Is(err, ErrClosed) {
		t.Fatalf("TryLock after Close: %v, want ErrClosed", err)
	}
	la.Release() // harmless after Close
	if !im.distinct {
		return
	}
	waitLost(t, la, "lock of a closed coordinator")
	eventuallyLock(t, b, "x").Release()
}

// adminConn is a connection of the test's own, for killing backends.
func adminConn(t *testing.T, dsn string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatalf("connecting: %v", err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

// testHandle: a handler receives the published topics of its prefix, from
// either instance, and none after stop.
func testHandle(t *testing.T, im impl) {
	a, b := im.pair(t)
	got := make(chan string, 16)
	stop := a.Handle("forget/", func(topic string) { got <- topic })
	t.Cleanup(stop)
	want := topic("forget")
	publish(t, b, topic("other"))
	publish(t, b, want)
	select {
	case g := <-got:
		if g != want {
			t.Fatalf("handler got %q, want %q (the other prefix must not reach it)", g, want)
		}
	case <-time.After(wait):
		t.Fatal("the handler was not called for a topic of its prefix")
	}
	stop()
	// A publish after stop, then a barrier subscription proves delivery
	// went past the handler without calling it.
	publish(t, b, topic("forget"))
	barrier(t, b, a)
	select {
	case g := <-got:
		t.Fatalf("handler called after stop with %q", g)
	default:
	}
}
