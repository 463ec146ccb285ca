package caddymodule

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

func runCmd(t *testing.T, run func(*cobra.Command, []string) error, flags map[string]string, defs ...string) error {
	t.Helper()
	c := &cobra.Command{}
	for _, name := range defs {
		c.Flags().String(name, "", "")
	}
	for k, v := range flags {
		if err := c.Flags().Set(k, v); err != nil {
			t.Fatal(err)
		}
	}
	return run(c, nil)
}

func TestGenerateAndMergeKey(t *testing.T) {
	dir := t.TempDir()
	moduleKey := filepath.Join(dir, "media.key")
	if err := runCmd(t, runGenerateKey, map[string]string{"out": moduleKey, "format": "synapse"}, "out", "format"); err != nil {
		t.Fatal(err)
	}
	keys, err := xmatrix.LoadSigningKeys(moduleKey)
	if err != nil || len(keys) != 1 || !strings.HasPrefix(keys[0].ID, "ed25519:") {
		t.Fatalf("generated %v %v", keys, err)
	}
	if fi, _ := os.Stat(moduleKey); fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v", fi.Mode())
	}
	if err := runCmd(t, runGenerateKey, map[string]string{"out": moduleKey, "format": "synapse"}, "out", "format"); err == nil {
		t.Fatal("generate-key overwrote an existing file")
	}

	// A homeserver key file in each format gains the module's key, once.
	for _, format := range []string{"synapse", "dendrite"} {
		hsKey := filepath.Join(dir, "hs-"+format+".key")
		if err := runCmd(t, runGenerateKey, map[string]string{"out": hsKey, "format": format}, "out", "format"); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 2; i++ {
			if err := runCmd(t, runMergeKey, map[string]string{"key": moduleKey, "into": hsKey}, "key", "into"); err != nil {
				t.Fatal(err)
			}
		}
		merged, err := xmatrix.LoadSigningKeys(hsKey)
		if err != nil || len(merged) != 2 || merged[1].ID != keys[0].ID || !merged[1].Private.Equal(keys[0].Private) {
			t.Fatalf("%s: merged %v %v", format, merged, err)
		}
		backups, _ := filepath.Glob(hsKey + ".bak-*")
		if len(backups) != 1 {
			t.Fatalf("%s: %d backups, want 1 (the second merge changes nothing)", format, len(backups))
		}
	}
}
