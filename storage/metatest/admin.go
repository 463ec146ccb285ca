package metatest

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// admin returns s as a storage.MediaAdmin; every store of this module must
// implement it.
func admin(t *testing.T, s storage.MetadataStore) storage.MediaAdmin {
	t.Helper()
	a, ok := s.(storage.MediaAdmin)
	if !ok {
		t.Fatalf("%T does not implement storage.MediaAdmin", s)
	}
	return a
}

// ref names m.
func ref(m storage.Media) storage.MediaRef {
	return storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID}
}

// ids returns "server/id" of each item, in order.
func ids(ms []storage.Media) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.ServerName + "/" + m.MediaID
	}
	return out
}

// remoteMedia is a cached remote item.
func remoteMedia(server, id string, b storage.BlobRecord) storage.Media {
	m := readyMedia(server, id, b)
	m.UserID = ""
	m.Remote = true
	return m
}

// thumb is a thumbnail of m of the given width, stored in blob b.
func thumb(m storage.Media, width int, b storage.BlobRecord, created time.Time) storage.Thumbnail {
	return storage.Thumbnail{
		ThumbnailKey: storage.ThumbnailKey{ServerName: m.ServerName, MediaID: m.MediaID, Width: width, Height: width, Method: "scale"},
		ContentType:  "image/jpeg", SHA256: b.SHA256, Size: b.Size, ActualWidth: width, ActualHeight: width, CreatedAt: created,
	}
}

// mustGet returns the item or fails.
func mustGet(t *testing.T, s storage.MetadataStore, r storage.MediaRef) storage.Media {
	t.Helper()
	m, err := s.GetMedia(context.Background(), r.ServerName, r.MediaID)
	mustNil(t, "GetMedia("+r.ServerName+"/"+r.MediaID+")", err)
	return m
}

// checkQuarantined checks the quarantine fields of m.
func checkQuarantined(t *testing.T, m storage.Media, by string, at time.Time) {
	t.Helper()
	if m.QuarantinedBy != by || !equalTime(m.QuarantinedAt, at) {
		t.Fatalf("%s/%s: quarantined by %q at %v, want %q at %v", m.ServerName, m.MediaID, m.QuarantinedBy, m.QuarantinedAt, by, at)
	}
}

// testQuarantine checks quarantine by content: every row with the hash
// (local, remote, any server name, including rows created later and
// content quarantined before it was recorded) shows it, and lifting it
// clears them all.
func testQuarantine(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a := admin(t, s)
	bad, good := blobRecord("bad"), blobRecord("good")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, bad)))
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, good)))
	l1 := readyMedia("one.example", "l1", bad)
	r1 := remoteMedia("remote.example", "r1", bad)
	l2 := readyMedia("two.example", "l2", bad)
	l3 := readyMedia("one.example", "l3", good)
	prot := readyMedia("two.example", "prot", bad)
	prot.Protected = true
	for _, m := range []storage.Media{l2, r1, l1, l3, prot} {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	}
	mustNil(t, "CreatePending", s.CreatePending(ctx, pendingMedia("one.example", "p", "@alice:one.example", t0.Add(time.Hour)), 0))

	_, err := a.GetQuarantine(ctx, bad.SHA256)
	mustIs(t, "GetQuarantine before", err, storage.ErrNotFound)
	if _, err := a.QuarantineContent(ctx, storage.Quarantine{SHA256: bad.SHA256}); err == nil {
		t.Fatal("QuarantineContent without By succeeded")
	}
	by, at := "@admin:one.example", t0.Add(time.Hour)
	ok, err := a.QuarantineContent(ctx, storage.Quarantine{SHA256: bad.SHA256, By: by, At: at})
	if err != nil || !ok {
		t.Fatalf("QuarantineContent = %v, %v; want true", ok, err)
	}
	ok, err = a.QuarantineContent(ctx, storage.Quarantine{SHA256: bad.SHA256, By: "@other:two.example", At: at.Add(time.Hour)})
	if err != nil || ok {
		t.Fatalf("QuarantineContent again = %v, %v; want false", ok, err)
	}
	q, err := a.GetQuarantine(ctx, bad.SHA256)
	mustNil(t, "GetQuarantine", err)
	if q.SHA256 != bad.SHA256 || q.By != by || !q.At.Equal(at) {
		t.Fatalf("GetQuarantine = %+v, want the first record (%s at %v)", q, by, at)
	}

	for _, m := range []storage.Media{l1, r1, l2, prot} {
		got := mustGet(t, s, ref(m))
		equalMedia(t, got, m)
		checkQuarantined(t, got, by, at)
		if got.Refused() == m.Protected {
			t.Fatalf("%s: Refused() = %v with Protected %v", m.MediaID, got.Refused(), m.Protected)
		}
	}
	if got := mustGet(t, s, ref(l3)); got.QuarantinedBy != "" || got.Refused() {
		t.Fatalf("other content quarantined: %+v", got)
	}
	if got := mustGet(t, s, storage.MediaRef{ServerName: "one.example", MediaID: "p"}); got.QuarantinedBy != "" {
		t.Fatalf("pending item quarantined: %+v", got)
	}

	// ListMediaByHash: every ready row with the hash, in key order, paged.
	want := []string{"one.example/l1", "remote.example/r1", "two.example/l2", "two.example/prot"}
	all, err := a.ListMediaByHash(ctx, bad.SHA256, storage.MediaRef{}, 10)
	mustNil(t, "ListMediaByHash", err)
	if !slices.Equal(ids(all), want) {
		t.Fatalf("ListMediaByHash = %v, want %v", ids(all), want)
	}
	for _, m := range all {
		checkQuarantined(t, m, by, at)
		if m.Datastore != bad.Datastore {
			t.Fatalf("ListMediaByHash row without datastore: %+v", m)
		}
	}
	var paged []storage.Media
	after := storage.MediaRef{}
	for {
		page, err := a.ListMediaByHash(ctx, bad.SHA256, after, 3)
		mustNil(t, "ListMediaByHash page", err)
		paged = append(paged, page...)
		if len(page) < 3 {
			break
		}
		after = ref(page[len(page)-1])
	}
	if !slices.Equal(ids(paged), want) {
		t.Fatalf("ListMediaByHash pages = %v, want %v", ids(paged), want)
	}
	if got, err := a.ListMediaByHash(ctx, bad.SHA256, storage.MediaRef{}, 0); err != nil || len(got) != 0 {
		t.Fatalf("ListMediaByHash limit 0 = %v, %v", got, err)
	}

	// Content quarantined before it is recorded: rows created later show it.
	later := blobRecord("later")
	ok, err = a.QuarantineContent(ctx, storage.Quarantine{SHA256: later.SHA256, By: by, At: at})
	if err != nil || !ok {
		t.Fatalf("QuarantineContent(unrecorded) = %v, %v", ok, err)
	}
	mustNil(t, "RecordBlob(later)", errOf(s.RecordBlob(ctx, later)))
	l4 := readyMedia("one.example", "l4", later)
	mustNil(t, "InsertMedia(l4)", s.InsertMedia(ctx, l4))
	checkQuarantined(t, mustGet(t, s, ref(l4)), by, at)

	// Lifting it clears every row.
	ok, err = a.UnquarantineContent(ctx, bad.SHA256)
	if err != nil || !ok {
		t.Fatalf("UnquarantineContent = %v, %v; want true", ok, err)
	}
	ok, err = a.UnquarantineContent(ctx, bad.SHA256)
	if err != nil || ok {
		t.Fatalf("UnquarantineContent again = %v, %v; want false", ok, err)
	}
	_, err = a.GetQuarantine(ctx, bad.SHA256)
	mustIs(t, "GetQuarantine after lifting", err, storage.ErrNotFound)
	for _, m := range []storage.Media{l1, r1, l2, prot} {
		checkQuarantined(t, mustGet(t, s, ref(m)), "", time.Time{})
	}
}

// testProtected checks that InsertMedia stores Protected and SetProtected
// changes it.
func testProtected(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a := admin(t, s)
	b := blobRecord("p")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	m := readyMedia("example.org", "prot", b)
	m.Protected = true
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	plain := readyMedia("example.org", "plain", b)
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, plain))
	pending := pendingMedia("example.org", "pend", "@alice:example.org", t0.Add(time.Hour))
	mustNil(t, "CreatePending", s.CreatePending(ctx, pending, 0))

	check := func(r storage.MediaRef, want bool) {
		t.Helper()
		if got := mustGet(t, s, r); got.Protected != want {
			t.Fatalf("%s: Protected = %v, want %v", r.MediaID, got.Protected, want)
		}
	}
	check(ref(m), true)
	check(ref(plain), false)
	check(ref(pending), false)
	mustNil(t, "SetProtected(false)", a.SetProtected(ctx, ref(m), false))
	check(ref(m), false)
	mustNil(t, "SetProtected(true)", a.SetProtected(ctx, ref(plain), true))
	mustNil(t, "SetProtected(true) again", a.SetProtected(ctx, ref(plain), true))
	check(ref(plain), true)
	mustNil(t, "SetProtected(pending)", a.SetProtected(ctx, ref(pending), true))
	check(ref(pending), true)
	mustIs(t, "SetProtected(missing)", a.SetProtected(ctx, storage.MediaRef{ServerName: "example.org", MediaID: "missing"}, true), storage.ErrNotFound)
	mustIs(t, "SetProtected(other server)", a.SetProtected(ctx, storage.MediaRef{ServerName: "other.example", MediaID: "prot"}, true), storage.ErrNotFound)
}

// testTombstones checks that IDs deleted with a tombstone are refused by
// InsertMedia and CreatePending, and IDs deleted without one are not.
func testTombstones(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a := admin(t, s)
	b := blobRecord("t")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	gone := readyMedia("example.org", "gone", b)
	pend := pendingMedia("example.org", "pend", "@alice:example.org", t0.Add(time.Hour))
	again := readyMedia("example.org", "again", b)
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, gone))
	mustNil(t, "CreatePending", s.CreatePending(ctx, pend, 0))
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, again))

	del, err := a.DeleteMedia(ctx, []storage.MediaRef{ref(gone), ref(pend), {ServerName: "example.org", MediaID: "never"}}, true, t0)
	mustNil(t, "DeleteMedia(tombstone)", err)
	if got := ids(del.Media); !slices.Equal(got, []string{"example.org/gone", "example.org/pend"}) {
		t.Fatalf("DeleteMedia deleted %v", got)
	}
	_, err = a.DeleteMedia(ctx, []storage.MediaRef{ref(again)}, false, t0)
	mustNil(t, "DeleteMedia(no tombstone)", err)

	for _, r := range []storage.MediaRef{ref(gone), ref(pend)} {
		mustIs(t, "InsertMedia(tombstoned "+r.MediaID+")", s.InsertMedia(ctx, readyMedia(r.ServerName, r.MediaID, b)), storage.ErrConflict)
		mustIs(t, "CreatePending(tombstoned "+r.MediaID+")",
			s.CreatePending(ctx, pendingMedia(r.ServerName, r.MediaID, "@alice:example.org", t0.Add(time.Hour)), 0), storage.ErrConflict)
		mustIs(t, "CreatePending(tombstoned "+r.MediaID+", limited)",
			s.CreatePending(ctx, pendingMedia(r.ServerName, r.MediaID, "@alice:example.org", t0.Add(time.Hour)), 5), storage.ErrConflict)
		_, err := s.GetMedia(ctx, r.ServerName, r.MediaID)
		mustIs(t, "GetMedia(tombstoned)", err, storage.ErrNotFound)
	}
	// A missing ID was not deleted, so it has no tombstone; the same ID on
	// another server is another item; an ID deleted without tombstone is
	// free again.
	mustNil(t, "InsertMedia(never deleted)", s.InsertMedia(ctx, readyMedia("example.org", "never", b)))
	mustNil(t, "InsertMedia(other server)", s.InsertMedia(ctx, readyMedia("other.example", "gone", b)))
	mustNil(t, "InsertMedia(deleted without tombstone)", s.InsertMedia(ctx, again))
	// Deleting a tombstoned ID again (nothing there) is fine, and so is a
	// second tombstone for an ID that was reissued elsewhere.
	_, err = a.DeleteMedia(ctx, []storage.MediaRef{ref(gone)}, true, t0)
	mustNil(t, "DeleteMedia(tombstoned again)", err)
}

// testDeleteMedia checks that DeleteMedia returns the rows and the hashes
// of their blobs and of their thumbnails' blobs, cascades to thumbnails,
// skips missing and duplicate refs, and leaves other items alone.
func testDeleteMedia(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a := admin(t, s)
	shared, other, ta, tb, tc := blobRecord("shared"), blobRecord("other"), blobRecord("ta"), blobRecord("tb"), blobRecord("tc")
	for _, b := range []storage.BlobRecord{shared, other, ta, tb, tc} {
		mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	}
	m1 := readyMedia("example.org", "m1", shared)
	m2 := readyMedia("example.org", "m2", shared)
	m3 := remoteMedia("remote.example", "m3", other)
	pend := pendingMedia("example.org", "pend", "@alice:example.org", t0.Add(time.Hour))
	for _, m := range []storage.Media{m1, m2, m3} {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	}
	mustNil(t, "CreatePending", s.CreatePending(ctx, pend, 0))
	thumbs := []storage.Thumbnail{thumb(m1, 32, ta, t0), thumb(m1, 64, tb, t0), thumb(m1, 96, ta, t0), thumb(m2, 32, ta, t0), thumb(m3, 32, tc, t0)}
	for _, th := range thumbs {
		mustNil(t, "InsertThumbnail", s.InsertThumbnail(ctx, th))
	}
	ok, err := a.QuarantineContent(ctx, storage.Quarantine{SHA256: other.SHA256, By: "@admin:example.org", At: t0})
	if err != nil || !ok {
		t.Fatalf("QuarantineContent = %v, %v", ok, err)
	}

	none, err := a.DeleteMedia(ctx, nil, true, t0)
	mustNil(t, "DeleteMedia(nothing)", err)
	if len(none.Media) != 0 || none.Thumbnails != 0 || len(none.Blobs) != 0 {
		t.Fatalf("DeleteMedia(nothing) = %+v", none)
	}

	refs := []storage.MediaRef{ref(m3), ref(pend), {ServerName: "example.org", MediaID: "missing"}, ref(m1), ref(m3)}
	del, err := a.DeleteMedia(ctx, refs, false, t0)
	mustNil(t, "DeleteMedia", err)
	if got, want := ids(del.Media), []string{"example.org/m1", "example.org/pend", "remote.example/m3"}; !slices.Equal(got, want) {
		t.Fatalf("DeleteMedia deleted %v, want %v", got, want)
	}
	equalMedia(t, del.Media[0], m1)
	equalMedia(t, del.Media[1], withState(pend, storage.StatePending))
	equalMedia(t, del.Media[2], m3)
	checkQuarantined(t, del.Media[2], "@admin:example.org", t0)
	if del.Thumbnails != 4 {
		t.Fatalf("DeleteMedia deleted %d thumbnails, want 4", del.Thumbnails)
	}
	wantBlobs := []string{shared.SHA256, other.SHA256, ta.SHA256, tb.SHA256, tc.SHA256}
	slices.Sort(wantBlobs)
	gotBlobs := slices.Clone(del.Blobs)
	slices.Sort(gotBlobs)
	if !slices.Equal(gotBlobs, wantBlobs) {
		t.Fatalf("DeleteMedia blobs = %v, want %v (distinct)", gotBlobs, wantBlobs)
	}

	for _, r := range []storage.MediaRef{ref(m1), ref(m3), ref(pend)} {
		_, err := s.GetMedia(ctx, r.ServerName, r.MediaID)
		mustIs(t, "GetMedia(deleted)", err, storage.ErrNotFound)
	}
	for _, th := range thumbs {
		_, err := s.GetThumbnail(ctx, th.ThumbnailKey)
		if th.MediaID == "m2" {
			mustNil(t, "GetThumbnail(kept)", err)
		} else {
			mustIs(t, "GetThumbnail(cascaded)", err, storage.ErrNotFound)
		}
	}
	equalMedia(t, mustGet(t, s, ref(m2)), m2)
	for sha, want := range map[string]int64{shared.SHA256: 1, ta.SHA256: 1, tb.SHA256: 0, tc.SHA256: 0, other.SHA256: 0} {
		n, err := s.CountBlobReferences(ctx, sha)
		mustNil(t, "CountBlobReferences", err)
		if n != want {
			t.Fatalf("CountBlobReferences(%s) = %d, want %d", sha[:8], n, want)
		}
	}
	// Blob records stay: removing them is the collector's job.
	for _, b := range []storage.BlobRecord{shared, other, ta, tb, tc} {
		_, err := s.GetBlob(ctx, b.SHA256)
		mustNil(t, "GetBlob after DeleteMedia", err)
	}

	// Many items at once (more than fit one statement of most stores).
	var many []storage.MediaRef
	for i := range 450 {
		m := readyMedia("bulk.example", "b"+string(rune('a'+i%26))+strconv.Itoa(i), other)
		mustNil(t, "InsertMedia(bulk)", s.InsertMedia(ctx, m))
		many = append(many, ref(m))
	}
	del, err = a.DeleteMedia(ctx, many, true, t0)
	mustNil(t, "DeleteMedia(bulk)", err)
	if len(del.Media) != len(many) || !slices.Equal(del.Blobs, []string{other.SHA256}) {
		t.Fatalf("DeleteMedia(bulk) deleted %d items, blobs %v; want %d and one blob", len(del.Media), del.Blobs, len(many))
	}
	n, err := s.CountBlobReferences(ctx, other.SHA256)
	mustNil(t, "CountBlobReferences", err)
	if n != 0 {
		t.Fatalf("CountBlobReferences after bulk delete = %d", n)
	}
}

// testRecordAccess checks that access times only move forward, per item,
// through both RecordAccess and RecordThumbnailAccess, and that unknown
// items are skipped.
func testRecordAccess(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a := admin(t, s)
	b := blobRecord("acc")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	m1, m2 := readyMedia("example.org", "m1", b), remoteMedia("remote.example", "m2", b)
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, m1))
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, m2))
	check := func(m storage.Media, want time.Time) {
		t.Helper()
		if got := mustGet(t, s, ref(m)); !equalTime(got.LastAccessAt, want) {
			t.Fatalf("%s: LastAccessAt = %v, want %v", m.MediaID, got.LastAccessAt, want)
		}
	}
	check(m1, time.Time{})
	mustNil(t, "RecordAccess(nothing)", a.RecordAccess(ctx, nil))
	acc := func(m storage.Media, at time.Time) storage.Access { return storage.Access{MediaRef: ref(m), At: at} }
	mustNil(t, "RecordAccess", a.RecordAccess(ctx, []storage.Access{
		acc(m1, t0.Add(2*time.Hour)), acc(m1, t0.Add(time.Hour)), acc(m2, t0.Add(time.Minute)),
		{MediaRef: storage.MediaRef{ServerName: "example.org", MediaID: "missing"}, At: t0},
	}))
	check(m1, t0.Add(2*time.Hour))
	check(m2, t0.Add(time.Minute))
	mustNil(t, "RecordAccess(earlier)", a.RecordAccess(ctx, []storage.Access{acc(m1, t0.Add(time.Hour))}))
	check(m1, t0.Add(2*time.Hour))
	mustNil(t, "RecordThumbnailAccess(earlier)", a.RecordThumbnailAccess(ctx, []storage.Access{acc(m1, t0)}))
	check(m1, t0.Add(2*time.Hour))
	mustNil(t, "RecordThumbnailAccess(later)", a.RecordThumbnailAccess(ctx, []storage.Access{acc(m2, t0.Add(3*time.Hour))}))
	check(m2, t0.Add(3*time.Hour))
	mustNil(t, "RecordAccess(later)", a.RecordAccess(ctx, []storage.Access{acc(m1, t0.Add(4*time.Hour+5*time.Millisecond))}))
	check(m1, t0.Add(4*time.Hour+5*time.Millisecond))
	check(m2, t0.Add(3*time.Hour))
}

// testConcurrentDeletion runs deletions of overlapping sets (given in
// different orders), access updates, quarantines and uploads of the same
// content at once: none may fail (a deadlock would), and every item ends
// deleted exactly once.
func testConcurrentDeletion(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a := admin(t, s)
	b, tb := blobRecord("conc"), blobRecord("conc-thumb")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, tb)))
	const n = 60
	refs := make([]storage.MediaRef, n)
	for i := range refs {
		m := readyMedia("example.org", "c"+strconv.Itoa(100+i), b)
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
		mustNil(t, "InsertThumbnail", s.InsertThumbnail(ctx, thumb(m, 32, tb, t0)))
		refs[i] = ref(m)
	}
	var (
		mu      sync.Mutex
		deleted = map[storage.MediaRef]int{}
		errs    []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			// Worker w deletes overlapping windows, in reverse order for odd
			// workers.
			for start := 0; start < n; start += 10 {
				set := slices.Clone(refs[start:min(start+20, n)])
				if w%2 == 1 {
					slices.Reverse(set)
				}
				del, err := a.DeleteMedia(ctx, set, w%2 == 0, t0)
				if err != nil {
					fail(err)
					return
				}
				mu.Lock()
				for _, m := range del.Media {
					deleted[ref(m)]++
				}
				mu.Unlock()
			}
		})
	}
	for w := range 2 {
		wg.Go(func() {
			for round := range 10 {
				var acc []storage.Access
				for i := range refs {
					acc = append(acc, storage.Access{MediaRef: refs[(i*7+w*13+round)%n], At: t0.Add(time.Duration(round) * time.Second)})
				}
				if err := a.RecordAccess(ctx, acc); err != nil {
					fail(err)
					return
				}
			}
		})
	}
	wg.Go(func() {
		for i := range 20 {
			m := readyMedia("example.org", "new"+strconv.Itoa(i), b)
			if err := s.InsertMedia(ctx, m); err != nil {
				fail(err)
				return
			}
			if _, err := a.QuarantineContent(ctx, storage.Quarantine{SHA256: hash("q" + strconv.Itoa(i)), By: "@admin:example.org", At: t0}); err != nil {
				fail(err)
				return
			}
		}
	})
	wg.Wait()
	for _, err := range errs {
		t.Errorf("concurrent operation failed: %v", err)
	}
	if t.Failed() {
		return
	}
	for _, r := range refs {
		if deleted[r] != 1 {
			t.Fatalf("%s deleted %d times, want once", r.MediaID, deleted[r])
		}
	}
	n2, err := s.CountBlobReferences(ctx, tb.SHA256)
	mustNil(t, "CountBlobReferences", err)
	if n2 != 0 {
		t.Fatalf("%d thumbnails survived their media", n2)
	}
}

// testRefuseQuarantined checks Media.RefuseQuarantined on every write of a
// media row with content: quarantined content (protected or not) is refused
// with ErrQuarantined and nothing is written, neither the row nor the
// user's usage; content that is not quarantined, or a write without the
// flag, goes through.
func testRefuseQuarantined(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a, q := admin(t, s), quotaStore(t, s)
	bad, good := blobRecord("refused"), blobRecord("accepted")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, bad)))
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, good)))
	_, err := a.QuarantineContent(ctx, storage.Quarantine{SHA256: bad.SHA256, By: "@admin:example.org", At: t0})
	mustNil(t, "QuarantineContent", err)
	const user = "@alice:example.org"
	limits := storage.UploadLimits{MaxBytes: 1 << 40, MaxFiles: 1 << 20, Now: t0.Add(time.Hour)}
	pending := 0
	writes := []struct {
		name  string
		write func(m storage.Media) error
	}{
		{"InsertMedia", func(m storage.Media) error { return s.InsertMedia(ctx, m) }},
		{"InsertMediaLimited", func(m storage.Media) error { return q.InsertMediaLimited(ctx, m, limits) }},
		{"InsertMedia remote", func(m storage.Media) error {
			m.Remote, m.UserID = true, ""
			return s.InsertMedia(ctx, m)
		}},
		{"CompletePending", func(m storage.Media) error {
			return completeFresh(ctx, t, s, &pending, m, func(m storage.Media) error { return s.CompletePending(ctx, m) })
		}},
		{"CompletePendingLimited", func(m storage.Media) error {
			return completeFresh(ctx, t, s, &pending, m, func(m storage.Media) error { return q.CompletePendingLimited(ctx, m, limits) })
		}},
	}
	var wantBytes, wantFiles int64
	for i, w := range writes {
		for _, tc := range []struct {
			blob      storage.BlobRecord
			flag      bool
			protected bool
			refused   bool
		}{
			{bad, true, false, true},
			{bad, true, true, true},
			{bad, false, false, false},
			{good, true, false, false},
		} {
			id := "rq" + strconv.Itoa(i) + strconv.FormatBool(tc.flag) + strconv.FormatBool(tc.protected) + tc.blob.SHA256[:6]
			m := readyMedia("example.org", id, tc.blob)
			m.UserID, m.RefuseQuarantined, m.Protected = user, tc.flag, tc.protected
			m.UploadedAt = t0.Add(time.Minute)
			err := w.write(m)
			what := w.name + "(" + id + ")"
			if tc.refused {
				mustIs(t, what, err, storage.ErrQuarantined)
				got, gerr := s.GetMedia(ctx, m.ServerName, m.MediaID)
				if gerr == nil && got.State == storage.StateReady {
					t.Fatalf("%s: refused, but the item is ready: %+v", what, got)
				}
			} else {
				mustNil(t, what, err)
				if got := mustGet(t, s, ref(m)); got.State != storage.StateReady || got.SHA256 != tc.blob.SHA256 {
					t.Fatalf("%s: stored %+v", what, got)
				}
				if !strings.Contains(w.name, "remote") {
					wantBytes += tc.blob.Size
					wantFiles++
				}
			}
			wantUsage(t, q, user, wantBytes, wantFiles)
		}
	}
}

// completeFresh reserves m's ID for m.UserID (CreatePending; *n counts the
// reservations) and completes it with m through complete.
func completeFresh(ctx context.Context, t *testing.T, s storage.MetadataStore, n *int, m storage.Media, complete func(storage.Media) error) error {
	t.Helper()
	*n++
	p := pendingMedia(m.ServerName, m.MediaID, m.UserID, t0.Add(24*time.Hour))
	mustNil(t, "CreatePending("+m.MediaID+")", s.CreatePending(ctx, p, 0))
	return complete(m)
}
