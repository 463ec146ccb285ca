// Package dendrite reads the media of a Dendrite homeserver (v0.13.8, the
// last release) for package importer: its media API database, SQLite or
// PostgreSQL, read-only, and the files in its media_api.base_path.
//
// What it reads, from Dendrite's own dendrite.yaml:
//   - global.server_name: media whose origin is this server name is local
//     (uploaded here); any other origin is the remote media cache, listed
//     only with Filter.IncludeRemote.
//   - media_api.database.connection_string, or global.database's when the
//     media API has none (as Dendrite's connection manager falls back):
//     "file:name.db" or "file:///abs/name.db" is SQLite, anything else
//     PostgreSQL.
//   - media_api.base_path: a file whose unpadded URL-safe base64 SHA-256 is
//     h is stored at base_path/h[0:1]/h[1:2]/h[2:]/file.
//
// Dendrite resolves a relative base_path or SQLite file against its working
// directory, which the config does not record; Open resolves them against
// the config file's directory instead, and OpenWith takes another directory
// (Options.WorkDir) or another media directory (Options.BasePath).
//
// The table read is mediaapi_media_repository: media_id, media_origin,
// content_type, file_size_bytes, creation_ts (Unix milliseconds),
// upload_name (stored URL path-escaped, as Dendrite's upload handler
// escapes it; unescaped here as Dendrite's download handler does),
// base64hash and user_id. Thumbnails are not imported: they are generated
// again on demand. Dendrite has no quarantine and no protection, so items
// carry neither.
package dendrite

import (
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	// Registers the "sqlite3" database/sql driver.
	_ "github.com/mattn/go-sqlite3"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
)

// pageSize is how many rows one keyset page reads.
const pageSize = 500

// ErrInvalidHash is wrapped by Item.Open when the row's base64hash is not
// an unpadded URL-safe base64 SHA-256: the recorded hash cannot be checked,
// so the item is reported as a mismatch and never imported.
var ErrInvalidHash = fmt.Errorf("recorded base64hash is not a SHA-256 in URL-safe base64: %w", importer.ErrHashMismatch)

// Options adjust how OpenWith reads a Dendrite installation. The zero
// value reads it as Dendrite started in the config file's directory would.
type Options struct {
	// WorkDir is the directory a relative media_api.base_path or SQLite
	// file is resolved against (Dendrite resolves them against its working
	// directory). Default: the directory of the config file. A relative
	// WorkDir is taken relative to the current directory.
	WorkDir string
	// BasePath replaces media_api.base_path, e.g. for a media store that
	// was copied elsewhere. A relative BasePath is taken relative to the
	// current directory. Default "": the config's base_path.
	BasePath string
}

// source is a Dendrite media store opened read-only.
type source struct {
	name       string
	serverName string
	dialect    dialect
	db         *sql.DB
	// root is base_path; every file is opened through it, so no path can
	// lead outside it (not even through a symbolic link).
	root *os.Root
}

var _ importer.Source = (*source)(nil)

// Open reads the Dendrite configuration file at configPath and opens the
// media it describes, as OpenWith with zero Options.
func Open(ctx context.Context, configPath string) (importer.Source, error) {
	return OpenWith(ctx, configPath, Options{})
}

// OpenWith reads the Dendrite configuration file at configPath (at most
// MaxConfigBytes), opens its media API database read-only and checks that
// it has Dendrite's media table, and opens the media directory.
func OpenWith(ctx context.Context, configPath string, opts Options) (importer.Source, error) {
	cfg, err := loadConfig(configPath, opts)
	if err != nil {
		return nil, err
	}
	root, err := os.OpenRoot(cfg.basePath)
	if err != nil {
		return nil, fmt.Errorf("opening dendrite's media directory (media_api.base_path): %w", err)
	}
	db, d, where, err := openDatabase(ctx, cfg)
	if err != nil {
		_ = root.Close()
		return nil, err
	}
	if err := checkTable(ctx, db); err != nil {
		_ = db.Close()
		_ = root.Close()
		return nil, fmt.Errorf("dendrite media database %s: %w", where, err)
	}
	return &source{
		name:       fmt.Sprintf("dendrite (%s, %s)", where, cfg.basePath),
		serverName: cfg.serverName,
		dialect:    d,
		db:         db,
		root:       root,
	}, nil
}

// loadConfig reads and resolves the config file with opts applied.
func loadConfig(configPath string, opts Options) (config, error) {
	absConfig, err := filepath.Abs(configPath)
	if err != nil {
		return config{}, fmt.Errorf("resolving %q: %w", configPath, err)
	}
	workDir := filepath.Dir(absConfig)
	if opts.WorkDir != "" {
		if workDir, err = filepath.Abs(opts.WorkDir); err != nil {
			return config{}, fmt.Errorf("resolving the working directory %q: %w", opts.WorkDir, err)
		}
	}
	data, err := readConfigFile(absConfig)
	if err != nil {
		return config{}, err
	}
	cfg, err := parseConfig(data, workDir)
	if err != nil {
		return config{}, fmt.Errorf("%s: %w", absConfig, err)
	}
	if opts.BasePath != "" {
		if cfg.basePath, err = filepath.Abs(opts.BasePath); err != nil {
			return config{}, fmt.Errorf("resolving the media directory %q: %w", opts.BasePath, err)
		}
	}
	return cfg, nil
}

// openDatabase opens the media API database read-only: SQLite with
// mode=ro and query_only, PostgreSQL with default_transaction_read_only
// (and every page is read in a read-only transaction besides). It returns
// the pool, its dialect and a description without credentials.
func openDatabase(ctx context.Context, cfg config) (*sql.DB, dialect, string, error) {
	switch cfg.kind {
	case kindSQLite:
		db, err := openSQLite(ctx, cfg.sqlitePath)
		return db, sqliteDialect, "sqlite " + cfg.sqlitePath, err
	case kindPostgres:
		db, where, err := openPostgres(ctx, cfg.postgresDSN)
		return db, postgresDialect, where, err
	default:
		return nil, "", "", fmt.Errorf("%w: unknown database kind", ErrConfig)
	}
}

// openSQLite opens path read-only. It refuses a missing file (instead of
// letting SQLite report "unable to open database file").
func openSQLite(ctx context.Context, path string) (*sql.DB, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("dendrite media database: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("dendrite media database %s is not a regular file", path)
	}
	params := url.Values{}
	params.Set("mode", "ro")
	params.Set("_query_only", "1")
	params.Set("_busy_timeout", "10000")
	dsn := (&url.URL{Scheme: "file", Path: filepath.ToSlash(path), RawQuery: params.Encode()}).String()
	db, err := sql.Open("sqlite3", dsn)
	if err != nil {
		return nil, fmt.Errorf("opening the dendrite media database %s: %w", path, err)
	}
	db.SetMaxOpenConns(2)
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("opening the dendrite media database %s: %w", path, err)
	}
	return db, nil
}

// openPostgres connects with every transaction read-only by default. The
// description is user@host:port/database, without the password.
func openPostgres(ctx context.Context, dsn string) (*sql.DB, string, error) {
	pc, err := pgx.ParseConfig(dsn)
	if err != nil {
		// pgx's parse errors may quote the connection string, password
		// included: report only that it failed.
		return nil, "", fmt.Errorf("%w: the PostgreSQL connection string does not parse", ErrConfig)
	}
	where := fmt.Sprintf("postgres %s@%s:%d/%s", pc.User, pc.Host, pc.Port, pc.Database)
	if pc.RuntimeParams == nil {
		pc.RuntimeParams = map[string]string{}
	}
	pc.RuntimeParams["default_transaction_read_only"] = "on"
	db := stdlib.OpenDB(*pc)
	db.SetMaxOpenConns(2)
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, "", fmt.Errorf("connecting to the dendrite media database (%s): %w", where, err)
	}
	return db, where, nil
}

// checkTable reads one row of the media table, so that a wrong database is
// reported by Open rather than by the first Walk.
func checkTable(ctx context.Context, db *sql.DB) error {
	var n int
	err := db.QueryRowContext(ctx, "SELECT 1 FROM mediaapi_media_repository LIMIT 1").Scan(&n)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("reading table mediaapi_media_repository: %w", err)
	}
	return nil
}

// Name describes the source: "dendrite (sqlite /path/mediaapi.db,
// /path/media_store)".
func (s *source) Name() string { return s.name }

// Close closes the database pool and the media directory.
func (s *source) Close() error {
	return errors.Join(s.db.Close(), s.root.Close())
}

// Totals counts the selected rows and sums their recorded sizes (a negative
// size, which Dendrite may record for a deduplicated upload sent without
// Content-Length, counts as 0).
func (s *source) Totals(ctx context.Context, f importer.Filter) (importer.Totals, error) {
	sel, ok := s.selection(f)
	if !ok {
		return importer.Totals{}, nil
	}
	q, args := s.dialect.totalsQuery(sel)
	var t importer.Totals
	err := s.readOnly(ctx, func(tx *sql.Tx) error {
		return tx.QueryRowContext(ctx, q, args...).Scan(&t.Items, &t.Bytes)
	})
	if err != nil {
		return importer.Totals{}, fmt.Errorf("counting dendrite media: %w", err)
	}
	return t, nil
}

// Walk lists the selected rows in (media_id, media_origin) order, a page of
// pageSize rows at a time, each page read in its own read-only transaction
// (keyset pagination: no transaction stays open while fn runs).
func (s *source) Walk(ctx context.Context, f importer.Filter, fn func(importer.Item) error) error {
	sel, ok := s.selection(f)
	if !ok {
		return nil
	}
	var after *pageKey
	for {
		rows, err := s.page(ctx, sel, after)
		if err != nil {
			return err
		}
		for _, r := range rows {
			if err := fn(s.item(r)); err != nil {
				return err
			}
		}
		if len(rows) < pageSize {
			return nil
		}
		last := rows[len(rows)-1]
		after = &pageKey{mediaID: last.mediaID, origin: last.origin}
	}
}

// selection turns a filter into the origins to read. ok is false when the
// filter selects nothing (no local server name wanted, no remote media).
func (s *source) selection(f importer.Filter) (sel selection, ok bool) {
	local := len(f.ServerNames) == 0
	for _, n := range f.ServerNames {
		if n == s.serverName {
			local = true
		}
	}
	switch {
	case local && f.IncludeRemote:
		return selection{serverName: s.serverName, origins: allOrigins}, true
	case local:
		return selection{serverName: s.serverName, origins: localOnly}, true
	case f.IncludeRemote:
		return selection{serverName: s.serverName, origins: remoteOnly}, true
	default:
		return selection{}, false
	}
}

// page reads the rows after the key (from the start when nil).
func (s *source) page(ctx context.Context, sel selection, after *pageKey) ([]row, error) {
	q, args := s.dialect.pageQuery(sel, after)
	var out []row
	err := s.readOnly(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, q, args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		out = make([]row, 0, pageSize)
		for rows.Next() {
			var r row
			if err := rows.Scan(&r.mediaID, &r.origin, &r.contentType, &r.size, &r.createdMS, &r.uploadName, &r.base64Hash, &r.userID); err != nil {
				return err
			}
			out = append(out, r)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("reading dendrite media rows: %w", err)
	}
	return out, nil
}

// readOnly runs fn in a read-only transaction and ends it.
func (s *source) readOnly(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	err = fn(tx)
	return errors.Join(err, tx.Rollback())
}

// row is one row of mediaapi_media_repository.
type row struct {
	mediaID, origin, contentType string
	size, createdMS              int64
	uploadName, base64Hash       string
	userID                       string
}

// item converts a row. A base64hash that is not a SHA-256 gives an item
// without SHA256 whose Open fails with ErrInvalidHash.
func (s *source) item(r row) importer.Item {
	it := importer.Item{
		ServerName:  r.origin,
		MediaID:     r.mediaID,
		Remote:      r.origin != s.serverName,
		ContentType: r.contentType,
		Filename:    uploadName(r.uploadName),
		CreatedAt:   time.UnixMilli(r.createdMS).UTC(),
		Size:        max(r.size, -1),
	}
	if !it.Remote {
		it.UserID = r.userID
	}
	sum, err := hashHex(r.base64Hash)
	if err != nil {
		it.Open = func(context.Context) (io.ReadCloser, error) {
			return nil, fmt.Errorf("%s/%s: %q: %w", r.origin, r.mediaID, r.base64Hash, err)
		}
		return it
	}
	it.SHA256 = sum
	it.Open = s.opener(r.base64Hash)
	return it
}

// uploadName undoes the path escaping Dendrite's upload handler applies; a
// name that does not unescape (remote media, whose name Dendrite stores as
// the remote server sent it) is kept as stored.
func uploadName(stored string) string {
	if name, err := url.PathUnescape(stored); err == nil {
		return name
	}
	return stored
}

// hashHex converts a Dendrite base64hash (unpadded URL-safe base64 of a
// SHA-256; a padded one is accepted too) to lowercase hex.
func hashHex(b64 string) (string, error) {
	sum, err := base64.RawURLEncoding.Strict().DecodeString(strings.TrimSuffix(b64, "="))
	if err != nil || len(sum) != 32 {
		return "", ErrInvalidHash
	}
	return hex.EncodeToString(sum), nil
}

// hashPath is the file of a (valid) base64hash relative to base_path:
// h[0:1]/h[1:2]/h[2:]/file, as Dendrite's GetPathFromBase64Hash lays it out.
// Valid hashes hold only [A-Za-z0-9_-=], so the path has no separators or
// dot segments of its own.
func hashPath(h string) string {
	return h[0:1] + "/" + h[1:2] + "/" + h[2:] + "/file"
}

// opener returns Item.Open for the file of hash h, opened through the
// media directory's root.
func (s *source) opener(h string) func(context.Context) (io.ReadCloser, error) {
	rel := hashPath(h)
	return func(ctx context.Context) (io.ReadCloser, error) {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		f, err := s.root.Open(rel)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("dendrite media file %s: %w", rel, importer.ErrMissing)
		}
		if err != nil {
			return nil, fmt.Errorf("opening dendrite media file: %w", err)
		}
		fi, err := f.Stat()
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("dendrite media file %s: %w", rel, err)
		}
		if !fi.Mode().IsRegular() {
			_ = f.Close()
			return nil, fmt.Errorf("dendrite media file %s is not a regular file: %w", rel, importer.ErrMissing)
		}
		return f, nil
	}
}
