package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

var _ storage.QuotaStore = (*Store)(nil)

// Per-user usage (migration 6, table user_usage).
//
// A media row counts for its user when it is ready, local and has a user ID
// (countedRow). Every transaction that makes a row count (InsertMedia,
// CompletePending and their Limited forms) first adds to the user's counter
// with one upsert (addUsage) and only then writes the media row; DeleteMedia
// subtracts in the transaction that deletes the rows. So the counters are
// exact at every commit.
//
// Locking. On PostgreSQL the upsert takes the row lock of the user's
// counter (an INSERT … ON CONFLICT DO UPDATE locks the row it conflicts
// with; a new row is locked by its unique index entry until commit), and
// every writer of a user's counted rows takes that lock before touching the
// rows: inserts and completions before writing the row, DeleteMedia before
// locking the rows it deletes (it locks the counters of every user owning one
// of them first, in byte order). Hence:
//   - a Limited insert holding the lock sees, in a READ COMMITTED statement
//     run after it, every counted row of the user that exists or will ever
//     commit before it: the rolling-window sums are exact, also against other
//     store instances on the same database;
//   - counter locks are always taken before media row locks, so uploads and
//     deletions never deadlock on them.
//
// On SQLite every write transaction is BEGIN IMMEDIATE on the store's single
// write connection (and waits for the file lock held by other processes), so
// writers are serialized from their first statement and none ever has to
// upgrade a read lock.

// countedRow is the condition on a media row (no alias) under which it
// counts for its user, with the remote flag written literally as in the
// partial index media_user_uploaded.
func (s *Store) countedRow() string {
	return `state = 'ready' AND remote = ` + s.boolLit(false) + ` AND user_id <> ''`
}

// uploadedTS is a media row's upload time for the rolling windows: the
// upload time, or the creation time for rows without one. It is the
// expression of the index media_user_uploaded.
const uploadedTS = `COALESCE(uploaded_ts, created_ts, 0)`

// counts reports whether the ready row m counts for a user.
func counts(m storage.Media) bool {
	return m.UserID != "" && !m.Remote
}

// beginWrite begins a write transaction: READ COMMITTED on PostgreSQL (every
// statement sees what committed before it started, which the quota checks
// rely on whatever the server's default isolation), BEGIN IMMEDIATE on
// SQLite (the write pool's DSN says so).
func (s *Store) beginWrite(ctx context.Context) (*sql.Tx, error) {
	if s.dialect == dialectPostgres {
		return s.write.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelReadCommitted})
	}
	return s.write.BeginTx(ctx, nil)
}

// addUsage adds bytes and files to the counters of user (creating them) and
// returns the new values. On PostgreSQL it leaves the counter row locked
// until the end of tx.
func (s *Store) addUsage(ctx context.Context, tx *sql.Tx, user string, bytes, files int64) (newBytes, newFiles int64, err error) {
	if err := tx.QueryRowContext(ctx, s.q.addUsage, user, bytes, files).Scan(&newBytes, &newFiles); err != nil {
		return 0, 0, fmt.Errorf("updating usage of %s: %w", user, classify(err))
	}
	return newBytes, newFiles, nil
}

// checkLimits checks lim for an item of size bytes of user, whose counters
// are already newBytes and newFiles with the item added. It runs in tx after
// addUsage (so under the user's lock) and returns a *storage.QuotaExceededError
// for the first limit exceeded: stored bytes, stored files, then each window
// in order, bytes before files.
func (s *Store) checkLimits(ctx context.Context, tx *sql.Tx, user string, size, newBytes, newFiles int64, lim storage.UploadLimits) error {
	if lim.MaxBytes > 0 && newBytes > lim.MaxBytes {
		return &storage.QuotaExceededError{Limit: storage.LimitBytes, Used: newBytes - size, Adding: size, Max: lim.MaxBytes}
	}
	if lim.MaxFiles > 0 && newFiles > lim.MaxFiles {
		return &storage.QuotaExceededError{Limit: storage.LimitFiles, Used: newFiles - 1, Adding: 1, Max: lim.MaxFiles}
	}
	var windows []storage.WindowLimit
	for _, w := range lim.Windows {
		if w.MaxBytes > 0 || w.MaxFiles > 0 {
			windows = append(windows, w)
		}
	}
	if len(windows) == 0 {
		return nil
	}
	now := lim.Now
	if now.IsZero() {
		now = time.Now()
	}
	sums, err := s.windowSums(ctx, tx, user, now, windows)
	if err != nil {
		return err
	}
	for i, w := range windows {
		if w.MaxBytes > 0 && sums[i].bytes+size > w.MaxBytes {
			return &storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: w.Window, Used: sums[i].bytes, Adding: size, Max: w.MaxBytes}
		}
		if w.MaxFiles > 0 && sums[i].files+1 > w.MaxFiles {
			return &storage.QuotaExceededError{Limit: storage.LimitWindowFiles, Window: w.Window, Used: sums[i].files, Adding: 1, Max: w.MaxFiles}
		}
	}
	return nil
}

// validLimits rejects windows of no length.
func validLimits(lim storage.UploadLimits) error {
	for _, w := range lim.Windows {
		if w.Window <= 0 {
			return fmt.Errorf("invalid upload limits: window of %s (must be positive)", w.Window)
		}
	}
	return nil
}

// usageSum is what a user uploaded within one window.
type usageSum struct{ bytes, files int64 }

// windowQuery is the query of windowSums for n windows. Its parameters are
// the cutoff of each window twice, then the user ID and the oldest cutoff;
// its columns the bytes and files of each window.
func (s *Store) windowQuery(n int) string {
	cols := make([]string, 0, 2*n)
	for range n {
		cols = append(cols,
			`CAST(COALESCE(SUM(CASE WHEN `+uploadedTS+` >= ? THEN size ELSE 0 END), 0) AS BIGINT)`,
			`CAST(COALESCE(SUM(CASE WHEN `+uploadedTS+` >= ? THEN 1 ELSE 0 END), 0) AS BIGINT)`)
	}
	return s.dialect.rebind(`SELECT ` + strings.Join(cols, ", ") + ` FROM media
		WHERE user_id = ? AND ` + s.countedRow() + ` AND ` + uploadedTS + ` >= ?`)
}

// windowSums sums the user's counted rows uploaded at or after now minus
// each window, in one range scan of media_user_uploaded from the oldest
// cutoff.
func (s *Store) windowSums(ctx context.Context, tx *sql.Tx, user string, now time.Time, windows []storage.WindowLimit) ([]usageSum, error) {
	args := make([]any, 0, 2*len(windows)+2)
	oldest := now.UnixMilli()
	for _, w := range windows {
		cutoff := now.Add(-w.Window).UnixMilli()
		oldest = min(oldest, cutoff)
		args = append(args, cutoff, cutoff)
	}
	args = append(args, user, oldest)
	out := make([]usageSum, len(windows))
	dest := make([]any, 0, 2*len(windows))
	for i := range out {
		dest = append(dest, &out[i].bytes, &out[i].files)
	}
	if err := tx.QueryRowContext(ctx, s.windowQuery(len(windows)), args...).Scan(dest...); err != nil {
		return nil, fmt.Errorf("summing recent uploads of %s: %w", user, classify(err))
	}
	return out, nil
}

// InsertMediaLimited is InsertMedia checking lim for m.UserID in the same
// transaction: the user's counters are updated first (which, on
// PostgreSQL, locks them), then the stored totals and the rolling windows
// are checked, then the row is inserted. An item exceeding a limit gives a
// *storage.QuotaExceededError and writes nothing. A row that does not count
// (remote, or without a user ID) is inserted without checks.
func (s *Store) InsertMediaLimited(ctx context.Context, m storage.Media, lim storage.UploadLimits) error {
	return s.insertMedia(ctx, m, &lim)
}

// CompletePendingLimited is CompletePending checking lim for m.UserID in
// the same transaction, like InsertMediaLimited. The limits are checked
// before the item's state is, so an item over quota gives a
// *storage.QuotaExceededError even if it has expired meanwhile.
func (s *Store) CompletePendingLimited(ctx context.Context, m storage.Media, lim storage.UploadLimits) error {
	return s.completePending(ctx, m, &lim)
}

// UserUsage returns the counters of userID; a user with none has zero
// counters.
func (s *Store) UserUsage(ctx context.Context, userID string) (storage.UserUsage, error) {
	u := storage.UserUsage{UserID: userID}
	err := s.read.QueryRowContext(ctx, s.q.getUsage, userID).Scan(&u.Bytes, &u.Files)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return storage.UserUsage{}, fmt.Errorf("reading usage of %s: %w", userID, classify(err))
	}
	return u, nil
}

// UploadedSince sums the bytes and files of userID's counted media rows
// whose upload time (creation time when none) is at or after since.
func (s *Store) UploadedSince(ctx context.Context, userID string, since time.Time) (bytes, files int64, err error) {
	if err := s.read.QueryRowContext(ctx, s.q.uploadedSince, userID, since.UnixMilli()).Scan(&bytes, &files); err != nil {
		return 0, 0, fmt.Errorf("summing uploads of %s since %s: %w", userID, since.Format(time.RFC3339), classify(err))
	}
	return bytes, files, nil
}

// TopUsage lists up to limit users with the most bytes stored, most first,
// ties by user ID in byte order, skipping users whose counters are both
// zero. A limit of 0 or less returns nothing.
func (s *Store) TopUsage(ctx context.Context, limit int) ([]storage.UserUsage, error) {
	if limit <= 0 {
		return nil, nil
	}
	rows, err := s.read.QueryContext(ctx, s.q.topUsage, limit)
	if err != nil {
		return nil, fmt.Errorf("listing top usage: %w", classify(err))
	}
	defer rows.Close()
	var out []storage.UserUsage
	for rows.Next() {
		var u storage.UserUsage
		if err := rows.Scan(&u.UserID, &u.Bytes, &u.Files); err != nil {
			return nil, fmt.Errorf("listing top usage: reading row: %w", classify(err))
		}
		out = append(out, u)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing top usage: %w", classify(err))
	}
	return out, nil
}

// RecountUsage rebuilds the counters of userID (every user when empty) from
// the media rows in one transaction and returns how many users' counters
// changed; counters that come out zero are removed. It is exact against
// concurrent writers: for one user it first locks (creating) the user's
// counter row; for every user it locks the whole table on PostgreSQL (LOCK
// TABLE … IN EXCLUSIVE MODE, which holds off uploads and deletions of local
// media for the duration of one GROUP BY over the media rows).
func (s *Store) RecountUsage(ctx context.Context, userID string) (changed int64, err error) {
	what := "recounting usage of every user"
	if userID != "" {
		what = "recounting usage of " + userID
	}
	tx, err := s.beginWrite(ctx)
	if err != nil {
		return 0, fmt.Errorf("%s: beginning transaction: %w", what, classify(err))
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	stored := map[string]usageSum{}
	if userID != "" {
		var u usageSum
		if err := tx.QueryRowContext(ctx, s.q.lockUsage, userID).Scan(&u.bytes, &u.files); err != nil {
			return 0, fmt.Errorf("%s: locking counters: %w", what, classify(err))
		}
		stored[userID] = u
	} else {
		if s.dialect == dialectPostgres {
			if _, err := tx.ExecContext(ctx, `LOCK TABLE user_usage IN EXCLUSIVE MODE`); err != nil {
				return 0, fmt.Errorf("%s: locking counters: %w", what, classify(err))
			}
		}
		if err := scanUsage(ctx, tx, `SELECT user_id, bytes, files FROM user_usage`, nil, stored); err != nil {
			return 0, fmt.Errorf("%s: reading counters: %w", what, err)
		}
	}
	actual := map[string]usageSum{}
	query := `SELECT user_id, CAST(COALESCE(SUM(size), 0) AS BIGINT), COUNT(*) FROM media WHERE ` + s.countedRow()
	var args []any
	if userID != "" {
		query += ` AND user_id = ?`
		args = append(args, userID)
	}
	if err := scanUsage(ctx, tx, s.dialect.rebind(query+` GROUP BY user_id`), args, actual); err != nil {
		return 0, fmt.Errorf("%s: summing media: %w", what, err)
	}
	users := slices.Sorted(maps.Keys(stored))
	for u := range actual {
		if _, ok := stored[u]; !ok {
			users = append(users, u)
		}
	}
	slices.Sort(users)
	for _, u := range users {
		want, have := actual[u], stored[u]
		if want != have {
			changed++
		}
		switch {
		case want == (usageSum{}):
			// Also removes the zero row locking a single user created.
			if _, err := tx.ExecContext(ctx, s.q.deleteUsage, u); err != nil {
				return 0, fmt.Errorf("%s: removing counters of %s: %w", what, u, classify(err))
			}
		case want != have:
			if _, err := tx.ExecContext(ctx, s.q.setUsage, u, want.bytes, want.files); err != nil {
				return 0, fmt.Errorf("%s: writing counters of %s: %w", what, u, classify(err))
			}
		}
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("%s: committing: %w", what, classify(err))
	}
	return changed, nil
}

// scanUsage reads rows of (user_id, bytes, files) into out.
func scanUsage(ctx context.Context, tx *sql.Tx, query string, args []any, out map[string]usageSum) error {
	rows, err := tx.QueryContext(ctx, query, args...)
	if err != nil {
		return classify(err)
	}
	defer rows.Close()
	for rows.Next() {
		var (
			user string
			u    usageSum
		)
		if err := rows.Scan(&user, &u.bytes, &u.files); err != nil {
			return fmt.Errorf("reading row: %w", classify(err))
		}
		out[user] = u
	}
	if err := rows.Err(); err != nil {
		return classify(err)
	}
	return nil
}

// lockUsersOf locks, on PostgreSQL, the counters of every user owning one
// of refs (in any state), in byte order of the user IDs, before DeleteMedia
// locks the rows themselves (see the locking notes above). The owners are
// read without locks; a user ID never changes on a row, so only a row
// deleted and inserted again for another user in between could escape,
// which at worst costs a deadlock error, never a wrong counter.
func (s *Store) lockUsersOf(ctx context.Context, tx *sql.Tx, refs []storage.MediaRef) error {
	if s.dialect != dialectPostgres {
		return nil
	}
	users := map[string]bool{}
	for chunk := range slices.Chunk(refs, deleteChunk) {
		values, args := refValues(chunk, nil)
		rows, err := tx.QueryContext(ctx, s.dialect.rebind(`SELECT DISTINCT user_id FROM media
			WHERE (server_name, media_id) IN `+values+` AND user_id <> ''`), args...)
		if err != nil {
			return fmt.Errorf("reading owners: %w", classify(err))
		}
		for rows.Next() {
			var u string
			if err := rows.Scan(&u); err != nil {
				rows.Close()
				return fmt.Errorf("reading owners: %w", classify(err))
			}
			users[u] = true
		}
		err = rows.Err()
		rows.Close()
		if err != nil {
			return fmt.Errorf("reading owners: %w", classify(err))
		}
	}
	sorted := slices.Sorted(maps.Keys(users))
	for chunk := range slices.Chunk(sorted, 2*deleteChunk) {
		args := make([]any, len(chunk))
		for i, u := range chunk {
			args[i] = u
		}
		marks := strings.TrimSuffix(strings.Repeat("?, ", len(chunk)), ", ")
		rows, err := tx.QueryContext(ctx, s.dialect.rebind(`SELECT user_id FROM user_usage WHERE user_id IN (`+marks+`)
			ORDER BY `+s.binary("user_id")+` FOR UPDATE`), args...)
		if err != nil {
			return fmt.Errorf("locking usage counters: %w", classify(err))
		}
		for rows.Next() {
		}
		err = rows.Err()
		rows.Close()
		if err != nil {
			return fmt.Errorf("locking usage counters: %w", classify(err))
		}
	}
	return nil
}

// subtractUsage takes the deleted counted rows out of their users'
// counters, in byte order of the user IDs.
func (s *Store) subtractUsage(ctx context.Context, tx *sql.Tx, deleted map[string]usageSum) error {
	for _, u := range slices.Sorted(maps.Keys(deleted)) {
		d := deleted[u]
		if _, err := tx.ExecContext(ctx, s.q.subtractUsage, d.bytes, d.files, u); err != nil {
			return fmt.Errorf("updating usage of %s: %w", u, classify(err))
		}
	}
	return nil
}
