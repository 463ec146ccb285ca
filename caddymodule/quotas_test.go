package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/spf13/cobra"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
)

func TestQuotasCaddyfile(t *testing.T) {
	const head = "matrix_media {\nserver_name a.test\nhomeserver http://hs\n"
	for i, tc := range []struct {
		input   string
		want    *QuotaConfig
		wantErr string
	}{
		{input: head + `quotas {
				rule @*:a.test {
					max_bytes 0
					max_files 0
					max_pending 0
					max_upload_size 0
				}
			}
}`, want: &QuotaConfig{Rules: []QuotaRuleConfig{{Users: "@*:a.test"}}}},
		{input: head + `quotas {
				exempt_appservices
				rule @alice:a.test {
					window 30m max_files 3
					window 1d max_bytes 1GB
				}
				rule * {
					max_files 10
				}
			}
}`, want: &QuotaConfig{ExemptAppservices: true, Rules: []QuotaRuleConfig{
			{Users: "@alice:a.test", Windows: []QuotaWindowConfig{
				{Window: caddy.Duration(30 * time.Minute), MaxFiles: 3},
				{Window: caddy.Duration(24 * time.Hour), MaxBytes: 1000000000},
			}},
			{Users: "*", MaxFiles: 10},
		}}},
		{input: head + "quotas {\nrule * {\nmax_bytes 4EiB\nmax_upload_size \"1.5 GiB\"\nwindow 1h max_bytes 2,048KiB\n}\n}\n}", want: &QuotaConfig{Rules: []QuotaRuleConfig{
			{Users: "*", MaxBytes: 1 << 62, MaxUploadSize: 3 << 29, Windows: []QuotaWindowConfig{{Window: caddy.Duration(time.Hour), MaxBytes: 2 << 20}}},
		}}},
		{input: head + "quotas {\nrule * {\nmax_bytes 5EiB\n}\n}\n}", wantErr: "parsing max_bytes: size '5EiB' must be between 0 and 4EiB"},
		{input: head + "quotas {\nrule * {\nwindow 1h max_bytes -1\n}\n}\n}", wantErr: "parsing max_bytes"},
		{input: head + "quotas {\n}\n}", wantErr: "at least one rule"},
		{input: head + "quotas extra {\nrule * {\n}\n}\n}", wantErr: "wrong argument count"},
		{input: head + "quotas {\nbogus\n}\n}", wantErr: "unrecognized subdirective 'bogus'"},
		{input: head + "quotas {\nrule {\n}\n}\n}", wantErr: "wrong argument count"},
		{input: head + "quotas {\nrule * {\nmax_bytes lots\n}\n}\n}", wantErr: "max_bytes"},
		{input: head + "quotas {\nrule * {\nmax_files -1\n}\n}\n}", wantErr: "non-negative integer"},
		{input: head + "quotas {\nrule * {\nmax_pending many\n}\n}\n}", wantErr: "max_pending"},
		{input: head + "quotas {\nrule * {\nmax_bytes 1\nmax_bytes 2\n}\n}\n}", wantErr: "specified more than once"},
		{input: head + "quotas {\nrule * {\nwindow\n}\n}\n}", wantErr: "wrong argument count"},
		{input: head + "quotas {\nrule * {\nwindow 0s max_bytes 1\n}\n}\n}", wantErr: "positive duration"},
		{input: head + "quotas {\nrule * {\nwindow 1h max_size 1\n}\n}\n}", wantErr: "unknown limit 'max_size'"},
		{input: head + "quotas {\nrule * {\nwindow 1h max_bytes\n}\n}\n}", wantErr: "wrong argument count"},
		{input: head + "quotas {\nrule * {\ncan_upgrade yes\n}\n}\n}", wantErr: "wrong argument count"},
		{input: head + "quotas {\nrule * {\nsoft_limit\n}\n}\n}", wantErr: "unrecognized subdirective 'soft_limit'"},
		{input: head + "quotas {\nrule * {\n}\n}\nquotas {\nrule * {\n}\n}\n}", wantErr: "quotas specified more than once"},
	} {
		var got Handler
		err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Test %d: error %v, want one containing %q", i, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("Test %d: %v", i, err)
			continue
		}
		gotJSON, _ := json.Marshal(got.Quotas)
		wantJSON, _ := json.Marshal(tc.want)
		if !bytes.Equal(gotJSON, wantJSON) {
			t.Errorf("Test %d: quotas %s, want %s", i, gotJSON, wantJSON)
		}
	}
}

// do sends one request with a token through the handler.
func quotaDo(t *testing.T, h *Handler, method, path, token string, body []byte) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest(method, path, bytes.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	rec, next := serve(t, h, req)
	if next {
		t.Fatalf("%s %s went to the next handler", method, path)
	}
	return rec
}

func decodeJSON(t *testing.T, rec *httptest.ResponseRecorder) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &m); err != nil {
		t.Fatalf("body %q: %v", rec.Body.String(), err)
	}
	return m
}

// TestQuotaHandler runs quotas through a provisioned handler: the limit,
// the M_USER_LIMIT_EXCEEDED answer, the usage endpoint and config, the
// media admin delete API restoring quota, an exempt admin, and the admin
// API's usage endpoints.
func TestQuotaHandler(t *testing.T) {
	hs := fakeHomeserver(t, map[string]string{"tok": "@alice:example.org", "adm": "@admin:example.org"})
	h := &Handler{ServerName: "example.org", Homeserver: hs.URL, MaxUploadSize: 1000, Admins: []string{"@admin:example.org"},
		Quotas: &QuotaConfig{ExemptAdmins: true, Rules: []QuotaRuleConfig{{
			Users: "@*:example.org", MaxBytes: 100, MaxFiles: 10, MaxUploadSize: 500,
			Windows:    []QuotaWindowConfig{{Window: caddy.Duration(time.Hour), MaxFiles: 5}},
			InfoURI:    "https://example.org/quota",
			MaxPending: 1,
		}}}}
	provisionHandler(t, h)

	rec := quotaDo(t, h, http.MethodPost, "/_matrix/media/v3/upload", "tok", bytes.Repeat([]byte("a"), 100))
	if rec.Code != 200 {
		t.Fatalf("upload at the limit: %d %s", rec.Code, rec.Body)
	}
	id := strings.TrimPrefix(decodeJSON(t, rec)["content_uri"].(string), "mxc://example.org/")
	rec = quotaDo(t, h, http.MethodPost, "/_matrix/media/v3/upload", "tok", []byte("b"))
	body := decodeJSON(t, rec)
	if rec.Code != 403 || body["errcode"] != "M_USER_LIMIT_EXCEEDED" || body["info_uri"] != "https://example.org/quota" ||
		body["can_upgrade"] != false || body["soft_limit"] != false {
		t.Fatalf("over quota: %d %s", rec.Code, rec.Body)
	}
	// The admin is exempt.
	if rec := quotaDo(t, h, http.MethodPost, "/_matrix/media/v3/upload", "adm", bytes.Repeat([]byte("c"), 900)); rec.Code != 200 {
		t.Fatalf("exempt admin: %d %s", rec.Code, rec.Body)
	}

	rec = quotaDo(t, h, http.MethodGet, "/_matrix/client/v1/media/usage", "tok", nil)
	if rec.Code != 200 || rec.Body.String() != `{"m.storage.used":100,"m.storage.files":1,"org.matrix.msc4034.storage.used":100,"org.matrix.msc4034.storage.files":1}` {
		t.Fatalf("usage: %d %s", rec.Code, rec.Body)
	}
	rec = quotaDo(t, h, http.MethodGet, "/_matrix/client/v1/media/config", "tok", nil)
	if rec.Code != 200 || rec.Body.String() != `{"m.upload.size":500,"m.storage.size":100,"org.matrix.msc4034.storage.size":100,"m.storage.max_files":10,"org.matrix.msc4034.storage.max_files":10}` {
		t.Fatalf("config: %d %s", rec.Code, rec.Body)
	}
	rec = quotaDo(t, h, http.MethodGet, "/_matrix/client/v1/media/config", "adm", nil)
	if rec.Body.String() != `{"m.upload.size":1000}` {
		t.Fatalf("admin's config: %s", rec.Body)
	}

	// The admin API: top users, one user's report, a recount that finds
	// nothing to repair.
	status, out := adminCall(t, h.res.serveUsageSub, http.MethodGet, adminPrefix+"usage/top?limit=5", "")
	if status != 200 || strings.TrimSpace(out) != `{"users":[{"user_id":"@admin:example.org","bytes":900,"files":1},{"user_id":"@alice:example.org","bytes":100,"files":1}]}` {
		t.Fatalf("usage/top: %d %s", status, out)
	}
	status, out = adminCall(t, h.res.serveUsageSub, http.MethodGet, adminPrefix+"usage/user/@alice:example.org", "")
	var rep mediaapi.UserQuotaReport
	if status != 200 || json.Unmarshal([]byte(out), &rep) != nil || rep.Bytes != 100 || rep.Files != 1 {
		t.Fatalf("usage/user: %d %s", status, out)
	}
	var site *mediaapi.SiteQuotaReport
	for i := range rep.Sites {
		if rep.Sites[i].ServerName == "example.org" {
			site = &rep.Sites[i]
		}
	}
	if site == nil || site.Rule != 1 || site.MaxBytes != 100 || len(site.Windows) != 1 || site.Windows[0].UsedFiles != 1 || !site.ExemptAdmins {
		t.Fatalf("usage/user site report: %s", out)
	}
	status, out = adminCall(t, h.res.serveUsageSub, http.MethodPost, adminPrefix+"usage/recount", `{"user_id":"@alice:example.org"}`)
	if status != 200 || strings.TrimSpace(out) != `{"changed":0}` {
		t.Fatalf("recount: %d %s", status, out)
	}
	for _, tc := range []struct{ method, target, body, want string }{
		{http.MethodGet, "usage/top?limit=0", "", "limit"},
		{http.MethodPost, "usage/top", "", "method not allowed"},
		{http.MethodGet, "usage/recount", "", "method not allowed"},
		{http.MethodPost, "usage/recount", `{"user_id":"alice"}`, "not a Matrix user ID"},
		{http.MethodGet, "usage/user/nobody", "", "not a Matrix user ID"},
		{http.MethodGet, "usage/bogus", "", "unknown usage endpoint"},
	} {
		if status, out := adminCall(t, h.res.serveUsageSub, tc.method, adminPrefix+tc.target, tc.body); status < 400 || !strings.Contains(out, tc.want) {
			t.Errorf("%s %s: %d %s, want an error with %q", tc.method, tc.target, status, out, tc.want)
		}
	}

	// Deleting through the media admin API gives the room back.
	rec = quotaDo(t, h, http.MethodDelete, "/_synapse/admin/v1/media/example.org/"+id, "adm", nil)
	if rec.Code != 200 {
		t.Fatalf("admin delete: %d %s", rec.Code, rec.Body)
	}
	if rec := quotaDo(t, h, http.MethodPost, "/_matrix/media/v3/upload", "tok", bytes.Repeat([]byte("d"), 100)); rec.Code != 200 {
		t.Fatalf("upload after deletion: %d %s", rec.Code, rec.Body)
	}
}

func TestQuotaHandlerProvisionErrors(t *testing.T) {
	hs := fakeHomeserver(t, nil)
	for i, q := range []*QuotaConfig{
		{Rules: []QuotaRuleConfig{{Users: ""}}},
		{Rules: []QuotaRuleConfig{{Users: "*", MaxBytes: -1}}},
		{Rules: []QuotaRuleConfig{{Users: "*", Windows: []QuotaWindowConfig{{MaxBytes: 5}}}}},
	} {
		ctx, cancel := newCaddyContext(t, map[string]any{"matrix_media": testAppConfig(t)})
		h := &Handler{ServerName: "example.org", Homeserver: hs.URL, Quotas: q}
		if err := h.Provision(ctx); err == nil || !strings.Contains(err.Error(), "quota rule 1") {
			t.Errorf("Test %d: provision error %v, want one naming quota rule 1", i, err)
		}
		cancel()
	}
}

// quotaSite is the quota of startCaddySite in the quota tests: 100 bytes
// for everyone, and 10 files an hour.
const quotaSite = `quotas {
			rule @*:example.org {
				max_bytes 100
				window 1h max_files 10
			}
		}`

// upload sends body over HTTP (chunked: without Content-Length).
func (rc runningCaddy) upload(t *testing.T, body []byte, chunked bool) (int, string) {
	t.Helper()
	var rd io.Reader = bytes.NewReader(body)
	if chunked {
		rd = io.MultiReader(rd) // hides the length: sent chunked
	}
	req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("http://127.0.0.1:%d/_matrix/media/v3/upload", rc.httpPort), rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "example.org"
	req.Header.Set("Authorization", "Bearer "+rc.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// runUsageCLI runs "caddy matrix-media usage" against rc.
func (rc runningCaddy) runUsageCLI(t *testing.T, args []string, flags map[string]string) (string, error) {
	t.Helper()
	var cmd *cobra.Command
	for _, c := range adminCommands() {
		if c.Name() == "usage" {
			cmd = c
		}
	}
	return rc.runCLI(t, cmd, args, flags)
}

// runCLI runs the subcommand cmd with args and flags against rc's admin
// API and returns what it printed.
func (rc runningCaddy) runCLI(t *testing.T, cmd *cobra.Command, args []string, flags map[string]string) (string, error) {
	t.Helper()
	cmd.Flags().String("address", "", "")
	cmd.Flags().String("config", "", "")
	cmd.Flags().String("adapter", "", "")
	var out bytes.Buffer
	cmd.SetOut(&out)
	if err := cmd.Flags().Set("address", rc.admin); err != nil {
		t.Fatal(err)
	}
	for k, v := range flags {
		if err := cmd.Flags().Set(k, v); err != nil {
			t.Fatal(err)
		}
	}
	err := cmd.RunE(cmd, args)
	return out.String(), err
}

// TestQuotaRunningCaddy enforces a quota over real HTTP (a chunked body
// cut at the bound) and runs the usage command forms against the admin API.
func TestQuotaRunningCaddy(t *testing.T) {
	rc := startCaddySite(t, t.TempDir(), quotaSite)
	if st, body := rc.upload(t, bytes.Repeat([]byte("a"), 60), false); st != 200 {
		t.Fatalf("upload: %d %s", st, body)
	}
	if st, body := rc.upload(t, bytes.Repeat([]byte("b"), 41), true); st != 403 || !strings.Contains(body, `"M_FORBIDDEN"`) {
		t.Fatalf("chunked upload over quota: %d %s", st, body)
	}
	if st, body := rc.upload(t, bytes.Repeat([]byte("c"), 41), false); st != 403 || !strings.Contains(body, "quota") {
		t.Fatalf("upload over quota: %d %s", st, body)
	}
	if st, body := rc.upload(t, bytes.Repeat([]byte("d"), 40), true); st != 200 {
		t.Fatalf("chunked upload of the rest: %d %s", st, body)
	}

	out, err := rc.runUsageCLI(t, []string{"@alice:example.org"}, nil)
	if err != nil || !strings.Contains(out, "@alice:example.org stores 100 B in 2 files") ||
		!strings.Contains(out, "example.org: rule 1 (@*:example.org): bytes 100 B, files no limit") ||
		!strings.Contains(out, "last 1h0m0s: 100 B of no limit, 2 of 10 files") {
		t.Fatalf("usage <user>: %v\n%s", err, out)
	}
	out, err = rc.runUsageCLI(t, nil, map[string]string{"top": "3"})
	if err != nil || !strings.Contains(out, "@alice:example.org") || !strings.Contains(out, "100 B") {
		t.Fatalf("usage --top: %v\n%s", err, out)
	}
	out, err = rc.runUsageCLI(t, nil, map[string]string{"recount": "true", "user": "@alice:example.org"})
	if err != nil || out != "usage counters of 0 users corrected\n" {
		t.Fatalf("usage --recount: %v %q", err, out)
	}
	// The statistics form keeps working.
	if _, err := rc.runUsageCLI(t, nil, map[string]string{"server-name": "example.org"}); err != nil {
		t.Fatalf("usage --server-name: %v", err)
	}
	for _, tc := range []struct {
		args  []string
		flags map[string]string
		want  string
	}{
		{[]string{"@a:x", "@b:x"}, nil, "at most one user ID"},
		{[]string{"@a:x"}, map[string]string{"recount": "true"}, "--recount takes --user"},
		{nil, map[string]string{"user": "@a:x"}, "--user goes with --recount"},
		{nil, nil, "--server-name is required"},
		{[]string{"nobody"}, nil, "not a Matrix user ID"},
	} {
		if _, err := rc.runUsageCLI(t, tc.args, tc.flags); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("usage %v %v: %v, want an error with %q", tc.args, tc.flags, err, tc.want)
		}
	}
}
