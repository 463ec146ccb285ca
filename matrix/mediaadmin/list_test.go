package mediaadmin

import (
	"context"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// userMediaFixture gives alice five media whose fields order differently
// by each key (no ties, no missing values), and bob one.
func userMediaFixture(t *testing.T, e *env) time.Time {
	t.Helper()
	t0 := time.UnixMilli(1_700_000_000_000)
	type item struct {
		id, filename, ctype string
		created, access     int
		size                int
	}
	items := []item{
		{"m_a", "e.png", "image/png", 1, 50, 5},
		{"m_b", "d.png", "text/plain", 2, 40, 1},
		{"m_c", "c.png", "application/pdf", 3, 10, 3},
		{"m_d", "b.png", "image/gif", 4, 30, 4},
		{"m_e", "a.png", "video/mp4", 5, 20, 2},
	}
	var accesses []storage.Access
	for _, it := range items {
		e.put(media{server: siteA, id: it.id, user: userAlice, content: strings.Repeat(it.id[2:], it.size),
			created: t0.Add(time.Duration(it.created) * time.Second), filename: it.filename, contentType: it.ctype})
		accesses = append(accesses, storage.Access{MediaRef: storage.MediaRef{ServerName: siteA, MediaID: it.id}, At: t0.Add(time.Duration(it.access) * time.Second)})
	}
	if err := e.admin.RecordAccess(context.Background(), accesses); err != nil {
		t.Fatal(err)
	}
	e.put(media{server: siteA, id: "bob1", user: userBob, content: "bob"})
	// m_b is protected; m_c's content quarantined.
	e.do(siteA, "POST", "media/protect/m_b", tokAdmin).expect(t, 200, "")
	e.do(siteA, "POST", "media/quarantine/"+siteA+"/m_c", tokAdmin).expect(t, 200, "")
	return t0
}

func TestListUserMedia(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		t0 := userMediaFixture(t, e)
		base := "users/" + esc(userAlice) + "/media"

		// One item, every field.
		r := e.do(siteA, "GET", base+"?order_by=media_id&limit=3&from=2", tokAdmin)
		r.expect(t, 200, "")
		c := e.get(siteA, "m_c")
		wantC := map[string]any{
			"media_id": "m_c", "media_type": "application/pdf", "media_length": float64(3), "upload_name": "c.png",
			"created_ts": float64(t0.Add(3 * time.Second).UnixMilli()), "url_cache": nil,
			"last_access_ts": float64(t0.Add(10 * time.Second).UnixMilli()), "quarantined_by": userAdmin,
			"safe_from_quarantine": false, "user_id": userAlice, "authenticated": nil, "sha256": c.SHA256,
		}
		if got := r.body["media"].([]any)[0]; !reflect.DeepEqual(got, wantC) {
			t.Errorf("item\n got %v\nwant %v", got, wantC)
		}
		if r.body["total"] != float64(5) {
			t.Errorf("total %v, want 5", r.body["total"])
		}
		if _, has := r.body["next_token"]; has {
			t.Errorf("next_token on the last page: %s", r.raw)
		}
		r = e.do(siteA, "GET", base+"?order_by=media_id&limit=2", tokAdmin)
		if got := r.body["media"].([]any)[1].(map[string]any); got["media_id"] != "m_b" || got["safe_from_quarantine"] != true {
			t.Errorf("protected m_b listed as %v", got)
		}

		orders := []struct {
			query string
			want  []string
		}{
			{"", []string{"m_e", "m_d", "m_c", "m_b", "m_a"}}, // Synapse's default: newest first
			{"?dir=f", []string{"m_a", "m_b", "m_c", "m_d", "m_e"}},
			{"?dir=b", []string{"m_e", "m_d", "m_c", "m_b", "m_a"}},
			{"?order_by=created_ts", []string{"m_a", "m_b", "m_c", "m_d", "m_e"}},
			{"?order_by=media_id", []string{"m_a", "m_b", "m_c", "m_d", "m_e"}},
			{"?order_by=media_id&dir=b", []string{"m_e", "m_d", "m_c", "m_b", "m_a"}},
			{"?order_by=upload_name", []string{"m_e", "m_d", "m_c", "m_b", "m_a"}},
			{"?order_by=upload_name&dir=b", []string{"m_a", "m_b", "m_c", "m_d", "m_e"}},
			{"?order_by=last_access_ts", []string{"m_c", "m_e", "m_d", "m_b", "m_a"}},
			{"?order_by=last_access_ts&dir=b", []string{"m_a", "m_b", "m_d", "m_e", "m_c"}},
			{"?order_by=media_length", []string{"m_b", "m_e", "m_c", "m_d", "m_a"}},
			{"?order_by=media_length&dir=b", []string{"m_a", "m_d", "m_c", "m_e", "m_b"}},
			{"?order_by=media_type", []string{"m_c", "m_d", "m_a", "m_b", "m_e"}},
			{"?order_by=media_type&dir=b", []string{"m_e", "m_b", "m_a", "m_d", "m_c"}},
		}
		for _, o := range orders {
			t.Run("order"+o.query, func(t *testing.T) {
				r := e.do(siteA, "GET", base+o.query, tokAdmin)
				r.expect(t, 200, "")
				if got := ids(r.body["media"]); !slices.Equal(got, o.want) {
					t.Errorf("order %v, want %v", got, o.want)
				}
				// Pages of two give the same order, with next_token.
				var paged []string
				from := 0
				sep := "?"
				if o.query != "" {
					sep = o.query + "&"
				}
				for pages := 0; ; pages++ {
					if pages > 5 {
						t.Fatal("pagination does not end")
					}
					r := e.do(siteA, "GET", fmt.Sprintf("%s%slimit=2&from=%d", base, sep, from), tokAdmin)
					r.expect(t, 200, "")
					paged = append(paged, ids(r.body["media"])...)
					next, ok := r.body["next_token"]
					if !ok {
						break
					}
					if next != float64(from+2) {
						t.Fatalf("next_token %v after from=%d", next, from)
					}
					from = int(next.(float64))
				}
				if !slices.Equal(paged, o.want) {
					t.Errorf("paged order %v, want %v", paged, o.want)
				}
			})
		}
		// Keys with a single distinct value (one quarantined, one
		// protected item): the marked item is at one end, the others by
		// media ID.
		for _, key := range []string{"quarantined_by", "safe_from_quarantine"} {
			marked := map[string]string{"quarantined_by": "m_c", "safe_from_quarantine": "m_b"}[key]
			for _, dir := range []string{"f", "b"} {
				r := e.do(siteA, "GET", base+"?order_by="+key+"&dir="+dir, tokAdmin)
				r.expect(t, 200, "")
				got := ids(r.body["media"])
				rest := slices.DeleteFunc(slices.Clone(got), func(s string) bool { return s == marked })
				if len(got) != 5 || (got[0] != marked && got[4] != marked) || !slices.IsSorted(rest) {
					t.Errorf("order_by=%s&dir=%s: %v", key, dir, got)
				}
			}
		}

		bad := []struct {
			path    string
			status  int
			errcode string
		}{
			{base + "?from=-1", 400, "M_INVALID_PARAM"},
			{base + "?from=x", 400, "M_INVALID_PARAM"},
			{base + "?limit=-1", 400, "M_INVALID_PARAM"},
			{base + "?limit=1.5", 400, "M_INVALID_PARAM"},
			{base + "?order_by=size", 400, "M_INVALID_PARAM"},
			{base + "?dir=up", 400, "M_INVALID_PARAM"},
			{"users/" + esc("@alice:"+remote) + "/media", 400, "M_UNKNOWN"},
			{"users/alice/media", 400, "M_INVALID_PARAM"},
			{"users/" + esc("@alice") + "/media", 400, "M_INVALID_PARAM"},
			{"users/" + esc("@al ice:"+siteA) + "/media", 400, "M_INVALID_PARAM"},
			{"users/" + esc("@:"+siteA) + "/media", 400, "M_INVALID_PARAM"},
			{"users/" + esc("@alice:bad_server") + "/media", 400, "M_UNKNOWN"},
		}
		for _, b := range bad {
			e.do(siteA, "GET", b.path, tokAdmin).expect(t, b.status, b.errcode)
			e.do(siteA, "DELETE", b.path, tokAdmin).expect(t, b.status, b.errcode)
		}
		r = e.do(siteA, "GET", "users/"+esc("@alice:"+remote)+"/media", tokAdmin)
		if r.body["error"] != "Can only look up local users" {
			t.Errorf("error %q", r.body["error"])
		}
		// Huge values are no error.
		r = e.do(siteA, "GET", base+"?limit=9223372036854775807&from=9223372036854775807", tokAdmin)
		r.expect(t, 200, "")
		if r.raw != `{"media":[],"total":5}` {
			t.Errorf("huge from and limit: %s", r.raw)
		}
		r = e.do(siteA, "GET", base+"?limit=9223372036854775807&from=1", tokAdmin)
		if got := ids(r.body["media"]); len(got) != 4 || r.body["next_token"] != nil {
			t.Errorf("huge limit: %s", r.raw)
		}
		// A user without media: empty list.
		r = e.do(siteA, "GET", "users/"+esc(userCarol)+"/media", tokAdmin)
		r.expect(t, 200, "")
		if r.raw != `{"media":[],"total":0}` {
			t.Errorf("body %s", r.raw)
		}
	})
}

func TestDeleteUserMedia(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		userMediaFixture(t, e)
		base := "users/" + esc(userAlice) + "/media"

		// The two largest.
		r := e.do(siteA, "DELETE", base+"?order_by=media_length&dir=b&limit=2", tokAdmin)
		r.expect(t, 200, "")
		got := strs(r.body["deleted_media"])
		slices.Sort(got)
		if !slices.Equal(got, []string{"m_a", "m_d"}) || r.body["total"] != float64(2) {
			t.Fatalf("body %s", r.raw)
		}
		if _, has := r.body["next_token"]; has {
			t.Errorf("next_token in a deletion")
		}
		// Default: the newest 100, i.e. the rest.
		r = e.do(siteA, "DELETE", base, tokAdmin)
		r.expect(t, 200, "")
		got = strs(r.body["deleted_media"])
		slices.Sort(got)
		if !slices.Equal(got, []string{"m_b", "m_c", "m_e"}) {
			t.Fatalf("body %s", r.raw)
		}
		if e.gone(siteA, "bob1") {
			t.Errorf("bob's media deleted")
		}
		r = e.do(siteA, "GET", base, tokAdmin)
		if r.raw != `{"media":[],"total":0}` {
			t.Errorf("after deletion: %s", r.raw)
		}
		r = e.do(siteA, "DELETE", base, tokAdmin)
		if r.raw != `{"deleted_media":[],"total":0}` {
			t.Errorf("deleting nothing: %s", r.raw)
		}
	})
}

func TestUsageStatistics(t *testing.T) {
	eachBackend(t, func(t *testing.T, driver string) {
		e := newEnv(t, driver)
		t0 := time.UnixMilli(1_700_000_000_000)
		at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
		e.put(media{server: siteA, id: "a1", user: userAlice, content: "aaa", created: at(1)})
		e.put(media{server: siteA, id: "a2", user: userAlice, content: "aaaa", created: at(2)})
		e.put(media{server: siteA, id: "b1", user: userBob, content: strings.Repeat("b", 10), created: at(3)})
		e.put(media{server: siteA, id: "c1", user: userCarol, content: "c", created: at(4)})
		e.put(media{server: siteA, id: "c2", user: userCarol, content: "C", created: at(5)})
		e.put(media{server: siteA, id: "c3", user: userCarol, content: "x", created: at(6)})
		e.put(media{server: siteB, id: "z1", user: "@zed:" + siteB, content: "other site", created: at(7)})
		e.put(media{server: remote, id: "r1", content: "remote", remote: true, created: at(8)})
		e.hs.set(func(hs *testHomeserver) {
			hs.profiles[userAlice] = map[string]any{"displayname": "Alice"}
			hs.profiles[userCarol] = map[string]any{"displayname": "Carol", "avatar_url": "mxc://x/y"}
		})

		r := e.do(siteA, "GET", "statistics/users/media", tokAdmin)
		r.expect(t, 200, "")
		want := `{"users":[` +
			`{"user_id":"@alice:a.example","displayname":"Alice","media_count":2,"media_length":7},` +
			`{"user_id":"@bob:a.example","displayname":null,"media_count":1,"media_length":10},` +
			`{"user_id":"@carol:a.example","displayname":"Carol","media_count":3,"media_length":3}],"total":3}`
		if r.raw != want {
			t.Errorf("body\n got %s\nwant %s", r.raw, want)
		}

		users := func(r response) []string {
			var out []string
			for _, u := range r.body["users"].([]any) {
				out = append(out, u.(map[string]any)["user_id"].(string))
			}
			return out
		}
		cases := []struct {
			query string
			want  []string
			total float64
			next  any
		}{
			{"?order_by=media_count&dir=b", []string{userCarol, userAlice, userBob}, 3, nil},
			{"?order_by=media_count", []string{userBob, userAlice, userCarol}, 3, nil},
			{"?order_by=media_length", []string{userCarol, userAlice, userBob}, 3, nil},
			{"?order_by=media_length&dir=b", []string{userBob, userAlice, userCarol}, 3, nil},
			{"?order_by=user_id&dir=b", []string{userCarol, userBob, userAlice}, 3, nil},
			{"?order_by=displayname", []string{userAlice, userBob, userCarol}, 3, nil},
			{"?limit=2", []string{userAlice, userBob}, 3, float64(2)},
			{"?limit=2&from=2", []string{userCarol}, 3, nil},
			{"?search_term=ARO", []string{userCarol}, 1, nil},
			{"?search_term=" + siteA, []string{userAlice, userBob, userCarol}, 3, nil},
			{fmt.Sprintf("?from_ts=%d", at(3).UnixMilli()), []string{userBob, userCarol}, 2, nil},
			{fmt.Sprintf("?from_ts=%d&until_ts=%d", at(2).UnixMilli(), at(4).UnixMilli()), []string{userAlice, userBob, userCarol}, 3, nil},
			{fmt.Sprintf("?until_ts=%d", at(1).UnixMilli()), []string{userAlice}, 1, nil},
		}
		for _, c := range cases {
			r := e.do(siteA, "GET", "statistics/users/media"+c.query, tokAdmin)
			r.expect(t, 200, "")
			if got := users(r); !slices.Equal(got, c.want) || r.body["total"] != c.total || r.body["next_token"] != c.next {
				t.Errorf("%s: users %v total %v next %v; want %v %v %v", c.query, got, r.body["total"], r.body["next_token"], c.want, c.total, c.next)
			}
		}
		// The time window counts only media inside it.
		r = e.do(siteA, "GET", fmt.Sprintf("statistics/users/media?from_ts=%d&until_ts=%d", at(2).UnixMilli(), at(4).UnixMilli()), tokAdmin)
		if u := r.body["users"].([]any)[0].(map[string]any); u["media_count"] != float64(1) || u["media_length"] != float64(4) {
			t.Errorf("alice in window: %v", u)
		}

		for _, q := range []string{"?order_by=name", "?dir=x", "?from=-1", "?limit=z", "?search_term=",
			fmt.Sprintf("?from_ts=%d&until_ts=%d", at(3).UnixMilli(), at(3).UnixMilli()), "?until_ts=0"} {
			e.do(siteA, "GET", "statistics/users/media"+q, tokAdmin).expect(t, 400, "M_INVALID_PARAM")
		}
	})
}
