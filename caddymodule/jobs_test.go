package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/jobs"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/retention"

	"github.com/caddyserver/caddy/v2"
)

func TestRetentionCaddyfile(t *testing.T) {
	for i, tc := range []struct {
		input   string
		want    *RetentionConfig
		wantErr string
	}{
		{input: `matrix_media {
				retention {
					remote_max_age 90d
					remote_max_bytes 50GiB
					thumbnail_max_age 30d
					interval 30m
				}
			}`, want: &RetentionConfig{
			RemoteMaxAge: caddy.Duration(90 * 24 * time.Hour), RemoteMaxBytes: 50 << 30,
			ThumbnailMaxAge: caddy.Duration(30 * 24 * time.Hour), Interval: caddy.Duration(30 * time.Minute),
		}},
		{input: `matrix_media {
				retention {
					remote_max_bytes 10GB
				}
			}`, want: &RetentionConfig{RemoteMaxBytes: 10_000_000_000}},
		{input: `matrix_media {
				retention {
				}
			}`, want: &RetentionConfig{}},
		{input: `matrix_media {
				retention off
			}`, wantErr: "retention takes a block"},
		{input: `matrix_media {
				retention {
					remote_max_age 0s
				}
			}`, wantErr: "remote_max_age must be positive"},
		{input: `matrix_media {
				retention {
					remote_max_bytes lots
				}
			}`, wantErr: "parsing remote_max_bytes"},
		{input: `matrix_media {
				retention {
					media_max_age 1d
				}
			}`, wantErr: "retention: unrecognized subdirective 'media_max_age'"},
		{input: `matrix_media {
				retention {
					interval
				}
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				retention {
				}
				retention {
				}
			}`, wantErr: "retention specified more than once"},
	} {
		checkAppCaddyfile(t, i, tc.input, tc.wantErr, tc.want, func(a *App) *RetentionConfig { return a.Retention })
	}
}

func TestRetentionPolicyOf(t *testing.T) {
	for i, tc := range []struct {
		in      *RetentionConfig
		want    retention.Policy
		wantErr bool
	}{
		{in: nil, want: retention.Policy{Interval: time.Hour}},
		{in: &RetentionConfig{}, want: retention.Policy{Interval: time.Hour}},
		{in: &RetentionConfig{RemoteMaxAge: caddy.Duration(time.Minute), RemoteMaxBytes: 5, ThumbnailMaxAge: caddy.Duration(time.Second), Interval: caddy.Duration(time.Minute)},
			want: retention.Policy{RemoteMaxAge: time.Minute, RemoteMaxBytes: 5, ThumbnailMaxAge: time.Second, Interval: time.Minute}},
		{in: &RetentionConfig{RemoteMaxBytes: -1}, wantErr: true},
		{in: &RetentionConfig{Interval: -1}, wantErr: true},
	} {
		got, err := retentionPolicyOf(tc.in)
		if (err != nil) != tc.wantErr || (!tc.wantErr && got != tc.want) {
			t.Errorf("Test %d: retentionPolicyOf(%+v) = %+v, %v; want %+v (error %v)", i, tc.in, got, err, tc.want, tc.wantErr)
		}
		if err == nil && got.Enabled() != (tc.in != nil && (tc.in.RemoteMaxAge > 0 || tc.in.RemoteMaxBytes > 0 || tc.in.ThumbnailMaxAge > 0)) {
			t.Errorf("Test %d: Enabled() = %v", i, got.Enabled())
		}
	}
}

// TestAppRetentionPolicy checks that Start hands the config's policy to the
// scheduler, and that a reload with another policy replaces it.
func TestAppRetentionPolicy(t *testing.T) {
	cfg := *testAppConfig(t)
	cfg.Retention = &RetentionConfig{RemoteMaxAge: caddy.Duration(48 * time.Hour)}
	first, unloadFirst := provisionApp(t, cfg)
	defer unloadFirst()
	if got := first.res.jobs.retention.Policy(); got.Enabled() {
		t.Fatalf("policy before Start = %+v, want off", got)
	}
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	if got, want := first.res.jobs.retention.Policy(), (retention.Policy{RemoteMaxAge: 48 * time.Hour, Interval: time.Hour}); got != want {
		t.Errorf("policy = %+v, want %+v", got, want)
	}
	cfg.Retention = nil
	second, unloadSecond := provisionApp(t, cfg)
	defer unloadSecond()
	if err := second.Start(); err != nil {
		t.Fatal(err)
	}
	if got := first.res.jobs.retention.Policy(); got.Enabled() || second.res != first.res {
		t.Errorf("after the reload: policy %+v (want off), shared resources %v", got, second.res == first.res)
	}
	if first.res.purger == nil {
		t.Error("resources have no purger")
	}
}

// adminCall runs an admin API handler of res and returns the status (the
// HTTP status of a returned caddy.APIError) and the body.
func adminCall(t *testing.T, serve func(http.ResponseWriter, *http.Request) error, method, target, body string) (int, string) {
	t.Helper()
	req := httptest.NewRequest(method, target, strings.NewReader(body))
	rec := httptest.NewRecorder()
	if err := serve(rec, req); err != nil {
		var apiErr caddy.APIError
		if !errors.As(err, &apiErr) {
			t.Fatalf("%s %s: error %v is not an API error", method, target, err)
		}
		return apiErr.HTTPStatus, apiErr.Err.Error()
	}
	return rec.Code, rec.Body.String()
}

func TestAdminJobs(t *testing.T) {
	a, unload := provisionApp(t, *testAppConfig(t))
	defer unload()
	res := a.res
	ctx := context.Background()
	// Two cached remote media: one read a week ago, one today.
	now := time.Now()
	for _, m := range []struct {
		id       string
		accessed time.Time
	}{{"old", now.Add(-7 * 24 * time.Hour)}, {"new", now}} {
		blob, err := storage.IngestTo(ctx, res.stores, res.meta, storage.KindRemote, strings.NewReader("content of "+m.id), storage.PutOptions{ExpectedSize: int64(len("content of " + m.id))})
		if err != nil {
			t.Fatal(err)
		}
		created := now.Add(-30 * 24 * time.Hour)
		if err := res.meta.InsertMedia(ctx, storage.Media{ServerName: "remote.example", MediaID: m.id, State: storage.StateReady,
			SHA256: blob.SHA256, Size: blob.Size, ContentType: "text/plain", CreatedAt: created, UploadedAt: created, Remote: true}); err != nil {
			t.Fatal(err)
		}
		if err := res.meta.RecordAccess(ctx, []storage.Access{{MediaRef: storage.MediaRef{ServerName: "remote.example", MediaID: m.id}, At: m.accessed}}); err != nil {
			t.Fatal(err)
		}
	}
	jobPath := func(id string) string { return adminPrefix + "jobs/" + id }
	serveJob := func(id string) func(http.ResponseWriter, *http.Request) error {
		return func(w http.ResponseWriter, r *http.Request) error { return res.serveJob(w, r, id) }
	}

	for i, tc := range []struct {
		serve          func(http.ResponseWriter, *http.Request) error
		method, target string
		body           string
		wantStatus     int
		wantBody       string
	}{
		{res.servePurge, http.MethodPost, adminPrefix + "purge", `{}`, http.StatusBadRequest, `"before_ts"`},
		{res.servePurge, http.MethodPost, adminPrefix + "purge", `{"before_ts":-5}`, http.StatusBadRequest, `"before_ts"`},
		{res.servePurge, http.MethodPost, adminPrefix + "purge", `{"before":1}`, http.StatusBadRequest, "unknown field"},
		{res.servePurge, http.MethodGet, adminPrefix + "purge", ``, http.StatusMethodNotAllowed, "method not allowed"},
		{res.serveJobs, http.MethodPost, adminPrefix + "jobs", ``, http.StatusMethodNotAllowed, "method not allowed"},
		{res.serveJobs, http.MethodGet, adminPrefix + "jobs?limit=0", ``, http.StatusBadRequest, "limit"},
		{res.serveJobs, http.MethodGet, adminPrefix + "jobs", ``, http.StatusOK, "[]"},
		{serveJob("nope"), http.MethodGet, jobPath("nope"), ``, http.StatusNotFound, `no job "nope"`},
		{serveJob("nope"), http.MethodDelete, jobPath("nope"), ``, http.StatusNotFound, `no job "nope"`},
		{serveJob(""), http.MethodGet, jobPath(""), ``, http.StatusNotFound, `no job ""`},
		{serveJob("x"), http.MethodPut, jobPath("x"), ``, http.StatusMethodNotAllowed, "method not allowed"},
	} {
		status, body := adminCall(t, tc.serve, tc.method, tc.target, tc.body)
		if status != tc.wantStatus || !strings.Contains(body, tc.wantBody) {
			t.Errorf("Test %d: %s %s = %d %s; want %d with %q", i, tc.method, tc.target, status, body, tc.wantStatus, tc.wantBody)
		}
	}

	// Purge what was not read for three days: 202 with the running job.
	before := now.Add(-3 * 24 * time.Hour).UnixMilli()
	status, body := adminCall(t, res.servePurge, http.MethodPost, adminPrefix+"purge", `{"before_ts":`+jsonInt(before)+`}`)
	var started jobView
	if err := json.Unmarshal([]byte(body), &started); err != nil || status != http.StatusAccepted {
		t.Fatalf("POST purge = %d %s (%v), want 202 with a job", status, body, err)
	}
	if started.Kind != retention.KindPurgeRemote || started.RequestedBy != adminAPIRequester || started.ID == "" ||
		string(started.Params) != `{"before_ms":`+jsonInt(before)+`}` {
		t.Errorf("started job = %+v", started)
	}
	if _, err := res.jobs.runner.Wait(ctx, started.ID); err != nil {
		t.Fatal(err)
	}
	status, body = adminCall(t, serveJob(started.ID), http.MethodGet, jobPath(started.ID), "")
	var done jobView
	if err := json.Unmarshal([]byte(body), &done); err != nil || status != http.StatusOK {
		t.Fatalf("GET job = %d %s (%v)", status, body, err)
	}
	// The blob was claimed moments ago, within the grace: the row goes and
	// the blob is left to the orphan collector (0 bytes freed).
	if done.State != "done" || done.Items != 1 || done.Bytes != 0 || done.FinishedAt == nil || done.Owner != "" {
		t.Errorf("finished job = %+v, want done with 1 item and 0 bytes", done)
	}
	for id, want := range map[string]bool{"old": false, "new": true} {
		_, err := res.meta.GetMedia(ctx, "remote.example", id)
		if (err == nil) != want {
			t.Errorf("remote media %s: GetMedia error %v, want kept %v", id, err, want)
		}
	}
	status, body = adminCall(t, res.serveJobs, http.MethodGet, adminPrefix+"jobs", "")
	var list []jobView
	if err := json.Unmarshal([]byte(body), &list); err != nil || status != http.StatusOK || len(list) != 1 || list[0].ID != started.ID {
		t.Errorf("GET jobs = %d %s (%v), want the one job", status, body, err)
	}
	// Cancelling a finished job changes nothing.
	status, body = adminCall(t, serveJob(started.ID), http.MethodDelete, jobPath(started.ID), "")
	if status != http.StatusOK || !strings.Contains(body, `"state":"done"`) {
		t.Errorf("DELETE finished job = %d %s, want 200 and state done", status, body)
	}
}

// TestAdminCancelRunningJob cancels a job that is still running.
func TestAdminCancelRunningJob(t *testing.T) {
	a, unload := provisionApp(t, *testAppConfig(t))
	defer unload()
	res := a.res
	release := make(chan struct{})
	defer close(release)
	res.jobs.runner.Register("test_block", func(ctx context.Context, p *jobs.Progress) error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-release:
			return nil
		}
	})
	j, err := res.jobs.runner.Start(context.Background(), "test_block", nil, "test")
	if err != nil {
		t.Fatal(err)
	}
	status, body := adminCall(t, func(w http.ResponseWriter, r *http.Request) error { return res.serveJob(w, r, j.ID) },
		http.MethodDelete, adminPrefix+"jobs/"+j.ID, "")
	if status != http.StatusOK || !strings.Contains(body, `"state":"cancelled"`) {
		t.Errorf("DELETE running job = %d %s, want 200 and state cancelled", status, body)
	}
	got, err := res.jobs.runner.Wait(context.Background(), j.ID)
	if err != nil || got.State != storage.JobCancelled {
		t.Errorf("job after cancel = %+v, %v", got, err)
	}
}

// TestJobsStopWithResources checks that unloading the last config stops the
// job runner before the stores close: a job running then is interrupted and
// left for the next runner, not failed.
func TestJobsStopWithResources(t *testing.T) {
	a, unload := provisionApp(t, *testAppConfig(t))
	res := a.res
	started := make(chan struct{})
	res.jobs.runner.Register("test_wait", func(ctx context.Context, p *jobs.Progress) error {
		close(started)
		<-ctx.Done()
		return ctx.Err()
	})
	j, err := res.jobs.runner.Start(context.Background(), "test_wait", nil, "test")
	if err != nil {
		t.Fatal(err)
	}
	<-started
	unload()
	<-res.closed
	if _, err := res.jobs.runner.Start(context.Background(), "test_wait", nil, "test"); !errors.Is(err, jobs.ErrClosed) {
		t.Errorf("Start after the unload: %v, want ErrClosed", err)
	}
	// Reopen the database: the job is still running, with its lease released.
	b, unloadB := provisionApp(t, App{Database: a.Database, StoragePath: a.StoragePath})
	defer unloadB()
	got, err := b.res.jobs.runner.Get(context.Background(), j.ID)
	if err != nil || got.State != storage.JobRunning || got.LeaseUntil.After(time.Now()) {
		t.Errorf("job after the unload = %+v, %v; want running with its lease released", got, err)
	}
}

// jsonInt formats n for a JSON body.
func jsonInt(n int64) string {
	b, _ := json.Marshal(n)
	return string(b)
}
