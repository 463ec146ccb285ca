//go:build unix

package caddymodule

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
)

// openNoFollow opens path for reading, refusing a final symbolic link, and
// without blocking on a FIFO put in its place.
func openNoFollow(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
}

// fileIdentity returns the device and inode of fi.
func fileIdentity(fi fs.FileInfo) (dev, ino uint64, ok bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, 0, false
	}
	return uint64(st.Dev), uint64(st.Ino), true //nolint:unconvert // Dev's type differs between systems
}

// resolvedPath is the absolute path of f: on Linux as the kernel resolved
// it when f was opened (symbolic links followed), elsewhere f's name made
// absolute.
func resolvedPath(f *os.File) (string, error) {
	if p, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(int(f.Fd()))); err == nil && filepath.IsAbs(p) {
		return p, nil
	}
	if filepath.IsAbs(f.Name()) {
		return f.Name(), nil
	}
	p, err := filepath.Abs(f.Name())
	if err != nil {
		return "", fmt.Errorf("resolving the path: %w", err)
	}
	if p == "" {
		return "", errors.New("no path")
	}
	return p, nil
}
