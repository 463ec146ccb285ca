package caddymodule

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/caddyserver/caddy/v2"
)

// sqliteClaims holds this process's claim on every SQLite database it has
// open, keyed by the database's absolute path. SQLite serves one instance:
// a second Caddy process on the same file would keep its own media cache,
// run its own jobs and collect blobs the first one is writing, so the claim
// refuses it at provisioning. Within one process the claim is shared and
// reference counted: a reload that changes a setting of the resources (the
// media cache size, say) opens a new store on the same file before the old
// one is closed, and both hold the claim until the last one closes.
var sqliteClaims = caddy.NewUsagePool()

// sqliteLockSuffix names the lock file kept next to an SQLite database: the
// database path followed by it. It holds the process ID of the holder, for
// the error another process gets. The file is never removed (removing it
// would let two processes lock two different files of the same name).
const sqliteLockSuffix = ".instance-lock"

// databaseClaim is a configuration's hold on its SQLite database (nil for
// PostgreSQL, which serves any number of instances). release gives it up;
// it is safe on nil and more than once.
type databaseClaim struct {
	path string
	once sync.Once
}

// claimDatabase claims s's database for this process when it is SQLite.
// Another process holding it is an error naming that process.
func claimDatabase(s storeSettings) (*databaseClaim, error) {
	if s.driver != DriverSQLite {
		return nil, nil
	}
	if _, _, err := sqliteClaims.LoadOrNew(s.dsn, func() (caddy.Destructor, error) {
		return lockSQLite(s.dsn)
	}); err != nil {
		return nil, err
	}
	return &databaseClaim{path: s.dsn}, nil
}

// release gives up the claim; the process's last claim on the database
// unlocks it for other processes.
func (c *databaseClaim) release() {
	if c == nil {
		return
	}
	c.once.Do(func() { _, _ = sqliteClaims.Delete(c.path) })
}

// sqliteLock is the lock file of an SQLite database, locked by this process
// until Destruct.
type sqliteLock struct {
	f *os.File
}

// Destruct implements caddy.Destructor: closing the file drops the lock.
func (l *sqliteLock) Destruct() error {
	if l.f == nil {
		return nil
	}
	return l.f.Close()
}

// lockSQLite locks the lock file of the SQLite database at dbPath (an
// absolute path) for this process, creating the directory and the file as
// needed. The lock is an exclusive flock on the lock file, never on the
// database itself: SQLite's own locks there are fcntl locks, which a process
// loses on closing any descriptor of the file.
func lockSQLite(dbPath string) (*sqliteLock, error) {
	if err := os.MkdirAll(filepath.Dir(dbPath), 0o750); err != nil {
		return nil, fmt.Errorf("creating the SQLite database directory: %w", err)
	}
	f, err := lockFile(dbPath + sqliteLockSuffix)
	if err != nil {
		return nil, err
	}
	return &sqliteLock{f: f}, nil
}

// errDatabaseInUse is the error of a database another process holds; pid is
// 0 when the lock file does not say (yet) which.
func errDatabaseInUse(dbPath string, pid int) error {
	holder := "another Caddy process"
	if pid > 0 {
		holder = fmt.Sprintf("another Caddy process (pid %d)", pid)
	}
	return fmt.Errorf("the SQLite database %s is in use by %s: SQLite serves one instance; to run several instances, use PostgreSQL", dbPath, holder)
}

// Interface guard.
var _ caddy.Destructor = (*sqliteLock)(nil)
