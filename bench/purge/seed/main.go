// Command seed fills the stores of the purge benchmark (bench/run-purge.sh)
// with a cached remote media population: -rows ready remote media items,
// spread over -servers server names, each with its own blob of -size
// distinct bytes in the file datastore at -store, created, uploaded and
// last claimed -age ago (never accessed since), so that a purge with a
// cutoff after that time removes every row and, the blobs being older than
// any grace period, every blob too.
//
// It writes the way the module's cache does, through the storage packages
// and in the storage contract's order: the bytes (filestore.Store.Put,
// durable), then the blob record (sqlstore.Store.RecordBlob, its claim
// backdated to the creation time), then the media row
// (sqlstore.Store.InsertMedia). storage.IngestTo is not used because it
// claims every blob now, which would keep them from the purge for the grace
// period.
//
// Usage:
//
//	seed -dsn postgres://… -store /tmp/x/store -rows 100000
//
// It prints one line on standard output:
//
//	seeded 100000 rows, 102400000 bytes in 95.3 s (1049 rows/s)
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// defaultDatastore is the name of the datastore the module configures from
// storage_path (mediaapi.DefaultDatastore).
const defaultDatastore = "default"

// Bounds of the flags.
const (
	maxRows    = 10_000_000
	maxSize    = 1 << 20
	maxWorkers = 64
	maxServers = 10_000
)

// options are the command-line flags.
type options struct {
	dsn       string
	store     string
	datastore string
	rows      int
	servers   int
	size      int
	age       time.Duration
	workers   int
}

func main() {
	var o options
	flag.StringVar(&o.dsn, "dsn", "", "PostgreSQL connection string of the module's database (required)")
	flag.StringVar(&o.store, "store", "", "root of the file datastore (the module's storage_path; required)")
	flag.StringVar(&o.datastore, "datastore", defaultDatastore, "name of the datastore recorded for the blobs")
	flag.IntVar(&o.rows, "rows", 100_000, "remote media rows (and blobs) to create")
	flag.IntVar(&o.servers, "servers", 50, "distinct remote server names")
	flag.IntVar(&o.size, "size", 1024, "bytes of each blob (at least 16)")
	flag.DurationVar(&o.age, "age", 48*time.Hour, "how long ago the media were cached (at least 2h: older than the grace period)")
	flag.IntVar(&o.workers, "workers", 8, "concurrent writers")
	flag.Parse()
	if err := o.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "seed:", err)
		flag.Usage()
		os.Exit(2)
	}
	if err := run(context.Background(), o); err != nil {
		fmt.Fprintln(os.Stderr, "seed:", err)
		os.Exit(1)
	}
}

// validate bounds the flags.
func (o options) validate() error {
	switch {
	case o.dsn == "" || o.store == "":
		return errors.New("-dsn and -store are required")
	case o.rows < 1 || o.rows > maxRows:
		return fmt.Errorf("-rows must be from 1 to %d", maxRows)
	case o.servers < 1 || o.servers > maxServers:
		return fmt.Errorf("-servers must be from 1 to %d", maxServers)
	case o.size < 16 || o.size > maxSize:
		return fmt.Errorf("-size must be from 16 to %d", maxSize)
	case o.age < 2*time.Hour:
		return errors.New("-age must be at least 2h")
	case o.workers < 1 || o.workers > maxWorkers:
		return fmt.Errorf("-workers must be from 1 to %d", maxWorkers)
	}
	return nil
}

// seeder writes the rows.
type seeder struct {
	o      options
	meta   *sqlstore.Store
	blobs  *filestore.Store
	cached time.Time
}

// run opens the stores and writes the rows with o.workers writers.
func run(ctx context.Context, o options) error {
	meta, err := sqlstore.Open(ctx, "postgres", o.dsn)
	if err != nil {
		return err
	}
	defer meta.Close()
	blobs, err := filestore.New(o.store)
	if err != nil {
		return fmt.Errorf("opening the file datastore: %w", err)
	}
	s := &seeder{o: o, meta: meta, blobs: blobs, cached: time.Now().Add(-o.age).Truncate(time.Millisecond)}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		next  atomic.Int64
		total atomic.Int64
		wg    sync.WaitGroup
	)
	start := time.Now()
	for range o.workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= o.rows || ctx.Err() != nil {
					return
				}
				if err := s.seedOne(ctx, i); err != nil {
					cancel(err)
					return
				}
				if n := total.Add(1); n%10_000 == 0 {
					fmt.Fprintf(os.Stderr, "seed: %d rows\n", n)
				}
			}
		})
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return err
	}
	elapsed := time.Since(start)
	fmt.Printf("seeded %d rows, %d bytes in %.1f s (%.0f rows/s)\n",
		o.rows, int64(o.rows)*int64(o.size), elapsed.Seconds(), float64(o.rows)/elapsed.Seconds())
	return nil
}

// seedOne stores row i: bytes, blob record, media row.
func (s *seeder) seedOne(ctx context.Context, i int) error {
	body := make([]byte, s.o.size)
	// The row number makes every body distinct; the rest is random.
	binary.BigEndian.PutUint64(body, uint64(i))
	if _, err := rand.Read(body[8:]); err != nil {
		return fmt.Errorf("row %d: random bytes: %w", i, err)
	}
	res, err := s.blobs.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
	if err != nil {
		return fmt.Errorf("row %d: storing bytes: %w", i, err)
	}
	if _, err := s.meta.RecordBlob(ctx, storage.BlobRecord{
		SHA256: res.SHA256, Size: res.Size, PrefixSHA256: res.PrefixSHA256,
		Datastore: s.o.datastore, CreatedAt: s.cached,
	}); err != nil {
		return fmt.Errorf("row %d: %w", i, err)
	}
	err = s.meta.InsertMedia(ctx, storage.Media{
		ServerName:  fmt.Sprintf("remote%d.example", i%s.o.servers),
		MediaID:     fmt.Sprintf("seed%08d", i),
		State:       storage.StateReady,
		SHA256:      res.SHA256,
		Size:        res.Size,
		ContentType: "application/octet-stream",
		CreatedAt:   s.cached,
		UploadedAt:  s.cached,
		Remote:      true,
	})
	if err != nil {
		return fmt.Errorf("row %d: %w", i, err)
	}
	return nil
}
