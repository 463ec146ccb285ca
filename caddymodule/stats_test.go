package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// seedStats stores, through res's stores: on a.example three media of
// @u (two share their content, 10 bytes each), one of @v (11 bytes) and a
// pending ID; on b.example one protected item with @v's content; a remote
// copy of that content; a thumbnail (5 bytes); @v's content quarantined;
// a running migrate job held by another instance and a failed job.
func seedStats(t *testing.T, res *resources) {
	t.Helper()
	ctx := context.Background()
	now := time.Now()
	ingest := func(content string) storage.IngestResult {
		t.Helper()
		b, err := storage.IngestTo(ctx, res.stores, res.meta, storage.KindLocal, strings.NewReader(content),
			storage.PutOptions{ExpectedSize: int64(len(content))})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	shared, other, thumbBlob := ingest("ten bytes!"), ingest("eleven byte"), ingest("thumb")
	insert := func(server, id, user string, b storage.IngestResult, remote, protected bool) storage.Media {
		t.Helper()
		m := storage.Media{ServerName: server, MediaID: id, UserID: user, State: storage.StateReady, SHA256: b.SHA256,
			Size: b.Size, ContentType: "text/plain", CreatedAt: now, UploadedAt: now, Remote: remote, Protected: protected}
		if err := res.meta.InsertMedia(ctx, m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	first := insert("a.example", "one", "@u:a.example", shared, false, false)
	insert("a.example", "two", "@u:a.example", shared, false, false)
	insert("a.example", "three", "@v:a.example", other, false, false)
	insert("b.example", "four", "@w:b.example", other, false, true)
	insert("remote.example", "five", "", other, true, false)
	if err := res.meta.CreatePending(ctx, storage.Media{ServerName: "a.example", MediaID: "pend", UserID: "@u:a.example",
		State: storage.StatePending, CreatedAt: now, ExpiresAt: now.Add(time.Hour)}, 0); err != nil {
		t.Fatal(err)
	}
	if err := res.meta.InsertThumbnail(ctx, storage.Thumbnail{
		ThumbnailKey: storage.ThumbnailKey{ServerName: first.ServerName, MediaID: first.MediaID, Width: 32, Height: 32, Method: "scale"},
		ContentType:  "image/png", SHA256: thumbBlob.SHA256, Size: thumbBlob.Size, ActualWidth: 32, ActualHeight: 32, CreatedAt: now,
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := res.meta.QuarantineContent(ctx, storage.Quarantine{SHA256: other.SHA256, By: "@admin:a.example", At: now}); err != nil {
		t.Fatal(err)
	}
	for _, j := range []storage.Job{
		{ID: "job-running", Kind: "migrate", Params: []byte(`{"from":"old","to":"default","total_blobs":10,"total_bytes":1000}`), Items: 4, Bytes: 400},
		{ID: "job-failed", Kind: "purge_remote", Params: []byte(`{}`), Items: 1, Error: "disk on fire"},
	} {
		j.State, j.CreatedAt, j.UpdatedAt = storage.JobRunning, now, now
		if err := res.meta.CreateJob(ctx, j); err != nil {
			t.Fatal(err)
		}
		if ok, err := res.meta.ClaimJob(ctx, j.ID, "elsewhere", now, now.Add(time.Hour)); err != nil || !ok {
			t.Fatalf("claiming %s: %t %v", j.ID, ok, err)
		}
		if j.Error != "" {
			j.State, j.FinishedAt = storage.JobFailed, now
		}
		if err := res.meta.UpdateJob(ctx, j, "elsewhere", now.Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestAdminStats checks GET /matrix_media/stats on a seeded store: every
// number, the top uploaders per site bounded by ?top, the jobs, and the
// 4xx answers.
func TestAdminStats(t *testing.T) {
	a, unload := provisionApp(t, *testAppConfig(t))
	defer unload()
	res := a.res
	seedStats(t, res)

	status, body := adminCall(t, res.serveStats, http.MethodGet, adminPrefix+"stats", "")
	if status != http.StatusOK {
		t.Fatalf("stats: %d %s", status, body)
	}
	var got adminStats
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("decoding %s: %v", body, err)
	}
	// Media bytes: 10+10+11 (a.example) + 11 (b.example) + 11 (remote) =
	// 53; stored content: 10 + 11 = 21 in two blobs.
	if len(got.Datastores) != 1 || got.Datastores[0].Blobs != 3 || got.Datastores[0].Bytes != 26 ||
		got.Blobs != (adminCount{Count: 3, Bytes: 26}) {
		t.Errorf("storage: %+v %+v", got.Datastores, got.Blobs)
	}
	if want := (adminDedup{ReferencedBytes: 53, StoredBlobs: 2, StoredBytes: 21, SavedBytes: 32, Ratio: 53.0 / 21}); got.Dedup != want {
		t.Errorf("dedup = %+v, want %+v", got.Dedup, want)
	}
	if got.Thumbnails != (adminCount{Count: 1, Bytes: 5}) {
		t.Errorf("thumbnails = %+v", got.Thumbnails)
	}
	if want := (adminMediaTotals{Local: 4, LocalBytes: 42, Remote: 1, RemoteBytes: 11, Pending: 1, Quarantined: 2}); got.Media != want {
		t.Errorf("media = %+v, want %+v", got.Media, want)
	}
	if want := (adminMediaCounts{Media: 1, Bytes: 11, Quarantined: 1}); got.Remote != want {
		t.Errorf("remote = %+v, want %+v", got.Remote, want)
	}
	if len(got.Sites) != 2 {
		t.Fatalf("sites: %+v", got.Sites)
	}
	siteA, siteB := got.Sites[0], got.Sites[1]
	if siteA.ServerName != "a.example" || siteA.adminMediaCounts != (adminMediaCounts{Media: 3, Bytes: 31, Pending: 1, Quarantined: 1}) ||
		siteA.Users != 2 || len(siteA.TopUploaders) != 2 ||
		siteA.TopUploaders[0] != (adminUserUsage{UserID: "@u:a.example", MediaCount: 2, MediaLength: 20}) ||
		siteA.TopUploaders[1] != (adminUserUsage{UserID: "@v:a.example", MediaCount: 1, MediaLength: 11}) {
		t.Errorf("site a.example = %+v", siteA)
	}
	if siteB.ServerName != "b.example" || siteB.adminMediaCounts != (adminMediaCounts{Media: 1, Bytes: 11}) || siteB.Users != 1 {
		t.Errorf("site b.example = %+v", siteB)
	}
	if len(got.Jobs.Running) != 1 || got.Jobs.Running[0].ID != "job-running" || got.Jobs.Running[0].Items != 4 ||
		len(got.Jobs.RecentFailed) != 1 || got.Jobs.RecentFailed[0].Error != "disk on fire" {
		t.Errorf("jobs = %+v", got.Jobs)
	}

	// ?top bounds the uploaders of each site.
	status, body = adminCall(t, res.serveStats, http.MethodGet, adminPrefix+"stats?top=1", "")
	if status != http.StatusOK || json.Unmarshal([]byte(body), &got) != nil || len(got.Sites[0].TopUploaders) != 1 ||
		got.Sites[0].TopUploaders[0].UserID != "@u:a.example" || got.Sites[0].Users != 2 {
		t.Errorf("stats?top=1: %d %s", status, body)
	}
	for _, tc := range []struct {
		method, target string
		want           int
	}{
		{http.MethodPost, "stats", http.StatusMethodNotAllowed},
		{http.MethodGet, "stats?top=-1", http.StatusBadRequest},
		{http.MethodGet, "stats?top=1001", http.StatusBadRequest},
		{http.MethodGet, "stats?top=x", http.StatusBadRequest},
	} {
		if status, body := adminCall(t, res.serveStats, tc.method, adminPrefix+tc.target, ""); status != tc.want {
			t.Errorf("%s %s = %d %s, want %d", tc.method, tc.target, status, body, tc.want)
		}
	}
}

// TestAdminStatsEmpty checks the answer of an empty repository: zeros,
// empty lists (not null) and a ratio of 1.
func TestAdminStatsEmpty(t *testing.T) {
	a, unload := provisionApp(t, *testAppConfig(t))
	defer unload()
	status, body := adminCall(t, a.res.serveStats, http.MethodGet, adminPrefix+"stats", "")
	for _, want := range []string{`"sites":[]`, `"running":[]`, `"recent_failed":[]`, `"ratio":1`, `"blobs":{"count":0,"bytes":0}`} {
		if status != http.StatusOK || !strings.Contains(body, want) {
			t.Errorf("empty stats: %d %s, want %s", status, body, want)
		}
	}
}

// runStatsCLI runs "caddy matrix-media stats" against rc.
func (rc runningCaddy) runStatsCLI(t *testing.T, flags map[string]string) (string, error) {
	t.Helper()
	return rc.runCLI(t, statsCommand(), nil, flags)
}

// TestStatsCommand runs "caddy matrix-media stats" against a running
// Caddy's admin API on the seeded store: the tables, --top and --json.
func TestStatsCommand(t *testing.T) {
	rc := startCaddySite(t, t.TempDir(), "")
	res, err := currentResources()
	if err != nil {
		t.Fatal(err)
	}
	seedStats(t, res)
	res.release()

	out, err := rc.runStatsCLI(t, nil)
	if err != nil {
		t.Fatalf("stats: %v\n%s", err, out)
	}
	media := func(site string, n int64, bytes, pending string, quarantined int64) string {
		return fmt.Sprintf("  %-30s %10d %12s %10s %12d\n", site, n, bytes, pending, quarantined)
	}
	for _, want := range []string{
		fmt.Sprintf("  %-30s %10d %12s\n", "default", 3, "26 B"),
		fmt.Sprintf("  %-30s %10d %12s\n", "total", 3, "26 B"),
		"  thumbnails: 1 (5 B)\n",
		"  media rows reference 53 B, stored once in 2 blobs of 21 B\n",
		"  saved 32 B (ratio 2.52)\n",
		media("a.example", 3, "31 B", "1", 1),
		media("b.example", 1, "11 B", "0", 0),
		media("remote (cached)", 1, "11 B", "-", 1),
		media("total", 5, "53 B", "1", 2),
		"TOP UPLOADERS: a.example (2 of 2 users)\n",
		fmt.Sprintf("  %-40s %10d %12s\n", "@u:a.example", 2, "20 B"),
		fmt.Sprintf("  %-40s %10d %12s\n", "@v:a.example", 1, "11 B"),
		"TOP UPLOADERS: b.example (1 of 1 user)\n",
		fmt.Sprintf("  %-36s %-14s %10d %12s %9s  ", "job-running", "migrate", 4, "400 B", "40%"),
		"  recent failures:\n  job-failed",
		"  disk on fire\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("stats output lacks %q:\n%s", want, out)
		}
	}

	out, err = rc.runStatsCLI(t, map[string]string{"top": "1"})
	if err != nil || !strings.Contains(out, "TOP UPLOADERS: a.example (1 of 2 users)") || strings.Contains(out, "@v:a.example") {
		t.Errorf("stats --top 1: %v\n%s", err, out)
	}
	out, err = rc.runStatsCLI(t, map[string]string{"top": "0"})
	if err != nil || strings.Contains(out, "TOP UPLOADERS") {
		t.Errorf("stats --top 0: %v\n%s", err, out)
	}

	out, err = rc.runStatsCLI(t, map[string]string{"json": "true"})
	var st adminStats
	if err != nil || !strings.HasPrefix(out, "{\n  \"datastores\": [") || json.Unmarshal([]byte(out), &st) != nil ||
		st.Dedup.SavedBytes != 32 || st.Media.Pending != 1 || len(st.Sites) != 2 || len(st.Sites[0].TopUploaders) != 2 {
		t.Errorf("stats --json: %v\n%s", err, out)
	}

	if _, err := rc.runStatsCLI(t, map[string]string{"top": "-1"}); err == nil || !strings.Contains(err.Error(), "--top") {
		t.Errorf("stats --top -1: %v, want an error about --top", err)
	}
}
