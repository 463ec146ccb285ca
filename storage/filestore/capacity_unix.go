//go:build linux || darwin || freebsd

package filestore

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Capacity reports the space of the filesystem holding the store: the bytes
// an unprivileged writer may still use (free) and its size. It implements
// storage.CapacityReporter.
func (s *Store) Capacity() (free, size uint64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.root, &st); err != nil {
		return 0, 0, fmt.Errorf("reading the filesystem of %s: %w", s.root, err)
	}
	bs := uint64(st.Bsize)
	return uint64(st.Bavail) * bs, uint64(st.Blocks) * bs, nil
}
