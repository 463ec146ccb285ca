package sqlstore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

var (
	_ storage.BlobCollector       = (*Store)(nil)
	_ storage.ConcurrentCollector = (*Store)(nil)
)

// postgresCollectConcurrency is how many blob deletions a PostgreSQL store
// asks callers to run at once: enough to overlap their round trips and
// commits (PostgreSQL flushes concurrent commits together), a small share
// of the pool's 32 connections, which requests need.
const postgresCollectConcurrency = 4

// CollectConcurrency is how many DeleteUnreferencedBlob calls are worth
// running at once: postgresCollectConcurrency on PostgreSQL, 1 on SQLite,
// where every write goes through the one write connection, so that more
// would only queue ahead of other writers.
func (s *Store) CollectConcurrency() int {
	if s.dialect == dialectPostgres {
		return postgresCollectConcurrency
	}
	return 1
}

// TouchBlob moves the last claim of the recorded blob forward to at; it
// reports false when no record of sha256 exists. On PostgreSQL the UPDATE
// waits for a concurrent DeleteUnreferencedBlob of the same row to commit
// and then finds nothing; on SQLite the single write connection serializes
// them.
func (s *Store) TouchBlob(ctx context.Context, sha256 string, at time.Time) (bool, error) {
	ms := at.UnixMilli()
	res, err := s.write.ExecContext(ctx, s.q.touchBlob, ms, ms, sha256)
	if err != nil {
		return false, fmt.Errorf("claiming blob %s: %w", sha256, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("claiming blob %s: reading affected rows: %w", sha256, classify(err))
	}
	return n > 0, nil
}

// ListUnreferencedBlobs returns up to limit records after afterSHA256, by
// hash, that nothing references and that were last claimed before cutoff.
func (s *Store) ListUnreferencedBlobs(ctx context.Context, cutoff time.Time, afterSHA256 string, limit int) ([]storage.BlobRecord, error) {
	if limit <= 0 {
		return nil, nil
	}
	rows, err := s.read.QueryContext(ctx, s.q.listUnreferenced, afterSHA256, cutoff.UnixMilli(), limit)
	if err != nil {
		return nil, fmt.Errorf("listing unreferenced blobs: %w", classify(err))
	}
	defer rows.Close()
	var out []storage.BlobRecord
	for rows.Next() {
		var (
			b       storage.BlobRecord
			created sql.NullInt64
		)
		if err := rows.Scan(&b.SHA256, &b.Size, &b.PrefixSHA256, &b.Datastore, &created); err != nil {
			return nil, fmt.Errorf("listing unreferenced blobs: reading row: %w", classify(err))
		}
		b.CreatedAt = fromMillis(created)
		out = append(out, b)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing unreferenced blobs: %w", classify(err))
	}
	return out, nil
}

// DeleteUnreferencedBlob deletes the record of sha256 with one conditional
// DELETE (unreferenced, last claimed before cutoff) and calls deleteBytes
// before committing. The DELETE holds the row (PostgreSQL) or the database
// write lock (SQLite) until the commit, so a concurrent RecordBlob, TouchBlob
// or media insert naming the blob waits and then sees it gone (the insert
// fails on the foreign key). A media row committed after the DELETE's
// snapshot but before its row lock makes the foreign key check fail the
// DELETE, which is reported as "not deleted".
func (s *Store) DeleteUnreferencedBlob(ctx context.Context, sha256 string, cutoff time.Time, deleteBytes func(context.Context, storage.BlobRecord) error) (deleted bool, err error) {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("collecting blob %s: beginning transaction: %w", sha256, classify(err))
	}
	defer func() {
		if !deleted {
			_ = tx.Rollback()
		}
	}()
	var (
		b       storage.BlobRecord
		created sql.NullInt64
	)
	err = tx.QueryRowContext(ctx, s.q.deleteUnreferenced, sha256, cutoff.UnixMilli()).
		Scan(&b.SHA256, &b.Size, &b.PrefixSHA256, &b.Datastore, &created)
	switch {
	case errors.Is(err, sql.ErrNoRows), isForeignKeyViolation(err):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("collecting blob %s: deleting record: %w", sha256, classify(err))
	}
	b.CreatedAt = fromMillis(created)
	if err := deleteBytes(ctx, b); err != nil {
		// The datastore's error, classified by the datastore.
		return false, fmt.Errorf("collecting blob %s: %w", sha256, err)
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("collecting blob %s: committing: %w", sha256, classify(err))
	}
	return true, nil
}

// DeleteUnrecordedBlob calls deleteBytes inside a transaction that first
// inserts a placeholder record of sha256 (only if none exists) and removes it
// again before committing, so the placeholder is never visible. While the
// transaction is open, a RecordBlob of the same hash waits: on PostgreSQL on
// the uncommitted unique key, on SQLite on the write lock.
func (s *Store) DeleteUnrecordedBlob(ctx context.Context, sha256 string, deleteBytes func(context.Context) error) (done bool, err error) {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("collecting unrecorded blob %s: beginning transaction: %w", sha256, classify(err))
	}
	defer func() {
		if !done {
			_ = tx.Rollback()
		}
	}()
	res, err := tx.ExecContext(ctx, s.q.insertTombstone, sha256)
	if err != nil {
		return false, fmt.Errorf("collecting unrecorded blob %s: locking hash: %w", sha256, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("collecting unrecorded blob %s: reading affected rows: %w", sha256, classify(err))
	}
	if n == 0 {
		return false, nil
	}
	if err := deleteBytes(ctx); err != nil {
		// The datastore's error, classified by the datastore.
		return false, fmt.Errorf("collecting unrecorded blob %s: %w", sha256, err)
	}
	if _, err := tx.ExecContext(ctx, s.q.deleteTombstone, sha256); err != nil {
		return false, fmt.Errorf("collecting unrecorded blob %s: removing placeholder: %w", sha256, classify(err))
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("collecting unrecorded blob %s: committing: %w", sha256, classify(err))
	}
	return true, nil
}

// LockCollector takes the collector lock: on PostgreSQL a session advisory
// lock held on a dedicated connection until release (and freed by the server
// if this process dies); on SQLite a lock of this store handle.
func (s *Store) LockCollector(ctx context.Context) (release func(), acquired bool, err error) {
	if s.dialect != dialectPostgres {
		if !s.collectorMu.TryLock() {
			return nil, false, nil
		}
		return s.collectorMu.Unlock, true, nil
	}
	conn, err := s.write.Conn(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("taking the collector lock: %w", classify(err))
	}
	var ok bool
	if err := conn.QueryRowContext(ctx, s.q.lockCollector).Scan(&ok); err != nil {
		_ = conn.Close()
		return nil, false, fmt.Errorf("taking the collector lock: %w", classify(err))
	}
	if !ok {
		_ = conn.Close()
		return nil, false, nil
	}
	return func() {
		// Unlock on the same session; if that fails the connection is
		// discarded, which ends the session and frees the lock.
		uctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := conn.ExecContext(uctx, s.q.unlockCollector); err != nil {
			_ = conn.Raw(func(any) error { return driver.ErrBadConn })
		}
		_ = conn.Close()
	}, true, nil
}
