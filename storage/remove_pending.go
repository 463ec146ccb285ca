package storage

// TEMPORARY (branch wt-jobs): a stand-in for RemoveMedia, which helper
// "store" writes in storage/remove.go. It has the agreed signature so that
// storage/retention builds; delete this file when storage/remove.go is
// merged.

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// RemoveOptions tune RemoveMedia.
type RemoveOptions struct {
	// Tombstone remembers deleted local IDs so they are never issued again.
	Tombstone bool
	// Grace: blobs claimed within it before Now are left to the collector.
	Grace time.Duration
	// Now is the clock (nil: time.Now).
	Now func() time.Time
}

// Removed describes what RemoveMedia removed.
type Removed struct {
	Media      []Media
	Thumbnails int
	Blobs      int
	Bytes      int64
	KeptBlobs  int
}

// RemoveMedia deletes media rows, then their unreferenced blobs.
func RemoveMedia(ctx context.Context, meta MetadataStore, stores *Datastores, refs []MediaRef, opts RemoveOptions) (Removed, error) {
	admin, ok := meta.(MediaAdmin)
	coll, ok2 := meta.(BlobCollector)
	if !ok || !ok2 {
		return Removed{}, errors.New("removing media: the metadata store cannot delete media")
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	del, err := admin.DeleteMedia(ctx, refs, opts.Tombstone, now())
	if err != nil {
		return Removed{}, fmt.Errorf("deleting media rows: %w", err)
	}
	out := Removed{Media: del.Media, Thumbnails: del.Thumbnails}
	cutoff := now().Add(-opts.Grace)
	for _, h := range del.Blobs {
		var size int64
		ok, err := coll.DeleteUnreferencedBlob(ctx, h, cutoff, func(ctx context.Context, rec BlobRecord) error {
			s, found := stores.Get(rec.Datastore)
			if !found {
				return fmt.Errorf("blob %s is recorded in unknown datastore %q", rec.SHA256, rec.Datastore)
			}
			size = rec.Size
			return s.Delete(ctx, rec.SHA256)
		})
		if err != nil {
			return out, fmt.Errorf("deleting blob %s: %w", h, err)
		}
		if ok {
			out.Blobs++
			out.Bytes += size
		} else {
			out.KeptBlobs++
		}
	}
	return out, nil
}
