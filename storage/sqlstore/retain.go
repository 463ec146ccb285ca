package sqlstore

import (
	"context"
	"fmt"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

var _ storage.Retainer = (*Store)(nil)

// RemoteCacheSize returns how many ready remote media rows exist and their
// total size in bytes.
func (s *Store) RemoteCacheSize(ctx context.Context) (count, bytes int64, err error) {
	if err := s.read.QueryRowContext(ctx, s.q.remoteCacheSize).Scan(&count, &bytes); err != nil {
		return 0, 0, fmt.Errorf("measuring the remote media cache: %w", classify(err))
	}
	return count, bytes, nil
}

// ListRemoteLRU returns up to limit ready, unprotected remote media, least
// recently accessed (or created, when never accessed) first, ties by
// (ServerName, MediaID); it reads the index media_remote_lru in order.
func (s *Store) ListRemoteLRU(ctx context.Context, limit int) ([]storage.RemoteCacheEntry, error) {
	if limit <= 0 {
		return nil, nil
	}
	rows, err := s.read.QueryContext(ctx, s.q.listRemoteLRU, limit)
	if err != nil {
		return nil, fmt.Errorf("listing least recently used remote media: %w", classify(err))
	}
	defer rows.Close()
	var out []storage.RemoteCacheEntry
	for rows.Next() {
		var (
			e  storage.RemoteCacheEntry
			ms int64
		)
		if err := rows.Scan(&e.ServerName, &e.MediaID, &e.Size, &ms); err != nil {
			return nil, fmt.Errorf("listing least recently used remote media: reading row: %w", classify(err))
		}
		e.LastAccess = time.UnixMilli(ms).UTC()
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing least recently used remote media: %w", classify(err))
	}
	return out, nil
}

// DeleteThumbnailsNotAccessedSince deletes, in one statement, up to limit
// thumbnails whose media item was last accessed before cutoff, or was never
// accessed and the thumbnail was created before cutoff, and returns how many
// it deleted and the distinct hashes of their blobs.
func (s *Store) DeleteThumbnailsNotAccessedSince(ctx context.Context, cutoff time.Time, limit int) (deleted int, blobs []string, err error) {
	if limit <= 0 {
		return 0, nil, nil
	}
	rows, err := s.write.QueryContext(ctx, s.q.deleteOldThumbnails, cutoff.UnixMilli(), limit)
	if err != nil {
		return 0, nil, fmt.Errorf("deleting thumbnails not accessed since %s: %w", cutoff.Format(time.RFC3339), classify(err))
	}
	defer rows.Close()
	seen := map[string]bool{}
	for rows.Next() {
		var sha string
		if err := rows.Scan(&sha); err != nil {
			return 0, nil, fmt.Errorf("deleting thumbnails not accessed since %s: reading row: %w", cutoff.Format(time.RFC3339), classify(err))
		}
		deleted++
		if !seen[sha] {
			seen[sha] = true
			blobs = append(blobs, sha)
		}
	}
	if err := rows.Err(); err != nil {
		return 0, nil, fmt.Errorf("deleting thumbnails not accessed since %s: %w", cutoff.Format(time.RFC3339), classify(err))
	}
	return deleted, blobs, nil
}
