package jobs

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
)

func TestMain(m *testing.M) { testpg.Main(m) }

func init() {
	backends = append(backends,
		// SQLite is used by one process: both runners share one handle.
		backend{"sqlite", func(t *testing.T) (storage.JobStore, storage.JobStore) {
			s := openSQL(t, "sqlite", filepath.Join(t.TempDir(), "meta.db"))
			return s, s
		}},
		// Two handles on one PostgreSQL database: two instances.
		backend{"postgres", func(t *testing.T) (storage.JobStore, storage.JobStore) {
			dsn := testpg.DSN(t)
			return openSQL(t, "postgres", dsn), openSQL(t, "postgres", dsn)
		}},
	)
}

// openSQL opens a metadata store, closed when the test ends.
func openSQL(t *testing.T, driver, dsn string) *sqlstore.Store {
	t.Helper()
	s, err := sqlstore.Open(context.Background(), driver, dsn)
	if err != nil {
		t.Fatalf("opening %s: %v", driver, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}
