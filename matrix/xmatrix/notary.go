package xmatrix

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Notary is a trusted key server (a "perspective" or notary server): it
// answers POST /_matrix/key/v2/query with other servers' keys, countersigned
// with its own key.
type Notary struct {
	// ServerName is the notary's server name, e.g. "matrix.org". It is
	// resolved by server discovery to reach the notary and names its
	// signatures.
	ServerName string
	// KeyID is the ID of the notary key that must have signed the answers,
	// e.g. "ed25519:auto".
	KeyID string
	// Public is the notary's ed25519 public key for KeyID.
	Public ed25519.PublicKey
}

// validate checks that n can verify signatures.
func (n Notary) validate() error {
	if n.ServerName == "" {
		return errors.New("notary server name is empty")
	}
	if !strings.HasPrefix(n.KeyID, "ed25519:") {
		return fmt.Errorf("notary key ID %q is not an ed25519 key", n.KeyID)
	}
	if len(n.Public) != ed25519.PublicKeySize {
		return fmt.Errorf("notary public key is %d bytes, want %d", len(n.Public), ed25519.PublicKeySize)
	}
	return nil
}

// ParseNotaryResponse decodes and validates a notary's answer to
// POST /_matrix/key/v2/query ({"server_keys": [<Server Keys object>...]})
// and returns origin's ed25519 verify keys.
//
// Entries for other servers are ignored. Every entry for origin must carry a
// valid signature by the notary (signatures[notary.ServerName][notary.KeyID])
// and a valid self-signature by origin with one of its verify_keys (as
// ParseServerKeys checks); a single bad entry fails the whole answer, since
// the notary cannot be trusted for it. Entries whose valid_until_ts is not
// after now are dropped. When several entries list the same key ID, the one
// valid the longest wins. An answer without usable entries for origin yields
// an empty map and no error (the keys are unknown to the notary).
func ParseNotaryResponse(raw []byte, origin string, notary Notary, now time.Time) (map[string]ServerKey, error) {
	if err := notary.validate(); err != nil {
		return nil, fmt.Errorf("parsing notary response: %w", err)
	}
	v, err := decodeStrict(raw)
	if err != nil {
		return nil, fmt.Errorf("parsing notary response: %w", err)
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, errors.New("parsing notary response: response is not a JSON object")
	}
	entries, ok := obj["server_keys"].([]any)
	if !ok {
		return nil, errors.New("parsing notary response: server_keys missing or not an array")
	}
	keys := map[string]ServerKey{}
	for i, e := range entries {
		entry, ok := e.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("parsing notary response: server_keys[%d] is not an object", i)
		}
		if name, _ := entry["server_name"].(string); name != origin {
			continue
		}
		if err := VerifyJSON(entry, notary.ServerName, notary.KeyID, notary.Public); err != nil {
			return nil, fmt.Errorf("parsing notary response: keys of %s: %w", origin, err)
		}
		tsNum, ok := entry["valid_until_ts"].(json.Number)
		if !ok {
			return nil, fmt.Errorf("parsing notary response: keys of %s: valid_until_ts missing or not a number", origin)
		}
		ts, err := parseIntegerNumber(string(tsNum))
		if err != nil {
			return nil, fmt.Errorf("parsing notary response: keys of %s: valid_until_ts: %w", origin, err)
		}
		if !time.UnixMilli(ts).After(now) {
			continue
		}
		// Re-encode the verified entry so that ParseServerKeys checks the
		// self-signature on exactly the object the notary signed.
		entryRaw, err := json.Marshal(entry)
		if err != nil {
			return nil, fmt.Errorf("parsing notary response: re-encoding keys of %s: %w", origin, err)
		}
		got, err := ParseServerKeys(entryRaw, origin, now)
		if err != nil {
			return nil, fmt.Errorf("parsing notary response: %w", err)
		}
		for id, k := range got {
			if old, ok := keys[id]; !ok || k.ValidUntil.After(old.ValidUntil) {
				keys[id] = k
			}
		}
	}
	return keys, nil
}

// ChainFetcher asks several key fetchers in turn, typically notaries first
// and the origin itself last (Synapse's order after its own cache).
type ChainFetcher struct {
	// Fetchers are tried in order. Nil entries are skipped.
	Fetchers []KeyFetcher
}

// FetchKeys implements KeyFetcher. It returns the result of the first
// fetcher that succeeds with at least one of keyIDs (with any non-empty
// result when keyIDs is empty). When none does, it returns the last
// fetcher error if any fetcher failed, and otherwise the last (successful
// but unhelpful) result with a nil error, so that the keys count as
// unknown. It stops early, with the context's error, once ctx is done.
func (c *ChainFetcher) FetchKeys(ctx context.Context, origin string, keyIDs []string) (map[string]ServerKey, error) {
	var lastErr error
	var last map[string]ServerKey
	for i, f := range c.Fetchers {
		if f == nil {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("fetching keys of %s: %w", origin, err)
		}
		keys, err := f.FetchKeys(ctx, origin, keyIDs)
		if err != nil {
			lastErr = fmt.Errorf("fetching keys of %s with fetcher %d: %w", origin, i, err)
			continue
		}
		if hasAnyKey(keys, keyIDs) {
			return keys, nil
		}
		last = keys
	}
	if lastErr != nil {
		return nil, lastErr
	}
	if last == nil {
		last = map[string]ServerKey{}
	}
	return last, nil
}

// hasAnyKey reports whether keys holds one of ids, or any key when ids is
// empty.
func hasAnyKey(keys map[string]ServerKey, ids []string) bool {
	if len(ids) == 0 {
		return len(keys) > 0
	}
	for _, id := range ids {
		if _, ok := keys[id]; ok {
			return true
		}
	}
	return false
}

// Interface guard.
var _ KeyFetcher = (*ChainFetcher)(nil)
