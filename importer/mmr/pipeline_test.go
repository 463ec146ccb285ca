package mmr_test

import (
	"context"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/mmr"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/mmr/mmrtest"
)

// TestPipeline imports a matrix-media-repo installation (mmrtest.Populate:
// PostgreSQL, file and S3 datastores, with its remote media) into real
// stores, including once an S3 datastore, and checks every item there, the
// exact report, a second run that changes nothing, and imports interrupted
// at random points that end the same.
func TestPipeline(t *testing.T) {
	f := mmrtest.New(t)
	f.Populate(t)
	tests := []struct {
		backend string
		seeds   []uint64
	}{
		{"sqlite+files", []uint64{1, 2, 3}},
		{"postgres+files", []uint64{4, 5}},
		{"sqlite+s3", []uint64{6}},
	}
	for _, tc := range tests {
		t.Run(tc.backend, func(t *testing.T) {
			p := importtest.Pipeline{
				Open: func(t testing.TB) importer.Source {
					src, err := mmr.Open(context.Background(), f.ConfigPath)
					if err != nil {
						t.Fatalf("opening the matrix-media-repo source: %v", err)
					}
					return src
				},
				Filter:  importer.Filter{IncludeRemote: true},
				Expects: f.Expects(),
				Counts:  importer.Counts{Imported: 10, Missing: 3, Mismatched: 2, Invalid: 2, Failed: 5},
				Seeds:   tc.seeds,
			}
			p.Check(t, importtest.BackendNamed(t, tc.backend))
		})
	}
}
