// Package metatest is the conformance suite every storage.MetadataStore must
// pass. Implementations call Run (and RunReopen for persistent stores) from
// their tests:
//
//	func TestConformance(t *testing.T) {
//		metatest.Run(t, func(t *testing.T) storage.MetadataStore {
//			s, err := mystore.Open(t.TempDir())
//			if err != nil {
//				t.Fatal(err)
//			}
//			return s
//		})
//	}
//
// Beyond the storage.MetadataStore documentation the suite pins down these
// boundaries: times round-trip with millisecond precision (sub-millisecond
// parts are truncated); a zero time round-trips as zero; an item whose expiry
// equals the reference time counts as expired (for the pending limit,
// OldestPendingExpiry, CompletePending and DeleteExpiredPending alike); and
// CreatePending judges expiry of the user's other items at m.CreatedAt.
//
// Every store of this module also implements the optional capabilities
// (storage.MediaAdmin, Retainer, JobStore, MediaLookup, BlobCollector,
// QuotaStore, StatsStore), which Run checks as well. For storage.QuotaStore the suite
// pins down: a rolling window holds the rows uploaded at or after Now minus
// the window (a row exactly at the cutoff counts); limits are checked in the
// order stored bytes, stored files, then each window (bytes before files);
// Used excludes the refused item. RunQuotaInstances races quota-limited
// uploads through two handles on one database.
package metatest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// t0 is the suite's reference time, on a millisecond boundary.
var t0 = time.UnixMilli(1_700_000_000_123).UTC()

// Run runs the conformance suite. open must return a store over a new, empty
// database each time it is called; the suite closes every store it opens
// (cleanups registered by open run after that).
func Run(t *testing.T, open func(t *testing.T) storage.MetadataStore) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s storage.MetadataStore)
	}{
		{"Blobs", testBlobs},
		{"CountBlobReferences", testCountBlobReferences},
		{"InsertAndGetMedia", testInsertAndGetMedia},
		{"MediaRoundTrip", testMediaRoundTrip},
		{"CreatePending", testCreatePending},
		{"PendingLimit", testPendingLimit},
		{"OldestPendingExpiry", testOldestPendingExpiry},
		{"CompletePending", testCompletePending},
		{"DeleteExpiredPending", testDeleteExpiredPending},
		{"ConcurrentCreatePending", testConcurrentCreatePending},
		{"ConcurrentCompletePending", testConcurrentCompletePending},
		{"ListBlobs", testListBlobs},
		{"CountBlobs", testCountBlobs},
		{"MoveBlob", testMoveBlob},
		{"MediaDatastore", testMediaDatastore},
		{"Thumbnails", testThumbnails},
		{"BlobClaims", testBlobClaims},
		{"DeleteUnreferencedBlob", testDeleteUnreferencedBlob},
		{"CollectorExcludesWriters", testCollectorExcludesWriters},
		{"LockCollector", testLockCollector},
		{"Quarantine", testQuarantine},
		{"RefuseQuarantined", testRefuseQuarantined},
		{"Protected", testProtected},
		{"Tombstones", testTombstones},
		{"DeleteMedia", testDeleteMedia},
		{"RecordAccess", testRecordAccess},
		{"ConcurrentDeletion", testConcurrentDeletion},
		{"ListUserMedia", testListUserMedia},
		{"ListUsage", testListUsage},
		{"ListOldMedia", testListOldMedia},
		{"RemoteCache", testRemoteCache},
		{"ThumbnailExpiry", testThumbnailExpiry},
		{"Jobs", testJobs},
		{"LookupMedia", testLookupMedia},
		{"UsageCounters", testUsageCounters},
		{"QuotaBoundaries", testQuotaBoundaries},
		{"QuotaWindows", testQuotaWindows},
		{"QuotaWindowEdges", testQuotaWindowEdges},
		{"CheckUpload", testCheckUpload},
		{"PruneUploadHistory", testPruneUploadHistory},
		{"QuotaPending", testQuotaPending},
		{"QuotaConcurrent", testQuotaConcurrent},
		{"QuotaConcurrentDeletion", testQuotaConcurrentDeletion},
		{"TopUsage", testTopUsage},
		{"RecountUsage", testRecountUsage},
		{"MediaStats", testMediaStats},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := open(t)
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			tt.fn(t, s)
		})
	}
}

// RunReopen checks that a persistent store keeps its data when closed and
// opened again, and that two handles can be open on it at once. open must
// return a new handle on the same database every time it is called within
// one test (for example the same file or DSN); RunReopen closes the handles.
func RunReopen(t *testing.T, open func(t *testing.T) storage.MetadataStore) {
	ctx := context.Background()
	blob := blobRecord("reopen")
	ready := readyMedia("example.org", "ready1", blob)
	pending := pendingMedia("example.org", "pending1", "@alice:example.org", t0.Add(time.Hour))

	s := open(t)
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, blob)))
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, ready))
	mustNil(t, "CreatePending", s.CreatePending(ctx, pending, 5))
	mustNil(t, "Close", s.Close())

	for i := range 2 {
		s := open(t)
		// A second handle opened while the first is still open.
		s2 := open(t)
		for _, h := range []storage.MetadataStore{s, s2} {
			gotBlob, err := h.GetBlob(ctx, blob.SHA256)
			mustNil(t, "GetBlob after reopen", err)
			equalBlob(t, gotBlob, blob)
			got, err := h.GetMedia(ctx, ready.ServerName, ready.MediaID)
			mustNil(t, "GetMedia after reopen", err)
			equalMedia(t, got, withState(ready, storage.StateReady))
			got, err = h.GetMedia(ctx, pending.ServerName, pending.MediaID)
			mustNil(t, "GetMedia(pending) after reopen", err)
			equalMedia(t, got, withState(pending, storage.StatePending))
		}
		// Writes through one handle are visible through the other.
		extra := readyMedia("example.org", fmt.Sprintf("extra%d", i), blob)
		mustNil(t, "InsertMedia through second handle", s2.InsertMedia(ctx, extra))
		got, err := s.GetMedia(ctx, extra.ServerName, extra.MediaID)
		mustNil(t, "GetMedia through first handle", err)
		equalMedia(t, got, withState(extra, storage.StateReady))
		mustNil(t, "Close second handle", s2.Close())
		mustNil(t, "Close", s.Close())
	}
}

// ---- fixtures ----

// hash returns the hex SHA-256 of seed, a well-formed blob address.
func hash(seed string) string {
	sum := sha256.Sum256([]byte(seed))
	return hex.EncodeToString(sum[:])
}

func blobRecord(seed string) storage.BlobRecord {
	return storage.BlobRecord{
		SHA256:       hash("blob-" + seed),
		Size:         int64(1000 + len(seed)),
		PrefixSHA256: hash("prefix-" + seed),
		Datastore:    "files",
		CreatedAt:    t0,
	}
}

func readyMedia(server, id string, b storage.BlobRecord) storage.Media {
	return storage.Media{
		ServerName:  server,
		MediaID:     id,
		State:       storage.StateReady,
		UserID:      "@alice:" + server,
		SHA256:      b.SHA256,
		Size:        b.Size,
		ContentType: "image/png",
		Filename:    id + ".png",
		CreatedAt:   t0,
		UploadedAt:  t0.Add(time.Second),
	}
}

func pendingMedia(server, id, user string, expires time.Time) storage.Media {
	return storage.Media{
		ServerName: server,
		MediaID:    id,
		State:      storage.StatePending,
		UserID:     user,
		CreatedAt:  t0,
		ExpiresAt:  expires,
	}
}

func withState(m storage.Media, s storage.MediaState) storage.Media {
	m.State = s
	return m
}

// ---- assertions ----

func mustNil(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: unexpected error: %v", what, err)
	}
}

// errOf drops the record RecordBlob returns, for calls that only check its
// error.
func errOf(_ storage.BlobRecord, err error) error { return err }

func mustIs(t *testing.T, what string, err, want error) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("%s: error = %v, want one wrapping %q", what, err, want)
	}
}

func equalTime(a, b time.Time) bool {
	return a.IsZero() && b.IsZero() || a.Equal(b)
}

func equalBlob(t *testing.T, got, want storage.BlobRecord) {
	t.Helper()
	if got.SHA256 != want.SHA256 || got.Size != want.Size || got.PrefixSHA256 != want.PrefixSHA256 ||
		got.Datastore != want.Datastore || !equalTime(got.CreatedAt, want.CreatedAt) {
		t.Fatalf("blob record:\n got  %+v\n want %+v", got, want)
	}
}

func equalMedia(t *testing.T, got, want storage.Media) {
	t.Helper()
	if got.ServerName != want.ServerName || got.MediaID != want.MediaID || got.State != want.State ||
		got.UserID != want.UserID || got.SHA256 != want.SHA256 || got.Size != want.Size ||
		got.ContentType != want.ContentType || got.Filename != want.Filename ||
		!equalTime(got.CreatedAt, want.CreatedAt) || !equalTime(got.UploadedAt, want.UploadedAt) ||
		!equalTime(got.ExpiresAt, want.ExpiresAt) || got.Remote != want.Remote {
		t.Fatalf("media:\n got  %+v\n want %+v", got, want)
	}
}

// ---- tests ----

func testBlobs(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a, b := blobRecord("a"), blobRecord("b")
	b.Size = a.Size // same size, different prefix
	got, err := s.RecordBlob(ctx, a)
	mustNil(t, "RecordBlob(a)", err)
	equalBlob(t, got, a) // a new record is returned as recorded
	mustNil(t, "RecordBlob(b)", errOf(s.RecordBlob(ctx, b)))

	got, err = s.GetBlob(ctx, a.SHA256)
	mustNil(t, "GetBlob(a)", err)
	equalBlob(t, got, a)

	_, err = s.GetBlob(ctx, hash("unknown"))
	mustIs(t, "GetBlob(unknown)", err, storage.ErrNotFound)

	got, err = s.FindBlobByPrefix(ctx, b.Size, b.PrefixSHA256)
	mustNil(t, "FindBlobByPrefix(b)", err)
	equalBlob(t, got, b)
	_, err = s.FindBlobByPrefix(ctx, a.Size+1, a.PrefixSHA256)
	mustIs(t, "FindBlobByPrefix(wrong size)", err, storage.ErrNotFound)
	_, err = s.FindBlobByPrefix(ctx, a.Size, hash("other prefix"))
	mustIs(t, "FindBlobByPrefix(wrong prefix)", err, storage.ErrNotFound)

	// Recording a known hash again is a no-op that keeps the first record.
	again := a
	again.Datastore = "elsewhere"
	again.CreatedAt = t0.Add(time.Hour)
	got, err = s.RecordBlob(ctx, again)
	mustNil(t, "RecordBlob(a again)", err)
	equalBlob(t, got, a) // the first record, not the one passed
	// A claim older than the last one moves nothing and still returns the
	// record.
	older := a
	older.Datastore = "elsewhere"
	older.CreatedAt = t0.Add(-time.Hour)
	got, err = s.RecordBlob(ctx, older)
	mustNil(t, "RecordBlob(a with an older claim)", err)
	equalBlob(t, got, a)
	got, err = s.GetBlob(ctx, a.SHA256)
	mustNil(t, "GetBlob(a) after re-record", err)
	equalBlob(t, got, a)
}

func testCountBlobReferences(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	a, b := blobRecord("a"), blobRecord("b")
	mustNil(t, "RecordBlob(a)", errOf(s.RecordBlob(ctx, a)))
	mustNil(t, "RecordBlob(b)", errOf(s.RecordBlob(ctx, b)))
	count := func(sha string, want int64) {
		t.Helper()
		n, err := s.CountBlobReferences(ctx, sha)
		mustNil(t, "CountBlobReferences", err)
		if n != want {
			t.Fatalf("CountBlobReferences(%s) = %d, want %d", sha[:8], n, want)
		}
	}
	count(a.SHA256, 0)
	count(hash("never recorded"), 0)
	mustNil(t, "InsertMedia(m1)", s.InsertMedia(ctx, readyMedia("one.example", "m1", a)))
	mustNil(t, "InsertMedia(m2)", s.InsertMedia(ctx, readyMedia("two.example", "m1", a)))
	mustNil(t, "InsertMedia(m3)", s.InsertMedia(ctx, readyMedia("one.example", "m3", b)))
	mustNil(t, "CreatePending(p)", s.CreatePending(ctx, pendingMedia("one.example", "p", "@bob:one.example", t0.Add(time.Hour)), 0))
	count(a.SHA256, 2)
	count(b.SHA256, 1)
	c := readyMedia("one.example", "p", a)
	c.UserID = "@bob:one.example"
	mustNil(t, "CompletePending(p)", s.CompletePending(ctx, c))
	count(a.SHA256, 3)
}

func testInsertAndGetMedia(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	b := blobRecord("x")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	m := readyMedia("example.org", "abcDEF123_-", b)
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	got, err := s.GetMedia(ctx, m.ServerName, m.MediaID)
	mustNil(t, "GetMedia", err)
	equalMedia(t, got, m)

	dup := m
	dup.ContentType = "text/plain"
	dup.UserID = "@mallory:example.org"
	mustIs(t, "InsertMedia(duplicate)", s.InsertMedia(ctx, dup), storage.ErrConflict)
	got, err = s.GetMedia(ctx, m.ServerName, m.MediaID)
	mustNil(t, "GetMedia after duplicate", err)
	equalMedia(t, got, m)

	// The same media ID on another server is another item.
	other := readyMedia("other.example", m.MediaID, b)
	other.Filename = "other"
	mustNil(t, "InsertMedia(other server)", s.InsertMedia(ctx, other))
	got, err = s.GetMedia(ctx, other.ServerName, other.MediaID)
	mustNil(t, "GetMedia(other server)", err)
	equalMedia(t, got, other)

	for _, k := range [][2]string{
		{"example.org", "missing"},
		{"nowhere.example", m.MediaID},
		{"", ""},
	} {
		_, err := s.GetMedia(ctx, k[0], k[1])
		mustIs(t, fmt.Sprintf("GetMedia(%q, %q)", k[0], k[1]), err, storage.ErrNotFound)
	}
	// Media IDs are case-sensitive.
	_, err = s.GetMedia(ctx, m.ServerName, strings.ToLower(m.MediaID))
	mustIs(t, "GetMedia(lowercased ID)", err, storage.ErrNotFound)
}

func testMediaRoundTrip(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	b := blobRecord("rt")
	b.Size = 1<<40 + 7 // beyond 32 bits
	b.CreatedAt = t0.Add(789 * time.Millisecond)
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	got, err := s.GetBlob(ctx, b.SHA256)
	mustNil(t, "GetBlob", err)
	equalBlob(t, got, b)

	longType := "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet; name=\"" +
		strings.Repeat("ÿ-long-parameter-", 200) + "\""
	tests := []struct {
		name string
		m    storage.Media
		want storage.Media // zero: same as m
	}{
		{
			name: "unicode and long strings",
			m: storage.Media{
				ServerName: "matrix.例え.jp:8448", MediaID: "unicode", State: storage.StateReady,
				UserID: "@ünïcødé:matrix.例え.jp:8448", SHA256: b.SHA256, Size: b.Size,
				ContentType: longType, Filename: "naïve 😀 файл \"quoted\" 'single' ;=,.png",
				CreatedAt: t0, UploadedAt: t0.Add(1500 * time.Millisecond),
			},
		},
		{
			name: "remote without user or filename",
			m: storage.Media{
				ServerName: "remote.example", MediaID: "remote", State: storage.StateReady,
				SHA256: b.SHA256, Size: b.Size, ContentType: "video/mp4",
				CreatedAt: t0, UploadedAt: t0, Remote: true,
			},
		},
		{
			name: "zero times stay zero",
			m: storage.Media{
				ServerName: "example.org", MediaID: "zerotimes", State: storage.StateReady,
				UserID: "@a:example.org", SHA256: b.SHA256, Size: 0,
			},
		},
		{
			name: "sub-millisecond parts are truncated",
			m: storage.Media{
				ServerName: "example.org", MediaID: "precision", State: storage.StateReady,
				UserID: "@a:example.org", SHA256: b.SHA256, Size: 1, ContentType: "text/plain",
				CreatedAt:  t0.Add(999_999 * time.Nanosecond),
				UploadedAt: t0.Add(time.Millisecond + 1),
			},
			want: storage.Media{
				ServerName: "example.org", MediaID: "precision", State: storage.StateReady,
				UserID: "@a:example.org", SHA256: b.SHA256, Size: 1, ContentType: "text/plain",
				CreatedAt:  t0,
				UploadedAt: t0.Add(time.Millisecond),
			},
		},
		{
			name: "empty state means ready",
			m: storage.Media{
				ServerName: "example.org", MediaID: "nostate",
				UserID: "@a:example.org", SHA256: b.SHA256, Size: 5, ContentType: "text/plain",
				CreatedAt: time.Date(2001, 2, 3, 4, 5, 6, 7_000_000, time.FixedZone("X", 3600)),
			},
			want: storage.Media{
				ServerName: "example.org", MediaID: "nostate", State: storage.StateReady,
				UserID: "@a:example.org", SHA256: b.SHA256, Size: 5, ContentType: "text/plain",
				CreatedAt: time.Date(2001, 2, 3, 3, 5, 6, 7_000_000, time.UTC),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mustNil(t, "InsertMedia", s.InsertMedia(ctx, tt.m))
			got, err := s.GetMedia(ctx, tt.m.ServerName, tt.m.MediaID)
			mustNil(t, "GetMedia", err)
			want := tt.want
			if want.MediaID == "" {
				want = tt.m
			}
			equalMedia(t, got, want)
		})
	}
}

func testCreatePending(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	p := pendingMedia("example.org", "pend1", "@alice:example.org", t0.Add(24*time.Hour))
	p.ContentType = "ignored/until-upload"
	mustNil(t, "CreatePending", s.CreatePending(ctx, p, 10))
	got, err := s.GetMedia(ctx, p.ServerName, p.MediaID)
	mustNil(t, "GetMedia", err)
	if got.State != storage.StatePending || got.UserID != p.UserID || got.SHA256 != "" || got.Size != 0 ||
		!got.UploadedAt.IsZero() || !got.ExpiresAt.Equal(p.ExpiresAt) || !got.CreatedAt.Equal(p.CreatedAt) || got.Remote {
		t.Fatalf("pending item = %+v, want pending of %s, created %v, expiring %v, no content", got, p.UserID, p.CreatedAt, p.ExpiresAt)
	}

	// Duplicate IDs conflict, whoever asks, and leave the original alone.
	dup := p
	dup.UserID = "@bob:example.org"
	mustIs(t, "CreatePending(duplicate)", s.CreatePending(ctx, dup, 10), storage.ErrConflict)
	got, err = s.GetMedia(ctx, p.ServerName, p.MediaID)
	mustNil(t, "GetMedia after duplicate", err)
	if got.UserID != p.UserID {
		t.Fatalf("duplicate CreatePending changed the owner to %q", got.UserID)
	}
	// An ID taken by a ready item conflicts too.
	b := blobRecord("cp")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, readyMedia("example.org", "taken", b)))
	taken := pendingMedia("example.org", "taken", "@alice:example.org", t0.Add(time.Hour))
	mustIs(t, "CreatePending(ID of ready item)", s.CreatePending(ctx, taken, 10), storage.ErrConflict)
	got, err = s.GetMedia(ctx, "example.org", "taken")
	mustNil(t, "GetMedia(taken)", err)
	if got.State != storage.StateReady {
		t.Fatalf("CreatePending over a ready item changed its state to %q", got.State)
	}
}

func testPendingLimit(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	const alice, bob = "@alice:a.example", "@bob:a.example"
	create := func(server, id, user string, created, expires time.Time, limit int) error {
		m := pendingMedia(server, id, user, expires)
		m.CreatedAt = created
		return s.CreatePending(ctx, m, limit)
	}
	later := t0.Add(time.Hour)

	// Two of alice's reservations have expired by t0: they do not count.
	mustNil(t, "create expired 1", create("a.example", "old1", alice, t0.Add(-2*time.Hour), t0.Add(-time.Minute), 3))
	mustNil(t, "create expired 2", create("a.example", "old2", alice, t0.Add(-2*time.Hour), t0, 3)) // expires exactly at t0
	for i := range 3 {
		mustNil(t, fmt.Sprintf("create %d", i), create("a.example", fmt.Sprintf("a%d", i), alice, t0, later, 3))
	}
	mustIs(t, "create over the limit", create("a.example", "a3", alice, t0, later, 3), storage.ErrLimitExceeded)
	if _, err := s.GetMedia(ctx, "a.example", "a3"); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("refused reservation was stored (GetMedia error %v)", err)
	}
	// A higher limit lets the same request through.
	mustNil(t, "create with limit 4", create("a.example", "a3", alice, t0, later, 4))
	mustIs(t, "create over limit 4", create("a.example", "a4", alice, t0, later, 4), storage.ErrLimitExceeded)

	// Other users and other servers have their own counts.
	mustNil(t, "other user", create("a.example", "b0", bob, t0, later, 1))
	mustNil(t, "same user, other server", create("b.example", "a0", alice, t0, later, 1))
	mustIs(t, "other user over limit 1", create("a.example", "b1", bob, t0, later, 1), storage.ErrLimitExceeded)

	// Once alice's reservations expire, she may reserve again.
	mustNil(t, "after expiry", create("a.example", "a5", alice, later, later.Add(time.Hour), 4))

	// Completing a reservation frees its slot.
	b := blobRecord("limit")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	c := readyMedia("a.example", "b0", b)
	c.UserID = bob
	c.UploadedAt = t0.Add(time.Minute)
	mustNil(t, "CompletePending(b0)", s.CompletePending(ctx, c))
	mustNil(t, "bob after completing", create("a.example", "b1", bob, t0, later, 1))

	// maxPending <= 0 means no limit.
	for i := range 12 {
		mustNil(t, fmt.Sprintf("unlimited %d", i), create("c.example", fmt.Sprintf("u%d", i), alice, t0, later, 0))
	}
	mustNil(t, "negative limit", create("c.example", "neg", alice, t0, later, -1))
}

func testOldestPendingExpiry(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	const alice = "@alice:example.org"
	_, err := s.OldestPendingExpiry(ctx, "example.org", alice, t0)
	mustIs(t, "OldestPendingExpiry(none)", err, storage.ErrNotFound)

	for _, p := range []storage.Media{
		pendingMedia("example.org", "p30m", alice, t0.Add(30*time.Minute)),
		pendingMedia("example.org", "p2h", alice, t0.Add(2*time.Hour)),
		pendingMedia("example.org", "p1h", alice, t0.Add(time.Hour+5*time.Millisecond)),
		pendingMedia("example.org", "bob", "@bob:example.org", t0.Add(time.Minute)),
		pendingMedia("other.example", "other", alice, t0.Add(time.Minute)),
	} {
		mustNil(t, "CreatePending "+p.MediaID, s.CreatePending(ctx, p, 0))
	}
	tests := []struct {
		now  time.Time
		want time.Time // zero: ErrNotFound
	}{
		{t0, t0.Add(30 * time.Minute)},
		{t0.Add(30*time.Minute - time.Millisecond), t0.Add(30 * time.Minute)},
		{t0.Add(30 * time.Minute), t0.Add(time.Hour + 5*time.Millisecond)}, // expiring exactly now is expired
		{t0.Add(45 * time.Minute), t0.Add(time.Hour + 5*time.Millisecond)},
		{t0.Add(90 * time.Minute), t0.Add(2 * time.Hour)},
		{t0.Add(2 * time.Hour), time.Time{}},
	}
	for _, tt := range tests {
		got, err := s.OldestPendingExpiry(ctx, "example.org", alice, tt.now)
		if tt.want.IsZero() {
			mustIs(t, fmt.Sprintf("OldestPendingExpiry(now=t0+%v)", tt.now.Sub(t0)), err, storage.ErrNotFound)
			continue
		}
		mustNil(t, "OldestPendingExpiry", err)
		if !got.Equal(tt.want) {
			t.Fatalf("OldestPendingExpiry(now=t0+%v) = t0+%v, want t0+%v", tt.now.Sub(t0), got.Sub(t0), tt.want.Sub(t0))
		}
	}

	// Completed items no longer count.
	b := blobRecord("ope")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	c := readyMedia("example.org", "p30m", b)
	c.UserID = alice
	c.UploadedAt = t0.Add(time.Minute)
	mustNil(t, "CompletePending", s.CompletePending(ctx, c))
	got, err := s.OldestPendingExpiry(ctx, "example.org", alice, t0)
	mustNil(t, "OldestPendingExpiry after complete", err)
	if want := t0.Add(time.Hour + 5*time.Millisecond); !got.Equal(want) {
		t.Fatalf("OldestPendingExpiry after complete = %v, want %v", got, want)
	}
}

func testCompletePending(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	const alice, bob = "@alice:example.org", "@bob:example.org"
	b := blobRecord("complete")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	expires := t0.Add(time.Hour)
	for _, id := range []string{"ok", "wronguser", "expired", "boundary"} {
		mustNil(t, "CreatePending "+id, s.CreatePending(ctx, pendingMedia("example.org", id, alice, expires), 0))
	}
	mustNil(t, "InsertMedia(ready)", s.InsertMedia(ctx, readyMedia("example.org", "ready", b)))

	upload := func(id, user string, at time.Time) storage.Media {
		return storage.Media{
			ServerName: "example.org", MediaID: id, UserID: user,
			SHA256: b.SHA256, Size: b.Size, ContentType: "image/jpeg", Filename: "é.jpg",
			UploadedAt: at,
		}
	}

	// Success.
	at := t0.Add(10*time.Minute + 7*time.Millisecond)
	mustNil(t, "CompletePending(ok)", s.CompletePending(ctx, upload("ok", alice, at)))
	got, err := s.GetMedia(ctx, "example.org", "ok")
	mustNil(t, "GetMedia(ok)", err)
	equalMedia(t, got, storage.Media{
		ServerName: "example.org", MediaID: "ok", State: storage.StateReady, UserID: alice,
		SHA256: b.SHA256, Size: b.Size, ContentType: "image/jpeg", Filename: "é.jpg",
		CreatedAt: t0, UploadedAt: at,
	})

	tests := []struct {
		name string
		m    storage.Media
		want error
	}{
		{"second completion", upload("ok", alice, at.Add(time.Second)), storage.ErrConflict},
		{"another user's item", upload("wronguser", bob, at), storage.ErrConflict},
		{"expired item", upload("expired", alice, expires.Add(time.Millisecond)), storage.ErrNotFound},
		{"expiring exactly at upload", upload("boundary", alice, expires), storage.ErrNotFound},
		{"unknown item", upload("unknown", alice, at), storage.ErrNotFound},
		{"unknown server", storage.Media{ServerName: "x.example", MediaID: "ok", UserID: alice, SHA256: b.SHA256, UploadedAt: at}, storage.ErrNotFound},
		{"ready item", upload("ready", "@alice:example.org", at), storage.ErrConflict},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, beforeErr := s.GetMedia(ctx, tt.m.ServerName, tt.m.MediaID)
			mustIs(t, "CompletePending", s.CompletePending(ctx, tt.m), tt.want)
			after, afterErr := s.GetMedia(ctx, tt.m.ServerName, tt.m.MediaID)
			if (beforeErr == nil) != (afterErr == nil) {
				t.Fatalf("refused CompletePending changed GetMedia's error from %v to %v", beforeErr, afterErr)
			}
			if beforeErr == nil {
				equalMedia(t, after, before)
			}
		})
	}
	// The refused owner can still complete the item that another user could not.
	mustNil(t, "CompletePending(wronguser) by owner", s.CompletePending(ctx, upload("wronguser", alice, at)))
}

func testDeleteExpiredPending(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	const alice = "@alice:example.org"
	b := blobRecord("del")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	n, err := s.DeleteExpiredPending(ctx, t0)
	mustNil(t, "DeleteExpiredPending(empty)", err)
	if n != 0 {
		t.Fatalf("DeleteExpiredPending on an empty store = %d, want 0", n)
	}
	for _, p := range []storage.Media{
		pendingMedia("example.org", "gone1", alice, t0.Add(-time.Hour)),
		pendingMedia("other.example", "gone2", "@bob:other.example", t0.Add(-time.Millisecond)),
		pendingMedia("example.org", "gone3", alice, t0), // expiring exactly now
		pendingMedia("example.org", "kept", alice, t0.Add(time.Millisecond)),
		pendingMedia("example.org", "done", alice, t0.Add(time.Minute)),
	} {
		mustNil(t, "CreatePending "+p.MediaID, s.CreatePending(ctx, p, 0))
	}
	c := upload(b, "example.org", "done", alice, t0)
	mustNil(t, "CompletePending(done)", s.CompletePending(ctx, c))
	old := readyMedia("example.org", "oldready", b)
	old.CreatedAt = t0.Add(-48 * time.Hour)
	mustNil(t, "InsertMedia(old ready)", s.InsertMedia(ctx, old))

	n, err = s.DeleteExpiredPending(ctx, t0)
	mustNil(t, "DeleteExpiredPending", err)
	if n != 3 {
		t.Fatalf("DeleteExpiredPending = %d, want 3", n)
	}
	for _, k := range [][2]string{{"example.org", "gone1"}, {"other.example", "gone2"}, {"example.org", "gone3"}} {
		_, err := s.GetMedia(ctx, k[0], k[1])
		mustIs(t, "GetMedia("+k[1]+")", err, storage.ErrNotFound)
	}
	for _, id := range []string{"kept", "done", "oldready"} {
		_, err := s.GetMedia(ctx, "example.org", id)
		mustNil(t, "GetMedia("+id+")", err)
	}
	n, err = s.DeleteExpiredPending(ctx, t0)
	mustNil(t, "DeleteExpiredPending again", err)
	if n != 0 {
		t.Fatalf("second DeleteExpiredPending = %d, want 0", n)
	}
	// A deleted reservation's ID can be reserved again.
	mustNil(t, "CreatePending(gone1) again", s.CreatePending(ctx, pendingMedia("example.org", "gone1", alice, t0.Add(time.Hour)), 0))
}

func upload(b storage.BlobRecord, server, id, user string, at time.Time) storage.Media {
	return storage.Media{
		ServerName: server, MediaID: id, UserID: user,
		SHA256: b.SHA256, Size: b.Size, ContentType: "application/octet-stream", UploadedAt: at,
	}
}

func testConcurrentCreatePending(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	const goroutines, limit = 20, 5
	users := []string{"@alice:example.org", "@bob:example.org"}
	errs := make([][]error, len(users))
	var wg sync.WaitGroup
	for u, user := range users {
		errs[u] = make([]error, goroutines)
		for i := range goroutines {
			wg.Go(func() {
				p := pendingMedia("example.org", fmt.Sprintf("u%d-%d", u, i), user, t0.Add(time.Hour))
				errs[u][i] = s.CreatePending(ctx, p, limit)
			})
		}
	}
	wg.Wait()
	for u, user := range users {
		ok, limited := 0, 0
		for i, err := range errs[u] {
			switch {
			case err == nil:
				ok++
				got, gerr := s.GetMedia(ctx, "example.org", fmt.Sprintf("u%d-%d", u, i))
				mustNil(t, "GetMedia of a created reservation", gerr)
				if got.State != storage.StatePending || got.UserID != user {
					t.Fatalf("created reservation = %+v", got)
				}
			case errors.Is(err, storage.ErrLimitExceeded):
				limited++
				_, gerr := s.GetMedia(ctx, "example.org", fmt.Sprintf("u%d-%d", u, i))
				mustIs(t, "GetMedia of a refused reservation", gerr, storage.ErrNotFound)
			default:
				t.Fatalf("CreatePending for %s: unexpected error %v", user, err)
			}
		}
		if ok != limit || limited != goroutines-limit {
			t.Fatalf("%s: %d succeeded and %d hit the limit, want %d and %d", user, ok, limited, limit, goroutines-limit)
		}
	}
}

func testConcurrentCompletePending(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	const goroutines = 10
	const alice = "@alice:example.org"
	mustNil(t, "CreatePending", s.CreatePending(ctx, pendingMedia("example.org", "race", alice, t0.Add(time.Hour)), 0))
	blobs := make([]storage.BlobRecord, goroutines)
	for i := range blobs {
		blobs[i] = blobRecord(fmt.Sprintf("race%d", i))
		mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, blobs[i])))
	}
	errs := make([]error, goroutines)
	var wg sync.WaitGroup
	for i := range goroutines {
		wg.Go(func() {
			errs[i] = s.CompletePending(ctx, upload(blobs[i], "example.org", "race", alice, t0.Add(time.Minute)))
		})
	}
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if winner >= 0 {
				t.Fatalf("CompletePending succeeded in goroutines %d and %d", winner, i)
			}
			winner = i
		case !errors.Is(err, storage.ErrConflict):
			t.Fatalf("goroutine %d: error %v, want one wrapping ErrConflict", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no CompletePending succeeded")
	}
	got, err := s.GetMedia(ctx, "example.org", "race")
	mustNil(t, "GetMedia", err)
	if got.State != storage.StateReady || got.SHA256 != blobs[winner].SHA256 {
		t.Fatalf("item = %+v, want ready with the winner's blob %s", got, blobs[winner].SHA256)
	}
	for i, b := range blobs {
		n, err := s.CountBlobReferences(ctx, b.SHA256)
		mustNil(t, "CountBlobReferences", err)
		if want := int64(0); i == winner {
			want = 1
			if n != want {
				t.Fatalf("winner's blob has %d references, want 1", n)
			}
		} else if n != want {
			t.Fatalf("loser %d's blob has %d references, want 0", i, n)
		}
	}
}

// recordIn records n blobs with the given seed prefix in datastore and
// returns them sorted by hash.
func recordIn(t *testing.T, s storage.MetadataStore, datastore, seed string, n int) []storage.BlobRecord {
	t.Helper()
	out := make([]storage.BlobRecord, n)
	for i := range out {
		b := blobRecord(fmt.Sprintf("%s-%d", seed, i))
		b.Datastore = datastore
		b.Size = int64(i) * 1000
		mustNil(t, "RecordBlob", errOf(s.RecordBlob(context.Background(), b)))
		out[i] = b
	}
	slices.SortFunc(out, func(a, b storage.BlobRecord) int { return strings.Compare(a.SHA256, b.SHA256) })
	return out
}

func testListBlobs(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	inA := recordIn(t, s, "a", "list-a", 7)
	recordIn(t, s, "b", "list-b", 3)

	// Paging by the last hash visits every blob of "a" once, in order.
	var got []storage.BlobRecord
	after := ""
	for pages := 0; ; pages++ {
		if pages > 10 {
			t.Fatal("ListBlobs paging does not end")
		}
		page, err := s.ListBlobs(ctx, "a", after, 3)
		mustNil(t, "ListBlobs", err)
		if len(page) > 3 {
			t.Fatalf("ListBlobs(limit 3) returned %d records", len(page))
		}
		if len(page) == 0 {
			break
		}
		got = append(got, page...)
		after = page[len(page)-1].SHA256
	}
	if len(got) != len(inA) {
		t.Fatalf("paged ListBlobs returned %d records, want %d", len(got), len(inA))
	}
	for i := range got {
		equalBlob(t, got[i], inA[i])
	}

	// The cursor is exclusive; a large limit returns the rest.
	rest, err := s.ListBlobs(ctx, "a", inA[2].SHA256, 100)
	mustNil(t, "ListBlobs(after third)", err)
	if len(rest) != 4 || rest[0].SHA256 != inA[3].SHA256 || rest[3].SHA256 != inA[6].SHA256 {
		t.Fatalf("ListBlobs after the third hash = %d records starting %v, want the last 4", len(rest), rest)
	}
	for _, tt := range []struct {
		name, datastore, after string
		limit                  int
	}{
		{"after the last", "a", inA[6].SHA256, 10},
		{"unknown datastore", "nowhere", "", 10},
		{"zero limit", "a", "", 0},
	} {
		recs, err := s.ListBlobs(ctx, tt.datastore, tt.after, tt.limit)
		mustNil(t, "ListBlobs("+tt.name+")", err)
		if len(recs) != 0 {
			t.Fatalf("ListBlobs(%s) = %d records, want none", tt.name, len(recs))
		}
	}
}

func testCountBlobs(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	check := func(datastore string, wantCount, wantBytes int64) {
		t.Helper()
		n, size, err := s.CountBlobs(ctx, datastore)
		mustNil(t, "CountBlobs", err)
		if n != wantCount || size != wantBytes {
			t.Fatalf("CountBlobs(%s) = %d blobs, %d bytes; want %d, %d", datastore, n, size, wantCount, wantBytes)
		}
	}
	check("a", 0, 0)
	recordIn(t, s, "a", "count-a", 4) // sizes 0, 1000, 2000, 3000
	big := blobRecord("count-big")
	big.Datastore = "a"
	big.Size = 1<<40 + 5
	mustNil(t, "RecordBlob(big)", errOf(s.RecordBlob(ctx, big)))
	recordIn(t, s, "b", "count-b", 2)
	check("a", 5, 6000+1<<40+5)
	check("b", 2, 1000)
	check("nowhere", 0, 0)
}

func testMoveBlob(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	blobs := recordIn(t, s, "a", "move", 3)
	moved := blobs[1]
	mustNil(t, "MoveBlob", s.MoveBlob(ctx, moved.SHA256, "a", "b"))
	got, err := s.GetBlob(ctx, moved.SHA256)
	mustNil(t, "GetBlob after move", err)
	want := moved
	want.Datastore = "b"
	equalBlob(t, got, want)

	// The others stay; the listings and counts follow the move.
	for _, b := range []storage.BlobRecord{blobs[0], blobs[2]} {
		got, err := s.GetBlob(ctx, b.SHA256)
		mustNil(t, "GetBlob of an unmoved blob", err)
		equalBlob(t, got, b)
	}
	inB, err := s.ListBlobs(ctx, "b", "", 10)
	mustNil(t, "ListBlobs(b)", err)
	if len(inB) != 1 || inB[0].SHA256 != moved.SHA256 {
		t.Fatalf("ListBlobs(b) after move = %v, want only the moved blob", inB)
	}
	if n, size, err := s.CountBlobs(ctx, "a"); err != nil || n != 2 || size != blobs[0].Size+blobs[2].Size {
		t.Fatalf("CountBlobs(a) after move = %d, %d, %v", n, size, err)
	}

	// A move from the wrong datastore, of an unknown blob, or repeated, fails
	// and changes nothing.
	mustIs(t, "MoveBlob again", s.MoveBlob(ctx, moved.SHA256, "a", "c"), storage.ErrNotFound)
	mustIs(t, "MoveBlob(unknown)", s.MoveBlob(ctx, hash("unknown"), "a", "b"), storage.ErrNotFound)
	got, err = s.GetBlob(ctx, moved.SHA256)
	mustNil(t, "GetBlob after refused move", err)
	equalBlob(t, got, want)

	// Concurrent moves of the same blob: exactly one wins.
	const movers = 8
	errs := make([]error, movers)
	var wg sync.WaitGroup
	for i := range movers {
		wg.Go(func() { errs[i] = s.MoveBlob(ctx, blobs[0].SHA256, "a", fmt.Sprintf("t%d", i)) })
	}
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Fatalf("MoveBlob succeeded in goroutines %d and %d", winner, i)
		case err == nil:
			winner = i
		case !errors.Is(err, storage.ErrNotFound):
			t.Fatalf("concurrent MoveBlob %d: %v, want ErrNotFound", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no concurrent MoveBlob succeeded")
	}
	got, err = s.GetBlob(ctx, blobs[0].SHA256)
	mustNil(t, "GetBlob after concurrent moves", err)
	if want := fmt.Sprintf("t%d", winner); got.Datastore != want {
		t.Fatalf("datastore after concurrent moves = %q, want the winner's %q", got.Datastore, want)
	}
}

func testMediaDatastore(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	b := blobRecord("ds")
	b.Datastore = "local-disk"
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	ready := readyMedia("example.org", "ready", b)
	ready.Datastore = "ignored on write"
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, ready))
	p := pendingMedia("example.org", "pending", "@alice:example.org", t0.Add(time.Hour))
	mustNil(t, "CreatePending", s.CreatePending(ctx, p, 0))

	datastore := func(id, want string) {
		t.Helper()
		got, err := s.GetMedia(ctx, "example.org", id)
		mustNil(t, "GetMedia("+id+")", err)
		if got.Datastore != want {
			t.Fatalf("GetMedia(%s).Datastore = %q, want %q", id, got.Datastore, want)
		}
	}
	datastore("ready", "local-disk")
	datastore("pending", "")

	c := upload(b, "example.org", "pending", "@alice:example.org", t0.Add(time.Minute))
	mustNil(t, "CompletePending", s.CompletePending(ctx, c))
	datastore("pending", "local-disk")

	mustNil(t, "MoveBlob", s.MoveBlob(ctx, b.SHA256, "local-disk", "s3"))
	datastore("ready", "s3")
	datastore("pending", "s3")
	// Every other field is still read correctly alongside the join.
	got, err := s.GetMedia(ctx, "example.org", "ready")
	mustNil(t, "GetMedia(ready)", err)
	equalMedia(t, got, readyMedia("example.org", "ready", b))
}

func testThumbnails(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	src, th1, th2 := blobRecord("source"), blobRecord("thumb-1"), blobRecord("thumb-2")
	th2.Datastore = "other"
	for _, b := range []storage.BlobRecord{src, th1, th2} {
		mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	}
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, readyMedia("example.org", "pic", src)))
	key := storage.ThumbnailKey{ServerName: "example.org", MediaID: "pic", Width: 320, Height: 240, Method: "scale"}
	if _, err := s.GetThumbnail(ctx, key); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("GetThumbnail before insert: %v, want ErrNotFound", err)
	}
	want := storage.Thumbnail{ThumbnailKey: key, ContentType: "image/jpeg", SHA256: th1.SHA256, Size: th1.Size, ActualWidth: 320, ActualHeight: 180, CreatedAt: t0}
	mustNil(t, "InsertThumbnail", s.InsertThumbnail(ctx, want))
	dup := want
	dup.SHA256 = th2.SHA256
	if err := s.InsertThumbnail(ctx, dup); !errors.Is(err, storage.ErrConflict) {
		t.Fatalf("InsertThumbnail of an existing key: %v, want ErrConflict", err)
	}
	got, err := s.GetThumbnail(ctx, key)
	mustNil(t, "GetThumbnail", err)
	want.Datastore = th1.Datastore
	if got != want {
		t.Fatalf("GetThumbnail = %+v, want %+v", got, want)
	}
	// Every key field matters.
	variants := []func(k *storage.ThumbnailKey){
		func(k *storage.ThumbnailKey) { k.Width = 321 },
		func(k *storage.ThumbnailKey) { k.Height = 241 },
		func(k *storage.ThumbnailKey) { k.Method = "crop" },
		func(k *storage.ThumbnailKey) { k.Animated = true },
		func(k *storage.ThumbnailKey) { k.Format = "webp" },
		func(k *storage.ThumbnailKey) { k.MediaID = "other" },
		func(k *storage.ThumbnailKey) { k.ServerName = "example.net" },
	}
	for i, v := range variants {
		k := key
		v(&k)
		if _, err := s.GetThumbnail(ctx, k); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("variant %d found: %v", i, err)
		}
	}
	animated := storage.Thumbnail{ThumbnailKey: key, SHA256: th2.SHA256, Size: th2.Size, ActualWidth: 96, ActualHeight: 96, CreatedAt: t0}
	animated.Animated, animated.ContentType = true, "image/webp"
	mustNil(t, "InsertThumbnail(animated)", s.InsertThumbnail(ctx, animated))
	got, err = s.GetThumbnail(ctx, animated.ThumbnailKey)
	mustNil(t, "GetThumbnail(animated)", err)
	if got.SHA256 != th2.SHA256 || got.Datastore != "other" || !got.Animated || got.ContentType != "image/webp" {
		t.Fatalf("animated thumbnail %+v", got)
	}
	// Thumbnails count as references to their blob.
	n, err := s.CountBlobReferences(ctx, th1.SHA256)
	mustNil(t, "CountBlobReferences", err)
	if n != 1 {
		t.Fatalf("CountBlobReferences(thumbnail blob) = %d, want 1", n)
	}
	// Unknown media or blob: refused by the store.
	orphan := want
	orphan.MediaID = "nope"
	if err := s.InsertThumbnail(ctx, orphan); err == nil {
		t.Fatal("InsertThumbnail for a media item that does not exist succeeded")
	}
	noBlob := want
	noBlob.Width, noBlob.SHA256 = 1, hash("unrecorded")
	if err := s.InsertThumbnail(ctx, noBlob); err == nil {
		t.Fatal("InsertThumbnail with an unrecorded blob succeeded")
	}
}
