package importer_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
)

// fileSink is a memSink that is also an importer.FileSink: PutFile reads
// the file itself (as a Caddy on the same machine does) until refuse says
// it cannot; a refused file is first read halfway, as a target that fails
// late might.
type fileSink struct {
	*memSink
	refuse func(it importer.Item) bool

	mu        sync.Mutex
	fileCalls []string
}

func (s *fileSink) PutFile(ctx context.Context, it importer.Item, f *os.File) (importer.Outcome, error) {
	s.mu.Lock()
	s.fileCalls = append(s.fileCalls, it.MediaID)
	s.mu.Unlock()
	if s.refuse != nil && s.refuse(it) {
		if _, err := io.CopyN(io.Discard, f, max(it.Size/2, 1)); err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		return 0, fmt.Errorf("%s: permission denied: %w", f.Name(), importer.ErrFileUnreachable)
	}
	return s.Put(ctx, it, f)
}

// fileSource is a source whose items' bytes are files, as Synapse's,
// Dendrite's and matrix-media-repo's are.
func fileSource(t *testing.T, n int) *importtest.Source {
	t.Helper()
	dir := t.TempDir()
	src := &importtest.Source{}
	for i := range n {
		body := []byte(strings.Repeat(fmt.Sprintf("item %d;", i), 100+i))
		m := importtest.New("example.org", fmt.Sprintf("f%02d", i), body)
		m.File = filepath.Join(dir, m.MediaID)
		if err := os.WriteFile(m.File, body, 0o600); err != nil {
			t.Fatal(err)
		}
		src.Media = append(src.Media, m)
	}
	return src
}

// TestRunFileSink checks that Run lets a FileSink read the source's files
// itself, falls back to sending the bytes (from their start) for the item
// it refuses and every later one, and never uses it in a dry run or for
// bytes that are not a file.
func TestRunFileSink(t *testing.T) {
	ctx := context.Background()
	t.Run("reads files itself", func(t *testing.T) {
		src := fileSource(t, 10)
		sink := &fileSink{memSink: newMemSink()}
		rep, err := importer.Run(ctx, src, sink, importer.Options{Workers: 3})
		if err != nil || rep.Imported != 10 || rep.ReadByTarget != 10 || rep.StreamedBecause != "" {
			t.Fatalf("run: %v\n%s", err, rep)
		}
		var want int64
		for _, m := range src.Media {
			want += m.Size
			if p := sink.held[m.Ref()]; p.SHA256 != m.SHA256 {
				t.Errorf("%s stored with %s, want %s", m.MediaID, p.SHA256, m.SHA256)
			}
		}
		if rep.ImportedBytes != want {
			t.Errorf("imported bytes %d, want %d", rep.ImportedBytes, want)
		}
		if !strings.Contains(rep.String(), "10 items were read by the target from the source's files directly") {
			t.Errorf("report:\n%s", rep)
		}
	})
	t.Run("falls back to sending bytes", func(t *testing.T) {
		src := fileSource(t, 10)
		sink := &fileSink{memSink: newMemSink(), refuse: func(it importer.Item) bool { return it.MediaID == "f03" }}
		rep, err := importer.Run(ctx, src, sink, importer.Options{Workers: 1})
		if err != nil || rep.Imported != 10 || !rep.OK() {
			t.Fatalf("run: %v\n%s", err, rep)
		}
		// f00..f02 read by the target, f03 refused (then sent), the rest
		// sent without asking.
		if rep.ReadByTarget != 3 || strings.Join(sink.fileCalls, ",") != "f00,f01,f02,f03" {
			t.Errorf("read by target %d, PutFile calls %v", rep.ReadByTarget, sink.fileCalls)
		}
		if !strings.Contains(rep.StreamedBecause, "permission denied") || !strings.Contains(rep.String(), "could not read the source's files") {
			t.Errorf("report does not say why bytes were sent:\n%s", rep)
		}
		for _, m := range src.Media {
			if p := sink.held[m.Ref()]; p.SHA256 != m.SHA256 || p.Size != m.Size {
				t.Errorf("%s stored as %+v, want %s (%d bytes): a refused file must be sent from its start", m.MediaID, p, m.SHA256, m.Size)
			}
		}
	})
	t.Run("dry run and in-memory bytes", func(t *testing.T) {
		src := fileSource(t, 3)
		sink := &fileSink{memSink: newMemSink()}
		rep, err := importer.Run(ctx, src, sink, importer.Options{DryRun: true})
		if err != nil || rep.Imported != 3 || len(sink.fileCalls) != 0 || len(sink.puts) != 0 {
			t.Fatalf("dry run: %v, %d PutFile, %d Put\n%s", err, len(sink.fileCalls), len(sink.puts), rep)
		}
		mem := &importtest.Source{Media: []importtest.Media{importtest.New("example.org", "mem", []byte("in memory"))}}
		rep, err = importer.Run(ctx, mem, sink, importer.Options{})
		if err != nil || rep.Imported != 1 || len(sink.fileCalls) != 0 || rep.ReadByTarget != 0 {
			t.Fatalf("in-memory source: %v, %d PutFile\n%s", err, len(sink.fileCalls), rep)
		}
	})
	t.Run("errors of the target count as the item's", func(t *testing.T) {
		src := fileSource(t, 2)
		src.Media[1].SHA256 = importtest.SHA256([]byte("other bytes"))
		sink := &fileSink{memSink: newMemSink()}
		rep, err := importer.Run(ctx, src, sink, importer.Options{Workers: 1})
		if err != nil || rep.Imported != 1 || rep.Mismatched != 1 || rep.ReadByTarget != 1 || rep.StreamedBecause != "" {
			t.Fatalf("run: %v\n%s", err, rep)
		}
	})
}
