// Package importtest helps test imports. It provides an in-memory
// importer.Source for tests of importer.Run, of sinks and of the import
// command (items with their bytes, missing bytes, and faults injected into
// opening and reading); real import targets (Target: SQLite or PostgreSQL
// with file or S3 datastores, and a StoreSink over them) with snapshots of
// what they hold; CheckImported, which checks every item of an import in a
// target; and Pipeline, the end-to-end test of a real source (first import,
// second import, interrupted imports) that the source packages run with
// their fixtures.
package importtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Media is one item of a Source: its metadata (Item.Open is ignored; the
// Source opens Body) and its bytes.
type Media struct {
	importer.Item
	// Body is the item's content.
	Body []byte
	// Missing items have no bytes: opening them fails with
	// importer.ErrMissing.
	Missing bool
	// File, when set, names a file holding the item's bytes: Open opens it
	// (an *os.File, as the file-based sources give) instead of Body, and
	// faults do not apply.
	File string
}

// Fault is what goes wrong when an item is opened.
type Fault int

// Faults of Source.Fault.
const (
	// NoFault opens the item normally.
	NoFault Fault = iota
	// FailOpen makes Open fail (not as missing: an I/O error).
	FailOpen
	// BreakRead makes the body fail after half of its bytes.
	BreakRead
	// ShortBody makes the body end (io.EOF) after half of its bytes.
	ShortBody
)

// errInjected is the error of FailOpen and BreakRead.
var errInjected = errors.New("injected source fault")

// Source is an in-memory importer.Source. Its fields are set before use;
// it is safe for concurrent use afterwards.
type Source struct {
	// Label is its Name; "importtest" when empty.
	Label string
	// Media are its items in Walk order.
	Media []Media
	// Fault, when set, is asked at each Open what goes wrong.
	Fault func(ref storage.MediaRef) Fault

	mu    sync.Mutex
	opens map[storage.MediaRef]int
}

var _ importer.Source = (*Source)(nil)

// Name implements importer.Source.
func (s *Source) Name() string {
	if s.Label == "" {
		return "importtest"
	}
	return s.Label
}

// selected lists the media f selects.
func (s *Source) selected(f importer.Filter) []Media {
	var out []Media
	for _, m := range s.Media {
		if m.Remote && !f.IncludeRemote || !m.Remote && len(f.ServerNames) > 0 && !slices.Contains(f.ServerNames, m.ServerName) {
			continue
		}
		out = append(out, m)
	}
	return out
}

// Totals implements importer.Source.
func (s *Source) Totals(_ context.Context, f importer.Filter) (importer.Totals, error) {
	var t importer.Totals
	for _, m := range s.selected(f) {
		t.Items++
		t.Bytes += max(m.Size, 0)
	}
	return t, nil
}

// Walk implements importer.Source.
func (s *Source) Walk(ctx context.Context, f importer.Filter, fn func(importer.Item) error) error {
	for _, m := range s.selected(f) {
		if err := ctx.Err(); err != nil {
			return err
		}
		it := m.Item
		it.Open = func(ctx context.Context) (io.ReadCloser, error) { return s.open(ctx, m) }
		if err := fn(it); err != nil {
			return err
		}
	}
	return nil
}

// open opens m's bytes, applying the fault chosen for it.
func (s *Source) open(ctx context.Context, m Media) (io.ReadCloser, error) {
	s.mu.Lock()
	if s.opens == nil {
		s.opens = map[storage.MediaRef]int{}
	}
	s.opens[m.Ref()]++
	s.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if m.Missing {
		return nil, fmt.Errorf("opening %s/%s: %w", m.ServerName, m.MediaID, importer.ErrMissing)
	}
	if m.File != "" {
		f, err := os.Open(m.File)
		if err != nil {
			return nil, fmt.Errorf("opening %s/%s: %w", m.ServerName, m.MediaID, err)
		}
		return f, nil
	}
	fault := NoFault
	if s.Fault != nil {
		fault = s.Fault(m.Ref())
	}
	half := m.Body[:len(m.Body)/2]
	switch fault {
	case FailOpen:
		return nil, fmt.Errorf("opening %s/%s: %w", m.ServerName, m.MediaID, errInjected)
	case BreakRead:
		return io.NopCloser(io.MultiReader(bytes.NewReader(half), errReader{})), nil
	case ShortBody:
		return io.NopCloser(bytes.NewReader(half)), nil
	default:
		return io.NopCloser(bytes.NewReader(m.Body)), nil
	}
}

// errReader fails every read with errInjected.
type errReader struct{}

// Read implements io.Reader.
func (errReader) Read([]byte) (int, error) { return 0, errInjected }

// Opens returns how many times the item's bytes were opened.
func (s *Source) Opens(ref storage.MediaRef) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.opens[ref]
}

// Close implements importer.Source.
func (s *Source) Close() error { return nil }

// SHA256 returns the lowercase hex SHA-256 of b.
func SHA256(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// Created is the creation time New gives its items.
func Created() time.Time { return time.UnixMilli(1_650_000_000_000).UTC() }

// New returns a Media of the given ref and body, with the recorded size and
// hash of body, uploaded by @alice on its server at Created().
func New(server, id string, body []byte) Media {
	return Media{Item: importer.Item{
		ServerName: server, MediaID: id, UserID: "@alice:" + server,
		ContentType: "application/octet-stream", CreatedAt: Created(),
		Size: int64(len(body)), SHA256: SHA256(body),
	}, Body: body}
}
