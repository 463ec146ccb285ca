package main

import (
	"context"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// TestCountsRoundTrips runs known exchanges through the proxy against a
// real PostgreSQL and checks the counters: one simple Query, one Sync per
// extended exchange, a ReadyForQuery for each, a notification delivered.
func TestCountsRoundTrips(t *testing.T) {
	dsn := testpg.DSN(t)
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	c := &counters{tag: "tagged_table"}
	go func() { _ = c.serve(ln, u.Host) }()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	connect := func(t *testing.T, sslmode string) *pgx.Conn {
		pu := *u
		pu.Host = ln.Addr().String()
		q := pu.Query()
		q.Set("sslmode", sslmode)
		pu.RawQuery = q.Encode()
		conn, err := pgx.Connect(ctx, pu.String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close(context.Background()) })
		return conn
	}
	conn := connect(t, "disable")
	snap := func() [4]int64 {
		return [4]int64{c.sync.Load(), c.query.Load(), c.ready.Load(), c.notifications.Load()}
	}

	tests := []struct {
		name string
		run  func() error
		want [4]int64 // sync, query, ready, notifications
	}{
		{"simple query", func() error {
			_, err := conn.Exec(ctx, "SELECT 1", pgx.QueryExecModeSimpleProtocol)
			return err
		}, [4]int64{0, 1, 1, 0}},
		{"extended exec", func() error {
			_, err := conn.Exec(ctx, "SELECT $1::int", pgx.QueryExecModeExec, 1)
			return err
		}, [4]int64{1, 0, 1, 0}},
		{"listen", func() error {
			_, err := conn.Exec(ctx, "LISTEN pgcount_test", pgx.QueryExecModeSimpleProtocol)
			return err
		}, [4]int64{0, 1, 1, 0}},
		{"notify self", func() error {
			if _, err := conn.Exec(ctx, "NOTIFY pgcount_test", pgx.QueryExecModeSimpleProtocol); err != nil {
				return err
			}
			_, err := conn.WaitForNotification(ctx)
			return err
		}, [4]int64{0, 1, 1, 1}},
	}
	for _, tt := range tests {
		before := snap()
		if err := tt.run(); err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		after := snap()
		var got [4]int64
		for i := range got {
			got[i] = after[i] - before[i]
		}
		if got != tt.want {
			t.Errorf("%s: counted (sync, query, ready, notifications) %v, want %v", tt.name, got, tt.want)
		}
	}

	// Write classification: statements and the transactions that wrote,
	// through the simple protocol, unnamed and cached prepared statements.
	if _, err := conn.Exec(ctx, "CREATE TABLE t (v int)"); err != nil {
		t.Fatal(err)
	}
	writes := []struct {
		name                string
		run                 func() error
		wantWrites, wantTxs int64
	}{
		{"select", func() error {
			_, err := conn.Exec(ctx, "SELECT count(*) FROM t")
			return err
		}, 0, 0},
		{"autocommit insert, simple", func() error {
			_, err := conn.Exec(ctx, "INSERT INTO t VALUES (1)", pgx.QueryExecModeSimpleProtocol)
			return err
		}, 1, 1},
		{"autocommit update, cached statement twice", func() error {
			for range 2 {
				if _, err := conn.Exec(ctx, "UPDATE t SET v = $1", 2); err != nil {
					return err
				}
			}
			return nil
		}, 2, 2},
		{"transaction with two writes", func() error {
			tx, err := conn.Begin(ctx)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "/* c */ INSERT INTO t VALUES ($1)", 3); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "WITH d AS (DELETE FROM t WHERE v = 3 RETURNING v) SELECT count(*) FROM d"); err != nil {
				return err
			}
			return tx.Commit(ctx)
		}, 2, 1},
		{"read-only transaction", func() error {
			tx, err := conn.Begin(ctx)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
				return err
			}
			return tx.Commit(ctx)
		}, 0, 0},
		{"rolled back write", func() error {
			tx, err := conn.Begin(ctx)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "INSERT INTO t VALUES (4)"); err != nil {
				return err
			}
			return tx.Rollback(ctx)
		}, 1, 0},
	}
	if _, err := conn.Exec(ctx, "CREATE TABLE tagged_table (v int)"); err != nil {
		t.Fatal(err)
	}
	t0, tw0, tx0 := c.tagged.Load(), c.taggedWrites.Load(), c.taggedTxs.Load()
	if _, err := conn.Exec(ctx, "SELECT count(*) FROM tagged_table"); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := conn.Exec(ctx, "UPDATE tagged_table SET v = $1", 1); err != nil {
			t.Fatal(err)
		}
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "UPDATE tagged_table SET v = $1", 2); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if tg, tw, tx := c.tagged.Load()-t0, c.taggedWrites.Load()-tw0, c.taggedTxs.Load()-tx0; tg != 4 || tw != 3 || tx != 3 {
		t.Errorf("tagged executions %d, tagged writes %d, tagged write transactions %d; want 4, 3, 3", tg, tw, tx)
	}
	for _, tt := range writes {
		w0, x0 := c.writes.Load(), c.writeTxs.Load()
		if err := tt.run(); err != nil {
			t.Fatalf("%s: %v", tt.name, err)
		}
		if w, x := c.writes.Load()-w0, c.writeTxs.Load()-x0; w != tt.wantWrites || x != tt.wantTxs {
			t.Errorf("%s: writes %d, write transactions %d; want %d, %d", tt.name, w, x, tt.wantWrites, tt.wantTxs)
		}
	}

	if c.conns.Load() != 1 || c.unparsed.Load() != 0 {
		t.Errorf("conns %d unparsed %d, want 1 and 0", c.conns.Load(), c.unparsed.Load())
	}

	// sslmode=prefer: the client sends an SSLRequest first. The proxy
	// forwards the server's one-byte answer; a server with TLS ('S')
	// leaves the connection forwarded but unparsed, one without ('N') is
	// parsed as before. Either way the connection must work.
	conn = connect(t, "prefer")
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil || one != 1 {
		t.Fatalf("SELECT 1 with sslmode=prefer: %d, %v", one, err)
	}
	if c.conns.Load() != 2 {
		t.Errorf("conns %d, want 2", c.conns.Load())
	}
	if c.unparsed.Load() == 0 && c.query.Load()+c.sync.Load() <= 5 {
		t.Errorf("the prefer connection was parsed but its round trips were not counted")
	}
}
