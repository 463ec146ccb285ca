// Package jobs runs background jobs whose progress is kept in a
// storage.JobStore, so that they survive restarts and run on one instance at
// a time when several share a database. It knows neither Matrix nor Caddy.
//
// # Protocol
//
// A job is a row of the JobStore: its kind names the Func that does the work
// (registered with Runner.Register), its params are the Func's input, and its
// cursor and counters are where the Func has got to. Whoever holds the job's
// lease runs it:
//
//  1. Start creates the row and claims its lease at once, then runs the Func
//     on a goroutine. Run, the runner's loop, claims the jobs whose holder
//     died (lease expired) and resumes them from their cursor, every
//     PollInterval and once at start.
//  2. While the Func runs, the runner renews the lease every third of its
//     duration, saving the counters with it, so a long batch never loses the
//     lease. The Func calls Progress.Save after each unit of work it has
//     committed; Save persists the cursor and the counters and renews the
//     lease too.
//  3. Every write is conditional on the lease (JobStore.UpdateJob gives
//     storage.ErrConflict when another runner took the job over or it was
//     cancelled). On a conflict, or when a renewal fails for longer than the
//     lease, the runner cancels the Func's context and Save returns an error
//     wrapping storage.ErrConflict: the Func must stop, and the work it does
//     after that is at most the one unit in progress.
//  4. When the Func returns, the runner writes the final state (done or
//     failed; a panic fails the job). When the runner is stopped instead
//     (Close, or the end of Run's context), the job is left running with its
//     lease released, so that the next runner resumes it at once.
//
// A Func must therefore be resumable: redoing the unit of work that follows
// the saved cursor must be harmless (deleting what is already deleted
// deletes nothing), and its counters should count only work it committed.
package jobs

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Defaults of Options.
const (
	// DefaultLease is how long a runner holds a job without renewing it.
	DefaultLease = time.Minute
	// DefaultPollInterval is how often Run looks for jobs to resume.
	DefaultPollInterval = 30 * time.Second
)

// finishTimeout bounds the final write of a job, which is made with a
// context of its own (the job's may be cancelled by then).
const finishTimeout = 30 * time.Second

// maxWaitPoll bounds the interval at which Wait reads a job run elsewhere.
const maxWaitPoll = time.Second

// Errors of the runner.
var (
	// ErrUnknownKind is returned by Start for a kind no Func is registered
	// for.
	ErrUnknownKind = errors.New("unknown job kind")
	// ErrClosed is returned by Start once the runner is closed.
	ErrClosed = errors.New("job runner closed")
)

// Causes of the cancellation of a job's context.
var (
	errStopped   = errors.New("job runner stopped")
	errLeaseLost = errors.New("job lease lost")
	errCancelled = errors.New("job cancelled")
)

// Func does the work of a job of one kind. It reads its parameters and the
// cursor to resume from in p, calls p.Add as work is committed and p.Save
// after each unit of work, and returns nil when the job is done. It must
// return soon after ctx ends or Save fails.
type Func func(ctx context.Context, p *Progress) error

// Options configure a Runner.
type Options struct {
	// Store keeps the jobs. Required.
	Store storage.JobStore
	// Owner identifies this runner in leases; it must differ between
	// runners sharing a store. Default: host name, process ID and a random
	// suffix.
	Owner string
	// Lease is how long a job is held without renewal; a runner that dies
	// loses its jobs to others after that long. Default: DefaultLease.
	Lease time.Duration
	// PollInterval is how often Run looks for jobs whose holder died.
	// Default: DefaultPollInterval.
	PollInterval time.Duration
	// Logger receives the runner's logs. Default: none.
	Logger *zap.Logger
	// Now is the clock of leases and timestamps. Default: time.Now.
	Now func() time.Time
	// Metrics, when not nil, count jobs (see NewMetrics).
	Metrics *Metrics
}

// Runner runs persisted background jobs. It is safe for concurrent use.
type Runner struct {
	store   storage.JobStore
	owner   string
	lease   time.Duration
	poll    time.Duration
	logger  *zap.Logger
	now     func() time.Time
	metrics *Metrics

	// base is the parent of every job's context; stop cancels it with
	// errStopped.
	base context.Context
	stop context.CancelCauseFunc

	mu      sync.Mutex
	kinds   map[string]Func
	running map[string]*execution
	closed  bool
	// wg counts executions; added to under mu while not closed.
	wg sync.WaitGroup
}

// execution is a job running on this runner.
type execution struct {
	cancel context.CancelCauseFunc
	// done is closed once the job's final state is written (or given up).
	done chan struct{}
}

// New returns a runner on opts.Store. It runs nothing until Start or Run.
func New(opts Options) (*Runner, error) {
	if opts.Store == nil {
		return nil, errors.New("jobs: a store is required")
	}
	if opts.Lease < 0 || opts.PollInterval < 0 {
		return nil, errors.New("jobs: lease and poll interval must not be negative")
	}
	r := &Runner{
		store: opts.Store, owner: opts.Owner, lease: opts.Lease, poll: opts.PollInterval,
		logger: opts.Logger, now: opts.Now, metrics: opts.Metrics,
		kinds: map[string]Func{}, running: map[string]*execution{},
	}
	if r.owner == "" {
		r.owner = defaultOwner()
	}
	if r.lease == 0 {
		r.lease = DefaultLease
	}
	if r.poll == 0 {
		r.poll = DefaultPollInterval
	}
	if r.logger == nil {
		r.logger = zap.NewNop()
	}
	if r.now == nil {
		r.now = time.Now
	}
	r.base, r.stop = context.WithCancelCause(context.Background())
	return r, nil
}

// defaultOwner is the host name, the process ID and a random suffix.
func defaultOwner() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "unknown-host"
	}
	return fmt.Sprintf("%s/%d/%s", host, os.Getpid(), randomHex(4))
}

// randomHex returns n random bytes in hex.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails (crypto/rand panics instead)
	return hex.EncodeToString(b)
}

// Owner returns the identity of the runner in leases.
func (r *Runner) Owner() string { return r.owner }

// Lease returns how long the runner holds a job without renewing it
// (Options.Lease with its default).
func (r *Runner) Lease() time.Duration { return r.lease }

// PollInterval returns how often Run looks for jobs to resume
// (Options.PollInterval with its default).
func (r *Runner) PollInterval() time.Duration { return r.poll }

// Register sets the Func of jobs of kind. Register the kinds before Run and
// Start; a kind registered twice keeps the last Func.
func (r *Runner) Register(kind string, fn Func) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.kinds[kind] = fn
}

// fn returns the Func of kind, or nil.
func (r *Runner) fn(kind string) Func {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.kinds[kind]
}

// Start creates a job of kind with a new ID, claims it and runs it in the
// background. ctx bounds only the creation: the job runs until it ends, is
// cancelled or the runner stops. The returned job is as created, with this
// runner as its owner when the claim succeeded (otherwise another runner
// claimed it first and runs it).
func (r *Runner) Start(ctx context.Context, kind string, params []byte, requestedBy string) (storage.Job, error) {
	return r.StartWithID(ctx, randomHex(12), kind, params, requestedBy)
}

// StartWithID is Start with the job's ID chosen by the caller. An ID already
// used gives an error wrapping storage.ErrConflict: callers use it to start a
// job at most once across runners (for example one per period).
func (r *Runner) StartWithID(ctx context.Context, id, kind string, params []byte, requestedBy string) (storage.Job, error) {
	if r.fn(kind) == nil {
		return storage.Job{}, fmt.Errorf("starting job: %w: %q", ErrUnknownKind, kind)
	}
	if r.isClosed() {
		return storage.Job{}, ErrClosed
	}
	now := r.now()
	j := storage.Job{
		ID: id, Kind: kind, Params: params, State: storage.JobRunning,
		RequestedBy: requestedBy, CreatedAt: now, UpdatedAt: now,
	}
	if err := r.store.CreateJob(ctx, j); err != nil {
		return storage.Job{}, fmt.Errorf("creating %s job: %w", kind, err)
	}
	r.metrics.created(kind)
	claimed, err := r.claimAndRun(ctx, j, false)
	switch {
	case err != nil:
		// The job exists; Run (here or elsewhere) resumes it.
		r.logger.Warn("created job not claimed", zap.String("job", id), zap.String("kind", kind), zap.Error(err))
	case claimed != nil:
		return *claimed, nil
	}
	return j, nil
}

// isClosed reports whether Close was called.
func (r *Runner) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// claimAndRun claims j and, when the claim succeeds, runs it on a goroutine.
// It returns the job as claimed (nil when another runner holds it or it is
// already running here).
func (r *Runner) claimAndRun(ctx context.Context, j storage.Job, resumed bool) (*storage.Job, error) {
	fn := r.fn(j.Kind)
	if fn == nil {
		return nil, nil
	}
	// Reserve the ID first, so that Start and Run never both run it here.
	e := &execution{done: make(chan struct{})}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil, ErrClosed
	}
	if _, dup := r.running[j.ID]; dup {
		r.mu.Unlock()
		return nil, nil
	}
	r.running[j.ID] = e
	r.wg.Add(1)
	r.mu.Unlock()
	started := false
	defer func() {
		if !started {
			r.forget(j.ID, e)
		}
	}()

	now := r.now()
	until := now.Add(r.lease)
	ok, err := r.store.ClaimJob(ctx, j.ID, r.owner, now, until)
	if err != nil {
		r.metrics.storeError(j.Kind)
		return nil, fmt.Errorf("claiming job %s: %w", j.ID, err)
	}
	if !ok {
		return nil, nil
	}
	// The row may have moved on since it was listed: run from what it says
	// now that it is ours.
	cur, err := r.store.GetJob(ctx, j.ID)
	if err != nil {
		r.metrics.storeError(j.Kind)
		return nil, fmt.Errorf("reading claimed job %s: %w", j.ID, err)
	}
	cur.Owner, cur.LeaseUntil = r.owner, until
	jctx, cancel := context.WithCancelCause(r.base)
	e.cancel = cancel
	started = true
	go r.execute(jctx, e, cur, fn, resumed)
	return &cur, nil
}

// forget removes the execution e of id and releases its count.
func (r *Runner) forget(id string, e *execution) {
	r.mu.Lock()
	if r.running[id] == e {
		delete(r.running, id)
	}
	r.mu.Unlock()
	close(e.done)
	r.wg.Done()
}

// execute runs a claimed job to its end and writes its outcome.
func (r *Runner) execute(ctx context.Context, e *execution, j storage.Job, fn Func, resumed bool) {
	defer r.forget(j.ID, e)
	defer e.cancel(nil)
	log := r.logger.With(zap.String("job", j.ID), zap.String("kind", j.Kind), zap.String("requested_by", j.RequestedBy))
	p := &Progress{r: r, cancel: e.cancel, job: j, leaseUntil: j.LeaseUntil}
	r.metrics.started(j.Kind, resumed)
	if resumed {
		log.Info("resuming job", zap.String("cursor", j.Cursor), zap.Int64("items", j.Items), zap.Int64("bytes", j.Bytes))
	} else {
		log.Info("starting job")
	}
	begin := time.Now()

	stopRenew := make(chan struct{})
	renewed := make(chan struct{})
	go func() {
		defer close(renewed)
		r.renewLoop(ctx, p, stopRenew)
	}()
	err := r.call(ctx, fn, p, log)
	close(stopRenew)
	<-renewed

	outcome := r.finish(ctx, p, err, log)
	r.metrics.finished(j.Kind, outcome, time.Since(begin))
}

// call calls fn, turning a panic into an error.
func (r *Runner) call(ctx context.Context, fn Func, p *Progress, log *zap.Logger) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("job panicked: %v", v)
			log.Error("job panicked", zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
		}
	}()
	return fn(ctx, p)
}

// Outcomes of an execution, as logged and counted.
const (
	outcomeDone        = string(storage.JobDone)
	outcomeFailed      = string(storage.JobFailed)
	outcomeCancelled   = string(storage.JobCancelled)
	outcomeInterrupted = "interrupted" // the runner stopped; resumed later
	outcomeLost        = "lost"        // another runner took the job over
)

// finish writes the outcome of an execution whose Func returned err and
// returns the outcome.
func (r *Runner) finish(ctx context.Context, p *Progress, err error, log *zap.Logger) string {
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finishTimeout)
	defer cancel()
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	j := p.snapshot()
	now := r.now()
	j.UpdatedAt = now
	cause := context.Cause(ctx)
	switch {
	case err == nil:
		j.State, j.FinishedAt = storage.JobDone, now
	case errors.Is(cause, errStopped):
		// Leave it running with the lease released: the next runner
		// resumes it at once.
		if uerr := r.store.UpdateJob(wctx, j, r.owner, now); uerr != nil && !errors.Is(uerr, storage.ErrConflict) {
			r.metrics.storeError(j.Kind)
			log.Warn("releasing interrupted job", zap.Error(uerr))
		}
		log.Info("job interrupted; it resumes on the next runner", zap.String("cursor", j.Cursor),
			zap.Int64("items", j.Items), zap.Int64("bytes", j.Bytes))
		return outcomeInterrupted
	case errors.Is(cause, errLeaseLost), errors.Is(cause, errCancelled), errors.Is(err, storage.ErrConflict):
		return r.lostOutcome(wctx, j, log)
	default:
		j.State, j.FinishedAt, j.Error = storage.JobFailed, now, err.Error()
	}
	if uerr := r.store.UpdateJob(wctx, j, r.owner, now); uerr != nil {
		if errors.Is(uerr, storage.ErrConflict) {
			return r.lostOutcome(wctx, j, log)
		}
		r.metrics.storeError(j.Kind)
		log.Error("saving job outcome; the job runs again once its lease expires",
			zap.String("state", string(j.State)), zap.NamedError("job_error", err), zap.Error(uerr))
		return outcomeInterrupted
	}
	fields := []zap.Field{zap.Int64("items", j.Items), zap.Int64("bytes", j.Bytes)}
	if j.State == storage.JobFailed {
		r.metrics.failed(j.Kind)
		log.Error("job failed", append(fields, zap.Error(err))...)
		return outcomeFailed
	}
	log.Info("job done", fields...)
	return outcomeDone
}

// lostOutcome reads the job that this runner no longer holds: cancelled, or
// taken over by another runner.
func (r *Runner) lostOutcome(ctx context.Context, j storage.Job, log *zap.Logger) string {
	cur, err := r.store.GetJob(ctx, j.ID)
	if err == nil && cur.State == storage.JobCancelled {
		log.Info("job cancelled", zap.Int64("items", j.Items), zap.Int64("bytes", j.Bytes))
		return outcomeCancelled
	}
	log.Warn("job lease lost to another runner", zap.String("owner", cur.Owner), zap.String("state", string(cur.State)))
	return outcomeLost
}

// renewLoop renews p's lease every third of the lease until stop is closed
// or ctx ends. It cancels the job when the lease is lost.
func (r *Runner) renewLoop(ctx context.Context, p *Progress, stop <-chan struct{}) {
	t := time.NewTicker(r.lease / 3)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := p.write(ctx, ""); err != nil && !errors.Is(err, storage.ErrConflict) {
			r.logger.Warn("renewing job lease", zap.String("job", p.job.ID), zap.Error(err))
		}
	}
}

// Wait waits until job id ends and returns it. A job run by this runner is
// seen at once, and Wait returns only after its execution has wound down
// (outcome stored, metrics counted); one run elsewhere is read from the store every PollInterval
// (at most every second). When ctx ends first, Wait returns the job as last
// read and ctx's error; the job goes on.
func (r *Runner) Wait(ctx context.Context, id string) (storage.Job, error) {
	interval := min(r.poll, maxWaitPoll)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		j, err := r.store.GetJob(ctx, id)
		if err != nil {
			return j, fmt.Errorf("reading job %s: %w", id, err)
		}
		var done <-chan struct{}
		r.mu.Lock()
		if e, ok := r.running[id]; ok {
			done = e.done
		}
		r.mu.Unlock()
		if j.State != storage.JobRunning {
			// The outcome is stored; when this runner ran the job, also
			// wait for its execution to wind down (metrics, logs), so
			// that what the caller reads next is settled.
			if done != nil {
				select {
				case <-ctx.Done():
					return j, ctx.Err()
				case <-done:
				}
			}
			return j, nil
		}
		select {
		case <-ctx.Done():
			return j, ctx.Err()
		case <-done:
		case <-t.C:
		}
	}
}

// Get returns job id, or an error wrapping storage.ErrNotFound.
func (r *Runner) Get(ctx context.Context, id string) (storage.Job, error) {
	j, err := r.store.GetJob(ctx, id)
	if err != nil {
		return j, fmt.Errorf("reading job %s: %w", id, err)
	}
	return j, nil
}

// List returns up to limit jobs, newest first.
func (r *Runner) List(ctx context.Context, limit int) ([]storage.Job, error) {
	js, err := r.store.ListJobs(ctx, limit)
	if err != nil {
		return nil, fmt.Errorf("listing jobs: %w", err)
	}
	return js, nil
}

// Cancel cancels job id wherever it runs (here at once; on another runner
// at its next renewal or Save) and returns it. Cancelling a finished job
// changes nothing and returns it as it is; an unknown job gives an error
// wrapping storage.ErrNotFound. What the job did stays done.
func (r *Runner) Cancel(ctx context.Context, id string) (storage.Job, error) {
	ok, err := r.store.CancelJob(ctx, id, r.now())
	if err != nil {
		return storage.Job{}, fmt.Errorf("cancelling job %s: %w", id, err)
	}
	if ok {
		r.mu.Lock()
		if e, running := r.running[id]; running && e.cancel != nil {
			e.cancel(errCancelled)
		}
		r.mu.Unlock()
	}
	return r.Get(ctx, id)
}

// Run resumes jobs whose holder died, at start and then every PollInterval,
// until ctx ends or Close is called; it then closes the runner (stopping
// every job it runs, which the next runner resumes) and returns.
func (r *Runner) Run(ctx context.Context) {
	defer r.Close()
	t := time.NewTicker(r.poll)
	defer t.Stop()
	for {
		r.resume(ctx)
		select {
		case <-ctx.Done():
			return
		case <-r.base.Done():
			return
		case <-t.C:
		}
	}
}

// resume claims and runs the claimable jobs of the registered kinds. It
// returns how many it started.
func (r *Runner) resume(ctx context.Context) int {
	js, err := r.store.ListClaimableJobs(ctx, r.now())
	if err != nil {
		if ctx.Err() == nil {
			r.metrics.storeError("")
			r.logger.Warn("listing claimable jobs", zap.Error(err))
		}
		return 0
	}
	n := 0
	for _, j := range js {
		if ctx.Err() != nil {
			break
		}
		claimed, err := r.claimAndRun(ctx, j, true)
		if err != nil {
			if errors.Is(err, ErrClosed) {
				break
			}
			r.logger.Warn("resuming job", zap.String("job", j.ID), zap.Error(err))
			continue
		}
		if claimed != nil {
			n++
		}
	}
	return n
}

// Close stops the runner: Start fails from then on, every running job's
// context is cancelled and Close waits until each has released its lease
// (jobs stay running in the store, for the next runner to resume). It is
// safe to call more than once.
func (r *Runner) Close() {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.stop(errStopped)
	r.wg.Wait()
}

// Progress is a running job's view of itself: its parameters, where to
// resume, and the calls that record progress. Its methods are safe for
// concurrent use.
type Progress struct {
	r      *Runner
	cancel context.CancelCauseFunc

	// mu guards job and leaseUntil.
	mu         sync.Mutex
	job        storage.Job
	leaseUntil time.Time
	// writeMu orders the writes of the job row (Save, renewal, finish).
	writeMu sync.Mutex
}

// ID returns the job's ID.
func (p *Progress) ID() string { return p.job.ID }

// RequestedBy names who started the job, for logs.
func (p *Progress) RequestedBy() string { return p.job.RequestedBy }

// Params returns the job's parameters.
func (p *Progress) Params() []byte { return p.job.Params }

// Cursor returns where the job last saved itself ("" at the start).
func (p *Progress) Cursor() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.job.Cursor
}

// Counts returns the job's counters: everything done so far, including what
// runs before a resume did.
func (p *Progress) Counts() (items, bytes int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.job.Items, p.job.Bytes
}

// Add counts items and bytes of committed work. They are persisted at the
// next Save or lease renewal.
func (p *Progress) Add(items, bytes int64) {
	p.mu.Lock()
	p.job.Items += items
	p.job.Bytes += bytes
	p.mu.Unlock()
	p.r.metrics.add(p.job.Kind, items, bytes)
}

// Save persists cursor and the counters and renews the lease. When the
// lease was lost or the job cancelled, it returns an error wrapping
// storage.ErrConflict, and the job's context is cancelled: the Func must
// stop.
func (p *Progress) Save(ctx context.Context, cursor string) error {
	p.mu.Lock()
	p.job.Cursor = cursor
	p.mu.Unlock()
	return p.write(ctx, "saving")
}

// snapshot returns the job as it should be written.
func (p *Progress) snapshot() storage.Job {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.job
}

// write saves the job's row and renews its lease. On a conflict it cancels
// the job. A failure that outlasts the lease cancels it too: another runner
// may have taken it over.
func (p *Progress) write(ctx context.Context, what string) error {
	p.writeMu.Lock()
	defer p.writeMu.Unlock()
	j := p.snapshot()
	now := p.r.now()
	j.UpdatedAt = now
	until := now.Add(p.r.lease)
	err := p.r.store.UpdateJob(ctx, j, p.r.owner, until)
	if what == "" {
		what = "renewing lease of"
	}
	switch {
	case err == nil:
		p.mu.Lock()
		p.leaseUntil = until
		p.mu.Unlock()
		return nil
	case errors.Is(err, storage.ErrConflict):
		p.cancel(errLeaseLost)
		return fmt.Errorf("%s job %s: lease lost or job cancelled: %w", what, j.ID, err)
	default:
		p.r.metrics.storeError(j.Kind)
		p.mu.Lock()
		expired := !now.Before(p.leaseUntil)
		p.mu.Unlock()
		if expired {
			p.cancel(errLeaseLost)
		}
		return fmt.Errorf("%s job %s: %w", what, j.ID, err)
	}
}
