package metatest

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// retainer returns s as a storage.Retainer; every store of this module must
// implement it.
func retainer(t *testing.T, s storage.MetadataStore) storage.Retainer {
	t.Helper()
	r, ok := s.(storage.Retainer)
	if !ok {
		t.Fatalf("%T does not implement storage.Retainer", s)
	}
	return r
}

// testRemoteCache checks RemoteCacheSize and the order of ListRemoteLRU.
func testRemoteCache(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	r, a := retainer(t, s), admin(t, s)
	b := blobRecord("remote")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	type item struct {
		server, id string
		created    time.Time
		access     time.Time
		size       int64
		protected  bool
	}
	items := []item{
		{"b.example", "r1", t0, time.Time{}, 10, false},                           // last use t0
		{"a.example", "r2", t0.Add(-time.Hour), t0.Add(2 * time.Hour), 20, false}, // t0+2h
		{"a.example", "r3", t0.Add(time.Hour), time.Time{}, 40, false},            // t0+1h
		{"a.example", "r4", t0.Add(-2 * time.Hour), time.Time{}, 80, true},        // protected
		{"b.example", "r5", t0.Add(3 * time.Hour), time.Time{}, 160, false},       // tie at t0+3h
		{"a.example", "r6", t0.Add(3 * time.Hour), time.Time{}, 320, false},       // tie at t0+3h
		{"a.example", "r0", t0, time.Time{}, 640, false},                          // tie with r1 at t0
	}
	var total int64
	for _, it := range items {
		m := remoteMedia(it.server, it.id, b)
		m.CreatedAt, m.Size, m.Protected = it.created, it.size, it.protected
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
		if !it.access.IsZero() {
			mustNil(t, "RecordAccess", a.RecordAccess(ctx, []storage.Access{{MediaRef: ref(m), At: it.access}}))
		}
		total += it.size
	}
	// Local and pending media are not cached remote media.
	local := readyMedia("a.example", "local", b)
	local.CreatedAt = t0.Add(-10 * time.Hour)
	mustNil(t, "InsertMedia(local)", s.InsertMedia(ctx, local))
	mustNil(t, "CreatePending", s.CreatePending(ctx, pendingMedia("a.example", "pend", "@alice:a.example", t0.Add(time.Hour)), 0))

	count, bytes, err := r.RemoteCacheSize(ctx)
	mustNil(t, "RemoteCacheSize", err)
	if count != int64(len(items)) || bytes != total {
		t.Fatalf("RemoteCacheSize = %d items, %d bytes; want %d, %d", count, bytes, len(items), total)
	}

	want := []storage.RemoteCacheEntry{
		{MediaRef: storage.MediaRef{ServerName: "a.example", MediaID: "r0"}, Size: 640, LastAccess: t0},
		{MediaRef: storage.MediaRef{ServerName: "b.example", MediaID: "r1"}, Size: 10, LastAccess: t0},
		{MediaRef: storage.MediaRef{ServerName: "a.example", MediaID: "r3"}, Size: 40, LastAccess: t0.Add(time.Hour)},
		{MediaRef: storage.MediaRef{ServerName: "a.example", MediaID: "r2"}, Size: 20, LastAccess: t0.Add(2 * time.Hour)},
		{MediaRef: storage.MediaRef{ServerName: "a.example", MediaID: "r6"}, Size: 320, LastAccess: t0.Add(3 * time.Hour)},
		{MediaRef: storage.MediaRef{ServerName: "b.example", MediaID: "r5"}, Size: 160, LastAccess: t0.Add(3 * time.Hour)},
	}
	for _, limit := range []int{0, 1, 3, 6, 100} {
		got, err := r.ListRemoteLRU(ctx, limit)
		mustNil(t, "ListRemoteLRU", err)
		w := want[:min(limit, len(want))]
		if len(got) != len(w) {
			t.Fatalf("ListRemoteLRU(%d) = %v, want %v", limit, got, w)
		}
		for i := range w {
			if got[i].MediaRef != w[i].MediaRef || got[i].Size != w[i].Size || !got[i].LastAccess.Equal(w[i].LastAccess) {
				t.Fatalf("ListRemoteLRU(%d)[%d] = %+v, want %+v", limit, i, got[i], w[i])
			}
		}
	}
}

// testThumbnailExpiry checks DeleteThumbnailsNotAccessedSince: the item's
// last access decides, or the thumbnail's creation when the item was never
// accessed.
func testThumbnailExpiry(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	r, a := retainer(t, s), admin(t, s)
	content := blobRecord("content")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, content)))
	tb := make([]storage.BlobRecord, 4)
	for i := range tb {
		tb[i] = blobRecord(fmt.Sprintf("thumb%d", i))
		mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, tb[i])))
	}
	recent := readyMedia("example.org", "recent", content)   // accessed t0+10h
	never := remoteMedia("remote.example", "never", content) // never accessed
	old := readyMedia("example.org", "old", content)         // accessed t0+1h
	for _, m := range []storage.Media{recent, never, old} {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	}
	mustNil(t, "RecordAccess", a.RecordAccess(ctx, []storage.Access{{MediaRef: ref(recent), At: t0.Add(10 * time.Hour)}}))
	mustNil(t, "RecordThumbnailAccess", a.RecordThumbnailAccess(ctx, []storage.Access{{MediaRef: ref(old), At: t0.Add(time.Hour)}}))
	thumbs := []struct {
		th   storage.Thumbnail
		gone bool
	}{
		{thumb(recent, 32, tb[0], t0), false},
		{thumb(never, 32, tb[1], t0.Add(time.Hour)), true},
		{thumb(never, 64, tb[2], t0.Add(20*time.Hour)), false},
		{thumb(old, 32, tb[3], t0.Add(5*time.Hour)), true},
		{thumb(old, 64, tb[3], t0.Add(5*time.Hour)), true},
	}
	for _, th := range thumbs {
		mustNil(t, "InsertThumbnail", s.InsertThumbnail(ctx, th.th))
	}
	cutoff := t0.Add(8 * time.Hour)
	none, blobs, err := r.DeleteThumbnailsNotAccessedSince(ctx, cutoff, 0)
	if err != nil || none != 0 || len(blobs) != 0 {
		t.Fatalf("DeleteThumbnailsNotAccessedSince(limit 0) = %d, %v, %v", none, blobs, err)
	}
	total := 0
	seen := map[string]int{}
	for round := 0; ; round++ {
		n, blobs, err := r.DeleteThumbnailsNotAccessedSince(ctx, cutoff, 2)
		mustNil(t, "DeleteThumbnailsNotAccessedSince", err)
		if n > 2 || (n == 0) != (len(blobs) == 0) || len(blobs) > n {
			t.Fatalf("round %d: deleted %d, blobs %v", round, n, blobs)
		}
		for _, b := range blobs {
			seen[b]++
		}
		if len(slices.Compact(slices.Sorted(slices.Values(blobs)))) != len(blobs) {
			t.Fatalf("round %d: blobs not distinct: %v", round, blobs)
		}
		total += n
		if n == 0 {
			break
		}
		if round > 3 {
			t.Fatal("DeleteThumbnailsNotAccessedSince does not finish")
		}
	}
	if total != 3 {
		t.Fatalf("deleted %d thumbnails in all, want 3", total)
	}
	if seen[tb[1].SHA256] != 1 || seen[tb[3].SHA256] < 1 || seen[tb[0].SHA256] != 0 || seen[tb[2].SHA256] != 0 {
		t.Fatalf("blobs returned: %v; want thumb1 and thumb3 only", seen)
	}
	for _, th := range thumbs {
		_, err := s.GetThumbnail(ctx, th.th.ThumbnailKey)
		if th.gone {
			mustIs(t, "GetThumbnail(expired)", err, storage.ErrNotFound)
		} else {
			mustNil(t, "GetThumbnail(kept)", err)
		}
	}
	// The media items stay.
	for _, m := range []storage.Media{recent, never, old} {
		mustGet(t, s, ref(m))
	}
}
