package metatest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// lookup returns s as a storage.MediaLookup or fails the test.
func lookup(t *testing.T, s storage.MetadataStore) storage.MediaLookup {
	t.Helper()
	l, ok := s.(storage.MediaLookup)
	if !ok {
		t.Fatalf("%T does not implement storage.MediaLookup", s)
	}
	return l
}

// testLookupMedia checks that LookupMedia reports ready, pending and remote
// rows and tombstones, leaves out what the store does not hold, accepts
// duplicate refs, and answers for more refs than one statement names.
func testLookupMedia(t *testing.T, s storage.MetadataStore) {
	ctx := context.Background()
	l := lookup(t, s)
	b, other := blobRecord("l"), blobRecord("other")
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, b)))
	mustNil(t, "RecordBlob", errOf(s.RecordBlob(ctx, other)))
	ready := readyMedia("example.org", "ready", b)
	remote := remoteMedia("remote.example", "remote", other)
	pend := pendingMedia("example.org", "pend", "@alice:example.org", t0.Add(time.Hour))
	gone := readyMedia("example.org", "gone", b)
	for _, m := range []storage.Media{ready, remote, gone} {
		mustNil(t, "InsertMedia", s.InsertMedia(ctx, m))
	}
	mustNil(t, "CreatePending", s.CreatePending(ctx, pend, 0))
	_, err := admin(t, s).DeleteMedia(ctx, []storage.MediaRef{ref(gone)}, true, t0)
	mustNil(t, "DeleteMedia", err)
	// The same media ID on another server is another item.
	reissued := readyMedia("other.example", "gone", other)
	mustNil(t, "InsertMedia", s.InsertMedia(ctx, reissued))

	absent := storage.MediaRef{ServerName: "example.org", MediaID: "absent"}
	got, err := l.LookupMedia(ctx, []storage.MediaRef{ref(ready), ref(remote), ref(pend), ref(gone), ref(reissued), absent, ref(ready)})
	mustNil(t, "LookupMedia", err)
	want := map[storage.MediaRef]storage.MediaPresence{
		ref(ready):    {State: storage.StateReady, SHA256: b.SHA256, Size: b.Size},
		ref(remote):   {State: storage.StateReady, SHA256: other.SHA256, Size: other.Size},
		ref(pend):     {State: storage.StatePending},
		ref(gone):     {Deleted: true},
		ref(reissued): {State: storage.StateReady, SHA256: other.SHA256, Size: other.Size},
	}
	equalPresence(t, got, want)

	got, err = l.LookupMedia(ctx, nil)
	mustNil(t, "LookupMedia(nil)", err)
	equalPresence(t, got, map[storage.MediaRef]storage.MediaPresence{})

	// More refs than any one statement should name: every 7th exists.
	var refs []storage.MediaRef
	want = map[storage.MediaRef]storage.MediaPresence{}
	for i := range 1500 {
		r := storage.MediaRef{ServerName: "bulk.example", MediaID: fmt.Sprintf("m%04d", i)}
		refs = append(refs, r)
		if i%7 == 0 {
			mustNil(t, "InsertMedia", s.InsertMedia(ctx, readyMedia(r.ServerName, r.MediaID, b)))
			want[r] = storage.MediaPresence{State: storage.StateReady, SHA256: b.SHA256, Size: b.Size}
		}
	}
	got, err = l.LookupMedia(ctx, refs)
	mustNil(t, "LookupMedia(bulk)", err)
	equalPresence(t, got, want)
}

func equalPresence(t *testing.T, got, want map[storage.MediaRef]storage.MediaPresence) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("LookupMedia gave %d refs, want %d", len(got), len(want))
	}
	for r, w := range want {
		if g, ok := got[r]; !ok || g != w {
			t.Errorf("LookupMedia[%v] = %+v (present %v), want %+v", r, g, ok, w)
		}
	}
	for r := range got {
		if _, ok := want[r]; !ok {
			t.Errorf("LookupMedia reports %v, which the store does not hold", r)
		}
	}
}
