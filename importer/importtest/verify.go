package importtest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"maps"
	"path"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Expect is what an import must make of one item a source lists.
type Expect struct {
	// Item is the item as the source lists it (Open is not used).
	Item importer.Item
	// Body is the source's bytes for the item: what the target must hold
	// when it is imported; for a mismatched item, the wrong bytes that must
	// never be stored. Nil when the source has none.
	Body []byte
	// Problem is how the import reports the item; empty when it imports
	// it.
	Problem importer.ProblemKind
}

// imported reports whether the import stores the item.
func (e Expect) imported() bool { return e.Problem == "" }

// defaultContentType is what StoreSink stores for an item without one.
const defaultContentType = "application/octet-stream"

// CheckImported checks a target after a complete import of expects:
//
//   - every imported item's row (GetMedia) carries every field of its
//     source item (server name, media ID, uploader, file name, content
//     type, creation time to the millisecond, remote flag, protection) and
//     the quarantine of its content, Refused() says whether it is served,
//     and its datastore holds its bytes, byte-exact;
//   - items that are not imported have no row, and bytes that did not match
//     the source's record no blob;
//   - quarantines carried over (of imported content, and by the recorded
//     hash of quarantined items whose bytes were missing) are recorded with
//     their actor, and no other content is quarantined;
//   - the datastores record each imported content exactly once, local
//     content in LocalStore and remote in RemoteStore, and hold exactly
//     those blobs (no file or object left behind).
func CheckImported(t testing.TB, tg *Target, expects []Expect) {
	t.Helper()
	quarantines := wantQuarantines(t, expects)
	stored := map[string]map[bool]bool{} // content hash → remote flags of its items
	for _, e := range expects {
		if e.imported() {
			sha := SHA256(e.Body)
			if stored[sha] == nil {
				stored[sha] = map[bool]bool{}
			}
			stored[sha][e.Item.Remote] = true
		}
	}
	rows := 0
	for _, e := range expects {
		if e.imported() {
			rows++
			checkStored(t, tg, e, quarantines[SHA256(e.Body)], stored[SHA256(e.Body)])
		} else {
			checkAbsent(t, tg, e, stored)
		}
	}
	if n := len(tg.Snapshot(t).Rows); n != rows {
		t.Errorf("the target holds %d media rows, want %d", n, rows)
	}
	checkQuarantines(t, tg, expects, quarantines)
	checkBlobs(t, tg, stored)
}

// wantQuarantines returns the quarantines an import must record, by
// content hash: of imported items' content, and of missing items' recorded
// hash.
func wantQuarantines(t testing.TB, expects []Expect) map[string]string {
	t.Helper()
	out := map[string]string{}
	add := func(sha, by string) {
		if prev, ok := out[sha]; ok && prev != by {
			t.Fatalf("the expectations quarantine content %s by both %q and %q: which is kept depends on the order", sha, prev, by)
		}
		out[sha] = by
	}
	for _, e := range expects {
		switch {
		case e.Item.QuarantinedBy == "":
		case e.imported():
			add(SHA256(e.Body), e.Item.QuarantinedBy)
		case e.Problem == importer.ProblemMissing && e.Item.SHA256 != "":
			add(e.Item.SHA256, e.Item.QuarantinedBy)
		}
	}
	return out
}

// checkStored checks the row and the bytes of an imported item; by is the
// quarantine of its content, remote the remote flags of the items sharing
// it.
func checkStored(t testing.TB, tg *Target, e Expect, by string, remote map[bool]bool) {
	t.Helper()
	ctx := context.Background()
	it := e.Item
	ref := "mxc://" + it.ServerName + "/" + it.MediaID
	m, err := tg.Meta.GetMedia(ctx, it.ServerName, it.MediaID)
	if err != nil {
		t.Errorf("%s: not stored: %v", ref, err)
		return
	}
	sha := SHA256(e.Body)
	want := storage.Media{
		ServerName: it.ServerName, MediaID: it.MediaID, State: storage.StateReady, UserID: it.UserID,
		SHA256: sha, Size: int64(len(e.Body)), ContentType: it.ContentType, Filename: it.Filename,
		CreatedAt: it.CreatedAt, UploadedAt: it.CreatedAt, Remote: it.Remote, Protected: it.Protected,
		Datastore: LocalStore, QuarantinedBy: by,
	}
	if it.Remote {
		want.UserID = ""
		if !remote[false] {
			want.Datastore = RemoteStore
		}
	}
	if remote[true] && remote[false] {
		// Shared by local and remote media: stored once, in the
		// datastore of whichever came first.
		want.Datastore = m.Datastore
	}
	if want.ContentType == "" {
		want.ContentType = defaultContentType
	}
	if by != "" {
		want.QuarantinedAt = Now()
	}
	if !EqualMedia(m, want) {
		t.Errorf("%s stored as\n%+v\nwant\n%+v", ref, m, want)
	}
	if m.CreatedAt.UnixMilli() != it.CreatedAt.UnixMilli() {
		t.Errorf("%s: created at %d ms, want %d ms", ref, m.CreatedAt.UnixMilli(), it.CreatedAt.UnixMilli())
	}
	if refused := by != "" && !it.Protected; m.Refused() != refused {
		t.Errorf("%s: Refused() = %v, want %v", ref, m.Refused(), refused)
	}
	store, ok := tg.Stores.Get(m.Datastore)
	if !ok {
		t.Errorf("%s: row names datastore %q, which does not exist", ref, m.Datastore)
		return
	}
	blob, err := store.Open(ctx, sha)
	if err != nil {
		t.Errorf("%s: its datastore %s lacks its blob: %v", ref, m.Datastore, err)
		return
	}
	body, err := io.ReadAll(blob.Content)
	blob.Content.Close()
	if err != nil || !bytes.Equal(body, e.Body) {
		t.Errorf("%s: its blob holds %d bytes (%v) that are not the %d of the source", ref, len(body), err, len(e.Body))
	}
}

// checkAbsent checks that an item the import refused has no row, and that
// bytes the import refused were not stored; stored are the hashes of
// imported content.
func checkAbsent(t testing.TB, tg *Target, e Expect, stored map[string]map[bool]bool) {
	t.Helper()
	ctx := context.Background()
	ref := "mxc://" + e.Item.ServerName + "/" + e.Item.MediaID
	if m, err := tg.Meta.GetMedia(ctx, e.Item.ServerName, e.Item.MediaID); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("%s (%s) is in the target: %+v, %v", ref, e.Problem, m, err)
	}
	var hashes []string
	if e.Body != nil {
		hashes = append(hashes, SHA256(e.Body))
	}
	if e.Item.SHA256 != "" {
		hashes = append(hashes, e.Item.SHA256)
	}
	for _, h := range hashes {
		if stored[h] != nil {
			continue
		}
		if _, err := tg.Meta.GetBlob(ctx, h); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("%s (%s): content %s is recorded as a blob: %v", ref, e.Problem, h, err)
		}
	}
}

// checkQuarantines checks that exactly the wanted quarantines of the
// expectations' hashes are recorded.
func checkQuarantines(t testing.TB, tg *Target, expects []Expect, want map[string]string) {
	t.Helper()
	ctx := context.Background()
	for _, h := range hashesOf(expects) {
		q, err := tg.Meta.GetQuarantine(ctx, h)
		by, wanted := want[h]
		switch {
		case !wanted && !errors.Is(err, storage.ErrNotFound):
			t.Errorf("content %s is quarantined (%+v, %v), want not", h, q, err)
		case wanted && err != nil:
			t.Errorf("content %s: no quarantine: %v", h, err)
		case wanted && (q.By != by || !q.At.Equal(Now())):
			t.Errorf("content %s quarantined by %q at %v, want %q at %v", h, q.By, q.At, by, Now())
		}
	}
}

// hashesOf lists every hash of the expectations: of their bodies and their
// recorded hashes, sorted.
func hashesOf(expects []Expect) []string {
	set := map[string]bool{}
	for _, e := range expects {
		if e.Body != nil {
			set[SHA256(e.Body)] = true
		}
		if e.Item.SHA256 != "" {
			set[e.Item.SHA256] = true
		}
	}
	return slices.Sorted(maps.Keys(set))
}

// checkBlobs checks that the datastores record each stored content exactly
// once and hold nothing else.
func checkBlobs(t testing.TB, tg *Target, stored map[string]map[bool]bool) {
	t.Helper()
	st := tg.Snapshot(t)
	seen := map[string]string{}
	records := 0
	for name, recs := range st.Blobs {
		for _, r := range recs {
			records++
			if prev, ok := seen[r.SHA256]; ok {
				t.Errorf("content %s recorded in %s and %s", r.SHA256, prev, name)
			}
			seen[r.SHA256] = name
		}
	}
	for h, remote := range stored {
		name, ok := seen[h]
		switch {
		case !ok:
			t.Errorf("content %s has no blob record", h)
		case remote[true] && remote[false]:
		case remote[true] && name != RemoteStore, remote[false] && name != LocalStore:
			t.Errorf("content %s stored in %s, want the datastore of its kind", h, name)
		}
	}
	for h := range seen {
		if stored[h] == nil {
			t.Errorf("blob %s recorded, but no imported item has that content", h)
		}
	}
	held := len(st.Objects)
	for p := range st.Files {
		if tg.strayCopy(p, seen, stored) {
			// storage.IngestTo interrupted between writing these bytes and
			// recording them, and the same content since recorded in the
			// other datastore: storage/gc leaves bytes held in one
			// datastore and recorded in another alone (see its package
			// doc), so this copy stays. Only content shared by local and
			// remote media can end so.
			t.Logf("stray copy %s of content recorded in %s", p, seen[path.Base(p)])
			continue
		}
		held++
	}
	if held != records || records != len(stored) {
		t.Errorf("the datastores hold %d files and objects and record %d blobs, want %d distinct contents: %v %v",
			held, records, len(stored), slices.Sorted(maps.Keys(st.Files)), st.Objects)
	}
}

// strayCopy reports whether the file p of a State's Files is a copy of
// content shared by local and remote items (stored) that sits in the file
// datastore its record (seen) does not name.
func (tg *Target) strayCopy(p string, seen map[string]string, stored map[string]map[bool]bool) bool {
	sha := path.Base(p)
	if kinds := stored[sha]; !kinds[true] || !kinds[false] {
		return false
	}
	i, err := strconv.Atoi(strings.SplitN(p, "/", 2)[0])
	return err == nil && i < len(tg.dirStores) && seen[sha] != "" && tg.dirStores[i] != seen[sha]
}
