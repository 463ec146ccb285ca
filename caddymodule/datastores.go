package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/filestore"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/s3store"

	"github.com/caddyserver/caddy/v2"
)

// Datastore types accepted in DatastoreConfig.Type.
const (
	DatastoreFile = "file"
	DatastoreS3   = "s3"
)

// DefaultRedirectLifetime is the default RedirectConfig.Lifetime.
const DefaultRedirectLifetime = 5 * time.Minute

// DatastoreConfig is one place where media bytes are kept.
type DatastoreConfig struct {
	// Name identifies the datastore in the metadata (each blob records the
	// datastore holding it) and in migrations. Required; keep it stable:
	// renaming a datastore that holds blobs makes them unreachable.
	Name string `json:"name,omitempty"`

	// Type is "file" (a local directory) or "s3" (an S3-compatible bucket).
	// Required.
	Type string `json:"type,omitempty"`

	// Kinds are the kinds of media written to this datastore: "local"
	// (uploads), "remote" (media cached from other servers), "thumbnails".
	// Each kind goes to at most one datastore; one must take "local", and
	// kinds nobody takes go to the "local" one. A datastore without kinds is
	// only read from (e.g. an old datastore being migrated away). Reads find a
	// blob in whichever datastore holds it. Default: none.
	Kinds []string `json:"kinds,omitempty"`

	// Path is the directory of a file datastore. Required for "file".
	// Placeholders {env.*} and {file.*} are resolved.
	Path string `json:"path,omitempty"`

	// S3 configures an s3 datastore. Required for "s3".
	S3 *S3Config `json:"s3,omitempty"`
}

// S3Config configures an S3 datastore. Every string field resolves the
// placeholders {env.*} and {file.*}, so keys need not appear in the config.
type S3Config struct {
	// Endpoint is the S3 service's base URL, e.g. "https://s3.example.org".
	// Default: AWS S3 in Region.
	Endpoint string `json:"endpoint,omitempty"`
	// Region of the bucket. Default "us-east-1".
	Region string `json:"region,omitempty"`
	// Bucket holding the media. Required.
	Bucket string `json:"bucket,omitempty"`
	// Prefix of every object key, e.g. "media/". Default "".
	Prefix string `json:"prefix,omitempty"`
	// PathStyle addresses objects as endpoint/bucket/key (most self-hosted
	// S3 servers need it). Default false.
	PathStyle bool `json:"path_style,omitempty"`
	// AccessKeyID signs the requests. Required unless UseEnvCredentials.
	AccessKeyID string `json:"access_key_id,omitempty"`
	// SecretAccessKey matching AccessKeyID.
	SecretAccessKey string `json:"secret_access_key,omitempty"`
	// SessionToken of temporary credentials. Default none.
	SessionToken string `json:"session_token,omitempty"`
	// UseEnvCredentials takes the keys from AWS_ACCESS_KEY_ID,
	// AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN when AccessKeyID is empty.
	// Default false.
	UseEnvCredentials bool `json:"use_env_credentials,omitempty"`
	// StorageClass of new objects, e.g. "STANDARD_IA". Default: the bucket's.
	StorageClass string `json:"storage_class,omitempty"`
	// PartSize of multipart uploads in bytes; each upload holds at most two
	// parts in memory. Default 8 MiB, minimum 5 MiB.
	PartSize int64 `json:"part_size,omitempty"`
	// MaxBufferBytes caps the memory all uploads to this datastore hold in
	// part buffers together; uploads wait for room beyond it. Parallel
	// downloads take their read-ahead buffers from it too, only when free
	// and at most half of it together. Default 6 parts (48 MiB with the
	// default part size).
	MaxBufferBytes int64 `json:"max_buffer_bytes,omitempty"`
	// MaxRetries of failed idempotent requests (with backoff). Default 3.
	MaxRetries int `json:"max_retries,omitempty"`
	// ParallelParts is how many ranged GetObjects a download larger than
	// ParallelPartSize keeps in flight: the part being sent streams from S3,
	// up to ParallelParts-1 parts after it are read ahead into buffers taken
	// from MaxBufferBytes when free (reads together take at most half of
	// it; without room a download fetches fewer parts ahead, down to one
	// GetObject). Default 4; 1 disables (one GetObject per download).
	ParallelParts int `json:"parallel_parts,omitempty"`
	// ParallelPartSize of parallel downloads in bytes. Default 8 MiB,
	// minimum 1 MiB.
	ParallelPartSize int64 `json:"parallel_part_size,omitempty"`
	// Redirect, when set, answers authenticated downloads of media in this
	// datastore with a 307 redirect to a short-lived presigned URL of the
	// object (after the access token was checked), so the bytes flow from
	// the bucket or a CDN instead of through Caddy. Legacy unauthenticated
	// downloads are redirected only when the client sends allow_redirect=true.
	// Default: no redirects.
	Redirect *RedirectConfig `json:"redirect,omitempty"`
}

// RedirectConfig configures presigned download redirects.
type RedirectConfig struct {
	// Lifetime of a presigned URL. Default 5m.
	Lifetime caddy.Duration `json:"lifetime,omitempty"`
	// CDNBaseURL, when set, replaces the scheme, host and leading path of
	// presigned URLs, e.g. "https://cdn.example.org"; the CDN must forward
	// the path and query unchanged to the bucket's endpoint. Default: the
	// S3 endpoint's own URLs.
	CDNBaseURL string `json:"cdn_base_url,omitempty"`
}

// resolvedDatastore is a DatastoreConfig with placeholders resolved and
// defaults applied: what opening the stores depends on.
type resolvedDatastore struct {
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Kinds    []storage.Kind    `json:"kinds"`
	Path     string            `json:"path,omitempty"`
	S3       *s3store.Config   `json:"s3,omitempty"`
	Redirect *resolvedRedirect `json:"redirect,omitempty"`
}

// resolvedRedirect is a RedirectConfig with defaults applied.
type resolvedRedirect struct {
	Lifetime time.Duration
	CDN      *url.URL
}

// defaultDatastores is the datastore list when the app configures none: one
// file datastore for every kind at storagePath, named like the blobs that
// earlier versions recorded.
func defaultDatastores(storagePath string) []resolvedDatastore {
	return []resolvedDatastore{{
		Name:  mediaapi.DefaultDatastore,
		Type:  DatastoreFile,
		Kinds: []storage.Kind{storage.KindLocal, storage.KindRemote, storage.KindThumbnails},
		Path:  storagePath,
	}}
}

// resolveDatastores validates the configured datastores and resolves their
// placeholders. Errors never include secret values.
func resolveDatastores(cfgs []DatastoreConfig, repl *caddy.Replacer) ([]resolvedDatastore, error) {
	var out []resolvedDatastore
	names := map[string]bool{}
	resolve := func(ds, field, v string) (string, error) {
		r, err := repl.ReplaceOrErr(v, true, true)
		if err != nil {
			return "", fmt.Errorf("datastore %s: %s: resolving placeholders: %w", ds, field, err)
		}
		return r, nil
	}
	for i, c := range cfgs {
		if c.Name == "" {
			return nil, fmt.Errorf("datastore %d: a name is required", i+1)
		}
		if names[c.Name] {
			return nil, fmt.Errorf("datastore %s: defined twice", c.Name)
		}
		names[c.Name] = true
		r := resolvedDatastore{Name: c.Name, Type: c.Type}
		for _, k := range c.Kinds {
			switch storage.Kind(k) {
			case storage.KindLocal, storage.KindRemote, storage.KindThumbnails:
				r.Kinds = append(r.Kinds, storage.Kind(k))
			default:
				return nil, fmt.Errorf("datastore %s: unknown kind %q (want local, remote or thumbnails)", c.Name, k)
			}
		}
		switch c.Type {
		case DatastoreFile:
			if c.S3 != nil {
				return nil, fmt.Errorf("datastore %s: s3 settings on a file datastore", c.Name)
			}
			if c.Path == "" {
				return nil, fmt.Errorf("datastore %s: a file datastore needs a path", c.Name)
			}
			p, err := resolve(c.Name, "path", c.Path)
			if err != nil {
				return nil, err
			}
			if r.Path, err = absPath(p); err != nil {
				return nil, fmt.Errorf("datastore %s: %w", c.Name, err)
			}
		case DatastoreS3:
			if c.S3 == nil || c.Path != "" {
				return nil, fmt.Errorf("datastore %s: an s3 datastore needs s3 settings and no path", c.Name)
			}
			s3cfg, redirect, err := resolveS3(c.Name, c.S3, resolve)
			if err != nil {
				return nil, err
			}
			r.S3, r.Redirect = s3cfg, redirect
		default:
			return nil, fmt.Errorf("datastore %s: unknown type %q (want %q or %q)", c.Name, c.Type, DatastoreFile, DatastoreS3)
		}
		out = append(out, r)
	}
	return out, nil
}

// resolveS3 resolves and checks one S3 datastore's settings.
func resolveS3(name string, c *S3Config, resolve func(ds, field, v string) (string, error)) (*s3store.Config, *resolvedRedirect, error) {
	cfg := &s3store.Config{
		PathStyle:             c.PathStyle,
		UseDefaultCredentials: c.UseEnvCredentials,
		PartSize:              c.PartSize,
		MaxBufferBytes:        c.MaxBufferBytes,
		MaxRetries:            c.MaxRetries,
		ParallelParts:         c.ParallelParts,
		ParallelPartSize:      c.ParallelPartSize,
	}
	for _, f := range []struct {
		field string
		in    string
		out   *string
	}{
		{"endpoint", c.Endpoint, &cfg.Endpoint},
		{"region", c.Region, &cfg.Region},
		{"bucket", c.Bucket, &cfg.Bucket},
		{"prefix", c.Prefix, &cfg.Prefix},
		{"access_key_id", c.AccessKeyID, &cfg.AccessKeyID},
		{"secret_access_key", c.SecretAccessKey, &cfg.SecretAccessKey},
		{"session_token", c.SessionToken, &cfg.SessionToken},
		{"storage_class", c.StorageClass, &cfg.StorageClass},
	} {
		v, err := resolve(name, f.field, f.in)
		if err != nil {
			return nil, nil, err
		}
		*f.out = v
	}
	if cfg.Bucket == "" {
		return nil, nil, fmt.Errorf("datastore %s: an s3 datastore needs a bucket", name)
	}
	if c.ParallelParts < 0 {
		return nil, nil, fmt.Errorf("datastore %s: parallel_parts must be positive (1 disables parallel downloads)", name)
	}
	if c.ParallelPartSize != 0 && c.ParallelPartSize < s3store.MinParallelPartSize {
		return nil, nil, fmt.Errorf("datastore %s: parallel_part_size must be at least %d", name, s3store.MinParallelPartSize)
	}
	if (cfg.AccessKeyID == "") != (cfg.SecretAccessKey == "") {
		return nil, nil, fmt.Errorf("datastore %s: access_key_id and secret_access_key go together", name)
	}
	if cfg.AccessKeyID == "" && !cfg.UseDefaultCredentials {
		return nil, nil, fmt.Errorf("datastore %s: s3 credentials are required (access_key_id and secret_access_key, or use_env_credentials)", name)
	}
	if c.Redirect == nil {
		return cfg, nil, nil
	}
	rd := &resolvedRedirect{Lifetime: time.Duration(c.Redirect.Lifetime)}
	switch {
	case rd.Lifetime == 0:
		rd.Lifetime = DefaultRedirectLifetime
	case rd.Lifetime < time.Second || rd.Lifetime > 7*24*time.Hour:
		return nil, nil, fmt.Errorf("datastore %s: redirect lifetime must be between 1s and 7d", name)
	}
	if c.Redirect.CDNBaseURL != "" {
		raw, err := resolve(name, "cdn_base_url", c.Redirect.CDNBaseURL)
		if err != nil {
			return nil, nil, err
		}
		u, err := url.Parse(raw)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" {
			return nil, nil, fmt.Errorf("datastore %s: cdn_base_url must be an http(s) URL without a query", name)
		}
		u.Path = strings.TrimRight(u.Path, "/")
		rd.CDN = u
	}
	return cfg, rd, nil
}

// datastoresKey is the part of the resources' pool key that the datastores
// decide. It holds secrets (S3 keys): it is never logged.
func datastoresKey(ds []resolvedDatastore) string {
	b, err := json.Marshal(ds)
	if err != nil {
		// Only plain strings, numbers and booleans: cannot fail.
		panic(fmt.Sprintf("encoding datastore settings: %v", err))
	}
	return string(b)
}

// openDatastores opens every datastore. observe, when set, builds the S3
// observer of a datastore (metrics).
func openDatastores(ctx context.Context, ds []resolvedDatastore, observe func(name string) s3store.Observer) (*storage.Datastores, error) {
	var opened []storage.Datastore
	closeAll := func() {
		for _, d := range opened {
			_ = d.Store.Close()
		}
	}
	for _, d := range ds {
		var store storage.BlobStore
		switch d.Type {
		case DatastoreFile:
			fs, err := filestore.New(d.Path)
			if err != nil {
				closeAll()
				return nil, fmt.Errorf("opening datastore %s: %w", d.Name, err)
			}
			store = fs
		case DatastoreS3:
			cfg := *d.S3
			if observe != nil {
				cfg.Observer = observe(d.Name)
			}
			openCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
			s3, err := s3store.New(openCtx, cfg)
			cancel()
			if err != nil {
				closeAll()
				// s3store errors never include the keys.
				return nil, fmt.Errorf("opening datastore %s: %w", d.Name, err)
			}
			store = s3
		default:
			closeAll()
			return nil, errors.New("opening datastore " + d.Name + ": unknown type")
		}
		opened = append(opened, storage.Datastore{Name: d.Name, Store: store, Kinds: d.Kinds})
	}
	stores, err := storage.NewDatastores(opened...)
	if err != nil {
		closeAll()
		return nil, fmt.Errorf("configuring datastores: %w", err)
	}
	return stores, nil
}
