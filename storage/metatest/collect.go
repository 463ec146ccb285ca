package metatest

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// collector returns s as a storage.BlobCollector; every store of this module
// must implement it (the garbage collector needs it).
func collector(t *testing.T, s storage.MetadataStore) storage.BlobCollector {
	t.Helper()
	c, ok := s.(storage.BlobCollector)
	if !ok {
		t.Fatalf("%T does not implement storage.BlobCollector", s)
	}
	return c
}

// unreferenced lists the hashes ListUnreferencedBlobs gives for cutoff, all
// pages of two.
func unreferenced(t *testing.T, c storage.BlobCollector, cutoff time.Time) []string {
	t.Helper()
	var out []string
	after := ""
	for {
		page, err := c.ListUnreferencedBlobs(context.Background(), cutoff, after, 2)
		mustNil(t, "ListUnreferencedBlobs", err)
		for _, b := range page {
			out = append(out, b.SHA256)
		}
		if len(page) < 2 {
			return out
		}
		after = page[len(page)-1].SHA256
	}
}

// testBlobClaims checks that RecordBlob and TouchBlob set a blob's last claim
// (forward only) and that ListUnreferencedBlobs lists exactly the
// unreferenced blobs claimed before the cutoff, by hash.
func testBlobClaims(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	c := collector(t, s)
	if ok, err := c.TouchBlob(ctx, hash("missing"), t0); err != nil || ok {
		t.Fatalf("TouchBlob of a missing blob = %v, %v; want false, nil", ok, err)
	}
	free, media, thumb, claimed := blobRecord("free"), blobRecord("media"), blobRecord("thumb"), blobRecord("claimed")
	for _, b := range []storage.BlobRecord{free, media, thumb, claimed} {
		mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	}
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, readyMedia("example.org", "m", media)))
	mustNil(t, "InsertThumbnail", s.InsertThumbnail(ctx, storage.Thumbnail{
		ThumbnailKey: storage.ThumbnailKey{ServerName: "example.org", MediaID: "m", Width: 32, Height: 32, Method: "crop"},
		ContentType:  "image/png", SHA256: thumb.SHA256, Size: thumb.Size, ActualWidth: 32, ActualHeight: 32, CreatedAt: t0,
	}))
	if ok, err := c.TouchBlob(ctx, claimed.SHA256, t0.Add(time.Hour)); err != nil || !ok {
		t.Fatalf("TouchBlob = %v, %v; want true, nil", ok, err)
	}
	// A claim never moves backwards, neither by TouchBlob nor by RecordBlob.
	if ok, err := c.TouchBlob(ctx, claimed.SHA256, t0); err != nil || !ok {
		t.Fatalf("TouchBlob (earlier) = %v, %v; want true, nil", ok, err)
	}
	mustNil(t, "RecordBlob again", errOf(s.RecordBlob(ctx, claimed)))

	sorted := func(hs ...string) []string { slices.Sort(hs); return hs }
	for _, tc := range []struct {
		cutoff time.Time
		want   []string
	}{
		{t0, nil}, // strictly before the cutoff
		{t0.Add(time.Millisecond), []string{free.SHA256}},
		{t0.Add(time.Hour), []string{free.SHA256}},
		{t0.Add(time.Hour + time.Millisecond), sorted(free.SHA256, claimed.SHA256)},
	} {
		if got := unreferenced(t, c, tc.cutoff); !slices.Equal(got, tc.want) {
			t.Errorf("ListUnreferencedBlobs(cutoff %v) = %v, want %v", tc.cutoff.Sub(t0), got, tc.want)
		}
	}
	// RecordBlob of a known hash claims it anew (and keeps the record).
	again := free
	again.CreatedAt = t0.Add(2 * time.Hour)
	again.Datastore = "elsewhere"
	mustNil(t, "RecordBlob (claim)", errOf(s.RecordBlob(ctx, again)))
	if got := unreferenced(t, c, t0.Add(2*time.Hour)); !slices.Equal(got, []string{claimed.SHA256}) {
		t.Errorf("after re-recording: ListUnreferencedBlobs = %v, want only the claimed blob", got)
	}
	rec, err := s.GetBlob(ctx, free.SHA256)
	mustNil(t, "GetBlob", err)
	equalBlob(t, rec, free)
}

// testDeleteUnreferencedBlob checks the conditional deletion: only
// unreferenced blobs claimed before the cutoff go, the callback runs with the
// record, and a failing callback keeps the record.
func testDeleteUnreferencedBlob(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	c := collector(t, s)
	free, used, fresh := blobRecord("free"), blobRecord("used"), blobRecord("fresh")
	fresh.CreatedAt = t0.Add(time.Hour)
	for _, b := range []storage.BlobRecord{free, used, fresh} {
		mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	}
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, readyMedia("example.org", "m", used)))
	cutoff := t0.Add(time.Minute)
	for _, b := range []storage.BlobRecord{used, fresh, blobRecord("missing")} {
		ok, err := c.DeleteUnreferencedBlob(ctx, b.SHA256, cutoff, func(context.Context, storage.BlobRecord) error {
			t.Errorf("callback called for %s", b.SHA256)
			return nil
		})
		if err != nil || ok {
			t.Errorf("DeleteUnreferencedBlob(%s) = %v, %v; want false, nil", b.SHA256, ok, err)
		}
	}
	for _, b := range []storage.BlobRecord{used, fresh} {
		if _, err := s.GetBlob(ctx, b.SHA256); err != nil {
			t.Errorf("GetBlob of kept blob: %v", err)
		}
	}

	boom := errors.New("boom")
	ok, err := c.DeleteUnreferencedBlob(ctx, free.SHA256, cutoff, func(context.Context, storage.BlobRecord) error { return boom })
	if !errors.Is(err, boom) || ok {
		t.Fatalf("DeleteUnreferencedBlob with a failing callback = %v, %v; want false and the callback's error", ok, err)
	}
	if _, err := s.GetBlob(ctx, free.SHA256); err != nil {
		t.Fatalf("record gone although the callback failed: %v", err)
	}

	var got storage.BlobRecord
	ok, err = c.DeleteUnreferencedBlob(ctx, free.SHA256, cutoff, func(_ context.Context, b storage.BlobRecord) error {
		got = b
		return nil
	})
	if err != nil || !ok {
		t.Fatalf("DeleteUnreferencedBlob = %v, %v; want true, nil", ok, err)
	}
	equalBlob(t, got, free)
	mustIs(t, "GetBlob after deletion", func() error { _, err := s.GetBlob(ctx, free.SHA256); return err }(), storage.ErrNotFound)
}

// testCollectorExcludesWriters checks that writers naming a blob wait for a
// deletion in progress and then see it gone: a media insert fails, a claim
// reports the blob missing, and a RecordBlob made while unrecorded bytes are
// being deleted lands after the deletion (so its caller's check of the bytes
// is conclusive). The writers are started from inside the callback; whether
// they reach the database before or after the commit, the outcome is the
// same, which is what makes the protocol race-free.
func testCollectorExcludesWriters(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	c := collector(t, s)
	b1, b2 := blobRecord("doomed-1"), blobRecord("doomed-2")
	for _, b := range []storage.BlobRecord{b1, b2} {
		mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	}
	insertErr := make(chan error, 1)
	touched := make(chan bool, 1)
	ok, err := c.DeleteUnreferencedBlob(ctx, b1.SHA256, t0.Add(time.Minute), func(context.Context, storage.BlobRecord) error {
		go func() { insertErr <- s.InsertMedia(ctx, readyMedia("example.org", "late", b1)) }()
		go func() {
			ok, err := c.TouchBlob(ctx, b1.SHA256, t0.Add(time.Hour))
			if err != nil {
				t.Errorf("TouchBlob: %v", err)
			}
			touched <- ok
		}()
		return nil
	})
	if err != nil || !ok {
		t.Fatalf("DeleteUnreferencedBlob = %v, %v; want true, nil", ok, err)
	}
	if err := <-insertErr; err == nil {
		t.Error("InsertMedia naming a blob deleted concurrently succeeded")
	}
	if <-touched {
		t.Error("TouchBlob of a blob deleted concurrently reported it present")
	}
	if _, err := s.GetMedia(ctx, "example.org", "late"); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("GetMedia of the refused insert: %v, want ErrNotFound", err)
	}

	// Unrecorded bytes: RecordBlob waits for the deletion, then records.
	orphan := blobRecord("orphan")
	recorded := make(chan error, 1)
	called := false
	ok, err = c.DeleteUnrecordedBlob(ctx, orphan.SHA256, func(context.Context) error {
		called = true
		go func() { recorded <- errOf(s.RecordBlob(ctx, orphan)) }()
		return nil
	})
	if err != nil || !ok || !called {
		t.Fatalf("DeleteUnrecordedBlob = %v, %v (called %v); want true, nil, called", ok, err, called)
	}
	mustNil(t, "RecordBlob during DeleteUnrecordedBlob", <-recorded)
	rec, err := s.GetBlob(ctx, orphan.SHA256)
	mustNil(t, "GetBlob", err)
	equalBlob(t, rec, orphan)

	// Recorded bytes are not touched; a failing callback leaves nothing.
	ok, err = c.DeleteUnrecordedBlob(ctx, b2.SHA256, func(context.Context) error {
		t.Error("callback called for a recorded blob")
		return nil
	})
	if err != nil || ok {
		t.Errorf("DeleteUnrecordedBlob of a recorded blob = %v, %v; want false, nil", ok, err)
	}
	boom := errors.New("boom")
	gone := blobRecord("gone")
	ok, err = c.DeleteUnrecordedBlob(ctx, gone.SHA256, func(context.Context) error { return boom })
	if !errors.Is(err, boom) || ok {
		t.Errorf("DeleteUnrecordedBlob with a failing callback = %v, %v; want false and its error", ok, err)
	}
	for _, h := range []string{gone.SHA256, hash("blob-never")} {
		if _, err := s.GetBlob(ctx, h); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("GetBlob(%s) after DeleteUnrecordedBlob: %v, want ErrNotFound (no placeholder left)", h, err)
		}
	}
	if n, _, err := s.CountBlobs(ctx, ""); err != nil || n != 0 {
		t.Errorf("CountBlobs of the placeholder datastore = %d, %v; want 0", n, err)
	}
}

// testLockCollector checks that the collector lock has one holder at a time
// and can be taken again after release.
func testLockCollector(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	c := collector(t, s)
	release, ok, err := c.LockCollector(ctx)
	if err != nil || !ok {
		t.Fatalf("LockCollector = %v, %v; want acquired", ok, err)
	}
	if r2, ok, err := c.LockCollector(ctx); err != nil || ok {
		if ok {
			r2()
		}
		t.Fatalf("second LockCollector = %v, %v; want not acquired, nil", ok, err)
	}
	release()
	release, ok, err = c.LockCollector(ctx)
	if err != nil || !ok {
		t.Fatalf("LockCollector after release = %v, %v; want acquired", ok, err)
	}
	release()
}
