package caddymodule

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// TestAdminMediaOps drives the operators' endpoints of Caddy's admin API on a
// provisioned app: quarantine by content (by media and by user), unquarantine,
// protect, media info, usage and deletion, with the stored state checked
// after each step, and the 4xx answers to bad requests.
func TestAdminMediaOps(t *testing.T) {
	a, unload := provisionApp(t, *testAppConfig(t))
	defer unload()
	res := a.res
	ctx := context.Background()
	created := time.Now().Add(-48 * time.Hour)
	insert := func(server, id, user, content string, remote bool) {
		t.Helper()
		blob, err := storage.IngestTo(ctx, res.stores, res.meta, storage.KindLocal, strings.NewReader(content),
			storage.PutOptions{ExpectedSize: int64(len(content))})
		if err != nil {
			t.Fatal(err)
		}
		if err := res.meta.InsertMedia(ctx, storage.Media{ServerName: server, MediaID: id, UserID: user, State: storage.StateReady,
			SHA256: blob.SHA256, Size: blob.Size, ContentType: "text/plain", CreatedAt: created, UploadedAt: created, Remote: remote}); err != nil {
			t.Fatal(err)
		}
	}
	insert("a.example", "one", "@u:a.example", "same bytes", false)
	insert("b.example", "two", "@v:b.example", "same bytes", false)
	insert("remote.example", "three", "", "same bytes", true)
	insert("a.example", "four", "@u:a.example", "other bytes", false)
	refused := func(server, id string) bool {
		t.Helper()
		m, err := res.meta.GetMedia(ctx, server, id)
		if err != nil {
			t.Fatal(err)
		}
		return m.Refused()
	}

	for i, tc := range []struct {
		serve          func(http.ResponseWriter, *http.Request) error
		method, target string
		body           string
		wantStatus     int
		wantBody       string
	}{
		{res.serveQuarantine, http.MethodGet, adminPrefix + "quarantine", ``, http.StatusMethodNotAllowed, "method not allowed"},
		{res.serveQuarantine, http.MethodPost, adminPrefix + "quarantine", `{}`, http.StatusBadRequest, `"media"`},
		{res.serveQuarantine, http.MethodPost, adminPrefix + "quarantine", `{"media":["mxc://a.example/one"],"user_id":"@u:a.example"}`, http.StatusBadRequest, `either`},
		{res.serveQuarantine, http.MethodPost, adminPrefix + "quarantine", `{"media":["https://a.example/one"]}`, http.StatusBadRequest, "mxc://"},
		{res.serveQuarantine, http.MethodPost, adminPrefix + "quarantine", `{"media":["mxc://a.example/bad=id"]}`, http.StatusBadRequest, "mxc://"},
		{res.serveQuarantine, http.MethodPost, adminPrefix + "quarantine", `{"user_id":"nobody"}`, http.StatusBadRequest, "user ID"},
		{res.serveQuarantine, http.MethodPost, adminPrefix + "quarantine", `{"user_id":"@u u:a.example"}`, http.StatusBadRequest, "user ID"},
		{res.serveQuarantine, http.MethodPost, adminPrefix + "quarantine", `{"media":["mxc://a.example/one/two"]}`, http.StatusBadRequest, "mxc://"},
		{res.serveDelete, http.MethodPost, adminPrefix + "delete", `{"user_id":"@u:a.example:x"}`, http.StatusBadRequest, "user ID"},
		{res.serveQuarantine, http.MethodPost, adminPrefix + "quarantine", `{"bogus":1}`, http.StatusBadRequest, "unknown field"},
		{res.serveUnquarantine, http.MethodPost, adminPrefix + "unquarantine", `{"media":["mxc://a.example/missing"]}`, http.StatusNotFound, ""},
		{res.serveDelete, http.MethodPost, adminPrefix + "delete", `{"server_name":"a.example"}`, http.StatusBadRequest, "give one of"},
		{res.serveDelete, http.MethodPost, adminPrefix + "delete", `{"user_id":"@u:a.example","limit":-1}`, http.StatusBadRequest, "limit"},
		{res.serveMediaInfo, http.MethodGet, adminPrefix + "media/a.example/missing", ``, http.StatusNotFound, ""},
		{res.serveMediaInfo, http.MethodGet, adminPrefix + "media/a.example", ``, http.StatusBadRequest, "mxc://"},
		{res.serveUsage, http.MethodGet, adminPrefix + "usage", ``, http.StatusBadRequest, "server_name"},
		{res.serveUsage, http.MethodGet, adminPrefix + "usage?server_name=a.example&order_by=size", ``, http.StatusBadRequest, "order_by"},
		{res.serveUsage, http.MethodGet, adminPrefix + "usage?server_name=a.example&limit=0", ``, http.StatusBadRequest, "limit"},
	} {
		status, body := adminCall(t, tc.serve, tc.method, tc.target, tc.body)
		if status != tc.wantStatus || !strings.Contains(body, tc.wantBody) {
			t.Errorf("Test %d: %s %s %s = %d %s; want %d with %q", i, tc.method, tc.target, tc.body, status, body, tc.wantStatus, tc.wantBody)
		}
	}

	// Quarantine one item: every copy of its bytes is refused, on both
	// server names and the remote copy; the other content is not.
	status, body := adminCall(t, res.serveQuarantine, http.MethodPost, adminPrefix+"quarantine", `{"media":["mxc://a.example/one"]}`)
	if status != http.StatusOK || strings.TrimSpace(body) != `{"num_quarantined":1}` {
		t.Fatalf("quarantine: %d %s", status, body)
	}
	for _, ref := range [][2]string{{"a.example", "one"}, {"b.example", "two"}, {"remote.example", "three"}} {
		if !refused(ref[0], ref[1]) {
			t.Errorf("%s/%s is not refused after its content was quarantined", ref[0], ref[1])
		}
	}
	if refused("a.example", "four") {
		t.Error("other content was quarantined too")
	}
	status, body = adminCall(t, res.serveMediaInfo, http.MethodGet, adminPrefix+"media/b.example/two", ``)
	var info adminMediaInfo
	if status != http.StatusOK || json.Unmarshal([]byte(body), &info) != nil || info.QuarantinedBy != adminAPIRequester ||
		info.MXC != "mxc://b.example/two" || info.UserID != "@v:b.example" || info.Size != int64(len("same bytes")) {
		t.Errorf("media info: %d %s", status, body)
	}

	// Protect two; unquarantine lifts the content's quarantine everywhere.
	status, body = adminCall(t, res.serveProtect, http.MethodPost, adminPrefix+"protect", `{"media":["mxc://b.example/two"]}`)
	if status != http.StatusOK || refused("b.example", "two") {
		t.Errorf("protect: %d %s, refused %t", status, body, refused("b.example", "two"))
	}
	status, body = adminCall(t, res.serveUnquarantine, http.MethodPost, adminPrefix+"unquarantine", `{"media":["mxc://remote.example/three"]}`)
	if status != http.StatusOK || strings.TrimSpace(body) != `{"num_unquarantined":1}` || refused("a.example", "one") {
		t.Errorf("unquarantine: %d %s", status, body)
	}

	// Quarantine by user: the user's two items, by content.
	status, body = adminCall(t, res.serveQuarantine, http.MethodPost, adminPrefix+"quarantine", `{"user_id":"@u:a.example"}`)
	if status != http.StatusOK || strings.TrimSpace(body) != `{"num_quarantined":2}` || !refused("a.example", "four") {
		t.Errorf("quarantine by user: %d %s", status, body)
	}

	// Usage of a.example: one user, two items.
	status, body = adminCall(t, res.serveUsage, http.MethodGet, adminPrefix+"usage?server_name=a.example&order_by=media_length&dir=b", ``)
	var usage adminUsage
	if status != http.StatusOK || json.Unmarshal([]byte(body), &usage) != nil || usage.Total != 1 || len(usage.Users) != 1 ||
		usage.Users[0].UserID != "@u:a.example" || usage.Users[0].MediaCount != 2 || usage.NextToken != nil {
		t.Errorf("usage: %d %s", status, body)
	}

	// Delete by media, then by user.
	status, body = adminCall(t, res.serveDelete, http.MethodPost, adminPrefix+"delete", `{"media":["mxc://b.example/two"]}`)
	var del adminDeleted
	if status != http.StatusOK || json.Unmarshal([]byte(body), &del) != nil || del.Total != 1 || del.DeletedMedia[0] != "mxc://b.example/two" {
		t.Errorf("delete: %d %s", status, body)
	}
	status, body = adminCall(t, res.serveDelete, http.MethodPost, adminPrefix+"delete", `{"user_id":"@u:a.example","limit":1}`)
	if status != http.StatusOK || json.Unmarshal([]byte(body), &del) != nil || del.Total != 1 {
		t.Errorf("delete one of the user's media: %d %s", status, body)
	}
	status, body = adminCall(t, res.serveDelete, http.MethodPost, adminPrefix+"delete", `{"server_name":"a.example","before_ts":`+jsonInt(time.Now().UnixMilli())+`}`)
	if status != http.StatusOK || json.Unmarshal([]byte(body), &del) != nil {
		t.Errorf("delete by age: %d %s", status, body)
	}
	// Whatever is left of a.example's local media is quarantined content,
	// which deletion by age skips (as Synapse); remove it explicitly.
	status, body = adminCall(t, res.serveDelete, http.MethodPost, adminPrefix+"delete", `{"user_id":"@u:a.example"}`)
	if status != http.StatusOK {
		t.Errorf("delete the rest: %d %s", status, body)
	}
	for _, ref := range [][2]string{{"a.example", "one"}, {"a.example", "four"}, {"b.example", "two"}} {
		if _, err := res.meta.GetMedia(ctx, ref[0], ref[1]); err == nil {
			t.Errorf("%s/%s still stored after deletion", ref[0], ref[1])
		}
	}
	if _, err := res.meta.GetMedia(ctx, "remote.example", "three"); err != nil {
		t.Errorf("the remote copy must survive local deletions: %v", err)
	}
}

func TestParseBefore(t *testing.T) {
	now := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Time
		err  bool
	}{
		{"30d", now.Add(-30 * 24 * time.Hour), false},
		{"12h", now.Add(-12 * time.Hour), false},
		{"2026-01-01T00:00:00Z", time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), false},
		{"", time.Time{}, true},
		{"-5d", time.Time{}, true},
		{"yesterday", time.Time{}, true},
	} {
		got, err := parseBefore(tc.in, now)
		if (err != nil) != tc.err || (!tc.err && !got.Equal(tc.want)) {
			t.Errorf("parseBefore(%q) = %v, %v; want %v (error %t)", tc.in, got, err, tc.want, tc.err)
		}
	}
}
