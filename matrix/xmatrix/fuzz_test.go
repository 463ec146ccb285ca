package xmatrix

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// FuzzParseServerKeys checks /_matrix/key/v2/server parsing on arbitrary
// bodies (no panic; what it accepts are 32-byte ed25519 keys still valid at
// now, and one of them signed the body), and that a response signed with a
// key made from the fuzzed seed always parses back to that key.
func FuzzParseServerKeys(f *testing.F) {
	f.Add([]byte(keyServerJSON), "domain", int64(1690000000000), []byte(testSeed), "a_1")
	f.Add([]byte(keyServerJSON), "other", int64(1690000000000), []byte("x"), "")
	f.Add([]byte(`{"server_name":"domain","valid_until_ts":1e400}`), "domain", int64(0), []byte{}, "k")
	f.Add([]byte(`{"server_name":"domain","valid_until_ts":9007199254740993,"verify_keys":{"ed25519:1":{"key":"=="}}}`), "domain", int64(0), []byte{}, "k")
	f.Add([]byte(`[]`), "", int64(0), []byte{}, "")
	f.Fuzz(func(t *testing.T, raw []byte, server string, nowMS int64, seed []byte, version string) {
		now := time.UnixMilli(nowMS)
		keys, err := ParseServerKeys(raw, server, now)
		if err == nil {
			if len(keys) == 0 {
				t.Fatalf("ParseServerKeys(%q) accepted no keys", raw)
			}
			for id, k := range keys {
				if !strings.HasPrefix(id, "ed25519:") || len(k.Public) != ed25519.PublicKeySize || !k.ValidUntil.After(now) {
					t.Fatalf("ParseServerKeys(%q) key %s = %+v at %s", raw, id, k, now)
				}
			}
		}

		// Round trip: a response we sign must parse.
		if len(seed) < ed25519.SeedSize || !validKeyVersion(version) || server == "" {
			return
		}
		key, err := newSigningKey("ed25519:"+version, seed[:ed25519.SeedSize])
		if err != nil {
			t.Fatalf("newSigningKey: %v", err)
		}
		validUntil := time.UnixMilli(1_700_000_000_000)
		obj := map[string]any{
			"server_name":     server,
			"valid_until_ts":  json.Number("1700000000000"),
			"verify_keys":     map[string]any{key.ID: map[string]any{"key": key.PublicBase64()}},
			"old_verify_keys": map[string]any{},
		}
		if err := SignJSON(obj, server, key); err != nil {
			return // a server name canonical JSON cannot carry (invalid UTF-8)
		}
		body, err := Canonical(obj)
		if err != nil {
			t.Fatalf("Canonical: %v", err)
		}
		got, err := ParseServerKeys(body, server, validUntil.Add(-time.Hour))
		if err != nil {
			t.Fatalf("ParseServerKeys of our own signed response %s: %v", body, err)
		}
		if k := got[key.ID]; !bytes.Equal(k.Public, key.Public()) || !k.ValidUntil.Equal(validUntil) {
			t.Fatalf("ParseServerKeys of our own response: %+v", got)
		}
		if _, err := ParseServerKeys(body, server, validUntil); err == nil {
			t.Fatalf("ParseServerKeys accepted a response at its valid_until_ts")
		}
	})
}

// FuzzParseSigningKeyFile checks the Synapse and Dendrite signing key file
// parsers on arbitrary files (no panic; accepted keys are well formed with
// distinct IDs) and that every accepted set of keys survives a round trip
// through both formats.
func FuzzParseSigningKeyFile(f *testing.F) {
	f.Add([]byte("ed25519 1 " + testSeed + "\n"))
	f.Add([]byte("# comment\n\ned25519 a_b " + testSeed + "==\ned25519 c " + testSeed))
	f.Add([]byte("ed25519 1 " + testSeed + "\ned25519 1 " + testSeed + "\n"))
	f.Add([]byte("ed448 1 AAAA\n"))
	f.Add([]byte("-----BEGIN MATRIX PRIVATE KEY-----\nKey-ID: ed25519:a_1\n\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n-----END MATRIX PRIVATE KEY-----\n"))
	f.Add([]byte("-----BEGIN MATRIX PRIVATE KEY-----\n\nAAAA\n-----END MATRIX PRIVATE KEY-----\ntrailing"))
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, parse := range []struct {
			name string
			fn   func([]byte) ([]SigningKey, error)
		}{{"synapse", ParseSynapseKey}, {"dendrite", ParseDendriteKey}} {
			keys, err := parse.fn(data)
			if err != nil {
				continue
			}
			if len(keys) == 0 {
				t.Fatalf("%s: no keys and no error", parse.name)
			}
			seen := map[string]bool{}
			for _, k := range keys {
				if seen[k.ID] || !strings.HasPrefix(k.ID, "ed25519:") || !validKeyVersion(k.version()) || len(k.Private) != ed25519.PrivateKeySize {
					t.Fatalf("%s: bad key %q", parse.name, k.ID)
				}
				seen[k.ID] = true
			}
			for _, again := range []struct {
				name string
				data []byte
				fn   func([]byte) ([]SigningKey, error)
			}{{"synapse", FormatSynapse(keys...), ParseSynapseKey}, {"dendrite", FormatDendrite(keys...), ParseDendriteKey}} {
				got, err := again.fn(again.data)
				if err != nil || len(got) != len(keys) {
					t.Fatalf("%s keys re-read as %s: %d keys, %v", parse.name, again.name, len(got), err)
				}
				for i := range got {
					if got[i].ID != keys[i].ID || !bytes.Equal(got[i].Private, keys[i].Private) {
						t.Fatalf("%s keys re-read as %s: key %d is %q, want %q", parse.name, again.name, i, got[i].ID, keys[i].ID)
					}
				}
			}
		}
	})
}
