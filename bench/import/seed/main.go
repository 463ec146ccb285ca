// Command seed writes a Synapse-shaped media repository for the import
// benchmark (bench/run-import.sh): a homeserver.yaml, a SQLite homeserver
// database with Synapse's media tables (the DDL of
// importer/synapse/synapsetest/testdata/sqlite: full schema 72 plus deltas 86 and 91)
// and a media_store whose local_content files hold random bytes (so nothing
// deduplicates), one local_media_repository row per file with its length
// and SHA-256.
//
//	seed -dir /tmp/src -n 100000 -min 1024 -max 8192
//	seed -dir /tmp/src -n 16 -min 134217728 -max 134217728
//
// Sizes are drawn uniformly from [min, max]. Media IDs are 24 random ASCII
// letters, as Synapse draws them, so media_store/local_content/<id[0:2]>/
// <id[2:4]>/<id[4:]> spreads over as many directories as a real store.
// Everything is derived from -seed: the same flags write the same store.
// It prints "<items> <bytes>" on success.
package main

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	// The SQLite driver, registered as "sqlite3".
	_ "github.com/mattn/go-sqlite3"
)

// serverName is the homeserver's server_name in the written config.
const serverName = "bench.example"

// schemaFiles are Synapse's media DDL files, applied in order.
var schemaFiles = []string{"72_media.sql", "86_authenticated.sql", "91_media_hash.sql"}

// contentTypes are cycled through for the rows' media_type.
var contentTypes = []string{"image/jpeg", "image/png", "application/octet-stream", "video/mp4", "text/plain; charset=utf-8"}

// options are the command-line flags.
type options struct {
	dir      string
	schema   string
	n        int
	min, max int64
	seed     uint64
	users    int
}

// medium is one written file and its row.
type medium struct {
	id     string
	size   int64
	sha256 string
}

func main() {
	var o options
	flag.StringVar(&o.dir, "dir", "", "output directory (required; must not exist or be empty)")
	flag.StringVar(&o.schema, "schema", "importer/synapse/synapsetest/testdata/sqlite", "directory of Synapse's SQLite media DDL files")
	flag.IntVar(&o.n, "n", 100000, "number of media")
	flag.Int64Var(&o.min, "min", 1024, "smallest size in bytes")
	flag.Int64Var(&o.max, "max", 8192, "largest size in bytes")
	flag.Uint64Var(&o.seed, "seed", 1, "seed of IDs, sizes and contents")
	flag.IntVar(&o.users, "users", 500, "number of distinct uploaders")
	flag.Parse()
	if o.dir == "" || o.n < 1 || o.min < 1 || o.max < o.min || o.users < 1 {
		flag.Usage()
		os.Exit(2)
	}
	items, bytes, err := run(context.Background(), o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "seed: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("%d %d\n", items, bytes)
}

// run writes the store: files first (in parallel), then the config and the
// database rows in one transaction.
func run(ctx context.Context, o options) (int, int64, error) {
	store := filepath.Join(o.dir, "media_store")
	if err := os.MkdirAll(filepath.Join(store, "local_content"), 0o755); err != nil {
		return 0, 0, fmt.Errorf("creating media store: %w", err)
	}
	media, err := writeFiles(store, plan(o))
	if err != nil {
		return 0, 0, err
	}
	if err := writeConfig(o.dir); err != nil {
		return 0, 0, err
	}
	if err := writeDatabase(ctx, o, media); err != nil {
		return 0, 0, err
	}
	var total int64
	for _, m := range media {
		total += m.size
	}
	return len(media), total, nil
}

// plan draws the IDs and sizes of the media.
func plan(o options) []medium {
	rng := rand.New(rand.NewPCG(o.seed, 0x73796e61707365)) // "synapse"
	const letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
	seen := make(map[string]bool, o.n)
	media := make([]medium, 0, o.n)
	for len(media) < o.n {
		id := make([]byte, 24)
		for i := range id {
			id[i] = letters[rng.IntN(len(letters))]
		}
		if seen[string(id)] {
			continue
		}
		seen[string(id)] = true
		media = append(media, medium{id: string(id), size: o.min + rng.Int64N(o.max-o.min+1)})
	}
	return media
}

// writeFiles writes every medium's file with one goroutine per CPU,
// filling in its SHA-256.
func writeFiles(store string, media []medium) ([]medium, error) {
	errs := make([]error, len(media))
	next := make(chan int)
	var wg sync.WaitGroup
	for range runtime.NumCPU() {
		wg.Go(func() {
			buf := make([]byte, 1<<20)
			for i := range next {
				media[i].sha256, errs[i] = writeFile(store, media[i], uint64(i), buf)
			}
		})
	}
	for i := range media {
		next <- i
	}
	close(next)
	wg.Wait()
	return media, errors.Join(errs...)
}

// writeFile writes m's random content (seeded by its index) at its
// Synapse path and returns its hex SHA-256.
func writeFile(store string, m medium, index uint64, buf []byte) (string, error) {
	path := filepath.Join(store, "local_content", m.id[0:2], m.id[2:4], m.id[4:])
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", fmt.Errorf("creating directory of %s: %w", m.id, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", fmt.Errorf("creating file of %s: %w", m.id, err)
	}
	var key [32]byte
	copy(key[:], fmt.Sprintf("seed item %d", index))
	h := sha256.New()
	body := io.LimitReader(rand.NewChaCha8(key), m.size)
	if _, err := io.CopyBuffer(io.MultiWriter(f, h), body, buf); err != nil {
		f.Close()
		return "", fmt.Errorf("writing file of %s: %w", m.id, err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("closing file of %s: %w", m.id, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// writeConfig writes a homeserver.yaml naming the database and media store
// relative to itself.
func writeConfig(dir string) error {
	yml := "server_name: " + serverName + `
database:
  name: sqlite3
  args:
    database: homeserver.db
media_store_path: media_store
`
	if err := os.WriteFile(filepath.Join(dir, "homeserver.yaml"), []byte(yml), 0o644); err != nil {
		return fmt.Errorf("writing homeserver.yaml: %w", err)
	}
	return nil
}

// writeDatabase creates homeserver.db with Synapse's media tables and one
// local_media_repository row per medium, in one transaction.
func writeDatabase(ctx context.Context, o options, media []medium) error {
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(o.dir, "homeserver.db")+"?_journal_mode=WAL")
	if err != nil {
		return fmt.Errorf("opening database: %w", err)
	}
	defer db.Close()
	for _, name := range schemaFiles {
		ddl, err := os.ReadFile(filepath.Join(o.schema, name))
		if err != nil {
			return fmt.Errorf("reading schema: %w", err)
		}
		if _, err := db.ExecContext(ctx, string(ddl)); err != nil {
			return fmt.Errorf("applying %s: %w", name, err)
		}
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("starting transaction: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit it is a no-op
	stmt, err := tx.PrepareContext(ctx, `INSERT INTO local_media_repository
		(media_id, media_type, media_length, created_ts, upload_name, user_id, last_access_ts, sha256)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?)`)
	if err != nil {
		return fmt.Errorf("preparing insert: %w", err)
	}
	defer stmt.Close()
	base := time.Date(2021, 1, 1, 0, 0, 0, 0, time.UTC).UnixMilli()
	for i, m := range media {
		created := base + int64(i)*1000
		user := fmt.Sprintf("@user%d:%s", i%o.users, serverName)
		name := fmt.Sprintf("file-%d.bin", i)
		if _, err := stmt.ExecContext(ctx, m.id, contentTypes[i%len(contentTypes)], m.size, created, name, user, created, m.sha256); err != nil {
			return fmt.Errorf("inserting row of %s: %w", m.id, err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("committing rows: %w", err)
	}
	return nil
}
