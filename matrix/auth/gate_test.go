package auth

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/ratelimit"
)

// limiterGate is a CheckGate on one bucket of a ratelimit.Limiter (the
// shape mediaapi gives it: a volume rule peeked before a check and charged
// one per failure).
type limiterGate struct {
	l    ratelimit.Limiter
	b    ratelimit.Bucket
	asks atomic.Int64
}

func (g *limiterGate) AllowCheck(ctx context.Context) (bool, time.Duration) {
	g.asks.Add(1)
	d := g.l.Take(ctx, g.b)
	return d.Allowed, d.RetryAfter
}

func (g *limiterGate) CheckFailed(ctx context.Context) {
	b := g.b
	b.Cost = 1
	g.l.Take(ctx, b)
}

func randomToken(t testing.TB) string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return "syt_" + hex.EncodeToString(b[:])
}

// TestGateLimitsFailedChecks sends 1,000 random tokens from one client:
// the homeserver is asked at most burst (+ the concurrency) times, the rest
// are refused with a FailedChecksError before any call; cached tokens pass.
func TestGateLimitsFailedChecks(t *testing.T) {
	const burst = 10
	for _, tc := range []struct {
		name    string
		workers int
	}{{"sequential", 1}, {"concurrent", 20}} {
		t.Run(tc.name, func(t *testing.T) {
			f := newAuthFixture(t, CacheOptions{})
			f.hs.addToken("tok-alice", "@alice:hs")
			if _, err := f.auth("tok-alice"); err != nil {
				t.Fatal(err)
			}
			f.hs.whoamis.Store(0)
			gate := &limiterGate{
				l: ratelimit.NewMemory(ratelimit.MemoryOptions{Now: f.clock.Now}),
				b: ratelimit.Bucket{Key: "ip:203.0.113.9", Rule: ratelimit.Rule{Rate: 1.0 / 60, Burst: burst, Debt: true}},
			}
			var unknown, limited atomic.Int64
			var wg sync.WaitGroup
			per := 1000 / tc.workers
			for range tc.workers {
				wg.Go(func() {
					for range per {
						_, err := f.site.Authenticate(context.Background(), Credentials{Token: randomToken(t), Gate: gate})
						var fe *FailedChecksError
						switch {
						case errors.Is(err, ErrUnknownToken):
							unknown.Add(1)
						case errors.As(err, &fe) && errors.Is(err, ErrTooManyFailedChecks):
							if fe.RetryAfter <= 0 || fe.RetryAfter > time.Minute {
								t.Errorf("RetryAfter = %s, want within a minute", fe.RetryAfter)
							}
							limited.Add(1)
						default:
							t.Errorf("unexpected result: %v", err)
						}
					}
				})
			}
			wg.Wait()
			calls := f.hs.whoamis.Load()
			t.Logf("%d tokens from one IP: %d homeserver calls, %d unknown, %d refused", per*tc.workers, calls, unknown.Load(), limited.Load())
			if max := int64(burst + tc.workers - 1); calls > max || calls < burst {
				t.Errorf("%d homeserver calls, want between %d and %d", calls, burst, max)
			}
			if unknown.Load() != calls || unknown.Load()+limited.Load() != int64(per*tc.workers) {
				t.Errorf("unknown %d, refused %d, calls %d", unknown.Load(), limited.Load(), calls)
			}
			// A cached token is answered without the gate.
			asks := gate.asks.Load()
			if u, err := f.site.Authenticate(context.Background(), Credentials{Token: "tok-alice", Gate: gate}); err != nil || u.UserID != "@alice:hs" {
				t.Errorf("cached valid token with the gate closed: %+v, %v", u, err)
			}
			if gate.asks.Load() != asks {
				t.Error("the gate was asked about a cached token")
			}
			// A minute later one more check is allowed.
			f.clock.Advance(time.Duration(calls-burst+1) * time.Minute)
			before := f.hs.whoamis.Load()
			if _, err := f.site.Authenticate(context.Background(), Credentials{Token: randomToken(t), Gate: gate}); !errors.Is(err, ErrUnknownToken) {
				t.Errorf("after the refill: %v, want the homeserver's answer", err)
			}
			if f.hs.whoamis.Load() != before+1 {
				t.Error("no homeserver call after the refill")
			}
		})
	}
}

// TestGateNotChargedForValidTokens checks that valid tokens never take from
// the gate.
func TestGateNotChargedForValidTokens(t *testing.T) {
	f := newAuthFixture(t, CacheOptions{})
	gate := &limiterGate{
		l: ratelimit.NewMemory(ratelimit.MemoryOptions{Now: f.clock.Now}),
		b: ratelimit.Bucket{Key: "ip", Rule: ratelimit.Rule{Rate: 1e-6, Burst: 2, Debt: true}},
	}
	for i := range 20 {
		tok := randomToken(t)
		f.hs.addToken(tok, "@u:hs")
		if _, err := f.site.Authenticate(context.Background(), Credentials{Token: tok, Gate: gate}); err != nil {
			t.Fatalf("valid token %d: %v", i, err)
		}
	}
	if gate.asks.Load() != 20 {
		t.Errorf("gate asked %d times, want 20 (once per new token)", gate.asks.Load())
	}
}

// pausingGate is a CheckGate that always allows, but can hold callers in
// AllowCheck: entered receives once per caller, and callers wait for
// release (when set) before answering.
type pausingGate struct {
	asks    atomic.Int64
	entered chan struct{}
	release chan struct{}
	pause   func()
}

func (g *pausingGate) AllowCheck(ctx context.Context) (bool, time.Duration) {
	g.asks.Add(1)
	if g.entered != nil {
		g.entered <- struct{}{}
	}
	if g.release != nil {
		<-g.release
	}
	if g.pause != nil {
		g.pause()
	}
	return true, 0
}

func (g *pausingGate) CheckFailed(context.Context) {}

// TestGateRechecksCacheAfterWaiting holds one caller in the gate while
// another checks the same token: when the first is let through, it finds
// the answer cached and does not ask the homeserver again, for a valid and
// for a rejected token.
func TestGateRechecksCacheAfterWaiting(t *testing.T) {
	for _, tc := range []struct {
		name  string
		valid bool
	}{{"valid token", true}, {"rejected token", false}} {
		t.Run(tc.name, func(t *testing.T) {
			f := newAuthFixture(t, CacheOptions{})
			tok := randomToken(t)
			if tc.valid {
				f.hs.addToken(tok, "@alice:hs")
			}
			gate := &pausingGate{entered: make(chan struct{}), release: make(chan struct{})}
			type result struct {
				user User
				err  error
			}
			held := make(chan result, 1)
			go func() {
				u, err := f.site.Authenticate(context.Background(), Credentials{Token: tok, Gate: gate})
				held <- result{u, err}
			}()
			<-gate.entered // the first caller is inside AllowCheck, without the lock

			// Another caller (another client: no gate) checks the token.
			u, err := f.auth(tok)
			if tc.valid && (err != nil || u.UserID != "@alice:hs") {
				t.Fatalf("second caller: %+v, %v", u, err)
			}
			if !tc.valid && !errors.Is(err, ErrUnknownToken) {
				t.Fatalf("second caller: %v, want ErrUnknownToken", err)
			}
			if n := f.hs.whoamis.Load(); n != 1 {
				t.Fatalf("%d homeserver calls before the release, want 1", n)
			}

			close(gate.release)
			r := <-held
			if tc.valid && (r.err != nil || r.user.UserID != "@alice:hs") {
				t.Errorf("held caller: %+v, %v, want @alice:hs", r.user, r.err)
			}
			if !tc.valid && !errors.Is(r.err, ErrUnknownToken) {
				t.Errorf("held caller: %v, want ErrUnknownToken", r.err)
			}
			if n := f.hs.whoamis.Load(); n != 1 {
				t.Errorf("%d homeserver calls, want 1 (the held caller must use the cached answer)", n)
			}
		})
	}
}

// TestGateConcurrentSameToken has many goroutines present one new valid
// token through a gate that yields the processor: whatever the
// interleaving, the homeserver is asked exactly once.
func TestGateConcurrentSameToken(t *testing.T) {
	const workers, rounds = 16, 20
	for round := range rounds {
		f := newAuthFixture(t, CacheOptions{})
		tok := randomToken(t)
		f.hs.addToken(tok, "@alice:hs")
		var n atomic.Int64
		gate := &pausingGate{pause: func() {
			// Stagger the callers so that some leave the gate after the
			// first check has finished.
			time.Sleep(time.Duration(n.Add(1)%4) * time.Millisecond)
		}}
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				u, err := f.site.Authenticate(context.Background(), Credentials{Token: tok, Gate: gate})
				if err != nil || u.UserID != "@alice:hs" {
					t.Errorf("round %d: %+v, %v", round, u, err)
				}
			})
		}
		wg.Wait()
		if calls := f.hs.whoamis.Load(); calls != 1 {
			t.Fatalf("round %d: %d homeserver calls for one token from %d goroutines, want 1", round, calls, workers)
		}
	}
}
