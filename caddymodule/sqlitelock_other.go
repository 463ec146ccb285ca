//go:build !(linux || darwin || freebsd || openbsd || netbsd || dragonfly)

package caddymodule

import "os"

// lockFile does nothing on this system: there is no flock, so a second
// process on the same SQLite database is not detected.
func lockFile(string) (*os.File, error) { return nil, nil }
