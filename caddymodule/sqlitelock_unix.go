//go:build linux || darwin || freebsd || openbsd || netbsd || dragonfly

package caddymodule

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// lockFile opens (creating it) and locks the lock file at path with an
// exclusive, non-blocking flock, and writes this process's ID into it. The
// lock belongs to the open file: it is dropped when the returned file is
// closed or the process ends, however it ends. Another process holding the
// lock is errDatabaseInUse.
func lockFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening the SQLite instance lock: %w", err)
	}
	if err := flock(f); err != nil {
		held := errors.Is(err, syscall.EWOULDBLOCK)
		var pid int
		if held {
			pid = lockHolder(f)
		}
		_ = f.Close()
		if held {
			return nil, errDatabaseInUse(strings.TrimSuffix(path, sqliteLockSuffix), pid)
		}
		return nil, fmt.Errorf("locking the SQLite instance lock: %w", err)
	}
	// The process ID is only for another process's error message: the lock
	// holds without it.
	if f.Truncate(0) == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

// flock takes an exclusive, non-blocking flock on f, retrying when a signal
// interrupts it.
func flock(f *os.File) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if !errors.Is(err, syscall.EINTR) {
			return err
		}
	}
}

// lockHolder reads the process ID written in the lock file; 0 when there is
// none (the holder may not have written it yet).
func lockHolder(f *os.File) int {
	buf := make([]byte, 32)
	n, _ := f.ReadAt(buf, 0)
	pid, err := strconv.Atoi(strings.TrimSpace(string(buf[:n])))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}
