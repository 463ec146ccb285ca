package jobs

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// memStore is an in-memory storage.JobStore following the interface's
// contract, for the runner's unit tests (the SQL stores run the same tests
// in jobs_sql_test.go).
type memStore struct {
	mu   sync.Mutex
	jobs map[string]storage.Job
	seq  map[string]int
	next int
	// updated, when not nil, receives the ID of every successful UpdateJob.
	updated chan string
}

func newMemStore() *memStore {
	return &memStore{jobs: map[string]storage.Job{}, seq: map[string]int{}}
}

func (m *memStore) CreateJob(_ context.Context, j storage.Job) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.jobs[j.ID]; ok {
		return storage.ErrConflict
	}
	j.State, j.Owner, j.LeaseUntil = storage.JobRunning, "", time.Time{}
	m.jobs[j.ID] = j
	m.next++
	m.seq[j.ID] = m.next
	return nil
}

func (m *memStore) GetJob(_ context.Context, id string) (storage.Job, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, ok := m.jobs[id]
	if !ok {
		return storage.Job{}, storage.ErrNotFound
	}
	return j, nil
}

func (m *memStore) ListJobs(_ context.Context, limit int) ([]storage.Job, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []storage.Job
	for _, j := range m.jobs {
		out = append(out, j)
	}
	sort.Slice(out, func(a, b int) bool { return m.seq[out[a].ID] > m.seq[out[b].ID] })
	if len(out) > limit {
		out = out[:max(limit, 0)]
	}
	return out, nil
}

func (m *memStore) ClaimJob(_ context.Context, id, owner string, now, until time.Time) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, ok := m.jobs[id]
	if !ok || j.State != storage.JobRunning {
		return false, nil
	}
	if j.Owner != "" && !j.LeaseUntil.Before(now) {
		return false, nil
	}
	j.Owner, j.LeaseUntil = owner, until
	m.jobs[id] = j
	return true, nil
}

func (m *memStore) ListClaimableJobs(_ context.Context, now time.Time) ([]storage.Job, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []storage.Job
	for _, j := range m.jobs {
		if j.State == storage.JobRunning && (j.Owner == "" || j.LeaseUntil.Before(now)) {
			out = append(out, j)
		}
	}
	sort.Slice(out, func(a, b int) bool { return m.seq[out[a].ID] < m.seq[out[b].ID] })
	return out, nil
}

func (m *memStore) UpdateJob(_ context.Context, j storage.Job, owner string, until time.Time) error {
	m.mu.Lock()
	cur, ok := m.jobs[j.ID]
	if !ok || cur.State != storage.JobRunning || cur.Owner != owner {
		m.mu.Unlock()
		return storage.ErrConflict
	}
	cur.State, cur.Cursor, cur.Items, cur.Bytes, cur.Error = j.State, j.Cursor, j.Items, j.Bytes, j.Error
	cur.UpdatedAt, cur.FinishedAt = j.UpdatedAt, j.FinishedAt
	cur.LeaseUntil = until
	if cur.State != storage.JobRunning {
		cur.Owner, cur.LeaseUntil = "", time.Time{}
	}
	m.jobs[j.ID] = cur
	ch := m.updated
	m.mu.Unlock()
	if ch != nil {
		ch <- j.ID
	}
	return nil
}

func (m *memStore) CancelJob(_ context.Context, id string, at time.Time) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	j, ok := m.jobs[id]
	if !ok || j.State != storage.JobRunning {
		return false, nil
	}
	j.State, j.FinishedAt, j.UpdatedAt, j.Owner, j.LeaseUntil = storage.JobCancelled, at, at, "", time.Time{}
	m.jobs[id] = j
	return true, nil
}

var _ storage.JobStore = (*memStore)(nil)
