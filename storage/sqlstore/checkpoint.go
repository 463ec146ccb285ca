package sqlstore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"net/url"
	"time"

	"github.com/mattn/go-sqlite3"
)

// SQLite in WAL mode appends every commit to the WAL file; a checkpoint
// copies the WAL's pages back into the database so that the WAL can start
// over. By default the connection whose commit takes the WAL past 1000
// pages runs the checkpoint inside that commit, fsyncs included: an upload
// every few hundred would wait for it (p99 of the metadata writes 10 ms
// instead of 0.6 ms, see the README's "Upload performance"). Instead, a
// background goroutine on its own connection runs a PASSIVE checkpoint
// every checkpointInterval when something was committed since the last
// one. A passive checkpoint takes no lock that writers or readers wait for:
// it copies what no reader still needs and leaves the rest for next time.
// The writer keeps an automatic checkpoint at walBackstopPages as a
// backstop, should the background one fall behind or fail.
const (
	// checkpointInterval is how often the background checkpointer looks
	// for new commits. Longer intervals (250 ms, 1 s) copied fewer pages
	// but made each checkpoint big enough to stall the writer on the disk
	// (p99.9 of the metadata writes 30-50 ms instead of 13-14 ms).
	checkpointInterval = 100 * time.Millisecond
	// walBackstopPages is the writer's wal_autocheckpoint (in pages of
	// 4 KiB: 40 MiB).
	walBackstopPages = 10000
)

// hookedConnector opens SQLite connections with dsn and runs pragmas on
// each new one (settings the driver has no DSN parameter for), so that a
// connection reopened by database/sql gets them too.
type hookedConnector struct {
	dsn     string
	pragmas []string
}

// Connect implements driver.Connector.
func (c hookedConnector) Connect(context.Context) (driver.Conn, error) {
	d := &sqlite3.SQLiteDriver{ConnectHook: func(conn *sqlite3.SQLiteConn) error {
		for _, p := range c.pragmas {
			if _, err := conn.Exec("PRAGMA "+p, nil); err != nil {
				return fmt.Errorf("PRAGMA %s: %w", p, err)
			}
		}
		return nil
	}}
	return d.Open(c.dsn)
}

// Driver implements driver.Connector.
func (c hookedConnector) Driver() driver.Driver { return &sqlite3.SQLiteDriver{} }

// checkpointer runs the background checkpoints of one SQLite store.
type checkpointer struct {
	db *sql.DB
	// stop ends run (and a checkpoint in progress); done is closed when
	// run has returned.
	stop context.CancelFunc
	done chan struct{}
}

// startCheckpointer opens a connection to the database at abs with the
// common driver parameters and starts checkpointing every interval.
func startCheckpointer(ctx context.Context, abs string, common url.Values, interval time.Duration) (*checkpointer, error) {
	params := url.Values{}
	for k, v := range common {
		params[k] = v
	}
	// A checkpoint syncs the WAL before copying it and the database file
	// after, whatever the synchronous setting; this connection commits
	// nothing of its own.
	params.Set("_synchronous", "NORMAL")
	db, err := sql.Open("sqlite3", sqliteDSN(abs, params))
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	db.SetConnMaxLifetime(0)
	db.SetConnMaxIdleTime(0)
	if err := pingSQLite(ctx, db); err != nil {
		_ = db.Close()
		return nil, err
	}
	runCtx, stop := context.WithCancel(context.Background())
	c := &checkpointer{db: db, stop: stop, done: make(chan struct{})}
	go c.run(runCtx, interval)
	return c, nil
}

// run checkpoints every interval until ctx ends (close), skipping intervals in which
// nothing was committed (PRAGMA data_version, which changes when another
// connection commits). Errors are not fatal: the next interval tries again,
// and the writer's backstop bounds the WAL meanwhile.
func (c *checkpointer) run(ctx context.Context, interval time.Duration) {
	defer close(c.done)
	t := time.NewTicker(interval)
	defer t.Stop()
	var last int64 = -1
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var v int64
		if err := c.db.QueryRowContext(ctx, "PRAGMA data_version").Scan(&v); err != nil || v == last {
			continue
		}
		if _, err := c.db.ExecContext(ctx, "PRAGMA wal_checkpoint(PASSIVE)"); err == nil {
			last = v
		}
	}
}

// checkpoint runs one passive checkpoint now and returns how many WAL
// frames there are and how many of them are in the database (for tests).
func (c *checkpointer) checkpoint(ctx context.Context) (walFrames, checkpointed int64, err error) {
	var busy int64
	if err := c.db.QueryRowContext(ctx, "PRAGMA wal_checkpoint(PASSIVE)").Scan(&busy, &walFrames, &checkpointed); err != nil {
		return 0, 0, fmt.Errorf("checkpointing: %w", classify(err))
	}
	return walFrames, checkpointed, nil
}

// close stops the checkpoints and closes their connection.
func (c *checkpointer) close() error {
	c.stop()
	<-c.done
	return c.db.Close()
}
