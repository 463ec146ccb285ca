package xmatrix

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

const testNotaryName = "notary.test"

// signer is a key signing on behalf of server.
type signer struct {
	server string
	key    SigningKey
}

// notaryEntry builds a Server Keys object for server listing key, valid
// until validUntil, signed by each of signers in order.
func notaryEntry(t *testing.T, server string, key SigningKey, validUntil time.Time, signers ...signer) map[string]any {
	t.Helper()
	obj := map[string]any{
		"server_name":     server,
		"valid_until_ts":  validUntil.UnixMilli(),
		"verify_keys":     map[string]any{key.ID: map[string]any{"key": key.PublicBase64()}},
		"old_verify_keys": map[string]any{},
	}
	for _, s := range signers {
		if err := SignJSON(obj, s.server, s.key); err != nil {
			t.Fatal(err)
		}
	}
	return obj
}

// notaryBody wraps entries in a /_matrix/key/v2/query answer.
func notaryBody(t *testing.T, entries ...map[string]any) []byte {
	t.Helper()
	list := make([]any, 0, len(entries))
	for _, e := range entries {
		list = append(list, e)
	}
	raw, err := json.Marshal(map[string]any{"server_keys": list})
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func TestParseNotaryResponse(t *testing.T) {
	now := testEpoch
	originKey := testKey(t)
	notaryKey, _ := GenerateSigningKey(fixedReader(40))
	otherKey, _ := GenerateSigningKey(fixedReader(41))
	rotated, _ := GenerateSigningKey(fixedReader(42))
	notary := Notary{ServerName: testNotaryName, KeyID: notaryKey.ID, Public: notaryKey.Public()}
	self := signer{testServer, originKey}
	byNotary := signer{testNotaryName, notaryKey}
	later := now.Add(2 * time.Hour)
	good := notaryEntry(t, testServer, originKey, later, self, byNotary)

	tests := []struct {
		name     string
		raw      []byte
		notary   Notary
		wantErr  string
		wantKeys map[string]time.Time // key ID → ValidUntil
	}{
		{"signed by notary and origin", notaryBody(t, good), notary, "", map[string]time.Time{originKey.ID: later}},
		{"signed in the other order", notaryBody(t, notaryEntry(t, testServer, originKey, later, byNotary, self)), notary, "", map[string]time.Time{originKey.ID: later}},
		{"entries of other servers ignored", notaryBody(t,
			notaryEntry(t, "other.test", otherKey, later, signer{"other.test", otherKey}),
			good,
		), notary, "", map[string]time.Time{originKey.ID: later}},
		{"several entries merged, longest validity wins", notaryBody(t,
			notaryEntry(t, testServer, originKey, now.Add(time.Hour), self, byNotary),
			good,
			notaryEntry(t, testServer, rotated, now.Add(time.Hour), signer{testServer, rotated}, byNotary),
		), notary, "", map[string]time.Time{originKey.ID: later, rotated.ID: now.Add(time.Hour)}},
		{"expired entry dropped", notaryBody(t,
			notaryEntry(t, testServer, rotated, now, signer{testServer, rotated}, byNotary),
			good,
		), notary, "", map[string]time.Time{originKey.ID: later}},
		{"only expired entries", notaryBody(t, notaryEntry(t, testServer, originKey, now.Add(-time.Second), self, byNotary)), notary, "", map[string]time.Time{}},
		{"no entries", notaryBody(t), notary, "", map[string]time.Time{}},
		{"missing notary signature", notaryBody(t, notaryEntry(t, testServer, originKey, later, self)), notary, "no signature by notary.test", nil},
		{"signed by another notary key", notaryBody(t, notaryEntry(t, testServer, originKey, later, self, signer{testNotaryName, otherKey})), notary, "no signature by notary.test", nil},
		{"wrong configured notary key", notaryBody(t, good), Notary{ServerName: testNotaryName, KeyID: notaryKey.ID, Public: otherKey.Public()}, "does not match", nil},
		{"notary signature under another name", notaryBody(t, notaryEntry(t, testServer, originKey, later, self, signer{"evil.test", notaryKey})), notary, "no signature by notary.test", nil},
		{"origin self-signature missing", notaryBody(t, notaryEntry(t, testServer, originKey, later, byNotary)), notary, "no signature by domain", nil},
		{"origin signed with a key it does not list", notaryBody(t, notaryEntry(t, testServer, originKey, later, signer{testServer, otherKey}, byNotary)), notary, "no signature by domain", nil},
		{"one bad entry fails the answer", notaryBody(t, good, notaryEntry(t, testServer, rotated, later, signer{testServer, rotated})), notary, "no signature by notary.test", nil},
		{"tampered after signing", []byte(strings.Replace(string(notaryBody(t, good)), originKey.PublicBase64(), otherKey.PublicBase64(), 1)), notary, "does not match", nil},
		{"server_keys missing", []byte(`{}`), notary, "server_keys", nil},
		{"server_keys entry not an object", []byte(`{"server_keys":[1]}`), notary, "server_keys[0]", nil},
		{"not JSON", []byte(`{"server_keys":`), notary, "parsing notary response", nil},
		{"duplicate keys", []byte(`{"server_keys":[],"server_keys":[]}`), notary, "duplicate", nil},
		{"invalid notary config", notaryBody(t, good), Notary{ServerName: testNotaryName, KeyID: "ed25519:x", Public: notaryKey.Public()[:5]}, "notary public key", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := ParseNotaryResponse(tt.raw, testServer, tt.notary, now)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseNotaryResponse = %v, %v; want error containing %q", keys, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseNotaryResponse: %v", err)
			}
			if len(keys) != len(tt.wantKeys) {
				t.Fatalf("got keys %v, want IDs %v", keys, tt.wantKeys)
			}
			for id, until := range tt.wantKeys {
				k, ok := keys[id]
				if !ok || !k.ValidUntil.Equal(until) {
					t.Fatalf("key %s = %+v (present %v), want valid until %v", id, k, ok, until)
				}
			}
			if k, ok := keys[originKey.ID]; ok && !k.Public.Equal(originKey.Public()) {
				t.Fatalf("key %s has public key %x", originKey.ID, k.Public)
			}
		})
	}

	// Bad signatures wrap ErrBadSignature.
	_, err := ParseNotaryResponse(notaryBody(t, notaryEntry(t, testServer, originKey, later, self)), testServer, notary, now)
	if !errors.Is(err, ErrBadSignature) {
		t.Fatalf("missing notary signature: %v, want ErrBadSignature", err)
	}
}

// stubFetcher returns fixed keys or a fixed error and records calls.
type stubFetcher struct {
	name  string
	keys  map[string]ServerKey
	err   error
	calls *[]string
}

func (s stubFetcher) FetchKeys(ctx context.Context, origin string, keyIDs []string) (map[string]ServerKey, error) {
	*s.calls = append(*s.calls, s.name)
	return s.keys, s.err
}

func TestChainFetcher(t *testing.T) {
	k1 := ServerKey{Public: testKey(t).Public(), ValidUntil: testEpoch.Add(time.Hour)}
	has1 := map[string]ServerKey{"ed25519:1": k1}
	has2 := map[string]ServerKey{"ed25519:2": k1}
	errA := errors.New("notary a down")
	errB := errors.New("origin down")

	type stub struct {
		keys map[string]ServerKey
		err  error
	}
	tests := []struct {
		name      string
		stubs     []stub
		keyIDs    []string
		wantCalls string
		wantKey   string // key ID expected in the result; "" for none
		wantErr   error
	}{
		{"first answers", []stub{{has1, nil}, {has1, nil}}, []string{"ed25519:1"}, "0", "ed25519:1", nil},
		{"falls back after an error", []stub{{nil, errA}, {has1, nil}}, []string{"ed25519:1"}, "0,1", "ed25519:1", nil},
		{"falls back when the key is missing", []stub{{has2, nil}, {has1, nil}}, []string{"ed25519:1"}, "0,1", "ed25519:1", nil},
		{"falls back on an empty answer", []stub{{map[string]ServerKey{}, nil}, {nil, errA}, {has1, nil}}, []string{"ed25519:1"}, "0,1,2", "ed25519:1", nil},
		{"last error when all fail", []stub{{nil, errA}, {nil, errB}}, []string{"ed25519:1"}, "0,1", "", errB},
		{"error wins over unhelpful answers", []stub{{nil, errA}, {has2, nil}}, []string{"ed25519:1"}, "0,1", "", errA},
		{"unhelpful answers: last one, no error", []stub{{map[string]ServerKey{}, nil}, {has2, nil}}, []string{"ed25519:1"}, "0,1", "ed25519:2", nil},
		{"no key IDs: first non-empty", []stub{{map[string]ServerKey{}, nil}, {has2, nil}, {has1, nil}}, nil, "0,1", "ed25519:2", nil},
		{"nil fetchers skipped", []stub{{}, {has1, nil}}, []string{"ed25519:1"}, "1", "ed25519:1", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls []string
			chain := &ChainFetcher{}
			for i, s := range tt.stubs {
				if s.keys == nil && s.err == nil {
					chain.Fetchers = append(chain.Fetchers, nil)
					continue
				}
				chain.Fetchers = append(chain.Fetchers, stubFetcher{name: string(rune('0' + i)), keys: s.keys, err: s.err, calls: &calls})
			}
			keys, err := chain.FetchKeys(context.Background(), testServer, tt.keyIDs)
			if got := strings.Join(calls, ","); got != tt.wantCalls {
				t.Fatalf("calls %q, want %q", got, tt.wantCalls)
			}
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || keys != nil {
					t.Fatalf("FetchKeys = %v, %v; want error %v", keys, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("FetchKeys: %v", err)
			}
			if keys == nil {
				t.Fatal("nil map without error")
			}
			if tt.wantKey == "" {
				if len(keys) != 0 {
					t.Fatalf("keys %v, want none", keys)
				}
			} else if _, ok := keys[tt.wantKey]; !ok {
				t.Fatalf("keys %v, want %s", keys, tt.wantKey)
			}
		})
	}

	t.Run("cancelled context stops the chain", func(t *testing.T) {
		var calls []string
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		chain := &ChainFetcher{Fetchers: []KeyFetcher{stubFetcher{name: "0", keys: has1, calls: &calls}}}
		if _, err := chain.FetchKeys(ctx, testServer, []string{"ed25519:1"}); !errors.Is(err, context.Canceled) || len(calls) != 0 {
			t.Fatalf("FetchKeys = %v after calls %v", err, calls)
		}
	})

	t.Run("verifier falls back from notary to direct", func(t *testing.T) {
		notaryKey, _ := GenerateSigningKey(fixedReader(43))
		notary := Notary{ServerName: testNotaryName, KeyID: notaryKey.ID, Public: notaryKey.Public()}
		var calls []string
		// The notary does not know the origin; the direct fetcher does.
		notaryFetcher := stubFetcher{name: "notary", calls: &calls}
		notaryFetcher.keys, notaryFetcher.err = ParseNotaryResponse(notaryBody(t), testServer, notary, testEpoch)
		direct := stubFetcher{name: "direct", keys: has1, calls: &calls}
		v, err := NewVerifier(VerifierOptions{
			Names:   []string{testDest},
			Fetcher: &ChainFetcher{Fetchers: []KeyFetcher{notaryFetcher, direct}},
			Now:     func() time.Time { return testEpoch },
		})
		if err != nil {
			t.Fatal(err)
		}
		origin, err := v.Verify(context.Background(), request("GET", downloadURI, testDest, "", vectorHeader()), "", nil)
		if err != nil || origin != testServer {
			t.Fatalf("Verify = %q, %v", origin, err)
		}
		if got := strings.Join(calls, ","); got != "notary,direct" {
			t.Fatalf("calls %q", got)
		}
	})
}
