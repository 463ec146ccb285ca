package synapse_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/synapse"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/synapse/synapsetest"
)

// TestPipeline imports a Synapse installation (synapsetest.Populate, with
// its remote media cache) into real stores and checks every item there,
// the exact report, a second run that changes nothing, and imports
// interrupted at random points that end the same.
func TestPipeline(t *testing.T) {
	// Without the sha256 column the overwritten file cannot be told from
	// the original: it is imported as it is now.
	withSHA := importer.Counts{Imported: 10, Missing: 3, Mismatched: 2, Invalid: 5}
	withoutSHA := importer.Counts{Imported: 11, Missing: 3, Mismatched: 1, Invalid: 5}
	tests := []struct {
		engine  string
		sha     bool
		backend string
		counts  importer.Counts
		seeds   []uint64
	}{
		{"sqlite3", true, "sqlite+files", withSHA, []uint64{1, 2, 3}},
		{"postgres", true, "postgres+files", withSHA, []uint64{4, 5}},
		{"sqlite3", false, "postgres+files", withoutSHA, []uint64{6}},
		{"postgres", false, "sqlite+files", withoutSHA, []uint64{7}},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s/sha256=%v/into/%s", tc.engine, tc.sha, tc.backend), func(t *testing.T) {
			f := synapsetest.New(t, engine(t, tc.engine), tc.sha)
			p := importtest.Pipeline{
				Open: func(t testing.TB) importer.Source {
					src, err := synapse.Open(context.Background(), f.ConfigPath)
					if err != nil {
						t.Fatalf("opening the synapse source: %v", err)
					}
					return src
				},
				Filter:  importer.Filter{IncludeRemote: true},
				Expects: synapsetest.Expects(f.Populate()),
				Counts:  tc.counts,
				Seeds:   tc.seeds,
			}
			p.Check(t, importtest.BackendNamed(t, tc.backend))
		})
	}
}

// engine returns the synapsetest engine named name.
func engine(t *testing.T, name string) synapsetest.Engine {
	t.Helper()
	for _, e := range synapsetest.Engines() {
		if e.Name == name {
			return e
		}
	}
	t.Fatalf("no engine %q", name)
	return synapsetest.Engine{}
}
