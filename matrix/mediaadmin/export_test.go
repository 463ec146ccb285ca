package mediaadmin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
)

// exportCalls records the ExportFunc calls of a test and writes a body
// naming them ("archive of <server> <user>").
type exportCalls struct {
	mu    sync.Mutex
	calls []string
	// fail, when set, is returned before anything is written; failAfter
	// after a first write.
	fail, failAfter error
}

func (c *exportCalls) export(_ context.Context, w io.Writer, serverName, userID string) error {
	c.mu.Lock()
	c.calls = append(c.calls, serverName+" "+userID)
	fail, failAfter := c.fail, c.failAfter
	c.mu.Unlock()
	if fail != nil {
		return fail
	}
	if _, err := fmt.Fprintf(w, "archive of %s %s", serverName, userID); err != nil {
		return err
	}
	if failAfter != nil {
		// More than the server buffers, so that the response has started.
		if _, err := w.Write(make([]byte, 64<<10)); err != nil {
			return err
		}
		return failAfter
	}
	return nil
}

func (c *exportCalls) take() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := c.calls
	c.calls = nil
	return out
}

// exportGet sends GET path (under /_matrix_media/v1/export/) to site with
// token.
func exportGet(t *testing.T, e *env, method, path, token string) (*http.Response, string, error) {
	t.Helper()
	req, err := http.NewRequest(method, e.sites[siteA].URL+exportPrefix+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := e.sites[siteA].Client().Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

// TestExportPermissions checks who may export what through the site, with
// and without allow_user_export, the archive response's headers, and the
// errors of each refusal.
func TestExportPermissions(t *testing.T) {
	for _, allow := range []bool{false, true} {
		t.Run(fmt.Sprintf("allow_user_export=%t", allow), func(t *testing.T) {
			calls := &exportCalls{}
			e := newEnv(t, "sqlite", envOptions{export: calls.export, allowUserExport: allow})
			ownStatus, ownCode := http.StatusForbidden, "M_FORBIDDEN"
			if allow {
				ownStatus, ownCode = http.StatusOK, ""
			}
			for _, tc := range []struct {
				name, method, path, token string
				status                    int
				errcode, message          string
				call                      string
				filename                  string
			}{
				{"no token", "GET", "user/" + esc(userAlice), "", 401, "M_MISSING_TOKEN", "", "", ""},
				{"unknown token", "GET", "user/" + esc(userAlice), "nope", 401, "M_UNKNOWN_TOKEN", "", "", ""},
				{"guest", "GET", "user/" + esc("@guest:"+siteA), tokGuest, 403, "M_GUEST_ACCESS_FORBIDDEN", "", "", ""},
				{"own media", "GET", "user/" + esc(userAlice), tokUser, ownStatus, ownCode, "", map[bool]string{true: siteA + " " + userAlice}[allow], "media-alice-a.example.zip"},
				{"another user's media", "GET", "user/" + esc(userBob), tokUser, 403, "M_FORBIDDEN", map[bool]string{false: "You are not a server admin", true: "You may only export your own media"}[allow], "", ""},
				{"the server, as a user", "GET", "server/" + siteA, tokUser, 403, "M_FORBIDDEN", "You are not a server admin", "", ""},
				{"admin: a user", "GET", "user/" + esc(userBob), tokAdmin, 200, "", "", siteA + " " + userBob, "media-bob-a.example.zip"},
				{"detected admin: a user", "GET", "user/" + esc(userAlice), tokHSAdmin, 200, "", "", siteA + " " + userAlice, "media-alice-a.example.zip"},
				{"admin: the server", "GET", "server/" + siteA, tokAdmin, 200, "", "", siteA + " ", "media-a.example.zip"},
				{"admin: another server", "GET", "server/" + siteB, tokAdmin, 400, "M_UNKNOWN", "Can only export this server's media", "", ""},
				{"admin: a remote user", "GET", "user/" + esc("@x:"+siteB), tokAdmin, 400, "M_UNKNOWN", "Can only look up local users", "", ""},
				{"admin: not a user ID", "GET", "user/alice", tokAdmin, 400, "M_INVALID_PARAM", "", "", ""},
				{"POST", "POST", "server/" + siteA, tokAdmin, 405, "M_UNRECOGNIZED", "", "", ""},
				{"unknown kind", "GET", "room/" + esc("!r:"+siteA), tokAdmin, 404, "M_UNRECOGNIZED", "", "", ""},
				{"extra segment", "GET", "server/" + siteA + "/x", tokAdmin, 404, "M_UNRECOGNIZED", "", "", ""},
			} {
				t.Run(tc.name, func(t *testing.T) {
					resp, body, err := exportGet(t, e, tc.method, tc.path, tc.token)
					if err != nil {
						t.Fatal(err)
					}
					got := calls.take()
					if resp.StatusCode != tc.status {
						t.Fatalf("status %d, want %d; body %s", resp.StatusCode, tc.status, body)
					}
					if tc.status == http.StatusOK {
						wantBody := "archive of " + tc.call
						if body != wantBody || len(got) != 1 || got[0] != tc.call {
							t.Errorf("body %q, calls %q; want %q from one call %q", body, got, wantBody, tc.call)
						}
						if ct, cd := resp.Header.Get("Content-Type"), resp.Header.Get("Content-Disposition"); ct != "application/zip" ||
							cd != `attachment; filename="`+tc.filename+`"` {
							t.Errorf("Content-Type %q, Content-Disposition %q", ct, cd)
						}
						return
					}
					if len(got) != 0 {
						t.Errorf("a refused request exported %q", got)
					}
					var me struct{ ErrCode, Error string }
					if err := json.Unmarshal([]byte(body), &me); err != nil || me.ErrCode != tc.errcode || !strings.Contains(me.Error, tc.message) {
						t.Errorf("body %s, want errcode %s with %q", body, tc.errcode, tc.message)
					}
				})
			}
		})
	}
	if IsExportPath(exportPrefix+"user/") || IsExportPath(exportPrefix+"server") || !IsExportPath(exportPrefix+"server/x") || IsExportPath("/_matrix_media/v1/exports/server/x") {
		t.Error("IsExportPath accepts or refuses the wrong paths")
	}
}

// TestExportFailures: a busy exporter is 429 with Retry-After, a failure
// before the first byte an error response, a failure after it an aborted
// transfer that the client sees as an error.
func TestExportFailures(t *testing.T) {
	calls := &exportCalls{}
	e := newEnv(t, "sqlite", envOptions{export: calls.export})

	calls.fail = fmt.Errorf("two running: %w", ErrExportBusy)
	resp, body, _ := exportGet(t, e, "GET", "server/"+siteA, tokAdmin)
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") != "30" || !strings.Contains(body, "M_LIMIT_EXCEEDED") {
		t.Errorf("busy: %d %v %s", resp.StatusCode, resp.Header, body)
	}

	calls.fail = errors.New("database on fire")
	resp, body, _ = exportGet(t, e, "GET", "server/"+siteA, tokAdmin)
	if resp.StatusCode != http.StatusInternalServerError || !strings.Contains(body, "M_UNKNOWN") || strings.Contains(body, "fire") {
		t.Errorf("failure before the first byte: %d %s", resp.StatusCode, body)
	}

	calls.fail, calls.failAfter = nil, errors.New("blob store gone")
	resp, body, err := exportGet(t, e, "GET", "server/"+siteA, tokAdmin)
	if err == nil || resp == nil {
		t.Fatalf("failure after the first byte: got %v, want a response whose body fails", err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(body, "archive of") {
		t.Errorf("failure after the first byte: %d, %d bytes", resp.StatusCode, len(body))
	}
}
