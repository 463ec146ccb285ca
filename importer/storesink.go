package importer

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// StoreSink stores imported media directly into this module's stores. It is
// safe for concurrent use (Run calls it from several workers) and may be
// used while the module serves the same stores: an imported item becomes
// downloadable as soon as its row is inserted.
type StoreSink struct {
	// Meta is the metadata store. Carrying quarantines over needs
	// storage.MediaAdmin; storage.MediaLookup, when implemented, makes
	// Lookup one query per batch and reports deleted IDs.
	Meta storage.MetadataStore
	// Stores are the datastores; local media is written to the datastore
	// of storage.KindLocal, remote media to that of storage.KindRemote.
	Stores *storage.Datastores
	// MaxSize bounds one item's bytes; 0 or less means no limit.
	MaxSize int64
	// Now is the clock of quarantine records and of items without a
	// creation time; default time.Now.
	Now func() time.Time
	// Quarantined, when set, is called after a quarantine was newly
	// recorded (carried over by Put, or by Quarantine), for example to drop
	// cached rows of media with that content; its error fails the item.
	// Default: nothing.
	Quarantined func(ctx context.Context, sha256 string) error
}

var _ Sink = (*StoreSink)(nil)

// now returns the current time of the sink's clock.
func (s *StoreSink) now() time.Time {
	if s.Now != nil {
		return s.Now()
	}
	return time.Now()
}

// Lookup implements Sink: with storage.MediaLookup in one call, else with
// GetMedia per ref (which cannot see deleted IDs; Put still refuses them).
func (s *StoreSink) Lookup(ctx context.Context, refs []storage.MediaRef) (map[storage.MediaRef]Present, error) {
	out := make(map[storage.MediaRef]Present, len(refs))
	if l, ok := s.Meta.(storage.MediaLookup); ok {
		got, err := l.LookupMedia(ctx, refs)
		if err != nil {
			return nil, fmt.Errorf("looking up media: %w", err)
		}
		for r, p := range got {
			out[r] = Present{SHA256: p.SHA256, Size: p.Size, Deleted: p.Deleted}
		}
		return out, nil
	}
	for _, r := range refs {
		m, err := s.Meta.GetMedia(ctx, r.ServerName, r.MediaID)
		switch {
		case errors.Is(err, storage.ErrNotFound):
		case err != nil:
			return nil, fmt.Errorf("looking up media: %w", err)
		default:
			out[r] = Present{SHA256: m.SHA256, Size: m.Size}
		}
	}
	return out, nil
}

// Put implements Sink, in the order of the package doc:
//
//  1. check the item (ValidateItem);
//  2. store the bytes with storage.IngestTo in the datastore of the item's
//     kind (deduplicated), with the recorded size and hash as
//     PutOptions.ExpectedSize and ExpectedSHA256: the store hashes the
//     bytes once, as it writes them, and checks both before the blob is put
//     in place, so that wrong bytes never complete a blob; the result's
//     hash is compared with the recorded one once more;
//  3. record a carried-over quarantine by the content's hash;
//  4. insert the media row with every field of the item. An ID that is
//     taken is AlreadyPresent when it holds the same content, else (other
//     content, pending, or deleted) ErrConflict.
//
// A failure after step 2 leaves an unreferenced blob, which the garbage
// collector removes after its grace period. A Content-Type the module would
// not store is replaced by application/octet-stream and an unusable file
// name is dropped, as for remote media: the item stays reachable.
func (s *StoreSink) Put(ctx context.Context, it Item, body io.Reader) (Outcome, error) {
	if err := ValidateItem(it); err != nil {
		return 0, err
	}
	kind := storage.KindLocal
	if it.Remote {
		kind = storage.KindRemote
	}
	opts := storage.PutOptions{MaxSize: s.MaxSize, ExpectedSize: it.Size, ExpectedSHA256: it.SHA256}
	res, err := storage.IngestTo(ctx, s.Stores, s.Meta, kind, body, opts)
	switch {
	case (errors.Is(err, storage.ErrSizeMismatch) || errors.Is(err, storage.ErrHashMismatch)) && !errors.Is(err, ErrHashMismatch):
		return 0, fmt.Errorf("storing %s: %w: %w", refString(it), ErrHashMismatch, err)
	case err != nil:
		return 0, fmt.Errorf("storing %s: %w", refString(it), err)
	case it.SHA256 != "" && res.SHA256 != it.SHA256:
		return 0, fmt.Errorf("storing %s: stored bytes hash to %s, %s recorded: %w", refString(it), res.SHA256, it.SHA256, ErrHashMismatch)
	}
	if it.QuarantinedBy != "" {
		if err := s.quarantine(ctx, res.SHA256, it.QuarantinedBy); err != nil {
			return 0, fmt.Errorf("storing %s: %w", refString(it), err)
		}
	}
	m := s.media(it, res)
	err = s.Meta.InsertMedia(ctx, m)
	if errors.Is(err, storage.ErrConflict) {
		return s.taken(ctx, it, res.SHA256)
	}
	if err != nil {
		return 0, fmt.Errorf("storing %s: %w", refString(it), err)
	}
	return Imported, nil
}

// media is the row of an item whose bytes were stored as res.
func (s *StoreSink) media(it Item, res storage.IngestResult) storage.Media {
	created := it.CreatedAt
	if created.IsZero() {
		created = s.now()
	}
	contentType := it.ContentType
	if contentType == "" || !matrix.ValidContentType(contentType) {
		contentType = "application/octet-stream"
	}
	filename := matrix.StripBidiControls(it.Filename)
	if !matrix.ValidFileName(filename) {
		filename = ""
	}
	userID := it.UserID
	if it.Remote {
		userID = ""
	}
	return storage.Media{
		ServerName:  it.ServerName,
		MediaID:     it.MediaID,
		State:       storage.StateReady,
		UserID:      userID,
		SHA256:      res.SHA256,
		Size:        res.Size,
		ContentType: contentType,
		Filename:    filename,
		CreatedAt:   created,
		UploadedAt:  created,
		Remote:      it.Remote,
		Protected:   it.Protected,
	}
}

// taken decides what an ID that InsertMedia refused holds: the same content
// (AlreadyPresent), or other content, a pending upload or a tombstone
// (ErrConflict).
func (s *StoreSink) taken(ctx context.Context, it Item, sha string) (Outcome, error) {
	m, err := s.Meta.GetMedia(ctx, it.ServerName, it.MediaID)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return 0, fmt.Errorf("storing %s: the ID was deleted here and is never issued again: %w", refString(it), ErrConflict)
	case err != nil:
		return 0, fmt.Errorf("storing %s: reading the item holding its ID: %w", refString(it), err)
	case m.State != storage.StateReady:
		return 0, fmt.Errorf("storing %s: the ID is reserved here by an upload that has not completed: %w", refString(it), ErrConflict)
	case m.SHA256 != sha:
		return 0, fmt.Errorf("storing %s: the ID holds other content here (sha256 %s, imported %s): %w", refString(it), m.SHA256, sha, ErrConflict)
	default:
		return AlreadyPresent, nil
	}
}

// Quarantine implements Sink.
func (s *StoreSink) Quarantine(ctx context.Context, sha256, by string) error {
	if !storage.ValidSHA256(sha256) {
		return fmt.Errorf("quarantining %q: not a lowercase hex SHA-256: %w", sha256, ErrInvalid)
	}
	if by == "" {
		return fmt.Errorf("quarantining %s: no quarantiner named: %w", sha256, ErrInvalid)
	}
	return s.quarantine(ctx, sha256, by)
}

// quarantine records the quarantine of content sha256 by by; an existing
// quarantine is kept.
func (s *StoreSink) quarantine(ctx context.Context, sha256, by string) error {
	a, ok := s.Meta.(storage.MediaAdmin)
	if !ok {
		return fmt.Errorf("quarantining %s: the metadata store %T cannot record quarantines", sha256, s.Meta)
	}
	added, err := a.QuarantineContent(ctx, storage.Quarantine{SHA256: sha256, By: by, At: s.now()})
	if err != nil {
		return fmt.Errorf("quarantining %s: %w", sha256, err)
	}
	if added && s.Quarantined != nil {
		if err := s.Quarantined(ctx, sha256); err != nil {
			return fmt.Errorf("quarantining %s: %w", sha256, err)
		}
	}
	return nil
}

// refString is the item's mxc URI.
func refString(it Item) string { return "mxc://" + it.ServerName + "/" + it.MediaID }
