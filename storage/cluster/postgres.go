package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// Defaults of PostgresOptions.
const (
	// DefaultChannel is the NOTIFY channel of PostgresOptions.Channel.
	DefaultChannel = "matrix_media"
	// DefaultReconnectDelay is PostgresOptions.ReconnectDelay.
	DefaultReconnectDelay = 100 * time.Millisecond
	// DefaultMaxReconnectDelay is PostgresOptions.MaxReconnectDelay.
	DefaultMaxReconnectDelay = 5 * time.Second
	// DefaultHealthInterval is PostgresOptions.HealthInterval.
	DefaultHealthInterval = 2 * time.Second
	// DefaultQueryTimeout is PostgresOptions.QueryTimeout.
	DefaultQueryTimeout = 5 * time.Second
)

// MaxTopicLen is the longest topic Postgres publishes, in bytes: a topic is
// the payload of a NOTIFY, which PostgreSQL wants shorter than 8000 bytes.
const MaxTopicLen = 7999

// maxChannelLen is the longest PostgreSQL identifier (NAMEDATALEN - 1):
// a longer channel name would be truncated by LISTEN.
const maxChannelLen = 63

// Application names of the coordinator's connections, as shown in
// pg_stat_activity (they replace any application_name of the DSN).
const (
	sessionAppName  = "matrix_media cluster session"
	listenerAppName = "matrix_media cluster listener"
)

// lockKeyPrefix is hashed in front of every lock name; see lockKey.
const lockKeyPrefix = "matrix_media/"

// ErrTopicTooLong is returned by Postgres.Publish for a topic longer than
// MaxTopicLen.
var ErrTopicTooLong = errors.New("cluster topic too long for a PostgreSQL notification")

// PostgresOptions configure a Postgres coordinator. The zero value is
// valid: every field has a default.
type PostgresOptions struct {
	// Logger receives connection losses, reconnections and lost locks.
	// Default: no logging.
	Logger *zap.Logger
	// Channel is the PostgreSQL NOTIFY channel the instances share: only
	// instances with the same Channel (and the same database) see each
	// other's notifications. It is an identifier of at most 63 bytes.
	// Default: "matrix_media" (DefaultChannel).
	Channel string
	// FallbackInterval is how often every subscriber is woken anyway, so
	// that a lost notification delays a waiter by at most this long.
	// Default: DefaultFallbackInterval (5s).
	FallbackInterval time.Duration
	// ReconnectDelay is the wait before the first attempt to reconnect the
	// listener connection after it broke; it doubles after each failed
	// attempt, up to MaxReconnectDelay. Default: 100ms.
	ReconnectDelay time.Duration
	// MaxReconnectDelay bounds the wait between two attempts to reconnect
	// the listener connection. Default: 5s.
	MaxReconnectDelay time.Duration
	// HealthInterval is how often the session connection is checked
	// (one round trip) while at least one lock is held, so that Lost is
	// closed about this long at most after the session ended, and how
	// often the listener connection is checked when no notification
	// arrived for that long. Default: 2s.
	HealthInterval time.Duration
	// QueryTimeout bounds every query and every connection attempt, so
	// that a stuck PostgreSQL never hangs a caller or a background loop
	// for longer. A query that runs out of time ends its connection (and
	// so, on the session connection, every lock). Default: 5s.
	QueryTimeout time.Duration
}

// withDefaults validates o and fills in its defaults.
func (o PostgresOptions) withDefaults() (PostgresOptions, error) {
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Channel == "" {
		o.Channel = DefaultChannel
	}
	if len(o.Channel) > maxChannelLen || strings.ContainsRune(o.Channel, 0) {
		return o, fmt.Errorf("cluster: channel %q: want 1 to %d bytes, no NUL", o.Channel, maxChannelLen)
	}
	durations := []struct {
		name string
		v    *time.Duration
		def  time.Duration
	}{
		{"fallback interval", &o.FallbackInterval, DefaultFallbackInterval},
		{"reconnect delay", &o.ReconnectDelay, DefaultReconnectDelay},
		{"maximum reconnect delay", &o.MaxReconnectDelay, DefaultMaxReconnectDelay},
		{"health interval", &o.HealthInterval, DefaultHealthInterval},
		{"query timeout", &o.QueryTimeout, DefaultQueryTimeout},
	}
	for _, d := range durations {
		if *d.v < 0 {
			return o, fmt.Errorf("cluster: negative %s %v", d.name, *d.v)
		}
		if *d.v == 0 {
			*d.v = d.def
		}
	}
	if o.MaxReconnectDelay < o.ReconnectDelay {
		o.MaxReconnectDelay = o.ReconnectDelay
	}
	return o, nil
}

// Stats are the counters of a Postgres coordinator since it was created.
// They are plain numbers, meant for measurements and metrics.
type Stats struct {
	// Publishes counts the notifications sent (pg_notify queries issued).
	Publishes uint64
	// NotificationsReceived counts the notifications the listener received,
	// this instance's own included.
	NotificationsReceived uint64
	// LockAttempts counts TryLock calls, those refused in-process included.
	LockAttempts uint64
	// LocksAcquired counts TryLock calls that took their lock.
	LocksAcquired uint64
	// LocksLost counts the locks whose Lost channel was closed because their
	// session ended (not because the coordinator was closed).
	LocksLost uint64
	// ListenerReconnects counts the listener connections opened after the
	// previous one broke.
	ListenerReconnects uint64
	// SessionReconnects counts the session connections opened after the
	// previous one ended.
	SessionReconnects uint64
	// RoundTrips counts the queries sent to PostgreSQL (LISTEN, pg_notify,
	// lock and unlock, health checks); connection set-ups are not counted.
	RoundTrips uint64
	// HealthChecks counts the health-check queries, which RoundTrips
	// includes: subtract them to get the round trips made for callers.
	HealthChecks uint64
}

// postgresStats are the live counters behind Stats.
type postgresStats struct {
	publishes, notifications, lockAttempts, locksAcquired, locksLost atomic.Uint64
	listenerReconnects, sessionReconnects, roundTrips, healthChecks  atomic.Uint64
}

// Postgres is the Coordinator of instances sharing one PostgreSQL database.
//
// It holds two connections of its own, outside any pool. The listener
// connection LISTENs on the channel and delivers each notification (its
// payload is the topic) to the subscribers of this process; when it breaks
// it is reconnected with a bounded exponential backoff and every subscriber
// is woken, since notifications may have been missed meanwhile. The session
// connection sends the notifications (pg_notify) and holds the locks
// (session advisory locks, freed by PostgreSQL when the session ends); it is
// used by one query at a time, reopened lazily after it ended, and checked
// every HealthInterval while a lock is held. When it ends, every lock it
// held is lost: their Lost channels are closed.
//
// A Postgres needs a direct connection to PostgreSQL or a session-pooling
// proxy: a transaction-pooling proxy (PgBouncer's transaction mode) breaks
// both LISTEN and session locks.
type Postgres struct {
	opts  PostgresOptions
	log   *zap.Logger
	cfg   *pgx.ConnConfig
	hub   Hub
	locks localLocks
	stats postgresStats

	// ctx ends at Close; it stops the background goroutines and aborts
	// in-flight queries. wg counts the goroutines.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once

	// listenerPID is the backend process of the listener connection (tests).
	listenerPID atomic.Uint32
	// heldCount mirrors len(held) for the health check's quick test.
	heldCount atomic.Int64

	// sem is the session mutex (a channel so that waiting for it can end
	// with a context); it guards the fields below.
	sem     chan struct{}
	session *pgx.Conn
	held    map[*pgLock]struct{}
	closed  bool
}

// NewPostgres connects a Postgres coordinator to the database named by dsn
// (a PostgreSQL connection string as pgx understands it). It fails when
// either connection cannot be opened; its errors never contain the DSN.
// ctx bounds the connection set-up only.
func NewPostgres(ctx context.Context, dsn string, opts PostgresOptions) (*Postgres, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		// Not wrapped: pgx's parse error carries the connection string,
		// password included, and its redaction is best effort.
		return nil, errors.New("cluster: cannot parse the PostgreSQL connection string")
	}
	// One round trip per query, no prepared statements to keep.
	cfg.DefaultQueryExecMode = pgx.QueryExecModeExec
	p := &Postgres{
		opts: opts,
		log:  opts.Logger,
		cfg:  cfg,
		sem:  make(chan struct{}, 1),
		held: make(map[*pgLock]struct{}),
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	listener, err := p.openListener(ctx)
	if err != nil {
		p.cancel()
		return nil, err
	}
	session, err := p.connect(ctx, sessionAppName)
	if err != nil {
		closeConn(listener)
		p.cancel()
		return nil, fmt.Errorf("cluster: opening the session connection: %w", err)
	}
	p.session = session
	p.hub.Fallback = opts.FallbackInterval
	p.wg.Add(2)
	go p.listen(listener)
	go p.watchSession()
	return p, nil
}

// Subscribe implements Coordinator.
func (p *Postgres) Subscribe(topic string) *Subscription { return p.hub.Subscribe(topic) }

// Handle implements Coordinator.
func (p *Postgres) Handle(prefix string, fn func(topic string)) func() {
	return p.hub.Handle(prefix, fn)
}

// Publish implements Coordinator. It wakes this process's subscribers at
// once, then sends the notification through PostgreSQL, which delivers it
// to every instance (this one again: duplicate wake-ups merge). A topic
// longer than MaxTopicLen is refused with ErrTopicTooLong.
func (p *Postgres) Publish(ctx context.Context, topic string) error {
	if len(topic) > MaxTopicLen {
		return fmt.Errorf("cluster: publishing a topic of %d bytes (at most %d): %w", len(topic), MaxTopicLen, ErrTopicTooLong)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if p.ctx.Err() != nil {
		return ErrClosed
	}
	p.hub.Deliver(topic)
	if err := p.acquire(ctx); err != nil {
		return err
	}
	defer p.releaseSem()
	if p.closed || p.ctx.Err() != nil {
		return ErrClosed
	}
	p.stats.publishes.Add(1)
	err := p.sessionDo(ctx, true, func(ctx context.Context, c *pgx.Conn) error {
		_, err := c.Exec(ctx, `SELECT pg_notify($1::text, $2::text)`, p.opts.Channel, topic)
		return err
	})
	if err != nil {
		return fmt.Errorf("cluster: publishing: %w", err)
	}
	return nil
}

// TryLock implements Coordinator with a session advisory lock on the key
// lockKey(name). The name is first taken in-process (PostgreSQL session
// locks are re-entrant within their session) and given back if PostgreSQL
// refuses.
func (p *Postgres) TryLock(ctx context.Context, name string) (Lock, bool, error) {
	p.stats.lockAttempts.Add(1)
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	if p.ctx.Err() != nil {
		return nil, false, ErrClosed
	}
	if !p.locks.tryTake(name) {
		return nil, false, nil
	}
	taken := false
	defer func() {
		if !taken {
			p.locks.drop(name)
		}
	}()
	if err := p.acquire(ctx); err != nil {
		return nil, false, err
	}
	defer p.releaseSem()
	if p.closed || p.ctx.Err() != nil {
		return nil, false, ErrClosed
	}
	key := lockKey(name)
	var ok bool
	err := p.sessionDo(ctx, true, func(ctx context.Context, c *pgx.Conn) error {
		return c.QueryRow(ctx, `SELECT pg_try_advisory_lock($1::bigint)`, key).Scan(&ok)
	})
	if err != nil {
		return nil, false, fmt.Errorf("cluster: taking lock %q: %w", name, err)
	}
	if !ok {
		return nil, false, nil
	}
	l := &pgLock{p: p, name: name, key: key, lost: make(chan struct{})}
	p.held[l] = struct{}{}
	p.heldCount.Add(1)
	p.stats.locksAcquired.Add(1)
	taken = true
	return l, true, nil
}

// Close implements Coordinator: it stops the listener, the fallback and
// the health check, aborts in-flight queries, closes both connections
// (which frees the locks in PostgreSQL) and closes the Lost channel of
// every lock still held. Later Publish and TryLock calls return ErrClosed.
// It is idempotent and returns nil.
func (p *Postgres) Close() error {
	p.once.Do(func() {
		p.cancel()
		p.wg.Wait()
		p.sem <- struct{}{}
		p.closed = true
		if p.session != nil {
			closeConn(p.session)
			p.session = nil
		}
		p.dropHeld(false)
		p.releaseSem()
	})
	return nil
}

// Stats returns the coordinator's counters.
func (p *Postgres) Stats() Stats {
	s := &p.stats
	return Stats{
		Publishes:             s.publishes.Load(),
		NotificationsReceived: s.notifications.Load(),
		LockAttempts:          s.lockAttempts.Load(),
		LocksAcquired:         s.locksAcquired.Load(),
		LocksLost:             s.locksLost.Load(),
		ListenerReconnects:    s.listenerReconnects.Load(),
		SessionReconnects:     s.sessionReconnects.Load(),
		RoundTrips:            s.roundTrips.Load(),
		HealthChecks:          s.healthChecks.Load(),
	}
}

// lockKey maps a lock name to its advisory lock key: the first 8 bytes of
// SHA-256("matrix_media/" + name) with the sign bit set. The mapping is
// part of the protocol between instances: changing it lets an old and a
// new instance hold the same lock at once during a rolling upgrade.
//
// Collisions. The key is in PostgreSQL's single-bigint key space, which
// sqlstore's collectorLockKey and migrationLockKey also use; both are
// positive and every key here is negative, so those never collide. (The
// per-user locks of sqlstore use the separate two-int4 key space.) Two
// names collide with probability 2^-63; among n names held at once the
// chance of any collision is about n²/2^64 (1e-13 for a million). A
// collision is never unsafe: the second name looks held (TryLock returns
// false) while the first is, in other processes; within one process the
// session's re-entrant count keeps both held until both are released. It
// only delays work. Other applications taking negative bigint advisory
// locks in the same database could collide likewise.
func lockKey(name string) int64 {
	sum := sha256.Sum256([]byte(lockKeyPrefix + name))
	return int64(binary.BigEndian.Uint64(sum[:8]) | 1<<63)
}

// pgLock is a Lock of a Postgres coordinator.
type pgLock struct {
	p    *Postgres
	name string
	key  int64
	// lost is closed, once, when the lock leaves p.held without Release.
	lost chan struct{}
	once sync.Once
}

// Lost implements Lock.
func (l *pgLock) Lost() <-chan struct{} { return l.lost }

// Release implements Lock: pg_advisory_unlock on the session that holds
// it. If that fails the session is ended (which frees its locks) and every
// lock it held is lost. After the session was lost, or the coordinator
// closed, Release does nothing.
func (l *pgLock) Release() { l.once.Do(func() { l.p.release(l) }) }

func (p *Postgres) release(l *pgLock) {
	if p.acquire(context.Background()) != nil {
		return // closing: Close ends the session, which frees the lock
	}
	defer p.releaseSem()
	if _, ok := p.held[l]; !ok {
		return
	}
	var ok bool
	err := p.sessionDo(context.Background(), false, func(ctx context.Context, c *pgx.Conn) error {
		return c.QueryRow(ctx, `SELECT pg_advisory_unlock($1::bigint)`, l.key).Scan(&ok)
	})
	if err != nil {
		if _, still := p.held[l]; still {
			// The session is alive but refused: end it so that PostgreSQL
			// frees the lock rather than keeping it forever.
			p.log.Warn("cluster: unlocking failed; ending the session", zap.String("lock", l.name), zap.Error(err))
			p.loseSession()
		}
		return
	}
	if !ok {
		p.log.Warn("cluster: PostgreSQL did not hold a lock being released", zap.String("lock", l.name))
	}
	delete(p.held, l)
	p.heldCount.Add(-1)
	p.locks.drop(l.name)
}

// acquire takes the session mutex, giving up when ctx ends or the
// coordinator closes.
func (p *Postgres) acquire(ctx context.Context) error {
	select {
	case p.sem <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-p.ctx.Done():
		return ErrClosed
	}
}

func (p *Postgres) releaseSem() { <-p.sem }

// sessionDo runs f on the session connection, opening one if there is
// none; the caller holds the session mutex. When f fails because the
// connection broke, the session is lost (see loseSession) and, if retry is
// set and the connection was not new, f runs once more on a new session:
// the failed attempt can have taken nothing, since its session ended.
func (p *Postgres) sessionDo(ctx context.Context, retry bool, f func(context.Context, *pgx.Conn) error) error {
	for attempt := 0; ; attempt++ {
		fresh := false
		if p.session == nil {
			c, err := p.connect(ctx, sessionAppName)
			if err != nil {
				return fmt.Errorf("opening the session connection: %w", err)
			}
			p.session, fresh = c, true
			p.stats.sessionReconnects.Add(1)
		}
		qctx, cancel := p.queryContext(ctx)
		err := f(qctx, p.session)
		cancel()
		p.stats.roundTrips.Add(1)
		if err == nil {
			return nil
		}
		if !broken(p.session, err) {
			return err
		}
		if p.ctx.Err() == nil {
			p.log.Warn("cluster: session connection lost", zap.Int("locks_lost", len(p.held)), zap.Error(err))
		}
		p.loseSession()
		if !retry || fresh || attempt > 0 || p.ctx.Err() != nil {
			return err
		}
	}
}

// broken reports whether err, returned by a query on c, means that c can
// no longer be used: PostgreSQL answers every other failure with an error
// message on a healthy connection.
func broken(c *pgx.Conn, err error) bool {
	var pe *pgconn.PgError
	return c.IsClosed() || !errors.As(err, &pe)
}

// loseSession ends the session connection and forgets its locks, closing
// their Lost channels; the caller holds the session mutex. The next use
// opens a new session.
func (p *Postgres) loseSession() {
	if p.session != nil {
		closeConn(p.session)
		p.session = nil
	}
	p.dropHeld(p.ctx.Err() == nil)
}

// dropHeld forgets every held lock and closes its Lost channel; the caller
// holds the session mutex. count says whether they count as lost.
func (p *Postgres) dropHeld(count bool) {
	for l := range p.held {
		close(l.lost)
		p.locks.drop(l.name)
		if count {
			p.stats.locksLost.Add(1)
		}
	}
	clear(p.held)
	p.heldCount.Store(0)
}

// queryContext bounds a query: it keeps ctx's values but not its
// cancellation, and ends after QueryTimeout or at Close. A cancelled query
// breaks its pgx connection, so following the caller's cancellation would
// lose every lock of the session because one request went away.
func (p *Postgres) queryContext(ctx context.Context) (context.Context, context.CancelFunc) {
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.opts.QueryTimeout)
	stop := context.AfterFunc(p.ctx, cancel)
	return qctx, func() {
		stop()
		cancel()
	}
}

// connect opens a connection named app, within QueryTimeout.
func (p *Postgres) connect(ctx context.Context, app string) (*pgx.Conn, error) {
	cfg := p.cfg.Copy()
	cfg.RuntimeParams["application_name"] = app
	cctx, cancel := context.WithTimeout(ctx, p.opts.QueryTimeout)
	defer cancel()
	stop := context.AfterFunc(p.ctx, cancel)
	defer stop()
	c, err := pgx.ConnectConfig(cctx, cfg)
	if err != nil {
		if p.ctx.Err() != nil {
			return nil, ErrClosed
		}
		return nil, err
	}
	return c, nil
}

// closeConn closes c, giving PostgreSQL a moment to hear the goodbye.
func closeConn(c *pgx.Conn) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = c.Close(ctx)
}

// openListener opens a listener connection and LISTENs on the channel.
func (p *Postgres) openListener(ctx context.Context) (*pgx.Conn, error) {
	c, err := p.connect(ctx, listenerAppName)
	if err != nil {
		return nil, fmt.Errorf("cluster: opening the listener connection: %w", err)
	}
	qctx, cancel := p.queryContext(ctx)
	defer cancel()
	_, err = c.Exec(qctx, "LISTEN "+pgx.Identifier{p.opts.Channel}.Sanitize())
	p.stats.roundTrips.Add(1)
	if err != nil {
		closeConn(c)
		return nil, fmt.Errorf("cluster: listening on channel %q: %w", p.opts.Channel, err)
	}
	p.listenerPID.Store(c.PgConn().PID())
	return c, nil
}

// listen delivers the notifications received on c, and on the connections
// that replace it when it breaks, until Close.
func (p *Postgres) listen(c *pgx.Conn) {
	defer p.wg.Done()
	for {
		err := p.receive(c)
		closeConn(c)
		if p.ctx.Err() != nil {
			return
		}
		p.log.Warn("cluster: listener connection lost; reconnecting", zap.Error(err))
		if c = p.reconnectListener(); c == nil {
			return
		}
		p.stats.listenerReconnects.Add(1)
		p.log.Info("cluster: listener reconnected")
		// Notifications sent while no connection listened are lost.
		p.hub.DeliverAll()
	}
}

// receive delivers the notifications received on c until c breaks or the
// coordinator closes. After HealthInterval without a notification it
// checks c with a round trip, so that a dead connection is noticed.
func (p *Postgres) receive(c *pgx.Conn) error {
	for {
		wctx, cancel := context.WithTimeout(p.ctx, p.opts.HealthInterval)
		n, err := c.WaitForNotification(wctx)
		cancel()
		switch {
		case err == nil:
			p.stats.notifications.Add(1)
			p.hub.Deliver(n.Payload)
		case p.ctx.Err() != nil:
			return ErrClosed
		case c.IsClosed() || !pgconn.Timeout(err):
			return err
		default:
			// Idle for HealthInterval; a timed-out wait leaves c usable.
			qctx, cancel := p.queryContext(p.ctx)
			err := c.Ping(qctx)
			cancel()
			p.stats.roundTrips.Add(1)
			p.stats.healthChecks.Add(1)
			if err != nil {
				return err
			}
		}
	}
}

// reconnectListener opens a new listener connection, waiting
// ReconnectDelay before the first attempt and twice as long after each
// failure, up to MaxReconnectDelay. It returns nil at Close.
func (p *Postgres) reconnectListener() *pgx.Conn {
	delay := p.opts.ReconnectDelay
	for {
		t := time.NewTimer(delay)
		select {
		case <-p.ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		c, err := p.openListener(p.ctx)
		if err == nil {
			return c
		}
		if p.ctx.Err() != nil {
			return nil
		}
		p.log.Warn("cluster: reconnecting the listener failed", zap.Duration("retry_in", delay), zap.Error(err))
		delay = min(2*delay, p.opts.MaxReconnectDelay)
	}
}

// watchSession checks the session connection every HealthInterval while a
// lock is held, so that the locks of a session that ended are reported
// lost even when no query runs.
func (p *Postgres) watchSession() {
	defer p.wg.Done()
	t := time.NewTicker(p.opts.HealthInterval)
	defer t.Stop()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-t.C:
		}
		if p.heldCount.Load() == 0 {
			continue
		}
		if p.acquire(p.ctx) != nil {
			return
		}
		if !p.closed && p.session != nil && len(p.held) > 0 {
			p.stats.healthChecks.Add(1)
			_ = p.sessionDo(p.ctx, false, func(ctx context.Context, c *pgx.Conn) error { return c.Ping(ctx) })
		}
		p.releaseSem()
	}
}

// sessionPID is the backend process of the session connection, 0 when
// there is none (for tests).
func (p *Postgres) sessionPID() uint32 {
	p.sem <- struct{}{}
	defer p.releaseSem()
	if p.session == nil {
		return 0
	}
	return p.session.PgConn().PID()
}

// Interface guard.
var _ Coordinator = (*Postgres)(nil)
