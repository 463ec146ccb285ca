//go:build !(linux || darwin || freebsd)

package filestore

import "errors"

// Capacity is not available on this system.
func (s *Store) Capacity() (free, size uint64, err error) {
	return 0, 0, errors.New("filesystem capacity is not available on this system")
}
