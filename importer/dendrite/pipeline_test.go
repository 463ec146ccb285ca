package dendrite

import (
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/importtest"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// TestPipeline imports the fixture's Dendrite installation (populate, with
// its remote media) into real stores and checks every item there, the
// exact report, a second run that changes nothing, and an interrupted
// import that ends the same.
func TestPipeline(t *testing.T) {
	local := func(id string) storage.MediaRef { return storage.MediaRef{ServerName: fixtureServer, MediaID: id} }
	problems := map[storage.MediaRef]importer.ProblemKind{
		local("a1="): importer.ProblemInvalid,  // '=' in the media ID
		local("c1"):  importer.ProblemMissing,  // no file
		local("c2"):  importer.ProblemMismatch, // base64hash is no SHA-256
		local("c3"):  importer.ProblemFailed,   // a symbolic link out of base_path
		local("c4"):  importer.ProblemMissing,  // a directory where the file should be
		local("c5"):  importer.ProblemMismatch, // base64hash too short
		local("d1"):  importer.ProblemMismatch, // the file was overwritten
	}
	for _, tc := range []struct {
		dialect dialect
		backend string
	}{
		{sqliteDialect, "sqlite+files"},
		{postgresDialect, "postgres+files"},
	} {
		t.Run(string(tc.dialect), func(t *testing.T) {
			fx := newFixture(t, tc.dialect)
			var expects []importtest.Expect
			for _, w := range populate(t, fx) {
				expects = append(expects, importtest.Expect{Item: w.item, Body: w.body, Problem: problems[w.item.Ref()]})
			}
			p := importtest.Pipeline{
				Open: func(t testing.TB) importer.Source {
					src, err := Open(t.Context(), fx.configPath)
					if err != nil {
						t.Fatalf("opening the dendrite source: %v", err)
					}
					return src
				},
				Filter:  importer.Filter{IncludeRemote: true},
				Expects: expects,
				Counts:  importer.Counts{Imported: 6, Missing: 2, Mismatched: 3, Invalid: 1, Failed: 1},
				Seeds:   []uint64{1},
			}
			p.Check(t, importtest.BackendNamed(t, tc.backend))
		})
	}
}
