package redisbus

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testredis"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
)

// recorder collects what a Bus hands to its callbacks.
type recorder struct {
	invs    chan auth.Invalidation
	resyncs chan struct{}
}

func newRecorder() *recorder {
	return &recorder{invs: make(chan auth.Invalidation, 1000), resyncs: make(chan struct{}, 100)}
}

func (r *recorder) onInvalidation(inv auth.Invalidation) { r.invs <- inv }
func (r *recorder) onResync()                            { r.resyncs <- struct{}{} }

// next returns the next invalidation, failing the test if none arrives
// within d.
func (r *recorder) next(t *testing.T, d time.Duration) auth.Invalidation {
	t.Helper()
	select {
	case inv := <-r.invs:
		return inv
	case <-time.After(d):
		t.Fatalf("no invalidation received within %s", d)
		return auth.Invalidation{}
	}
}

// expect checks that the next invalidations are exactly want, in order.
func (r *recorder) expect(t *testing.T, want ...auth.Invalidation) {
	t.Helper()
	for i, w := range want {
		if got := r.next(t, time.Second); got != w {
			t.Fatalf("invalidation %d = %+v, want %+v", i, got, w)
		}
	}
}

// resyncCount returns how many resyncs were recorded so far.
func (r *recorder) resyncCount() int { return len(r.resyncs) }

// newBus starts a Bus on url, closed when the test ends.
func newBus(t *testing.T, url string, opts Options, r *recorder) *Bus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := New(ctx, url, opts, r.onInvalidation, r.onResync)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return b
}

// rawClient returns a plain go-redis client on url.
func rawClient(t *testing.T, url string) *redis.Client {
	t.Helper()
	o, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(o)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func publish(t *testing.T, b *Bus, inv auth.Invalidation) {
	t.Helper()
	if err := b.Publish(context.Background(), inv); err != nil {
		t.Fatalf("Publish(%+v): %v", inv, err)
	}
}

func tokenInv(hs, token string) auth.Invalidation {
	return auth.Invalidation{Homeserver: hs, Token: auth.HashToken(token)}
}

func userInv(hs, user string) auth.Invalidation {
	return auth.Invalidation{Homeserver: hs, UserID: user}
}

func TestDelivery(t *testing.T) {
	srv := testredis.Start(t)
	ra, rb := newRecorder(), newRecorder()
	a := newBus(t, srv.URL(), Options{}, ra)
	b := newBus(t, srv.URL(), Options{}, rb)
	// A bus on another channel hears nothing of the default channel.
	ro, rp := newRecorder(), newRecorder()
	newBus(t, srv.URL(), Options{Channel: "other"}, ro)
	p := newBus(t, srv.URL(), Options{Channel: "other"}, rp)

	tok := tokenInv("https://hs.example", "syt_secret")
	usr := userInv("https://hs.example", "@alice:example.org")
	publish(t, a, tok)
	publish(t, a, usr)
	rb.expect(t, tok, usr)

	// Redis delivers in publish order, so if the first thing A hears is
	// B's message, A skipped both of its own.
	fromB := userInv("https://other.example", "@bob:other.example")
	publish(t, b, fromB)
	ra.expect(t, fromB)
	rb.expectNothing(t)

	fromP := tokenInv("https://hs.example", "syt_other")
	publish(t, p, fromP)
	ro.expect(t, fromP)

	for _, r := range []*recorder{ra, rb, ro, rp} {
		if n := len(r.invs); n != 0 {
			t.Errorf("%d unexpected invalidations left", n)
		}
		if n := r.resyncCount(); n != 0 {
			t.Errorf("resync called %d times without a reconnect", n)
		}
	}
}

// expectNothing checks that no invalidation arrives for a short while.
func (r *recorder) expectNothing(t *testing.T) {
	t.Helper()
	select {
	case inv := <-r.invs:
		t.Fatalf("unexpected invalidation %+v", inv)
	case <-time.After(100 * time.Millisecond):
	}
}

func TestWireFormat(t *testing.T) {
	srv := testredis.Start(t)
	a := newBus(t, srv.URL(), Options{Channel: "wire"}, newRecorder())
	raw := rawClient(t, srv.URL())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sub := raw.Subscribe(ctx, "wire")
	defer sub.Close()
	if _, err := sub.ReceiveTimeout(ctx, 5*time.Second); err != nil { // subscribe confirmation
		t.Fatal(err)
	}

	hash := auth.HashToken("syt_secret")
	tests := []struct {
		inv  auth.Invalidation
		want map[string]string
	}{
		{tokenInv("https://hs.example", "syt_secret"), map[string]string{"h": "https://hs.example", "t": hex.EncodeToString(hash[:])}},
		{userInv("https://hs.example", "@alice:example.org"), map[string]string{"h": "https://hs.example", "u": "@alice:example.org"}},
	}
	for _, tt := range tests {
		publish(t, a, tt.inv)
		msg, err := sub.ReceiveMessage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(msg.Payload, "syt_secret") {
			t.Errorf("payload %s contains the token", msg.Payload)
		}
		var got map[string]string
		if err := json.Unmarshal([]byte(msg.Payload), &got); err != nil {
			t.Fatalf("payload %s: %v", msg.Payload, err)
		}
		if got["o"] != a.origin {
			t.Errorf("origin = %q, want %q", got["o"], a.origin)
		}
		delete(got, "o")
		if fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("payload %s, want fields %v", msg.Payload, tt.want)
		}
	}
}

func TestMalformedMessagesAreDropped(t *testing.T) {
	srv := testredis.Start(t)
	core, logs := observer.New(zapcore.WarnLevel)
	rb := newRecorder()
	newBus(t, srv.URL(), Options{Channel: "c", Logger: zap.New(core)}, rb)
	a := newBus(t, srv.URL(), Options{Channel: "c"}, newRecorder())
	raw := rawClient(t, srv.URL())

	hash := auth.HashToken("x")
	hexHash := hex.EncodeToString(hash[:])
	bad := []string{
		"",
		"not json",
		`[1,2,3]`,
		`{"o":1}`,
		`{"o":"x","h":"hs"}`,
		`{"o":"x","h":"hs","t":"` + hexHash + `","u":"@a:b"}`,
		`{"o":"x","h":"","u":"@a:b"}`,
		`{"h":"hs","u":"@a:b"}`,
		`{"o":"x","h":"hs","t":"zz` + hexHash[2:] + `"}`,
		`{"o":"x","h":"hs","t":"` + hexHash[:62] + `"}`,
		`{"o":"x","h":"hs","t":"` + strings.Repeat("0", 64) + `"}`,
	}
	ctx := context.Background()
	for _, p := range bad {
		if err := raw.Publish(ctx, "c", p).Err(); err != nil {
			t.Fatal(err)
		}
	}
	// A well-formed message from another instance, by hand and by a Bus,
	// still gets through after the bad ones.
	if err := raw.Publish(ctx, "c", `{"o":"raw","h":"hs","t":"`+hexHash+`"}`).Err(); err != nil {
		t.Fatal(err)
	}
	good := userInv("https://hs.example", "@alice:example.org")
	publish(t, a, good)
	rb.expect(t, auth.Invalidation{Homeserver: "hs", Token: hash}, good)
	rb.expectNothing(t)

	if n := logs.FilterMessage("dropping malformed token invalidation").Len(); n != len(bad) {
		t.Errorf("%d malformed messages logged, want %d: %v", n, len(bad), logs.All())
	}
}

func TestPublishRejectsInvalid(t *testing.T) {
	srv := testredis.Start(t)
	a := newBus(t, srv.URL(), Options{}, newRecorder())
	rb := newRecorder()
	newBus(t, srv.URL(), Options{}, rb)
	tests := []struct {
		name string
		inv  auth.Invalidation
	}{
		{"empty", auth.Invalidation{}},
		{"no homeserver", auth.Invalidation{UserID: "@a:b"}},
		{"no target", auth.Invalidation{Homeserver: "hs"}},
		{"both", auth.Invalidation{Homeserver: "hs", UserID: "@a:b", Token: auth.HashToken("t")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := a.Publish(context.Background(), tt.inv)
			if err == nil || !strings.HasPrefix(err.Error(), "publishing token invalidation: ") {
				t.Fatalf("Publish = %v, want a publishing error", err)
			}
		})
	}
	rb.expectNothing(t)
}

func TestNewErrorsHidePassword(t *testing.T) {
	// A port nothing listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	_ = l.Close()

	const password = "s3cretPassw0rd"
	tests := []struct {
		name string
		url  string
	}{
		{"bad scheme", "http://:" + password + "@127.0.0.1:6379/0"},
		{"bad port", "redis://user:" + password + "@127.0.0.1:notaport/0"},
		{"bad database", "redis://:" + password + "@127.0.0.1:6379/notadb"},
		{"bad query", "redis://:" + password + "@127.0.0.1:6379/0?dial_timeout=forever"},
		{"unparsable", "redis://:" + password + "@[::1/0"},
		{"unreachable", "redis://:" + password + "@127.0.0.1:" + closedPort + "/0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			b, err := New(ctx, tt.url, Options{}, func(auth.Invalidation) {}, nil)
			if err == nil {
				_ = b.Close()
				t.Fatal("New succeeded")
			}
			if strings.Contains(err.Error(), password) {
				t.Errorf("error %q contains the password", err)
			}
		})
	}
}

func TestNewNeedsCallback(t *testing.T) {
	srv := testredis.Start(t)
	if b, err := New(context.Background(), srv.URL(), Options{}, nil, nil); err == nil {
		_ = b.Close()
		t.Fatal("New accepted a nil onInvalidation")
	}
}

func TestResyncAfterRestart(t *testing.T) {
	srv := testredis.Start(t)
	ra, rb := newRecorder(), newRecorder()
	a := newBus(t, srv.URL(), Options{}, ra)
	newBus(t, srv.URL(), Options{}, rb)

	before := tokenInv("https://hs.example", "before")
	publish(t, a, before)
	rb.expect(t, before)

	srv.Stop()
	err := a.Publish(context.Background(), before)
	if err == nil || !strings.HasPrefix(err.Error(), "publishing token invalidation: ") {
		t.Fatalf("Publish with Redis down = %v, want a publishing error", err)
	}
	srv.Restart(t)

	for name, r := range map[string]*recorder{"A": ra, "B": rb} {
		select {
		case <-r.resyncs:
		case <-time.After(15 * time.Second):
			t.Fatalf("%s: onResync not called after the server restarted", name)
		}
	}

	after := userInv("https://hs.example", "@alice:example.org")
	publish(t, a, after)
	rb.expect(t, after)
	rb.expectNothing(t)
	if n := rb.resyncCount() + ra.resyncCount(); n != 0 {
		t.Errorf("%d extra resyncs", n)
	}
}

func TestConcurrentPublish(t *testing.T) {
	srv := testredis.Start(t)
	a := newBus(t, srv.URL(), Options{}, newRecorder())
	rb := newRecorder()
	newBus(t, srv.URL(), Options{}, rb)

	const workers, each = 8, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				errs <- a.Publish(context.Background(), userInv("hs", fmt.Sprintf("@u%d-%d:hs", w, i)))
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	for range workers * each {
		seen[rb.next(t, 5*time.Second).UserID] = true
	}
	if len(seen) != workers*each {
		t.Errorf("received %d distinct invalidations, want %d", len(seen), workers*each)
	}
}

func TestCloseStopsReceiving(t *testing.T) {
	tests := []struct {
		name       string
		stopServer bool
	}{
		{"server up", false},
		{"server down", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := testredis.Start(t)
			r := newRecorder()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			b, err := New(ctx, srv.URL(), Options{}, r.onInvalidation, r.onResync)
			if err != nil {
				t.Fatal(err)
			}
			if tt.stopServer {
				srv.Stop()
				time.Sleep(200 * time.Millisecond) // let the loop notice
			}
			closed := make(chan error, 1)
			go func() { closed <- b.Close() }()
			select {
			case err := <-closed:
				if err != nil && !tt.stopServer {
					t.Errorf("Close: %v", err)
				}
			case <-time.After(3 * time.Second):
				t.Fatal("Close did not return")
			}
			select {
			case <-b.done:
			default:
				t.Fatal("receive goroutine still running after Close")
			}
			if err := b.Close(); err != nil && !tt.stopServer {
				t.Errorf("second Close: %v", err)
			}
			if err := b.Publish(context.Background(), userInv("hs", "@a:hs")); err == nil {
				t.Error("Publish after Close succeeded")
			}
			if n := r.resyncCount(); n != 0 {
				t.Errorf("resync called %d times", n)
			}
		})
	}
}
