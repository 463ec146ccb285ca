package caddymodule

import (
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"

	"github.com/caddyserver/caddy/v2"
)

// FederationConfig holds the app-wide settings of federation (fetching
// remote media, answering other servers). A site takes part in federation
// when its handler has a signing_key.
type FederationConfig struct {
	// TrustedCAFile is a PEM file of extra certificate authorities trusted
	// for other servers (private deployments, tests). Default: none (the
	// system roots only).
	TrustedCAFile string `json:"trusted_ca_file,omitempty"`

	// InsecureSkipVerify accepts any certificate from other servers. Only
	// for tests: anyone on the path can then impersonate any server.
	// Default false.
	InsecureSkipVerify bool `json:"insecure_skip_verify,omitempty"`

	// AllowedNetworks are CIDRs that other servers may resolve to although
	// they are private, loopback or link-local (denied by default against
	// SSRF), e.g. "10.0.0.0/8" for a private federation. Default: none.
	AllowedNetworks []string `json:"allowed_networks,omitempty"`

	// MaxRemoteSize is the largest remote media fetched and cached; larger
	// gets 502 M_TOO_LARGE. Default: the app's max_upload_size.
	MaxRemoteSize int64 `json:"max_remote_size,omitempty"`

	// MaxFetches bounds the remote media fetches in flight, from all remote
	// servers together; a request that would start one more gets 429
	// M_LIMIT_EXCEEDED with Retry-After (requests for an item already being
	// fetched wait for it and are not counted). Default 64.
	MaxFetches int `json:"max_fetches,omitempty"`

	// MaxFetchesPerServer bounds the remote media fetches in flight from
	// one remote server, likewise. Default 16.
	MaxFetchesPerServer int `json:"max_fetches_per_server,omitempty"`

	// Notaries are trusted key servers (perspectives), asked for the keys
	// of servers whose requests are verified before asking those servers
	// directly, e.g. matrix.org. Default: none (keys fetched directly).
	Notaries []NotaryConfig `json:"notaries,omitempty"`
}

// NotaryConfig is one trusted notary key server.
type NotaryConfig struct {
	// ServerName of the notary, e.g. "matrix.org".
	ServerName string `json:"server_name"`
	// KeyID of the notary's signing key, e.g. "ed25519:auto".
	KeyID string `json:"key_id"`
	// PublicKey is the key's unpadded base64 public key.
	PublicKey string `json:"public_key"`
}

// federationClientOptions are the app-wide parts of a site's federation
// client.
func (a *App) federationClientOptions() (federation.ClientOptions, error) {
	var opts federation.ClientOptions
	f := a.Federation
	if f == nil {
		f = &FederationConfig{}
	}
	for _, c := range f.AllowedNetworks {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return opts, fmt.Errorf("federation: allowed_networks: %w", err)
		}
		opts.Guard.AllowCIDRs = append(opts.Guard.AllowCIDRs, p)
	}
	tlsCfg, err := federation.TLSConfig(f.TrustedCAFile, f.InsecureSkipVerify)
	if err != nil {
		return opts, fmt.Errorf("federation: %w", err)
	}
	if f.InsecureSkipVerify {
		a.logger.Warn("federation TLS certificates are NOT verified (insecure_skip_verify): only for tests")
	}
	opts.TLSConfig = tlsCfg
	opts.MaxBytes = a.remoteMaxSize()
	return opts, nil
}

// remoteMaxSize is the resolved MaxRemoteSize.
func (a *App) remoteMaxSize() int64 {
	if a.Federation != nil && a.Federation.MaxRemoteSize > 0 {
		return a.Federation.MaxRemoteSize
	}
	return a.MaxUploadSize
}

// provisionFederation sets up the site's federation: its signing key, the
// client fetching remote media (signed as the site), and the verifier of
// inbound requests. It returns nils when no signing key is configured.
func (h *Handler) provisionFederation(app *App, logger *zap.Logger) (*mediaapi.FederationConfig, mediaapi.RemoteFetcher, *federation.MediaClient, error) {
	if h.SigningKey == "" {
		return nil, nil, nil, nil
	}
	path, err := caddy.NewReplacer().ReplaceOrErr(h.SigningKey, true, true)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("signing_key: resolving placeholders: %w", err)
	}
	keys, err := xmatrix.LoadSigningKeys(path)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("signing_key: %w", err)
	}
	if len(keys) == 0 {
		return nil, nil, nil, errors.New("signing_key: the file holds no key")
	}
	opts, err := app.federationClientOptions()
	if err != nil {
		return nil, nil, nil, err
	}
	opts.Origin, opts.Key = h.ServerName, keys[0]
	client, err := federation.NewMediaClient(opts)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("federation client: %w", err)
	}
	var fetcher xmatrix.KeyFetcher = client
	if app.Federation != nil && len(app.Federation.Notaries) > 0 {
		// Synapse's order: trusted notaries first, then the server itself.
		chain := &xmatrix.ChainFetcher{}
		for i, n := range app.Federation.Notaries {
			pub, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(n.PublicKey, "="))
			if err != nil || len(pub) != ed25519.PublicKeySize || !strings.HasPrefix(n.KeyID, "ed25519:") || n.ServerName == "" {
				client.CloseIdleConnections()
				return nil, nil, nil, fmt.Errorf("federation: notary %d: need a server name, an ed25519 key id and a base64 ed25519 public key", i+1)
			}
			chain.Fetchers = append(chain.Fetchers, client.NotaryFetcher(xmatrix.Notary{ServerName: n.ServerName, KeyID: n.KeyID, Public: pub}))
		}
		chain.Fetchers = append(chain.Fetchers, client)
		fetcher = chain
	}
	verifier, err := xmatrix.NewVerifier(xmatrix.VerifierOptions{Names: []string{h.ServerName}, Fetcher: fetcher})
	if err != nil {
		client.CloseIdleConnections()
		return nil, nil, nil, fmt.Errorf("federation verifier: %w", err)
	}
	logger.Info("federation enabled", zap.String("server_name", h.ServerName), zap.String("key_id", keys[0].ID),
		zap.String("public_key", keys[0].PublicBase64()))
	return &mediaapi.FederationConfig{Verifier: verifier}, mediaapi.FederationFetcher{Client: client}, client, nil
}
