package mediaadmin

// STAND-IN: storage.RemoveMedia is being written by helper "store"
// (storage/remove.go). This file mirrors its signature so that the service
// can be written and tested against it; it is deleted after `git merge main`
// brings the real one, and removeMedia calls become storage.RemoveMedia.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// removeOptions mirrors storage.RemoveOptions.
type removeOptions struct {
	Tombstone bool
	Grace     time.Duration
	Now       time.Time
}

// removed mirrors storage.Removed.
type removed struct {
	Media      []storage.Media
	Thumbnails int
	Blobs      int
	Bytes      int64
}

// removeMedia mirrors storage.RemoveMedia: rows first, then each blob that
// nothing references any more.
func removeMedia(ctx context.Context, meta storage.MetadataStore, stores *storage.Datastores, refs []storage.MediaRef, o removeOptions) (removed, error) {
	ma, ok := meta.(storage.MediaAdmin)
	if !ok {
		return removed{}, errors.New("removing media: store does not implement storage.MediaAdmin")
	}
	bc, ok := meta.(storage.BlobCollector)
	if !ok {
		return removed{}, errors.New("removing media: store does not implement storage.BlobCollector")
	}
	d, err := ma.DeleteMedia(ctx, refs, o.Tombstone, o.Now)
	if err != nil {
		return removed{}, fmt.Errorf("removing media: %w", err)
	}
	out := removed{Media: d.Media, Thumbnails: d.Thumbnails}
	cutoff := o.Now.Add(-o.Grace)
	for _, sha := range d.Blobs {
		gone, err := bc.DeleteUnreferencedBlob(ctx, sha, cutoff, func(ctx context.Context, rec storage.BlobRecord) error {
			s, ok := stores.Get(rec.Datastore)
			if !ok {
				return fmt.Errorf("unknown datastore %q", rec.Datastore)
			}
			out.Bytes += rec.Size
			return s.Delete(ctx, rec.SHA256)
		})
		if err != nil {
			return out, fmt.Errorf("removing blob %s: %w", sha, err)
		}
		if gone {
			out.Blobs++
		}
	}
	return out, nil
}
