// Package testmeta opens fresh metadata stores for tests: SQLite in the
// test's temporary directory, or PostgreSQL on a fresh database of
// internal/testpg (a test package using it needs testpg.Main in its
// TestMain). Each store is closed when the test ends.
package testmeta

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

// SQLite opens a fresh SQLite metadata store.
func SQLite(t testing.TB) *sqlstore.Store {
	t.Helper()
	m, err := sqlstore.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "meta.db"))
	if err != nil {
		t.Fatalf("opening sqlite metadata store: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// Postgres opens a metadata store on a fresh PostgreSQL database.
func Postgres(t testing.TB) *sqlstore.Store {
	t.Helper()
	m, err := sqlstore.OpenPostgres(context.Background(), testpg.DSN(t))
	if err != nil {
		t.Fatalf("opening postgres metadata store: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// Backend is one kind of metadata store.
type Backend struct {
	// Name is "sqlite" or "postgres", for subtest names.
	Name string
	// Open opens a fresh store of that kind.
	Open func(t testing.TB) *sqlstore.Store
}

// Backends are both kinds, SQLite first.
var Backends = []Backend{{"sqlite", SQLite}, {"postgres", Postgres}}
