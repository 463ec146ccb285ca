package importer_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// fixture is an import target: importtest.LocalStore for local media (a
// directory or S3), importtest.RemoteStore for remote media, and a
// StoreSink over them.
type fixture = importtest.Target

// dataset is a source's media: good ones, which an import stores, and bad
// ones, which it reports.
type dataset struct {
	good, bad []importtest.Media
	// quarantinedMissing is the recorded hash of a missing item whose
	// quarantine is carried over.
	quarantinedMissing string
}

// pattern returns n bytes that differ for every seed.
func pattern(seed string, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(uint64(len(seed)), uint64(seed[0])<<8|uint64(seed[len(seed)-1])))
	for i := range b {
		b[i] = byte(r.IntN(256))
	}
	copy(b, seed)
	return b
}

func newDataset() dataset {
	var d dataset
	sizes := []int{1, 10, 1000, 4096, 65535, 65536, 65537, 100_000, 300_000, 2}
	for i, n := range sizes {
		d.good = append(d.good, importtest.New("example.org", fmt.Sprintf("plain%02d", i), pattern(fmt.Sprintf("plain%02d", i), n)))
	}
	empty := importtest.New("example.org", "empty", nil)
	dup := pattern("dup", 70_000)
	dupA, dupB := importtest.New("example.org", "dupA", dup), importtest.New("example.org", "dupB", dup)
	dupB.UserID = "@bob:example.org"
	dupOther := importtest.New("other.example", "dupA", dup)
	unicode := importtest.New("example.org", "unicode", []byte("Grüße aus Köln\n"))
	unicode.Filename, unicode.ContentType = "Grüße 日本語 🎉.txt", "text/plain; charset=utf-8"
	bidi := importtest.New("example.org", "bidi", []byte("bidi"))
	bidi.Filename = "evil\u202egnp.exe"
	quar := importtest.New("example.org", "quar", pattern("quar", 5000))
	quar.QuarantinedBy = "@mod:example.org"
	protQ := importtest.New("example.org", "protq", pattern("protq", 5000))
	protQ.QuarantinedBy, protQ.Protected = "@mod:example.org", true
	prot := importtest.New("example.org", "prot", pattern("prot", 100))
	prot.Protected = true
	noHash := importtest.New("example.org", "nohash", pattern("nohash", 3000))
	noHash.SHA256 = ""
	badType := importtest.New("example.org", "badtype", []byte("x"))
	badType.ContentType, badType.Filename = "text/plain\r\nX-Evil: 1", "line\nbreak.txt"
	r1 := importtest.New("remote.example", "r1", pattern("r1", 20_000))
	r1.Remote, r1.UserID = true, ""
	r2 := importtest.New("remote.example", "r2", pattern("r2", 200))
	r2.Remote, r2.UserID, r2.QuarantinedBy = true, "", "imported from test"
	d.good = append(d.good, empty, dupA, dupB, dupOther, unicode, bidi, quar, protQ, prot, noHash, badType, r1, r2)

	missing := importtest.New("example.org", "missing", pattern("missing", 10))
	missing.Missing = true
	missingQ := importtest.New("example.org", "missingq", pattern("missingq", 10))
	missingQ.Missing, missingQ.QuarantinedBy = true, "@mod:example.org"
	d.quarantinedMissing = missingQ.SHA256
	mismatch := importtest.New("example.org", "mismatch", pattern("mismatch", 1000))
	mismatch.Body = pattern("mismatcH", 1000)
	short := importtest.New("example.org", "short", pattern("short", 1000))
	short.Size = 2000
	short.SHA256 = ""
	d.bad = []importtest.Media{missing, missingQ, mismatch, short}
	return d
}

// source returns a fresh source over every item of d, in a fixed mixed
// order.
func (d dataset) source() *importtest.Source {
	all := append(slices.Clone(d.good), d.bad...)
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(all), func(i, j int) { all[i], all[j] = all[j], all[i] })
	return &importtest.Source{Media: all}
}

// wantCounts is the report of a complete import of d into an empty target.
func (d dataset) wantCounts() importer.Counts {
	return importer.Counts{Imported: int64(len(d.good)), Missing: 2, Mismatched: 2}
}

var allRemote = importer.Options{Filter: importer.Filter{IncludeRemote: true}}

// hashes lists the content and recorded hashes of every item of d.
func (d dataset) hashes() []string {
	var out []string
	for _, m := range append(slices.Clone(d.good), d.bad...) {
		out = append(out, importtest.SHA256(m.Body), m.SHA256)
	}
	return out
}

// snapshot reads what fx holds, with the quarantines of d's hashes.
func snapshot(t *testing.T, fx *fixture, d dataset) importtest.State {
	t.Helper()
	return fx.Snapshot(t, d.hashes()...)
}

// checkImported checks every item of d against the target: each good item
// has its row with every field and its bytes, byte-exact, in the datastore
// of its kind; bad items have no row and their wrong bytes no blob; and the
// datastores hold exactly the good items' distinct contents.
func checkImported(t *testing.T, fx *fixture, d dataset) {
	t.Helper()
	ctx := context.Background()
	wantBlobs := map[string]map[string]bool{"media": {}, "remote": {}}
	for _, it := range d.good {
		m, err := fx.Meta.GetMedia(ctx, it.ServerName, it.MediaID)
		if err != nil {
			t.Errorf("%s/%s: %v", it.ServerName, it.MediaID, err)
			continue
		}
		sha := importtest.SHA256(it.Body)
		want := storage.Media{
			ServerName: it.ServerName, MediaID: it.MediaID, State: storage.StateReady, UserID: it.UserID,
			SHA256: sha, Size: int64(len(it.Body)), ContentType: it.ContentType, Filename: it.Filename,
			CreatedAt: it.CreatedAt, UploadedAt: it.CreatedAt, Remote: it.Remote, Datastore: "media",
			Protected: it.Protected, QuarantinedBy: it.QuarantinedBy,
		}
		switch it.MediaID {
		case "bidi":
			want.Filename = "evilgnp.exe"
		case "badtype":
			want.ContentType, want.Filename = "application/octet-stream", ""
		}
		if it.Remote {
			want.Datastore = "remote"
		}
		if it.QuarantinedBy != "" {
			want.QuarantinedAt = importtest.Now()
		}
		got := m
		got.LastAccessAt = time.Time{}
		if !importtest.EqualMedia(got, want) {
			t.Errorf("%s/%s stored as\n%+v\nwant\n%+v", it.ServerName, it.MediaID, got, want)
		}
		if m.Refused() != (it.QuarantinedBy != "" && !it.Protected) {
			t.Errorf("%s/%s: Refused() = %v", it.ServerName, it.MediaID, m.Refused())
		}
		wantBlobs[m.Datastore][sha] = true
		store, _ := fx.Stores.Get(m.Datastore)
		blob, err := store.Open(ctx, sha)
		if err != nil {
			t.Errorf("%s/%s: row without blob: %v", it.ServerName, it.MediaID, err)
			continue
		}
		body, err := io.ReadAll(blob.Content)
		blob.Content.Close()
		if err != nil || !bytes.Equal(body, it.Body) {
			t.Errorf("%s/%s: blob holds %d other bytes (%v)", it.ServerName, it.MediaID, len(body), err)
		}
	}
	for _, it := range d.bad {
		if _, err := fx.Meta.GetMedia(ctx, it.ServerName, it.MediaID); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("bad item %s stored: %v", it.MediaID, err)
		}
		if _, err := fx.Meta.GetBlob(ctx, importtest.SHA256(it.Body)); !errors.Is(err, storage.ErrNotFound) {
			t.Errorf("bad item %s: its bytes were recorded: %v", it.MediaID, err)
		}
	}
	// Imported local media counts for its users' quotas (dupA and dupB
	// share their content and count twice); remote media does not.
	usage := map[string]storage.UserUsage{}
	for _, it := range d.good {
		if !it.Remote && it.UserID != "" {
			u := usage[it.UserID]
			u.UserID, u.Bytes, u.Files = it.UserID, u.Bytes+int64(len(it.Body)), u.Files+1
			usage[it.UserID] = u
		}
	}
	if len(usage) < 2 {
		t.Fatalf("the dataset has local media of %d users, want several", len(usage))
	}
	for user, want := range usage {
		if got, err := fx.Meta.UserUsage(ctx, user); err != nil || got != want {
			t.Errorf("UserUsage(%s) = %+v, %v; want %+v", user, got, err, want)
		}
	}
	q, err := fx.Meta.GetQuarantine(ctx, d.quarantinedMissing)
	if err != nil || q.By != "@mod:example.org" {
		t.Errorf("quarantine of the missing item: %+v, %v", q, err)
	}
	for name, want := range wantBlobs {
		recs, err := fx.Meta.ListBlobs(ctx, name, "", 10_000)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]bool{}
		for _, r := range recs {
			got[r.SHA256] = true
		}
		if !maps.Equal(got, want) {
			t.Errorf("datastore %s records %d blobs, want %d", name, len(got), len(want))
		}
	}
	// Bytes on disk: exactly the recorded blobs (nothing left behind by a
	// failed or interrupted import), no temp file.
	if fx.S3 != nil {
		if n := len(fx.S3.Objects(t)); n != len(wantBlobs["media"]) {
			t.Errorf("S3 holds %d objects, want %d", n, len(wantBlobs["media"]))
		}
	}
	st := fx.Snapshot(t)
	wantOnDisk := len(wantBlobs["remote"])
	if fx.S3 == nil {
		wantOnDisk += len(wantBlobs["media"])
	}
	if len(st.Files) != wantOnDisk {
		t.Errorf("%d files in the file datastores, want %d: %v", len(st.Files), wantOnDisk, st.Files)
	}
}

// countingSink counts the Puts reaching a sink.
type countingSink struct {
	importer.Sink
	puts atomic.Int64
}

func (c *countingSink) Put(ctx context.Context, it importer.Item, body io.Reader) (importer.Outcome, error) {
	c.puts.Add(1)
	return c.Sink.Put(ctx, it, body)
}

func TestStoreSinkImport(t *testing.T) {
	d := newDataset()
	for _, be := range importtest.Backends() {
		t.Run(be.Name, func(t *testing.T) {
			ctx := context.Background()
			fx := be.Open(t)
			rep, err := importer.Run(ctx, d.source(), fx.Sink, allRemote)
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			if rep.Counts != d.wantCounts() {
				t.Fatalf("first run: %+v, want %+v\n%s", rep.Counts, d.wantCounts(), rep)
			}
			checkImported(t, fx, d)

			// A second run changes nothing and writes no blob.
			before := snapshot(t, fx, d)
			sink := &countingSink{Sink: fx.Sink}
			src := d.source()
			rep, err = importer.Run(ctx, src, sink, allRemote)
			if err != nil {
				t.Fatalf("second Run: %v", err)
			}
			want := importer.Counts{AlreadyPresent: int64(len(d.good)), Missing: 2, Mismatched: 2}
			if rep.Counts != want {
				t.Errorf("second run: %+v, want %+v\n%s", rep.Counts, want, rep)
			}
			if n := sink.puts.Load(); n != 2 {
				// Only the two mismatched items (no row to compare with)
				// reach the sink, and store nothing.
				t.Errorf("second run: %d Puts, want 2", n)
			}
			for _, it := range d.good {
				if n := src.Opens(it.Ref()); n != 0 {
					t.Errorf("second run read %s", it.MediaID)
				}
			}
			after := snapshot(t, fx, d)
			if diff := before.Diff(after); diff != "" {
				t.Errorf("second run changed the target:\n%s", diff)
			}
			if touched := before.Touched(after); len(touched) > 0 {
				t.Errorf("second run rewrote datastore files %v", touched)
			}
		})
	}
}

// TestStoreSinkFilter checks that remote media is only imported on request
// and local media only of the selected server names.
func TestStoreSinkFilter(t *testing.T) {
	d := newDataset()
	fx := importtest.Backends()[0].Open(t)
	rep, err := importer.Run(context.Background(), d.source(), fx.Sink, importer.Options{Filter: importer.Filter{ServerNames: []string{"other.example"}}})
	if err != nil || rep.Imported != 1 || rep.Total() != 1 {
		t.Fatalf("Run: %v\n%s", err, rep)
	}
	st := snapshot(t, fx, d)
	if _, ok := st.Rows[storage.MediaRef{ServerName: "other.example", MediaID: "dupA"}]; !ok || len(st.Rows) != 1 {
		t.Errorf("rows %v", slices.Collect(maps.Keys(st.Rows)))
	}
}

// TestStoreSinkInterrupted interrupts imports at random points (a
// cancelled context at a random Open or after a random delay, and source
// faults: failed opens, broken and short bodies), then imports again: the
// result equals an uninterrupted import.
func TestStoreSinkInterrupted(t *testing.T) {
	d := newDataset()
	for _, be := range importtest.Backends() {
		t.Run(be.Name, func(t *testing.T) {
			ref := be.Open(t)
			if _, err := importer.Run(context.Background(), d.source(), ref.Sink, allRemote); err != nil {
				t.Fatal(err)
			}
			want := snapshot(t, ref, d)
			seeds := []uint64{1, 2, 3}
			if be.Name == "sqlite+files" {
				seeds = append(seeds, 4, 5, 6)
			}
			for _, seed := range seeds {
				t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
					fx := be.Open(t)
					rng := rand.New(rand.NewPCG(seed, 42))
					interrupt(t, fx, d, rng)
					rep, err := importer.Run(context.Background(), d.source(), fx.Sink, allRemote)
					if err != nil {
						t.Fatalf("final Run: %v", err)
					}
					if rep.Imported+rep.AlreadyPresent != int64(len(d.good)) || rep.Missing != 2 || rep.Mismatched != 2 || rep.Failed+rep.Conflicts+rep.Invalid != 0 {
						t.Errorf("final run: %+v\n%s", rep.Counts, rep)
					}
					checkImported(t, fx, d)
					if diff := want.Diff(snapshot(t, fx, d)); diff != "" {
						t.Errorf("interrupted import differs from an uninterrupted one:\n%s", diff)
					}
				})
			}
		})
	}
}

// interrupt runs three broken imports of d into fx: cancelled at a random
// Open, cancelled after a random delay, and with random source faults.
func interrupt(t *testing.T, fx *fixture, d dataset, rng *rand.Rand) {
	t.Helper()
	var mu sync.Mutex
	intn := func(n int) int {
		mu.Lock()
		defer mu.Unlock()
		return rng.IntN(n)
	}

	ctx, cancel := context.WithCancel(context.Background())
	src := d.source()
	stopAt, opens := intn(len(d.good)), atomic.Int64{}
	src.Fault = func(storage.MediaRef) importtest.Fault {
		if opens.Add(1) > int64(stopAt) {
			cancel()
		}
		return importtest.NoFault
	}
	rep, err := importer.Run(ctx, src, fx.Sink, importer.Options{Filter: allRemote.Filter, Workers: 1 + intn(4), LookupBatch: 1 + intn(8)})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Run cancelled at open %d: %v", stopAt, err)
	}
	t.Logf("cancelled at open %d: %+v", stopAt, rep.Counts)
	cancel()

	delay := time.Duration(intn(30_000)) * time.Microsecond
	ctx, cancel = context.WithTimeout(context.Background(), delay)
	rep, err = importer.Run(ctx, d.source(), fx.Sink, importer.Options{Filter: allRemote.Filter, Workers: 1 + intn(4), LookupBatch: 1 + intn(8)})
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Run with a deadline: %v", err)
	}
	t.Logf("deadline after %v: %+v, %v", delay, rep.Counts, err)
	cancel()

	src = d.source()
	faults := []importtest.Fault{importtest.NoFault, importtest.FailOpen, importtest.BreakRead, importtest.ShortBody}
	src.Fault = func(storage.MediaRef) importtest.Fault { return faults[intn(len(faults))] }
	rep, err = importer.Run(context.Background(), src, fx.Sink, importer.Options{Filter: allRemote.Filter, Workers: 1 + intn(4)})
	if err != nil {
		t.Errorf("Run with faults: %v", err)
	}
	t.Logf("with faults: %+v", rep.Counts)
	if rep.Conflicts != 0 || rep.Invalid != 0 {
		t.Errorf("Run with faults: %+v", rep.Counts)
	}
}

// withoutLookup hides the store's MediaLookup, so that StoreSink falls back
// to GetMedia per ref (which cannot see tombstones).
type withoutLookup struct {
	storage.MetadataStore
	storage.MediaAdmin
	storage.BlobCollector
}

func TestStoreSinkConflicts(t *testing.T) {
	for _, be := range importtest.Backends()[:2] {
		for _, batched := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/batched=%v", be.Name, batched), func(t *testing.T) {
				testConflicts(t, be.Open(t), batched)
			})
		}
	}
}

func testConflicts(t *testing.T, fx *fixture, batched bool) {
	ctx := context.Background()
	if !batched {
		fx.Sink.Meta = withoutLookup{fx.Meta, fx.Meta, fx.Meta}
	}
	taken := importtest.New("example.org", "taken", []byte("the target's own"))
	gone := importtest.New("example.org", "gone", []byte("deleted here"))
	first := &importtest.Source{Media: []importtest.Media{taken, gone}}
	if rep, err := importer.Run(ctx, first, fx.Sink, importer.Options{}); err != nil || rep.Imported != 2 {
		t.Fatalf("setup: %v\n%s", err, rep)
	}
	if _, err := fx.Meta.DeleteMedia(ctx, []storage.MediaRef{gone.Ref()}, true, importtest.Now()); err != nil {
		t.Fatal(err)
	}
	if err := fx.Meta.CreatePending(ctx, storage.Media{ServerName: "example.org", MediaID: "pend", UserID: "@alice:example.org",
		CreatedAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)}, 0); err != nil {
		t.Fatal(err)
	}

	otherTaken := importtest.New("example.org", "taken", []byte("the source's"))
	sameGone := gone
	pend := importtest.New("example.org", "pend", []byte("pending here"))
	// Without hash or size only the bytes can tell.
	unknownTaken := importtest.New("example.org", "taken", []byte("the source's"))
	unknownTaken.SHA256, unknownTaken.Size = "", -1
	tooBig := importtest.New("example.org", "toobig", make([]byte, 2000))
	fx.Sink.MaxSize = 1000
	src := &importtest.Source{Media: []importtest.Media{otherTaken, sameGone, pend, unknownTaken, tooBig}}
	rep, err := importer.Run(ctx, src, fx.Sink, importer.Options{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Conflicts != 4 || rep.Failed != 1 || rep.Total() != 5 {
		t.Fatalf("counts %+v\n%s", rep.Counts, rep)
	}
	if k := problems(rep)["toobig"]; k != importer.ProblemFailed || !strings.Contains(rep.Problems[len(rep.Problems)-1].Error, "limit") {
		t.Errorf("too big: %v\n%s", k, rep)
	}
	m, err := fx.Meta.GetMedia(ctx, "example.org", "taken")
	if err != nil || m.SHA256 != taken.SHA256 {
		t.Errorf("conflicting import changed the row: %+v, %v", m, err)
	}
	if _, err := fx.Meta.GetMedia(ctx, "example.org", "gone"); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("deleted ID re-created: %v", err)
	}
	if m, err := fx.Meta.GetMedia(ctx, "example.org", "pend"); err != nil || m.State != storage.StatePending {
		t.Errorf("pending item: %+v, %v", m, err)
	}
	if src.Opens(otherTaken.Ref()) != 1 || (batched && src.Opens(gone.Ref()) != 0) {
		// otherTaken and unknownTaken share a ref: only the latter is read.
		t.Errorf("opens: taken %d, gone %d", src.Opens(otherTaken.Ref()), src.Opens(gone.Ref()))
	}

	// Put itself, as reached when a Lookup raced with another writer.
	for _, tt := range []struct {
		m    importtest.Media
		want error
	}{
		{taken, nil},
		{otherTaken, importer.ErrConflict},
		{gone, importer.ErrConflict},
		{pend, importer.ErrConflict},
		{importtest.New("example.org", "bad/id", []byte("x")), importer.ErrInvalid},
	} {
		it := tt.m.Item
		out, err := fx.Sink.Put(ctx, it, bytes.NewReader(tt.m.Body))
		if !errors.Is(err, tt.want) || tt.want == nil && out != importer.AlreadyPresent {
			t.Errorf("Put(%s) = %v, %v; want %v", tt.m.MediaID, out, err, tt.want)
		}
	}
	if err := fx.Sink.Quarantine(ctx, "ABC", "@mod:example.org"); !errors.Is(err, importer.ErrInvalid) {
		t.Errorf("Quarantine(bad hash) = %v", err)
	}
	if err := fx.Sink.Quarantine(ctx, taken.SHA256, ""); !errors.Is(err, importer.ErrInvalid) {
		t.Errorf("Quarantine(nobody) = %v", err)
	}

	// Quarantined hears of new quarantines only, from Quarantine and Put.
	var heard []string
	fx.Sink.Quarantined = func(_ context.Context, sha string) error {
		heard = append(heard, sha)
		return nil
	}
	for range 2 {
		if err := fx.Sink.Quarantine(ctx, taken.SHA256, "@mod:example.org"); err != nil {
			t.Fatal(err)
		}
	}
	q := importtest.New("example.org", "newq", []byte("quarantined"))
	q.QuarantinedBy = "@mod:example.org"
	if out, err := fx.Sink.Put(ctx, q.Item, bytes.NewReader(q.Body)); err != nil || out != importer.Imported {
		t.Fatalf("Put(quarantined) = %v, %v", out, err)
	}
	if !slices.Equal(heard, []string{taken.SHA256, q.SHA256}) {
		t.Errorf("Quarantined heard %v", heard)
	}
	if m, err := fx.Meta.GetMedia(ctx, "example.org", "taken"); err != nil || !m.Refused() || m.QuarantinedBy != "@mod:example.org" {
		t.Errorf("quarantined content: %+v, %v", m, err)
	}
}

// BenchmarkImportSmall imports b.N items of 1 KiB into SQLite and a file
// datastore through StoreSink.
func BenchmarkImportSmall(b *testing.B) {
	dir := b.TempDir()
	meta, err := sqlstore.OpenSQLite(context.Background(), filepath.Join(dir, "meta.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer meta.Close()
	blobs, err := filestore.New(filepath.Join(dir, "blobs"))
	if err != nil {
		b.Fatal(err)
	}
	ds, err := storage.NewDatastores(storage.Datastore{Name: "media", Store: blobs, Kinds: []storage.Kind{storage.KindLocal}})
	if err != nil {
		b.Fatal(err)
	}
	defer ds.Close()
	src := &importtest.Source{}
	for i := range b.N {
		body := make([]byte, 1024)
		copy(body, fmt.Sprintf("item %d", i))
		src.Media = append(src.Media, importtest.New("example.org", fmt.Sprintf("m%09d", i), body))
	}
	b.SetBytes(1024)
	b.ResetTimer()
	rep, err := importer.Run(context.Background(), src, &importer.StoreSink{Meta: meta, Stores: ds}, importer.Options{})
	b.StopTimer()
	if err != nil || rep.Imported != int64(b.N) {
		b.Fatalf("Run: %v\n%s", err, rep)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "items/s")
	_ = os.RemoveAll(dir)
}

// TestStoreSinkPutVerifies calls Put with bytes that do not match the
// recorded hash or size: new bytes, bytes already stored under another item
// (in the item's datastore and in the other one, so that every
// deduplication path of the store is taken), a body shorter and one longer
// than recorded. Each is ErrHashMismatch, and no row, blob record or blob
// file is added. The same bytes with their own hash are then imported.
func TestStoreSinkPutVerifies(t *testing.T) {
	for _, be := range importtest.Backends() {
		t.Run(be.Name, func(t *testing.T) {
			ctx := context.Background()
			fx := be.Open(t)
			local := importtest.New("example.org", "local", pattern("stored locally", 200_000))
			remote := importtest.New("remote.example", "remote", pattern("stored remotely", 3000))
			remote.Remote = true
			seed := &importtest.Source{Media: []importtest.Media{local, remote}}
			if rep, err := importer.Run(ctx, seed, fx.Sink, allRemote); err != nil || rep.Imported != 2 {
				t.Fatalf("setup: %v\n%s", err, rep)
			}
			recorded := func() int {
				n := 0
				for _, ds := range []string{"media", "remote"} {
					recs, err := fx.Meta.ListBlobs(ctx, ds, "", 100)
					if err != nil {
						t.Fatal(err)
					}
					n += len(recs)
				}
				return n
			}
			onDisk := func() int {
				st := fx.Snapshot(t)
				return len(st.Files) + len(st.Objects)
			}
			wantRecorded, wantOnDisk := recorded(), onDisk()
			wrong := importtest.SHA256([]byte("not these bytes"))
			for _, tt := range []struct {
				name string
				body []byte
				size int64
				sha  string
			}{
				{"new bytes", pattern("fresh", 70_000), 70_000, wrong},
				{"new bytes, size unknown", pattern("fresh", 70_000), -1, wrong},
				{"bytes stored in the item's datastore", local.Body, local.Size, wrong},
				{"bytes stored in another datastore", remote.Body, remote.Size, wrong},
				{"shorter than recorded", local.Body[:1000], local.Size, local.SHA256},
				{"longer than recorded", append(slices.Clone(local.Body), 'x'), local.Size, ""},
			} {
				it := importer.Item{ServerName: "example.org", MediaID: "checked", ContentType: "application/octet-stream",
					Size: tt.size, SHA256: tt.sha}
				_, err := fx.Sink.Put(ctx, it, bytes.NewReader(tt.body))
				if !errors.Is(err, importer.ErrHashMismatch) {
					t.Errorf("%s: Put error = %v, want ErrHashMismatch", tt.name, err)
				}
				if _, err := fx.Meta.GetMedia(ctx, "example.org", "checked"); !errors.Is(err, storage.ErrNotFound) {
					t.Errorf("%s: a row was inserted: %v", tt.name, err)
				}
				if n, m := recorded(), onDisk(); n != wantRecorded || m != wantOnDisk {
					t.Errorf("%s: %d blob records and %d blob files, want %d and %d", tt.name, n, m, wantRecorded, wantOnDisk)
				}
			}
			body := pattern("fresh", 70_000)
			it := importer.Item{ServerName: "example.org", MediaID: "checked", ContentType: "application/octet-stream",
				Size: int64(len(body)), SHA256: importtest.SHA256(body)}
			if out, err := fx.Sink.Put(ctx, it, bytes.NewReader(body)); err != nil || out != importer.Imported {
				t.Fatalf("Put with the right hash: %v, %v", out, err)
			}
		})
	}
}
