package mediaapi

import (
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

// TestMain stops the throwaway PostgreSQL cluster of the quota tests
// (internal/testpg) once the tests ran.
func TestMain(m *testing.M) { testpg.Main(m) }
