package sqlstore

import (
	"context"
	"fmt"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

var _ storage.StatsStore = (*Store)(nil)

// MediaStats returns the store's headline numbers (storage.StatsStore) with
// three aggregate queries in one read transaction (a snapshot on
// PostgreSQL): the media rows grouped by kind and local server name (remote
// rows form one group), the distinct blobs of ready rows, and the
// thumbnails.
func (s *Store) MediaStats(ctx context.Context) (storage.MediaStats, error) {
	const what = "computing media statistics"
	var st storage.MediaStats
	tx, err := s.readTx(ctx)
	if err != nil {
		return st, fmt.Errorf("%s: beginning transaction: %w", what, classify(err))
	}
	defer func() { _ = tx.Rollback() }()

	site := `CASE WHEN m.remote = ` + s.boolLit(true) + ` THEN '' ELSE m.server_name END`
	ready := `m.state = 'ready'`
	rows, err := tx.QueryContext(ctx, s.dialect.rebind(`SELECT m.remote, `+site+`,
			COUNT(CASE WHEN `+ready+` THEN 1 END),
			CAST(COALESCE(SUM(CASE WHEN `+ready+` THEN m.size ELSE 0 END), 0) AS BIGINT),
			COUNT(CASE WHEN m.state = 'pending' THEN 1 END),
			COUNT(CASE WHEN `+ready+` AND q.sha256 IS NOT NULL AND m.protected = `+s.boolLit(false)+` THEN 1 END)
		FROM media m LEFT JOIN quarantine q ON q.sha256 = m.sha256
		GROUP BY m.remote, `+site+`
		ORDER BY m.remote, `+s.binary(site)))
	if err != nil {
		return st, fmt.Errorf("%s: counting media: %w", what, classify(err))
	}
	defer rows.Close()
	for rows.Next() {
		var (
			remote bool
			c      storage.SiteMediaCounts
		)
		if err := rows.Scan(&remote, &c.ServerName, &c.Ready, &c.Bytes, &c.Pending, &c.Quarantined); err != nil {
			return st, fmt.Errorf("%s: reading media counts: %w", what, classify(err))
		}
		if remote {
			st.Remote = c.MediaCounts
			continue
		}
		st.Local = append(st.Local, c)
	}
	if err := rows.Err(); err != nil {
		return st, fmt.Errorf("%s: counting media: %w", what, classify(err))
	}
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*), CAST(COALESCE(SUM(b.size), 0) AS BIGINT) FROM blobs b
		WHERE EXISTS (SELECT 1 FROM media m WHERE m.sha256 = b.sha256 AND m.state = 'ready')`).Scan(&st.ContentBlobs, &st.ContentBytes); err != nil {
		return st, fmt.Errorf("%s: measuring content blobs: %w", what, classify(err))
	}
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM thumbnails`).
		Scan(&st.Thumbnails, &st.ThumbnailBytes); err != nil {
		return st, fmt.Errorf("%s: measuring thumbnails: %w", what, classify(err))
	}
	return st, nil
}
