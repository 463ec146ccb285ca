package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"runtime/debug"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/gc"

	"github.com/caddyserver/caddy/v2"
)

// Defaults of the gc option.
const (
	// DefaultGCInterval is how often the orphan collector runs.
	DefaultGCInterval = time.Hour
	// DefaultGCGrace is how old an unreferenced blob must be before it is
	// collected.
	DefaultGCGrace = gc.DefaultGrace
)

// GCConfig configures the orphan blob collector (the gc option). Each
// instance runs it; when several share a PostgreSQL database, an advisory
// lock lets one run at a time.
type GCConfig struct {
	// Interval is the time between runs; the first run comes one interval
	// after start. Default: 1h.
	Interval caddy.Duration `json:"interval,omitempty"`
	// Grace is how long an unreferenced blob (a failed upload, crash
	// leftovers, thumbnails of deleted media) is kept before it is
	// collected. It must exceed the clock skew between instances sharing a
	// database. Default: 1h.
	Grace caddy.Duration `json:"grace,omitempty"`
	// Off disables the background collector; `caddy matrix-media gc` still
	// works. Default: false.
	Off bool `json:"off,omitempty"`
}

// gcPolicy is the resolved gc option.
type gcPolicy struct {
	interval, grace time.Duration
	off             bool
}

// gcPolicyOf resolves c (nil: defaults).
func gcPolicyOf(c *GCConfig) (gcPolicy, error) {
	p := gcPolicy{interval: DefaultGCInterval, grace: DefaultGCGrace}
	if c == nil {
		return p, nil
	}
	if c.Interval < 0 || c.Grace < 0 {
		return p, errors.New("gc: interval and grace must not be negative")
	}
	if c.Interval > 0 {
		p.interval = time.Duration(c.Interval)
	}
	if c.Grace > 0 {
		p.grace = time.Duration(c.Grace)
	}
	p.off = c.Off
	return p, nil
}

// gcMetrics count collector runs. They live as long as the resources (and so
// keep their values across reloads that keep the stores).
type gcMetrics struct {
	runs     *prometheus.CounterVec
	blobs    *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	errors   prometheus.Counter
	duration prometheus.Histogram
}

func newGCMetrics() *gcMetrics {
	return &gcMetrics{
		runs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "gc_runs_total",
			Help: "Orphan collector runs, by result (ok, error, skipped: another instance held the lock).",
		}, []string{"result"}),
		blobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "gc_blobs_removed_total",
			Help: "Blobs removed by the orphan collector, by kind (unreferenced: record and bytes; unrecorded: bytes without a record).",
		}, []string{"kind"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "gc_bytes_removed_total",
			Help: "Bytes freed by the orphan collector, by kind.",
		}, []string{"kind"}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "gc_errors_total",
			Help: "Blobs the orphan collector failed to examine or remove, and failed runs.",
		}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "gc_duration_seconds",
			Help:    "Duration of orphan collector runs that were not skipped.",
			Buckets: prometheus.ExponentialBuckets(0.01, 4, 10),
		}),
	}
}

// collectors lists the metrics for registration.
func (m *gcMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.runs, m.blobs, m.bytes, m.errors, m.duration}
}

// observe records one run.
func (m *gcMetrics) observe(rep gc.Report, err error) {
	switch {
	case rep.Skipped:
		m.runs.WithLabelValues("skipped").Inc()
		return
	case err != nil:
		m.runs.WithLabelValues("error").Inc()
		if rep.Errors == 0 {
			m.errors.Inc()
		}
	default:
		m.runs.WithLabelValues("ok").Inc()
	}
	m.errors.Add(float64(rep.Errors))
	m.duration.Observe(rep.Duration.Seconds())
	if rep.DryRun {
		return
	}
	m.blobs.WithLabelValues("unreferenced").Add(float64(rep.Records))
	m.blobs.WithLabelValues("unrecorded").Add(float64(rep.Unrecorded))
	m.bytes.WithLabelValues("unreferenced").Add(float64(rep.RecordBytes))
	m.bytes.WithLabelValues("unrecorded").Add(float64(rep.UnrecordedBytes))
}

// gcJob runs the orphan collector of one set of resources in the background
// with the policy of the config provisioned last, and on demand (admin API).
type gcJob struct {
	coll    *gc.Collector
	metrics *gcMetrics
	logger  *zap.Logger

	// policy changes on reload; wake tells the loop to re-read it.
	mu     sync.Mutex
	policy gcPolicy
	wake   chan struct{}

	stop context.CancelFunc
	done chan struct{}
}

// newGCJob starts the background loop (with the default policy until
// configure is called).
func newGCJob(meta storage.MetadataStore, stores *storage.Datastores, logger *zap.Logger) (*gcJob, error) {
	coll, err := gc.New(meta, stores, nil)
	if err != nil {
		return nil, err
	}
	ctx, stop := context.WithCancel(context.Background())
	j := &gcJob{
		coll: coll, metrics: newGCMetrics(), logger: logger.Named("gc"),
		policy: gcPolicy{interval: DefaultGCInterval, grace: DefaultGCGrace},
		wake:   make(chan struct{}, 1), stop: stop, done: make(chan struct{}),
	}
	go j.loop(ctx)
	return j, nil
}

// configure sets the policy (called by every Provision; the last one wins).
func (j *gcJob) configure(p gcPolicy) {
	j.mu.Lock()
	changed := j.policy != p
	j.policy = p
	j.mu.Unlock()
	if changed {
		select {
		case j.wake <- struct{}{}:
		default:
		}
	}
}

func (j *gcJob) current() gcPolicy {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.policy
}

// loop runs the collector every interval until ctx ends. A policy change
// restarts the wait with the new interval.
func (j *gcJob) loop(ctx context.Context) {
	defer close(j.done)
	for {
		p := j.current()
		var tick <-chan time.Time
		var t *time.Timer
		if !p.off {
			t = time.NewTimer(p.interval)
			tick = t.C
		}
		select {
		case <-ctx.Done():
		case <-j.wake:
		case <-tick:
			_, _ = j.run(ctx, gc.Options{Grace: p.grace})
		}
		if t != nil {
			t.Stop()
		}
		if ctx.Err() != nil {
			return
		}
	}
}

// run collects once, logging and counting the outcome. A panic is recovered
// and reported as an error, so that it fails only this run.
func (j *gcJob) run(ctx context.Context, opts gc.Options) (rep gc.Report, err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("garbage collection panicked: %v", v)
			j.logger.Error("orphan collector panicked", zap.Any("panic", v), zap.ByteString("stack", debug.Stack()))
		}
		j.metrics.observe(rep, err)
	}()
	rep, err = j.coll.Run(ctx, opts)
	fields := []zap.Field{
		zap.Bool("dry_run", rep.DryRun), zap.Bool("skipped", rep.Skipped),
		zap.Int64("unreferenced", rep.Records), zap.Int64("unrecorded", rep.Unrecorded),
		zap.Int64("bytes", rep.Bytes()), zap.Int64("errors", rep.Errors), zap.Duration("duration", rep.Duration),
	}
	if err != nil {
		j.logger.Error("orphan collection failed", append(fields, zap.Error(err))...)
	} else if rep.Blobs() > 0 || rep.DryRun {
		j.logger.Info("orphan collection", fields...)
	}
	return rep, err
}

// close stops the loop and waits for a run in progress to end.
func (j *gcJob) close() {
	j.stop()
	<-j.done
}

// gcRequest is the body of POST /matrix_media/gc.
type gcRequest struct {
	// DryRun counts without removing.
	DryRun bool `json:"dry_run,omitempty"`
	// Grace overrides the configured grace period; "0s" collects every
	// unreferenced blob at once (only safe while no upload runs).
	Grace *caddy.Duration `json:"grace,omitempty"`
}

// gcResponse is the answer of POST /matrix_media/gc.
type gcResponse struct {
	gc.Report
	// Error is the first error of the run, if any.
	Error string `json:"error,omitempty"`
}

// handleGC runs the orphan collector once and answers its report: 200, or
// 409 when another collector holds the lock.
func (AdminAPI) handleGC(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	var req gcRequest
	if err := decodeAdminJSON(r, &req); err != nil {
		return err
	}
	if req.Grace != nil && *req.Grace < 0 {
		return apiError(http.StatusBadRequest, errors.New(`"grace" must not be negative`))
	}
	res, err := currentResources()
	if err != nil {
		return err
	}
	defer res.release()
	opts := gc.Options{Grace: res.gc.current().grace, DryRun: req.DryRun}
	if req.Grace != nil {
		opts.Grace = time.Duration(*req.Grace)
	}
	rep, err := res.gc.run(r.Context(), opts)
	out := gcResponse{Report: rep}
	if err != nil {
		out.Error = err.Error()
	}
	status := http.StatusOK
	if rep.Skipped {
		status = http.StatusConflict
		out.Error = "another orphan collector is running"
	}
	return writeAdminJSON(w, status, out)
}

// runGC implements `caddy matrix-media gc`.
func runGC(cmd *cobra.Command, _ []string) error {
	dry, _ := cmd.Flags().GetBool("dry-run")
	graceFlag, _ := cmd.Flags().GetString("grace")
	req := gcRequest{DryRun: dry}
	if graceFlag != "" {
		d, err := caddy.ParseDuration(graceFlag)
		if err != nil || d < 0 {
			return fmt.Errorf("--grace: want a duration such as 10m, got %q", graceFlag)
		}
		g := caddy.Duration(d)
		req.Grace = &g
	}
	var out gcResponse
	if err := adminRequest(cmd, http.MethodPost, adminPrefix+"gc", req, &out); err != nil {
		return err
	}
	verb := "removed"
	if out.DryRun {
		verb = "would remove"
	}
	fmt.Fprintf(cmd.OutOrStdout(), "%s %d unreferenced blob(s) (%s) and %d unrecorded blob(s) (%s) in %s; %d error(s)\n",
		verb, out.Records, humanize.IBytes(uint64(out.RecordBytes)), out.Unrecorded, humanize.IBytes(uint64(out.UnrecordedBytes)),
		out.Duration.Round(time.Millisecond), out.Errors)
	if out.Error != "" {
		return fmt.Errorf("orphan collection: %s", out.Error)
	}
	return nil
}
