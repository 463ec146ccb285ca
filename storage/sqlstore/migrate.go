package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// ErrSchemaTooNew reports that the database was migrated by a newer version of
// this software than the running one; opening it could corrupt data, so the
// store refuses.
var ErrSchemaTooNew = errors.New("database schema is newer than this build supports")

// migration is one step of the schema history. Steps are applied in order of
// version, each in its own transaction together with its row in
// schema_migrations. Released migrations are never edited: a change is a new
// step.
type migration struct {
	version  int
	name     string
	sqlite   []string
	postgres []string
}

// statements returns the migration's statements for d.
func (m migration) statements(d dialect) []string {
	if d == dialectPostgres {
		return m.postgres
	}
	return m.sqlite
}

// migrations is the whole schema history, ordered by version.
//
// Design notes for version 1:
//   - Times are Unix milliseconds (UTC) in 64-bit integers; NULL is the zero
//     time.Time.
//   - media.sha256 references blobs(sha256). Pending rows have NULL there,
//     which a foreign key allows, and many media rows may share one blob, so
//     the key costs dedup nothing. It guarantees the write order of the
//     storage contract (blob recorded before any row points at it) and makes
//     deleting a still-referenced blob record fail instead of leaving dangling
//     media rows.
//   - CHECK constraints keep ready rows with a blob and pending rows with an
//     expiry.
//   - media_pending_user serves the per-user pending count and
//     OldestPendingExpiry; media_sha256 serves CountBlobReferences and the
//     foreign key check on blob deletion; media_pending_expiry (partial)
//     serves DeleteExpiredPending.
var migrations = []migration{
	{
		version: 1,
		name:    "blobs and media",
		sqlite: []string{
			`CREATE TABLE blobs (
				sha256        TEXT    NOT NULL PRIMARY KEY,
				size          INTEGER NOT NULL,
				prefix_sha256 TEXT    NOT NULL,
				datastore     TEXT    NOT NULL,
				created_ts    INTEGER
			) WITHOUT ROWID, STRICT`,
			`CREATE INDEX blobs_size_prefix ON blobs (size, prefix_sha256)`,
			`CREATE TABLE media (
				server_name  TEXT    NOT NULL,
				media_id     TEXT    NOT NULL,
				state        TEXT    NOT NULL CHECK (state IN ('pending', 'ready')),
				user_id      TEXT    NOT NULL DEFAULT '',
				sha256       TEXT    REFERENCES blobs (sha256),
				size         INTEGER NOT NULL DEFAULT 0,
				content_type TEXT    NOT NULL DEFAULT '',
				filename     TEXT    NOT NULL DEFAULT '',
				created_ts   INTEGER,
				uploaded_ts  INTEGER,
				expires_ts   INTEGER,
				remote       INTEGER NOT NULL DEFAULT 0 CHECK (remote IN (0, 1)),
				PRIMARY KEY (server_name, media_id),
				CHECK (state = 'pending' OR sha256 IS NOT NULL),
				CHECK (state = 'ready' OR expires_ts IS NOT NULL)
			) WITHOUT ROWID, STRICT`,
			`CREATE INDEX media_pending_user ON media (server_name, user_id, state, expires_ts)`,
			`CREATE INDEX media_sha256 ON media (sha256)`,
			`CREATE INDEX media_pending_expiry ON media (expires_ts) WHERE state = 'pending'`,
		},
		postgres: []string{
			`CREATE TABLE blobs (
				sha256        TEXT   NOT NULL PRIMARY KEY,
				size          BIGINT NOT NULL,
				prefix_sha256 TEXT   NOT NULL,
				datastore     TEXT   NOT NULL,
				created_ts    BIGINT
			)`,
			`CREATE INDEX blobs_size_prefix ON blobs (size, prefix_sha256)`,
			`CREATE TABLE media (
				server_name  TEXT    NOT NULL,
				media_id     TEXT    NOT NULL,
				state        TEXT    NOT NULL CHECK (state IN ('pending', 'ready')),
				user_id      TEXT    NOT NULL DEFAULT '',
				sha256       TEXT    REFERENCES blobs (sha256),
				size         BIGINT  NOT NULL DEFAULT 0,
				content_type TEXT    NOT NULL DEFAULT '',
				filename     TEXT    NOT NULL DEFAULT '',
				created_ts   BIGINT,
				uploaded_ts  BIGINT,
				expires_ts   BIGINT,
				remote       BOOLEAN NOT NULL DEFAULT FALSE,
				PRIMARY KEY (server_name, media_id),
				CHECK (state = 'pending' OR sha256 IS NOT NULL),
				CHECK (state = 'ready' OR expires_ts IS NOT NULL)
			)`,
			`CREATE INDEX media_pending_user ON media (server_name, user_id, state, expires_ts)`,
			`CREATE INDEX media_sha256 ON media (sha256)`,
			`CREATE INDEX media_pending_expiry ON media (expires_ts) WHERE state = 'pending'`,
		},
	},
	{
		// blobs_datastore serves ListBlobs (an ordered range scan per
		// datastore), CountBlobs and MoveBlob's datastore check.
		version:  2,
		name:     "blobs by datastore",
		sqlite:   []string{`CREATE INDEX blobs_datastore ON blobs (datastore, sha256)`},
		postgres: []string{`CREATE INDEX blobs_datastore ON blobs (datastore, sha256)`},
	},
	{
		// Thumbnails are not media rows: they belong to a media item
		// (deleted with it) and point at a blob like media do
		// (thumbnails_sha256 serves reference counting and the foreign
		// key check on blob deletion).
		version: 3,
		name:    "thumbnails",
		sqlite: []string{
			`CREATE TABLE thumbnails (
				server_name   TEXT    NOT NULL,
				media_id      TEXT    NOT NULL,
				width         INTEGER NOT NULL,
				height        INTEGER NOT NULL,
				method        TEXT    NOT NULL CHECK (method IN ('crop', 'scale')),
				animated      INTEGER NOT NULL CHECK (animated IN (0, 1)),
				format        TEXT    NOT NULL,
				content_type  TEXT    NOT NULL,
				sha256        TEXT    NOT NULL REFERENCES blobs (sha256),
				size          INTEGER NOT NULL,
				actual_width  INTEGER NOT NULL,
				actual_height INTEGER NOT NULL,
				created_ts    INTEGER,
				PRIMARY KEY (server_name, media_id, width, height, method, animated, format),
				FOREIGN KEY (server_name, media_id) REFERENCES media (server_name, media_id) ON DELETE CASCADE
			) WITHOUT ROWID, STRICT`,
			`CREATE INDEX thumbnails_sha256 ON thumbnails (sha256)`,
		},
		postgres: []string{
			`CREATE TABLE thumbnails (
				server_name   TEXT    NOT NULL,
				media_id      TEXT    NOT NULL,
				width         INTEGER NOT NULL,
				height        INTEGER NOT NULL,
				method        TEXT    NOT NULL CHECK (method IN ('crop', 'scale')),
				animated      BOOLEAN NOT NULL,
				format        TEXT    NOT NULL,
				content_type  TEXT    NOT NULL,
				sha256        TEXT    NOT NULL REFERENCES blobs (sha256),
				size          BIGINT  NOT NULL,
				actual_width  INTEGER NOT NULL,
				actual_height INTEGER NOT NULL,
				created_ts    BIGINT,
				PRIMARY KEY (server_name, media_id, width, height, method, animated, format),
				FOREIGN KEY (server_name, media_id) REFERENCES media (server_name, media_id) ON DELETE CASCADE
			)`,
			`CREATE INDEX thumbnails_sha256 ON thumbnails (sha256)`,
		},
	},
	{
		// touched_ts is a blob's last claim: when it was recorded, or last
		// reused by an upload that deduplicated onto it (RecordBlob,
		// TouchBlob). The garbage collector never deletes a blob claimed
		// within its grace period (see storage/gc). NULL (the rows existing
		// before this version): claimed when created (see
		// unreferencedBefore), so no start-up rewrite of every row.
		version: 4,
		name:    "blob claims",
		sqlite: []string{
			`ALTER TABLE blobs ADD COLUMN touched_ts INTEGER`,
		},
		postgres: []string{
			`ALTER TABLE blobs ADD COLUMN touched_ts BIGINT`,
		},
	},
	{
		// Operators' control (storage.MediaAdmin, Retainer, JobStore).
		//   - media.protected: never quarantined; media.last_access_ts: the
		//     last recorded read of the item or of one of its thumbnails
		//     (NULL: never read, which counts as read when created).
		//   - quarantine is keyed by content hash with no foreign key to
		//     blobs: content stays quarantined after its blob is deleted, so
		//     that a later upload of the same bytes is refused.
		//   - deleted_media remembers deleted media IDs (tombstones) so
		//     that they are never issued again.
		//   - jobs keeps lease-based background jobs.
		//   - media_ready_by_kind (partial: ready rows) serves ListOldMedia,
		//     which pages by (server_name, media_id) within local or remote
		//     media, and ListUsage/ListUserMedia counting; media_remote_lru
		//     (partial: ready remote rows) serves ListRemoteLRU in index
		//     order and RemoteCacheSize.
		version: 5,
		name:    "quarantine, protection, access times, tombstones and jobs",
		sqlite: []string{
			`ALTER TABLE media ADD COLUMN protected INTEGER NOT NULL DEFAULT 0 CHECK (protected IN (0, 1))`,
			`ALTER TABLE media ADD COLUMN last_access_ts INTEGER`,
			`CREATE INDEX media_ready_by_kind ON media (remote, server_name, media_id) WHERE state = 'ready'`,
			`CREATE INDEX media_remote_lru ON media (COALESCE(last_access_ts, created_ts, 0), server_name, media_id)
				WHERE state = 'ready' AND remote = 1`,
			`CREATE TABLE quarantine (
				sha256         TEXT    NOT NULL PRIMARY KEY,
				quarantined_by TEXT    NOT NULL,
				quarantined_ts INTEGER NOT NULL
			) WITHOUT ROWID, STRICT`,
			`CREATE TABLE deleted_media (
				server_name TEXT    NOT NULL,
				media_id    TEXT    NOT NULL,
				deleted_ts  INTEGER NOT NULL,
				PRIMARY KEY (server_name, media_id)
			) WITHOUT ROWID, STRICT`,
			`CREATE TABLE jobs (
				id           TEXT    NOT NULL PRIMARY KEY,
				kind         TEXT    NOT NULL,
				params       BLOB,
				state        TEXT    NOT NULL CHECK (state IN ('running', 'done', 'failed', 'cancelled')),
				cursor       TEXT    NOT NULL DEFAULT '',
				items        INTEGER NOT NULL DEFAULT 0,
				bytes        INTEGER NOT NULL DEFAULT 0,
				error        TEXT    NOT NULL DEFAULT '',
				requested_by TEXT    NOT NULL DEFAULT '',
				created_ts   INTEGER,
				updated_ts   INTEGER,
				finished_ts  INTEGER,
				owner        TEXT    NOT NULL DEFAULT '',
				lease_until  INTEGER
			) WITHOUT ROWID, STRICT`,
			`CREATE INDEX jobs_running ON jobs (created_ts, id) WHERE state = 'running'`,
		},
		postgres: []string{
			`ALTER TABLE media ADD COLUMN protected BOOLEAN NOT NULL DEFAULT FALSE`,
			`ALTER TABLE media ADD COLUMN last_access_ts BIGINT`,
			`CREATE INDEX media_ready_by_kind ON media (remote, server_name, media_id) WHERE state = 'ready'`,
			`CREATE INDEX media_remote_lru ON media (COALESCE(last_access_ts, created_ts, 0), server_name, media_id)
				WHERE state = 'ready' AND remote`,
			`CREATE TABLE quarantine (
				sha256         TEXT   NOT NULL PRIMARY KEY,
				quarantined_by TEXT   NOT NULL,
				quarantined_ts BIGINT NOT NULL
			)`,
			`CREATE TABLE deleted_media (
				server_name TEXT   NOT NULL,
				media_id    TEXT   NOT NULL,
				deleted_ts  BIGINT NOT NULL,
				PRIMARY KEY (server_name, media_id)
			)`,
			`CREATE TABLE jobs (
				id           TEXT   NOT NULL PRIMARY KEY,
				kind         TEXT   NOT NULL,
				params       BYTEA,
				state        TEXT   NOT NULL CHECK (state IN ('running', 'done', 'failed', 'cancelled')),
				cursor       TEXT   NOT NULL DEFAULT '',
				items        BIGINT NOT NULL DEFAULT 0,
				bytes        BIGINT NOT NULL DEFAULT 0,
				error        TEXT   NOT NULL DEFAULT '',
				requested_by TEXT   NOT NULL DEFAULT '',
				created_ts   BIGINT,
				updated_ts   BIGINT,
				finished_ts  BIGINT,
				owner        TEXT   NOT NULL DEFAULT '',
				lease_until  BIGINT
			)`,
			`CREATE INDEX jobs_running ON jobs (created_ts, id) WHERE state = 'running'`,
		},
	},
	{
		// Per-user usage (storage.QuotaStore).
		//   - user_usage holds, per user ID, the bytes and files of the
		//     user's counted media rows: ready, local (remote false) and
		//     with a user ID. The store keeps it exact in the transactions
		//     that insert, complete and delete media rows; it starts from
		//     the rows existing now (backfill). A row may stay at zero.
		//   - media_user_uploaded (partial: counted rows) serves the
		//     rolling-window sums of the Limited inserts and UploadedSince:
		//     a range scan of one user's rows by upload time (creation time
		//     for rows without one). It covers those queries (an index-only
		//     scan): the extra columns on SQLite, INCLUDE on PostgreSQL
		//     (whose planner needs the raw columns of the expression).
		version: 6,
		name:    "per-user usage",
		sqlite: []string{
			`CREATE TABLE user_usage (
				user_id TEXT    NOT NULL PRIMARY KEY,
				bytes   INTEGER NOT NULL DEFAULT 0,
				files   INTEGER NOT NULL DEFAULT 0
			) WITHOUT ROWID, STRICT`,
			`INSERT INTO user_usage (user_id, bytes, files)
				SELECT user_id, COALESCE(SUM(size), 0), COUNT(*) FROM media
				WHERE state = 'ready' AND remote = 0 AND user_id <> ''
				GROUP BY user_id`,
			`CREATE INDEX media_user_uploaded ON media (user_id, COALESCE(uploaded_ts, created_ts, 0), size, uploaded_ts, created_ts, state, remote)
				WHERE state = 'ready' AND remote = 0 AND user_id <> ''`,
		},
		postgres: []string{
			`CREATE TABLE user_usage (
				user_id TEXT   NOT NULL PRIMARY KEY,
				bytes   BIGINT NOT NULL DEFAULT 0,
				files   BIGINT NOT NULL DEFAULT 0
			)`,
			`INSERT INTO user_usage (user_id, bytes, files)
				SELECT user_id, COALESCE(SUM(size), 0), COUNT(*) FROM media
				WHERE state = 'ready' AND remote = FALSE AND user_id <> ''
				GROUP BY user_id`,
			`CREATE INDEX media_user_uploaded ON media (user_id, COALESCE(uploaded_ts, created_ts, 0))
				INCLUDE (size, uploaded_ts, created_ts)
				WHERE state = 'ready' AND remote = FALSE AND user_id <> ''`,
		},
	},
	{
		// Upload history of the rolling windows (storage.QuotaStore).
		//   - user_upload_minutes holds, per user ID and minute (Unix
		//     milliseconds of the upload time, or of the creation time for
		//     rows without one, divided by 60,000), the bytes and files of
		//     the user's counted media rows uploaded in that minute. The
		//     store keeps it in the transactions that keep user_usage; it
		//     starts from the rows existing now, and PruneUploadHistory
		//     trims minutes no window reaches any more. A window sums at
		//     most one row per minute instead of one per upload.
		version: 7,
		name:    "per-user upload history by minute",
		sqlite: []string{
			`CREATE TABLE user_upload_minutes (
				user_id TEXT    NOT NULL,
				minute  INTEGER NOT NULL,
				bytes   INTEGER NOT NULL DEFAULT 0,
				files   INTEGER NOT NULL DEFAULT 0,
				PRIMARY KEY (user_id, minute)
			) WITHOUT ROWID, STRICT`,
			`INSERT INTO user_upload_minutes (user_id, minute, bytes, files)
				SELECT user_id, COALESCE(uploaded_ts, created_ts, 0) / 60000, COALESCE(SUM(size), 0), COUNT(*) FROM media
				WHERE state = 'ready' AND remote = 0 AND user_id <> ''
				GROUP BY user_id, COALESCE(uploaded_ts, created_ts, 0) / 60000`,
			`CREATE INDEX user_upload_minutes_minute ON user_upload_minutes (minute)`,
		},
		postgres: []string{
			`CREATE TABLE user_upload_minutes (
				user_id TEXT   NOT NULL,
				minute  BIGINT NOT NULL,
				bytes   BIGINT NOT NULL DEFAULT 0,
				files   BIGINT NOT NULL DEFAULT 0,
				PRIMARY KEY (user_id, minute)
			)`,
			`INSERT INTO user_upload_minutes (user_id, minute, bytes, files)
				SELECT user_id, COALESCE(uploaded_ts, created_ts, 0) / 60000, COALESCE(SUM(size), 0), COUNT(*) FROM media
				WHERE state = 'ready' AND remote = FALSE AND user_id <> ''
				GROUP BY user_id, COALESCE(uploaded_ts, created_ts, 0) / 60000`,
			`CREATE INDEX user_upload_minutes_minute ON user_upload_minutes (minute)`,
		},
	},
}

// latestVersion is the newest schema version this build knows.
func latestVersion() int {
	return migrations[len(migrations)-1].version
}

// migrationLockKey is the PostgreSQL advisory lock (single bigint key space)
// that serializes migrations between concurrent openers. Its value is the
// ASCII of "mmrmigr".
const migrationLockKey = 0x6d6d726d69677200

// migrate brings the schema to latestVersion, one transaction per step. Every
// transaction first takes the dialect's migration lock (an advisory lock on
// PostgreSQL; on SQLite the store's write transactions are BEGIN IMMEDIATE,
// which takes the database write lock) and re-reads the current version, so
// concurrent openers apply each step exactly once.
func migrate(ctx context.Context, db *sql.DB, d dialect) error {
	for {
		done, err := migrateStep(ctx, db, d)
		if err != nil {
			return err
		}
		if done {
			return nil
		}
	}
}

// migrateStep applies the first missing migration, or reports done when the
// schema is current.
func migrateStep(ctx context.Context, db *sql.DB, d dialect) (done bool, err error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return false, fmt.Errorf("beginning migration transaction: %w", err)
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	if d == dialectPostgres {
		if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrationLockKey)); err != nil {
			return false, fmt.Errorf("taking migration lock: %w", err)
		}
	}
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version    INTEGER NOT NULL PRIMARY KEY,
		applied_at BIGINT  NOT NULL
	)`); err != nil {
		return false, fmt.Errorf("creating schema_migrations: %w", err)
	}
	var current sql.NullInt64
	if err := tx.QueryRowContext(ctx, `SELECT MAX(version) FROM schema_migrations`).Scan(&current); err != nil {
		return false, fmt.Errorf("reading schema version: %w", err)
	}
	latest := latestVersion()
	if int(current.Int64) > latest {
		return false, fmt.Errorf("checking schema version: database has version %d, this build knows up to %d (upgrade the software): %w",
			current.Int64, latest, ErrSchemaTooNew)
	}
	var next *migration
	for i := range migrations {
		if migrations[i].version > int(current.Int64) {
			next = &migrations[i]
			break
		}
	}
	if next == nil {
		if err := tx.Commit(); err != nil {
			return false, fmt.Errorf("committing schema version check: %w", err)
		}
		return true, nil
	}
	for i, stmt := range next.statements(d) {
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return false, fmt.Errorf("applying migration %d (%s), statement %d: %w", next.version, next.name, i+1, err)
		}
	}
	if _, err := tx.ExecContext(ctx, d.rebind(`INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`),
		next.version, time.Now().UnixMilli()); err != nil {
		return false, fmt.Errorf("recording migration %d: %w", next.version, err)
	}
	if err := tx.Commit(); err != nil {
		return false, fmt.Errorf("committing migration %d: %w", next.version, err)
	}
	return false, nil
}
