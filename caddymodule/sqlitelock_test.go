package caddymodule

import (
	"fmt"
	"io"
	"os"
	"testing"
)

// sqliteHolderEnv, set to an SQLite database path, turns the test binary
// into a helper process (see TestMain) that claims the database as another
// Caddy process would: it prints "held" and keeps the claim until its stdin
// is closed, or prints "refused: <error>" and exits.
const sqliteHolderEnv = "MATRIX_MEDIA_TEST_SQLITE_HOLDER"

// runSQLiteHolder is the helper process of sqliteHolderEnv.
func runSQLiteHolder(db string) int {
	claim, err := claimDatabase(storeSettings{driver: DriverSQLite, dsn: db})
	if err != nil {
		fmt.Printf("refused: %v\n", err)
		return 0
	}
	fmt.Println("held")
	_, _ = io.Copy(io.Discard, os.Stdin)
	claim.release()
	return 0
}

// PostgreSQL serves any number of instances: nothing is claimed.
func TestClaimDatabasePostgres(t *testing.T) {
	claim, err := claimDatabase(storeSettings{driver: DriverPostgres, dsn: "postgres://127.0.0.1/media"})
	if err != nil || claim != nil {
		t.Fatalf("claimDatabase(postgres) = %v, %v; want nil, nil", claim, err)
	}
	claim.release()
}
