// Package testpg gives tests a real PostgreSQL database of their own.
//
// DSN returns the connection string of a fresh, uniquely named database that
// is dropped when the test ends. The server behind it is found once per test
// binary, in this order:
//
//  1. the server named by the environment variable MATRIX_MEDIA_TEST_POSTGRES
//     (a connection string; its role must be allowed to CREATE DATABASE);
//  2. a server on 127.0.0.1:5432 accepting user postgres without a password;
//  3. a throwaway cluster started from the PostgreSQL binaries installed on
//     the machine (/usr/lib/postgresql/*/bin, else initdb and postgres on
//     PATH) in a temporary directory, listening on a free loopback port.
//
// Setting MATRIX_MEDIA_TEST_POSTGRES_FORCE_CLUSTER=1 skips step 2 (step 1
// still wins). When no step works, DSN fails the test with the reasons; it
// never skips.
//
// A package whose tests call DSN must stop a throwaway cluster when its test
// binary exits, by declaring
//
//	func TestMain(m *testing.M) { testpg.Main(m) }
//
// (or by calling Stop after m.Run in its own TestMain). As a safety net the
// cluster's postmaster is killed by the kernel if the test binary dies, and
// directories left behind by dead test binaries are removed the next time a
// cluster starts.
//
// The server is shared by all tests of the binary, so this package keeps it in
// package-level state guarded by a mutex; that is the one purpose of that
// state.
package testpg

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	// Registers the "pgx" database/sql driver.
	_ "github.com/jackc/pgx/v5/stdlib"
)

// Environment variables read by this package.
const (
	// EnvDSN names a PostgreSQL server (connection string) to use instead of
	// looking for one.
	EnvDSN = "MATRIX_MEDIA_TEST_POSTGRES"
	// EnvForceCluster, when set to a true value ("1", "true", "yes"), skips
	// the server on 127.0.0.1:5432 and starts a throwaway cluster (unless
	// EnvDSN is set).
	EnvForceCluster = "MATRIX_MEDIA_TEST_POSTGRES_FORCE_CLUSTER"
)

// localDSN is the conventional local server tried in step 2.
const localDSN = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable&connect_timeout=3"

// server is a PostgreSQL server tests may create databases on.
type server struct {
	// source says where the server came from: "env", "local" or "cluster".
	source string
	// dsn connects to the server's maintenance database as a role that may
	// create databases.
	dsn string
	// admin is a pool on dsn.
	admin *sql.DB
	// cluster is the throwaway cluster, nil unless source is "cluster".
	cluster *cluster
}

// shared is the binary's server, found on first use.
var shared struct {
	mu  sync.Mutex
	srv *server
	err error
}

// DSN creates a new database with a unique name and returns a pgx connection
// string for it. The database is dropped (with any remaining connections
// forcibly closed) in t.Cleanup; register cleanups that close connections
// after calling DSN so they run first. When no server can be found or the
// database cannot be created, DSN fails the test.
func DSN(t testing.TB) string {
	t.Helper()
	srv, err := getServer()
	if err != nil {
		t.Fatalf("testpg: no PostgreSQL server for tests: %v", err)
	}
	name, err := randomName()
	if err != nil {
		t.Fatalf("testpg: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := srv.admin.ExecContext(ctx, `CREATE DATABASE `+quoteIdent(name)); err != nil {
		t.Fatalf("testpg: creating database %s on the %s server: %v", name, srv.source, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := dropDatabase(ctx, srv.admin, name); err != nil {
			t.Errorf("testpg: %v", err)
		}
	})
	dsn, err := withDatabase(srv.dsn, name)
	if err != nil {
		t.Fatalf("testpg: %v", err)
	}
	return dsn
}

// Source reports where the binary's server comes from ("env", "local" or
// "cluster"), finding it first if needed; it fails the test like DSN.
func Source(t testing.TB) string {
	t.Helper()
	srv, err := getServer()
	if err != nil {
		t.Fatalf("testpg: no PostgreSQL server for tests: %v", err)
	}
	return srv.source
}

// Main runs the tests of m, stops the throwaway cluster if one was started,
// and exits with the tests' status. Call it from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if err := Stop(); err != nil {
		fmt.Fprintf(os.Stderr, "testpg: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// Stop closes the shared admin connection and stops and removes the
// throwaway cluster if this binary started one. A later DSN finds a server
// again. Stop is safe to call when nothing was started.
func Stop() error {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	srv := shared.srv
	shared.srv, shared.err = nil, nil
	if srv == nil {
		return nil
	}
	err := srv.admin.Close()
	if srv.cluster != nil {
		err = errors.Join(err, srv.cluster.stop())
	}
	if err != nil {
		return fmt.Errorf("stopping test PostgreSQL: %w", err)
	}
	return nil
}

// getServer returns the binary's server, finding it on first use. A failure
// is remembered so that every test reports it without retrying.
func getServer() (*server, error) {
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.srv == nil && shared.err == nil {
		shared.srv, shared.err = findServer()
	}
	return shared.srv, shared.err
}

// findServer walks the three sources in order.
func findServer() (*server, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if dsn := os.Getenv(EnvDSN); dsn != "" {
		admin, err := connect(ctx, dsn)
		if err != nil {
			return nil, fmt.Errorf("connecting to %s: %w", EnvDSN, err)
		}
		return &server{source: "env", dsn: dsn, admin: admin}, nil
	}
	var reasons []string
	if isTrue(os.Getenv(EnvForceCluster)) {
		reasons = append(reasons, "local server: skipped because "+EnvForceCluster+" is set")
	} else {
		admin, err := connect(ctx, localDSN)
		if err == nil {
			return &server{source: "local", dsn: localDSN, admin: admin}, nil
		}
		reasons = append(reasons, fmt.Sprintf("local server on 127.0.0.1:5432: %v", err))
	}
	c, err := startCluster(ctx)
	if err != nil {
		reasons = append(reasons, fmt.Sprintf("throwaway cluster: %v", err))
		return nil, errors.New(strings.Join(reasons, "; "))
	}
	admin, err := connect(ctx, c.dsn())
	if err != nil {
		_ = c.stop()
		reasons = append(reasons, fmt.Sprintf("throwaway cluster: connecting: %v", err))
		return nil, errors.New(strings.Join(reasons, "; "))
	}
	return &server{source: "cluster", dsn: c.dsn(), admin: admin, cluster: c}, nil
}

// connect opens a small pool on dsn and checks that the server answers.
func connect(ctx context.Context, dsn string) (*sql.DB, error) {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return nil, fmt.Errorf("opening connection: %w", err)
	}
	db.SetMaxOpenConns(4)
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("pinging server: %w", err)
	}
	return db, nil
}

// dropDatabase drops the named database, closing other sessions on it
// (WITH (FORCE) needs PostgreSQL 13; older servers get a plain DROP).
func dropDatabase(ctx context.Context, admin *sql.DB, name string) error {
	_, err := admin.ExecContext(ctx, `DROP DATABASE IF EXISTS `+quoteIdent(name)+` WITH (FORCE)`)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && pe.Code == "42601" { // syntax_error: before PostgreSQL 13
		_, err = admin.ExecContext(ctx, `DROP DATABASE IF EXISTS `+quoteIdent(name))
	}
	if err != nil {
		return fmt.Errorf("dropping database %s: %w", name, err)
	}
	return nil
}

// randomName returns a database name unique across test binaries.
func randomName() (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("making database name: %w", err)
	}
	return "mmtest_" + hex.EncodeToString(b[:]), nil
}

// quoteIdent quotes a PostgreSQL identifier.
func quoteIdent(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

// withDatabase returns dsn pointing at database name instead. URL DSNs get a
// new path; key=value DSNs get a trailing dbname, which overrides an earlier
// one.
func withDatabase(dsn, name string) (string, error) {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return "", fmt.Errorf("parsing DSN: %w", err)
		}
		u.Path = "/" + name
		u.RawPath = ""
		return u.String(), nil
	}
	return strings.TrimSpace(dsn) + " dbname=" + name, nil
}

// isTrue reports whether an environment value means yes.
func isTrue(v string) bool {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "1", "true", "yes", "on":
		return true
	}
	return false
}
