package sqlstore

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"maps"
	"math"
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

// Rolling windows (migration 7, table user_upload_minutes).
//
// Next to the counters, every transaction that makes a row count (or stop
// counting) adds its bytes and one file to (or subtracts them from) the
// user's entry for the minute of the row's upload time (historyMinute), in
// the same transaction and under the same counter lock. A window from
// cutoff to now is then the sum of the minutes after the cutoff's minute
// (at most one entry per minute, however many uploads) plus the part of
// the cutoff's own minute at or after the cutoff (the edge).
//
// The edge is decided lazily: the sums first take the cutoff's whole
// minute, which can only over-count. Only when that over-count would refuse
// the upload (or, before a body of unknown length, bound it below what it
// may have anyway) are the rows of that one minute after the cutoff read
// from media_user_uploaded, for the exact answer. So an upload that fits
// comfortably costs one index range over the user's minutes; a decision
// at the limit also reads at most one minute of the user's rows.

// historyMinute is the minute of the upload history of a row uploaded (or,
// without an upload time, created) at ms Unix milliseconds. The division
// truncates, as SQL's integer division does in the migration's backfill and
// in RecountUsage.
func historyMinute(ms int64) int64 { return ms / 60000 }

// rowMillis is the upload time of m as uploadedTS computes it from the
// row: its upload time, else its creation time, else 0.
func rowMillis(m storage.Media) int64 {
	switch {
	case !m.UploadedAt.IsZero():
		return m.UploadedAt.UnixMilli()
	case !m.CreatedAt.IsZero():
		return m.CreatedAt.UnixMilli()
	}
	return 0
}

// addHistory adds one row of size bytes uploaded at ms to user's history,
// in tx after addUsage (under the user's counter lock).
func (s *Store) addHistory(ctx context.Context, tx *sql.Tx, user string, ms, size int64) error {
	if _, err := tx.ExecContext(ctx, s.q.addMinute, user, historyMinute(ms), size, 1); err != nil {
		return fmt.Errorf("updating upload history of %s: %w", user, classify(err))
	}
	return nil
}

// historyKey is one minute of one user's history.
type historyKey struct {
	user   string
	minute int64
}

// subtractHistory takes deleted counted rows out of their users' history,
// in byte order of the user IDs, then by minute. Minutes already pruned are
// left alone (the UPDATE finds nothing).
func (s *Store) subtractHistory(ctx context.Context, tx *sql.Tx, deleted map[historyKey]usageSum) error {
	keys := slices.SortedFunc(maps.Keys(deleted), func(a, b historyKey) int {
		if c := strings.Compare(a.user, b.user); c != 0 {
			return c
		}
		return cmp.Compare(a.minute, b.minute)
	})
	for _, k := range keys {
		d := deleted[k]
		if _, err := tx.ExecContext(ctx, s.q.subtractMinute, d.bytes, d.files, k.user, k.minute); err != nil {
			return fmt.Errorf("updating upload history of %s: %w", k.user, classify(err))
		}
	}
	return nil
}

// cachedWindowQueries is how many windows the prepared window queries
// cover; more are built on demand.
const cachedWindowQueries = 4

// windowQuery is the query of windowSums for n windows. With usage, its
// first two columns are the user's counters (zero when none) and its first
// two parameters the user ID. Then, per window, the parameters are the
// last minute before the window's whole minutes twice and its edge minute
// twice, and the columns the bytes and files of the whole minutes and of
// the edge minute; the last parameters are the user ID and the oldest
// minute read.
func windowQuery(d dialect, n int, usage bool) string {
	cols := make([]string, 0, 4*n+2)
	if usage {
		cols = append(cols,
			`COALESCE((SELECT bytes FROM user_usage WHERE user_id = ?), 0)`,
			`COALESCE((SELECT files FROM user_usage WHERE user_id = ?), 0)`)
	}
	for range n {
		cols = append(cols,
			`CAST(COALESCE(SUM(CASE WHEN minute > ? THEN bytes ELSE 0 END), 0) AS BIGINT)`,
			`CAST(COALESCE(SUM(CASE WHEN minute > ? THEN files ELSE 0 END), 0) AS BIGINT)`,
			`CAST(COALESCE(SUM(CASE WHEN minute = ? THEN bytes ELSE 0 END), 0) AS BIGINT)`,
			`CAST(COALESCE(SUM(CASE WHEN minute = ? THEN files ELSE 0 END), 0) AS BIGINT)`)
	}
	return d.rebind(`SELECT ` + strings.Join(cols, ", ") + ` FROM user_upload_minutes WHERE user_id = ? AND minute >= ?`)
}

// noMinute is an edge minute that matches no history entry.
const noMinute = math.MinInt64

// windowSpan is how windowSums splits one window ending now.
type windowSpan struct {
	// cutoff is the window's start (Unix milliseconds, inclusive).
	cutoff int64
	// after is the last minute not wholly inside the window: minutes after
	// it are.
	after int64
	// edge is the minute holding the cutoff when the cutoff is not on a
	// minute boundary (noMinute otherwise): only part of it is inside.
	edge int64
	// whole and edgeSum are the sums of the whole minutes and of the whole
	// edge minute.
	whole, edgeSum usageSum
}

// spanFrom splits the window starting at cutoff.
func spanFrom(cutoff int64) windowSpan {
	m := historyMinute(cutoff)
	if cutoff == m*60000 {
		return windowSpan{cutoff: cutoff, after: m - 1, edge: noMinute}
	}
	return windowSpan{cutoff: cutoff, after: m, edge: m}
}

// rowQuerier runs single-row queries: a *sql.Tx or a *sql.DB.
type rowQuerier interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// windowSums reads, in one query, the history of user for the windows
// starting at cutoffs (at least one; whole minutes and edge minutes, see
// windowSpan) and, when usage is set, the user's counters.
func (s *Store) windowSums(ctx context.Context, q rowQuerier, user string, cutoffs []int64, usage bool) (storage.UserUsage, []windowSpan, error) {
	spans := make([]windowSpan, len(cutoffs))
	args := make([]any, 0, 4*len(cutoffs)+4)
	if usage {
		args = append(args, user, user)
	}
	oldest := int64(math.MaxInt64)
	for i, c := range cutoffs {
		spans[i] = spanFrom(c)
		sp := spans[i]
		oldest = min(oldest, sp.after+1)
		if sp.edge != noMinute {
			oldest = min(oldest, sp.edge)
		}
		args = append(args, sp.after, sp.after, sp.edge, sp.edge)
	}
	args = append(args, user, oldest)
	var u storage.UserUsage
	dest := make([]any, 0, 4*len(spans)+2)
	if usage {
		dest = append(dest, &u.Bytes, &u.Files)
	}
	for i := range spans {
		sp := &spans[i]
		dest = append(dest, &sp.whole.bytes, &sp.whole.files, &sp.edgeSum.bytes, &sp.edgeSum.files)
	}
	query := ""
	switch {
	case len(cutoffs) <= cachedWindowQueries && usage:
		query = s.q.usageWindowQueries[len(cutoffs)]
	case len(cutoffs) <= cachedWindowQueries:
		query = s.q.windowQueries[len(cutoffs)]
	default:
		query = windowQuery(s.dialect, len(cutoffs), usage)
	}
	if err := q.QueryRowContext(ctx, query, args...).Scan(dest...); err != nil {
		return storage.UserUsage{}, nil, fmt.Errorf("summing recent uploads of %s: %w", user, classify(err))
	}
	u.UserID = user
	return u, spans, nil
}

// uploadedBetween sums user's counted rows uploaded at or after from and
// before to (Unix milliseconds).
func (s *Store) uploadedBetween(ctx context.Context, q rowQuerier, user string, from, to int64) (usageSum, error) {
	var u usageSum
	if err := q.QueryRowContext(ctx, s.q.uploadedBetween, user, from, to).Scan(&u.bytes, &u.files); err != nil {
		return usageSum{}, fmt.Errorf("summing uploads of %s: %w", user, classify(err))
	}
	return u, nil
}

// windowUsage is what the spans add up to: each edge minute counts whole
// (an over-count) unless refineEdges replaced it by its exact part.
func windowUsage(spans []windowSpan) []storage.WindowUsage {
	out := make([]storage.WindowUsage, len(spans))
	for i, sp := range spans {
		out[i] = storage.WindowUsage{Bytes: sp.whole.bytes + sp.edgeSum.bytes, Files: sp.whole.files + sp.edgeSum.files}
	}
	return out
}

// refineEdges replaces each span's whole edge minute by the rows of that
// minute at or after the cutoff, and reports whether anything changed.
func (s *Store) refineEdges(ctx context.Context, q rowQuerier, user string, spans []windowSpan) (bool, error) {
	changed := false
	for i := range spans {
		sp := &spans[i]
		if sp.edge == noMinute || sp.edgeSum == (usageSum{}) {
			continue
		}
		exact, err := s.uploadedBetween(ctx, q, user, sp.cutoff, (sp.edge+1)*60000)
		if err != nil {
			return false, err
		}
		if exact != sp.edgeSum {
			changed = true
		}
		sp.edgeSum = exact
	}
	return changed, nil
}

// boundedWindows returns the cutoffs of lim's windows that bound anything,
// for windows ending at now, and the index in lim.Windows of each.
func boundedWindows(lim storage.UploadLimits, now time.Time) ([]int64, []int) {
	var cutoffs []int64
	var index []int
	for i, w := range lim.Windows {
		if w.MaxBytes > 0 || w.MaxFiles > 0 {
			cutoffs = append(cutoffs, now.Add(-w.Window).UnixMilli())
			index = append(index, i)
		}
	}
	return cutoffs, index
}

// withoutUnreachableWindows returns lim without the limits of windows that
// the upload cannot exceed whatever the user uploaded recently: what a
// window holds is part of what the user stores, so a window limit at or
// above the user's stored bytes (or files) with this item is not reached.
// Most users store less than their windows allow; their uploads then skip
// the window sums altogether.
func withoutUnreachableWindows(lim storage.UploadLimits, stored storage.UserUsage, size int64) storage.UploadLimits {
	var windows []storage.WindowLimit
	for i, w := range lim.Windows {
		keepBytes := w.MaxBytes > 0 && stored.Bytes+size > w.MaxBytes
		keepFiles := w.MaxFiles > 0 && stored.Files+1 > w.MaxFiles
		if keepBytes == (w.MaxBytes > 0) && keepFiles == (w.MaxFiles > 0) {
			continue
		}
		if windows == nil {
			windows = slices.Clone(lim.Windows)
		}
		if !keepBytes {
			windows[i].MaxBytes = 0
		}
		if !keepFiles {
			windows[i].MaxFiles = 0
		}
	}
	if windows != nil {
		lim.Windows = windows
	}
	return lim
}

// decide checks one more upload of size bytes by user against lim (see
// storage.QuotaStore.CheckUpload for maxSize). With stored nil it reads the
// user's counters together with the window sums; otherwise stored is what
// the user has before this upload.
func (s *Store) decide(ctx context.Context, q rowQuerier, user string, lim storage.UploadLimits, size, maxSize int64, stored *storage.UserUsage) (storage.Headroom, error) {
	now := lim.Now
	if now.IsZero() {
		now = time.Now()
	}
	if stored != nil && size >= 0 {
		lim = withoutUnreachableWindows(lim, *stored, size)
	}
	cutoffs, index := boundedWindows(lim, now)
	if len(cutoffs) == 0 {
		u := storage.UserUsage{UserID: user}
		if stored != nil {
			u = *stored
		} else if lim.MaxBytes > 0 || lim.MaxFiles > 0 {
			var err error
			if u, err = s.UserUsage(ctx, user); err != nil {
				return storage.Headroom{}, err
			}
		}
		return lim.Check(size, u, nil)
	}
	u, spans, err := s.windowSums(ctx, q, user, cutoffs, stored == nil)
	if err != nil {
		return storage.Headroom{}, err
	}
	if stored != nil {
		u = *stored
	}
	all := func() []storage.WindowUsage {
		sums := make([]storage.WindowUsage, len(lim.Windows))
		for j, w := range windowUsage(spans) {
			sums[index[j]] = w
		}
		return sums
	}
	h, err := lim.Check(size, u, all())
	needExact := errors.Is(err, storage.ErrQuotaExceeded) ||
		(err == nil && size < 0 && h.Bytes >= 0 && (maxSize <= 0 || h.Bytes < maxSize))
	if !needExact {
		return h, err
	}
	changed, rerr := s.refineEdges(ctx, q, user, spans)
	if rerr != nil {
		return storage.Headroom{}, rerr
	}
	if !changed {
		return h, err
	}
	return lim.Check(size, u, all())
}

// checkLimits checks lim for an item of size bytes of user, whose counters
// are already newBytes and newFiles with the item added. It runs in tx after
// addUsage (so under the user's lock) and before the item's history is
// added, and returns a *storage.QuotaExceededError for the first limit
// exceeded (storage.UploadLimits.Check).
func (s *Store) checkLimits(ctx context.Context, tx *sql.Tx, user string, size, newBytes, newFiles int64, lim storage.UploadLimits) error {
	before := storage.UserUsage{UserID: user, Bytes: newBytes - size, Files: newFiles - 1}
	_, err := s.decide(ctx, tx, user, lim, size, 0, &before)
	return err
}

// usageSum is what a user uploaded within one window.
type usageSum struct{ bytes, files int64 }

// CheckUpload checks, without writing, whether one more upload of size
// bytes (negative: unknown) by userID fits lim, reading the user's
// counters and window sums in one query (plus one range of at most a
// minute of the user's rows per window when the decision needs it exact).
func (s *Store) CheckUpload(ctx context.Context, userID string, lim storage.UploadLimits, size, maxSize int64) (storage.Headroom, error) {
	if err := lim.Validate(); err != nil {
		return storage.Headroom{}, err
	}
	return s.decide(ctx, s.read, userID, lim, size, maxSize, nil)
}

// PruneUploadHistory deletes the upload history of minutes before before's
// minute.
func (s *Store) PruneUploadHistory(ctx context.Context, before time.Time) (int64, error) {
	res, err := s.write.ExecContext(ctx, s.q.pruneMinutes, historyMinute(before.UnixMilli()))
	if err != nil {
		return 0, fmt.Errorf("pruning upload history before %s: %w", before.Format(time.RFC3339), classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("pruning upload history: reading affected rows: %w", classify(err))
	}
	return n, nil
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
// whose upload time (creation time when none) is at or after since: the
// whole minutes from the history, the part of since's minute from the
// rows.
func (s *Store) UploadedSince(ctx context.Context, userID string, since time.Time) (bytes, files int64, err error) {
	_, spans, err := s.windowSums(ctx, s.read, userID, []int64{since.UnixMilli()}, false)
	if err != nil {
		return 0, 0, err
	}
	if _, err := s.refineEdges(ctx, s.read, userID, spans); err != nil {
		return 0, 0, err
	}
	w := windowUsage(spans)[0]
	return w.Bytes, w.Files, nil
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
	historyChanged, err := s.rebuildHistory(ctx, tx, userID)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", what, err)
	}
	users := slices.Sorted(maps.Keys(stored))
	for u := range actual {
		if _, ok := stored[u]; !ok {
			users = append(users, u)
		}
	}
	slices.Sort(users)
	for u := range historyChanged {
		if _, ok := stored[u]; !ok {
			if _, ok := actual[u]; !ok {
				changed++ // history of a user without counters or rows
			}
		}
	}
	for _, u := range users {
		want, have := actual[u], stored[u]
		if want != have || historyChanged[u] {
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

// rebuildHistory rebuilds the upload history of userID (every user when
// empty) from the media rows, in tx under RecountUsage's locks, and returns
// the users whose history within storage.MaxWindow of now differed (older
// minutes may have been pruned on purpose).
func (s *Store) rebuildHistory(ctx context.Context, tx *sql.Tx, userID string) (map[string]bool, error) {
	const minuteExpr = uploadedTS + ` / 60000`
	actual := `SELECT user_id, ` + minuteExpr + ` AS minute, CAST(COALESCE(SUM(size), 0) AS BIGINT) AS bytes,
		CAST(COUNT(*) AS BIGINT) AS files FROM media WHERE ` + s.countedRow()
	stored := `SELECT user_id, minute, bytes, files FROM user_upload_minutes WHERE (bytes <> 0 OR files <> 0)`
	var userArgs []any
	if userID != "" {
		actual += ` AND user_id = ?`
		stored += ` AND user_id = ?`
		userArgs = []any{userID}
	}
	actual += ` GROUP BY user_id, ` + minuteExpr
	horizon := historyMinute(time.Now().Add(-storage.MaxWindow).UnixMilli())
	recent := func(q string) string {
		return `SELECT user_id, minute, bytes, files FROM (` + q + `) r WHERE minute >= ?`
	}
	diff := `SELECT user_id FROM (` + recent(stored) + ` EXCEPT ` + recent(actual) + `) a
		UNION SELECT user_id FROM (` + recent(actual) + ` EXCEPT ` + recent(stored) + `) b`
	// Parameters in order: stored, actual, actual, stored; each its user
	// (when one) and the horizon.
	var args []any
	args = append(args, userArgs...)
	args = append(args, horizon)
	args = append(args, userArgs...)
	args = append(args, horizon)
	args = append(args, userArgs...)
	args = append(args, horizon)
	args = append(args, userArgs...)
	args = append(args, horizon)
	out := map[string]bool{}
	rows, err := tx.QueryContext(ctx, s.dialect.rebind(diff), args...)
	if err != nil {
		return nil, fmt.Errorf("comparing upload history: %w", classify(err))
	}
	for rows.Next() {
		var u string
		if err := rows.Scan(&u); err != nil {
			rows.Close()
			return nil, fmt.Errorf("comparing upload history: reading row: %w", classify(err))
		}
		out[u] = true
	}
	err = rows.Err()
	rows.Close()
	if err != nil {
		return nil, fmt.Errorf("comparing upload history: %w", classify(err))
	}
	del := `DELETE FROM user_upload_minutes`
	if userID != "" {
		del += ` WHERE user_id = ?`
	}
	if _, err := tx.ExecContext(ctx, s.dialect.rebind(del), userArgs...); err != nil {
		return nil, fmt.Errorf("clearing upload history: %w", classify(err))
	}
	if _, err := tx.ExecContext(ctx, s.dialect.rebind(`INSERT INTO user_upload_minutes (user_id, minute, bytes, files) `+actual), userArgs...); err != nil {
		return nil, fmt.Errorf("rebuilding upload history: %w", classify(err))
	}
	return out, nil
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
