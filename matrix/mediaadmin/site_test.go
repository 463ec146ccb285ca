package mediaadmin

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

func TestPermissions(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		e.put(media{server: siteA, id: "m1", user: userAlice, content: "hello"})
		cases := []struct {
			name    string
			token   string
			query   string
			status  int
			errcode string
			message string
		}{
			{"missing token", "", "", 401, "M_MISSING_TOKEN", ""},
			{"unknown token", "nope", "", 401, "M_UNKNOWN_TOKEN", ""},
			{"plain user", tokUser, "", 403, "M_FORBIDDEN", "You are not a server admin"},
			{"guest", tokGuest, "", 403, "M_GUEST_ACCESS_FORBIDDEN", ""},
			{"static admin", tokAdmin, "", 200, "", ""},
			{"homeserver admin (detected)", tokHSAdmin, "", 200, "", ""},
			{"token in query", "", "?access_token=" + tokAdmin, 200, "", ""},
			{"plain user token in query", "", "?access_token=" + tokUser, 403, "M_FORBIDDEN", ""},
		}
		endpoints := []struct{ method, path string }{
			{"GET", "media/" + siteA + "/m1"},
			{"GET", "users/" + esc(userAlice) + "/media"},
			{"GET", "statistics/users/media"},
			// Protecting is idempotent, so it can run for every case.
			{"POST", "media/protect/m1"},
		}
		for _, ep := range endpoints {
			for _, c := range cases {
				t.Run(ep.method+" "+ep.path+"/"+c.name, func(t *testing.T) {
					r := e.do(siteA, ep.method, ep.path+c.query, c.token)
					r.expect(t, c.status, c.errcode)
					if c.message != "" && r.body["error"] != c.message {
						t.Errorf("error %q, want %q", r.body["error"], c.message)
					}
					if r.header.Get("Access-Control-Allow-Origin") != "*" {
						t.Errorf("no CORS header")
					}
				})
			}
		}
	})
}

func TestQuarantineByContent(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		a := e.put(media{server: siteA, id: "onA", user: userAlice, content: "bad bytes"})
		e.put(media{server: siteB, id: "onB", user: "@bob:" + siteB, content: "bad bytes"})
		e.put(media{server: remote, id: "copy", content: "bad bytes", remote: true})
		e.put(media{server: siteA, id: "sticker", user: userBob, content: "bad bytes", protected: true})
		e.put(media{server: siteA, id: "fine", user: userAlice, content: "good bytes"})

		r := e.do(siteA, "POST", "media/quarantine/"+siteA+"/onA", tokAdmin)
		r.expect(t, 200, "")
		if r.raw != "{}" {
			t.Fatalf("body %q, want {}", r.raw)
		}
		if !e.inv.forgotContent(a.SHA256) {
			t.Errorf("ForgetContent(%s) not called", a.SHA256)
		}
		for _, ref := range []storage.MediaRef{{ServerName: siteA, MediaID: "onA"}, {ServerName: siteB, MediaID: "onB"}, {ServerName: remote, MediaID: "copy"}} {
			m := e.get(ref.ServerName, ref.MediaID)
			if !m.Refused() || m.QuarantinedBy != userAdmin {
				t.Errorf("%v: refused %v by %q, want refused by %s", ref, m.Refused(), m.QuarantinedBy, userAdmin)
			}
		}
		if m := e.get(siteA, "sticker"); m.Refused() {
			t.Errorf("protected item refused")
		}
		if m := e.get(siteA, "fine"); m.Refused() {
			t.Errorf("other content refused")
		}

		// The other site and the remote copy show it through media info.
		info := e.do(siteB, "GET", "media/"+siteB+"/onB", tokAdmin)
		info.expect(t, 200, "")
		if got := info.body["media_info"].(map[string]any)["quarantined_by"]; got != userAdmin {
			t.Errorf("site B media info quarantined_by %v, want %s", got, userAdmin)
		}
		info = e.do(siteB, "GET", "media/"+remote+"/copy", tokAdmin)
		if got := info.body["media_info"].(map[string]any)["quarantined_by"]; got != userAdmin {
			t.Errorf("remote copy quarantined_by %v, want %s", got, userAdmin)
		}
		// The protected item's info says it is not quarantined.
		info = e.do(siteA, "GET", "media/"+siteA+"/sticker", tokAdmin)
		if mi := info.body["media_info"].(map[string]any); mi["quarantined_by"] != nil || mi["safe_from_quarantine"] != true {
			t.Errorf("protected item info %v", mi)
		}

		// Quarantining again (through another copy) keeps the first record.
		e.do(siteB, "POST", "media/quarantine/"+siteB+"/onB", tokHSAdmin).expect(t, 200, "")
		if m := e.get(siteA, "onA"); m.QuarantinedBy != userAdmin {
			t.Errorf("second quarantine replaced the first: by %q", m.QuarantinedBy)
		}

		// Unquarantine through the remote copy restores every item.
		before := len(e.inv.contents)
		r = e.do(siteB, "POST", "media/unquarantine/"+remote+"/copy", tokAdmin)
		r.expect(t, 200, "")
		if r.raw != "{}" {
			t.Fatalf("body %q, want {}", r.raw)
		}
		for _, ref := range []storage.MediaRef{{ServerName: siteA, MediaID: "onA"}, {ServerName: siteB, MediaID: "onB"}, {ServerName: remote, MediaID: "copy"}} {
			if m := e.get(ref.ServerName, ref.MediaID); m.Refused() || m.QuarantinedBy != "" {
				t.Errorf("%v still quarantined after unquarantine", ref)
			}
		}
		if len(e.inv.contents) == before {
			t.Errorf("unquarantine did not call ForgetContent")
		}

		// Missing media, pending media and media of nowhere: 404.
		for _, p := range []string{"media/quarantine/" + siteA + "/nope", "media/unquarantine/" + remote + "/nope", "media/quarantine/bad%20server/x"} {
			e.do(siteA, "POST", p, tokAdmin).expect(t, 404, "M_NOT_FOUND")
		}
	})
}

func TestQuarantinePending(t *testing.T) {
	e := newEnv(t, "sqlite")
	err := e.meta.CreatePending(context.Background(), storage.Media{
		ServerName: siteA, MediaID: "pend", UserID: userAlice, State: storage.StatePending,
		CreatedAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour),
	}, 0)
	if err != nil {
		t.Fatal(err)
	}
	e.do(siteA, "POST", "media/quarantine/"+siteA+"/pend", tokAdmin).expect(t, 404, "M_NOT_FOUND")
}

func TestProtect(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		e.put(media{server: siteA, id: "sticker", user: userAlice, content: "shared"})
		e.put(media{server: siteA, id: "upload", user: userBob, content: "shared"})

		r := e.do(siteA, "POST", "media/protect/sticker", tokAdmin)
		r.expect(t, 200, "")
		if r.raw != "{}" {
			t.Fatalf("body %q", r.raw)
		}
		if !e.get(siteA, "sticker").Protected {
			t.Fatal("not protected")
		}
		if !e.inv.forgotRef(storage.MediaRef{ServerName: siteA, MediaID: "sticker"}) {
			t.Errorf("Forget not called on protect")
		}
		// Quarantining a protected item is a no-op answering {}.
		e.do(siteA, "POST", "media/quarantine/"+siteA+"/sticker", tokAdmin).expect(t, 200, "")
		if e.refused(siteA, "upload") {
			t.Fatal("quarantining a protected item quarantined its content")
		}
		// Quarantining the other copy quarantines the content, but the
		// protected item stays served.
		e.do(siteA, "POST", "media/quarantine/"+siteA+"/upload", tokAdmin).expect(t, 200, "")
		if !e.refused(siteA, "upload") || e.refused(siteA, "sticker") {
			t.Fatal("want upload refused and sticker served")
		}
		// Unprotecting exposes it to the quarantine of its content.
		e.do(siteA, "POST", "media/unprotect/sticker", tokAdmin).expect(t, 200, "")
		if m := e.get(siteA, "sticker"); m.Protected || !m.Refused() {
			t.Fatalf("after unprotect: protected %v refused %v", m.Protected, m.Refused())
		}
		e.do(siteA, "POST", "media/protect/nope", tokAdmin).expect(t, 404, "M_NOT_FOUND")
		e.do(siteA, "POST", "media/unprotect/bad%24id", tokAdmin).expect(t, 404, "M_NOT_FOUND")
	})
}

func TestQuarantineUser(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		// Five items (more than the batch size of 2): two share content,
		// one is protected.
		e.put(media{server: siteA, id: "a1", user: userAlice, content: "one"})
		e.put(media{server: siteA, id: "a2", user: userAlice, content: "one"})
		e.put(media{server: siteA, id: "a3", user: userAlice, content: "two"})
		e.put(media{server: siteA, id: "a4", user: userAlice, content: "three"})
		e.put(media{server: siteA, id: "a5", user: userAlice, content: "four", protected: true})
		bob := e.put(media{server: siteA, id: "b1", user: userBob, content: "two"})
		e.put(media{server: siteA, id: "b2", user: userBob, content: "bob's own"})
		// Alice's user ID on site B is another user.
		e.put(media{server: siteB, id: "x1", user: userAlice, content: "site b"})

		r := e.do(siteA, "POST", "user/"+esc(userAlice)+"/media/quarantine", tokAdmin)
		r.expect(t, 200, "")
		if r.body["num_quarantined"] != float64(4) {
			t.Fatalf("num_quarantined %v, want 4 (protected excluded); body %s", r.body["num_quarantined"], r.raw)
		}
		for _, id := range []string{"a1", "a2", "a3", "a4"} {
			if !e.refused(siteA, id) {
				t.Errorf("%s not refused", id)
			}
		}
		if e.refused(siteA, "a5") {
			t.Errorf("protected a5 refused")
		}
		if !e.refused(siteA, "b1") || !e.inv.forgotContent(bob.SHA256) {
			t.Errorf("bob's copy of alice's content not refused or not forgotten")
		}
		if e.refused(siteA, "b2") || e.refused(siteB, "x1") {
			t.Errorf("unrelated media refused")
		}
		// Again: already-quarantined items are counted too.
		r = e.do(siteA, "POST", "user/"+esc(userAlice)+"/media/quarantine", tokAdmin)
		if r.body["num_quarantined"] != float64(4) {
			t.Errorf("second run num_quarantined %v, want 4", r.body["num_quarantined"])
		}
		// A user with no local media.
		r = e.do(siteA, "POST", "user/"+esc("@who:elsewhere.example")+"/media/quarantine", tokAdmin)
		r.expect(t, 200, "")
		if r.body["num_quarantined"] != float64(0) {
			t.Errorf("remote user num_quarantined %v", r.body["num_quarantined"])
		}
	})
}

func TestRoomQuarantine(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		e.put(media{server: siteA, id: "l1", user: userAlice, content: "room one"})
		e.put(media{server: siteA, id: "l2", user: userAlice, content: "room two", protected: true})
		e.put(media{server: remote, id: "r1", content: "room three", remote: true})
		e.put(media{server: siteA, id: "dup", user: userBob, content: "room one"})
		e.put(media{server: siteA, id: "out", user: userBob, content: "not in room"})
		room := "!room:" + siteA
		e.hs.set(func(hs *testHomeserver) {
			hs.roomMedia[room] = [2][]string{
				{"mxc://" + siteA + "/l1", "mxc://" + siteA + "/l2", "not an mxc", "mxc://" + siteA + "/gone"},
				{"mxc://" + remote + "/r1", "mxc://" + remote + "/never-fetched"},
			}
		})
		for _, path := range []string{"room/" + esc(room) + "/media/quarantine", "quarantine_media/" + esc(room)} {
			r := e.do(siteA, "POST", path, tokHSAdmin)
			r.expect(t, 200, "")
			// l1 and r1; l2 is protected, the rest unknown.
			if r.body["num_quarantined"] != float64(2) {
				t.Fatalf("%s: num_quarantined %v, want 2; %s", path, r.body["num_quarantined"], r.raw)
			}
		}
		for _, id := range []storage.MediaRef{{ServerName: siteA, MediaID: "l1"}, {ServerName: remote, MediaID: "r1"}, {ServerName: siteA, MediaID: "dup"}} {
			if !e.refused(id.ServerName, id.MediaID) {
				t.Errorf("%v not refused", id)
			}
		}
		if e.refused(siteA, "l2") || e.refused(siteA, "out") {
			t.Errorf("protected or unlisted media refused")
		}
		// The room list was asked with the caller's token, room ID escaped.
		e.hs.set(func(hs *testHomeserver) {
			if !slices.Contains(hs.requests, "/_synapse/admin/v1/room/"+esc(room)+"/media") {
				t.Errorf("homeserver requests %v", hs.requests)
			}
		})
		// A media admin who is not a homeserver admin is refused by the
		// homeserver: a clear 403.
		r := e.do(siteA, "POST", "room/"+esc(room)+"/media/quarantine", tokAdmin)
		r.expect(t, 403, "M_FORBIDDEN")
		if !strings.Contains(r.body["error"].(string), "homeserver refused") {
			t.Errorf("error %q", r.body["error"])
		}
	})
}

func TestRoomQuarantineWithoutRoomAPI(t *testing.T) {
	cases := []struct {
		name    string
		status  int
		answer  string
		want    int
		errcode string
	}{
		{"404 M_UNRECOGNIZED (Dendrite)", 404, `{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`, 501, "M_UNRECOGNIZED"},
		{"404 without JSON (proxy)", 404, `<html>not found</html>`, 501, "M_UNRECOGNIZED"},
		{"405", 405, `{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`, 501, "M_UNRECOGNIZED"},
		{"400 M_UNRECOGNIZED (Conduit)", 400, `{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`, 501, "M_UNRECOGNIZED"},
		{"404 M_NOT_FOUND", 404, `{"errcode":"M_NOT_FOUND","error":"Room not found"}`, 404, "M_NOT_FOUND"},
		{"500", 500, `{"errcode":"M_UNKNOWN","error":"boom"}`, 502, "M_UNKNOWN"},
		{"200 garbage", 200, `[1,2`, 502, "M_UNKNOWN"},
	}
	e := newEnv(t, "sqlite")
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e.hs.set(func(hs *testHomeserver) { hs.roomStatus, hs.roomAnswer = c.status, c.answer })
			r := e.do(siteA, "POST", "room/"+esc("!r:"+siteA)+"/media/quarantine", tokHSAdmin)
			r.expect(t, c.want, c.errcode)
			if c.want == 501 && !strings.Contains(r.body["error"].(string), "does not list a room's media") {
				t.Errorf("unclear error %q", r.body["error"])
			}
		})
	}
	t.Run("no homeserver configured", func(t *testing.T) {
		e := newEnv(t, "sqlite", envOptions{noHomeserver: true})
		e.do(siteA, "POST", "quarantine_media/"+esc("!r:"+siteA), tokAdmin).expect(t, 501, "M_UNRECOGNIZED")
	})
	t.Run("homeserver unreachable", func(t *testing.T) {
		e := newEnv(t, "sqlite")
		// Authenticate first (cached), then take the homeserver down.
		e.do(siteA, "GET", "statistics/users/media", tokHSAdmin).expect(t, 200, "")
		e.hs.srv.Close()
		e.do(siteA, "POST", "quarantine_media/"+esc("!r:"+siteA), tokHSAdmin).expect(t, 502, "M_UNKNOWN")
	})
}

func TestMediaInfo(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		created := time.UnixMilli(1_700_000_000_123)
		local := e.put(media{server: siteA, id: "loc", user: userAlice, content: "local bytes", created: created, filename: "a.txt"})
		rem := e.put(media{server: remote, id: "rem", content: "remote bytes", remote: true, created: created, contentType: "image/png"})
		access := time.UnixMilli(1_700_000_500_000)
		if err := e.admin.RecordAccess(context.Background(), []storage.Access{{MediaRef: storage.MediaRef{ServerName: siteA, MediaID: "loc"}, At: access}}); err != nil {
			t.Fatal(err)
		}

		r := e.do(siteA, "GET", "media/"+siteA+"/loc", tokAdmin)
		r.expect(t, 200, "")
		want := map[string]any{
			"media_origin": nil, "user_id": userAlice, "media_id": "loc", "media_type": "text/plain",
			"media_length": float64(len("local bytes")), "upload_name": "a.txt", "created_ts": float64(created.UnixMilli()),
			"filesystem_id": nil, "url_cache": nil, "last_access_ts": float64(access.UnixMilli()), "quarantined_by": nil,
			"authenticated": nil, "safe_from_quarantine": false, "sha256": local.SHA256,
		}
		if got := r.body["media_info"]; !reflect.DeepEqual(got, want) {
			t.Errorf("local media_info\n got %v\nwant %v", got, want)
		}

		r = e.do(siteA, "GET", "media/"+remote+"/rem", tokAdmin)
		r.expect(t, 200, "")
		want = map[string]any{
			"media_origin": remote, "user_id": nil, "media_id": "rem", "media_type": "image/png",
			"media_length": float64(len("remote bytes")), "upload_name": nil, "created_ts": float64(created.UnixMilli()),
			"filesystem_id": rem.SHA256, "url_cache": nil, "last_access_ts": nil, "quarantined_by": nil,
			"authenticated": nil, "safe_from_quarantine": nil, "sha256": rem.SHA256,
		}
		if got := r.body["media_info"]; !reflect.DeepEqual(got, want) {
			t.Errorf("remote media_info\n got %v\nwant %v", got, want)
		}
		for _, p := range []string{"media/" + siteA + "/nope", "media/" + remote + "/not-cached", "media/" + siteA + "/bad%21id"} {
			r := e.do(siteA, "GET", p, tokAdmin)
			r.expect(t, 404, "M_NOT_FOUND")
			if r.body["error"] != "Unknown media" {
				t.Errorf("%s: error %q", p, r.body["error"])
			}
		}
	})
}

func TestDeleteMedia(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		one := e.put(media{server: siteA, id: "one", user: userAlice, content: "shared blob"})
		e.put(media{server: siteA, id: "two", user: userBob, content: "shared blob"})
		thumb := e.thumbnail(one, "thumbnail of one")
		e.put(media{server: remote, id: "rem", content: "remote", remote: true})

		// Remote media cannot be deleted here, whether cached or not.
		r := e.do(siteA, "DELETE", "media/"+remote+"/rem", tokAdmin)
		r.expect(t, 400, "M_UNKNOWN")
		if r.body["error"] != "Can only delete local media" {
			t.Errorf("error %q", r.body["error"])
		}
		if e.gone(remote, "rem") {
			t.Fatal("remote media deleted")
		}
		e.do(siteA, "DELETE", "media/"+siteA+"/nope", tokAdmin).expect(t, 404, "M_NOT_FOUND")

		// Deleting one of two items sharing a blob keeps the blob.
		r = e.do(siteA, "DELETE", "media/"+siteA+"/one", tokAdmin)
		r.expect(t, 200, "")
		if got := strs(r.body["deleted_media"]); !slices.Equal(got, []string{"one"}) || r.body["total"] != float64(1) {
			t.Fatalf("body %s", r.raw)
		}
		if !e.gone(siteA, "one") || e.gone(siteA, "two") {
			t.Fatal("wrong rows deleted")
		}
		if !e.blobExists(one.SHA256) {
			t.Fatal("shared blob deleted while another item references it")
		}
		if e.blobExists(thumb) {
			t.Errorf("thumbnail blob of the deleted item kept")
		}
		if !e.inv.forgotRef(storage.MediaRef{ServerName: siteA, MediaID: "one"}) {
			t.Errorf("Forget not called for the deleted item")
		}
		// The ID is tombstoned: never issued again.
		err := e.meta.InsertMedia(context.Background(), storage.Media{
			ServerName: siteA, MediaID: "one", State: storage.StateReady, UserID: userAlice,
			SHA256: one.SHA256, Size: one.Size, ContentType: "text/plain", CreatedAt: time.Now(), UploadedAt: time.Now(),
		})
		if !errors.Is(err, storage.ErrConflict) {
			t.Errorf("re-inserting a deleted ID: %v, want ErrConflict", err)
		}
		// Deleting the second removes the blob.
		e.do(siteB, "DELETE", "media/"+siteA+"/two", tokAdmin).expect(t, 400, "M_UNKNOWN") // not site B's media
		e.do(siteA, "DELETE", "media/"+siteA+"/two", tokAdmin).expect(t, 200, "")
		if e.blobExists(one.SHA256) {
			t.Fatal("blob kept after its last item was deleted")
		}
		e.do(siteA, "DELETE", "media/"+siteA+"/two", tokAdmin).expect(t, 404, "M_NOT_FOUND")

		if n := counterValue(t, e.metrics.deletedMedia.WithLabelValues(reasonAdmin)); n != 2 {
			t.Errorf("deleted media counted %v, want 2", n)
		}
		if n := counterValue(t, e.metrics.deletedBytes.WithLabelValues(reasonAdmin)); n != float64(len("shared blob")+len("thumbnail of one")) {
			t.Errorf("deleted bytes counted %v", n)
		}
		if n := counterValue(t, e.metrics.requests.WithLabelValues(string(epDeleteMedia), "400")); n != 2 {
			t.Errorf("400s of delete_media counted %v, want 2", n)
		}
	})
}

func TestDeleteOldLocal(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		old := time.Now().Add(-48 * time.Hour)
		e.put(media{server: siteA, id: "old-small", user: userAlice, content: "x", created: old})
		e.put(media{server: siteA, id: "old-big", user: userAlice, content: strings.Repeat("x", 100), created: old})
		e.put(media{server: siteA, id: "avatar", user: userAlice, content: strings.Repeat("a", 100), created: old})
		e.put(media{server: siteA, id: "bob-old", user: userBob, content: strings.Repeat("b", 100), created: old})
		e.put(media{server: siteA, id: "protected", user: userBob, content: strings.Repeat("p", 100), created: old, protected: true})
		e.put(media{server: siteA, id: "quarantined", user: userBob, content: strings.Repeat("q", 100), created: old})
		e.put(media{server: siteA, id: "new", user: userBob, content: strings.Repeat("n", 100)})
		e.put(media{server: siteB, id: "other-site", user: "@x:" + siteB, content: strings.Repeat("o", 100), created: old})
		e.put(media{server: remote, id: "remote-old", content: strings.Repeat("r", 100), remote: true, created: old})
		// Recently accessed old media is not old.
		e.put(media{server: siteA, id: "old-accessed", user: userBob, content: strings.Repeat("c", 100), created: old})
		if err := e.admin.RecordAccess(context.Background(), []storage.Access{{MediaRef: storage.MediaRef{ServerName: siteA, MediaID: "old-accessed"}, At: time.Now()}}); err != nil {
			t.Fatal(err)
		}
		e.do(siteA, "POST", "media/quarantine/"+siteA+"/quarantined", tokAdmin).expect(t, 200, "")
		e.hs.set(func(hs *testHomeserver) {
			hs.profiles[userAlice] = map[string]any{"displayname": "Alice", "avatar_url": "mxc://" + siteA + "/avatar"}
		})
		before := time.Now().Add(-time.Hour).UnixMilli()

		bad := []struct {
			query, errcode string
		}{
			{"", "M_MISSING_PARAM"},
			{"?before_ts=abc", "M_INVALID_PARAM"},
			{"?before_ts=-5", "M_INVALID_PARAM"},
			{"?before_ts=1234", "M_INVALID_PARAM"},
			{fmt.Sprintf("?before_ts=%d&size_gt=-1", before), "M_INVALID_PARAM"},
			{fmt.Sprintf("?before_ts=%d&keep_profiles=yes", before), "M_INVALID_PARAM"},
		}
		for _, b := range bad {
			e.do(siteA, "POST", "media/delete"+b.query, tokAdmin).expect(t, 400, b.errcode)
		}
		r := e.do(siteA, "POST", fmt.Sprintf("media/%s/delete?before_ts=%d", siteB, before), tokAdmin)
		r.expect(t, 400, "M_UNKNOWN")

		// size_gt=50 keeps old-small; keep_profiles (default) keeps the avatar.
		r = e.do(siteA, "POST", fmt.Sprintf("media/delete?before_ts=%d&size_gt=50", before), tokAdmin)
		r.expect(t, 200, "")
		got := strs(r.body["deleted_media"])
		slices.Sort(got)
		if want := []string{"bob-old", "old-big"}; !slices.Equal(got, want) || r.body["total"] != float64(2) {
			t.Fatalf("deleted %v (total %v), want %v", got, r.body["total"], want)
		}
		for _, id := range []string{"old-small", "avatar", "protected", "quarantined", "new", "old-accessed"} {
			if e.gone(siteA, id) {
				t.Errorf("%s deleted", id)
			}
		}
		if e.gone(siteB, "other-site") || e.gone(remote, "remote-old") {
			t.Errorf("other site's or remote media deleted")
		}

		// The legacy path, keep_profiles=false: the avatar goes too.
		r = e.do(siteA, "POST", fmt.Sprintf("media/%s/delete?before_ts=%d&keep_profiles=false", siteA, before), tokAdmin)
		r.expect(t, 200, "")
		got = strs(r.body["deleted_media"])
		slices.Sort(got)
		if want := []string{"avatar", "old-small"}; !slices.Equal(got, want) {
			t.Fatalf("deleted %v, want %v", got, want)
		}

		// A profile that cannot be read stops the deletion (nothing of
		// that page is deleted) with a clear 502.
		e.put(media{server: siteA, id: "carol-old", user: userCarol, content: "carol", created: old})
		e.hs.set(func(hs *testHomeserver) { hs.profileFail[userCarol] = true })
		r = e.do(siteA, "POST", fmt.Sprintf("media/delete?before_ts=%d", before), tokAdmin)
		r.expect(t, 502, "M_UNKNOWN")
		if !strings.Contains(r.body["error"].(string), "keep_profiles=false") || e.gone(siteA, "carol-old") {
			t.Errorf("error %q; carol-old gone %v", r.body["error"], e.gone(siteA, "carol-old"))
		}
	})
}

// purgeRecorder is a RemotePurger that records its calls.
type purgeRecorder struct {
	before time.Time
	by     string
}

func (p *purgeRecorder) PurgeRemote(_ context.Context, before time.Time, by string) (int64, error) {
	p.before, p.by = before, by
	return 7, nil
}

func TestPurgeRemote(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		old := time.Now().Add(-48 * time.Hour)
		for i := range 5 {
			e.put(media{server: remote, id: fmt.Sprintf("old%d", i), content: fmt.Sprintf("old remote %d", i), remote: true, created: old})
		}
		e.put(media{server: remote, id: "new", content: "new remote", remote: true})
		e.put(media{server: remote, id: "bad", content: "quarantined remote", remote: true, created: old})
		e.put(media{server: siteA, id: "local-old", user: userAlice, content: "local", created: old})
		e.do(siteA, "POST", "media/quarantine/"+remote+"/bad", tokAdmin).expect(t, 200, "")
		before := time.Now().Add(-time.Hour).UnixMilli()

		e.do(siteA, "POST", "purge_media_cache", tokAdmin).expect(t, 400, "M_MISSING_PARAM")
		e.do(siteA, "POST", "purge_media_cache?before_ts=-1", tokAdmin).expect(t, 400, "M_INVALID_PARAM")
		e.do(siteA, "POST", "purge_media_cache?before_ts=1700000000", tokAdmin).expect(t, 400, "M_INVALID_PARAM")

		r := e.do(siteA, "POST", fmt.Sprintf("purge_media_cache?before_ts=%d", before), tokAdmin)
		r.expect(t, 200, "")
		if r.raw != `{"deleted":5}` {
			t.Fatalf("body %s, want {\"deleted\":5}", r.raw)
		}
		for i := range 5 {
			if !e.gone(remote, fmt.Sprintf("old%d", i)) {
				t.Errorf("old%d kept", i)
			}
		}
		if e.gone(remote, "new") || e.gone(remote, "bad") || e.gone(siteA, "local-old") {
			t.Errorf("new, quarantined or local media purged")
		}
		if !e.inv.forgotRef(storage.MediaRef{ServerName: remote, MediaID: "old3"}) {
			t.Errorf("Forget not called for purged media")
		}
		// Purged remote media is not tombstoned: it may be fetched again.
		e.put(media{server: remote, id: "old0", content: "fetched again", remote: true})
	})
	t.Run("purger", func(t *testing.T) {
		p := &purgeRecorder{}
		e := newEnv(t, "sqlite", envOptions{purger: p})
		r := e.do(siteA, "POST", "purge_media_cache?before_ts=1700000000000", tokHSAdmin)
		r.expect(t, 200, "")
		if r.raw != `{"deleted":7}` || !p.before.Equal(time.UnixMilli(1700000000000)) || p.by != userHSAdmin {
			t.Errorf("body %s; purger got %v by %q", r.raw, p.before, p.by)
		}
	})
}

func TestMethodsAndPaths(t *testing.T) {
	e := newEnv(t, "sqlite")
	r := e.do(siteA, "PUT", "media/"+siteA+"/x", tokAdmin)
	r.expect(t, 405, "M_UNRECOGNIZED")
	e.do(siteA, "GET", "purge_media_cache", tokAdmin).expect(t, 405, "M_UNRECOGNIZED")
	e.do(siteA, "GET", "room/x/media", tokAdmin).expect(t, 404, "M_UNRECOGNIZED")
	r = e.do(siteA, "OPTIONS", "media/delete", "")
	if r.status != 204 || r.header.Get("Access-Control-Allow-Methods") == "" {
		t.Errorf("OPTIONS: %d %v", r.status, r.header)
	}
}

func TestServiceNeedsMediaAdmin(t *testing.T) {
	if _, err := New(Options{Meta: plainStore{}, Stores: &storage.Datastores{}}); err == nil || !strings.Contains(err.Error(), "MediaAdmin") {
		t.Errorf("New with a store lacking MediaAdmin: %v", err)
	}
}

// nopAuth lets everyone in as an admin.
type nopAuth struct{}

func (nopAuth) Authenticate(context.Context, auth.Credentials) (auth.User, error) {
	return auth.User{UserID: userAdmin}, nil
}

func (nopAuth) IsAdmin(context.Context, auth.User, string) (bool, error) { return true, nil }

// plainStore is a MetadataStore without optional capabilities.
type plainStore struct{ storage.MetadataStore }

func TestStatusMapping(t *testing.T) {
	// The one error mapping, for errors no endpoint test reaches easily.
	cases := []struct {
		err    error
		status int
		code   string
	}{
		{fmt.Errorf("x: %w", storage.ErrUnavailable), http.StatusServiceUnavailable, "M_UNKNOWN"},
		{fmt.Errorf("x: %w", storage.ErrNotFound), http.StatusNotFound, "M_NOT_FOUND"},
		{errors.New("boom"), http.StatusInternalServerError, "M_UNKNOWN"},
	}
	e := newEnv(t, "sqlite")
	api, err := NewSiteAPI(SiteConfig{ServerName: siteA, Auth: nopAuth{}, Admins: nopAuth{}, Service: e.svc})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		w := httptest.NewRecorder()
		req := httptest.NewRequest("GET", "/", nil)
		got := api.writeError(w, req, epUnknown, c.err)
		if got != c.status || w.Code != c.status || !strings.Contains(w.Body.String(), c.code) {
			t.Errorf("%v: status %d/%d body %s", c.err, got, w.Code, w.Body.String())
		}
	}
}

// counterValue reads a counter.
func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
