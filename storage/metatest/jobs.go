package metatest

import (
	"bytes"
	"context"
	"slices"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// jobStore returns s as a storage.JobStore; every store of this module must
// implement it.
func jobStore(t *testing.T, s storage.MetadataStore) storage.JobStore {
	t.Helper()
	j, ok := s.(storage.JobStore)
	if !ok {
		t.Fatalf("%T does not implement storage.JobStore", s)
	}
	return j
}

func jobIDs(js []storage.Job) []string {
	out := make([]string, len(js))
	for i, j := range js {
		out[i] = j.ID
	}
	return out
}

// testJobs checks job creation, listing and the lease protocol: claim,
// expiry and takeover, updates by a holder that lost its lease, finishing
// and cancelling.
func testJobs(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	js := jobStore(t, s)
	get := func(id string) storage.Job {
		t.Helper()
		j, err := js.GetJob(ctx, id)
		mustNil(t, "GetJob("+id+")", err)
		return j
	}
	claim := func(id, owner string, now, until time.Time, want bool) {
		t.Helper()
		ok, err := js.ClaimJob(ctx, id, owner, now, until)
		if err != nil || ok != want {
			t.Fatalf("ClaimJob(%s, %s, now %v) = %v, %v; want %v", id, owner, now.Sub(t0), ok, err, want)
		}
	}
	claimable := func(now time.Time, want ...string) {
		t.Helper()
		got, err := js.ListClaimableJobs(ctx, now)
		mustNil(t, "ListClaimableJobs", err)
		if !slices.Equal(jobIDs(got), want) && (len(got) != 0 || len(want) != 0) {
			t.Fatalf("ListClaimableJobs(now %v) = %v, want %v", now.Sub(t0), jobIDs(got), want)
		}
	}

	params := []byte(`{"before_ts":1700000000000}`)
	j1 := storage.Job{ID: "j1", Kind: "purge_remote", Params: params, State: storage.JobDone, Cursor: "start",
		RequestedBy: "@admin:example.org", CreatedAt: t0, UpdatedAt: t0, Owner: "ignored", LeaseUntil: t0.Add(time.Hour)}
	mustNil(t, "CreateJob(j1)", js.CreateJob(ctx, j1))
	mustNil(t, "CreateJob(j2)", js.CreateJob(ctx, storage.Job{ID: "j2", Kind: "gc", CreatedAt: t0.Add(time.Minute)}))
	mustNil(t, "CreateJob(j3)", js.CreateJob(ctx, storage.Job{ID: "j3", Kind: "gc", CreatedAt: t0.Add(2 * time.Minute)}))
	mustIs(t, "CreateJob(duplicate)", js.CreateJob(ctx, storage.Job{ID: "j1", Kind: "other", CreatedAt: t0}), storage.ErrConflict)
	_, err := js.GetJob(ctx, "missing")
	mustIs(t, "GetJob(missing)", err, storage.ErrNotFound)

	got := get("j1")
	if got.Kind != j1.Kind || !bytes.Equal(got.Params, params) || got.State != storage.JobRunning || got.Cursor != "start" ||
		got.RequestedBy != j1.RequestedBy || !got.CreatedAt.Equal(t0) || !got.UpdatedAt.Equal(t0) || !got.FinishedAt.IsZero() ||
		got.Owner != "" || !got.LeaseUntil.IsZero() || got.Items != 0 || got.Bytes != 0 || got.Error != "" {
		t.Fatalf("GetJob(j1) = %+v; want it running, unowned, as created", got)
	}
	if p := get("j2").Params; len(p) != 0 {
		t.Fatalf("job without params has params %q", p)
	}
	all, err := js.ListJobs(ctx, 10)
	mustNil(t, "ListJobs", err)
	if !slices.Equal(jobIDs(all), []string{"j3", "j2", "j1"}) {
		t.Fatalf("ListJobs = %v, want newest first", jobIDs(all))
	}
	two, err := js.ListJobs(ctx, 2)
	mustNil(t, "ListJobs(2)", err)
	if !slices.Equal(jobIDs(two), []string{"j3", "j2"}) {
		t.Fatalf("ListJobs(2) = %v", jobIDs(two))
	}
	claimable(t0, "j1", "j2", "j3")

	// A claims j1 until t0+1m; B cannot take it while the lease runs, and
	// A cannot claim it again either.
	claim("j1", "A", t0, t0.Add(time.Minute), true)
	claim("j1", "B", t0.Add(30*time.Second), t0.Add(2*time.Minute), false)
	claim("j1", "A", t0.Add(30*time.Second), t0.Add(2*time.Minute), false)
	if g := get("j1"); g.Owner != "A" || !g.LeaseUntil.Equal(t0.Add(time.Minute)) {
		t.Fatalf("j1 after claim: owner %q until %v", g.Owner, g.LeaseUntil)
	}
	claimable(t0.Add(30*time.Second), "j2", "j3")
	claimable(t0.Add(time.Minute), "j2", "j3") // expires strictly before now
	claimable(t0.Add(time.Minute+time.Millisecond), "j1", "j2", "j3")

	// A saves progress and extends its lease.
	prog := storage.Job{ID: "j1", State: storage.JobRunning, Cursor: "c1", Items: 5, Bytes: 100, UpdatedAt: t0.Add(10 * time.Second)}
	mustNil(t, "UpdateJob(A)", js.UpdateJob(ctx, prog, "A", t0.Add(2*time.Minute)))
	if g := get("j1"); g.Cursor != "c1" || g.Items != 5 || g.Bytes != 100 || !g.UpdatedAt.Equal(prog.UpdatedAt) ||
		g.Owner != "A" || !g.LeaseUntil.Equal(t0.Add(2*time.Minute)) || g.State != storage.JobRunning {
		t.Fatalf("j1 after UpdateJob: %+v", g)
	}
	mustIs(t, "UpdateJob(B, not holder)", js.UpdateJob(ctx, prog, "B", t0.Add(3*time.Minute)), storage.ErrConflict)
	claim("j1", "B", t0.Add(2*time.Minute), t0.Add(5*time.Minute), false)

	// A dies; B takes over after expiry and resumes from A's cursor.
	claim("j1", "B", t0.Add(2*time.Minute+time.Millisecond), t0.Add(5*time.Minute), true)
	stale := prog
	stale.Cursor, stale.Items = "c2", 9
	mustIs(t, "UpdateJob(A after takeover)", js.UpdateJob(ctx, stale, "A", t0.Add(6*time.Minute)), storage.ErrConflict)
	if g := get("j1"); g.Owner != "B" || g.Cursor != "c1" || g.Items != 5 {
		t.Fatalf("j1 after takeover and stale update: %+v; want B's lease and A's saved cursor", g)
	}
	done := storage.Job{ID: "j1", State: storage.JobDone, Cursor: "end", Items: 12, Bytes: 4000,
		UpdatedAt: t0.Add(4 * time.Minute), FinishedAt: t0.Add(4 * time.Minute)}
	mustNil(t, "UpdateJob(B, done)", js.UpdateJob(ctx, done, "B", t0.Add(10*time.Minute)))
	if g := get("j1"); g.State != storage.JobDone || g.Cursor != "end" || g.Items != 12 || g.Bytes != 4000 ||
		!g.FinishedAt.Equal(done.FinishedAt) || g.Owner != "" || !g.LeaseUntil.IsZero() {
		t.Fatalf("j1 after finishing: %+v; want done with its lease released", g)
	}
	mustIs(t, "UpdateJob(B, after done)", js.UpdateJob(ctx, done, "B", t0.Add(10*time.Minute)), storage.ErrConflict)
	claim("j1", "C", t0.Add(time.Hour), t0.Add(2*time.Hour), false)

	// j2 fails with an error.
	claim("j2", "A", t0, t0.Add(time.Minute), true)
	failed := storage.Job{ID: "j2", State: storage.JobFailed, Error: "datastore unreachable", UpdatedAt: t0.Add(time.Second), FinishedAt: t0.Add(time.Second)}
	mustNil(t, "UpdateJob(failed)", js.UpdateJob(ctx, failed, "A", t0.Add(time.Minute)))
	if g := get("j2"); g.State != storage.JobFailed || g.Error != "datastore unreachable" {
		t.Fatalf("j2 after failing: %+v", g)
	}

	// j3 is cancelled while C holds it; C notices at its next update.
	claim("j3", "C", t0, t0.Add(time.Hour), true)
	ok, err := js.CancelJob(ctx, "j3", t0.Add(5*time.Minute))
	if err != nil || !ok {
		t.Fatalf("CancelJob(j3) = %v, %v; want true", ok, err)
	}
	mustIs(t, "UpdateJob(C after cancel)", js.UpdateJob(ctx, storage.Job{ID: "j3", State: storage.JobRunning, Cursor: "x"}, "C", t0.Add(2*time.Hour)), storage.ErrConflict)
	if g := get("j3"); g.State != storage.JobCancelled || !g.FinishedAt.Equal(t0.Add(5*time.Minute)) || g.Cursor != "" {
		t.Fatalf("j3 after cancel: %+v", g)
	}
	for _, id := range []string{"j3", "j1", "missing"} {
		ok, err := js.CancelJob(ctx, id, t0)
		if err != nil || ok {
			t.Fatalf("CancelJob(%s, not running) = %v, %v; want false", id, ok, err)
		}
	}
	claimable(t0.Add(24 * time.Hour))
	claim("missing", "A", t0, t0.Add(time.Minute), false)
	mustIs(t, "UpdateJob(missing)", js.UpdateJob(ctx, storage.Job{ID: "missing", State: storage.JobRunning}, "A", t0), storage.ErrConflict)
}
