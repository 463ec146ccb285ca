package sqlstore

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

var _ storage.MediaAdmin = (*Store)(nil)

// deleteChunk is how many media items one statement of DeleteMedia names
// (two parameters each).
const deleteChunk = 500

// binary returns expr compared byte by byte: on PostgreSQL with the "C"
// collation (the database's default collation may order text by locale), on
// SQLite as it is (BINARY is its default). Orders that callers compare with
// Go's string order, and the order in which rows are locked, use it.
func (s *Store) binary(expr string) string { return s.dialect.binary(expr) }

// boolLit returns the literal of a boolean column value: TRUE/FALSE on
// PostgreSQL, 1/0 on SQLite, written literally so that the partial indexes
// on remote media match.
func (s *Store) boolLit(b bool) string {
	switch {
	case s.dialect == dialectPostgres && b:
		return "TRUE"
	case s.dialect == dialectPostgres:
		return "FALSE"
	case b:
		return "1"
	default:
		return "0"
	}
}

// readTx begins a read-only transaction whose statements see one snapshot:
// REPEATABLE READ on PostgreSQL; on SQLite a read transaction sees one
// snapshot of the WAL from its first read.
func (s *Store) readTx(ctx context.Context) (*sql.Tx, error) {
	if s.dialect == dialectPostgres {
		return s.read.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true})
	}
	return s.read.BeginTx(ctx, nil)
}

// queryMedia runs a mediaSelect query and reads every row.
func queryMedia(ctx context.Context, q interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}, query string, args ...any) ([]storage.Media, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, classify(err)
	}
	defer rows.Close()
	var out []storage.Media
	for rows.Next() {
		m, err := scanMedia(rows)
		if err != nil {
			return nil, fmt.Errorf("reading row: %w", classify(err))
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		return nil, classify(err)
	}
	return out, nil
}

// QuarantineContent quarantines the content q.SHA256 (at q.At, now when
// zero). q.By is required: an empty name would read back as "not
// quarantined". A hash already quarantined keeps its first record and gives
// false. The quarantine table has no foreign key and is touched by no
// upload, so this never waits for (or deadlocks with) uploads.
func (s *Store) QuarantineContent(ctx context.Context, q storage.Quarantine) (bool, error) {
	if q.SHA256 == "" || q.By == "" {
		return false, fmt.Errorf("quarantining content %q: a hash and who quarantines it are required", q.SHA256)
	}
	at := q.At
	if at.IsZero() {
		at = time.Now()
	}
	res, err := s.write.ExecContext(ctx, s.q.quarantine, q.SHA256, q.By, at.UnixMilli())
	if err != nil {
		return false, fmt.Errorf("quarantining content %s: %w", q.SHA256, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("quarantining content %s: reading affected rows: %w", q.SHA256, classify(err))
	}
	return n > 0, nil
}

// UnquarantineContent lifts the quarantine of sha256 and reports whether
// there was one.
func (s *Store) UnquarantineContent(ctx context.Context, sha256 string) (bool, error) {
	res, err := s.write.ExecContext(ctx, s.q.unquarantine, sha256)
	if err != nil {
		return false, fmt.Errorf("lifting quarantine of %s: %w", sha256, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("lifting quarantine of %s: reading affected rows: %w", sha256, classify(err))
	}
	return n > 0, nil
}

// GetQuarantine returns the quarantine of sha256, or an error wrapping
// storage.ErrNotFound.
func (s *Store) GetQuarantine(ctx context.Context, sha256 string) (storage.Quarantine, error) {
	q := storage.Quarantine{SHA256: sha256}
	var at int64
	err := s.read.QueryRowContext(ctx, s.q.getQuarantine, sha256).Scan(&q.By, &at)
	if errors.Is(err, sql.ErrNoRows) {
		return storage.Quarantine{}, fmt.Errorf("getting quarantine of %s: %w", sha256, storage.ErrNotFound)
	}
	if err != nil {
		return storage.Quarantine{}, fmt.Errorf("getting quarantine of %s: %w", sha256, classify(err))
	}
	q.At = time.UnixMilli(at).UTC()
	return q, nil
}

// SetProtected sets the protected flag of a media item in any state, or
// fails with an error wrapping storage.ErrNotFound.
func (s *Store) SetProtected(ctx context.Context, ref storage.MediaRef, protected bool) error {
	res, err := s.write.ExecContext(ctx, s.q.setProtected, protected, ref.ServerName, ref.MediaID)
	if err != nil {
		return fmt.Errorf("setting protection of %s/%s: %w", ref.ServerName, ref.MediaID, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("setting protection of %s/%s: reading affected rows: %w", ref.ServerName, ref.MediaID, classify(err))
	}
	if n == 0 {
		return fmt.Errorf("setting protection of %s/%s: %w", ref.ServerName, ref.MediaID, storage.ErrNotFound)
	}
	return nil
}

// ListMediaByHash returns up to limit ready media rows whose blob is sha256,
// ordered by (ServerName, MediaID) in the database's order of text, after
// the given ref.
func (s *Store) ListMediaByHash(ctx context.Context, sha256 string, after storage.MediaRef, limit int) ([]storage.Media, error) {
	if limit <= 0 {
		return nil, nil
	}
	out, err := queryMedia(ctx, s.read, s.q.listMediaByHash, sha256, after.ServerName, after.MediaID, limit)
	if err != nil {
		return nil, fmt.Errorf("listing media of content %s: %w", sha256, err)
	}
	return out, nil
}

// userMediaOrder returns the ORDER BY key of o. NULLs (never accessed, not
// quarantined) are mapped to the lowest value so both databases sort them
// first in ascending order; text is compared byte by byte.
func (s *Store) userMediaOrder(o storage.MediaOrder) (string, bool) {
	switch o {
	case storage.OrderMediaID:
		return s.binary("m.media_id"), true
	case storage.OrderFilename:
		return s.binary("m.filename"), true
	case storage.OrderCreated, "":
		return "COALESCE(m.created_ts, 0)", true
	case storage.OrderLastAccess:
		return "COALESCE(m.last_access_ts, 0)", true
	case storage.OrderSize:
		return "m.size", true
	case storage.OrderContentType:
		return s.binary("m.content_type"), true
	case storage.OrderQuarantinedBy:
		return s.binary("COALESCE(q.quarantined_by, '')"), true
	case storage.OrderProtected:
		return "m.protected", true
	}
	return "", false
}

// ListUserMedia returns a page of the user's ready media, ordered by
// q.OrderBy (never-accessed items and unquarantined ones sort as the lowest
// last access and quarantiner; text compares byte by byte) then MediaID
// ascending, and how many ready media the user has. Both come from one
// snapshot.
func (s *Store) ListUserMedia(ctx context.Context, q storage.UserMediaQuery) (page []storage.Media, total int64, err error) {
	what := fmt.Sprintf("listing media of %s on %s", q.UserID, q.ServerName)
	if q.ServerName == "" || q.UserID == "" {
		return nil, 0, fmt.Errorf("%s: server name and user ID are required", what)
	}
	key, ok := s.userMediaOrder(q.OrderBy)
	if !ok {
		return nil, 0, fmt.Errorf("%s: unknown order %q", what, q.OrderBy)
	}
	dir := "ASC"
	if q.Descending {
		dir = "DESC"
	}
	tx, err := s.readTx(ctx)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: beginning transaction: %w", what, classify(err))
	}
	defer func() { _ = tx.Rollback() }()
	if err := tx.QueryRowContext(ctx, s.q.countUserMedia, q.ServerName, q.UserID).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("%s: counting: %w", what, classify(err))
	}
	if q.Limit <= 0 {
		return nil, total, nil
	}
	query := s.dialect.rebind(mediaSelect + ` WHERE m.server_name = ? AND m.user_id = ? AND m.state = 'ready'
		ORDER BY ` + key + ` ` + dir + `, ` + s.binary("m.media_id") + ` ASC LIMIT ? OFFSET ?`)
	page, err = queryMedia(ctx, tx, query, q.ServerName, q.UserID, q.Limit, max(q.Offset, 0))
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", what, err)
	}
	return page, total, nil
}

// ListUsage returns a page of per-user usage of ready local media on
// q.ServerName, ordered by q.OrderBy then user ID ascending (byte order),
// and how many users match, from one snapshot. UserIDContains matches
// case-insensitively (ASCII letters on SQLite).
func (s *Store) ListUsage(ctx context.Context, q storage.UsageQuery) (page []storage.Usage, total int64, err error) {
	what := "listing media usage of " + q.ServerName
	if q.ServerName == "" {
		return nil, 0, fmt.Errorf("%s: server name is required", what)
	}
	var key string
	switch q.OrderBy {
	case storage.UsageByUserID, "":
		key = s.binary("user_id")
	case storage.UsageByBytes:
		key = "bytes"
	case storage.UsageByCount:
		key = "n"
	default:
		return nil, 0, fmt.Errorf("%s: unknown order %q", what, q.OrderBy)
	}
	dir := "ASC"
	if q.Descending {
		dir = "DESC"
	}
	where := `server_name = ? AND state = 'ready' AND remote = ` + s.boolLit(false)
	args := []any{q.ServerName}
	if !q.CreatedFrom.IsZero() {
		where += ` AND created_ts >= ?`
		args = append(args, q.CreatedFrom.UnixMilli())
	}
	if !q.CreatedUntil.IsZero() {
		where += ` AND created_ts <= ?`
		args = append(args, q.CreatedUntil.UnixMilli())
	}
	if q.UserIDContains != "" {
		if s.dialect == dialectPostgres {
			where += ` AND strpos(lower(user_id), ?) > 0`
		} else {
			where += ` AND instr(lower(user_id), ?) > 0`
		}
		args = append(args, strings.ToLower(q.UserIDContains))
	}
	tx, err := s.readTx(ctx)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: beginning transaction: %w", what, classify(err))
	}
	defer func() { _ = tx.Rollback() }()
	countQuery := s.dialect.rebind(`SELECT COUNT(DISTINCT user_id) FROM media WHERE ` + where)
	if err := tx.QueryRowContext(ctx, countQuery, args...).Scan(&total); err != nil {
		return nil, 0, fmt.Errorf("%s: counting users: %w", what, classify(err))
	}
	if q.Limit <= 0 {
		return nil, total, nil
	}
	pageQuery := s.dialect.rebind(`SELECT user_id, COUNT(*) AS n, CAST(COALESCE(SUM(size), 0) AS BIGINT) AS bytes
		FROM media WHERE ` + where + `
		GROUP BY user_id ORDER BY ` + key + ` ` + dir + `, ` + s.binary("user_id") + ` ASC LIMIT ? OFFSET ?`)
	rows, err := tx.QueryContext(ctx, pageQuery, append(args, q.Limit, max(q.Offset, 0))...)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", what, classify(err))
	}
	defer rows.Close()
	for rows.Next() {
		var u storage.Usage
		if err := rows.Scan(&u.UserID, &u.Count, &u.Bytes); err != nil {
			return nil, 0, fmt.Errorf("%s: reading row: %w", what, classify(err))
		}
		page = append(page, u)
	}
	if err := rows.Err(); err != nil {
		return nil, 0, fmt.Errorf("%s: %w", what, classify(err))
	}
	return page, total, nil
}

// ListOldMedia returns a page of ready media selected by q, ordered by
// (ServerName, MediaID) in the database's order of text. The page is a
// range scan of the index media_ready_by_kind (or of the primary key when
// q.ServerName is set) from q.After, so paging through a table whose
// selected rows are deleted as they are listed reads each row once.
// SizeGreaterThan applies as given: 0 leaves out empty items, a negative
// value selects every size.
func (s *Store) ListOldMedia(ctx context.Context, q storage.OldMediaQuery) ([]storage.Media, error) {
	if q.Before.IsZero() {
		return nil, errors.New("listing old media: no cutoff time")
	}
	if q.Limit <= 0 {
		return nil, nil
	}
	var b strings.Builder
	b.WriteString(mediaSelect)
	b.WriteString(` WHERE m.state = 'ready' AND m.remote = ` + s.boolLit(q.Remote) + `
		AND COALESCE(m.last_access_ts, m.created_ts, 0) < ? AND m.size > ?`)
	args := []any{q.Before.UnixMilli(), q.SizeGreaterThan}
	if q.ServerName != "" {
		b.WriteString(` AND m.server_name = ?`)
		args = append(args, q.ServerName)
	}
	b.WriteString(` AND (m.server_name, m.media_id) > (?, ?)`)
	args = append(args, q.After.ServerName, q.After.MediaID)
	if !q.IncludeQuarantined {
		b.WriteString(` AND q.sha256 IS NULL`)
	}
	if !q.IncludeProtected {
		b.WriteString(` AND m.protected = ` + s.boolLit(false))
	}
	b.WriteString(` ORDER BY m.server_name, m.media_id LIMIT ?`)
	args = append(args, q.Limit)
	out, err := queryMedia(ctx, s.read, s.dialect.rebind(b.String()), args...)
	if err != nil {
		return nil, fmt.Errorf("listing old media: %w", err)
	}
	return out, nil
}

// sortedRefs returns refs sorted by (ServerName, MediaID) in byte order,
// without duplicates. Rows are locked in that order, so that concurrent
// deletions and access updates of overlapping items never deadlock.
func sortedRefs(refs []storage.MediaRef) []storage.MediaRef {
	out := slices.Clone(refs)
	slices.SortFunc(out, func(a, b storage.MediaRef) int {
		return cmp.Or(strings.Compare(a.ServerName, b.ServerName), strings.Compare(a.MediaID, b.MediaID))
	})
	return slices.Compact(out)
}

// refValues returns "(VALUES (?, ?), …)" for n refs and appends their
// parameters to args.
func refValues(refs []storage.MediaRef, args []any) (string, []any) {
	var b strings.Builder
	b.WriteString("(VALUES ")
	for i, r := range refs {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("(?, ?)")
		args = append(args, r.ServerName, r.MediaID)
	}
	b.WriteString(")")
	return b.String(), args
}

// DeleteMedia deletes the given media rows (in any state) and their
// thumbnails in one transaction: per chunk of items, it reads the rows,
// deletes their thumbnails (returning their blobs' hashes), then the rows;
// missing rows are skipped. With tombstone every
// deleted ID is recorded in deleted_media, which makes InsertMedia and
// CreatePending refuse it.
//
// On PostgreSQL the rows are first locked (SELECT … FOR UPDATE) in byte
// order of their keys, which keeps concurrent deletions and RecordAccess
// (same order) from deadlocking, and makes a concurrent InsertThumbnail of
// one of them (its foreign key check) wait, so no thumbnail escapes the
// list of hashes. The transaction touches neither blobs nor quarantine rows,
// so uploads never wait for it except on the rows it deletes and on the
// usage counters of their owners.
//
// Deleted rows that count for a user (see quota.go) are subtracted from the
// user's counters in the same transaction; on PostgreSQL those counters are
// locked before the rows (lockUsersOf), the order every upload takes them in.
func (s *Store) DeleteMedia(ctx context.Context, refs []storage.MediaRef, tombstone bool, at time.Time) (out storage.DeletedMedia, err error) {
	refs = sortedRefs(refs)
	if len(refs) == 0 {
		return out, nil
	}
	what := fmt.Sprintf("deleting %d media item(s)", len(refs))
	tx, err := s.beginWrite(ctx)
	if err != nil {
		return out, fmt.Errorf("%s: beginning transaction: %w", what, classify(err))
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	if err := s.lockUsersOf(ctx, tx, refs); err != nil {
		return out, fmt.Errorf("%s: %w", what, err)
	}
	usage := map[string]usageSum{}
	history := map[historyKey]usageSum{}
	blobs := map[string]bool{}
	for chunk := range slices.Chunk(refs, deleteChunk) {
		values, args := refValues(chunk, nil)
		lock := ""
		if s.dialect == dialectPostgres {
			lock = " FOR UPDATE OF m"
		}
		rows, err := queryMedia(ctx, tx, s.dialect.rebind(mediaSelect+
			` WHERE (m.server_name, m.media_id) IN `+values+
			` ORDER BY `+s.binary("m.server_name")+`, `+s.binary("m.media_id")+lock), args...)
		if err != nil {
			return storage.DeletedMedia{}, fmt.Errorf("%s: reading rows: %w", what, err)
		}
		if len(rows) == 0 {
			continue
		}
		found := make([]storage.MediaRef, len(rows))
		for i, m := range rows {
			found[i] = storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID}
			if m.SHA256 != "" {
				blobs[m.SHA256] = true
			}
			if m.State == storage.StateReady && counts(m) {
				u := usage[m.UserID]
				u.bytes += m.Size
				u.files++
				usage[m.UserID] = u
				k := historyKey{m.UserID, historyMinute(rowMillis(m))}
				h := history[k]
				h.bytes += m.Size
				h.files++
				history[k] = h
			}
		}
		// The thumbnails are deleted explicitly (rather than by the
		// cascade) to learn their hashes in the same statement.
		values, args = refValues(found, nil)
		trows, err := tx.QueryContext(ctx, s.dialect.rebind(`DELETE FROM thumbnails
			WHERE (server_name, media_id) IN `+values+` RETURNING sha256`), args...)
		if err != nil {
			return storage.DeletedMedia{}, fmt.Errorf("%s: deleting thumbnails: %w", what, classify(err))
		}
		for trows.Next() {
			var sha string
			if err := trows.Scan(&sha); err != nil {
				trows.Close()
				return storage.DeletedMedia{}, fmt.Errorf("%s: deleting thumbnails: %w", what, classify(err))
			}
			blobs[sha] = true
			out.Thumbnails++
		}
		if err := trows.Err(); err != nil {
			return storage.DeletedMedia{}, fmt.Errorf("%s: deleting thumbnails: %w", what, classify(err))
		}
		trows.Close()
		if _, err := tx.ExecContext(ctx, s.dialect.rebind(`DELETE FROM media WHERE (server_name, media_id) IN `+values), args...); err != nil {
			return storage.DeletedMedia{}, fmt.Errorf("%s: %w", what, classify(err))
		}
		if tombstone {
			var b strings.Builder
			targs := make([]any, 0, 3*len(found))
			for i, r := range found {
				if i > 0 {
					b.WriteString(", ")
				}
				b.WriteString("(?, ?, ?)")
				targs = append(targs, r.ServerName, r.MediaID, at.UnixMilli())
			}
			if _, err := tx.ExecContext(ctx, s.dialect.rebind(`INSERT INTO deleted_media (server_name, media_id, deleted_ts) VALUES `+
				b.String()+` ON CONFLICT (server_name, media_id) DO NOTHING`), targs...); err != nil {
				return storage.DeletedMedia{}, fmt.Errorf("%s: recording tombstones: %w", what, classify(err))
			}
		}
		out.Media = append(out.Media, rows...)
	}
	if err := s.subtractUsage(ctx, tx, usage); err != nil {
		return storage.DeletedMedia{}, fmt.Errorf("%s: %w", what, err)
	}
	if err := s.subtractHistory(ctx, tx, history); err != nil {
		return storage.DeletedMedia{}, fmt.Errorf("%s: %w", what, err)
	}
	if err := tx.Commit(); err != nil {
		return storage.DeletedMedia{}, fmt.Errorf("%s: committing: %w", what, classify(err))
	}
	for sha := range blobs {
		out.Blobs = append(out.Blobs, sha)
	}
	slices.Sort(out.Blobs)
	return out, nil
}

// RecordAccess moves the last access of each item forward to its At (never
// backwards) in one transaction, one prepared UPDATE per distinct item, in
// byte order of the keys (see DeleteMedia); unknown items are skipped.
func (s *Store) RecordAccess(ctx context.Context, accesses []storage.Access) error {
	if err := s.recordAccess(ctx, accesses); err != nil {
		return fmt.Errorf("recording media access: %w", err)
	}
	return nil
}

// RecordThumbnailAccess records reads of thumbnails: they share their media
// item's last access (media.last_access_ts), so a thumbnail read keeps the
// item (and its thumbnails) from ageing out, exactly like RecordAccess.
func (s *Store) RecordThumbnailAccess(ctx context.Context, accesses []storage.Access) error {
	if err := s.recordAccess(ctx, accesses); err != nil {
		return fmt.Errorf("recording thumbnail access: %w", err)
	}
	return nil
}

func (s *Store) recordAccess(ctx context.Context, accesses []storage.Access) (err error) {
	if len(accesses) == 0 {
		return nil
	}
	latest := make(map[storage.MediaRef]int64, len(accesses))
	refs := make([]storage.MediaRef, 0, len(accesses))
	for _, a := range accesses {
		ms := a.At.UnixMilli()
		if prev, ok := latest[a.MediaRef]; !ok {
			refs = append(refs, a.MediaRef)
			latest[a.MediaRef] = ms
		} else if ms > prev {
			latest[a.MediaRef] = ms
		}
	}
	refs = sortedRefs(refs)
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("beginning transaction: %w", classify(err))
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	stmt, err := tx.PrepareContext(ctx, s.q.recordAccess)
	if err != nil {
		return fmt.Errorf("preparing: %w", classify(err))
	}
	defer stmt.Close()
	for _, r := range refs {
		ms := latest[r]
		if _, err := stmt.ExecContext(ctx, ms, r.ServerName, r.MediaID, ms); err != nil {
			return fmt.Errorf("updating %s/%s: %w", r.ServerName, r.MediaID, classify(err))
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("committing: %w", classify(err))
	}
	return nil
}

var _ storage.MediaLookup = (*Store)(nil)

// LookupMedia returns the media rows and tombstones of refs, per chunk of
// deleteChunk refs in one query each (rows, then tombstones, joined with
// UNION ALL).
func (s *Store) LookupMedia(ctx context.Context, refs []storage.MediaRef) (map[storage.MediaRef]storage.MediaPresence, error) {
	refs = sortedRefs(refs)
	out := make(map[storage.MediaRef]storage.MediaPresence, len(refs))
	for chunk := range slices.Chunk(refs, deleteChunk) {
		values, args := refValues(chunk, nil)
		_, args = refValues(chunk, args)
		rows, err := s.read.QueryContext(ctx, s.dialect.rebind(
			`SELECT server_name, media_id, state, sha256, size, 0 FROM media WHERE (server_name, media_id) IN `+values+`
			UNION ALL
			SELECT server_name, media_id, '', NULL, 0, 1 FROM deleted_media WHERE (server_name, media_id) IN `+values), args...)
		if err != nil {
			return nil, fmt.Errorf("looking up %d media item(s): %w", len(refs), classify(err))
		}
		if err := scanPresence(rows, out); err != nil {
			return nil, fmt.Errorf("looking up %d media item(s): %w", len(refs), err)
		}
	}
	return out, nil
}

// scanPresence reads the rows of LookupMedia into out; a row wins over a
// tombstone of the same ref.
func scanPresence(rows *sql.Rows, out map[storage.MediaRef]storage.MediaPresence) error {
	defer rows.Close()
	for rows.Next() {
		var (
			ref     storage.MediaRef
			p       storage.MediaPresence
			state   string
			sha     sql.NullString
			deleted int
		)
		if err := rows.Scan(&ref.ServerName, &ref.MediaID, &state, &sha, &p.Size, &deleted); err != nil {
			return fmt.Errorf("reading row: %w", classify(err))
		}
		p.State, p.SHA256, p.Deleted = storage.MediaState(state), sha.String, deleted == 1
		if prev, ok := out[ref]; ok && !prev.Deleted {
			continue
		}
		out[ref] = p
	}
	if err := rows.Err(); err != nil {
		return classify(err)
	}
	return nil
}
