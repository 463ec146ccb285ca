package federation

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// maxKeyResponse bounds a /_matrix/key/v2/server answer.
const maxKeyResponse = 1 << 20

// keyFetchTimeout bounds one key fetch.
const keyFetchTimeout = 15 * time.Second

// FetchKeys implements xmatrix.KeyFetcher: it fetches origin's verify keys
// from its own /_matrix/key/v2/server, found by server discovery and dialled
// through the same SSRF guard as media fetches, and checks them
// (server_name, self-signature, validity) with xmatrix.ParseServerKeys.
func (c *MediaClient) FetchKeys(ctx context.Context, origin string, _ []string) (map[string]xmatrix.ServerKey, error) {
	if !matrix.ValidServerName(origin) {
		return nil, fmt.Errorf("fetching keys of %q: %w", origin, ErrInvalidServerName)
	}
	ctx, cancel := context.WithTimeout(ctx, keyFetchTimeout)
	defer cancel()
	target, err := c.resolver.Resolve(ctx, origin)
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s: %w: %w", origin, ErrUnavailable, err)
	}
	u, err := url.Parse("https://" + target.Host + "/_matrix/key/v2/server")
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s: building URL: %w", origin, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s: building request: %w", origin, err)
	}
	req.Host = target.Host
	resp, err := c.targetClient(target).Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s: %w: %w", origin, ErrUnavailable, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetching keys of %s: %w: status %d", origin, ErrUnavailable, resp.StatusCode)
	}
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxKeyResponse+1))
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s: %w: %w", origin, ErrUnavailable, err)
	}
	if len(raw) > maxKeyResponse {
		return nil, fmt.Errorf("fetching keys of %s: answer over %d bytes", origin, maxKeyResponse)
	}
	now := time.Now
	if c.opts.Now != nil {
		now = c.opts.Now
	}
	keys, err := xmatrix.ParseServerKeys(raw, origin, now())
	if err != nil {
		return nil, fmt.Errorf("fetching keys of %s: %w", origin, err)
	}
	return keys, nil
}

// Interface guard.
var _ xmatrix.KeyFetcher = (*MediaClient)(nil)
