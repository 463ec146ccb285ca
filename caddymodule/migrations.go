package caddymodule

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/migrate"
)

// migrationGrace is how long a migrated blob's old copy is kept before it is
// deleted, so that downloads that opened it just before the switch finish.
const migrationGrace = 30 * time.Second

// Errors of migrations.start.
var (
	errMigrationRunning = errors.New("a migration from or to one of these datastores is already running")
	errUnknownDatastore = errors.New("unknown datastore")
)

// migration is one background migration job.
type migration struct {
	ID       string           `json:"id"`
	Progress migrate.Progress `json:"progress"`
	// Error is the error that ended the job early, if any.
	Error string `json:"error,omitempty"`

	cancel context.CancelFunc
	done   chan struct{}
}

// migrations runs and remembers the migration jobs of one set of resources.
// Jobs live as long as the resources (they survive reloads that keep the
// stores) and are cancelled when the resources are destroyed.
type migrations struct {
	meta   storage.MetadataStore
	stores *storage.Datastores
	logger *zap.Logger
	// grace is how long old copies are kept (migrationGrace; tests shorten
	// it).
	grace time.Duration
	// spawn runs a job's goroutine: the repository's Go (panics recovered,
	// the stores held open); false when the repository is draining.
	spawn func(where string, fn func()) bool

	mu   sync.Mutex
	jobs map[string]*migration
	// closed is set by stop; no job starts after it.
	closed bool
}

// newMigrations returns the migration jobs of the stores; spawn starts their
// goroutines (mediaapi.Repository.Go).
func newMigrations(meta storage.MetadataStore, stores *storage.Datastores, logger *zap.Logger, spawn func(where string, fn func()) bool) *migrations {
	return &migrations{meta: meta, stores: stores, logger: logger, grace: migrationGrace, jobs: map[string]*migration{}, spawn: spawn}
}

// start begins moving every blob of datastore from to datastore to, in the
// background, and returns the job's id.
func (ms *migrations) start(from, to string) (string, error) {
	for _, name := range []string{from, to} {
		if _, ok := ms.stores.Get(name); !ok {
			return "", fmt.Errorf("starting migration: %w %q (configured: %v)", errUnknownDatastore, name, ms.stores.Names())
		}
	}
	if from == to {
		return "", errors.New("starting migration: source and target are the same datastore")
	}
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if ms.closed {
		return "", errors.New("starting migration: the media repository is shutting down")
	}
	for _, j := range ms.jobs {
		running := j.Progress.Running
		select {
		case <-j.done:
			running = false
		default:
		}
		if running && (j.Progress.From == from || j.Progress.To == from || j.Progress.From == to || j.Progress.To == to) {
			return "", fmt.Errorf("starting migration: %w (job %s)", errMigrationRunning, j.ID)
		}
	}
	// Known totals from the start, so progress is never shown as done
	// before the first blob moved.
	total, bytes, err := ms.meta.CountBlobs(context.Background(), from)
	if err != nil {
		return "", fmt.Errorf("starting migration: counting blobs of %s: %w", from, err)
	}
	var idb [8]byte
	_, _ = rand.Read(idb[:])
	ctx, cancel := context.WithCancel(context.Background())
	j := &migration{
		ID:       hex.EncodeToString(idb[:]),
		Progress: migrate.Progress{From: from, To: to, Running: true, Started: time.Now(), TotalBlobs: total, TotalBytes: bytes},
		cancel:   cancel,
		done:     make(chan struct{}),
	}
	if !ms.spawn("migration", func() { ms.run(ctx, j) }) {
		cancel()
		return "", errors.New("starting migration: the media repository is shutting down")
	}
	ms.jobs[j.ID] = j
	ms.logger.Info("migration started", zap.String("id", j.ID), zap.String("from", from), zap.String("to", to))
	return j.ID, nil
}

// run executes job j.
func (ms *migrations) run(ctx context.Context, j *migration) {
	defer close(j.done)
	defer func() {
		// Also when migrate.Run panicked (recovered by spawn).
		ms.mu.Lock()
		if j.Progress.Running {
			j.Progress.Running = false
			j.Error = "migration stopped by an internal error"
		}
		ms.mu.Unlock()
	}()
	p, err := migrate.Run(ctx, ms.meta, ms.stores, j.Progress.From, j.Progress.To, migrate.Options{
		Logger:      ms.logger,
		DeleteGrace: ms.grace,
		OnProgress: func(p migrate.Progress) {
			ms.mu.Lock()
			j.Progress = p
			ms.mu.Unlock()
		},
	})
	ms.mu.Lock()
	j.Progress = p
	j.Progress.Running = false
	if err != nil {
		j.Error = err.Error()
	}
	ms.mu.Unlock()
	fields := []zap.Field{zap.String("id", j.ID), zap.String("from", p.From), zap.String("to", p.To),
		zap.Int64("blobs", p.DoneBlobs), zap.Int64("failed", p.FailedBlobs), zap.Int64("bytes", p.DoneBytes)}
	if err != nil {
		ms.logger.Error("migration ended early", append(fields, zap.Error(err))...)
		return
	}
	ms.logger.Info("migration finished", fields...)
}

// list returns a snapshot of every job, newest first.
func (ms *migrations) list() []migration {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	out := make([]migration, 0, len(ms.jobs))
	for _, j := range ms.jobs {
		out = append(out, migration{ID: j.ID, Progress: j.Progress, Error: j.Error})
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Progress.Started.After(out[b].Progress.Started) })
	return out
}

// get returns a snapshot of one job.
func (ms *migrations) get(id string) (migration, bool) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	j, ok := ms.jobs[id]
	if !ok {
		return migration{}, false
	}
	return migration{ID: j.ID, Progress: j.Progress, Error: j.Error}, true
}

// cancel stops a job; what it moved stays moved, and starting the same
// migration again resumes with the rest.
func (ms *migrations) cancel(id string) bool {
	ms.mu.Lock()
	j, ok := ms.jobs[id]
	ms.mu.Unlock()
	if ok {
		j.cancel()
		<-j.done
	}
	return ok
}

// stop cancels every job and waits for them.
func (ms *migrations) stop() {
	ms.mu.Lock()
	ms.closed = true
	jobs := make([]*migration, 0, len(ms.jobs))
	for _, j := range ms.jobs {
		jobs = append(jobs, j)
	}
	ms.mu.Unlock()
	for _, j := range jobs {
		j.cancel()
		<-j.done
	}
}
