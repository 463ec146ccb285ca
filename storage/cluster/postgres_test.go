package cluster

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/jackc/pgx/v5"
)

// terminate ends the backend pid from the admin connection, after checking
// that it is the coordinator connection it is expected to be.
func terminate(t *testing.T, admin *pgx.Conn, pid uint32, app string) {
	t.Helper()
	ctx := context.Background()
	var got string
	if err := admin.QueryRow(ctx, `SELECT application_name FROM pg_stat_activity WHERE pid = $1`, int32(pid)).Scan(&got); err != nil {
		t.Fatalf("looking up backend %d: %v", pid, err)
	}
	if got != app {
		t.Fatalf("backend %d has application_name %q, want %q", pid, got, app)
	}
	var ok bool
	if err := admin.QueryRow(ctx, `SELECT pg_terminate_backend($1)`, int32(pid)).Scan(&ok); err != nil || !ok {
		t.Fatalf("pg_terminate_backend(%d) = %v, %v", pid, ok, err)
	}
}

// waitBackendGone waits until the backend pid has exited.
func waitBackendGone(t *testing.T, admin *pgx.Conn, pid uint32) {
	t.Helper()
	eventually(t, "backend gone", func() bool {
		var n int
		err := admin.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, int32(pid)).Scan(&n)
		return err == nil && n == 0
	})
}

// eventually waits until cond holds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, wait)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPostgresSessionKilledLosesLocks(t *testing.T) {
	dsn := testpg.DSN(t)
	opts := PostgresOptions{FallbackInterval: time.Hour, HealthInterval: 50 * time.Millisecond}
	a, b := newPostgres(t, dsn, opts), newPostgres(t, dsn, opts)
	admin := adminConn(t, dsn)

	la := mustLock(t, a, "x")
	lz := mustLock(t, a, "z")
	mustNotLock(t, b, "x")
	terminate(t, admin, a.sessionPID(), sessionAppName)

	// The health check notices without any call on a.
	waitLost(t, la, "lock of a killed session")
	waitLost(t, lz, "second lock of a killed session")
	lb := eventuallyLock(t, b, "x")
	la.Release() // no-op: must not free b's hold
	mustNotLock(t, a, "x")
	// The name is free again in a's process once b releases it.
	lb.Release()
	l := eventuallyLock(t, a, "x")
	assertNotLost(t, l, "lock on the new session")
	l.Release()

	st := a.Stats()
	if st.LocksLost != 2 || st.SessionReconnects != 1 || st.HealthChecks == 0 {
		t.Fatalf("stats after the loss: %+v; want LocksLost 2, SessionReconnects 1, HealthChecks > 0", st)
	}
}

func TestPostgresSessionKilledWhileIdle(t *testing.T) {
	dsn := testpg.DSN(t)
	opts := PostgresOptions{FallbackInterval: time.Hour}
	a, b := newPostgres(t, dsn, opts), newPostgres(t, dsn, opts)
	admin := adminConn(t, dsn)

	// A dead idle session is noticed by the next query, which runs again
	// on a new session: the caller sees no error.
	old := a.sessionPID()
	terminate(t, admin, old, sessionAppName)
	waitBackendGone(t, admin, old)
	tp := topic("t")
	s := subscribe(t, b, tp)
	publish(t, a, tp)
	waitWake(t, s, "subscriber of a publish through a replaced session")
	if pid := a.sessionPID(); pid == 0 || pid == old {
		t.Fatalf("session backend %d after the kill of %d: want a new one", pid, old)
	}
	st := a.Stats()
	if st.SessionReconnects != 1 || st.Publishes != 1 || st.LocksLost != 0 {
		t.Fatalf("stats: %+v; want SessionReconnects 1, Publishes 1, LocksLost 0", st)
	}
	mustLock(t, a, "x").Release()
}

func TestPostgresListenerKilled(t *testing.T) {
	dsn := testpg.DSN(t)
	opts := PostgresOptions{FallbackInterval: time.Hour, ReconnectDelay: 10 * time.Millisecond}
	a, b := newPostgres(t, dsn, opts), newPostgres(t, dsn, opts)
	admin := adminConn(t, dsn)

	s := subscribe(t, a, topic("t"))
	resync := make(chan string, 4)
	stop := a.Handle("forget/", func(topic string) { resync <- topic })
	defer stop()
	old := a.listenerPID.Load()
	terminate(t, admin, old, listenerAppName)

	// No publish and no fallback: only the reconnection wakes s, and tells
	// handlers that anything may have changed ("").
	waitWake(t, s, "subscriber after the listener reconnected")
	select {
	case g := <-resync:
		if g != "" {
			t.Fatalf("handler got %q after the reconnection, want \"\"", g)
		}
	case <-time.After(wait):
		t.Fatal("the handler was not told of the reconnection")
	}
	if st := a.Stats(); st.ListenerReconnects != 1 {
		t.Fatalf("ListenerReconnects = %d, want 1", st.ListenerReconnects)
	}
	if pid := a.listenerPID.Load(); pid == old {
		t.Fatalf("listener backend still %d", pid)
	}

	// Notifications from elsewhere arrive again.
	tp := topic("after")
	s2 := subscribe(t, a, tp)
	publish(t, b, tp)
	waitWake(t, s2, "subscriber of a notification after the reconnection")
}

func TestPostgresListenerHealthCheck(t *testing.T) {
	dsn := testpg.DSN(t)
	opts := PostgresOptions{FallbackInterval: time.Hour, HealthInterval: 20 * time.Millisecond}
	a, b := newPostgres(t, dsn, opts), newPostgres(t, dsn, PostgresOptions{FallbackInterval: time.Hour, HealthInterval: time.Hour})

	// The idle listener is checked, and keeps receiving after the checks.
	eventually(t, "listener health checks", func() bool { return a.Stats().HealthChecks >= 3 })
	tp := topic("t")
	s := subscribe(t, a, tp)
	publish(t, b, tp)
	waitWake(t, s, "subscriber after listener health checks")
	if st := a.Stats(); st.ListenerReconnects != 0 {
		t.Fatalf("ListenerReconnects = %d after health checks of a live connection, want 0", st.ListenerReconnects)
	}
}

func TestPostgresFallback(t *testing.T) {
	dsn := testpg.DSN(t)
	a := newPostgres(t, dsn, PostgresOptions{FallbackInterval: 20 * time.Millisecond})
	s := subscribe(t, a, topic("t"))
	waitWake(t, s, "first fallback wake-up")
	drain(s)
	waitWake(t, s, "second fallback wake-up")
	if st := a.Stats(); st.Publishes != 0 || st.NotificationsReceived != 0 {
		t.Fatalf("stats %+v: wake-ups came from notifications, want none", st)
	}
}

func TestPostgresTopicLength(t *testing.T) {
	dsn := testpg.DSN(t)
	opts := PostgresOptions{FallbackInterval: time.Hour}
	a, b := newPostgres(t, dsn, opts), newPostgres(t, dsn, opts)

	long := strings.Repeat("x", MaxTopicLen+1)
	local := subscribe(t, a, long)
	if err := a.Publish(context.Background(), long); !errors.Is(err, ErrTopicTooLong) {
		t.Fatalf("Publish of %d bytes: %v, want ErrTopicTooLong", len(long), err)
	}
	assertNoWake(t, local, "subscriber of a refused topic")
	if st := a.Stats(); st.Publishes != 0 {
		t.Fatalf("Publishes = %d after a refused topic", st.Publishes)
	}

	// The longest topic allowed is one PostgreSQL accepts.
	longest := strings.Repeat("y", MaxTopicLen)
	s := subscribe(t, b, longest)
	publish(t, a, longest)
	waitWake(t, s, "subscriber of the longest topic")
}

func TestPostgresChannels(t *testing.T) {
	dsn := testpg.DSN(t)
	// A channel name that needs quoting: LISTEN and pg_notify must agree.
	mixed := PostgresOptions{FallbackInterval: time.Hour, Channel: `Media "Chan"-1`}
	a, b := newPostgres(t, dsn, mixed), newPostgres(t, dsn, mixed)
	other := newPostgres(t, dsn, PostgresOptions{FallbackInterval: time.Hour})
	other2 := newPostgres(t, dsn, PostgresOptions{FallbackInterval: time.Hour})

	tp := topic("t")
	onB := subscribe(t, b, tp)
	onOther := subscribe(t, other, tp)
	publish(t, a, tp)
	waitWake(t, onB, "subscriber on the same channel")
	// Every notification of the database reaches a listener in order, so
	// a barrier on other's channel comes after a's notification would have.
	barrier(t, other2, other)
	assertNoWake(t, onOther, "subscriber on another channel")
	if st := other.Stats(); st.NotificationsReceived != 1 {
		t.Fatalf("other channel received %d notifications, want 1 (the barrier)", st.NotificationsReceived)
	}
}

func TestPostgresStats(t *testing.T) {
	dsn := testpg.DSN(t)
	quiet := PostgresOptions{FallbackInterval: time.Hour, HealthInterval: time.Hour}
	a, b := newPostgres(t, dsn, quiet), newPostgres(t, dsn, quiet)
	ctx := context.Background()

	if got := a.Stats(); got != (Stats{RoundTrips: 1}) {
		t.Fatalf("stats of a new coordinator: %+v, want only the LISTEN round trip", got)
	}
	steps := []struct {
		name string
		do   func(t *testing.T)
		want Stats // a's counters after the step
	}{
		{"publish, and receive it back", func(t *testing.T) {
			publish(t, a, "t")
			eventually(t, "own notification", func() bool { return a.Stats().NotificationsReceived == 1 })
		}, Stats{Publishes: 1, NotificationsReceived: 1, RoundTrips: 2}},
		{"lock", func(t *testing.T) { mustLock(t, a, "x") }, Stats{Publishes: 1, NotificationsReceived: 1, LockAttempts: 1, LocksAcquired: 1, RoundTrips: 3}},
		{"refused in-process, no round trip", func(t *testing.T) { mustNotLock(t, a, "x") }, Stats{Publishes: 1, NotificationsReceived: 1, LockAttempts: 2, LocksAcquired: 1, RoundTrips: 3}},
		{"refused by PostgreSQL on b", func(t *testing.T) { mustNotLock(t, b, "x") }, Stats{Publishes: 1, NotificationsReceived: 1, LockAttempts: 2, LocksAcquired: 1, RoundTrips: 3}},
		{"lock and release", func(t *testing.T) { mustLock(t, a, "y").Release() }, Stats{Publishes: 1, NotificationsReceived: 1, LockAttempts: 3, LocksAcquired: 2, RoundTrips: 5}},
	}
	for _, st := range steps {
		st.do(t)
		if got := a.Stats(); got != st.want {
			t.Fatalf("after %s: %+v, want %+v", st.name, got, st.want)
		}
	}
	eventually(t, "b received a's notification", func() bool { return b.Stats().NotificationsReceived == 1 })
	if got, want := b.Stats(), (Stats{LockAttempts: 1, NotificationsReceived: 1, RoundTrips: 2}); got != want {
		t.Fatalf("b: %+v, want %+v", got, want)
	}
	// A cancelled context refuses before any round trip.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, _, err := a.TryLock(cctx, "z"); !errors.Is(err, context.Canceled) {
		t.Fatalf("TryLock with a cancelled context: %v", err)
	}
	if err := a.Publish(cctx, "t"); !errors.Is(err, context.Canceled) {
		t.Fatalf("Publish with a cancelled context: %v", err)
	}
	if got := a.Stats().RoundTrips; got != 5 {
		t.Fatalf("RoundTrips = %d after cancelled calls, want 5", got)
	}
}

func TestPostgresClosed(t *testing.T) {
	dsn := testpg.DSN(t)
	a := newPostgres(t, dsn, PostgresOptions{})
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Publish(context.Background(), "t"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Publish after Close: %v, want ErrClosed", err)
	}
	var n int
	admin := adminConn(t, dsn)
	eventually(t, "connections closed", func() bool {
		err := admin.QueryRow(context.Background(),
			`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name IN ($1, $2)`, sessionAppName, listenerAppName).Scan(&n)
		return err == nil && n == 0
	})
}

func TestNewPostgresErrorsHideDSN(t *testing.T) {
	const secret = "s3cretPassw0rd"
	tests := []struct{ name, dsn string }{
		{"unreachable", "postgres://mmuser:" + secret + "@127.0.0.1:1/db?sslmode=disable&connect_timeout=5"},
		{"bad URL", "postgres://mmuser:" + secret + "@127.0.0.1:notaport/db"},
		{"bad key=value", "host=127.0.0.1 password=" + secret + " port=abc"},
		{"bad option", "postgres://mmuser:" + secret + "@127.0.0.1/db?sslmode=nonsense"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			p, err := NewPostgres(ctx, tt.dsn, PostgresOptions{})
			if err == nil {
				_ = p.Close()
				t.Fatal("NewPostgres succeeded")
			}
			t.Log(err)
			if strings.Contains(err.Error(), secret) {
				t.Fatalf("error shows the password: %v", err)
			}
		})
	}
}

func TestPostgresOptions(t *testing.T) {
	tests := []struct {
		name string
		in   PostgresOptions
		ok   bool
	}{
		{"zero", PostgresOptions{}, true},
		{"long channel", PostgresOptions{Channel: strings.Repeat("c", maxChannelLen+1)}, false},
		{"longest channel", PostgresOptions{Channel: strings.Repeat("c", maxChannelLen)}, true},
		{"NUL in channel", PostgresOptions{Channel: "a\x00b"}, false},
		{"negative timeout", PostgresOptions{QueryTimeout: -time.Second}, false},
		{"negative fallback", PostgresOptions{FallbackInterval: -time.Second}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.in.withDefaults()
			if (err == nil) != tt.ok {
				t.Fatalf("withDefaults: %v, want ok %v", err, tt.ok)
			}
		})
	}
	o, err := PostgresOptions{ReconnectDelay: 10 * time.Second}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	want := PostgresOptions{Logger: o.Logger, Channel: DefaultChannel, FallbackInterval: DefaultFallbackInterval,
		ReconnectDelay: 10 * time.Second, MaxReconnectDelay: 10 * time.Second, HealthInterval: DefaultHealthInterval, QueryTimeout: DefaultQueryTimeout}
	if o != want || o.Logger == nil {
		t.Fatalf("defaults: %+v, want %+v", o, want)
	}
}

func TestLockKey(t *testing.T) {
	// The key derivation is shared by every instance of a cluster: a
	// change lets two versions hold one lock at once. These values pin it.
	golden := map[string]int64{
		"x":                           -2738621491200013758,
		"thumb/example.org/abc/32x32": -4435419483995663357,
	}
	for name, want := range golden {
		if got := lockKey(name); got != want {
			t.Errorf("lockKey(%q) = %#x, want %#x", name, got, want)
		}
	}
	seen := map[int64]string{}
	for _, name := range []string{"", "x", "y", "collector", "migrate", "thumb/example.org/abc/32x32"} {
		k := lockKey(name)
		t.Logf("lockKey(%q) = %d", name, k)
		// sqlstore's collectorLockKey and migrationLockKey are positive.
		if k >= 0 {
			t.Errorf("lockKey(%q) = %d, want negative", name, k)
		}
		if other, dup := seen[k]; dup {
			t.Errorf("lockKey(%q) = lockKey(%q)", name, other)
		}
		seen[k] = name
	}
}

func TestPostgresOutage(t *testing.T) {
	c := testpg.NewCluster(t)
	opts := PostgresOptions{
		FallbackInterval:  time.Hour,
		HealthInterval:    50 * time.Millisecond,
		ReconnectDelay:    20 * time.Millisecond,
		MaxReconnectDelay: 200 * time.Millisecond,
		QueryTimeout:      2 * time.Second,
	}
	a, b := newPostgres(t, c.DSN(), opts), newPostgres(t, c.DSN(), opts)
	l := mustLock(t, a, "x")
	s := subscribe(t, a, topic("t"))

	c.Stop(t)
	waitLost(t, l, "lock during an outage")
	// Calls fail, within their bound, rather than hang.
	if _, _, err := b.TryLock(context.Background(), "x"); err == nil {
		t.Fatal("TryLock succeeded with the server down")
	}
	if err := b.Publish(context.Background(), "t"); err == nil {
		t.Fatal("Publish succeeded with the server down")
	}
	c.Start(t)

	waitWake(t, s, "subscriber after the listener came back")
	eventually(t, "listener reconnected", func() bool { return a.Stats().ListenerReconnects >= 1 })
	mustLock(t, b, "x")
	mustNotLock(t, a, "x")
	tp := topic("after")
	s2 := subscribe(t, a, tp)
	eventually(t, "b's listener reconnected", func() bool { return b.Stats().ListenerReconnects >= 1 })
	publish(t, b, tp)
	waitWake(t, s2, "notification after the outage")
}

func TestPostgresReleaseOnDeadSession(t *testing.T) {
	dsn := testpg.DSN(t)
	// No health check: the Release itself finds the session dead.
	opts := PostgresOptions{FallbackInterval: time.Hour, HealthInterval: time.Hour}
	a, b := newPostgres(t, dsn, opts), newPostgres(t, dsn, opts)
	admin := adminConn(t, dsn)

	lx, ly := mustLock(t, a, "x"), mustLock(t, a, "y")
	pid := a.sessionPID()
	terminate(t, admin, pid, sessionAppName)
	waitBackendGone(t, admin, pid)
	assertNotLost(t, ly, "lock before anyone noticed the session ended")
	lx.Release()
	waitLost(t, ly, "other lock of the session found dead by Release")
	ly.Release() // no-op after the loss
	eventuallyLock(t, b, "x")
	eventuallyLock(t, b, "y")
	mustNotLock(t, a, "y")
	if st := a.Stats(); st.LocksLost != 2 {
		t.Fatalf("LocksLost = %d, want 2", st.LocksLost)
	}
}

func TestPostgresTryLockWaitEndsWithContext(t *testing.T) {
	dsn := testpg.DSN(t)
	a := newPostgres(t, dsn, PostgresOptions{FallbackInterval: time.Hour})

	// While the session is busy, a caller's context ends its wait, and the
	// name it had taken in-process is given back.
	a.sem <- struct{}{}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, _, err := a.TryLock(ctx, "x"); !errors.Is(err, context.DeadlineExceeded) {
		a.releaseSem()
		t.Fatalf("TryLock on a busy session: %v, want DeadlineExceeded", err)
	}
	if err := a.Publish(ctx, "t"); !errors.Is(err, context.DeadlineExceeded) {
		a.releaseSem()
		t.Fatalf("Publish on a busy session: %v, want DeadlineExceeded", err)
	}
	a.releaseSem()
	mustLock(t, a, "x").Release()
}
