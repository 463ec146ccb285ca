// Package sqlstore implements storage.MetadataStore over database/sql for two
// databases: SQLite (github.com/mattn/go-sqlite3, needs cgo) and PostgreSQL
// (pgx v5 through its database/sql driver). Queries are written once with '?'
// placeholders and rebound for PostgreSQL when the store is opened; the schema
// is migrated automatically on open (see migrate.go).
//
// Times are stored as Unix milliseconds (UTC), so they round-trip with
// millisecond precision; a zero time.Time is stored as NULL and read back as
// the zero time.
package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"time"

	// Registers the "pgx" database/sql driver.
	_ "github.com/jackc/pgx/v5/stdlib"
	// Registers the "sqlite3" database/sql driver.
	"github.com/mattn/go-sqlite3"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// pendingLockClass is the first key of the two-key PostgreSQL advisory locks
// that serialize CreatePending per user (the second key is a hash of the
// server name and user ID). The two-key space never collides with the
// single-key migration lock.
const pendingLockClass = 0x6d6d7270 // "mmrp"

// collectorLockKey is the PostgreSQL session advisory lock (single bigint key
// space, like the migration lock) held by the one running garbage collector.
// Its value is the ASCII of "mmrgc".
const collectorLockKey = 0x6d6d726763

// unreferencedBefore is the condition on a blobs row b (the first placeholder
// is the cutoff) under which the garbage collector may delete it: last
// claimed before the cutoff and referenced by no media row nor thumbnail.
const unreferencedBefore = `COALESCE(b.touched_ts, b.created_ts, 0) < ?
	AND NOT EXISTS (SELECT 1 FROM media m WHERE m.sha256 = b.sha256)
	AND NOT EXISTS (SELECT 1 FROM thumbnails t WHERE t.sha256 = b.sha256)`

// Store is a storage.MetadataStore backed by SQLite or PostgreSQL. It is safe
// for concurrent use.
type Store struct {
	dialect dialect
	// write runs every statement that changes data. For SQLite it is a pool of
	// one connection whose transactions are BEGIN IMMEDIATE, so writers of this
	// process queue in Go instead of contending for the file lock.
	write *sql.DB
	// read runs plain queries. For SQLite it is a separate pool of read-only
	// connections (WAL lets them run alongside the writer); for PostgreSQL it is
	// the same pool as write.
	read *sql.DB
	q    queries
	// collectorMu is the collector lock of a SQLite store (LockCollector).
	collectorMu sync.Mutex
	// ckpt is the SQLite store's background checkpointer (nil for
	// PostgreSQL); see checkpointer.
	ckpt *checkpointer
}

var _ storage.MetadataStore = (*Store)(nil)

// queries holds every statement, already rebound for the store's dialect.
type queries struct {
	recordBlob, getBlob, findBlobByPrefix, countBlobRefs string
	listBlobs, countBlobs, moveBlob                      string

	touchBlob, listUnreferenced, deleteUnreferenced string
	insertTombstone, deleteTombstone, lockCollector string
	unlockCollector                                 string

	insertMedia, getMedia                                string
	lockUser, countPending, oldestPending                string
	completePending, completeCheck, deleteExpiredPending string

	insertThumbnail, getThumbnail string

	quarantine, unquarantine, getQuarantine, setProtected string
	listMediaByHash, countUserMedia, recordAccess         string

	remoteCacheSize, listRemoteLRU, deleteOldThumbnails string

	createJob, getJob, listJobs, claimJob   string
	listClaimableJobs, updateJob, cancelJob string

	addUsage, subtractUsage, lockUsage, setUsage, deleteUsage string
	getUsage, uploadedBetween, topUsage                       string
	addMinute, subtractMinute, pruneMinutes                   string
	// windowQueries[n] sums n windows from user_upload_minutes (see
	// windowQuery); usageWindowQueries[n] also reads user_usage.
	windowQueries, usageWindowQueries [cachedWindowQueries + 1]string
}

const mediaColumns = `server_name, media_id, state, user_id, sha256, size, content_type, filename, created_ts, uploaded_ts, expires_ts, remote, protected`

// mediaSelect selects every field of storage.Media (see scanMedia) from
// media m joined with its blob record b (for the datastore) and the
// quarantine q of its content; callers append WHERE and ORDER BY.
const mediaSelect = `SELECT m.server_name, m.media_id, m.state, m.user_id, m.sha256, m.size, m.content_type, m.filename,
		m.created_ts, m.uploaded_ts, m.expires_ts, m.remote, b.datastore, m.protected, m.last_access_ts,
		q.quarantined_by, q.quarantined_ts
	FROM media m
	LEFT JOIN blobs b ON b.sha256 = m.sha256
	LEFT JOIN quarantine q ON q.sha256 = m.sha256`

// scanner is what *sql.Row and *sql.Rows share.
type scanner interface {
	Scan(dest ...any) error
}

// scanMedia reads one row of mediaSelect.
func scanMedia(r scanner) (storage.Media, error) {
	var (
		m                          storage.Media
		state                      string
		sha, datastore, qBy        sql.NullString
		created, uploaded, expires sql.NullInt64
		access, qAt                sql.NullInt64
	)
	if err := r.Scan(&m.ServerName, &m.MediaID, &state, &m.UserID, &sha, &m.Size,
		&m.ContentType, &m.Filename, &created, &uploaded, &expires, &m.Remote, &datastore,
		&m.Protected, &access, &qBy, &qAt); err != nil {
		return storage.Media{}, err
	}
	m.State = storage.MediaState(state)
	m.SHA256 = sha.String
	m.Datastore = datastore.String
	m.CreatedAt = fromMillis(created)
	m.UploadedAt = fromMillis(uploaded)
	m.ExpiresAt = fromMillis(expires)
	m.LastAccessAt = fromMillis(access)
	m.QuarantinedBy = qBy.String
	m.QuarantinedAt = fromMillis(qAt)
	return m, nil
}

func newQueries(d dialect) queries {
	q := queries{
		// The update is unconditional (a claim never moves backwards) so
		// that RETURNING always yields the row, new or existing.
		recordBlob: `INSERT INTO blobs (sha256, size, prefix_sha256, datastore, created_ts, touched_ts) VALUES (?, ?, ?, ?, ?, ?)
			ON CONFLICT (sha256) DO UPDATE SET touched_ts = CASE
				WHEN blobs.touched_ts IS NULL OR blobs.touched_ts < excluded.touched_ts THEN excluded.touched_ts
				ELSE blobs.touched_ts END
			RETURNING sha256, size, prefix_sha256, datastore, created_ts`,
		getBlob:          `SELECT sha256, size, prefix_sha256, datastore, created_ts FROM blobs WHERE sha256 = ?`,
		findBlobByPrefix: `SELECT sha256, size, prefix_sha256, datastore, created_ts FROM blobs WHERE size = ? AND prefix_sha256 = ? LIMIT 1`,
		countBlobRefs:    `SELECT (SELECT COUNT(*) FROM media WHERE sha256 = ?) + (SELECT COUNT(*) FROM thumbnails WHERE sha256 = ?)`,
		listBlobs: `SELECT sha256, size, prefix_sha256, datastore, created_ts FROM blobs
			WHERE datastore = ? AND sha256 > ? ORDER BY sha256 LIMIT ?`,
		countBlobs: `SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM blobs WHERE datastore = ?`,
		moveBlob:   `UPDATE blobs SET datastore = ? WHERE sha256 = ? AND datastore = ?`,

		touchBlob: `UPDATE blobs SET touched_ts = CASE WHEN touched_ts IS NULL OR touched_ts < ? THEN ? ELSE touched_ts END
			WHERE sha256 = ?`,
		listUnreferenced: `SELECT sha256, size, prefix_sha256, datastore, created_ts FROM blobs b
			WHERE b.sha256 > ? AND ` + unreferencedBefore + ` ORDER BY b.sha256 LIMIT ?`,
		deleteUnreferenced: `DELETE FROM blobs AS b WHERE b.sha256 = ? AND ` + unreferencedBefore + `
			RETURNING sha256, size, prefix_sha256, datastore, created_ts`,
		insertTombstone: `INSERT INTO blobs (sha256, size, prefix_sha256, datastore, created_ts, touched_ts) VALUES (?, 0, '', '', NULL, 0)
			ON CONFLICT (sha256) DO NOTHING`,
		deleteTombstone: `DELETE FROM blobs WHERE sha256 = ?`,

		// The casts give PostgreSQL the parameter types, which a SELECT
		// list (unlike VALUES) does not take from the target columns. A
		// tombstoned ID (deleted_media) inserts nothing, like an existing
		// one.
		insertMedia: `INSERT INTO media (` + mediaColumns + `)
			SELECT CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS BIGINT),
				CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS BIGINT), CAST(? AS BIGINT), CAST(? AS BIGINT),
				CAST(? AS BOOLEAN), CAST(? AS BOOLEAN)
			WHERE NOT EXISTS (SELECT 1 FROM deleted_media d WHERE d.server_name = ? AND d.media_id = ?)
			ON CONFLICT (server_name, media_id) DO NOTHING`,
		getMedia: mediaSelect + ` WHERE m.server_name = ? AND m.media_id = ?`,

		countPending: `SELECT COUNT(*) FROM media
			WHERE server_name = ? AND user_id = ? AND state = 'pending' AND expires_ts > ?`,
		oldestPending: `SELECT MIN(expires_ts) FROM media
			WHERE server_name = ? AND user_id = ? AND state = 'pending' AND expires_ts > ?`,
		completePending: `UPDATE media
			SET state = 'ready', sha256 = ?, size = ?, content_type = ?, filename = ?, uploaded_ts = ?, expires_ts = NULL
			WHERE server_name = ? AND media_id = ? AND state = 'pending' AND user_id = ? AND expires_ts > ?`,
		completeCheck:        `SELECT state, user_id, expires_ts FROM media WHERE server_name = ? AND media_id = ?`,
		deleteExpiredPending: `DELETE FROM media WHERE state = 'pending' AND expires_ts <= ?`,

		insertThumbnail: `INSERT INTO thumbnails (server_name, media_id, width, height, method, animated, format,
				content_type, sha256, size, actual_width, actual_height, created_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
			ON CONFLICT (server_name, media_id, width, height, method, animated, format) DO NOTHING`,
		getThumbnail: `SELECT t.content_type, t.sha256, t.size, t.actual_width, t.actual_height, t.created_ts, b.datastore
			FROM thumbnails t JOIN blobs b ON b.sha256 = t.sha256
			WHERE t.server_name = ? AND t.media_id = ? AND t.width = ? AND t.height = ? AND t.method = ?
				AND t.animated = ? AND t.format = ?`,
	}
	// Literals of the remote flag, as written in the partial indexes.
	remote, local := "remote = 1", "remote = 0"
	notProtected := "protected = 0"
	if d == dialectPostgres {
		remote, local = "remote = TRUE", "remote = FALSE"
		notProtected = "protected = FALSE"
	}
	q.quarantine = `INSERT INTO quarantine (sha256, quarantined_by, quarantined_ts) VALUES (?, ?, ?)
		ON CONFLICT (sha256) DO NOTHING`
	q.unquarantine = `DELETE FROM quarantine WHERE sha256 = ?`
	q.getQuarantine = `SELECT quarantined_by, quarantined_ts FROM quarantine WHERE sha256 = ?`
	q.setProtected = `UPDATE media SET protected = ? WHERE server_name = ? AND media_id = ?`
	q.listMediaByHash = mediaSelect + ` WHERE m.sha256 = ? AND m.state = 'ready' AND (m.server_name, m.media_id) > (?, ?)
		ORDER BY m.server_name, m.media_id LIMIT ?`
	q.countUserMedia = `SELECT COUNT(*) FROM media WHERE server_name = ? AND user_id = ? AND state = 'ready'`
	q.recordAccess = `UPDATE media SET last_access_ts = ?
		WHERE server_name = ? AND media_id = ? AND (last_access_ts IS NULL OR last_access_ts < ?)`

	q.remoteCacheSize = `SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM media
		WHERE state = 'ready' AND ` + remote
	q.listRemoteLRU = `SELECT server_name, media_id, size, COALESCE(last_access_ts, created_ts, 0) FROM media
		WHERE state = 'ready' AND ` + remote + ` AND ` + notProtected + `
		ORDER BY COALESCE(last_access_ts, created_ts, 0), server_name, media_id LIMIT ?`
	q.deleteOldThumbnails = `DELETE FROM thumbnails
		WHERE (server_name, media_id, width, height, method, animated, format) IN (
			SELECT t.server_name, t.media_id, t.width, t.height, t.method, t.animated, t.format
			FROM thumbnails t JOIN media m ON m.server_name = t.server_name AND m.media_id = t.media_id
			WHERE COALESCE(m.last_access_ts, t.created_ts, 0) < ? LIMIT ?)
		RETURNING sha256`

	q.createJob = `INSERT INTO jobs (id, kind, params, state, cursor, items, bytes, error, requested_by, created_ts, updated_ts)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
	q.getJob = `SELECT ` + jobColumns + ` FROM jobs WHERE id = ?`
	q.listJobs = `SELECT ` + jobColumns + ` FROM jobs ORDER BY created_ts DESC, id DESC LIMIT ?`
	q.claimJob = `UPDATE jobs SET owner = ?, lease_until = ?
		WHERE id = ? AND state = 'running' AND (owner = '' OR lease_until IS NULL OR lease_until < ?)`
	q.listClaimableJobs = `SELECT ` + jobColumns + ` FROM jobs
		WHERE state = 'running' AND (owner = '' OR lease_until IS NULL OR lease_until < ?)
		ORDER BY created_ts, id`
	q.updateJob = `UPDATE jobs SET state = ?, cursor = ?, items = ?, bytes = ?, error = ?, updated_ts = ?, finished_ts = ?,
			owner = ?, lease_until = ?
		WHERE id = ? AND owner = ? AND state = 'running'`
	q.cancelJob = `UPDATE jobs SET state = 'cancelled', updated_ts = ?, finished_ts = ?, owner = '', lease_until = NULL
		WHERE id = ? AND state = 'running'`

	// Per-user usage (see quota.go). addUsage and lockUsage lock the
	// counter row on PostgreSQL, creating it when missing; lockUsage returns
	// the values it had (zero when new).
	counted := `state = 'ready' AND ` + local + ` AND user_id <> ''`
	q.addUsage = `INSERT INTO user_usage (user_id, bytes, files) VALUES (?, ?, ?)
		ON CONFLICT (user_id) DO UPDATE SET bytes = user_usage.bytes + excluded.bytes, files = user_usage.files + excluded.files
		RETURNING bytes, files`
	q.subtractUsage = `UPDATE user_usage SET bytes = bytes - ?, files = files - ? WHERE user_id = ?`
	q.lockUsage = `INSERT INTO user_usage (user_id, bytes, files) VALUES (?, 0, 0)
		ON CONFLICT (user_id) DO UPDATE SET files = user_usage.files
		RETURNING bytes, files`
	q.setUsage = `INSERT INTO user_usage (user_id, bytes, files) VALUES (?, ?, ?)
		ON CONFLICT (user_id) DO UPDATE SET bytes = excluded.bytes, files = excluded.files`
	q.deleteUsage = `DELETE FROM user_usage WHERE user_id = ?`
	q.getUsage = `SELECT bytes, files FROM user_usage WHERE user_id = ?`
	q.uploadedBetween = `SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT), COUNT(*) FROM media
		WHERE user_id = ? AND ` + counted + ` AND COALESCE(uploaded_ts, created_ts, 0) >= ? AND COALESCE(uploaded_ts, created_ts, 0) < ?`
	q.addMinute = `INSERT INTO user_upload_minutes (user_id, minute, bytes, files) VALUES (?, ?, ?, ?)
		ON CONFLICT (user_id, minute) DO UPDATE SET bytes = user_upload_minutes.bytes + excluded.bytes,
			files = user_upload_minutes.files + excluded.files`
	q.subtractMinute = `UPDATE user_upload_minutes SET bytes = bytes - ?, files = files - ? WHERE user_id = ? AND minute = ?`
	q.pruneMinutes = `DELETE FROM user_upload_minutes WHERE minute < ?`
	q.topUsage = `SELECT user_id, bytes, files FROM user_usage WHERE bytes <> 0 OR files <> 0
		ORDER BY bytes DESC, ` + d.binary("user_id") + ` ASC LIMIT ?`

	if d == dialectPostgres {
		q.lockUser = fmt.Sprintf(`SELECT pg_advisory_xact_lock(%d, hashtext(?))`, pendingLockClass)
		q.lockCollector = fmt.Sprintf(`SELECT pg_try_advisory_lock(%d)`, collectorLockKey)
		q.unlockCollector = fmt.Sprintf(`SELECT pg_advisory_unlock(%d)`, collectorLockKey)
	}
	for _, p := range []*string{
		&q.recordBlob, &q.getBlob, &q.findBlobByPrefix, &q.countBlobRefs,
		&q.listBlobs, &q.countBlobs, &q.moveBlob,
		&q.touchBlob, &q.listUnreferenced, &q.deleteUnreferenced, &q.insertTombstone, &q.deleteTombstone,
		&q.insertMedia, &q.getMedia, &q.lockUser, &q.countPending, &q.oldestPending,
		&q.completePending, &q.completeCheck, &q.deleteExpiredPending,
		&q.insertThumbnail, &q.getThumbnail,
		&q.quarantine, &q.unquarantine, &q.getQuarantine, &q.setProtected,
		&q.listMediaByHash, &q.countUserMedia, &q.recordAccess,
		&q.remoteCacheSize, &q.listRemoteLRU, &q.deleteOldThumbnails,
		&q.createJob, &q.getJob, &q.listJobs, &q.claimJob, &q.listClaimableJobs, &q.updateJob, &q.cancelJob,
		&q.addUsage, &q.subtractUsage, &q.lockUsage, &q.setUsage, &q.deleteUsage,
		&q.getUsage, &q.uploadedBetween, &q.topUsage,
		&q.addMinute, &q.subtractMinute, &q.pruneMinutes,
	} {
		*p = d.rebind(*p)
	}
	for n := 1; n <= cachedWindowQueries; n++ {
		q.windowQueries[n] = windowQuery(d, n, false)
		q.usageWindowQueries[n] = windowQuery(d, n, true)
	}
	return q
}

// Options tune how Open opens a store. The zero value is the default.
type Options struct {
	// SQLiteFullSync makes every SQLite commit durable before it returns
	// (synchronous=FULL: the write-ahead log is fsynced at each commit), so
	// a committed row survives a power loss or kernel crash, not only a
	// crash of the process. Default false (synchronous=NORMAL: the log is
	// fsynced at checkpoints; the last commits before a machine crash may be
	// lost, the database stays consistent). PostgreSQL's durability is the
	// server's setting (synchronous_commit); it is not affected.
	SQLiteFullSync bool
}

// Open opens a store by driver name with default options; see OpenWith.
func Open(ctx context.Context, driver, dsn string) (*Store, error) {
	return OpenWith(ctx, driver, dsn, Options{})
}

// OpenWith opens a store by driver name: "sqlite" (dsn is a file path, see
// OpenSQLite) or "postgres" (dsn is a PostgreSQL connection string, see
// OpenPostgres). Any other driver is an error.
func OpenWith(ctx context.Context, driver, dsn string, opts Options) (*Store, error) {
	switch driver {
	case "sqlite":
		return openSQLite(ctx, dsn, opts)
	case "postgres":
		return OpenPostgres(ctx, dsn)
	default:
		return nil, fmt.Errorf("opening metadata store: unknown driver %q (want \"sqlite\" or \"postgres\")", driver)
	}
}

// OpenSQLite opens (creating it and its parent directory if needed) the SQLite
// database at path and migrates its schema. The database runs in WAL mode with
// synchronous=NORMAL (FULL with Options.SQLiteFullSync, see OpenWith),
// foreign keys on and a 10 s busy timeout. Writes go through a single
// connection whose transactions begin IMMEDIATE, so
// concurrent writers in this process never see SQLITE_BUSY and writers in
// other processes wait for the lock; reads use a separate pool of read-only
// connections. WAL checkpoints run in the background on a connection of
// their own (see checkpoint.go), not inside a writer's commit; Close stops
// them.
func OpenSQLite(ctx context.Context, path string) (*Store, error) {
	return openSQLite(ctx, path, Options{})
}

// openSQLite is OpenSQLite with opts (Options.SQLiteFullSync).
func openSQLite(ctx context.Context, path string, opts Options) (*Store, error) {
	if path == "" {
		return nil, errors.New("opening sqlite database: empty path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("opening sqlite database: resolving %q: %w", path, classify(err))
	}
	if err := os.MkdirAll(filepath.Dir(abs), 0o750); err != nil {
		return nil, fmt.Errorf("opening sqlite database: creating directory: %w", classify(err))
	}
	common := url.Values{}
	common.Set("_busy_timeout", "10000")
	common.Set("_foreign_keys", "1")
	common.Set("_stmt_cache_size", "32")

	wp := url.Values{}
	for k, v := range common {
		wp[k] = v
	}
	wp.Set("_journal_mode", "WAL")
	wp.Set("_synchronous", "NORMAL")
	if opts.SQLiteFullSync {
		wp.Set("_synchronous", "FULL")
	}
	wp.Set("_txlock", "immediate")
	// The writer checkpoints only as a backstop (walBackstopPages); the
	// background checkpointer does it otherwise.
	write := sql.OpenDB(hookedConnector{dsn: sqliteDSN(abs, wp), pragmas: []string{
		"wal_autocheckpoint = " + strconv.Itoa(walBackstopPages),
	}})
	write.SetMaxOpenConns(1)
	write.SetMaxIdleConns(1)
	write.SetConnMaxLifetime(0)
	write.SetConnMaxIdleTime(0)
	if err := pingSQLite(ctx, write); err != nil {
		_ = write.Close()
		return nil, fmt.Errorf("opening sqlite database %s: %w", abs, classify(err))
	}
	if err := migrate(ctx, write, dialectSQLite); err != nil {
		_ = write.Close()
		return nil, fmt.Errorf("migrating sqlite database %s: %w", abs, classify(err))
	}

	rp := url.Values{}
	for k, v := range common {
		rp[k] = v
	}
	rp.Set("_query_only", "1")
	read, err := sql.Open("sqlite3", sqliteDSN(abs, rp))
	if err != nil {
		_ = write.Close()
		return nil, fmt.Errorf("opening sqlite database %s for reading: %w", abs, classify(err))
	}
	readers := max(4, runtime.GOMAXPROCS(0))
	read.SetMaxOpenConns(readers)
	read.SetMaxIdleConns(readers)
	read.SetConnMaxLifetime(0)
	read.SetConnMaxIdleTime(0)
	if err := pingSQLite(ctx, read); err != nil {
		_ = write.Close()
		_ = read.Close()
		return nil, fmt.Errorf("opening sqlite database %s for reading: %w", abs, classify(err))
	}
	ckpt, err := startCheckpointer(ctx, abs, common, checkpointInterval)
	if err != nil {
		_ = write.Close()
		_ = read.Close()
		return nil, fmt.Errorf("opening sqlite database %s for checkpoints: %w", abs, classify(err))
	}
	return &Store{dialect: dialectSQLite, write: write, read: read, q: newQueries(dialectSQLite), ckpt: ckpt}, nil
}

// pingSQLite opens db's first connection. Connecting runs the DSN's pragmas;
// switching a new database to WAL needs an exclusive lock, and when several
// processes open the same new file at once SQLite may answer SQLITE_BUSY at
// once instead of waiting for the busy timeout. Such answers are retried for
// up to 10 seconds.
func pingSQLite(ctx context.Context, db *sql.DB) error {
	deadline := time.Now().Add(10 * time.Second)
	wait := 5 * time.Millisecond
	for {
		err := db.PingContext(ctx)
		var se sqlite3.Error
		if err == nil || !errors.As(err, &se) || (se.Code != sqlite3.ErrBusy && se.Code != sqlite3.ErrLocked) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
		wait = min(2*wait, 200*time.Millisecond)
	}
}

// sqliteDSN builds a file: URI for the absolute path with the given driver
// parameters; characters such as '?', '#' and '%' in the path are escaped.
func sqliteDSN(abs string, params url.Values) string {
	u := url.URL{Scheme: "file", Path: filepath.ToSlash(abs), RawQuery: params.Encode()}
	return u.String()
}

// OpenPostgres connects to PostgreSQL with dsn (a URL or key=value connection
// string as understood by pgx) and migrates the schema. The pool holds at most
// 32 connections.
func OpenPostgres(ctx context.Context, dsn string) (*Store, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, fmt.Errorf("opening postgres database: %w", classify(err))
	}
	db.SetMaxOpenConns(32)
	db.SetMaxIdleConns(16)
	db.SetConnMaxIdleTime(5 * time.Minute)
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("connecting to postgres: %w", classify(err))
	}
	if err := migrate(ctx, db, dialectPostgres); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("migrating postgres database: %w", classify(err))
	}
	return &Store{dialect: dialectPostgres, write: db, read: db, q: newQueries(dialectPostgres)}, nil
}

// Close stops the background checkpointer (SQLite) and closes the store's
// connection pools.
func (s *Store) Close() error {
	var err error
	if s.ckpt != nil {
		err = s.ckpt.close()
	}
	err = errors.Join(err, s.write.Close())
	if s.read != s.write {
		err = errors.Join(err, s.read.Close())
	}
	if err != nil {
		return fmt.Errorf("closing %s metadata store: %w", s.dialect, classify(err))
	}
	return nil
}

// millis converts t to Unix milliseconds, with the zero time as NULL.
func millis(t time.Time) sql.NullInt64 {
	if t.IsZero() {
		return sql.NullInt64{}
	}
	return sql.NullInt64{Int64: t.UnixMilli(), Valid: true}
}

// fromMillis converts Unix milliseconds back to a UTC time, NULL to zero.
func fromMillis(ms sql.NullInt64) time.Time {
	if !ms.Valid {
		return time.Time{}
	}
	return time.UnixMilli(ms.Int64).UTC()
}

// nullString maps "" to NULL.
func nullString(s string) sql.NullString {
	return sql.NullString{String: s, Valid: s != ""}
}

// RecordBlob records a blob; recording an already known hash keeps the first
// record and only moves its last claim (see TouchBlob) forward to
// b.CreatedAt (the current time when zero). It returns the record after the
// call, from the upsert itself (RETURNING): one statement, no second read.
func (s *Store) RecordBlob(ctx context.Context, b storage.BlobRecord) (storage.BlobRecord, error) {
	if b.SHA256 == "" {
		return storage.BlobRecord{}, errors.New("recording blob: empty hash")
	}
	claim := b.CreatedAt
	if claim.IsZero() {
		claim = time.Now()
	}
	rec, err := scanBlob(s.write.QueryRowContext(ctx, s.q.recordBlob,
		b.SHA256, b.Size, b.PrefixSHA256, b.Datastore, millis(b.CreatedAt), claim.UnixMilli()))
	if err != nil {
		return storage.BlobRecord{}, fmt.Errorf("recording blob %s: %w", b.SHA256, classify(err))
	}
	return rec, nil
}

// scanBlob reads one blobs row.
func scanBlob(row *sql.Row) (storage.BlobRecord, error) {
	var b storage.BlobRecord
	var created sql.NullInt64
	if err := row.Scan(&b.SHA256, &b.Size, &b.PrefixSHA256, &b.Datastore, &created); err != nil {
		return storage.BlobRecord{}, err
	}
	b.CreatedAt = fromMillis(created)
	return b, nil
}

// GetBlob returns the record of a blob, or an error wrapping
// storage.ErrNotFound.
func (s *Store) GetBlob(ctx context.Context, sha256 string) (storage.BlobRecord, error) {
	b, err := scanBlob(s.read.QueryRowContext(ctx, s.q.getBlob, sha256))
	if errors.Is(err, sql.ErrNoRows) {
		return storage.BlobRecord{}, fmt.Errorf("getting blob %s: %w", sha256, storage.ErrNotFound)
	}
	if err != nil {
		return storage.BlobRecord{}, fmt.Errorf("getting blob %s: %w", sha256, classify(err))
	}
	return b, nil
}

// FindBlobByPrefix returns a blob of the given size whose prefix hash matches,
// or an error wrapping storage.ErrNotFound.
func (s *Store) FindBlobByPrefix(ctx context.Context, size int64, prefixSHA256 string) (storage.BlobRecord, error) {
	b, err := scanBlob(s.read.QueryRowContext(ctx, s.q.findBlobByPrefix, size, prefixSHA256))
	if errors.Is(err, sql.ErrNoRows) {
		return storage.BlobRecord{}, fmt.Errorf("finding blob by prefix %s (size %d): %w", prefixSHA256, size, storage.ErrNotFound)
	}
	if err != nil {
		return storage.BlobRecord{}, fmt.Errorf("finding blob by prefix %s (size %d): %w", prefixSHA256, size, classify(err))
	}
	return b, nil
}

// CountBlobReferences returns how many media rows and thumbnails reference
// the blob.
func (s *Store) CountBlobReferences(ctx context.Context, sha256 string) (int64, error) {
	var n int64
	if err := s.read.QueryRowContext(ctx, s.q.countBlobRefs, sha256, sha256).Scan(&n); err != nil {
		return 0, fmt.Errorf("counting references to blob %s: %w", sha256, classify(err))
	}
	return n, nil
}

// ListBlobs returns up to limit records of blobs in datastore whose hash
// sorts after afterSHA256, ordered by hash. A limit of 0 or less returns
// nothing.
func (s *Store) ListBlobs(ctx context.Context, datastore, afterSHA256 string, limit int) ([]storage.BlobRecord, error) {
	if limit <= 0 {
		return nil, nil
	}
	rows, err := s.read.QueryContext(ctx, s.q.listBlobs, datastore, afterSHA256, limit)
	if err != nil {
		return nil, fmt.Errorf("listing blobs of datastore %s: %w", datastore, classify(err))
	}
	defer rows.Close()
	out := make([]storage.BlobRecord, 0, min(limit, 1024))
	for rows.Next() {
		var (
			b       storage.BlobRecord
			created sql.NullInt64
		)
		if err := rows.Scan(&b.SHA256, &b.Size, &b.PrefixSHA256, &b.Datastore, &created); err != nil {
			return nil, fmt.Errorf("listing blobs of datastore %s: reading row: %w", datastore, classify(err))
		}
		b.CreatedAt = fromMillis(created)
		out = append(out, b)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing blobs of datastore %s: %w", datastore, classify(err))
	}
	return out, nil
}

// CountBlobs returns how many blobs datastore holds and their total size.
func (s *Store) CountBlobs(ctx context.Context, datastore string) (count, bytes int64, err error) {
	if err := s.read.QueryRowContext(ctx, s.q.countBlobs, datastore).Scan(&count, &bytes); err != nil {
		return 0, 0, fmt.Errorf("counting blobs of datastore %s: %w", datastore, classify(err))
	}
	return count, bytes, nil
}

// MoveBlob changes the datastore of the blob's record from from to to in one
// conditional UPDATE, or fails with an error wrapping storage.ErrNotFound
// when no record of sha256 names from.
func (s *Store) MoveBlob(ctx context.Context, sha256, from, to string) error {
	if to == "" {
		return fmt.Errorf("moving blob %s from %s: empty target datastore", sha256, from)
	}
	res, err := s.write.ExecContext(ctx, s.q.moveBlob, to, sha256, from)
	if err != nil {
		return fmt.Errorf("moving blob %s from %s to %s: %w", sha256, from, to, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("moving blob %s from %s to %s: reading affected rows: %w", sha256, from, to, classify(err))
	}
	if n == 0 {
		return fmt.Errorf("moving blob %s from %s to %s: no such record in %s: %w", sha256, from, to, from, storage.ErrNotFound)
	}
	return nil
}

// InsertThumbnail records a generated thumbnail; an existing key gives an
// error wrapping storage.ErrConflict.
func (s *Store) InsertThumbnail(ctx context.Context, t storage.Thumbnail) error {
	if t.SHA256 == "" {
		return errors.New("recording thumbnail: empty hash")
	}
	res, err := s.write.ExecContext(ctx, s.q.insertThumbnail, t.ServerName, t.MediaID, t.Width, t.Height, t.Method,
		t.Animated, t.Format, t.ContentType, t.SHA256, t.Size, t.ActualWidth, t.ActualHeight, millis(t.CreatedAt))
	if err != nil {
		return fmt.Errorf("recording thumbnail of %s/%s: %w", t.ServerName, t.MediaID, classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("recording thumbnail of %s/%s: reading affected rows: %w", t.ServerName, t.MediaID, classify(err))
	}
	if n == 0 {
		return fmt.Errorf("recording thumbnail of %s/%s: %w", t.ServerName, t.MediaID, storage.ErrConflict)
	}
	return nil
}

// GetThumbnail returns the thumbnail with key k, or an error wrapping
// storage.ErrNotFound.
func (s *Store) GetThumbnail(ctx context.Context, k storage.ThumbnailKey) (storage.Thumbnail, error) {
	t := storage.Thumbnail{ThumbnailKey: k}
	var created sql.NullInt64
	err := s.read.QueryRowContext(ctx, s.q.getThumbnail, k.ServerName, k.MediaID, k.Width, k.Height, k.Method,
		k.Animated, k.Format).Scan(&t.ContentType, &t.SHA256, &t.Size, &t.ActualWidth, &t.ActualHeight, &created, &t.Datastore)
	if errors.Is(err, sql.ErrNoRows) {
		return storage.Thumbnail{}, fmt.Errorf("getting thumbnail of %s/%s: %w", k.ServerName, k.MediaID, storage.ErrNotFound)
	}
	if err != nil {
		return storage.Thumbnail{}, fmt.Errorf("getting thumbnail of %s/%s: %w", k.ServerName, k.MediaID, classify(err))
	}
	t.CreatedAt = fromMillis(created)
	return t, nil
}

// execer is what *sql.DB and *sql.Tx share for writes.
type execer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// insertMediaRow inserts m with the given state; an existing or tombstoned
// key gives storage.ErrConflict. The returned error is not yet prefixed.
func (s *Store) insertMediaRow(ctx context.Context, ex execer, m storage.Media, state storage.MediaState) error {
	res, err := ex.ExecContext(ctx, s.q.insertMedia,
		m.ServerName, m.MediaID, string(state), m.UserID, nullString(m.SHA256), m.Size,
		m.ContentType, m.Filename, millis(m.CreatedAt), millis(m.UploadedAt), millis(m.ExpiresAt), m.Remote, m.Protected,
		m.ServerName, m.MediaID)
	switch {
	case isUniqueViolation(err):
		return storage.ErrConflict
	case isForeignKeyViolation(err):
		return fmt.Errorf("blob %s is not recorded (RecordBlob must come first): %w", m.SHA256, classify(err))
	case err != nil:
		return err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return fmt.Errorf("reading affected rows: %w", classify(err))
	}
	if n == 0 {
		return storage.ErrConflict
	}
	return nil
}

// InsertMedia stores a ready media item (an empty m.State means ready) with
// its Protected flag. An existing (ServerName, MediaID), or one deleted with
// a tombstone (DeleteMedia), gives an error wrapping storage.ErrConflict.
// m.SHA256 must name a blob recorded with RecordBlob. A local item with a
// user ID adds to the user's usage in the same transaction (see quota.go).
// With m.RefuseQuarantined, quarantined content gives an error wrapping
// storage.ErrQuarantined, checked in that transaction.
func (s *Store) InsertMedia(ctx context.Context, m storage.Media) error {
	return s.insertMedia(ctx, m, nil)
}

// insertMedia is InsertMedia, checking lim when it is not nil (see
// InsertMediaLimited).
func (s *Store) insertMedia(ctx context.Context, m storage.Media, lim *storage.UploadLimits) (err error) {
	if m.State != "" && m.State != storage.StateReady {
		return fmt.Errorf("inserting media %s/%s: state %q is not %q (use CreatePending)", m.ServerName, m.MediaID, m.State, storage.StateReady)
	}
	if m.SHA256 == "" {
		return fmt.Errorf("inserting media %s/%s: a ready item needs a blob hash", m.ServerName, m.MediaID)
	}
	if lim != nil {
		if err := lim.Validate(); err != nil {
			return fmt.Errorf("inserting media %s/%s: %w", m.ServerName, m.MediaID, err)
		}
	}
	if !counts(m) && !m.RefuseQuarantined {
		if err := s.insertMediaRow(ctx, s.write, m, storage.StateReady); err != nil {
			return fmt.Errorf("inserting media %s/%s: %w", m.ServerName, m.MediaID, classify(err))
		}
		return nil
	}
	tx, err := s.beginWrite(ctx)
	if err != nil {
		return fmt.Errorf("inserting media %s/%s: beginning transaction: %w", m.ServerName, m.MediaID, classify(err))
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	if m.RefuseQuarantined {
		if err := s.refuseQuarantined(ctx, tx, m.SHA256); err != nil {
			return fmt.Errorf("inserting media %s/%s: %w", m.ServerName, m.MediaID, err)
		}
	}
	if counts(m) {
		newBytes, newFiles, err := s.addUsage(ctx, tx, m.UserID, m.Size, 1)
		if err != nil {
			return fmt.Errorf("inserting media %s/%s: %w", m.ServerName, m.MediaID, err)
		}
		if lim != nil {
			if err := s.checkLimits(ctx, tx, m.UserID, m.Size, newBytes, newFiles, *lim); err != nil {
				return fmt.Errorf("inserting media %s/%s for %s: %w", m.ServerName, m.MediaID, m.UserID, err)
			}
		}
		if err := s.addHistory(ctx, tx, m.UserID, rowMillis(m), m.Size); err != nil {
			return fmt.Errorf("inserting media %s/%s: %w", m.ServerName, m.MediaID, err)
		}
	}
	if err := s.insertMediaRow(ctx, tx, m, storage.StateReady); err != nil {
		return fmt.Errorf("inserting media %s/%s: %w", m.ServerName, m.MediaID, classify(err))
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("inserting media %s/%s: committing: %w", m.ServerName, m.MediaID, classify(err))
	}
	return nil
}

// GetMedia returns a media item in any state, or an error wrapping
// storage.ErrNotFound. The blob's datastore and the quarantine of its content
// come from the same query (joins with blobs and quarantine); the datastore
// is empty for pending items.
func (s *Store) GetMedia(ctx context.Context, serverName, mediaID string) (storage.Media, error) {
	m, err := scanMedia(s.read.QueryRowContext(ctx, s.q.getMedia, serverName, mediaID))
	if errors.Is(err, sql.ErrNoRows) {
		return storage.Media{}, fmt.Errorf("getting media %s/%s: %w", serverName, mediaID, storage.ErrNotFound)
	}
	if err != nil {
		return storage.Media{}, fmt.Errorf("getting media %s/%s: %w", serverName, mediaID, classify(err))
	}
	return m, nil
}

// CreatePending reserves m.MediaID on m.ServerName for m.UserID until
// m.ExpiresAt (required). Whether the user's other pending items are still
// unexpired is judged at m.CreatedAt (the current time when zero). It fails
// with storage.ErrLimitExceeded when the user already holds maxPending such
// items on that server (maxPending <= 0: no limit) and with
// storage.ErrConflict when the ID exists or was deleted with a tombstone
// (DeleteMedia). The count and the insert are atomic
// against concurrent calls for the same user: SQLite serializes the immediate
// write transactions, PostgreSQL takes a per-user advisory transaction lock.
func (s *Store) CreatePending(ctx context.Context, m storage.Media, maxPending int) (err error) {
	if m.ExpiresAt.IsZero() {
		return fmt.Errorf("creating pending media %s/%s: no expiry time", m.ServerName, m.MediaID)
	}
	now := m.CreatedAt
	if now.IsZero() {
		now = time.Now()
	}
	m.SHA256, m.Size, m.UploadedAt, m.Remote = "", 0, time.Time{}, false

	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("creating pending media %s/%s: beginning transaction: %w", m.ServerName, m.MediaID, classify(err))
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	if maxPending > 0 {
		if s.dialect == dialectPostgres {
			if _, err := tx.ExecContext(ctx, s.q.lockUser, m.ServerName+"\x1f"+m.UserID); err != nil {
				return fmt.Errorf("creating pending media %s/%s: locking user: %w", m.ServerName, m.MediaID, classify(err))
			}
		}
		var n int64
		if err := tx.QueryRowContext(ctx, s.q.countPending, m.ServerName, m.UserID, now.UnixMilli()).Scan(&n); err != nil {
			return fmt.Errorf("creating pending media %s/%s: counting pending items: %w", m.ServerName, m.MediaID, classify(err))
		}
		if n >= int64(maxPending) {
			return fmt.Errorf("creating pending media %s/%s: user %s holds %d pending items: %w",
				m.ServerName, m.MediaID, m.UserID, n, storage.ErrLimitExceeded)
		}
	}
	if err := s.insertMediaRow(ctx, tx, m, storage.StatePending); err != nil {
		return fmt.Errorf("creating pending media %s/%s: %w", m.ServerName, m.MediaID, classify(err))
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("creating pending media %s/%s: committing: %w", m.ServerName, m.MediaID, classify(err))
	}
	return nil
}

// OldestPendingExpiry returns the earliest ExpiresAt among the user's pending
// items that are unexpired at now, or an error wrapping storage.ErrNotFound.
func (s *Store) OldestPendingExpiry(ctx context.Context, serverName, userID string, now time.Time) (time.Time, error) {
	var ms sql.NullInt64
	if err := s.read.QueryRowContext(ctx, s.q.oldestPending, serverName, userID, now.UnixMilli()).Scan(&ms); err != nil {
		return time.Time{}, fmt.Errorf("finding oldest pending expiry of %s on %s: %w", userID, serverName, classify(err))
	}
	if !ms.Valid {
		return time.Time{}, fmt.Errorf("finding oldest pending expiry of %s on %s: %w", userID, serverName, storage.ErrNotFound)
	}
	return fromMillis(ms), nil
}

// CompletePending gives a pending item its content (SHA256, Size,
// ContentType, Filename and UploadedAt from m; UploadedAt defaults to the
// current time when zero) and clears its expiry. It is one conditional UPDATE
// that succeeds only if the item is pending, belongs to m.UserID and has not
// expired at m.UploadedAt, in a transaction that first adds the item to the
// user's usage (see quota.go). Otherwise a follow-up read picks the error:
// storage.ErrNotFound when the item is missing or expired,
// storage.ErrConflict when it is already ready or belongs to another user.
// m.SHA256 must name a blob recorded with RecordBlob. With
// m.RefuseQuarantined, quarantined content gives an error wrapping
// storage.ErrQuarantined (checked first, in the transaction).
func (s *Store) CompletePending(ctx context.Context, m storage.Media) error {
	return s.completePending(ctx, m, nil)
}

// completePending is CompletePending, checking lim when it is not nil (see
// CompletePendingLimited).
func (s *Store) completePending(ctx context.Context, m storage.Media, lim *storage.UploadLimits) error {
	if m.SHA256 == "" {
		return fmt.Errorf("completing pending media %s/%s: no blob hash", m.ServerName, m.MediaID)
	}
	if lim != nil {
		if err := lim.Validate(); err != nil {
			return fmt.Errorf("completing pending media %s/%s: %w", m.ServerName, m.MediaID, err)
		}
	}
	uploaded := m.UploadedAt
	if uploaded.IsZero() {
		uploaded = time.Now()
	}
	at := uploaded.UnixMilli()
	done, err := s.completeTx(ctx, m, at, lim)
	if err != nil {
		return fmt.Errorf("completing pending media %s/%s: %w", m.ServerName, m.MediaID, err)
	}
	if done {
		return nil
	}

	// Nothing changed: find out why. Read through the write pool so that the
	// answer reflects at least the state the UPDATE saw.
	var (
		state, owner string
		expires      sql.NullInt64
	)
	err = s.write.QueryRowContext(ctx, s.q.completeCheck, m.ServerName, m.MediaID).Scan(&state, &owner, &expires)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("completing pending media %s/%s: %w", m.ServerName, m.MediaID, storage.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("completing pending media %s/%s: checking state: %w", m.ServerName, m.MediaID, classify(err))
	}
	switch {
	case state != string(storage.StatePending):
		return fmt.Errorf("completing pending media %s/%s: already %s: %w", m.ServerName, m.MediaID, state, storage.ErrConflict)
	case !expires.Valid || expires.Int64 <= at:
		return fmt.Errorf("completing pending media %s/%s: expired: %w", m.ServerName, m.MediaID, storage.ErrNotFound)
	case owner != m.UserID:
		return fmt.Errorf("completing pending media %s/%s: reserved by another user: %w", m.ServerName, m.MediaID, storage.ErrConflict)
	default:
		// The row now matches although the UPDATE did not: impossible unless it
		// was replaced in between, which no method of this store does.
		return fmt.Errorf("completing pending media %s/%s: row changed concurrently: %w", m.ServerName, m.MediaID, storage.ErrConflict)
	}
}

// completeTx runs the transaction of completePending: the user's usage
// (checked against lim when not nil), then the conditional UPDATE. It
// reports whether the UPDATE changed the row; when it did not, nothing was
// written. Pending rows are always local, so the item counts when it has a
// user ID. The returned error is not yet prefixed.
func (s *Store) completeTx(ctx context.Context, m storage.Media, at int64, lim *storage.UploadLimits) (done bool, err error) {
	tx, err := s.beginWrite(ctx)
	if err != nil {
		return false, fmt.Errorf("beginning transaction: %w", classify(err))
	}
	defer func() {
		if err != nil || !done {
			_ = tx.Rollback()
		}
	}()
	if m.RefuseQuarantined {
		if err := s.refuseQuarantined(ctx, tx, m.SHA256); err != nil {
			return false, err
		}
	}
	if m.UserID != "" {
		newBytes, newFiles, err := s.addUsage(ctx, tx, m.UserID, m.Size, 1)
		if err != nil {
			return false, err
		}
		if lim != nil {
			if err := s.checkLimits(ctx, tx, m.UserID, m.Size, newBytes, newFiles, *lim); err != nil {
				return false, fmt.Errorf("for %s: %w", m.UserID, err)
			}
		}
		if err := s.addHistory(ctx, tx, m.UserID, at, m.Size); err != nil {
			return false, err
		}
	}
	res, err := tx.ExecContext(ctx, s.q.completePending,
		m.SHA256, m.Size, m.ContentType, m.Filename, at,
		m.ServerName, m.MediaID, m.UserID, at)
	if isForeignKeyViolation(err) {
		return false, fmt.Errorf("blob %s is not recorded (RecordBlob must come first): %w", m.SHA256, err)
	}
	if err != nil {
		return false, classify(err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("reading affected rows: %w", classify(err))
	}
	if n == 0 {
		return false, nil
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("committing: %w", classify(err))
	}
	return true, nil
}

// refuseQuarantined fails with an error wrapping storage.ErrQuarantined
// when the content sha256 is quarantined. It reads in the write transaction
// tx, which then writes the media row: on SQLite no quarantine can commit in
// between (one writer at a time); on PostgreSQL the read sees every
// quarantine committed before it, as the separate read before the
// transaction it replaces did. The returned error is not yet prefixed.
func (s *Store) refuseQuarantined(ctx context.Context, tx *sql.Tx, sha256 string) error {
	var (
		by string
		at int64
	)
	err := tx.QueryRowContext(ctx, s.q.getQuarantine, sha256).Scan(&by, &at)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return nil
	case err != nil:
		return fmt.Errorf("checking the quarantine of %s: %w", sha256, classify(err))
	}
	return fmt.Errorf("content %s was quarantined by %s: %w", sha256, by, storage.ErrQuarantined)
}

// DeleteExpiredPending removes pending items whose expiry is at or before now
// and returns how many were removed.
func (s *Store) DeleteExpiredPending(ctx context.Context, now time.Time) (int64, error) {
	res, err := s.write.ExecContext(ctx, s.q.deleteExpiredPending, now.UnixMilli())
	if err != nil {
		return 0, fmt.Errorf("deleting expired pending media: %w", classify(err))
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("deleting expired pending media: reading affected rows: %w", classify(err))
	}
	return n, nil
}

// String names the store's dialect, for logs.
func (s *Store) String() string {
	return "sqlstore(" + s.dialect.String() + ")"
}
