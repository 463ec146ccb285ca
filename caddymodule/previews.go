package caddymodule

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/preview"

	"github.com/caddyserver/caddy/v2"
)

// PreviewsConfig configures URL previews (preview_url), shared by all sites.
// Previews are on by default: every fetch goes through the same SSRF guard
// as federation (no private, loopback or link-local addresses, checked again
// at connect time and on redirects).
type PreviewsConfig struct {
	// Disabled turns preview_url off (404 M_UNRECOGNIZED). Default false.
	Disabled bool `json:"disabled,omitempty"`
	// AllowedNetworks are CIDRs that previewed URLs may resolve to although
	// they are private (denied by default). Default: none.
	AllowedNetworks []string `json:"allowed_networks,omitempty"`
	// AllowHTTP also previews plain http:// URLs (redirects included).
	// Default true; false allows https only.
	AllowHTTP *bool `json:"allow_http,omitempty"`
	// MaxPageSize is how much of a page is read. Default 1 MiB.
	MaxPageSize int64 `json:"max_page_size,omitempty"`
	// MaxImageSize bounds the preview image stored. Default 10 MiB.
	MaxImageSize int64 `json:"max_image_size,omitempty"`
	// Timeout bounds one fetch. Default 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
}

// newPreviewer builds the app's previewer; nil when previews are disabled.
func newPreviewer(c *PreviewsConfig) (*preview.Previewer, error) {
	if c == nil {
		c = &PreviewsConfig{}
	}
	if c.Disabled {
		return nil, nil
	}
	guard := federation.Guard{AllowHTTP: c.AllowHTTP == nil || *c.AllowHTTP}
	for _, n := range c.AllowedNetworks {
		p, err := netip.ParsePrefix(n)
		if err != nil {
			return nil, fmt.Errorf("previews: allowed_networks: %w", err)
		}
		guard.AllowCIDRs = append(guard.AllowCIDRs, p)
	}
	timeout := time.Duration(c.Timeout)
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	tlsCfg, err := federation.TLSConfig("", false)
	if err != nil {
		return nil, fmt.Errorf("previews: %w", err)
	}
	p, err := preview.New(preview.Options{
		Client:        federation.NewClient(guard, tlsCfg, timeout),
		MaxPageBytes:  c.MaxPageSize,
		MaxImageBytes: c.MaxImageSize,
		Timeout:       timeout,
	})
	if err != nil {
		return nil, fmt.Errorf("previews: %w", err)
	}
	return p, nil
}
