//go:build !unix

package caddymodule

import (
	"errors"
	"io/fs"
	"os"
)

// openNoFollow opens path for reading.
func openNoFollow(path string) (*os.File, error) { return os.Open(path) }

// fileIdentity is not known on this system: files are always sent.
func fileIdentity(fs.FileInfo) (dev, ino uint64, ok bool) { return 0, 0, false }

// resolvedPath is not used on this system.
func resolvedPath(*os.File) (string, error) { return "", errors.New("not supported on this system") }
