package caddymodule

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
)

func TestHandlerUnmarshalCaddyfile(t *testing.T) {
	since := time.Date(2024, 9, 1, 0, 0, 0, 0, time.UTC)
	for i, tc := range []struct {
		input   string
		want    Handler
		wantErr string // substring; empty means success
	}{
		{
			input: `matrix_media {
				server_name example.org
				homeserver http://127.0.0.1:8008
			}`,
			want: Handler{ServerName: "example.org", Homeserver: "http://127.0.0.1:8008"},
		},
		{
			input: `matrix_media {
				server_name example.org:8448
				homeserver {env.HS_URL}
				homeserver_timeout 3s
				max_upload_size 50MiB
				max_pending_uploads 10
				pending_expiry 2h
				max_download_timeout 1m30s
				freeze_legacy 2024-09-01T00:00:00Z
			}`,
			want: Handler{
				ServerName:         "example.org:8448",
				Homeserver:         "{env.HS_URL}",
				HomeserverTimeout:  caddy.Duration(3 * time.Second),
				MaxUploadSize:      50 << 20,
				MaxPendingUploads:  10,
				PendingExpiry:      caddy.Duration(2 * time.Hour),
				MaxDownloadTimeout: caddy.Duration(90 * time.Second),
				FreezeLegacy:       true,
				FreezeSince:        since,
			},
		},
		{
			input: `matrix_media {
				server_name example.org
				homeserver http://hs
				appservice_registration /etc/matrix/whatsapp.yaml
				appservice_registration /etc/matrix/signal.yaml
				appservice bridge {
					as_token {env.AS_TOKEN}
					sender_localpart bridgebot
					user_namespace @bridge_.*:example.org
					user_namespace @puppet_.*:example.org
				}
				admins @alice:example.org @bob:example.org
				admins @carol:example.org
				detect_homeserver_admins
				allow_user_export
				admin_token {env.MEDIA_ADMIN_TOKEN}
				admin_token {file./run/secrets/media} @automation:example.org
				signing_key /etc/matrix-media/signing.key
			}`,
			want: Handler{
				ServerName:              "example.org",
				Homeserver:              "http://hs",
				AppserviceRegistrations: []string{"/etc/matrix/whatsapp.yaml", "/etc/matrix/signal.yaml"},
				Appservices: []AppserviceConfig{{ID: "bridge", ASToken: "{env.AS_TOKEN}", SenderLocalpart: "bridgebot",
					UserNamespaces: []string{"@bridge_.*:example.org", "@puppet_.*:example.org"}}},
				Admins:                 []string{"@alice:example.org", "@bob:example.org", "@carol:example.org"},
				DetectHomeserverAdmins: true,
				AllowUserExport:        true,
				AdminTokens: []AdminTokenConfig{{Token: "{env.MEDIA_ADMIN_TOKEN}"},
					{Token: "{file./run/secrets/media}", UserID: "@automation:example.org"}},
				SigningKey: "/etc/matrix-media/signing.key",
			},
		},
		{input: `matrix_media {
				server_name a
				homeserver http://hs
				appservice x {
					as_token t
				}
			}`, wantErr: "as_token and sender_localpart are required"},
		{input: `matrix_media {
				server_name a
				homeserver http://hs
				admins
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				server_name a
				homeserver http://hs
				admin_token a b c
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				server_name a
				homeserver http://hs
				allow_user_export yes
			}`, wantErr: "wrong argument count"},
		{
			input: `matrix_media {
				server_name a.test
				homeserver http://hs
				max_upload_size 10MB
				max_pending_uploads unlimited
				pending_expiry 1d
				freeze_legacy
			}`,
			want: Handler{
				ServerName:        "a.test",
				Homeserver:        "http://hs",
				MaxUploadSize:     10_000_000,
				MaxPendingUploads: -1,
				PendingExpiry:     caddy.Duration(24 * time.Hour),
				FreezeLegacy:      true,
			},
		},
		{input: `matrix_media`, wantErr: "server_name is required"},
		{input: `matrix_media {
				server_name a.test
			}`, wantErr: "homeserver is required"},
		{input: `matrix_media {
				homeserver http://hs
			}`, wantErr: "server_name is required"},
		{input: `matrix_media a.test {
				homeserver http://hs
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				server_name a.test
				server_name b.test
				homeserver http://hs
			}`, wantErr: "server_name specified more than once"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				homeserver http://other
			}`, wantErr: "homeserver specified more than once"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				thumbnails on
			}`, wantErr: "unrecognized subdirective 'thumbnails'"},
		{input: `matrix_media {
				server_name
				homeserver http://hs
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				server_name a.test b.test
				homeserver http://hs
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				max_upload_size lots
			}`, wantErr: "parsing max_upload_size"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				max_upload_size 0
			}`, wantErr: "parsing max_upload_size: size '0' must be between 1 byte and 8EiB"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				max_upload_size 10MiB 20MiB
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				max_pending_uploads 0
			}`, wantErr: "max_pending_uploads must be a positive integer or 'unlimited'"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				max_pending_uploads many
			}`, wantErr: "max_pending_uploads must be a positive integer or 'unlimited'"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				pending_expiry soon
			}`, wantErr: "parsing pending_expiry"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				pending_expiry -1h
			}`, wantErr: "pending_expiry must be positive"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				max_download_timeout 0s
			}`, wantErr: "max_download_timeout must be positive"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				homeserver_timeout forever
			}`, wantErr: "parsing homeserver_timeout"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				freeze_legacy yesterday
			}`, wantErr: "freeze_legacy: the cut-off must be an RFC 3339 time"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				freeze_legacy 2024-09-01T00:00:00Z extra
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				server_name a.test
				homeserver http://hs
				freeze_legacy
				freeze_legacy
			}`, wantErr: "freeze_legacy specified more than once"},
	} {
		var got Handler
		err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if tc.wantErr != "" {
			if err == nil {
				t.Errorf("Test %d: expected error containing %q, got none (parsed %+v)", i, tc.wantErr, got)
			} else if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Test %d: expected error containing %q, got %q", i, tc.wantErr, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("Test %d: unexpected error: %v", i, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Test %d: parsed\n%+v\nwant\n%+v", i, got, tc.want)
		}
	}
}

func TestAppUnmarshalCaddyfile(t *testing.T) {
	for i, tc := range []struct {
		input   string
		want    App
		wantErr string
	}{
		{input: `matrix_media`, want: App{}},
		{input: `matrix_media {
			}`, want: App{}},
		{
			input: `matrix_media {
				database sqlite /var/lib/media/media.db
				storage_path /var/lib/media/blobs
				media_cache_size 1000
				max_upload_size 1GiB
			}`,
			want: App{
				Database:       &Database{Driver: "sqlite", DSN: "/var/lib/media/media.db"},
				StoragePath:    "/var/lib/media/blobs",
				MediaCacheSize: 1000,
				MaxUploadSize:  1 << 30,
			},
		},
		{
			input: `matrix_media {
				database sqlite
			}`,
			want: App{Database: &Database{Driver: "sqlite"}},
		},
		{
			input: `matrix_media {
				database sqlite /var/lib/media/media.db {
					synchronous full
				}
			}`,
			want: App{Database: &Database{Driver: "sqlite", DSN: "/var/lib/media/media.db", Synchronous: "full"}},
		},
		{
			input: `matrix_media {
				database sqlite {
					synchronous normal
				}
			}`,
			want: App{Database: &Database{Driver: "sqlite", Synchronous: "normal"}},
		},
		{
			input: `matrix_media {
				token_cache_size 5000
				token_cache_ttl 2m
				token_negative_ttl 15s
				redis redis://:{env.REDIS_PASS}@127.0.0.1:6379/0
				breaker_threshold 3
				breaker_cooldown 20s
			}`,
			want: App{
				TokenCacheSize:   5000,
				TokenCacheTTL:    caddy.Duration(2 * time.Minute),
				TokenNegativeTTL: caddy.Duration(15 * time.Second),
				Redis:            "redis://:{env.REDIS_PASS}@127.0.0.1:6379/0",
				BreakerThreshold: 3,
				BreakerCooldown:  caddy.Duration(20 * time.Second),
			},
		},
		{
			input: `matrix_media {
				datastore disk file /var/lib/media {
					kinds remote thumbnails
				}
				datastore old file /srv/old-media
				datastore s3main s3 {
					kinds local
					endpoint https://s3.example.org
					region eu-west-1
					bucket media
					prefix prod/
					path_style
					access_key_id {env.S3_KEY}
					secret_access_key {file./run/secrets/s3}
					storage_class STANDARD_IA
					part_size 16MiB
					max_retries 5
					parallel_parts 6
					parallel_part_size 4MiB
					redirect 10m {
						cdn_base_url https://cdn.example.org
					}
				}
				datastore s3env s3 {
					bucket other
					use_env_credentials
					parallel_parts off
					redirect
				}
			}`,
			want: App{Datastores: []DatastoreConfig{
				{Name: "disk", Type: "file", Path: "/var/lib/media", Kinds: []string{"remote", "thumbnails"}},
				{Name: "old", Type: "file", Path: "/srv/old-media"},
				{Name: "s3main", Type: "s3", Kinds: []string{"local"}, S3: &S3Config{
					Endpoint: "https://s3.example.org", Region: "eu-west-1", Bucket: "media", Prefix: "prod/", PathStyle: true,
					AccessKeyID: "{env.S3_KEY}", SecretAccessKey: "{file./run/secrets/s3}", StorageClass: "STANDARD_IA",
					PartSize: 16 << 20, MaxRetries: 5, ParallelParts: 6, ParallelPartSize: 4 << 20,
					Redirect: &RedirectConfig{Lifetime: caddy.Duration(10 * time.Minute), CDNBaseURL: "https://cdn.example.org"},
				}},
				{Name: "s3env", Type: "s3", S3: &S3Config{Bucket: "other", UseEnvCredentials: true, ParallelParts: 1, Redirect: &RedirectConfig{}}},
			}},
		},
		{
			input: `matrix_media {
				thumbnails {
					size 64 64 crop
					size 1024 768 scale
					dynamic 2048
					formats webp avif
					pregenerate
					remote fetch
					max_pixels 50000000
					max_source_size 20MiB
					allow_heif
					max_frames 50
					workers 3
					queue 9
					max_memory 128MiB
					timeout 30s
					quarantine_placeholder /etc/caddy/removed.png
				}
			}`,
			want: App{Thumbnails: &ThumbnailsConfig{
				Sizes: []ThumbnailSizeConfig{{64, 64, "crop"}, {1024, 768, "scale"}}, Dynamic: true, MaxDynamic: 2048,
				Formats: []string{"webp", "avif"}, Pregenerate: true, Remote: "fetch", MaxPixels: 50000000, MaxSourceBytes: 20 << 20,
				AllowHEIF: true, MaxFrames: 50, Workers: 3, Queue: 9, MaxMemory: 128 << 20, Timeout: caddy.Duration(30 * time.Second),
				QuarantinePlaceholder: "/etc/caddy/removed.png",
			}},
		},
		{input: `matrix_media {
				thumbnails off
			}`, want: App{Thumbnails: &ThumbnailsConfig{Disabled: true}}},
		{input: `matrix_media {
				previews off
			}`, want: App{Previews: &PreviewsConfig{Disabled: true}}},
		{
			input: `matrix_media {
				previews {
					allowed_networks 10.1.0.0/16
					https_only
					max_page_size 512KiB
					max_image_size 5MiB
					timeout 5s
				}
			}`,
			want: App{Previews: &PreviewsConfig{AllowedNetworks: []string{"10.1.0.0/16"}, AllowHTTP: new(bool),
				MaxPageSize: 512 << 10, MaxImageSize: 5 << 20, Timeout: caddy.Duration(5 * time.Second)}},
		},
		{
			input: `matrix_media {
				federation {
					trusted_ca_file /etc/ssl/private-ca.pem
					insecure_skip_verify
					allowed_networks 10.0.0.0/8 fd00::/8
					max_remote_size 50MiB
					max_fetches 32
					max_fetches_per_server 4
					notary matrix.org ed25519:auto Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP9uYw
				}
			}`,
			want: App{Federation: &FederationConfig{TrustedCAFile: "/etc/ssl/private-ca.pem", InsecureSkipVerify: true,
				AllowedNetworks: []string{"10.0.0.0/8", "fd00::/8"}, MaxRemoteSize: 50 << 20, MaxFetches: 32, MaxFetchesPerServer: 4,
				Notaries: []NotaryConfig{{"matrix.org", "ed25519:auto", "Noi6WqcDj0QmPxCNQqgezwTlBKrfqehY1u2FyWP9uYw"}}}},
		},
		{input: `matrix_media {
				federation {
					trust_everyone
				}
			}`, wantErr: "unrecognized subdirective 'trust_everyone'"},
		{input: `matrix_media {
				federation {
					max_fetches 0
				}
			}`, wantErr: "max_fetches must be a positive integer"},
		{input: `matrix_media {
				thumbnails {
					size 64 64 zoom
				}
			}`, wantErr: "invalid size"},
		{input: `matrix_media {
				thumbnails maybe
			}`, wantErr: "takes a block, or 'off'"},
		{input: `matrix_media {
				datastore x ftp /a
			}`, wantErr: "unknown type 'ftp'"},
		{input: `matrix_media {
				datastore x file
			}`, wantErr: "a file datastore takes one path"},
		{input: `matrix_media {
				datastore x file /a {
					bucket b
				}
			}`, wantErr: "a file datastore only takes kinds"},
		{input: `matrix_media {
				datastore x s3 {
					buckets b
				}
			}`, wantErr: "unrecognized s3 subdirective 'buckets'"},
		{input: `matrix_media {
				datastore x s3 {
					redirect soon
				}
			}`, wantErr: "redirect lifetime must be a positive duration"},
		{input: `matrix_media {
				datastore x s3 {
					parallel_parts 0
				}
			}`, wantErr: "parallel_parts must be a positive integer or off"},
		{input: `matrix_media {
				datastore x s3 {
					parallel_parts
				}
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				token_cache_ttl 0s
			}`, wantErr: "token_cache_ttl must be positive"},
		{input: `matrix_media {
				redis
			}`, wantErr: "wrong argument count"},
		{
			input: `matrix_media {
				database postgres "postgres://media:{env.PGPASS}@127.0.0.1/media?sslmode=disable"
			}`,
			want: App{Database: &Database{Driver: "postgres", DSN: "postgres://media:{env.PGPASS}@127.0.0.1/media?sslmode=disable"}},
		},
		{input: `matrix_media extra`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				database
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				database postgres
			}`, wantErr: "database postgres needs exactly one connection string"},
		{input: `matrix_media {
				database postgres a b
			}`, wantErr: "database postgres needs exactly one connection string"},
		{input: `matrix_media {
				database sqlite a b
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				database mysql dsn
			}`, wantErr: "unknown database driver 'mysql'"},
		{input: `matrix_media {
				database sqlite {
					synchronous extra
				}
			}`, wantErr: `database unknown synchronous "extra" (want "normal" or "full")`},
		{input: `matrix_media {
				database sqlite {
					synchronous
				}
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				database postgres "postgres://h/db" {
					synchronous full
				}
			}`, wantErr: "database synchronous applies to sqlite only"},
		{input: `matrix_media {
				database sqlite {
					journal wal
				}
			}`, wantErr: "unknown database option 'journal'"},
		{input: `matrix_media {
				database sqlite a
				database sqlite b
			}`, wantErr: "database specified more than once"},
		{input: `matrix_media {
				storage_path
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				storage_path /a
				storage_path /b
			}`, wantErr: "storage_path specified more than once"},
		{input: `matrix_media {
				media_cache_size -5
			}`, wantErr: "media_cache_size must be a positive integer"},
		{input: `matrix_media {
				media_cache_size lots
			}`, wantErr: "media_cache_size must be a positive integer"},
		{input: `matrix_media {
				max_upload_size huge
			}`, wantErr: "parsing max_upload_size"},
		{input: `matrix_media {
				cache on
			}`, wantErr: "unrecognized global option subdirective 'cache'"},
	} {
		var got App
		err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
		if tc.wantErr != "" {
			if err == nil {
				t.Errorf("Test %d: expected error containing %q, got none (parsed %+v)", i, tc.wantErr, got)
			} else if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Test %d: expected error containing %q, got %q", i, tc.wantErr, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("Test %d: unexpected error: %v", i, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Test %d: parsed\n%+v\nwant\n%+v", i, got, tc.want)
		}
	}
}

func TestGlobalOptionOnlyOnce(t *testing.T) {
	d := caddyfile.NewTestDispenser(`matrix_media`)
	if _, err := parseGlobalOption(d, httpcaddyfile.App{Name: "matrix_media"}); err == nil ||
		!strings.Contains(err.Error(), "may appear only once") {
		t.Fatalf("second matrix_media global option: got error %v, want 'may appear only once'", err)
	}
	got, err := parseGlobalOption(caddyfile.NewTestDispenser(`matrix_media {
		storage_path /srv/media
	}`), nil)
	if err != nil {
		t.Fatalf("parsing global option: %v", err)
	}
	app, ok := got.(httpcaddyfile.App)
	if !ok || app.Name != "matrix_media" || string(app.Value) != `{"storage_path":"/srv/media"}` {
		t.Fatalf("global option value = %#v, want httpcaddyfile.App matrix_media with storage_path", got)
	}
}

// checkAppCaddyfile parses input as the matrix_media app's Caddyfile block
// and checks case i: the error contains wantErr, or (no error wanted) field
// of the parsed app equals want.
func checkAppCaddyfile[T any](t *testing.T, i int, input, wantErr string, want T, field func(*App) T) {
	t.Helper()
	var got App
	err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input))
	if wantErr != "" {
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("Test %d: error = %v, want one containing %q", i, err, wantErr)
		}
		return
	}
	if err != nil {
		t.Errorf("Test %d: unexpected error: %v", i, err)
		return
	}
	if v := field(&got); !reflect.DeepEqual(v, want) {
		t.Errorf("Test %d: parsed %+v, want %+v", i, v, want)
	}
}
