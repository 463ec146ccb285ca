package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

var _ storage.JobStore = (*Store)(nil)

// jobColumns are the columns scanJob reads, in order.
const jobColumns = `id, kind, params, state, cursor, items, bytes, error, requested_by,
	created_ts, updated_ts, finished_ts, owner, lease_until`

// scanJob reads one row of jobColumns.
func scanJob(r scanner) (storage.Job, error) {
	var (
		j                                 storage.Job
		state                             string
		created, updated, finished, lease sql.NullInt64
	)
	if err := r.Scan(&j.ID, &j.Kind, &j.Params, &state, &j.Cursor, &j.Items, &j.Bytes, &j.Error, &j.RequestedBy,
		&created, &updated, &finished, &j.Owner, &lease); err != nil {
		return storage.Job{}, err
	}
	j.State = storage.JobState(state)
	j.CreatedAt = fromMillis(created)
	j.UpdatedAt = fromMillis(updated)
	j.FinishedAt = fromMillis(finished)
	j.LeaseUntil = fromMillis(lease)
	return j, nil
}

// queryJobs runs a jobColumns query and reads every row.
func (s *Store) queryJobs(ctx context.Context, query string, args ...any) ([]storage.Job, error) {
	rows, err := s.read.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, classify(err)
	}
	defer rows.Close()
	var out []storage.Job
	for rows.Next() {
		j, err := scanJob(rows)
		if err != nil {
			return nil, fmt.Errorf("reading row: %w", classify(err))
		}
		out = append(out, j)
	}
	if err := rows.Err(); err != nil {
		return nil, classify(err)
	}
	return out, nil
}

// CreateJob stores a new running job with no owner (j.State, Owner and
// LeaseUntil are ignored). An existing ID gives an error wrapping
// storage.ErrConflict.
func (s *Store) CreateJob(ctx context.Context, j storage.Job) error {
	if j.ID == "" || j.Kind == "" {
		return fmt.Errorf("creating job %q: an ID and a kind are required", j.ID)
	}
	_, err := s.write.ExecContext(ctx, s.q.createJob, j.ID, j.Kind, j.Params, string(storage.JobRunning), j.Cursor,
		j.Items, j.Bytes, j.Error, j.RequestedBy, millis(j.CreatedAt), millis(j.UpdatedAt))
	if isUniqueViolation(err) {
		return fmt.Errorf("creating job %s: %w", j.ID, storage.ErrConflict)
	}
	if err != nil {
		return fmt.Errorf("creating job %s: %w", j.ID, classify(err))
	}
	return nil
}

// GetJob returns a job or an error wrapping storage.ErrNotFound.
func (s *Store) GetJob(ctx context.Context, id string) (storage.Job, error) {
	j, err := scanJob(s.read.QueryRowContext(ctx, s.q.getJob, id))
	if errors.Is(err, sql.ErrNoRows) {
		return storage.Job{}, fmt.Errorf("getting job %s: %w", id, storage.ErrNotFound)
	}
	if err != nil {
		return storage.Job{}, fmt.Errorf("getting job %s: %w", id, classify(err))
	}
	return j, nil
}

// ListJobs returns up to limit jobs, newest (by CreatedAt, then ID) first.
func (s *Store) ListJobs(ctx context.Context, limit int) ([]storage.Job, error) {
	if limit <= 0 {
		return nil, nil
	}
	out, err := s.queryJobs(ctx, s.q.listJobs, limit)
	if err != nil {
		return nil, fmt.Errorf("listing jobs: %w", err)
	}
	return out, nil
}

// ClaimJob gives owner the lease of a running job until until, with one
// conditional UPDATE: only if no one holds it or its lease expired before
// now. A holder claiming again while its lease runs gets false (use
// UpdateJob to extend it).
func (s *Store) ClaimJob(ctx context.Context, id, owner string, now, until time.Time) (bool, error) {
	if owner == "" {
		return false, fmt.Errorf("claiming job %s: empty owner", id)
	}
	res, err := s.write.ExecContext(ctx, s.q.claimJob, owner, until.UnixMilli(), id, now.UnixMilli())
	if err != nil {
		return false, fmt.Errorf("claiming job %s: %w", id, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("claiming job %s: reading affected rows: %w", id, classify(err))
	}
	return n > 0, nil
}

// ListClaimableJobs returns running jobs whose lease is free or expired
// before now, oldest (by CreatedAt, then ID) first.
func (s *Store) ListClaimableJobs(ctx context.Context, now time.Time) ([]storage.Job, error) {
	out, err := s.queryJobs(ctx, s.q.listClaimableJobs, now.UnixMilli())
	if err != nil {
		return nil, fmt.Errorf("listing claimable jobs: %w", err)
	}
	return out, nil
}

// UpdateJob saves j's progress and extends the lease to until, with one
// UPDATE conditional on owner holding the lease of the job and the job still
// running (so a job taken over or cancelled gives an error wrapping
// storage.ErrConflict, as does an unknown one). A finished state (done,
// failed, cancelled) clears Owner and LeaseUntil.
func (s *Store) UpdateJob(ctx context.Context, j storage.Job, owner string, until time.Time) error {
	switch j.State {
	case storage.JobRunning, storage.JobDone, storage.JobFailed, storage.JobCancelled:
	default:
		return fmt.Errorf("updating job %s: unknown state %q", j.ID, j.State)
	}
	if owner == "" {
		return fmt.Errorf("updating job %s: empty owner", j.ID)
	}
	newOwner, lease := owner, millis(until)
	if j.State != storage.JobRunning {
		newOwner, lease = "", sql.NullInt64{}
	}
	res, err := s.write.ExecContext(ctx, s.q.updateJob, string(j.State), j.Cursor, j.Items, j.Bytes, j.Error,
		millis(j.UpdatedAt), millis(j.FinishedAt), newOwner, lease, j.ID, owner)
	if err != nil {
		return fmt.Errorf("updating job %s: %w", j.ID, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("updating job %s: reading affected rows: %w", j.ID, classify(err))
	}
	if n == 0 {
		return fmt.Errorf("updating job %s: %s no longer holds it (taken over, cancelled or finished): %w", j.ID, owner, storage.ErrConflict)
	}
	return nil
}

// CancelJob marks a running job cancelled at at (UpdatedAt and FinishedAt)
// and releases its lease, whoever holds it; it reports whether a running job
// was cancelled.
func (s *Store) CancelJob(ctx context.Context, id string, at time.Time) (bool, error) {
	ms := millis(at)
	res, err := s.write.ExecContext(ctx, s.q.cancelJob, ms, ms, id)
	if err != nil {
		return false, fmt.Errorf("cancelling job %s: %w", id, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("cancelling job %s: reading affected rows: %w", id, classify(err))
	}
	return n > 0, nil
}
