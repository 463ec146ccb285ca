package filestore

import (
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

func TestCapacity(t *testing.T) {
	s, err := New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var _ storage.CapacityReporter = s
	free, size, err := s.Capacity()
	if err != nil || size == 0 || free > size {
		t.Fatalf("Capacity() = %d free of %d, %v; want a size and free <= size", free, size, err)
	}
}
