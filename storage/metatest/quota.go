package metatest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// quotaStore returns s as a storage.QuotaStore; every store of this module
// must implement it.
func quotaStore(t *testing.T, s storage.MetadataStore) storage.QuotaStore {
	t.Helper()
	q, ok := s.(storage.QuotaStore)
	if !ok {
		t.Fatalf("%T does not implement storage.QuotaStore", s)
	}
	return q
}

// sizedBlob records and returns a blob of the given size.
func sizedBlob(t *testing.T, s storage.MetadataStore, seed string, size int64) storage.BlobRecord {
	t.Helper()
	b := blobRecord(seed)
	b.Size = size
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(context.Background(), b)))
	return b
}

// owned is a local ready item of user in blob b, uploaded at at.
func owned(b storage.BlobRecord, id, user string, at time.Time) storage.Media {
	m := readyMedia("example.org", id, b)
	m.UserID = user
	m.CreatedAt = at
	m.UploadedAt = at
	return m
}

// wantUsage checks the counters of user.
func wantUsage(t *testing.T, q storage.QuotaStore, user string, bytes, files int64) {
	t.Helper()
	u, err := q.UserUsage(context.Background(), user)
	mustNil(t, "UserUsage("+user+")", err)
	if u != (storage.UserUsage{UserID: user, Bytes: bytes, Files: files}) {
		t.Fatalf("UserUsage(%s) = %+v, want %d bytes in %d files", user, u, bytes, files)
	}
}

// wantExact checks that the counters of every user are exact:
// RecountUsage finds nothing to change.
func wantExact(t *testing.T, q storage.QuotaStore) {
	t.Helper()
	n, err := q.RecountUsage(context.Background(), "")
	mustNil(t, "RecountUsage", err)
	if n != 0 {
		t.Fatalf("RecountUsage changed the counters of %d users; they were not exact", n)
	}
}

// wantQuotaError checks that err is a *storage.QuotaExceededError equal to
// want.
func wantQuotaError(t *testing.T, what string, err error, want storage.QuotaExceededError) {
	t.Helper()
	mustIs(t, what, err, storage.ErrQuotaExceeded)
	var qe *storage.QuotaExceededError
	if !errors.As(err, &qe) {
		t.Fatalf("%s: %v is not a *QuotaExceededError", what, err)
	}
	if *qe != want {
		t.Fatalf("%s: %+v, want %+v", what, *qe, want)
	}
}

// testUsageCounters checks which rows count and that every write keeps the
// counters exact.
func testUsageCounters(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q, a := quotaStore(t, s), admin(t, s)
	const alice, bob = "@alice:example.org", "@bob:example.org"
	b100, b50 := sizedBlob(t, s, "c100", 100), sizedBlob(t, s, "c50", 50)

	wantUsage(t, q, alice, 0, 0)
	m1 := owned(b100, "m1", alice, t0)
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, m1))
	wantUsage(t, q, alice, 100, 1)
	// The same content again counts again (deduplicated blob).
	m2 := owned(b100, "m2", alice, t0)
	mustNil(t, "InsertMedia(same blob)", s.InsertMedia(ctx, m2))
	wantUsage(t, q, alice, 200, 2)
	// A refused insert (existing ID) counts nothing.
	mustIs(t, "InsertMedia(existing)", s.InsertMedia(ctx, owned(b50, "m1", alice, t0)), storage.ErrConflict)
	mustIs(t, "InsertMedia(existing, other user)", s.InsertMedia(ctx, owned(b50, "m1", bob, t0)), storage.ErrConflict)
	wantUsage(t, q, alice, 200, 2)
	wantUsage(t, q, bob, 0, 0)

	// Remote rows never count, with or without a user ID, limited or not.
	r1 := remoteMedia("remote.example", "r1", b100)
	r2 := remoteMedia("remote.example", "r2", b100)
	r2.UserID = bob
	mustNil(t, "InsertMedia(remote)", s.InsertMedia(ctx, r1))
	mustNil(t, "InsertMediaLimited(remote with user)", q.InsertMediaLimited(ctx, r2, storage.UploadLimits{MaxBytes: 1, MaxFiles: 1}))
	wantUsage(t, q, bob, 0, 0)
	wantUsage(t, q, "", 0, 0)
	// Nor do local rows without a user.
	anon := owned(b50, "anon", "", t0)
	mustNil(t, "InsertMedia(no user)", s.InsertMedia(ctx, anon))
	wantUsage(t, q, "", 0, 0)
	if sum, files, err := q.UploadedSince(ctx, bob, time.Time{}); err != nil || sum != 0 || files != 0 {
		t.Fatalf("UploadedSince(bob) = %d, %d, %v; want nothing (remote rows)", sum, files, err)
	}

	// Pending rows count nothing until completed.
	p := pendingMedia("example.org", "p1", bob, t0.Add(time.Hour))
	mustNil(t, "CreatePending", s.CreatePending(ctx, p, 0))
	wantUsage(t, q, bob, 0, 0)
	// A failed completion (other user) counts nothing for anyone.
	mustIs(t, "CompletePending(other user)", s.CompletePending(ctx, upload(b50, "example.org", "p1", alice, t0.Add(time.Minute))), storage.ErrConflict)
	wantUsage(t, q, alice, 200, 2)
	mustNil(t, "CompletePending", s.CompletePending(ctx, upload(b50, "example.org", "p1", bob, t0.Add(time.Minute))))
	wantUsage(t, q, bob, 50, 1)
	mustIs(t, "CompletePending again", s.CompletePending(ctx, upload(b50, "example.org", "p1", bob, t0.Add(time.Minute))), storage.ErrConflict)
	wantUsage(t, q, bob, 50, 1)
	// Expired pending rows go without changing anything.
	mustNil(t, "CreatePending", s.CreatePending(ctx, pendingMedia("example.org", "p2", bob, t0.Add(time.Minute)), 0))
	mustIs(t, "CompletePending(expired)", s.CompletePending(ctx, upload(b50, "example.org", "p2", bob, t0.Add(time.Hour))), storage.ErrNotFound)
	if _, err := s.DeleteExpiredPending(ctx, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	wantUsage(t, q, bob, 50, 1)
	wantExact(t, q)

	// Deletion gives back exactly what the deleted rows counted; deleting
	// remote, anonymous and pending rows and missing IDs changes nothing.
	mustNil(t, "CreatePending", s.CreatePending(ctx, pendingMedia("example.org", "p3", alice, t0.Add(time.Hour)), 0))
	del, err := a.DeleteMedia(ctx, []storage.MediaRef{ref(m1), ref(r1), ref(r2), ref(anon),
		{ServerName: "example.org", MediaID: "p3"}, {ServerName: "example.org", MediaID: "missing"}}, true, t0)
	mustNil(t, "DeleteMedia", err)
	if len(del.Media) != 5 {
		t.Fatalf("DeleteMedia deleted %v, want 5 rows", ids(del.Media))
	}
	wantUsage(t, q, alice, 100, 1)
	wantUsage(t, q, bob, 50, 1)
	// A tombstoned ID inserts (and counts) nothing.
	mustIs(t, "InsertMedia(tombstoned)", s.InsertMedia(ctx, m1), storage.ErrConflict)
	wantUsage(t, q, alice, 100, 1)
	_, err = a.DeleteMedia(ctx, []storage.MediaRef{ref(m2), {ServerName: "example.org", MediaID: "p1"}}, false, t0)
	mustNil(t, "DeleteMedia", err)
	wantUsage(t, q, alice, 0, 0)
	wantUsage(t, q, bob, 0, 0)
	wantExact(t, q)
}

// testQuotaBoundaries checks the stored-total limits at their boundaries.
func testQuotaBoundaries(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q := quotaStore(t, s)
	const alice, bob = "@alice:example.org", "@bob:example.org"
	b300, b200, b1, b0 := sizedBlob(t, s, "b300", 300), sizedBlob(t, s, "b200", 200), sizedBlob(t, s, "b1", 1), sizedBlob(t, s, "b0", 0)
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, owned(b300, "a0", alice, t0)))

	tests := []struct {
		name string
		blob storage.BlobRecord
		lim  storage.UploadLimits
		// want is the error's fields, the zero value for success.
		want storage.QuotaExceededError
	}{
		{"one byte over", b200, storage.UploadLimits{MaxBytes: 499},
			storage.QuotaExceededError{Limit: storage.LimitBytes, Used: 300, Adding: 200, Max: 499}},
		{"exactly at the limit", b200, storage.UploadLimits{MaxBytes: 500}, storage.QuotaExceededError{}},
		{"full: one more byte", b1, storage.UploadLimits{MaxBytes: 500},
			storage.QuotaExceededError{Limit: storage.LimitBytes, Used: 500, Adding: 1, Max: 500}},
		{"full: an empty file fits", b0, storage.UploadLimits{MaxBytes: 500}, storage.QuotaExceededError{}},
		{"files: one over", b1, storage.UploadLimits{MaxBytes: 1000, MaxFiles: 3},
			storage.QuotaExceededError{Limit: storage.LimitFiles, Used: 3, Adding: 1, Max: 3}},
		{"files: exactly at the limit", b1, storage.UploadLimits{MaxFiles: 4}, storage.QuotaExceededError{}},
		{"bytes are checked before files", b300, storage.UploadLimits{MaxBytes: 501, MaxFiles: 4},
			storage.QuotaExceededError{Limit: storage.LimitBytes, Used: 501, Adding: 300, Max: 501}},
		{"zero and negative limits bound nothing", b300, storage.UploadLimits{MaxBytes: 0, MaxFiles: -1}, storage.QuotaExceededError{}},
	}
	bytes, files := int64(300), int64(1)
	for i, tt := range tests {
		m := owned(tt.blob, "a"+strconv.Itoa(i+1), alice, t0)
		err := q.InsertMediaLimited(ctx, m, tt.lim)
		if tt.want == (storage.QuotaExceededError{}) {
			mustNil(t, tt.name, err)
			bytes += tt.blob.Size
			files++
			equalMedia(t, mustGet(t, s, ref(m)), m)
		} else {
			wantQuotaError(t, tt.name, err, tt.want)
			_, gerr := s.GetMedia(ctx, m.ServerName, m.MediaID)
			mustIs(t, tt.name+": GetMedia of the refused item", gerr, storage.ErrNotFound)
		}
		wantUsage(t, q, alice, bytes, files)
	}
	// Another user's limits are their own.
	mustNil(t, "InsertMediaLimited(bob)", q.InsertMediaLimited(ctx, owned(b300, "b1", bob, t0), storage.UploadLimits{MaxBytes: 300, MaxFiles: 1}))
	wantUsage(t, q, bob, 300, 1)
	// A refused ID is still free; a conflicting one is a conflict, not a
	// quota error, and counts nothing.
	mustIs(t, "InsertMediaLimited(existing)", q.InsertMediaLimited(ctx, owned(b1, "b1", bob, t0), storage.UploadLimits{MaxBytes: 1000}), storage.ErrConflict)
	wantUsage(t, q, bob, 300, 1)
	// Windows of no length are invalid, not a quota error.
	err := q.InsertMediaLimited(ctx, owned(b1, "bad", bob, t0), storage.UploadLimits{Windows: []storage.WindowLimit{{MaxBytes: 1}}})
	if err == nil || errors.Is(err, storage.ErrQuotaExceeded) {
		t.Fatalf("InsertMediaLimited with a zero window: %v, want an invalid-limits error", err)
	}
	wantUsage(t, q, bob, 300, 1)
	wantExact(t, q)
}

// testQuotaWindows checks the rolling windows with an injected Now.
func testQuotaWindows(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q, a := quotaStore(t, s), admin(t, s)
	const alice = "@alice:example.org"
	now := t0.Add(24 * time.Hour)
	b100, b10 := sizedBlob(t, s, "w100", 100), sizedBlob(t, s, "w10", 10)
	old := owned(b100, "old", alice, now.Add(-2*time.Hour))
	edge := owned(b100, "edge", alice, now.Add(-time.Hour)) // exactly at the 1 h cutoff: inside
	recent := owned(b100, "recent", alice, now.Add(-30*time.Minute))
	// Without an upload time the creation time places the row.
	created := owned(b10, "created", alice, now.Add(-10*time.Minute))
	created.UploadedAt = time.Time{}
	for _, m := range []storage.Media{old, edge, recent, created} {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	}
	// Remote rows and other users never count.
	mustNil(t, "InsertMedia(remote)", s.InsertMedia(ctx, remoteMedia("remote.example", "r", b100)))
	mustNil(t, "InsertMedia(bob)", s.InsertMedia(ctx, owned(b100, "bob", "@bob:example.org", now.Add(-time.Minute))))

	for _, tt := range []struct {
		since        time.Time
		bytes, files int64
	}{
		{now.Add(-3 * time.Hour), 310, 4},
		{now.Add(-time.Hour), 210, 3},
		{now.Add(-time.Hour + time.Millisecond), 110, 2},
		{now.Add(-10 * time.Minute), 10, 1},
		{now, 0, 0},
	} {
		b, f, err := q.UploadedSince(ctx, alice, tt.since)
		mustNil(t, "UploadedSince", err)
		if b != tt.bytes || f != tt.files {
			t.Fatalf("UploadedSince(%s before now) = %d bytes, %d files; want %d, %d", now.Sub(tt.since), b, f, tt.bytes, tt.files)
		}
	}

	hour := storage.WindowLimit{Window: time.Hour}
	day := storage.WindowLimit{Window: 24 * time.Hour}
	tests := []struct {
		name    string
		windows []storage.WindowLimit
		want    storage.QuotaExceededError
	}{
		{"hour bytes: exactly at the limit", []storage.WindowLimit{{Window: time.Hour, MaxBytes: 310}}, storage.QuotaExceededError{}},
		{"hour bytes: one over", []storage.WindowLimit{{Window: time.Hour, MaxBytes: 309}},
			storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: time.Hour, Used: 210, Adding: 100, Max: 309}},
		{"hour files: one over", []storage.WindowLimit{{Window: time.Hour, MaxFiles: 3}},
			storage.QuotaExceededError{Limit: storage.LimitWindowFiles, Window: time.Hour, Used: 3, Adding: 1, Max: 3}},
		{"hour files: at the limit", []storage.WindowLimit{{Window: time.Hour, MaxFiles: 4}}, storage.QuotaExceededError{}},
		{"two windows: the day refuses", []storage.WindowLimit{
			{Window: time.Hour, MaxBytes: 1000, MaxFiles: 10}, {Window: 24 * time.Hour, MaxBytes: 409}},
			storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: 24 * time.Hour, Used: 310, Adding: 100, Max: 409}},
		{"two windows: the hour refuses first", []storage.WindowLimit{
			{Window: time.Hour, MaxBytes: 300}, {Window: 24 * time.Hour, MaxBytes: 300}},
			storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: time.Hour, Used: 210, Adding: 100, Max: 300}},
		{"windows without bounds", []storage.WindowLimit{hour, day}, storage.QuotaExceededError{}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := owned(b100, "try"+strconv.Itoa(i), alice, now)
			before, err := q.UserUsage(ctx, alice)
			mustNil(t, "UserUsage", err)
			err = q.InsertMediaLimited(ctx, m, storage.UploadLimits{Windows: tt.windows, Now: now})
			if tt.want == (storage.QuotaExceededError{}) {
				mustNil(t, "InsertMediaLimited", err)
				// Leave the windows as they were for the next case.
				_, err := a.DeleteMedia(ctx, []storage.MediaRef{ref(m)}, false, now)
				mustNil(t, "DeleteMedia", err)
			} else {
				wantQuotaError(t, "InsertMediaLimited", err, tt.want)
			}
			wantUsage(t, q, alice, before.Bytes, before.Files)
		})
	}

	// Deleted rows leave the window.
	lim := storage.UploadLimits{Windows: []storage.WindowLimit{{Window: time.Hour, MaxBytes: 250}}, Now: now}
	mustIs(t, "InsertMediaLimited before deletion", q.InsertMediaLimited(ctx, owned(b100, "after", alice, now), lim), storage.ErrQuotaExceeded)
	_, err := a.DeleteMedia(ctx, []storage.MediaRef{ref(recent)}, false, now)
	mustNil(t, "DeleteMedia", err)
	mustNil(t, "InsertMediaLimited after deletion", q.InsertMediaLimited(ctx, owned(b100, "after", alice, now), lim))
	// Time moves on: at now+1h the same window holds only "after".
	lim.Now = now.Add(time.Hour)
	lim.Windows[0].MaxBytes = 200
	mustNil(t, "InsertMediaLimited an hour later", q.InsertMediaLimited(ctx, owned(b100, "later", alice, lim.Now), lim))
	lim.Windows[0].MaxBytes = 299
	err = q.InsertMediaLimited(ctx, owned(b100, "later2", alice, lim.Now), lim)
	wantQuotaError(t, "InsertMediaLimited an hour later, over", err,
		storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: time.Hour, Used: 200, Adding: 100, Max: 299})
	wantExact(t, q)
}

// testQuotaPending checks that pending items count nothing until completed
// and that completion is limited.
func testQuotaPending(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q := quotaStore(t, s)
	const alice = "@alice:example.org"
	now := t0.Add(time.Hour)
	b100 := sizedBlob(t, s, "p100", 100)
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, owned(b100, "stored", alice, t0)))
	for _, id := range []string{"p1", "p2", "p3"} {
		mustNil(t, "CreatePending", s.CreatePending(ctx, pendingMedia("example.org", id, alice, now.Add(time.Hour)), 0))
	}
	wantUsage(t, q, alice, 100, 1)
	// Reservations are not in the windows either.
	lim := storage.UploadLimits{MaxBytes: 250, Windows: []storage.WindowLimit{{Window: 48 * time.Hour, MaxFiles: 2}}, Now: now}
	mustNil(t, "CompletePendingLimited(p1)", q.CompletePendingLimited(ctx, upload(b100, "example.org", "p1", alice, now), lim))
	wantUsage(t, q, alice, 200, 2)
	// Over the window's files: refused, the item stays pending.
	lim.MaxBytes = 1000
	err := q.CompletePendingLimited(ctx, upload(b100, "example.org", "p2", alice, now), lim)
	wantQuotaError(t, "CompletePendingLimited(p2)", err,
		storage.QuotaExceededError{Limit: storage.LimitWindowFiles, Window: 48 * time.Hour, Used: 2, Adding: 1, Max: 2})
	if m := mustGet(t, s, storage.MediaRef{ServerName: "example.org", MediaID: "p2"}); m.State != storage.StatePending || m.SHA256 != "" {
		t.Fatalf("refused completion changed the item: %+v", m)
	}
	// Over the stored bytes.
	lim = storage.UploadLimits{MaxBytes: 299, Now: now}
	err = q.CompletePendingLimited(ctx, upload(b100, "example.org", "p2", alice, now), lim)
	wantQuotaError(t, "CompletePendingLimited(p2) over bytes", err,
		storage.QuotaExceededError{Limit: storage.LimitBytes, Used: 200, Adding: 100, Max: 299})
	wantUsage(t, q, alice, 200, 2)
	lim.MaxBytes = 300
	mustNil(t, "CompletePendingLimited(p2) at the limit", q.CompletePendingLimited(ctx, upload(b100, "example.org", "p2", alice, now), lim))
	wantUsage(t, q, alice, 300, 3)
	// A completion that fails for another reason counts nothing.
	mustIs(t, "CompletePendingLimited(p2) again", q.CompletePendingLimited(ctx, upload(b100, "example.org", "p2", alice, now), storage.UploadLimits{}), storage.ErrConflict)
	mustIs(t, "CompletePendingLimited(missing)", q.CompletePendingLimited(ctx, upload(b100, "example.org", "nope", alice, now), storage.UploadLimits{}), storage.ErrNotFound)
	mustIs(t, "CompletePendingLimited(p3, expired)", q.CompletePendingLimited(ctx, upload(b100, "example.org", "p3", alice, now.Add(2*time.Hour)), storage.UploadLimits{}), storage.ErrNotFound)
	wantUsage(t, q, alice, 300, 3)
	wantExact(t, q)
}

// quotaRace has goroutines upload items of size bytes for user through
// the stores in turn (alternating InsertMediaLimited and, on reservations,
// CompletePendingLimited) under lim, and checks that exactly fit succeed
// and the others get a quota error.
func quotaRace(t *testing.T, stores []storage.MetadataStore, name, alice string, goroutines int, size int64, lim storage.UploadLimits, fit int) {
	t.Helper()
	ctx := context.Background()
	s0 := stores[0]
	b := sizedBlob(t, s0, name, size)
	for i := range goroutines {
		if i%2 == 1 {
			p := pendingMedia("example.org", fmt.Sprintf("%s-%d", name, i), alice, t0.Add(time.Hour))
			mustNil(t, "CreatePending", s0.CreatePending(ctx, p, 0))
		}
	}
	before, err := quotaStore(t, s0).UserUsage(ctx, alice)
	mustNil(t, "UserUsage", err)
	errs := make([]error, goroutines)
	var (
		wg    sync.WaitGroup
		ready sync.WaitGroup
		start = make(chan struct{})
	)
	ready.Add(goroutines)
	for i := range goroutines {
		q := quotaStore(t, stores[i%len(stores)])
		m := upload(b, "example.org", fmt.Sprintf("%s-%d", name, i), alice, t0)
		wg.Go(func() {
			ready.Done()
			<-start
			if i%2 == 1 {
				errs[i] = q.CompletePendingLimited(ctx, m, lim)
			} else {
				errs[i] = q.InsertMediaLimited(ctx, m, lim)
			}
		})
	}
	ready.Wait()
	close(start)
	wg.Wait()
	ok := 0
	for i, err := range errs {
		id := fmt.Sprintf("%s-%d", name, i)
		switch {
		case err == nil:
			ok++
			if m := mustGet(t, s0, storage.MediaRef{ServerName: "example.org", MediaID: id}); m.State != storage.StateReady {
				t.Fatalf("%s: succeeded but %+v", id, m)
			}
		case errors.Is(err, storage.ErrQuotaExceeded):
			m, gerr := s0.GetMedia(ctx, "example.org", id)
			if i%2 == 1 && (gerr != nil || m.State != storage.StatePending) {
				t.Fatalf("%s: refused but %+v, %v", id, m, gerr)
			}
			if i%2 == 0 {
				mustIs(t, id+": GetMedia of a refused insert", gerr, storage.ErrNotFound)
			}
		default:
			t.Fatalf("%s: unexpected error %v", id, err)
		}
	}
	if ok != fit {
		t.Fatalf("%d of %d racing uploads succeeded, want exactly %d", ok, goroutines, fit)
	}
	wantUsage(t, quotaStore(t, s0), alice, before.Bytes+int64(fit)*size, before.Files+int64(fit))
	wantExact(t, quotaStore(t, s0))
}

// quotaRaces runs the races of testQuotaConcurrent on the given stores (one
// database).
func quotaRaces(t *testing.T, stores []storage.MetadataStore) {
	ctx := context.Background()
	const alice = "@alice:example.org"
	// A user without counters yet: the first uploads race to create them.
	quotaRace(t, stores, "new", "@new:example.org", 16, 100, storage.UploadLimits{MaxBytes: 350}, 3)
	// Stored bytes: 1000 used, 9,500 left, 16 uploads of 1000 bytes.
	mustNil(t, "InsertMedia", stores[0].InsertMedia(ctx, owned(sizedBlob(t, stores[0], "base", 1000), "base", alice, t0)))
	quotaRace(t, stores, "bytes", alice, 16, 1000, storage.UploadLimits{MaxBytes: 10_500}, 9)
	// Stored files: 10 stored, 14 allowed.
	quotaRace(t, stores, "files", alice, 12, 1, storage.UploadLimits{MaxFiles: 14}, 4)
	// A rolling window: uploads since an hour ago (the 14 above at t0) may
	// hold 19 files.
	quotaRace(t, stores, "window", alice, 12, 7, storage.UploadLimits{
		Windows: []storage.WindowLimit{{Window: time.Hour, MaxFiles: 19}, {Window: 2 * time.Hour, MaxBytes: 1 << 40}},
		Now:     t0.Add(time.Minute)}, 5)
}

// testQuotaConcurrent races uploads for the last bytes, files and window
// allowance of a quota on one store.
func testQuotaConcurrent(t *testing.T, s storage.MetadataStore) {
	quotaRaces(t, []storage.MetadataStore{s})
}

// testQuotaConcurrentDeletion runs uploads, deletions and recounts of two
// users' media at once and checks that the counters stay exact.
func testQuotaConcurrentDeletion(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q, a := quotaStore(t, s), admin(t, s)
	const alice, bob = "@alice:example.org", "@bob:example.org"
	b := sizedBlob(t, s, "churn", 10)
	const n = 40
	var inserted atomic.Int64
	var refs []storage.MediaRef
	for i := range n {
		m := owned(b, "pre"+strconv.Itoa(i), []string{alice, bob}[i%2], t0)
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
		refs = append(refs, ref(m))
	}
	var (
		mu   sync.Mutex
		errs []error
	)
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Go(func() {
			for start := 0; start < n; start += 8 {
				set := slices.Clone(refs[start:min(start+12, n)])
				if w%2 == 1 {
					slices.Reverse(set)
				}
				if _, err := a.DeleteMedia(ctx, set, false, t0); err != nil {
					fail(err)
					return
				}
			}
		})
	}
	for w := range 3 {
		wg.Go(func() {
			for i := range 15 {
				user := []string{alice, bob}[(w+i)%2]
				m := owned(b, fmt.Sprintf("new%d-%d", w, i), user, t0)
				err := q.InsertMediaLimited(ctx, m, storage.UploadLimits{MaxBytes: 1 << 40, Windows: []storage.WindowLimit{{Window: time.Hour, MaxFiles: 1000}}, Now: t0})
				if err != nil {
					fail(err)
					return
				}
				inserted.Add(1)
			}
		})
	}
	// Recounts all along find the counters exact at every commit.
	stop := make(chan struct{})
	var recounter sync.WaitGroup
	recounter.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			user := []string{"", alice, bob}[i%3]
			n, err := q.RecountUsage(ctx, user)
			if err != nil {
				fail(err)
				return
			}
			if n != 0 {
				fail(fmt.Errorf("RecountUsage(%q) during uploads and deletions changed %d users", user, n))
				return
			}
		}
	})
	wg.Wait()
	close(stop)
	recounter.Wait()
	for _, err := range errs {
		t.Errorf("concurrent operation failed: %v", err)
	}
	if t.Failed() {
		return
	}
	ua, err := q.UserUsage(ctx, alice)
	mustNil(t, "UserUsage", err)
	ub, err := q.UserUsage(ctx, bob)
	mustNil(t, "UserUsage", err)
	if got := ua.Files + ub.Files; got != inserted.Load() || ua.Bytes+ub.Bytes != 10*got {
		t.Fatalf("after deleting the first %d items and inserting %d: usage %+v and %+v", n, inserted.Load(), ua, ub)
	}
	wantExact(t, q)
}

// testTopUsage checks the order, limit and skipping of TopUsage.
func testTopUsage(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q, a := quotaStore(t, s), admin(t, s)
	top, err := q.TopUsage(ctx, 10)
	mustNil(t, "TopUsage(empty)", err)
	if len(top) != 0 {
		t.Fatalf("TopUsage on an empty store = %v", top)
	}
	b := map[int64]storage.BlobRecord{}
	for _, size := range []int64{0, 100, 200, 300} {
		b[size] = sizedBlob(t, s, "top"+strconv.FormatInt(size, 10), size)
	}
	items := []struct {
		user string
		size int64
	}{
		{"@carol:example.org", 300},
		{"@alice:example.org", 100}, {"@alice:example.org", 200},
		{"@bob:example.org", 300},
		{"@dave:example.org", 100},
		{"@Zed:example.org", 100}, // byte order: 'Z' sorts before 'a'
		{"@empty:example.org", 0},
		{"@gone:example.org", 300},
	}
	for i, it := range items {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, owned(b[it.size], "t"+strconv.Itoa(i), it.user, t0)))
	}
	mustNil(t, "InsertMedia(remote)", s.InsertMedia(ctx, remoteMedia("remote.example", "big", b[300])))
	_, err = a.DeleteMedia(ctx, []storage.MediaRef{{ServerName: "example.org", MediaID: "t" + strconv.Itoa(len(items)-1)}}, false, t0)
	mustNil(t, "DeleteMedia", err)

	all := []storage.UserUsage{
		{UserID: "@alice:example.org", Bytes: 300, Files: 2},
		{UserID: "@bob:example.org", Bytes: 300, Files: 1},
		{UserID: "@carol:example.org", Bytes: 300, Files: 1},
		{UserID: "@Zed:example.org", Bytes: 100, Files: 1},
		{UserID: "@dave:example.org", Bytes: 100, Files: 1},
		{UserID: "@empty:example.org", Bytes: 0, Files: 1},
	}
	// "@Zed" < "@dave" in byte order.
	for _, limit := range []int{0, -1, 1, 2, 5, 6, 100} {
		top, err := q.TopUsage(ctx, limit)
		mustNil(t, "TopUsage", err)
		want := all[:max(0, min(limit, len(all)))]
		if !slices.Equal(top, want) {
			t.Fatalf("TopUsage(%d) =\n %v\nwant\n %v", limit, top, want)
		}
	}
}

// testRecountUsage checks RecountUsage on exact counters: it changes
// nothing, for one user or all, and reports unknown users as unchanged.
func testRecountUsage(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q := quotaStore(t, s)
	b := sizedBlob(t, s, "recount", 42)
	for i, user := range []string{"@a:example.org", "@b:example.org", "@a:example.org"} {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, owned(b, "r"+strconv.Itoa(i), user, t0)))
	}
	for _, user := range []string{"", "@a:example.org", "@nobody:example.org"} {
		n, err := q.RecountUsage(ctx, user)
		mustNil(t, "RecountUsage("+user+")", err)
		if n != 0 {
			t.Fatalf("RecountUsage(%q) on exact counters = %d, want 0", user, n)
		}
	}
	wantUsage(t, q, "@a:example.org", 84, 2)
	wantUsage(t, q, "@b:example.org", 42, 1)
	wantUsage(t, q, "@nobody:example.org", 0, 0)
	top, err := q.TopUsage(ctx, 10)
	mustNil(t, "TopUsage", err)
	if len(top) != 2 {
		t.Fatalf("TopUsage after recounting = %v, want the two users", top)
	}
}

// RunQuotaInstances races quota-limited uploads of one user through two
// store handles on the same database, as two Caddy instances sharing it do:
// exactly the uploads that fit succeed. open must return a new handle on
// the same database every time it is called within one test; the handles
// are closed by RunQuotaInstances.
func RunQuotaInstances(t *testing.T, open func(t *testing.T) storage.MetadataStore) {
	a, b := open(t), open(t)
	t.Cleanup(func() {
		mustNil(t, "Close", a.Close())
		mustNil(t, "Close", b.Close())
	})
	quotaRaces(t, []storage.MetadataStore{a, b})
	wantExact(t, quotaStore(t, b))
}

// testQuotaWindowEdges checks windows whose start falls inside a minute
// holding uploads on both sides of it: stores may keep the history by
// minute (storage.WindowResolution), but decisions at a limit are exact to
// the millisecond.
func testQuotaWindowEdges(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q := quotaStore(t, s)
	const alice = "@alice:example.org"
	// The hour window starts 30 s into a minute.
	now := t0.Truncate(time.Minute).Add(48*time.Hour + 30*time.Second)
	cutoff := now.Add(-time.Hour)
	b10, b20, b40 := sizedBlob(t, s, "e10", 10), sizedBlob(t, s, "e20", 20), sizedBlob(t, s, "e40", 40)
	for _, m := range []storage.Media{
		owned(b40, "before-minute", alice, cutoff.Add(-31*time.Second)), // the minute before: out
		owned(b20, "just-out", alice, cutoff.Add(-time.Millisecond)),    // same minute, before: out
		owned(b10, "at-cutoff", alice, cutoff),                          // same minute, at: in
		owned(b10, "just-in", alice, cutoff.Add(29*time.Second)),        // same minute, after: in
		owned(b40, "next-minute", alice, cutoff.Add(30*time.Second)),    // the next minute: in
	} {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	}
	b, f, err := q.UploadedSince(ctx, alice, cutoff)
	mustNil(t, "UploadedSince", err)
	if b != 60 || f != 3 {
		t.Fatalf("UploadedSince(cutoff) = %d bytes, %d files; want 60, 3", b, f)
	}
	b, f, err = q.UploadedSince(ctx, alice, cutoff.Add(-time.Millisecond))
	mustNil(t, "UploadedSince", err)
	if b != 80 || f != 4 {
		t.Fatalf("UploadedSince(cutoff-1ms) = %d bytes, %d files; want 80, 4", b, f)
	}
	// On a minute boundary the whole minute is in.
	b, f, err = q.UploadedSince(ctx, alice, cutoff.Truncate(time.Minute))
	mustNil(t, "UploadedSince", err)
	if b != 80 || f != 4 {
		t.Fatalf("UploadedSince(cutoff's minute) = %d bytes, %d files; want 80, 4", b, f)
	}
	window := func(maxBytes, maxFiles int64) storage.UploadLimits {
		return storage.UploadLimits{Windows: []storage.WindowLimit{{Window: time.Hour, MaxBytes: maxBytes, MaxFiles: maxFiles}}, Now: now}
	}
	tests := []struct {
		name string
		lim  storage.UploadLimits
		want storage.QuotaExceededError
	}{
		{"bytes: exactly at the limit", window(70, 0), storage.QuotaExceededError{}},
		{"bytes: one over", window(69, 0),
			storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: time.Hour, Used: 60, Adding: 10, Max: 69}},
		{"files: exactly at the limit", window(0, 4), storage.QuotaExceededError{}},
		{"files: one over", window(0, 3),
			storage.QuotaExceededError{Limit: storage.LimitWindowFiles, Window: time.Hour, Used: 3, Adding: 1, Max: 3}},
	}
	a := admin(t, s)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := owned(b10, "edge-try"+strconv.Itoa(i), alice, now)
			h, err := q.CheckUpload(ctx, alice, tt.lim, 10, 0)
			ierr := q.InsertMediaLimited(ctx, m, tt.lim)
			if tt.want == (storage.QuotaExceededError{}) {
				mustNil(t, "CheckUpload", err)
				mustNil(t, "InsertMediaLimited", ierr)
				if tt.lim.Windows[0].MaxBytes > 0 && h.Bytes != tt.lim.Windows[0].MaxBytes-60 {
					t.Fatalf("CheckUpload headroom = %d bytes; want %d", h.Bytes, tt.lim.Windows[0].MaxBytes-60)
				}
				_, err := a.DeleteMedia(ctx, []storage.MediaRef{ref(m)}, false, now)
				mustNil(t, "DeleteMedia", err)
			} else {
				wantQuotaError(t, "CheckUpload", err, tt.want)
				wantQuotaError(t, "InsertMediaLimited", ierr, tt.want)
			}
		})
	}
	// Deleting the row in the edge minute before the cutoff changes nothing
	// inside the window; deleting the one after it frees its bytes.
	_, err = a.DeleteMedia(ctx, []storage.MediaRef{{ServerName: "example.org", MediaID: "just-out"}}, false, now)
	mustNil(t, "DeleteMedia(just-out)", err)
	wantQuotaError(t, "after deleting just-out", q.InsertMediaLimited(ctx, owned(b10, "edge-a", alice, now), window(69, 0)),
		storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: time.Hour, Used: 60, Adding: 10, Max: 69})
	_, err = a.DeleteMedia(ctx, []storage.MediaRef{{ServerName: "example.org", MediaID: "just-in"}}, false, now)
	mustNil(t, "DeleteMedia(just-in)", err)
	mustNil(t, "after deleting just-in", q.InsertMediaLimited(ctx, owned(b10, "edge-b", alice, now), window(60, 0)))
	b, f, err = q.UploadedSince(ctx, alice, cutoff.Add(-time.Millisecond))
	mustNil(t, "UploadedSince", err)
	if b != 60 || f != 3 {
		t.Fatalf("UploadedSince(cutoff-1ms) after deletions = %d bytes, %d files; want 60, 3", b, f)
	}
	// Windows longer than storage.MaxWindow are invalid.
	long := storage.UploadLimits{Windows: []storage.WindowLimit{{Window: storage.MaxWindow + time.Second, MaxBytes: 1}}, Now: now}
	if err := q.InsertMediaLimited(ctx, owned(b10, "edge-long", alice, now), long); err == nil || errors.Is(err, storage.ErrQuotaExceeded) {
		t.Fatalf("InsertMediaLimited with a window over MaxWindow: %v, want an invalid-limits error", err)
	}
	if _, err := q.CheckUpload(ctx, alice, long, 1, 0); err == nil || errors.Is(err, storage.ErrQuotaExceeded) {
		t.Fatalf("CheckUpload with a window over MaxWindow: %v, want an invalid-limits error", err)
	}
	wantExact(t, q)
}

// testCheckUpload checks the decision before a body is read: the same
// refusals as the Limited insertion, and the headroom of a body of unknown
// length.
func testCheckUpload(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q := quotaStore(t, s)
	const alice = "@alice:example.org"
	now := t0.Truncate(time.Minute).Add(72*time.Hour + 20*time.Second)
	b100 := sizedBlob(t, s, "c100", 100)
	// 300 bytes stored, 200 of them uploaded within the hour, 100 of those
	// in the minute the hour starts in (after its start).
	for i, at := range []time.Time{now.Add(-3 * time.Hour), now.Add(-time.Hour + 5*time.Second), now.Add(-time.Minute)} {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, owned(b100, "c"+strconv.Itoa(i), alice, at)))
	}
	hour := func(maxBytes, maxFiles int64) storage.WindowLimit {
		return storage.WindowLimit{Window: time.Hour, MaxBytes: maxBytes, MaxFiles: maxFiles}
	}
	tests := []struct {
		name          string
		lim           storage.UploadLimits
		size, maxSize int64
		want          storage.Headroom
		over          storage.QuotaExceededError
	}{
		{"no limits", storage.UploadLimits{}, 50, 0, storage.Headroom{Bytes: -1}, storage.QuotaExceededError{}},
		{"stored bytes: headroom", storage.UploadLimits{MaxBytes: 1000}, 50, 0,
			storage.Headroom{Bytes: 700, Tight: storage.QuotaExceededError{Limit: storage.LimitBytes, Used: 300, Max: 1000}}, storage.QuotaExceededError{}},
		{"stored bytes: exactly fits", storage.UploadLimits{MaxBytes: 350}, 50, 0,
			storage.Headroom{Bytes: 50, Tight: storage.QuotaExceededError{Limit: storage.LimitBytes, Used: 300, Max: 350}}, storage.QuotaExceededError{}},
		{"stored bytes: one over", storage.UploadLimits{MaxBytes: 349}, 50, 0, storage.Headroom{},
			storage.QuotaExceededError{Limit: storage.LimitBytes, Used: 300, Adding: 50, Max: 349}},
		{"stored files: one over", storage.UploadLimits{MaxFiles: 3}, 1, 0, storage.Headroom{},
			storage.QuotaExceededError{Limit: storage.LimitFiles, Used: 3, Adding: 1, Max: 3}},
		{"the window is tighter", storage.UploadLimits{MaxBytes: 1000, Windows: []storage.WindowLimit{hour(250, 0)}, Now: now}, 50, 0,
			storage.Headroom{Bytes: 50, Tight: storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: time.Hour, Used: 200, Max: 250}}, storage.QuotaExceededError{}},
		{"window: one over", storage.UploadLimits{Windows: []storage.WindowLimit{hour(249, 0)}, Now: now}, 50, 0, storage.Headroom{},
			storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: time.Hour, Used: 200, Adding: 50, Max: 249}},
		{"unknown length: exact headroom below the upload limit", storage.UploadLimits{Windows: []storage.WindowLimit{hour(260, 0)}, Now: now}, -1, 1000,
			storage.Headroom{Bytes: 60, Tight: storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: time.Hour, Used: 200, Max: 260}}, storage.QuotaExceededError{}},
		{"unknown length, nothing left", storage.UploadLimits{Windows: []storage.WindowLimit{hour(200, 0)}, Now: now}, -1, 1000, storage.Headroom{},
			storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: time.Hour, Used: 200, Adding: 1, Max: 200}},
		{"unknown length, one byte left", storage.UploadLimits{MaxBytes: 301}, -1, 0,
			storage.Headroom{Bytes: 1, Tight: storage.QuotaExceededError{Limit: storage.LimitBytes, Used: 300, Max: 301}}, storage.QuotaExceededError{}},
		{"windows that bound nothing", storage.UploadLimits{Windows: []storage.WindowLimit{hour(0, 0), {Window: time.Minute}}, Now: now}, 50, 0,
			storage.Headroom{Bytes: -1}, storage.QuotaExceededError{}},
		{"second window refuses files", storage.UploadLimits{Windows: []storage.WindowLimit{hour(0, 0), {Window: 24 * time.Hour, MaxFiles: 3}}, Now: now}, 50, 0, storage.Headroom{},
			storage.QuotaExceededError{Limit: storage.LimitWindowFiles, Window: 24 * time.Hour, Used: 3, Adding: 1, Max: 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := q.CheckUpload(ctx, alice, tt.lim, tt.size, tt.maxSize)
			if tt.over != (storage.QuotaExceededError{}) {
				wantQuotaError(t, "CheckUpload", err, tt.over)
				return
			}
			mustNil(t, "CheckUpload", err)
			if h != tt.want {
				t.Fatalf("CheckUpload = %+v; want %+v", h, tt.want)
			}
		})
	}
	// Headroom at or above maxSize need not be exact, but never below it.
	h, err := q.CheckUpload(ctx, alice, storage.UploadLimits{Windows: []storage.WindowLimit{hour(260, 0)}, Now: now}, -1, 10)
	mustNil(t, "CheckUpload with a small maxSize", err)
	if h.Bytes < 10 {
		t.Fatalf("CheckUpload headroom with maxSize 10 = %d; want at least 10", h.Bytes)
	}
	// A user with nothing.
	h, err = q.CheckUpload(ctx, "@nobody:example.org", storage.UploadLimits{MaxBytes: 5, Windows: []storage.WindowLimit{hour(3, 1)}, Now: now}, 3, 0)
	mustNil(t, "CheckUpload(nobody)", err)
	if h.Bytes != 3 || h.Tight.Limit != storage.LimitWindowBytes {
		t.Fatalf("CheckUpload(nobody) = %+v; want 3 bytes left by the window", h)
	}
}

// testPruneUploadHistory checks that pruning the history before the
// longest window leaves every window's sums as they were.
func testPruneUploadHistory(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	q := quotaStore(t, s)
	const alice = "@alice:example.org"
	now := t0.Add(96 * time.Hour)
	b100 := sizedBlob(t, s, "h100", 100)
	for i := range 6 {
		at := now.Add(-time.Duration(i) * 10 * time.Hour)
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, owned(b100, "h"+strconv.Itoa(i), alice, at)))
	}
	day := storage.UploadLimits{Windows: []storage.WindowLimit{{Window: 24 * time.Hour, MaxFiles: 4}}, Now: now}
	wantDay := func(stage string) {
		t.Helper()
		b, f, err := q.UploadedSince(ctx, alice, now.Add(-24*time.Hour))
		mustNil(t, stage+": UploadedSince", err)
		if b != 300 || f != 3 {
			t.Fatalf("%s: UploadedSince(a day ago) = %d, %d; want 300, 3", stage, b, f)
		}
		mustNil(t, stage+": InsertMediaLimited", q.InsertMediaLimited(ctx, owned(b100, "probe", alice, now), day))
		_, err = admin(t, s).DeleteMedia(ctx, []storage.MediaRef{{ServerName: "example.org", MediaID: "probe"}}, false, now)
		mustNil(t, stage+": DeleteMedia", err)
	}
	wantDay("before pruning")
	n, err := q.PruneUploadHistory(ctx, now.Add(-24*time.Hour))
	mustNil(t, "PruneUploadHistory", err)
	if n < 1 {
		t.Fatalf("PruneUploadHistory = %d; want the minutes of the three old uploads gone", n)
	}
	wantDay("after pruning")
	n, err = q.PruneUploadHistory(ctx, now.Add(-24*time.Hour))
	if err != nil || n != 0 {
		t.Fatalf("PruneUploadHistory again = %d, %v; want 0", n, err)
	}
	// Counters are not history: pruning leaves them.
	wantUsage(t, q, alice, 600, 6)
}
