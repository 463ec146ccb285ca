package caddymodule

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/jobs"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/migrate"
)

// migrationGrace is how long a migrated blob's old copy is kept before it is
// deleted, so that downloads that opened it just before the switch finish.
const migrationGrace = 30 * time.Second

// kindMigrate is the job kind of blob migrations.
const kindMigrate = "migrate"

// Errors of migrations.start.
var (
	errMigrationRunning = errors.New("a migration from or to one of these datastores is already running")
	errUnknownDatastore = errors.New("unknown datastore")
	errSameDatastore    = errors.New("source and target are the same datastore")
	errMigrationsClosed = errors.New("starting migration: the media repository is shutting down")
)

// migration is one migration job as the admin API shows it.
type migration struct {
	ID       string           `json:"id"`
	Progress migrate.Progress `json:"progress"`
	// Error is the error that ended the job early, if any.
	Error string `json:"error,omitempty"`
}

// migrateParams are the parameters of a migrate job: the datastores, and
// what the source held when the job was started (the totals of its
// progress).
type migrateParams struct {
	From       string `json:"from"`
	To         string `json:"to"`
	TotalBlobs int64  `json:"total_blobs"`
	TotalBytes int64  `json:"total_bytes"`
}

// migrateCursor is the cursor of a migrate job: the checkpoint to resume
// after (migrate.Options.After) and the failures so far. The blobs and
// bytes moved are the job's counters.
type migrateCursor struct {
	After       string `json:"after,omitempty"`
	FailedBlobs int64  `json:"failed_blobs,omitempty"`
	LastError   string `json:"last_error,omitempty"`
}

// migrations runs blob migrations as persisted jobs of the job runner: each
// runs on one instance at a time, saves a checkpoint after every page of
// blobs, and resumes from it after a restart or on another instance when
// its own dies. Whether one is already running is read from the jobs table,
// so it is decided for every instance sharing the database.
type migrations struct {
	meta   storage.MetadataStore
	stores *storage.Datastores
	runner *jobs.Runner
	logger *zap.Logger
	// grace is how long old copies are kept (migrationGrace; tests shorten
	// it).
	grace time.Duration

	mu sync.Mutex
	// live is the progress of the jobs running here, fresher than their
	// rows (which are written at checkpoints and lease renewals).
	live map[string]migrate.Progress
	// closed is set by stop; no job starts after it.
	closed bool
}

// newMigrations returns the migrations of the stores and registers their
// job kind with runner (before it runs).
func newMigrations(meta storage.MetadataStore, stores *storage.Datastores, runner *jobs.Runner, logger *zap.Logger) *migrations {
	ms := &migrations{meta: meta, stores: stores, runner: runner, logger: logger, grace: migrationGrace, live: map[string]migrate.Progress{}}
	runner.Register(kindMigrate, ms.run)
	return ms
}

// start begins moving every blob of datastore from to datastore to, as a
// background job, and returns it.
func (ms *migrations) start(ctx context.Context, from, to string) (migration, error) {
	for _, name := range []string{from, to} {
		if _, ok := ms.stores.Get(name); !ok {
			return migration{}, fmt.Errorf("starting migration: %w %q (configured: %v)", errUnknownDatastore, name, ms.stores.Names())
		}
	}
	if from == to {
		return migration{}, fmt.Errorf("starting migration: %w", errSameDatastore)
	}
	ms.mu.Lock()
	closed := ms.closed
	ms.mu.Unlock()
	if closed {
		return migration{}, errMigrationsClosed
	}
	if other, err := ms.overlapping(ctx, from, to, storage.Job{}); err != nil {
		return migration{}, err
	} else if other != "" {
		return migration{}, fmt.Errorf("starting migration: %w (job %s)", errMigrationRunning, other)
	}
	// Known totals from the start, so progress is never shown as done
	// before the first blob moved.
	total, bytes, err := ms.meta.CountBlobs(ctx, from)
	if err != nil {
		return migration{}, fmt.Errorf("starting migration: counting blobs of %s: %w", from, err)
	}
	raw, err := json.Marshal(migrateParams{From: from, To: to, TotalBlobs: total, TotalBytes: bytes})
	if err != nil {
		return migration{}, fmt.Errorf("starting migration: %w", err)
	}
	var idb [8]byte
	_, _ = rand.Read(idb[:])
	j, err := ms.runner.StartWithID(ctx, hex.EncodeToString(idb[:]), kindMigrate, raw, adminAPIRequester)
	switch {
	case errors.Is(err, jobs.ErrClosed):
		return migration{}, errMigrationsClosed
	case err != nil:
		return migration{}, fmt.Errorf("starting migration: %w", err)
	}
	// Two instances may have started overlapping migrations at once: the
	// later one (by creation, then ID) gives way.
	if other, err := ms.overlapping(ctx, from, to, j); err == nil && other != "" {
		if _, cerr := ms.runner.Cancel(context.WithoutCancel(ctx), j.ID); cerr != nil {
			ms.logger.Warn("cancelling a migration started at the same time as another", zap.String("id", j.ID), zap.Error(cerr))
		}
		return migration{}, fmt.Errorf("starting migration: %w (job %s)", errMigrationRunning, other)
	}
	ms.logger.Info("migration started", zap.String("id", j.ID), zap.String("from", from), zap.String("to", to))
	return ms.view(j), nil
}

// overlapping returns the ID of a running migration from or to from or to,
// "" when there is none. With self set (a job just started), only one
// created before it (or at the same time, with a smaller ID) counts.
func (ms *migrations) overlapping(ctx context.Context, from, to string, self storage.Job) (string, error) {
	js, err := ms.runner.List(ctx, maxJobsLimit)
	if err != nil {
		return "", fmt.Errorf("starting migration: %w", err)
	}
	for _, j := range js {
		if j.Kind != kindMigrate || j.State != storage.JobRunning || j.ID == self.ID {
			continue
		}
		var p migrateParams
		if json.Unmarshal(j.Params, &p) != nil {
			continue
		}
		if p.From != from && p.To != from && p.From != to && p.To != to {
			continue
		}
		if self.ID != "" && (j.CreatedAt.After(self.CreatedAt) || (j.CreatedAt.Equal(self.CreatedAt) && j.ID > self.ID)) {
			continue
		}
		return j.ID, nil
	}
	return "", nil
}

// run is the Func of migrate jobs: it moves the blobs left after the
// job's checkpoint and saves a checkpoint after every page.
func (ms *migrations) run(ctx context.Context, p *jobs.Progress) error {
	var params migrateParams
	if err := json.Unmarshal(p.Params(), &params); err != nil {
		return fmt.Errorf("decoding migration parameters: %w", err)
	}
	var cur migrateCursor
	if c := p.Cursor(); c != "" {
		if err := json.Unmarshal([]byte(c), &cur); err != nil {
			return fmt.Errorf("decoding migration cursor: %w", err)
		}
	}
	doneBlobs, doneBytes := p.Counts()
	// base is the progress of the earlier runs; this run's adds to it.
	base := migrate.Progress{
		From: params.From, To: params.To, TotalBlobs: params.TotalBlobs, TotalBytes: params.TotalBytes,
		DoneBlobs: doneBlobs, DoneBytes: doneBytes, FailedBlobs: cur.FailedBlobs, LastError: cur.LastError,
		Started: time.Now(), Running: true,
	}
	var (
		mu                 sync.Mutex
		addedBlobs, addedB int64 // of this run, already passed to p.Add
	)
	combine := func(run migrate.Progress) migrate.Progress {
		out := base
		out.DoneBlobs += run.DoneBlobs
		out.DoneBytes += run.DoneBytes
		out.FailedBlobs += run.FailedBlobs
		if run.LastError != "" {
			out.LastError = run.LastError
		}
		return out
	}
	record := func(run migrate.Progress) migrate.Progress {
		mu.Lock()
		defer mu.Unlock()
		p.Add(run.DoneBlobs-addedBlobs, run.DoneBytes-addedB)
		addedBlobs, addedB = run.DoneBlobs, run.DoneBytes
		all := combine(run)
		ms.mu.Lock()
		ms.live[p.ID()] = all
		ms.mu.Unlock()
		return all
	}
	save := func(after string, run migrate.Progress) error {
		all := record(run)
		raw, err := json.Marshal(migrateCursor{After: after, FailedBlobs: all.FailedBlobs, LastError: all.LastError})
		if err != nil {
			return err
		}
		return p.Save(ctx, string(raw))
	}
	record(migrate.Progress{})
	defer func() {
		ms.mu.Lock()
		delete(ms.live, p.ID())
		ms.mu.Unlock()
	}()
	final, err := migrate.Run(ctx, ms.meta, ms.stores, params.From, params.To, migrate.Options{
		Logger:       ms.logger.With(zap.String("job", p.ID())),
		DeleteGrace:  ms.grace,
		After:        cur.After,
		OnProgress:   func(run migrate.Progress) { record(run) },
		OnCheckpoint: save,
	})
	if err != nil {
		return err
	}
	// The failures counted after the last checkpoint (a move undone by the
	// delete step) are saved too; the cursor is the last checkpoint's.
	after := cur.After
	if c := p.Cursor(); c != "" {
		var last migrateCursor
		if json.Unmarshal([]byte(c), &last) == nil {
			after = last.After
		}
	}
	return save(after, final)
}

// view converts a migrate job for the admin API; a job running here shows
// its live progress.
func (ms *migrations) view(j storage.Job) migration {
	var params migrateParams
	_ = json.Unmarshal(j.Params, &params)
	var cur migrateCursor
	if j.Cursor != "" {
		_ = json.Unmarshal([]byte(j.Cursor), &cur)
	}
	m := migration{ID: j.ID, Error: j.Error, Progress: migrate.Progress{
		From: params.From, To: params.To, TotalBlobs: params.TotalBlobs, TotalBytes: params.TotalBytes,
		DoneBlobs: j.Items, DoneBytes: j.Bytes, FailedBlobs: cur.FailedBlobs, LastError: cur.LastError,
		Started: j.CreatedAt, Finished: j.FinishedAt, Running: j.State == storage.JobRunning,
	}}
	if m.Progress.Running {
		ms.mu.Lock()
		live, ok := ms.live[j.ID]
		ms.mu.Unlock()
		if ok {
			m.Progress.DoneBlobs, m.Progress.DoneBytes = live.DoneBlobs, live.DoneBytes
			m.Progress.FailedBlobs, m.Progress.LastError = live.FailedBlobs, live.LastError
		}
	}
	if j.State == storage.JobCancelled && m.Error == "" {
		m.Error = "migration cancelled"
	}
	return m
}

// list returns the migrations, newest first.
func (ms *migrations) list(ctx context.Context) ([]migration, error) {
	js, err := ms.runner.List(ctx, maxJobsLimit)
	if err != nil {
		return nil, err
	}
	out := []migration{}
	for _, j := range js {
		if j.Kind == kindMigrate {
			out = append(out, ms.view(j))
		}
	}
	return out, nil
}

// get returns one migration; ok is false when there is no such migration.
func (ms *migrations) get(ctx context.Context, id string) (m migration, ok bool, err error) {
	j, err := ms.runner.Get(ctx, id)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return migration{}, false, nil
	case err != nil:
		return migration{}, false, err
	case j.Kind != kindMigrate:
		return migration{}, false, nil
	}
	return ms.view(j), true, nil
}

// cancel stops a migration wherever it runs and returns it once it has
// stopped; what it moved stays moved, and starting the same migration
// again moves the rest.
func (ms *migrations) cancel(ctx context.Context, id string) (m migration, ok bool, err error) {
	if _, ok, err := ms.get(ctx, id); !ok || err != nil {
		return migration{}, ok, err
	}
	if _, err := ms.runner.Cancel(ctx, id); err != nil {
		return migration{}, false, err
	}
	j, err := ms.runner.Wait(ctx, id)
	if err != nil {
		return migration{}, false, err
	}
	return ms.view(j), true, nil
}

// stop refuses new migrations. Those running stop with the job runner,
// which leaves them for the next runner to resume.
func (ms *migrations) stop() {
	ms.mu.Lock()
	ms.closed = true
	ms.mu.Unlock()
}
