//go:build race

package e2e

// raceEnabled reports whether the tests run with -race; Caddy is then built
// with the race detector too.
const raceEnabled = true
