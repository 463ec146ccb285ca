// Package synapse reads the media repository of a Synapse homeserver for
// an import: its homeserver.yaml (server_name, database, media_store_path,
// file-system storage providers), its database's local_media_repository
// and remote_media_cache tables (SQLite or PostgreSQL, opened read-only),
// and its media store's files.
//
// The media store layout (Synapse's synapse/media/filepath.py) is
//
//	local_content/<id[0:2]>/<id[2:4]>/<id[4:]>
//	remote_content/<origin>/<fsid[0:2]>/<fsid[2:4]>/<fsid[4:]>
//
// where id is the local media ID and fsid the filesystem_id Synapse gave a
// remote file. Rows whose IDs could not name such a path (wrong characters,
// too short, a server name with '/') are still listed, so that the import
// reports them, but their Open refuses to touch the file system.
//
// Listed are local media that finished uploading (media_length set) and
// are not URL-preview downloads (url_cache unset: those live under
// url_cache/ and belong to no mxc:// URI anyone was given), and, with
// Filter.IncludeRemote, the remote media cache. Pending uploads (a media ID
// created but never uploaded) have no content and are not listed.
//
// Columns map to importer.Item as follows: media_id, media_type,
// media_length, user_id (local only), quarantined_by,
// safe_from_quarantine (Protected; local only, and absent before Synapse's
// schema delta 58) and sha256 (absent before delta 91, NULL for media
// stored before it: SHA256 is then empty). created_ts (milliseconds) is
// CreatedAt, the zero time when NULL. upload_name is taken as stored:
// Synapse has always stored it decoded (the upload's filename query
// parameter is decoded by the HTTP layer, a remote Content-Disposition
// filename* is percent-decoded before it is stored), so a '%' in it is
// part of the name and is not decoded again; invalid UTF-8, which only a
// SQLite database could hold, becomes U+FFFD. Not carried over:
// last_access_ts, authenticated, thumbnails (regenerated on demand) and
// url_cache rows.
//
// Synapse can keep running while the import reads: SQLite is opened with
// mode=ro (never immutable), PostgreSQL sessions are read-only and every
// page is read in its own short read-only transaction, so no transaction
// stays open while files are copied.
package synapse

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	// The SQLite driver, registered as "sqlite3".
	_ "github.com/mattn/go-sqlite3"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
)

// Source lists the media of a Synapse homeserver. It implements
// importer.Source.
type Source struct {
	cfg    Config
	db     *sql.DB
	pg     bool
	local  localQueries
	remote remoteQueries
}

var _ importer.Source = (*Source)(nil)

// Open reads Synapse's homeserver.yaml at configPath (see LoadConfig) and
// opens its database read-only.
func Open(ctx context.Context, configPath string) (importer.Source, error) {
	cfg, err := LoadConfig(configPath)
	if err != nil {
		return nil, err
	}
	s, err := OpenWith(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// OpenWith opens the database cfg names read-only and checks that it has
// Synapse's media tables.
func OpenWith(ctx context.Context, cfg Config) (*Source, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	if cfg.PageSize <= 0 {
		cfg.PageSize = DefaultPageSize
	}
	db, err := openDB(cfg)
	if err != nil {
		return nil, err
	}
	s := &Source{cfg: cfg, db: db, pg: cfg.Engine == EnginePostgres}
	if err := s.prepare(ctx); err != nil {
		_ = db.Close()
		return nil, err
	}
	return s, nil
}

// check validates a Config given to OpenWith.
func (c Config) check() error {
	switch {
	case c.ServerName == "":
		return errors.New("synapse: no server name")
	case c.Engine == EngineSQLite && !filepath.IsAbs(c.SQLitePath):
		return fmt.Errorf("synapse: SQLite path %q is not absolute", c.SQLitePath)
	case c.Engine != EngineSQLite && c.Engine != EnginePostgres:
		return fmt.Errorf("synapse: unsupported database engine %q", c.Engine)
	}
	for _, d := range append(append([]string(nil), c.LocalDirs...), c.RemoteDirs...) {
		if !filepath.IsAbs(d) {
			return fmt.Errorf("synapse: media directory %q is not absolute", d)
		}
	}
	return nil
}

// openDB opens the database read-only.
func openDB(cfg Config) (*sql.DB, error) {
	if cfg.Engine == EngineSQLite {
		return openSQLite(cfg.SQLitePath)
	}
	return openPostgres(cfg.PostgresDSN)
}

// openSQLite opens an existing SQLite database with mode=ro: SQLite refuses
// every write, and reads still see a running Synapse's committed writes
// (immutable=1 would not, and would misread a changing file).
func openSQLite(path string) (*sql.DB, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("synapse SQLite database: %w", err)
	}
	params := url.Values{"mode": {"ro"}, "_query_only": {"1"}, "_busy_timeout": {"10000"}}
	u := url.URL{Scheme: "file", Path: filepath.ToSlash(path), RawQuery: params.Encode()}
	db, err := sql.Open("sqlite3", u.String())
	if err != nil {
		return nil, fmt.Errorf("opening synapse SQLite database %s: %w", path, err)
	}
	db.SetMaxOpenConns(2)
	return db, nil
}

// openPostgres connects with default_transaction_read_only on, so that the
// session cannot write even outside the importer's read-only transactions.
func openPostgres(dsn string) (*sql.DB, error) {
	pc, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("synapse PostgreSQL connection string: %w", err)
	}
	pc.RuntimeParams["default_transaction_read_only"] = "on"
	db := stdlib.OpenDB(*pc)
	db.SetMaxOpenConns(2)
	return db, nil
}

// prepare reads which columns the media tables have (sha256 and
// safe_from_quarantine came with later Synapse versions) and builds the
// queries.
func (s *Source) prepare(ctx context.Context) error {
	lc, err := s.columns(ctx, "local_media_repository")
	if err != nil {
		return err
	}
	rc, err := s.columns(ctx, "remote_media_cache")
	if err != nil {
		return err
	}
	if s.local, err = newLocalQueries(lc, s.pg); err != nil {
		return err
	}
	s.remote, err = newRemoteQueries(rc, s.pg)
	return err
}

// columns returns the set of column names of table.
func (s *Source) columns(ctx context.Context, table string) (map[string]bool, error) {
	var cols []string
	err := s.readTx(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, "SELECT * FROM "+table+" LIMIT 0")
		if err != nil {
			return err
		}
		defer rows.Close()
		cols, err = rows.Columns()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("reading the columns of synapse's %s table: %w", table, err)
	}
	set := make(map[string]bool, len(cols))
	for _, c := range cols {
		set[strings.ToLower(c)] = true
	}
	return set, nil
}

// readTx runs fn in a read-only transaction, which it always rolls back:
// nothing is ever written.
func (s *Source) readTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	return fn(tx)
}

// Name describes the source, e.g. "synapse (postgres, /var/lib/synapse/media_store)".
func (s *Source) Name() string {
	db := "postgres"
	if !s.pg {
		db = "sqlite3 " + s.cfg.SQLitePath
	}
	dirs := s.cfg.LocalDirs
	if len(dirs) == 0 {
		dirs = s.cfg.RemoteDirs
	}
	name := fmt.Sprintf("synapse (%s, %s", db, strings.Join(dirs, ", "))
	if len(s.cfg.UnsupportedProviders) > 0 {
		name += "; unreadable storage providers: " + strings.Join(s.cfg.UnsupportedProviders, ", ")
	}
	return name + ")"
}

// Close closes the database connections.
func (s *Source) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("closing synapse database: %w", err)
	}
	return nil
}

// includesLocal reports whether f selects this homeserver's local media.
func (s *Source) includesLocal(f importer.Filter) bool {
	if len(f.ServerNames) == 0 {
		return true
	}
	for _, n := range f.ServerNames {
		if n == s.cfg.ServerName {
			return true
		}
	}
	return false
}

// Totals counts the items and recorded bytes Walk lists for f.
func (s *Source) Totals(ctx context.Context, f importer.Filter) (importer.Totals, error) {
	var t importer.Totals
	if s.includesLocal(f) {
		if err := s.addTotals(ctx, s.local.totals, &t); err != nil {
			return importer.Totals{}, fmt.Errorf("counting synapse local media: %w", err)
		}
	}
	if f.IncludeRemote {
		if err := s.addTotals(ctx, s.remote.totals, &t); err != nil {
			return importer.Totals{}, fmt.Errorf("counting synapse remote media: %w", err)
		}
	}
	return t, nil
}

// addTotals adds the count and byte sum query q returns to t.
func (s *Source) addTotals(ctx context.Context, q string, t *importer.Totals) error {
	return s.readTx(ctx, func(tx *sql.Tx) error {
		var n, b int64
		if err := tx.QueryRowContext(ctx, q).Scan(&n, &b); err != nil {
			return err
		}
		t.Items += n
		t.Bytes += b
		return nil
	})
}

// Walk lists local media ordered by media ID, then (with IncludeRemote)
// remote media ordered by origin and media ID. It reads PageSize rows at
// a time by key, and calls fn only after a page's transaction has ended.
func (s *Source) Walk(ctx context.Context, f importer.Filter, fn func(importer.Item) error) error {
	if s.includesLocal(f) {
		if err := s.walkLocal(ctx, fn); err != nil {
			return err
		}
	}
	if f.IncludeRemote {
		return s.walkRemote(ctx, fn)
	}
	return nil
}

// walkLocal pages through local_media_repository.
func (s *Source) walkLocal(ctx context.Context, fn func(importer.Item) error) error {
	after := ""
	for first := true; ; first = false {
		var page []importer.Item
		err := s.readTx(ctx, func(tx *sql.Tx) error {
			q, args := s.local.first, []any{s.cfg.PageSize}
			if !first {
				q, args = s.local.next, []any{after, s.cfg.PageSize}
			}
			var err error
			page, err = s.scanPage(ctx, tx, q, args, s.scanLocal)
			return err
		})
		if err != nil {
			return fmt.Errorf("reading synapse local media after %q: %w", after, err)
		}
		if err := emit(page, fn); err != nil {
			return err
		}
		if len(page) < s.cfg.PageSize {
			return nil
		}
		after = page[len(page)-1].MediaID
	}
}

// walkRemote pages through remote_media_cache.
func (s *Source) walkRemote(ctx context.Context, fn func(importer.Item) error) error {
	var afterOrigin, afterID string
	for first := true; ; first = false {
		var page []importer.Item
		err := s.readTx(ctx, func(tx *sql.Tx) error {
			q, args := s.remote.first, []any{s.cfg.PageSize}
			if !first {
				q, args = s.remote.next, []any{afterOrigin, afterID, s.cfg.PageSize}
			}
			var err error
			page, err = s.scanPage(ctx, tx, q, args, s.scanRemote)
			return err
		})
		if err != nil {
			return fmt.Errorf("reading synapse remote media after %s/%s: %w", afterOrigin, afterID, err)
		}
		if err := emit(page, fn); err != nil {
			return err
		}
		if len(page) < s.cfg.PageSize {
			return nil
		}
		last := page[len(page)-1]
		afterOrigin, afterID = last.ServerName, last.MediaID
	}
}

// emit calls fn for each item of page, stopping at its first error.
func emit(page []importer.Item, fn func(importer.Item) error) error {
	for _, it := range page {
		if err := fn(it); err != nil {
			return err
		}
	}
	return nil
}

// scanPage runs q and turns each row into an Item with scan.
func (s *Source) scanPage(ctx context.Context, tx *sql.Tx, q string, args []any,
	scan func(*sql.Rows) (importer.Item, error)) ([]importer.Item, error) {
	rows, err := tx.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	page := make([]importer.Item, 0, s.cfg.PageSize)
	for rows.Next() {
		it, err := scan(rows)
		if err != nil {
			return nil, err
		}
		page = append(page, it)
	}
	return page, rows.Err()
}

// mediaRow holds the nullable columns both tables share.
type mediaRow struct {
	mediaType, uploadName, quarantinedBy, sha256 sql.NullString
	length, created                              sql.NullInt64
}

// fill sets the Item fields mediaRow carries.
func (r mediaRow) fill(it *importer.Item) {
	it.ContentType = r.mediaType.String
	it.Filename = strings.ToValidUTF8(r.uploadName.String, string(utf8.RuneError))
	it.QuarantinedBy = r.quarantinedBy.String
	it.SHA256 = strings.ToLower(r.sha256.String)
	it.Size = -1
	if r.length.Valid {
		it.Size = r.length.Int64
	}
	if r.created.Valid {
		it.CreatedAt = time.UnixMilli(r.created.Int64).UTC()
	}
}

// scanLocal reads one row of the local query (see localColumns).
func (s *Source) scanLocal(rows *sql.Rows) (importer.Item, error) {
	var (
		r      mediaRow
		id     string
		userID sql.NullString
		safe   sql.NullBool
	)
	if err := rows.Scan(&id, &r.mediaType, &r.length, &r.created, &r.uploadName,
		&userID, &r.quarantinedBy, &safe, &r.sha256); err != nil {
		return importer.Item{}, err
	}
	it := importer.Item{ServerName: s.cfg.ServerName, MediaID: id, UserID: userID.String, Protected: safe.Bool}
	r.fill(&it)
	rel, relErr := localPath(id)
	it.Open = s.opener(s.cfg.LocalDirs, rel, relErr)
	return it, nil
}

// scanRemote reads one row of the remote query (see remoteColumns).
func (s *Source) scanRemote(rows *sql.Rows) (importer.Item, error) {
	var (
		r          mediaRow
		origin, id string
		fsid       sql.NullString
	)
	if err := rows.Scan(&origin, &id, &r.mediaType, &r.length, &r.created, &r.uploadName,
		&fsid, &r.quarantinedBy, &r.sha256); err != nil {
		return importer.Item{}, err
	}
	it := importer.Item{ServerName: origin, MediaID: id, Remote: true}
	r.fill(&it)
	rel, relErr := remotePath(origin, fsid.String)
	it.Open = s.opener(s.cfg.RemoteDirs, rel, relErr)
	return it, nil
}
