package xmatrix

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/pem"
	"io"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fixedReader returns a deterministic byte stream for key generation.
func fixedReader(n byte) io.Reader {
	return mrand.NewChaCha8([32]byte{n})
}

func TestParseSynapseKey(t *testing.T) {
	padded := testSeed + "="
	tests := []struct {
		name    string
		in      string
		wantIDs []string
		wantErr bool
	}{
		{"unpadded", "ed25519 1 " + testSeed + "\n", []string{"ed25519:1"}, false},
		{"padded", "ed25519 1 " + padded + "\n", []string{"ed25519:1"}, false},
		{"no trailing newline, CRLF, comments, blanks", "# key\r\n\r\n  ed25519 a_AbC9 " + testSeed + "\r\n", []string{"ed25519:a_AbC9"}, false},
		{"two keys", "ed25519 1 " + testSeed + "\ned25519 2 " + padded + "\n", []string{"ed25519:1", "ed25519:2"}, false},
		{"empty", "", nil, true},
		{"only comments", "# nothing\n", nil, true},
		{"wrong algorithm", "curve25519 1 " + testSeed, nil, true},
		{"missing seed", "ed25519 1", nil, true},
		{"extra field", "ed25519 1 " + testSeed + " x", nil, true},
		{"bad base64", "ed25519 1 !!!!", nil, true},
		{"short seed", "ed25519 1 " + base64.RawStdEncoding.EncodeToString(make([]byte, 16)), nil, true},
		{"bad version", "ed25519 a:b " + testSeed, nil, true},
		{"duplicate id", "ed25519 1 " + testSeed + "\ned25519 1 " + testSeed, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := ParseSynapseKey([]byte(tt.in))
			if tt.wantErr {
				if err == nil {
					t.Fatalf("ParseSynapseKey = %v, want error", keys)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseSynapseKey: %v", err)
			}
			var ids []string
			for _, k := range keys {
				ids = append(ids, k.ID)
				if k.PublicBase64() != testPublic {
					t.Errorf("key %s: public %s, want %s", k.ID, k.PublicBase64(), testPublic)
				}
			}
			if strings.Join(ids, ",") != strings.Join(tt.wantIDs, ",") {
				t.Fatalf("ids %v, want %v", ids, tt.wantIDs)
			}
		})
	}
}

func TestParseDendriteKey(t *testing.T) {
	seed, _ := base64.RawStdEncoding.DecodeString(testSeed)
	block := func(typ, id string, body []byte) string {
		h := map[string]string{}
		if id != "" {
			h["Key-ID"] = id
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: typ, Headers: h, Bytes: body}))
	}
	// A literal Dendrite-style file, as written by Dendrite's generate-keys.
	literal := "-----BEGIN MATRIX PRIVATE KEY-----\nKey-ID: ed25519:1\n\n" +
		base64.StdEncoding.EncodeToString(seed) + "\n-----END MATRIX PRIVATE KEY-----\n"
	other, _ := GenerateSigningKey(fixedReader(1))
	tests := []struct {
		name    string
		in      string
		wantIDs []string
		wantErr bool
	}{
		{"literal", literal, []string{"ed25519:1"}, false},
		{"two blocks and a foreign one", block("MATRIX PRIVATE KEY", "ed25519:1", seed) +
			block("CERTIFICATE", "", []byte("x")) + string(FormatDendrite(other)), []string{"ed25519:1", other.ID}, false},
		{"missing Key-ID", block("MATRIX PRIVATE KEY", "", seed), nil, true},
		{"bad Key-ID", block("MATRIX PRIVATE KEY", "curve:1", seed), nil, true},
		{"short body", block("MATRIX PRIVATE KEY", "ed25519:1", seed[:31]), nil, true},
		{"no matrix block", block("CERTIFICATE", "", []byte("x")), nil, true},
		{"trailing garbage", literal + "garbage\n", nil, true},
		{"duplicate", literal + literal, nil, true},
		{"empty", "", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := ParseDendriteKey([]byte(tt.in))
			if tt.wantErr {
				if err == nil {
					t.Fatalf("ParseDendriteKey = %v, want error", keys)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseDendriteKey: %v", err)
			}
			var ids []string
			for _, k := range keys {
				ids = append(ids, k.ID)
			}
			if strings.Join(ids, ",") != strings.Join(tt.wantIDs, ",") {
				t.Fatalf("ids %v, want %v", ids, tt.wantIDs)
			}
			if keys[0].PublicBase64() != testPublic {
				t.Fatalf("public %s, want %s", keys[0].PublicBase64(), testPublic)
			}
		})
	}
}

func TestGenerateSigningKey(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 20; i++ {
		k, err := GenerateSigningKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		if len(k.ID) != len("ed25519:a_")+4 || !strings.HasPrefix(k.ID, "ed25519:a_") || !validKeyVersion(k.version()) {
			t.Fatalf("key id %q", k.ID)
		}
		if len(k.Private) != ed25519.PrivateKeySize {
			t.Fatalf("private key size %d", len(k.Private))
		}
		seen[string(k.Public())] = true
	}
	if len(seen) != 20 {
		t.Fatalf("only %d distinct keys out of 20", len(seen))
	}
	// Deterministic with a deterministic reader.
	a, _ := GenerateSigningKey(fixedReader(3))
	b, _ := GenerateSigningKey(fixedReader(3))
	if a.ID != b.ID || !bytes.Equal(a.Private, b.Private) {
		t.Fatal("same reader, different keys")
	}
	if _, err := GenerateSigningKey(bytes.NewReader(make([]byte, 10))); err == nil {
		t.Fatal("short reader accepted")
	}
}

func TestFormatParseRoundTrip(t *testing.T) {
	var keys []SigningKey
	for i := byte(0); i < 3; i++ {
		k, err := GenerateSigningKey(fixedReader(10 + i))
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k)
	}
	tests := []struct {
		name   string
		format func(...SigningKey) []byte
		parse  func([]byte) ([]SigningKey, error)
	}{
		{"synapse", FormatSynapse, ParseSynapseKey},
		{"dendrite", FormatDendrite, ParseDendriteKey},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data := tt.format(keys...)
			got, err := tt.parse(data)
			if err != nil {
				t.Fatalf("parse: %v\n%s", err, data)
			}
			if len(got) != len(keys) {
				t.Fatalf("got %d keys, want %d", len(got), len(keys))
			}
			for i := range keys {
				if got[i].ID != keys[i].ID || !bytes.Equal(got[i].Private, keys[i].Private) {
					t.Fatalf("key %d: got %s, want %s", i, got[i].ID, keys[i].ID)
				}
			}
			// LoadSigningKeys detects the format.
			path := filepath.Join(t.TempDir(), "signing.key")
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			loaded, err := LoadSigningKeys(path)
			if err != nil || len(loaded) != len(keys) || loaded[2].ID != keys[2].ID {
				t.Fatalf("LoadSigningKeys: %v, %v", loaded, err)
			}
		})
	}
	// The spec's seed ends in "…XA1", whose last character carries two
	// non-zero padding bits; the canonical encoding of the same 32 bytes
	// ends in "…XA0".
	if got := string(FormatSynapse(testKey(t))); got != "ed25519 1 YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA0\n" {
		t.Fatalf("FormatSynapse = %q", got)
	}
	if _, err := LoadSigningKeys(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("missing file accepted")
	}
}

// backups lists the backup files of path.
func backups(t *testing.T, path string) []string {
	t.Helper()
	m, err := filepath.Glob(path + ".bak-*")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestMergeKeyFile(t *testing.T) {
	spec := testKey(t)
	added, err := GenerateSigningKey(fixedReader(42))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		format func(...SigningKey) []byte
		parse  func([]byte) ([]SigningKey, error)
		mode   os.FileMode
	}{
		{"synapse", FormatSynapse, ParseSynapseKey, 0o600},
		{"dendrite", FormatDendrite, ParseDendriteKey, 0o640},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "signing.key")
			orig := tt.format(spec)
			if err := os.WriteFile(path, orig, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(path, tt.mode); err != nil {
				t.Fatal(err)
			}

			changed, err := MergeKeyFile(path, added)
			if err != nil || !changed {
				t.Fatalf("first merge: changed=%v err=%v", changed, err)
			}
			data, _ := os.ReadFile(path)
			got, err := tt.parse(data)
			if err != nil {
				t.Fatalf("merged file does not parse in its own format: %v\n%s", err, data)
			}
			if len(got) != 2 || got[0].ID != spec.ID || got[1].ID != added.ID || !bytes.Equal(got[1].Private, added.Private) {
				t.Fatalf("merged keys %v", got)
			}
			st, err := os.Stat(path)
			if err != nil || st.Mode().Perm() != tt.mode {
				t.Fatalf("mode %v (err %v), want %v", st.Mode().Perm(), err, tt.mode)
			}
			bak := backups(t, path)
			if len(bak) != 1 {
				t.Fatalf("backups %v, want one", bak)
			}
			if b, _ := os.ReadFile(bak[0]); !bytes.Equal(b, orig) {
				t.Fatalf("backup content %q, want %q", b, orig)
			}

			// Idempotent: same key again changes nothing.
			changed, err = MergeKeyFile(path, added)
			if err != nil || changed {
				t.Fatalf("second merge: changed=%v err=%v", changed, err)
			}
			if again, _ := os.ReadFile(path); !bytes.Equal(again, data) {
				t.Fatal("idempotent merge modified the file")
			}
			if n := len(backups(t, path)); n != 1 {
				t.Fatalf("idempotent merge wrote a backup (%d backups)", n)
			}

			// Same ID, different seed: error, file untouched.
			conflict, _ := GenerateSigningKey(fixedReader(43))
			conflict.ID = added.ID
			if _, err := MergeKeyFile(path, conflict); err == nil {
				t.Fatal("conflicting seed accepted")
			}
			if again, _ := os.ReadFile(path); !bytes.Equal(again, data) {
				t.Fatal("conflicting merge modified the file")
			}
			// No temporary files left behind.
			entries, _ := os.ReadDir(filepath.Dir(path))
			for _, e := range entries {
				if strings.Contains(e.Name(), ".tmp-") {
					t.Fatalf("temporary file left: %s", e.Name())
				}
			}
		})
	}
}

func TestMergeKeyFileEdgeCases(t *testing.T) {
	dir := t.TempDir()
	k, _ := GenerateSigningKey(fixedReader(5))
	if _, err := MergeKeyFile(filepath.Join(dir, "missing"), k); err == nil {
		t.Fatal("missing file accepted")
	}
	// A file without trailing newline and only a comment is treated as
	// Synapse format.
	path := filepath.Join(dir, "comment.key")
	if err := os.WriteFile(path, []byte("# keys"), 0o600); err != nil {
		t.Fatal(err)
	}
	if changed, err := MergeKeyFile(path, k); err != nil || !changed {
		t.Fatalf("merge into comment-only file: %v %v", changed, err)
	}
	data, _ := os.ReadFile(path)
	if want := "# keys\n" + string(FormatSynapse(k)); string(data) != want {
		t.Fatalf("content %q, want %q", data, want)
	}
	// A broken file is not touched.
	bad := filepath.Join(dir, "bad.key")
	if err := os.WriteFile(bad, []byte("ed25519 1 !!!\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := MergeKeyFile(bad, k); err == nil {
		t.Fatal("merge into a broken file accepted")
	}
	if len(backups(t, bad)) != 0 {
		t.Fatal("backup written for a failed merge")
	}
	// Invalid keys are rejected.
	if _, err := MergeKeyFile(path, SigningKey{ID: "ed25519:x"}); err == nil {
		t.Fatal("empty private key accepted")
	}
	if _, err := MergeKeyFile(path, SigningKey{ID: "bad id", Private: k.Private}); err == nil {
		t.Fatal("bad key id accepted")
	}
	// Symlinks are followed: the target is updated, the link stays.
	target := filepath.Join(dir, "target.key")
	if err := os.WriteFile(target, FormatSynapse(testKey(t)), 0o600); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link.key")
	if err := os.Symlink(target, link); err != nil {
		t.Skipf("symlinks unsupported: %v", err)
	}
	if changed, err := MergeKeyFile(link, k); err != nil || !changed {
		t.Fatalf("merge through symlink: %v %v", changed, err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatal("symlink replaced by a file")
	}
	keys, err := LoadSigningKeys(target)
	if err != nil || len(keys) != 2 {
		t.Fatalf("target after merge: %v %v", keys, err)
	}
}
