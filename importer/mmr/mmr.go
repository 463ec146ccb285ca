// Package mmr is an importer.Source reading matrix-media-repo ("MMR"): its
// own configuration file (media-repo.yaml, or a configuration directory
// with per-domain files), its PostgreSQL database and its datastores (file
// directories and S3 buckets).
//
// What it reads, as matrix-media-repo lays it out:
//
//   - The media table: one row per (origin, media_id) with upload_name,
//     content_type, user_id, sha256_hash (lowercase hex SHA-256),
//     size_bytes, creation_ts (Unix milliseconds), quarantined, and
//     datastore_id and location saying where the bytes are. Deduplicated
//     media share a location. Media whose origin is one of the configured
//     homeservers is local; any other origin is remote cache.
//   - media_attributes: a purpose of "pinned" keeps media out of
//     quarantine and purges; it is imported as Protected.
//   - The datastores: media.datastore_id is the id of an entry of the
//     configuration's datastores list (mandatory since MMR 1.3). An entry
//     without id (older configurations) is matched, as MMR did, to the
//     rows of the datastores table (datastore_id, ds_type, uri) whose type
//     and uri (the directory for file datastores, s3://endpoint/bucket for
//     S3) are its own.
//   - A file datastore's location is a relative path below its opts.path
//     (ab/cd/rest); an S3 datastore's location is the object key in its
//     bucket.
//
// Thumbnails are not read (this module regenerates them on demand), nor
// user_stats (per-user usage follows from the imported media rows).
// Everything is read in read-only transactions; nothing in matrix-media-repo
// is changed.
package mmr

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	// Registers the "pgx" database/sql driver.
	_ "github.com/jackc/pgx/v5/stdlib"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// QuarantinedBy is the quarantining actor recorded for media that
// matrix-media-repo quarantined: it records no actor of its own.
const QuarantinedBy = "imported from matrix-media-repo"

// defaultPageSize is how many media rows one query of Walk reads.
const defaultPageSize = 500

// maxDBConns bounds the connections the source opens to
// matrix-media-repo's database.
const maxDBConns = 4

// source is the importer.Source of one matrix-media-repo installation.
type source struct {
	db *sql.DB
	// dbDesc names the database (host and name, no credentials).
	dbDesc string
	// local are the configured homeservers, sorted; localSet holds them too.
	local    []string
	localSet map[string]bool
	// stores are the datastores by the ids media rows name them with; all
	// lists each once, in configuration order.
	stores map[string]store
	all    []store
	// pageSize is how many media rows one query of Walk reads.
	pageSize int
	// hasAttributes is false when the database predates media_attributes.
	hasAttributes bool
}

// Open reads matrix-media-repo's configuration at configPath (its
// media-repo.yaml, or its configuration directory), connects to its
// database and checks that it holds matrix-media-repo's media table.
// Datastores are not contacted yet: a datastore that cannot be read is
// reported for each item stored in it.
func Open(ctx context.Context, configPath string) (importer.Source, error) {
	cfg, err := loadConfig(configPath)
	if err != nil {
		return nil, err
	}
	s := &source{local: cfg.LocalServers, localSet: map[string]bool{}, stores: map[string]store{}, pageSize: defaultPageSize}
	for _, n := range s.local {
		s.localSet[n] = true
	}
	if err := s.openDB(ctx, cfg.DSN); err != nil {
		return nil, err
	}
	if err := s.openStores(ctx, cfg.Datastores); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// openDB connects to the database and checks its schema.
func (s *source) openDB(ctx context.Context, dsn string) error {
	pc, err := pgx.ParseConfig(dsn)
	if err != nil {
		return fmt.Errorf("matrix-media-repo config: database.postgres: %w", err)
	}
	s.dbDesc = fmt.Sprintf("postgres %s/%s", pc.Host, pc.Database)
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return fmt.Errorf("opening matrix-media-repo database (%s): %w", s.dbDesc, err)
	}
	db.SetMaxOpenConns(maxDBConns)
	s.db = db
	if err := s.checkSchema(ctx); err != nil {
		db.Close()
		return fmt.Errorf("matrix-media-repo database (%s): %w", s.dbDesc, err)
	}
	return nil
}

// checkSchema checks that the media table has the columns read here and
// whether media_attributes exists.
func (s *source) checkSchema(ctx context.Context) error {
	return s.readOnly(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, `SELECT origin, media_id, upload_name, content_type, user_id, sha256_hash,
			size_bytes, creation_ts, quarantined, datastore_id, location FROM media LIMIT 0`)
		if err != nil {
			return fmt.Errorf("reading the media table: %w", err)
		}
		rows.Close()
		err = tx.QueryRowContext(ctx, `SELECT to_regclass('media_attributes') IS NOT NULL`).Scan(&s.hasAttributes)
		if err != nil {
			return fmt.Errorf("looking for the media_attributes table: %w", err)
		}
		return nil
	})
}

// openStores builds the reader of every configured datastore and indexes
// them by the ids media rows use.
func (s *source) openStores(ctx context.Context, ds []datastoreConfig) error {
	for _, d := range ds {
		st, err := newStore(d)
		if err != nil {
			return err
		}
		s.all = append(s.all, st)
		ids := []string{d.ID}
		if d.ID == "" {
			if ids, err = s.legacyIDs(ctx, d); err != nil {
				return err
			}
		}
		for _, id := range ids {
			if prev, ok := s.stores[id]; ok {
				return fmt.Errorf("matrix-media-repo: datastore id %q names both %s and %s", id, prev, st)
			}
			s.stores[id] = st
		}
	}
	return nil
}

// legacyIDs returns the ids the datastores table gives a datastore
// configured without id, by its type and uri. A datastore no row names
// holds no media.
func (s *source) legacyIDs(ctx context.Context, d datastoreConfig) ([]string, error) {
	var ids []string
	err := s.readOnly(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, `SELECT datastore_id FROM datastores WHERE ds_type = $1 AND uri = $2 ORDER BY datastore_id`,
			d.Type, legacyURI(d))
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var id string
			if err := rows.Scan(&id); err != nil {
				return err
			}
			ids = append(ids, id)
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("matrix-media-repo: finding the id of a %s datastore configured without id in the datastores table: %w", d.Type, err)
	}
	return ids, nil
}

// legacyURI is the uri matrix-media-repo before 1.3 recorded in the
// datastores table for a configured datastore.
func legacyURI(d datastoreConfig) string {
	switch d.Type {
	case typeFile:
		return d.Options["path"]
	case typeS3:
		uri := "s3://" + d.Options["endpoint"] + "/" + d.Options["bucketName"]
		if region, ok := d.Options["region"]; ok {
			uri += "?region=" + region
		}
		return uri
	default:
		return d.Type + "://localhost"
	}
}

// readOnly runs fn in a read-only transaction.
func (s *source) readOnly(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := fn(tx); err != nil {
		return err
	}
	return tx.Commit()
}

// Name describes the source, e.g. `matrix-media-repo (postgres db/mmr;
// file datastore "a" at /var/matrix/media)`.
func (s *source) Name() string {
	parts := []string{s.dbDesc}
	for _, st := range s.all {
		parts = append(parts, st.String())
	}
	return "matrix-media-repo (" + strings.Join(parts, "; ") + ")"
}

// Close closes the database connections and the datastores.
func (s *source) Close() error {
	var errs []error
	if s.db != nil {
		errs = append(errs, s.db.Close())
	}
	for _, st := range s.all {
		errs = append(errs, st.close())
	}
	return errors.Join(errs...)
}

// selection is a Filter as query arguments.
type selection struct {
	// local are the local server names selected.
	local []string
	// remote selects media of every origin that is not local.
	remote bool
}

// selectionFor turns f into query arguments.
func (s *source) selectionFor(f importer.Filter) selection {
	sel := selection{local: s.local, remote: f.IncludeRemote}
	if len(f.ServerNames) > 0 {
		sel.local = []string{} // an empty array, not NULL
		for _, n := range s.local {
			if slices.Contains(f.ServerNames, n) {
				sel.local = append(sel.local, n)
			}
		}
	}
	return sel
}

// whereSelected is the condition on media rows m of a selection: $1 the
// selected local servers, $2 whether remote media is selected, $3 all
// local servers.
const whereSelected = `(m.origin = ANY($1) OR ($2 AND m.origin <> ALL($3)))`

// args returns the arguments of whereSelected.
func (s *source) args(sel selection) []any {
	return []any{sel.local, sel.remote, s.local}
}

// Totals counts the selected media and sums their recorded sizes.
func (s *source) Totals(ctx context.Context, f importer.Filter) (importer.Totals, error) {
	var t importer.Totals
	err := s.readOnly(ctx, func(tx *sql.Tx) error {
		return tx.QueryRowContext(ctx, `SELECT COUNT(*), COALESCE(SUM(m.size_bytes), 0) FROM media AS m WHERE `+whereSelected,
			s.args(s.selectionFor(f))...).Scan(&t.Items, &t.Bytes)
	})
	if err != nil {
		return importer.Totals{}, fmt.Errorf("counting matrix-media-repo media: %w", err)
	}
	return t, nil
}

// Walk lists the selected media ordered by media ID and origin, a page of
// rows per read-only transaction (no transaction is open while fn runs).
func (s *source) Walk(ctx context.Context, f importer.Filter, fn func(importer.Item) error) error {
	sel := s.selectionFor(f)
	var after *mediaKey
	for {
		rows, err := s.page(ctx, sel, after)
		if err != nil {
			return fmt.Errorf("listing matrix-media-repo media: %w", err)
		}
		for _, r := range rows {
			if err := fn(s.item(r)); err != nil {
				return err
			}
		}
		if len(rows) < s.pageSize {
			return nil
		}
		last := rows[len(rows)-1]
		after = &mediaKey{mediaID: last.mediaID, origin: last.origin}
	}
}

// mediaKey is the position of a media row in Walk's order.
type mediaKey struct {
	mediaID, origin string
}

// mediaRow is a row of the media table with its pinned attribute.
type mediaRow struct {
	origin, mediaID, uploadName, contentType, userID, sha256 string
	sizeBytes, creationTS                                    int64
	quarantined                                              bool
	datastoreID, location                                    string
	pinned                                                   bool
}

// page reads the s.pageSize rows following after (from the start when nil).
func (s *source) page(ctx context.Context, sel selection, after *mediaKey) ([]mediaRow, error) {
	pinned := `FALSE`
	join := ``
	if s.hasAttributes {
		pinned = `COALESCE(a.purpose = 'pinned', FALSE)`
		join = ` LEFT JOIN media_attributes AS a ON a.origin = m.origin AND a.media_id = m.media_id`
	}
	q := `SELECT m.origin, m.media_id, m.upload_name, m.content_type, m.user_id, m.sha256_hash, m.size_bytes,
		m.creation_ts, m.quarantined, m.datastore_id, m.location, ` + pinned + `
		FROM media AS m` + join + ` WHERE ` + whereSelected
	args := s.args(sel)
	if after != nil {
		q += ` AND (m.media_id, m.origin) > ($4, $5)`
		args = append(args, after.mediaID, after.origin)
	}
	q += fmt.Sprintf(` ORDER BY m.media_id, m.origin LIMIT %d`, s.pageSize)
	var out []mediaRow
	err := s.readOnly(ctx, func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, q, args...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var r mediaRow
			if err := rows.Scan(&r.origin, &r.mediaID, &r.uploadName, &r.contentType, &r.userID, &r.sha256, &r.sizeBytes,
				&r.creationTS, &r.quarantined, &r.datastoreID, &r.location, &r.pinned); err != nil {
				return err
			}
			out = append(out, r)
		}
		return rows.Err()
	})
	return out, err
}

// item turns a media row into an importer.Item.
func (s *source) item(r mediaRow) importer.Item {
	it := importer.Item{
		ServerName:  r.origin,
		MediaID:     r.mediaID,
		Remote:      !s.localSet[r.origin],
		ContentType: r.contentType,
		Filename:    r.uploadName,
		CreatedAt:   time.UnixMilli(r.creationTS).UTC(),
		Size:        r.sizeBytes,
		Protected:   r.pinned,
	}
	if !it.Remote {
		it.UserID = r.userID
	}
	if it.Size < 0 {
		it.Size = -1
	}
	if r.quarantined {
		it.QuarantinedBy = QuarantinedBy
	}
	// storage.ValidSHA256 accepts lowercase hex only; matrix-media-repo
	// writes lowercase, and a hash recorded in capitals is the same hash.
	hash := strings.ToLower(r.sha256)
	hashOK := storage.ValidSHA256(hash)
	if hashOK {
		it.SHA256 = hash
	}
	it.Open = func(ctx context.Context) (io.ReadCloser, error) {
		if !hashOK {
			return nil, fmt.Errorf("media %s/%s: recorded sha256_hash %q is not a hex SHA-256, so its content cannot be verified: %w",
				r.origin, r.mediaID, r.sha256, importer.ErrHashMismatch)
		}
		return s.open(ctx, r)
	}
	return it
}

// open opens the bytes of a media row from its datastore.
func (s *source) open(ctx context.Context, r mediaRow) (io.ReadCloser, error) {
	st, ok := s.stores[r.datastoreID]
	if !ok {
		return nil, fmt.Errorf("media %s/%s: its datastore %q is not in the matrix-media-repo configuration", r.origin, r.mediaID, r.datastoreID)
	}
	body, err := st.open(ctx, r.location)
	if err != nil {
		return nil, fmt.Errorf("media %s/%s: %w", r.origin, r.mediaID, err)
	}
	return body, nil
}
