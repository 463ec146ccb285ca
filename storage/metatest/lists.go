package metatest

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// testListUserMedia checks every sort key of ListUserMedia in both
// directions (ties broken by media ID ascending; never-accessed and
// unquarantined items sort lowest; text by bytes), paging and the total.
func testListUserMedia(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a := admin(t, s)
	const server, user = "one.example", "@alice:one.example"
	type item struct {
		id, filename, contentType string
		created, access           time.Time
		size                      int64
		quarantinedBy             string
		protected                 bool
	}
	items := []item{
		{"u1", "b.png", "image/png", t0.Add(time.Second), time.Time{}, 10, "", false},
		{"u2", "a.png", "image/jpeg", t0.Add(2 * time.Second), t0.Add(5 * time.Hour), 30, "@z:one.example", false},
		{"u3", "b.png", "image/png", t0.Add(time.Second), t0.Add(time.Hour), 10, "@a:one.example", true},
		{"u4", "", "text/plain", t0.Add(3 * time.Second), time.Time{}, 20, "", true},
		{"u5", "C.png", "image/png", t0, t0.Add(time.Hour), 30, "", false},
		{"u0", "b.png", "Image/PNG", t0.Add(3 * time.Second), t0.Add(5 * time.Hour), 20, "@a:one.example", true},
	}
	for _, it := range items {
		b := blobRecord("user-" + it.id)
		mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
		m := readyMedia(server, it.id, b)
		m.UserID, m.Filename, m.ContentType, m.CreatedAt, m.Size, m.Protected = user, it.filename, it.contentType, it.created, it.size, it.protected
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
		if !it.access.IsZero() {
			mustNil(t, "RecordAccess", a.RecordAccess(ctx, []storage.Access{{MediaRef: ref(m), At: it.access}}))
		}
		if it.quarantinedBy != "" {
			_, err := a.QuarantineContent(ctx, storage.Quarantine{SHA256: b.SHA256, By: it.quarantinedBy, At: t0})
			mustNil(t, "QuarantineContent", err)
		}
	}
	// Not the user's ready media on this server.
	other := blobRecord("other")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, other)))
	bob := readyMedia(server, "bob1", other)
	bob.UserID = "@bob:one.example"
	elsewhere := readyMedia("two.example", "u9", other)
	elsewhere.UserID = user
	for _, m := range []storage.Media{bob, elsewhere, remoteMedia(server, "rem", other)} {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	}
	mustNil(t, "CreatePending", s.CreatePending(ctx, pendingMedia(server, "pend", user, t0.Add(time.Hour)), 0))

	type key struct {
		s string
		n int64
	}
	keyOf := map[storage.MediaOrder]func(item) key{
		storage.OrderMediaID:       func(it item) key { return key{s: it.id} },
		storage.OrderFilename:      func(it item) key { return key{s: it.filename} },
		storage.OrderCreated:       func(it item) key { return key{n: it.created.UnixMilli()} },
		storage.OrderLastAccess:    func(it item) key { return key{n: millisOrZero(it.access)} },
		storage.OrderSize:          func(it item) key { return key{n: it.size} },
		storage.OrderContentType:   func(it item) key { return key{s: it.contentType} },
		storage.OrderQuarantinedBy: func(it item) key { return key{s: it.quarantinedBy} },
		storage.OrderProtected:     func(it item) key { return key{n: boolInt(it.protected)} },
	}
	for order, kf := range keyOf {
		for _, desc := range []bool{false, true} {
			want := slices.Clone(items)
			slices.SortFunc(want, func(x, y item) int {
				kx, ky := kf(x), kf(y)
				c := cmp.Or(strings.Compare(kx.s, ky.s), cmp.Compare(kx.n, ky.n))
				if desc {
					c = -c
				}
				return cmp.Or(c, strings.Compare(x.id, y.id))
			})
			var wantIDs []string
			for _, it := range want {
				wantIDs = append(wantIDs, server+"/"+it.id)
			}
			name := fmt.Sprintf("order %s desc %v", order, desc)
			q := storage.UserMediaQuery{ServerName: server, UserID: user, OrderBy: order, Descending: desc, Limit: 100}
			page, total, err := a.ListUserMedia(ctx, q)
			mustNil(t, "ListUserMedia "+name, err)
			if total != int64(len(items)) || !slices.Equal(ids(page), wantIDs) {
				t.Fatalf("ListUserMedia %s = %v (total %d), want %v (total %d)", name, ids(page), total, wantIDs, len(items))
			}
			var paged []storage.Media
			for off := 0; off < len(items)+2; off += 4 {
				q.Offset, q.Limit = off, 4
				page, total, err := a.ListUserMedia(ctx, q)
				mustNil(t, "ListUserMedia page", err)
				if total != int64(len(items)) {
					t.Fatalf("ListUserMedia %s offset %d: total %d", name, off, total)
				}
				paged = append(paged, page...)
			}
			if !slices.Equal(ids(paged), wantIDs) {
				t.Fatalf("ListUserMedia %s in pages of 4 = %v, want %v", name, ids(paged), wantIDs)
			}
		}
	}

	// The default order is by creation; the rows carry every field.
	page, _, err := a.ListUserMedia(ctx, storage.UserMediaQuery{ServerName: server, UserID: user, Limit: 1})
	mustNil(t, "ListUserMedia default", err)
	if len(page) != 1 || page[0].MediaID != "u5" || page[0].Datastore == "" || !page[0].LastAccessAt.Equal(t0.Add(time.Hour)) {
		t.Fatalf("ListUserMedia default order, first = %+v; want u5 with its fields", page)
	}
	page, _, err = a.ListUserMedia(ctx, storage.UserMediaQuery{ServerName: server, UserID: user, OrderBy: storage.OrderMediaID, Limit: 1})
	mustNil(t, "ListUserMedia", err)
	if len(page) != 1 || page[0].QuarantinedBy != "@a:one.example" || !page[0].Protected {
		t.Fatalf("ListUserMedia first by ID = %+v; want u0, quarantined and protected", page)
	}
	page, total, err := a.ListUserMedia(ctx, storage.UserMediaQuery{ServerName: server, UserID: user, Limit: 0})
	if err != nil || len(page) != 0 || total != int64(len(items)) {
		t.Fatalf("ListUserMedia limit 0 = %v, %d, %v; want nothing and the total", ids(page), total, err)
	}
	page, total, err = a.ListUserMedia(ctx, storage.UserMediaQuery{ServerName: server, UserID: "@nobody:one.example", Limit: 10})
	if err != nil || len(page) != 0 || total != 0 {
		t.Fatalf("ListUserMedia of a user without media = %v, %d, %v", ids(page), total, err)
	}
	if _, _, err := a.ListUserMedia(ctx, storage.UserMediaQuery{ServerName: server, UserID: user, OrderBy: "nonsense", Limit: 1}); err == nil {
		t.Fatal("ListUserMedia with an unknown order succeeded")
	}
}

func millisOrZero(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func boolInt(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// testListUsage checks ListUsage: only ready local media of the server,
// the filters, every order with user ID tie-breaks, paging and the total.
func testListUsage(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a := admin(t, s)
	const server = "one.example"
	b := blobRecord("usage")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	n := 0
	add := func(server, user string, size int64, created time.Time) {
		t.Helper()
		n++
		m := readyMedia(server, fmt.Sprintf("m%02d", n), b)
		m.UserID, m.Size, m.CreatedAt = user, size, created
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	}
	alice, bob, carol, dave := "@alice:one.example", "@bob:one.example", "@carol:one.example", "@DAVE:one.example"
	add(server, alice, 10, t0)
	add(server, alice, 20, t0.Add(time.Hour))
	add(server, alice, 25, t0.Add(2*time.Hour))
	add(server, bob, 100, t0.Add(time.Hour))
	add(server, carol, 30, t0.Add(3*time.Hour))
	add(server, carol, 30, t0.Add(3*time.Hour))
	add(server, dave, 60, t0)
	add("two.example", alice, 1000, t0) // another server
	mustNil(t, "InsertMedia(remote)", s.InsertMedia(ctx, remoteMedia(server, "rem", b)))
	mustNil(t, "CreatePending", s.CreatePending(ctx, pendingMedia(server, "pend", alice, t0.Add(time.Hour)), 0))

	u := func(user string, count, bytes int64) storage.Usage {
		return storage.Usage{UserID: user, Count: count, Bytes: bytes}
	}
	all := []storage.Usage{u(dave, 1, 60), u(alice, 3, 55), u(bob, 1, 100), u(carol, 2, 60)} // byte order of IDs
	tests := []struct {
		name  string
		q     storage.UsageQuery
		want  []storage.Usage
		total int64
	}{
		{"default", storage.UsageQuery{}, all, 4},
		{"user desc", storage.UsageQuery{OrderBy: storage.UsageByUserID, Descending: true},
			[]storage.Usage{u(carol, 2, 60), u(bob, 1, 100), u(alice, 3, 55), u(dave, 1, 60)}, 4},
		{"bytes desc", storage.UsageQuery{OrderBy: storage.UsageByBytes, Descending: true},
			[]storage.Usage{u(bob, 1, 100), u(dave, 1, 60), u(carol, 2, 60), u(alice, 3, 55)}, 4},
		{"bytes asc", storage.UsageQuery{OrderBy: storage.UsageByBytes},
			[]storage.Usage{u(alice, 3, 55), u(dave, 1, 60), u(carol, 2, 60), u(bob, 1, 100)}, 4},
		{"count desc", storage.UsageQuery{OrderBy: storage.UsageByCount, Descending: true},
			[]storage.Usage{u(alice, 3, 55), u(carol, 2, 60), u(dave, 1, 60), u(bob, 1, 100)}, 4},
		{"count asc", storage.UsageQuery{OrderBy: storage.UsageByCount},
			[]storage.Usage{u(dave, 1, 60), u(bob, 1, 100), u(carol, 2, 60), u(alice, 3, 55)}, 4},
		{"contains, any case", storage.UsageQuery{UserIDContains: "dAvE"}, []storage.Usage{u(dave, 1, 60)}, 1},
		{"contains", storage.UsageQuery{UserIDContains: "AR"}, []storage.Usage{u(carol, 2, 60)}, 1},
		{"contains nothing", storage.UsageQuery{UserIDContains: "zz%"}, nil, 0},
		{"created from", storage.UsageQuery{CreatedFrom: t0.Add(time.Hour)},
			[]storage.Usage{u(alice, 2, 45), u(bob, 1, 100), u(carol, 2, 60)}, 3},
		{"created until", storage.UsageQuery{CreatedUntil: t0.Add(time.Hour)},
			[]storage.Usage{u(dave, 1, 60), u(alice, 2, 30), u(bob, 1, 100)}, 3},
		{"created range", storage.UsageQuery{CreatedFrom: t0.Add(time.Hour), CreatedUntil: t0.Add(2 * time.Hour)},
			[]storage.Usage{u(alice, 2, 45), u(bob, 1, 100)}, 2},
		{"page", storage.UsageQuery{Offset: 1, Limit: 2}, all[1:3], 4},
		{"last page", storage.UsageQuery{Offset: 3, Limit: 2}, all[3:], 4},
		{"past the end", storage.UsageQuery{Offset: 4, Limit: 2}, nil, 4},
		{"limit 0", storage.UsageQuery{Limit: -1}, nil, 4},
		{"other server", storage.UsageQuery{ServerName: "two.example"}, []storage.Usage{u(alice, 1, 1000)}, 1},
		{"unknown server", storage.UsageQuery{ServerName: "none.example"}, nil, 0},
	}
	for _, tt := range tests {
		q := tt.q
		if q.ServerName == "" {
			q.ServerName = server
		}
		if q.Limit == 0 {
			q.Limit = 100
		}
		page, total, err := a.ListUsage(ctx, q)
		mustNil(t, "ListUsage "+tt.name, err)
		if total != tt.total || !slices.Equal(page, tt.want) {
			t.Fatalf("ListUsage %s = %+v (total %d), want %+v (total %d)", tt.name, page, total, tt.want, tt.total)
		}
	}
	if _, _, err := a.ListUsage(ctx, storage.UsageQuery{ServerName: server, OrderBy: "nonsense", Limit: 1}); err == nil {
		t.Fatal("ListUsage with an unknown order succeeded")
	}
}

// testListOldMedia checks ListOldMedia's selection (last access, else
// creation; local or remote; size; quarantined and protected excluded
// unless asked; ready only) and paging with After.
func testListOldMedia(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a := admin(t, s)
	plain, quar := blobRecord("plain"), blobRecord("quarantined")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, plain)))
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, quar)))
	_, err := a.QuarantineContent(ctx, storage.Quarantine{SHA256: quar.SHA256, By: "@admin:one.example", At: t0})
	mustNil(t, "QuarantineContent", err)
	type item struct {
		server, id      string
		remote          bool
		created, access time.Time
		size            int64
		protected       bool
		blob            storage.BlobRecord
	}
	items := []item{
		{"one.example", "o1", false, t0, time.Time{}, 10, false, plain},                    // old, never accessed
		{"one.example", "o2", false, t0, t0.Add(10 * time.Hour), 10, false, plain},         // recently accessed
		{"one.example", "o3", false, t0.Add(6 * time.Hour), time.Time{}, 10, false, plain}, // recently created
		{"one.example", "o4", false, t0, time.Time{}, 10, true, plain},                     // protected
		{"one.example", "o5", false, t0, time.Time{}, 10, false, quar},                     // quarantined
		{"one.example", "o6", false, t0, t0.Add(time.Hour), 1000, false, plain},            // old access
		{"one.example", "o7", false, t0, time.Time{}, 0, false, plain},                     // empty
		{"one.example", "o8", false, t0, time.Time{}, 10, true, quar},                      // both
		{"two.example", "t1", false, t0, time.Time{}, 10, false, plain},
		{"remote.example", "r1", true, t0, time.Time{}, 10, false, plain},
		{"remote.example", "r2", true, t0.Add(6 * time.Hour), time.Time{}, 10, false, plain},
		{"remote.example", "r3", true, t0.Add(-time.Hour), t0.Add(9 * time.Hour), 10, false, plain},
		{"another.example", "r4", true, t0, t0.Add(4 * time.Hour), 10, false, plain},
	}
	for _, it := range items {
		m := readyMedia(it.server, it.id, it.blob)
		if it.remote {
			m = remoteMedia(it.server, it.id, it.blob)
		}
		m.CreatedAt, m.Size, m.Protected = it.created, it.size, it.protected
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
		if !it.access.IsZero() {
			mustNil(t, "RecordAccess", a.RecordAccess(ctx, []storage.Access{{MediaRef: ref(m), At: it.access}}))
		}
	}
	pend := pendingMedia("one.example", "p1", "@alice:one.example", t0.Add(time.Hour))
	pend.CreatedAt = t0.Add(-time.Hour)
	mustNil(t, "CreatePending", s.CreatePending(ctx, pend, 0))

	before := t0.Add(5 * time.Hour)
	tests := []struct {
		name string
		q    storage.OldMediaQuery
		want []string
	}{
		{"local", storage.OldMediaQuery{}, []string{"one.example/o1", "one.example/o6", "two.example/t1"}},
		{"one server", storage.OldMediaQuery{ServerName: "one.example"}, []string{"one.example/o1", "one.example/o6"}},
		{"with protected", storage.OldMediaQuery{ServerName: "one.example", IncludeProtected: true},
			[]string{"one.example/o1", "one.example/o4", "one.example/o6"}},
		{"with quarantined", storage.OldMediaQuery{ServerName: "one.example", IncludeQuarantined: true},
			[]string{"one.example/o1", "one.example/o5", "one.example/o6"}},
		{"with both", storage.OldMediaQuery{ServerName: "one.example", IncludeProtected: true, IncludeQuarantined: true},
			[]string{"one.example/o1", "one.example/o4", "one.example/o5", "one.example/o6", "one.example/o8"}},
		{"larger", storage.OldMediaQuery{ServerName: "one.example", SizeGreaterThan: 10}, []string{"one.example/o6"}},
		{"any size", storage.OldMediaQuery{ServerName: "one.example", SizeGreaterThan: -1},
			[]string{"one.example/o1", "one.example/o6", "one.example/o7"}},
		{"remote", storage.OldMediaQuery{Remote: true}, []string{"another.example/r4", "remote.example/r1"}},
		{"remote, one server", storage.OldMediaQuery{Remote: true, ServerName: "remote.example"}, []string{"remote.example/r1"}},
		{"remote, earlier", storage.OldMediaQuery{Remote: true, Before: t0.Add(time.Millisecond)}, []string{"remote.example/r1"}},
		{"strictly before", storage.OldMediaQuery{Remote: true, Before: t0}, nil},
		{"after", storage.OldMediaQuery{After: storage.MediaRef{ServerName: "one.example", MediaID: "o1"}},
			[]string{"one.example/o6", "two.example/t1"}},
		{"after, one server", storage.OldMediaQuery{ServerName: "one.example", After: storage.MediaRef{ServerName: "one.example", MediaID: "o5"}},
			[]string{"one.example/o6"}},
		{"after a server", storage.OldMediaQuery{After: storage.MediaRef{ServerName: "one.example"}},
			[]string{"one.example/o1", "one.example/o6", "two.example/t1"}},
		{"after everything", storage.OldMediaQuery{ServerName: "one.example", After: storage.MediaRef{ServerName: "zzz.example"}}, nil},
		{"limit", storage.OldMediaQuery{Limit: 2}, []string{"one.example/o1", "one.example/o6"}},
		{"limit 0", storage.OldMediaQuery{Limit: -1}, nil},
	}
	for _, tt := range tests {
		q := tt.q
		if q.Before.IsZero() {
			q.Before = before
		}
		if q.Limit == 0 {
			q.Limit = 100
		}
		got, err := a.ListOldMedia(ctx, q)
		mustNil(t, "ListOldMedia "+tt.name, err)
		if !slices.Equal(ids(got), tt.want) && (len(got) != 0 || len(tt.want) != 0) {
			t.Fatalf("ListOldMedia %s = %v, want %v", tt.name, ids(got), tt.want)
		}
	}

	// Paging one at a time visits the same items, with their fields.
	var paged []storage.Media
	q := storage.OldMediaQuery{Before: before, IncludeProtected: true, IncludeQuarantined: true, SizeGreaterThan: -1, Limit: 1}
	for range 20 {
		page, err := a.ListOldMedia(ctx, q)
		mustNil(t, "ListOldMedia page", err)
		if len(page) == 0 {
			break
		}
		paged = append(paged, page...)
		q.After = ref(page[0])
	}
	want := []string{"one.example/o1", "one.example/o4", "one.example/o5", "one.example/o6", "one.example/o7", "one.example/o8", "two.example/t1"}
	if !slices.Equal(ids(paged), want) {
		t.Fatalf("ListOldMedia in pages of one = %v, want %v", ids(paged), want)
	}
	if m := paged[2]; m.QuarantinedBy != "@admin:one.example" || !m.Refused() {
		t.Fatalf("quarantined item listed as %+v", m)
	}
	if m := paged[5]; !m.Protected || m.Refused() {
		t.Fatalf("protected quarantined item listed as %+v", m)
	}
	if m := paged[3]; !m.LastAccessAt.Equal(t0.Add(time.Hour)) {
		t.Fatalf("accessed item listed as %+v", m)
	}
	if _, err := a.ListOldMedia(ctx, storage.OldMediaQuery{Limit: 10}); err == nil {
		t.Fatal("ListOldMedia without Before succeeded")
	}
}
