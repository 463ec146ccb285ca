package testpg

import (
	"context"
	"database/sql"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestMain(m *testing.M) { Main(m) }

func openDB(t *testing.T, dsn string) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func TestSourceFollowsEnvironment(t *testing.T) {
	src := Source(t)
	t.Logf("PostgreSQL source: %s", src)
	switch {
	case os.Getenv(EnvDSN) != "":
		if src != "env" {
			t.Fatalf("source = %q with %s set, want env", src, EnvDSN)
		}
	case isTrue(os.Getenv(EnvForceCluster)):
		if src != "cluster" {
			t.Fatalf("source = %q with %s set, want cluster", src, EnvForceCluster)
		}
	default:
		if src != "local" && src != "cluster" {
			t.Fatalf("source = %q, want local or cluster", src)
		}
	}
}

func TestDSNGivesFreshDatabases(t *testing.T) {
	ctx := context.Background()
	a, b := openDB(t, DSN(t)), openDB(t, DSN(t))
	var nameA, nameB string
	if err := a.QueryRowContext(ctx, `SELECT current_database()`).Scan(&nameA); err != nil {
		t.Fatal(err)
	}
	if err := b.QueryRowContext(ctx, `SELECT current_database()`).Scan(&nameB); err != nil {
		t.Fatal(err)
	}
	if nameA == nameB || !strings.HasPrefix(nameA, "mmtest_") || !strings.HasPrefix(nameB, "mmtest_") {
		t.Fatalf("databases %q and %q: want two distinct mmtest_ databases", nameA, nameB)
	}
	if _, err := a.ExecContext(ctx, `CREATE TABLE t (x int)`); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := b.QueryRowContext(ctx, `SELECT count(*) FROM pg_tables WHERE tablename = 't'`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("table created in %s is visible in %s", nameA, nameB)
	}
}

func TestDatabaseDroppedAtCleanup(t *testing.T) {
	ctx := context.Background()
	var name string
	t.Run("inner", func(t *testing.T) {
		db := openDB(t, DSN(t)) // left open on purpose: the drop must force it closed
		if err := db.QueryRowContext(ctx, `SELECT current_database()`).Scan(&name); err != nil {
			t.Fatal(err)
		}
	})
	srv, err := getServer()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := srv.admin.QueryRowContext(ctx, `SELECT count(*) FROM pg_database WHERE datname = $1`, name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if name == "" || n != 0 {
		t.Fatalf("database %q still exists after the test ended (count %d)", name, n)
	}
}

// TestThrowawayCluster always exercises the cluster path, whatever server the
// rest of the tests use.
func TestThrowawayCluster(t *testing.T) {
	ctx := context.Background()
	c, err := startCluster(ctx)
	if err != nil {
		t.Fatalf("starting cluster: %v", err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = c.stop()
		}
	})
	db := openDB(t, c.dsn())
	var user, addr string
	if err := db.QueryRowContext(ctx, `SELECT current_user, host(inet_server_addr())`).Scan(&user, &addr); err != nil {
		t.Fatal(err)
	}
	if user != "postgres" || addr != "127.0.0.1" {
		t.Fatalf("connected as %q to %q, want postgres on 127.0.0.1", user, addr)
	}
	if _, err := db.ExecContext(ctx, `CREATE DATABASE x`); err != nil {
		t.Fatal(err)
	}
	_ = db.Close()
	pid := c.proc.Pid
	if err := c.stop(); err != nil {
		t.Fatalf("stopping: %v", err)
	}
	stopped = true
	select {
	case <-c.exited:
	default:
		t.Fatal("postmaster still running after stop")
	}
	if processAlive(pid) {
		t.Fatalf("process %d still exists after stop", pid)
	}
	if _, err := os.Stat(c.dir); !os.IsNotExist(err) {
		t.Fatalf("cluster directory %s not removed: %v", c.dir, err)
	}
}

func TestRemoveStaleDirs(t *testing.T) {
	// A pid that certainly belonged to a process that has exited.
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	deadPID := cmd.Process.Pid

	mk := func(owner int) string {
		d, err := os.MkdirTemp("", dirPattern)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.RemoveAll(d) })
		if err := os.WriteFile(filepath.Join(d, "owner.pid"), []byte(strconv.Itoa(owner)), 0o644); err != nil {
			t.Fatal(err)
		}
		return d
	}
	stale := mk(deadPID)
	live := mk(os.Getpid())
	running := mk(deadPID)
	if err := os.MkdirAll(filepath.Join(running, "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(running, "data", "postmaster.pid"), []byte(strconv.Itoa(os.Getpid())+"\n/x\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	removeStaleDirs()

	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Errorf("stale directory kept: %v", err)
	}
	for _, d := range []string{live, running} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("directory %s in use was removed: %v", d, err)
		}
	}
}

func TestWithDatabase(t *testing.T) {
	tests := []struct{ in, want string }{
		{"postgres://u@h:5/postgres?sslmode=disable", "postgres://u@h:5/db1?sslmode=disable"},
		{"postgresql://u:p@h/", "postgresql://u:p@h/db1"},
		{"host=h user=u dbname=postgres", "host=h user=u dbname=postgres dbname=db1"},
	}
	for _, tt := range tests {
		got, err := withDatabase(tt.in, "db1")
		if err != nil || got != tt.want {
			t.Errorf("withDatabase(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

func TestFindServerFromEnvironment(t *testing.T) {
	srv, err := getServer()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(EnvDSN, srv.dsn)
	got, err := findServer()
	if err != nil {
		t.Fatalf("findServer with %s set to a working server: %v", EnvDSN, err)
	}
	defer got.admin.Close()
	if got.source != "env" || got.dsn != srv.dsn || got.cluster != nil {
		t.Fatalf("findServer = source %q, dsn %q, cluster %v; want env, %q, none", got.source, got.dsn, got.cluster, srv.dsn)
	}

	// A named server that does not answer is an error, not a fallback.
	t.Setenv(EnvDSN, "postgres://postgres@127.0.0.1:1/postgres?sslmode=disable&connect_timeout=2")
	if bad, err := findServer(); err == nil {
		_ = bad.admin.Close()
		t.Fatal("findServer succeeded with an unreachable server in the environment")
	} else if !strings.Contains(err.Error(), EnvDSN) {
		t.Fatalf("error %q does not name %s", err, EnvDSN)
	}
}

// TestClusterStopStart checks that an owned cluster refuses connections
// while stopped and keeps its data across a restart on the same port.
func TestClusterStopStart(t *testing.T) {
	c := NewCluster(t)
	ctx := context.Background()
	db, err := sql.Open("pgx", c.DSN())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.ExecContext(ctx, `CREATE TABLE kept (v INT); INSERT INTO kept VALUES (42)`); err != nil {
		t.Fatal(err)
	}
	c.Stop(t)
	if err := ping(ctx, c.DSN()); err == nil {
		t.Fatal("stopped cluster accepted a connection")
	}
	c.Start(t)
	var v int
	if err := db.QueryRowContext(ctx, `SELECT v FROM kept`).Scan(&v); err != nil || v != 42 {
		t.Fatalf("after restart: %d, %v; want 42", v, err)
	}
}
