package federation

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// NotaryFetcher returns an xmatrix.KeyFetcher that asks the notary key
// server n for other servers' keys: it resolves n.ServerName by server
// discovery, POSTs /_matrix/key/v2/query through the same SSRF guard as
// media fetches, and accepts only keys signed by both the notary (with
// n.KeyID and n.Public) and the origin itself (xmatrix.ParseNotaryResponse).
// Combine it with c (the direct fetcher) in an xmatrix.ChainFetcher to get
// Synapse's order: notaries first, then the origin.
func (c *MediaClient) NotaryFetcher(n xmatrix.Notary) xmatrix.KeyFetcher {
	return &notaryFetcher{c: c, n: n}
}

// notaryFetcher is the KeyFetcher built by NotaryFetcher.
type notaryFetcher struct {
	c *MediaClient
	n xmatrix.Notary
}

// notaryQuery is the body of POST /_matrix/key/v2/query: server name → key
// ID → criteria. An empty key map asks for all keys of the server.
type notaryQuery struct {
	ServerKeys map[string]map[string]notaryCriteria `json:"server_keys"`
}

// notaryCriteria is the query criteria of one key.
type notaryCriteria struct {
	MinimumValidUntilTS int64 `json:"minimum_valid_until_ts"`
}

// FetchKeys implements xmatrix.KeyFetcher.
func (f *notaryFetcher) FetchKeys(ctx context.Context, origin string, keyIDs []string) (map[string]xmatrix.ServerKey, error) {
	if !matrix.ValidServerName(origin) {
		return nil, fmt.Errorf("fetching keys of %q from notary: %w", origin, ErrInvalidServerName)
	}
	if !matrix.ValidServerName(f.n.ServerName) {
		return nil, fmt.Errorf("fetching keys of %s from notary %q: %w", origin, f.n.ServerName, ErrInvalidServerName)
	}
	now := time.Now
	if f.c.opts.Now != nil {
		now = f.c.opts.Now
	}
	q := notaryQuery{ServerKeys: map[string]map[string]notaryCriteria{origin: {}}}
	for _, id := range keyIDs {
		q.ServerKeys[origin][id] = notaryCriteria{MinimumValidUntilTS: now().UnixMilli()}
	}
	body, err := json.Marshal(q)
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s from notary %s: encoding query: %w", origin, f.n.ServerName, err)
	}

	ctx, cancel := context.WithTimeout(ctx, keyFetchTimeout)
	defer cancel()
	target, err := f.c.resolver.Resolve(ctx, f.n.ServerName)
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s from notary %s: %w: %w", origin, f.n.ServerName, ErrUnavailable, err)
	}
	u, err := url.Parse("https://" + target.Host + "/_matrix/key/v2/query")
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s from notary %s: building URL: %w", origin, f.n.ServerName, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.String(), bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s from notary %s: building request: %w", origin, f.n.ServerName, err)
	}
	req.Host = target.Host
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := f.c.targetClient(target).Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s from notary %s: %w: %w", origin, f.n.ServerName, ErrUnavailable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetching keys of %s from notary %s: %w: status %d", origin, f.n.ServerName, ErrUnavailable, resp.StatusCode)
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxKeyResponse+1))
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s from notary %s: %w: %w", origin, f.n.ServerName, ErrUnavailable, err)
	}
	if len(raw) > maxKeyResponse {
		return nil, fmt.Errorf("fetching keys of %s from notary %s: answer over %d bytes", origin, f.n.ServerName, maxKeyResponse)
	}
	keys, err := xmatrix.ParseNotaryResponse(raw, origin, f.n, now())
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s from notary %s: %w", origin, f.n.ServerName, err)
	}
	return keys, nil
}

// Interface guard.
var _ xmatrix.KeyFetcher = (*notaryFetcher)(nil)
