package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/jobs"
)

// adminAPIRequester names Caddy's admin API as who asked for a job, in the
// jobs and the logs.
const adminAPIRequester = "caddy-admin-api"

// Bounds of GET /matrix_media/jobs?limit=.
const (
	defaultJobsLimit = 100
	maxJobsLimit     = 1000
)

// jobView is a background job in the admin API.
type jobView struct {
	ID   string `json:"id"`
	Kind string `json:"kind"`
	// Params are the job's parameters (JSON).
	Params json.RawMessage `json:"params,omitempty"`
	// State is running, done, failed or cancelled.
	State string `json:"state"`
	// Items and Bytes are what the job removed so far (a migrate job: the
	// blobs and bytes it moved).
	Items int64 `json:"items"`
	Bytes int64 `json:"bytes"`
	// Cursor is where the job resumes after a restart.
	Cursor      string     `json:"cursor,omitempty"`
	Error       string     `json:"error,omitempty"`
	RequestedBy string     `json:"requested_by,omitempty"`
	CreatedAt   time.Time  `json:"created_at"`
	UpdatedAt   time.Time  `json:"updated_at"`
	FinishedAt  *time.Time `json:"finished_at,omitempty"`
	// Owner names the instance running the job, until LeaseUntil.
	Owner      string     `json:"owner,omitempty"`
	LeaseUntil *time.Time `json:"lease_until,omitempty"`
}

// viewJob converts a job for the admin API.
func viewJob(j storage.Job) jobView {
	v := jobView{
		ID: j.ID, Kind: j.Kind, State: string(j.State), Items: j.Items, Bytes: j.Bytes, Cursor: j.Cursor,
		Error: j.Error, RequestedBy: j.RequestedBy, CreatedAt: j.CreatedAt, UpdatedAt: j.UpdatedAt, Owner: j.Owner,
	}
	if json.Valid(j.Params) {
		v.Params = json.RawMessage(j.Params)
	}
	if !j.FinishedAt.IsZero() {
		v.FinishedAt = &j.FinishedAt
	}
	if !j.LeaseUntil.IsZero() {
		v.LeaseUntil = &j.LeaseUntil
	}
	return v
}

func (AdminAPI) handleJobs(w http.ResponseWriter, r *http.Request) error {
	res, err := currentResources()
	if err != nil {
		return err
	}
	defer res.release()
	return res.serveJobs(w, r)
}

func (AdminAPI) handleJob(w http.ResponseWriter, r *http.Request) error {
	res, err := currentResources()
	if err != nil {
		return err
	}
	defer res.release()
	return res.serveJob(w, r, strings.TrimPrefix(r.URL.Path, adminPrefix+"jobs/"))
}

func (AdminAPI) handlePurge(w http.ResponseWriter, r *http.Request) error {
	res, err := currentResources()
	if err != nil {
		return err
	}
	defer res.release()
	return res.servePurge(w, r)
}

// serveJobs answers GET /matrix_media/jobs.
func (res *resources) serveJobs(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	bg := res.jobs
	limit := defaultJobsLimit
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > maxJobsLimit {
			return apiError(http.StatusBadRequest, fmt.Errorf("limit must be an integer from 1 to %d", maxJobsLimit))
		}
		limit = n
	}
	js, err := bg.runner.List(r.Context(), limit)
	if err != nil {
		return apiError(http.StatusInternalServerError, err)
	}
	out := make([]jobView, len(js))
	for i, j := range js {
		out[i] = viewJob(j)
	}
	return writeAdminJSON(w, http.StatusOK, out)
}

// serveJob answers GET and DELETE /matrix_media/jobs/<id>.
func (res *resources) serveJob(w http.ResponseWriter, r *http.Request, id string) error {
	bg := res.jobs
	if id == "" || strings.Contains(id, "/") {
		return apiError(http.StatusNotFound, fmt.Errorf("no job %q", id))
	}
	var (
		j   storage.Job
		err error
	)
	switch r.Method {
	case http.MethodGet:
		j, err = bg.runner.Get(r.Context(), id)
	case http.MethodDelete:
		j, err = bg.runner.Cancel(r.Context(), id)
		if err == nil {
			res.logger.Info("background job cancelled", zap.String("job", id), zap.String("kind", j.Kind),
				zap.String("state", string(j.State)), zap.String("requested_by", adminAPIRequester))
		}
	default:
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return apiError(http.StatusNotFound, fmt.Errorf("no job %q", id))
	case err != nil:
		return apiError(http.StatusInternalServerError, err)
	}
	return writeAdminJSON(w, http.StatusOK, viewJob(j))
}

// purgeRequest is the body of POST /matrix_media/purge.
type purgeRequest struct {
	// BeforeTS: remote media last accessed (or, never accessed, created)
	// before it are removed; ms since the epoch, as Synapse's
	// purge_media_cache.
	BeforeTS int64 `json:"before_ts"`
}

// servePurge answers POST /matrix_media/purge: 202 with the started job.
func (res *resources) servePurge(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	var req purgeRequest
	if err := decodeAdminJSON(r, &req); err != nil {
		return err
	}
	if req.BeforeTS <= 0 {
		return apiError(http.StatusBadRequest, errors.New(`"before_ts" (ms since the epoch) is required and must be positive`))
	}
	bg := res.jobs
	before := time.UnixMilli(req.BeforeTS)
	j, err := bg.retention.StartPurgeRemote(r.Context(), before, adminAPIRequester)
	switch {
	case errors.Is(err, jobs.ErrClosed):
		return apiError(http.StatusServiceUnavailable, errors.New("the matrix_media app is stopping"))
	case err != nil:
		return apiError(http.StatusInternalServerError, err)
	}
	res.logger.Info("remote media purge started", zap.String("job", j.ID), zap.Time("before", before),
		zap.String("requested_by", adminAPIRequester))
	return writeAdminJSON(w, http.StatusAccepted, viewJob(j))
}
