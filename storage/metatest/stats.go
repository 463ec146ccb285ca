package metatest

import (
	"context"
	"reflect"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// testMediaStats checks the headline numbers on a seeded store: media per
// local server name (in byte order of the names) and remote media together,
// pending and quarantined rows (a protected row is not refused), and the
// deduplicated content: two rows sharing one blob count twice as media
// bytes and once as content; orphan and thumbnail blobs are not content.
func testMediaStats(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	ss, ok := s.(storage.StatsStore)
	if !ok {
		t.Fatalf("%T does not implement storage.StatsStore", s)
	}
	got, err := ss.MediaStats(ctx)
	mustNil(t, "MediaStats (empty)", err)
	if !reflect.DeepEqual(got, storage.MediaStats{}) {
		t.Fatalf("MediaStats of an empty store = %+v, want zeros", got)
	}

	blob := func(seed string, size int64) storage.BlobRecord {
		b := blobRecord(seed)
		b.Size = size
		mustNil(t, "RecordBlob("+seed+")", errOf(s.RecordBlob(ctx, b)))
		return b
	}
	shared, other, thumbBlob := blob("stats-shared", 100), blob("stats-other", 30), blob("stats-thumb", 7)
	blob("stats-orphan", 5000)
	insert := func(m storage.Media) storage.Media {
		t.Helper()
		mustNil(t, "InsertMedia("+m.ServerName+"/"+m.MediaID+")", s.InsertMedia(ctx, m))
		return m
	}
	first := insert(readyMedia("a.example", "one", shared))
	second := readyMedia("a.example", "two", shared) // the same content: deduplicated
	second.UserID = "@bob:a.example"
	insert(second)
	insert(readyMedia("a.example", "three", other))
	mustNil(t, "CreatePending", s.CreatePending(ctx, pendingMedia("a.example", "pend", "@alice:a.example", t0.Add(1e12)), 0))
	protected := readyMedia("Z.example", "kept", other)
	protected.Protected = true
	insert(protected)
	insert(remoteMedia("remote.example", "r1", shared))
	insert(remoteMedia("elsewhere.example", "r2", other))
	mustNil(t, "InsertThumbnail", s.InsertThumbnail(ctx, thumb(first, 32, thumbBlob, t0)))
	if _, err := admin(t, s).QuarantineContent(ctx, storage.Quarantine{SHA256: other.SHA256, By: "@admin:a.example", At: t0}); err != nil {
		t.Fatal(err)
	}

	got, err = ss.MediaStats(ctx)
	mustNil(t, "MediaStats", err)
	want := storage.MediaStats{
		Local: []storage.SiteMediaCounts{
			{ServerName: "Z.example", MediaCounts: storage.MediaCounts{Ready: 1, Bytes: 30}},
			{ServerName: "a.example", MediaCounts: storage.MediaCounts{Ready: 3, Bytes: 230, Pending: 1, Quarantined: 1}},
		},
		Remote:       storage.MediaCounts{Ready: 2, Bytes: 130, Quarantined: 1},
		ContentBlobs: 2, ContentBytes: 130,
		Thumbnails: 1, ThumbnailBytes: 7,
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("MediaStats =\n %+v\nwant\n %+v", got, want)
	}
	if n := got.ReferencedBytes(); n != 390 {
		t.Fatalf("ReferencedBytes = %d, want 390", n)
	}
}
