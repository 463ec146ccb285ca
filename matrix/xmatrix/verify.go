package xmatrix

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/capped"
)

// Sentinel errors of inbound request verification. Use errors.Is to map them
// to responses; StatusCode does it for the usual mapping.
var (
	// ErrMissingAuth means the request has no X-Matrix Authorization
	// header (401 M_UNAUTHORIZED).
	ErrMissingAuth = errors.New("missing X-Matrix authorization")
	// ErrMalformedAuth means an X-Matrix header could not be parsed or
	// lacks a required parameter (400 M_UNAUTHORIZED, as Synapse answers).
	ErrMalformedAuth = errors.New("malformed X-Matrix authorization")
	// ErrWrongDestination means the header names a destination that is
	// not one of our server names (401 M_UNAUTHORIZED).
	ErrWrongDestination = errors.New("X-Matrix destination is not this server")
	// ErrBadSignature means the signature does not verify (401
	// M_UNAUTHORIZED).
	ErrBadSignature = errors.New("invalid X-Matrix signature")
	// ErrNoKey means no valid, unexpired verify key of the origin with the
	// header's key ID could be obtained (401 M_UNAUTHORIZED).
	ErrNoKey = errors.New("no valid verify key")
)

// StatusCode returns the HTTP status for a verification error: 400 for
// ErrMalformedAuth, 401 for the other sentinel errors (and any other
// error), 200 for nil. The Matrix error code is M_UNAUTHORIZED in every
// failure case.
func StatusCode(err error) int {
	switch {
	case err == nil:
		return http.StatusOK
	case errors.Is(err, ErrMalformedAuth):
		return http.StatusBadRequest
	default:
		return http.StatusUnauthorized
	}
}

// ServerKey is a remote server's ed25519 verify key.
type ServerKey struct {
	// Public is the ed25519 public key.
	Public ed25519.PublicKey
	// ValidUntil is when the key stops being valid for requests
	// (valid_until_ts of the key response).
	ValidUntil time.Time
}

// KeyFetcher obtains a remote server's verify keys.
type KeyFetcher interface {
	// FetchKeys returns verify keys of origin, keyed by key ID. It should
	// include the keys in keyIDs that it can find and may return more.
	// Keys absent from the result are treated as unknown. Implementations
	// must have verified the keys (self-signature, notary signatures).
	FetchKeys(ctx context.Context, origin string, keyIDs []string) (map[string]ServerKey, error)
}

// VerifierOptions configures a Verifier.
type VerifierOptions struct {
	// ServerNames reports whether name is one of our server names. When
	// nil, Names is used.
	ServerNames func(name string) bool
	// Names is the set of our server names (compared case-insensitively),
	// used when ServerNames is nil. When a header carries no destination,
	// the request's Host (if one of ours) and then these names are tried
	// as the signed destination.
	Names []string
	// Fetcher obtains verify keys of remote servers. Required.
	Fetcher KeyFetcher
	// Now returns the current time. Default: time.Now.
	Now func() time.Time
	// CacheSize bounds the number of cached keys (positive and negative).
	// Default: 10000.
	CacheSize int
	// NegativeTTL is how long an unknown key or a failed fetch is
	// remembered. Default: 1 minute.
	NegativeTTL time.Duration
	// MaxKeyTTL caps how long a key is cached, whatever its valid_until_ts.
	// Default: 7 days (the specification's cap).
	MaxKeyTTL time.Duration
}

// maxDestinationCandidates bounds how many destinations are tried for a
// header without one.
const maxDestinationCandidates = 8

// Verifier verifies the X-Matrix signatures of inbound federation
// requests. It is safe for concurrent use.
type Verifier struct {
	isOurs func(string) bool
	names  []string
	now    func() time.Time
	cache  *keyCache
}

// NewVerifier builds a Verifier. It fails when no fetcher or no server
// names are configured.
func NewVerifier(opts VerifierOptions) (*Verifier, error) {
	if opts.Fetcher == nil {
		return nil, errors.New("creating X-Matrix verifier: a key fetcher is required")
	}
	v := &Verifier{isOurs: opts.ServerNames, names: append([]string(nil), opts.Names...), now: opts.Now}
	if v.isOurs == nil {
		if len(v.names) == 0 {
			return nil, errors.New("creating X-Matrix verifier: ServerNames or Names is required")
		}
		names := v.names
		v.isOurs = func(n string) bool {
			for _, o := range names {
				if strings.EqualFold(o, n) {
					return true
				}
			}
			return false
		}
	}
	if v.now == nil {
		v.now = time.Now
	}
	if opts.CacheSize <= 0 {
		opts.CacheSize = 10000
	}
	if opts.NegativeTTL <= 0 {
		opts.NegativeTTL = time.Minute
	}
	if opts.MaxKeyTTL <= 0 {
		opts.MaxKeyTTL = 7 * 24 * time.Hour
	}
	v.cache = &keyCache{
		fetcher: opts.Fetcher,
		now:     v.now,
		negTTL:  opts.NegativeTTL,
		maxTTL:  opts.MaxKeyTTL,
		entries: capped.New(capped.Options[cacheKey, cacheEntry]{Max: opts.CacheSize, Now: v.now}),
		flights: map[string]*flight{},
	}
	return v, nil
}

// Verify checks the X-Matrix authorization of r and returns the verified
// origin server name. rawURI is the request target exactly as received
// (path and query; r.RequestURI when empty), body the raw request body
// (nil or empty for none; otherwise it must be JSON).
//
// Every Authorization header with the X-Matrix scheme is tried in order and
// the first that verifies wins. When none does, the error of the first
// well-formed header is returned, or ErrMalformedAuth if none was
// well-formed, or ErrMissingAuth if there were none. Errors wrap one of the
// package's sentinel errors.
func (v *Verifier) Verify(ctx context.Context, r *http.Request, rawURI string, body []byte) (origin string, err error) {
	if rawURI == "" {
		rawURI = r.RequestURI
	}
	if rawURI == "" && r.URL != nil {
		rawURI = r.URL.RequestURI()
	}
	var firstMalformed, firstErr error
	found := false
	for _, h := range r.Header.Values("Authorization") {
		if !isXMatrix(h) {
			continue
		}
		found = true
		a, err := ParseAuthorization(h)
		if err != nil {
			if firstMalformed == nil {
				firstMalformed = err
			}
			continue
		}
		if err := v.verifyOne(ctx, r, rawURI, body, a); err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		return a.Origin, nil
	}
	switch {
	case !found:
		return "", fmt.Errorf("verifying request: %w", ErrMissingAuth)
	case firstErr != nil:
		return "", fmt.Errorf("verifying request: %w", firstErr)
	default:
		return "", fmt.Errorf("verifying request: %w", firstMalformed)
	}
}

// verifyOne checks one parsed header.
func (v *Verifier) verifyOne(ctx context.Context, r *http.Request, rawURI string, body []byte, a Auth) error {
	var destinations []string
	if a.Destination != "" {
		if !v.isOurs(a.Destination) {
			return fmt.Errorf("%w: %q", ErrWrongDestination, a.Destination)
		}
		destinations = []string{a.Destination}
	} else {
		if r.Host != "" && v.isOurs(r.Host) {
			destinations = append(destinations, r.Host)
		}
		for _, n := range v.names {
			if len(destinations) >= maxDestinationCandidates {
				break
			}
			if n != r.Host {
				destinations = append(destinations, n)
			}
		}
		if len(destinations) == 0 {
			return fmt.Errorf("%w: no destination in the header and none known for host %q", ErrBadSignature, r.Host)
		}
	}
	if !strings.HasPrefix(a.KeyID, "ed25519:") {
		return fmt.Errorf("%w: unsupported key algorithm in %q", ErrNoKey, a.KeyID)
	}
	sig, err := decodeBase64(a.Signature)
	if err != nil || len(sig) != ed25519.SignatureSize {
		return fmt.Errorf("%w: signature is not %d bytes of base64", ErrBadSignature, ed25519.SignatureSize)
	}
	uris := []string{rawURI}
	if strings.HasSuffix(rawURI, "?") {
		uris = append(uris, strings.TrimSuffix(rawURI, "?"))
	}
	// Build the signed messages before fetching keys, so that bodies that
	// cannot be verified do not trigger key fetches.
	var msgs [][]byte
	for _, d := range destinations {
		for _, u := range uris {
			obj, err := requestObject(r.Method, u, a.Origin, d, body)
			if err != nil {
				return fmt.Errorf("%w: %w", ErrBadSignature, err)
			}
			msg, err := Canonical(obj)
			if err != nil {
				return fmt.Errorf("%w: %w", ErrBadSignature, err)
			}
			msgs = append(msgs, msg)
		}
	}
	key, err := v.cache.get(ctx, a.Origin, a.KeyID)
	if err != nil {
		return err
	}
	for _, msg := range msgs {
		if ed25519.Verify(key.Public, msg, sig) {
			return nil
		}
	}
	return fmt.Errorf("%w: for server %s with key %s", ErrBadSignature, a.Origin, a.KeyID)
}

// cacheKey identifies a cached key.
type cacheKey struct{ origin, keyID string }

// cacheEntry is a cached key (err == nil) or a cached failure.
type cacheEntry struct {
	key ServerKey
	err error
}

// flight is an in-progress fetch for one origin.
type flight struct{ done chan struct{} }

// keyCache caches verify keys with bounded size, per-key expiry and one
// fetch at a time per origin.
type keyCache struct {
	fetcher KeyFetcher
	now     func() time.Time
	negTTL  time.Duration
	maxTTL  time.Duration

	// entries holds keys until their validity (capped at maxTTL) ends and
	// failures for negTTL, least recently used evicted beyond CacheSize.
	entries *capped.Map[cacheKey, cacheEntry]

	mu      sync.Mutex
	flights map[string]*flight
}

// get returns origin's key keyID, valid now, from the cache or the fetcher.
func (c *keyCache) get(ctx context.Context, origin, keyID string) (ServerKey, error) {
	k := cacheKey{origin, keyID}
	for {
		c.mu.Lock()
		if e, ok := c.entries.Get(k); ok {
			c.mu.Unlock()
			if e.err != nil {
				return ServerKey{}, e.err
			}
			return e.key, nil
		}
		if f := c.flights[origin]; f != nil {
			c.mu.Unlock()
			select {
			case <-f.done:
				continue // re-check the cache; fetch ourselves if still missing
			case <-ctx.Done():
				return ServerKey{}, fmt.Errorf("%w: waiting for keys of %s: %w", ErrNoKey, origin, ctx.Err())
			}
		}
		f := &flight{done: make(chan struct{})}
		c.flights[origin] = f
		c.mu.Unlock()

		key, err := c.fetch(ctx, origin, keyID)

		c.mu.Lock()
		delete(c.flights, origin)
		close(f.done)
		c.mu.Unlock()
		return key, err
	}
}

// fetch calls the fetcher and caches what it learns.
func (c *keyCache) fetch(ctx context.Context, origin, keyID string) (ServerKey, error) {
	keys, fetchErr := c.fetcher.FetchKeys(ctx, origin, []string{keyID})
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if fetchErr != nil {
		err := fmt.Errorf("%w: fetching keys of %s: %w", ErrNoKey, origin, fetchErr)
		if ctx.Err() == nil { // our own cancellation says nothing about the origin
			c.entries.PutUntil(cacheKey{origin, keyID}, cacheEntry{err: err}, now.Add(c.negTTL))
		}
		return ServerKey{}, err
	}
	var (
		wanted    ServerKey
		wantedExp time.Time
	)
	for id, sk := range keys {
		if len(sk.Public) != ed25519.PublicKeySize || !sk.ValidUntil.After(now) {
			continue
		}
		exp := sk.ValidUntil
		if limit := now.Add(c.maxTTL); exp.After(limit) {
			exp = limit
		}
		if id == keyID {
			wanted, wantedExp = sk, exp
			continue
		}
		c.entries.PutUntil(cacheKey{origin, id}, cacheEntry{key: sk}, exp)
	}
	if !wantedExp.IsZero() {
		// Stored last, so that a small cache keeps the key being asked
		// for rather than its siblings.
		c.entries.PutUntil(cacheKey{origin, keyID}, cacheEntry{key: wanted}, wantedExp)
		return wanted, nil
	}
	reason := "unknown key"
	if sk, ok := keys[keyID]; ok {
		if len(sk.Public) != ed25519.PublicKeySize {
			reason = "malformed key"
		} else {
			reason = "key expired at " + sk.ValidUntil.UTC().Format(time.RFC3339)
		}
	}
	err := fmt.Errorf("%w: %s of %s: %s", ErrNoKey, keyID, origin, reason)
	c.entries.PutUntil(cacheKey{origin, keyID}, cacheEntry{err: err}, now.Add(c.negTTL))
	return ServerKey{}, err
}

// ParseServerKeys decodes and validates a /_matrix/key/v2/server response
// (a Server Keys object) for expectedServer: server_name must match, the
// response must not have expired at now (valid_until_ts), and at least one
// signature by expectedServer with a key listed in verify_keys must verify.
// It returns the ed25519 keys of verify_keys with ValidUntil set from
// valid_until_ts; old_verify_keys are ignored (they are not valid for
// requests) and so are keys of other algorithms.
func ParseServerKeys(raw []byte, expectedServer string, now time.Time) (map[string]ServerKey, error) {
	v, err := decodeStrict(raw)
	if err != nil {
		return nil, fmt.Errorf("parsing server keys: %w", err)
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, errors.New("parsing server keys: response is not a JSON object")
	}
	if name, _ := obj["server_name"].(string); name != expectedServer {
		return nil, fmt.Errorf("parsing server keys: server_name %q, want %q", name, expectedServer)
	}
	tsNum, ok := obj["valid_until_ts"].(json.Number)
	if !ok {
		return nil, errors.New("parsing server keys: valid_until_ts missing or not a number")
	}
	ts, err := parseIntegerNumber(string(tsNum))
	if err != nil {
		return nil, fmt.Errorf("parsing server keys: valid_until_ts: %w", err)
	}
	validUntil := time.UnixMilli(ts)
	if !validUntil.After(now) {
		return nil, fmt.Errorf("parsing server keys: keys of %s expired at %s", expectedServer, validUntil.UTC().Format(time.RFC3339))
	}
	vks, ok := obj["verify_keys"].(map[string]any)
	if !ok {
		return nil, errors.New("parsing server keys: verify_keys missing or not an object")
	}
	keys := map[string]ServerKey{}
	for id, raw := range vks {
		if !strings.HasPrefix(id, "ed25519:") {
			continue
		}
		entry, _ := raw.(map[string]any)
		b64, _ := entry["key"].(string)
		pub, err := decodeBase64(b64)
		if err != nil || len(pub) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("parsing server keys: verify key %s is not %d bytes of base64", id, ed25519.PublicKeySize)
		}
		keys[id] = ServerKey{Public: ed25519.PublicKey(pub), ValidUntil: validUntil}
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("parsing server keys: no ed25519 verify keys for %s", expectedServer)
	}
	sigs, _ := obj["signatures"].(map[string]any)
	bySelf, _ := sigs[expectedServer].(map[string]any)
	var lastErr error
	for id := range bySelf {
		k, ok := keys[id]
		if !ok {
			continue
		}
		if lastErr = VerifyJSON(obj, expectedServer, id, k.Public); lastErr == nil {
			return keys, nil
		}
	}
	if lastErr == nil {
		lastErr = fmt.Errorf("%w: no signature by %s with any of its verify keys", ErrBadSignature, expectedServer)
	}
	return nil, fmt.Errorf("parsing server keys: %w", lastErr)
}

// maxKeyResponseSize bounds the size of a key server response.
const maxKeyResponseSize = 1 << 20

// DirectKeyFetcher fetches keys from the origin itself at
// {BaseURL}/_matrix/key/v2/server and validates them with ParseServerKeys.
type DirectKeyFetcher struct {
	// Client performs the requests. Default: http.DefaultClient (which has
	// no timeout; pass a context with a deadline or a client with one).
	Client *http.Client
	// BaseURL resolves a server name to the base URL of its federation
	// API (e.g. "https://matrix.example.org:8448", no trailing slash),
	// typically by server discovery. Required.
	BaseURL func(ctx context.Context, serverName string) (string, error)
	// Now returns the current time. Default: time.Now.
	Now func() time.Time
}

// FetchKeys implements KeyFetcher. It returns all valid verify keys of
// origin, not only keyIDs.
func (f *DirectKeyFetcher) FetchKeys(ctx context.Context, origin string, keyIDs []string) (map[string]ServerKey, error) {
	if f.BaseURL == nil {
		return nil, errors.New("fetching server keys: DirectKeyFetcher.BaseURL is not set")
	}
	base, err := f.BaseURL(ctx, origin)
	if err != nil {
		return nil, fmt.Errorf("fetching server keys: resolving %s: %w", origin, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(base, "/")+"/_matrix/key/v2/server", nil)
	if err != nil {
		return nil, fmt.Errorf("fetching server keys: building request: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	client := f.Client
	if client == nil {
		client = http.DefaultClient
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching server keys of %s: %w", origin, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetching server keys of %s: status %d", origin, resp.StatusCode)
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxKeyResponseSize+1))
	if err != nil {
		return nil, fmt.Errorf("fetching server keys of %s: reading body: %w", origin, err)
	}
	if len(raw) > maxKeyResponseSize {
		return nil, fmt.Errorf("fetching server keys of %s: response larger than %d bytes", origin, maxKeyResponseSize)
	}
	now := time.Now
	if f.Now != nil {
		now = f.Now
	}
	keys, err := ParseServerKeys(raw, origin, now())
	if err != nil {
		return nil, fmt.Errorf("fetching server keys of %s: %w", origin, err)
	}
	return keys, nil
}
