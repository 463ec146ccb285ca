package jobs

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// backend opens a job store for a test; a and b are two handles on the same
// data (two instances sharing a database).
type backend struct {
	name string
	open func(t *testing.T) (a, b storage.JobStore)
}

// backends lists the stores the runner's tests run on; jobs_sql_test.go adds
// the SQL stores.
var backends = []backend{
	{"memory", func(*testing.T) (storage.JobStore, storage.JobStore) { s := newMemStore(); return s, s }},
}

// forEachBackend runs fn on every backend.
func forEachBackend(t *testing.T, fn func(t *testing.T, a, b storage.JobStore)) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			a, b := be.open(t)
			fn(t, a, b)
		})
	}
}

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// newRunner builds a runner on store, closed at the end of the test.
func newRunner(t *testing.T, store storage.JobStore, owner string, clock *testclock.Clock, opts ...func(*Options)) *Runner {
	t.Helper()
	o := Options{Store: store, Owner: owner, Now: clock.Now, Lease: time.Minute, PollInterval: time.Hour}
	for _, f := range opts {
		f(&o)
	}
	r, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

// wait waits for job id with a generous bound.
func wait(t *testing.T, r *Runner, id string) storage.Job {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	j, err := r.Wait(ctx, id)
	if err != nil {
		t.Fatalf("Wait(%s): %v", id, err)
	}
	return j
}

// countTo is a job that counts from its cursor to the number in its params,
// saving after each step; step, when not nil, is called before each step.
func countTo(step func(ctx context.Context, i int) error) Func {
	return func(ctx context.Context, p *Progress) error {
		n, err := strconv.Atoi(string(p.Params()))
		if err != nil {
			return err
		}
		i := 0
		if c := p.Cursor(); c != "" {
			if i, err = strconv.Atoi(c); err != nil {
				return err
			}
		}
		for ; i < n; i++ {
			if step != nil {
				if err := step(ctx, i); err != nil {
					return err
				}
			}
			p.Add(1, 10)
			if err := p.Save(ctx, strconv.Itoa(i+1)); err != nil {
				return err
			}
		}
		return nil
	}
}

func TestOutcomes(t *testing.T) {
	forEachBackend(t, func(t *testing.T, store, _ storage.JobStore) {
		clock := testclock.New(t0)
		m := NewMetrics()
		r := newRunner(t, store, "a", clock, func(o *Options) { o.Metrics = m })
		r.Register("count", countTo(nil))
		r.Register("fail", func(ctx context.Context, p *Progress) error {
			p.Add(2, 5)
			return errors.New("disk on fire")
		})
		r.Register("panic", func(ctx context.Context, p *Progress) error { panic("boom") })
		for i, tc := range []struct {
			kind, params string
			want         storage.JobState
			wantErr      string
			items, bytes int64
			cursor       string
		}{
			{kind: "count", params: "5", want: storage.JobDone, items: 5, bytes: 50, cursor: "5"},
			{kind: "count", params: "0", want: storage.JobDone},
			{kind: "fail", want: storage.JobFailed, wantErr: "disk on fire", items: 2, bytes: 5},
			{kind: "panic", want: storage.JobFailed, wantErr: "job panicked: boom"},
		} {
			j, err := r.Start(context.Background(), tc.kind, []byte(tc.params), "@admin:example.org")
			if err != nil {
				t.Fatalf("Test %d: Start: %v", i, err)
			}
			if j.Owner != "a" || j.Kind != tc.kind || j.RequestedBy != "@admin:example.org" {
				t.Errorf("Test %d: Start returned %+v", i, j)
			}
			got := wait(t, r, j.ID)
			if got.State != tc.want || got.Error != tc.wantErr || got.Items != tc.items || got.Bytes != tc.bytes || got.Cursor != tc.cursor {
				t.Errorf("Test %d: job = state %s error %q items %d bytes %d cursor %q; want %s %q %d %d %q",
					i, got.State, got.Error, got.Items, got.Bytes, got.Cursor, tc.want, tc.wantErr, tc.items, tc.bytes, tc.cursor)
			}
			if !got.FinishedAt.Equal(t0) || !got.CreatedAt.Equal(t0) || got.Owner != "" {
				t.Errorf("Test %d: finished %v created %v owner %q; want %v, %v and no owner", i, got.FinishedAt, got.CreatedAt, got.Owner, t0, t0)
			}
		}
		if _, err := r.Start(context.Background(), "nope", nil, "x"); !errors.Is(err, ErrUnknownKind) {
			t.Errorf("Start of an unknown kind: %v, want ErrUnknownKind", err)
		}
		if got := counterValue(t, m.runsFinished.WithLabelValues("count", "done")); got != 2 {
			t.Errorf("finished count/done = %v, want 2", got)
		}
		if got := counterValue(t, m.runsFinished.WithLabelValues("panic", "failed")); got != 1 {
			t.Errorf("finished panic/failed = %v, want 1", got)
		}
		if got := counterValue(t, m.itemsRemoved.WithLabelValues("count")); got != 5 {
			t.Errorf("items removed by count = %v, want 5", got)
		}
		if got := counterValue(t, m.errorsTotal.WithLabelValues("fail")); got != 1 {
			t.Errorf("errors of fail = %v, want 1", got)
		}
		js, err := r.List(context.Background(), 10)
		if err != nil || len(js) != 4 {
			t.Errorf("List = %d jobs, %v; want 4", len(js), err)
		}
		if _, err := r.Get(context.Background(), "missing"); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("Get of a missing job: %v, want ErrNotFound", err)
		}
	})
}

// blocker is a job step that, at step at, signals reached and blocks until
// release is closed or (when honourCtx) ctx ends.
type blocker struct {
	at        int
	honourCtx bool
	reached   chan struct{}
	release   chan struct{}
	once      sync.Once
}

func newBlocker(at int, honourCtx bool) *blocker {
	return &blocker{at: at, honourCtx: honourCtx, reached: make(chan struct{}), release: make(chan struct{})}
}

func (b *blocker) step(ctx context.Context, i int) error {
	if i != b.at {
		return nil
	}
	blocked := false
	b.once.Do(func() { blocked = true; close(b.reached) })
	if !blocked {
		return nil
	}
	if b.honourCtx {
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-b.release:
		}
		return nil
	}
	<-b.release
	return nil
}

func (b *blocker) waitReached(t *testing.T) {
	t.Helper()
	select {
	case <-b.reached:
	case <-time.After(30 * time.Second):
		t.Fatal("the job never reached its blocking step")
	}
}

func TestCancel(t *testing.T) {
	forEachBackend(t, func(t *testing.T, sa, sb storage.JobStore) {
		for i, remote := range []bool{false, true} {
			clock := testclock.New(t0)
			a := newRunner(t, sa, "a", clock)
			b := newRunner(t, sb, "b", clock, func(o *Options) { o.PollInterval = 5 * time.Millisecond })
			bl := newBlocker(3, !remote)
			a.Register("count", countTo(bl.step))
			j, err := a.Start(context.Background(), "count", []byte("10"), "op")
			if err != nil {
				t.Fatal(err)
			}
			bl.waitReached(t)
			canceller := a
			if remote {
				canceller = b
			}
			cj, err := canceller.Cancel(context.Background(), j.ID)
			if err != nil || cj.State != storage.JobCancelled {
				t.Fatalf("Test %d: Cancel = %+v, %v", i, cj, err)
			}
			if remote {
				// A runner elsewhere learns it at its next write.
				close(bl.release)
			}
			got := wait(t, b, j.ID)
			if got.State != storage.JobCancelled || got.Items != 3 || got.Cursor != "3" {
				t.Errorf("Test %d: job = %+v, want cancelled after 3 items", i, got)
			}
			a.Close() // waits for its execution to end
			a.mu.Lock()
			n := len(a.running)
			a.mu.Unlock()
			if n != 0 {
				t.Errorf("Test %d: %d executions left on a", i, n)
			}
			again, err := a.Cancel(context.Background(), j.ID)
			if err != nil || again.State != storage.JobCancelled {
				t.Errorf("Test %d: second Cancel = %+v, %v", i, again, err)
			}
		}
		if _, err := newRunner(t, sa, "c", testclock.New(t0)).Cancel(context.Background(), "missing"); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("Cancel of a missing job: %v, want ErrNotFound", err)
		}
	})
}

// TestInterruptedResumes stops a runner in the middle of a job: the job
// stays running with its lease released, and another runner resumes it from
// its cursor at once, the counters adding up.
func TestInterruptedResumes(t *testing.T) {
	forEachBackend(t, func(t *testing.T, sa, sb storage.JobStore) {
		clock := testclock.New(t0)
		m := NewMetrics()
		a := newRunner(t, sa, "a", clock, func(o *Options) { o.Metrics = m })
		bl := newBlocker(4, true)
		a.Register("count", countTo(bl.step))
		var stepsB atomic.Int64
		b := newRunner(t, sb, "b", clock, func(o *Options) { o.Metrics = m })
		b.Register("count", countTo(func(_ context.Context, i int) error {
			if i < 4 {
				return fmt.Errorf("step %d done again", i)
			}
			stepsB.Add(1)
			return nil
		}))
		j, err := a.Start(context.Background(), "count", []byte("10"), "op")
		if err != nil {
			t.Fatal(err)
		}
		bl.waitReached(t)
		a.Close()
		mid, err := b.Get(context.Background(), j.ID)
		if err != nil {
			t.Fatal(err)
		}
		if mid.State != storage.JobRunning || mid.Cursor != "4" || mid.Items != 4 || mid.LeaseUntil.After(clock.Now()) {
			t.Fatalf("after Close: %+v, want running at cursor 4 with its lease released", mid)
		}
		if _, err := a.Start(context.Background(), "count", []byte("1"), "op"); !errors.Is(err, ErrClosed) {
			t.Errorf("Start after Close: %v, want ErrClosed", err)
		}
		clock.Advance(time.Second) // the released lease is strictly in the past
		if n := b.resume(context.Background()); n != 1 {
			t.Fatalf("resume started %d jobs, want 1", n)
		}
		got := wait(t, b, j.ID)
		if got.State != storage.JobDone || got.Items != 10 || got.Bytes != 100 || stepsB.Load() != 6 {
			t.Errorf("job = %+v after %d steps on b; want done with 10 items (6 on b)", got, stepsB.Load())
		}
		if v := counterValue(t, m.runsFinished.WithLabelValues("count", "interrupted")); v != 1 {
			t.Errorf("interrupted runs = %v, want 1", v)
		}
		if v := counterValue(t, m.runsStarted.WithLabelValues("count", "resumed")); v != 1 {
			t.Errorf("resumed runs = %v, want 1", v)
		}
	})
}

// TestDeadHolder lets the lease of a stuck runner expire: another runner
// takes the job over from its cursor, and the stuck one, when it wakes,
// learns at its next Save that it lost the job and stops.
func TestDeadHolder(t *testing.T) {
	forEachBackend(t, func(t *testing.T, sa, sb storage.JobStore) {
		clock := testclock.New(t0)
		m := NewMetrics()
		a := newRunner(t, sa, "a", clock, func(o *Options) { o.Metrics = m })
		bl := newBlocker(2, false) // ignores its context: a hung process
		var stepsA, stepsB atomic.Int64
		a.Register("count", countTo(func(ctx context.Context, i int) error {
			stepsA.Add(1)
			return bl.step(ctx, i)
		}))
		b := newRunner(t, sb, "b", clock, func(o *Options) { o.Metrics = m })
		b.Register("count", countTo(func(_ context.Context, i int) error { stepsB.Add(1); return nil }))
		j, err := a.Start(context.Background(), "count", []byte("6"), "op")
		if err != nil {
			t.Fatal(err)
		}
		bl.waitReached(t)
		if n := b.resume(context.Background()); n != 0 {
			t.Fatalf("resume took over a job whose lease is valid")
		}
		clock.Advance(time.Minute + time.Second)
		if n := b.resume(context.Background()); n != 1 {
			t.Fatalf("resume started %d jobs, want 1", n)
		}
		got := wait(t, b, j.ID)
		if got.State != storage.JobDone || got.Items != 6 || stepsB.Load() != 4 {
			t.Errorf("job = %+v after %d steps on b; want done with 6 items (4 on b)", got, stepsB.Load())
		}
		aDone := executionDone(a, j.ID)
		close(bl.release)
		<-aDone
		if stepsA.Load() != 3 {
			t.Errorf("a ran %d steps, want 3 (it must stop at its first Save after waking)", stepsA.Load())
		}
		final, _ := b.Get(context.Background(), j.ID)
		if final.Items != 6 || final.State != storage.JobDone {
			t.Errorf("after a woke: %+v, want b's outcome kept", final)
		}
		if v := counterValue(t, m.runsFinished.WithLabelValues("count", "lost")); v != 1 {
			t.Errorf("lost runs = %v, want 1", v)
		}
	})
}

// TestLeaseRenewed runs a job for several lease periods without Save: the
// runner renews the lease in the background, and no other runner can claim
// it meanwhile.
func TestLeaseRenewed(t *testing.T) {
	store := newMemStore()
	store.updated = make(chan string, 16)
	lease := 300 * time.Millisecond
	a := newRunner(t, store, "a", testclock.New(t0), func(o *Options) { o.Lease = lease; o.Now = time.Now })
	b := newRunner(t, store, "b", testclock.New(t0), func(o *Options) { o.Lease = lease; o.Now = time.Now })
	stole := make(chan int, 1)
	a.Register("long", func(ctx context.Context, p *Progress) error {
		for range 4 {
			select {
			case <-store.updated:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		stole <- b.resume(ctx)
		return nil
	})
	j, err := a.Start(context.Background(), "long", nil, "op")
	if err != nil {
		t.Fatal(err)
	}
	got := wait(t, a, j.ID)
	if got.State != storage.JobDone {
		t.Errorf("job = %+v, want done", got)
	}
	if n := <-stole; n != 0 {
		t.Errorf("another runner claimed a job whose lease was being renewed")
	}
}

// TestRunResumesAtStart checks that Run claims claimable jobs as soon as it
// starts, and that jobs of kinds it does not know are left alone.
func TestRunResumesAtStart(t *testing.T) {
	forEachBackend(t, func(t *testing.T, sa, sb storage.JobStore) {
		clock := testclock.New(t0)
		ctx := context.Background()
		for _, j := range []storage.Job{
			{ID: "known", Kind: "count", Params: []byte("3"), Cursor: "1", Items: 1, Bytes: 10, CreatedAt: t0, UpdatedAt: t0},
			{ID: "unknown", Kind: "other", CreatedAt: t0, UpdatedAt: t0},
		} {
			j.State = storage.JobRunning
			if err := sa.CreateJob(ctx, j); err != nil {
				t.Fatal(err)
			}
		}
		// CreateJob need not store a cursor: save it as a holder would.
		if ok, err := sa.ClaimJob(ctx, "known", "dead", t0.Add(-2*time.Minute), t0.Add(-time.Minute)); !ok || err != nil {
			t.Fatalf("ClaimJob = %v, %v", ok, err)
		}
		if err := sa.UpdateJob(ctx, storage.Job{ID: "known", State: storage.JobRunning, Cursor: "1", Items: 1, Bytes: 10, UpdatedAt: t0},
			"dead", t0.Add(-time.Minute)); err != nil {
			t.Fatal(err)
		}
		r := newRunner(t, sb, "b", clock)
		r.Register("count", countTo(nil))
		runCtx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); r.Run(runCtx) }()
		got := wait(t, r, "known")
		if got.State != storage.JobDone || got.Items != 3 || got.Bytes != 30 {
			t.Errorf("known = %+v, want done with 3 items", got)
		}
		stop()
		<-done
		other, _ := r.Get(ctx, "unknown")
		if other.State != storage.JobRunning || other.Owner != "" {
			t.Errorf("unknown kind = %+v, want untouched", other)
		}
		if _, err := r.Start(ctx, "count", []byte("1"), "op"); !errors.Is(err, ErrClosed) {
			t.Errorf("Start after Run ended: %v, want ErrClosed", err)
		}
	})
}

// TestOneHolder runs two runners polling the same store for many jobs: each
// job runs exactly once and never on both runners at the same time.
func TestOneHolder(t *testing.T) {
	forEachBackend(t, func(t *testing.T, sa, sb storage.JobStore) {
		ctx := context.Background()
		const n = 20
		var mu sync.Mutex
		active := map[string]int{}
		runs := map[string]int{}
		var overlap atomic.Bool
		fn := func(ctx context.Context, p *Progress) error {
			mu.Lock()
			active[p.ID()]++
			runs[p.ID()]++
			if active[p.ID()] > 1 {
				overlap.Store(true)
			}
			mu.Unlock()
			defer func() {
				mu.Lock()
				active[p.ID()]--
				mu.Unlock()
			}()
			p.Add(1, 0)
			return p.Save(ctx, "done")
		}
		for i := range n {
			if err := sa.CreateJob(ctx, storage.Job{ID: fmt.Sprintf("job-%02d", i), Kind: "k", State: storage.JobRunning,
				CreatedAt: t0, UpdatedAt: t0}); err != nil {
				t.Fatal(err)
			}
		}
		var rs []*Runner
		for i, s := range []storage.JobStore{sa, sb} {
			r := newRunner(t, s, "runner-"+strconv.Itoa(i), testclock.New(t0), func(o *Options) {
				o.Now = time.Now
				o.PollInterval = 2 * time.Millisecond
			})
			r.Register("k", fn)
			rs = append(rs, r)
		}
		runCtx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		for _, r := range rs {
			wg.Go(func() { r.Run(runCtx) })
		}
		for i := range n {
			id := fmt.Sprintf("job-%02d", i)
			if j := wait(t, rs[i%2], id); j.State != storage.JobDone || j.Items != 1 {
				t.Errorf("%s = %+v, want done with 1 item", id, j)
			}
		}
		stop()
		wg.Wait()
		if overlap.Load() {
			t.Error("a job ran on two runners at once")
		}
		var multi []string
		for id, c := range runs {
			if c != 1 {
				multi = append(multi, fmt.Sprintf("%s ran %d times", id, c))
			}
		}
		if len(runs) != n || len(multi) > 0 {
			t.Errorf("%d jobs ran; %s", len(runs), strings.Join(multi, ", "))
		}
	})
}

func TestNewValidates(t *testing.T) {
	for i, o := range []Options{{}, {Store: newMemStore(), Lease: -1}, {Store: newMemStore(), PollInterval: -1}} {
		if _, err := New(o); err == nil {
			t.Errorf("Test %d: New(%+v) succeeded", i, o)
		}
	}
	r, err := New(Options{Store: newMemStore()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Owner() == "" || r.lease != DefaultLease || r.poll != DefaultPollInterval {
		t.Errorf("defaults: owner %q lease %v poll %v", r.Owner(), r.lease, r.poll)
	}
}

// counterValue reads a counter.
func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// executionDone returns a channel closed when r's execution of id ends
// (closed at once when r does not run it).
func executionDone(r *Runner, id string) <-chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	if e, ok := r.running[id]; ok {
		return e.done
	}
	c := make(chan struct{})
	close(c)
	return c
}
