package synapse

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

func TestParseConfig(t *testing.T) {
	const dir = "/etc/synapse"
	cases := []struct {
		name string
		yaml string
		want Config
	}{
		{
			name: "sqlite, relative paths, defaults",
			yaml: `server_name: example.org
database:
  name: sqlite3
  args:
    database: data/homeserver.db
`,
			want: Config{ServerName: "example.org", Engine: EngineSQLite, SQLitePath: "/etc/synapse/data/homeserver.db",
				LocalDirs: []string{"/etc/synapse/media_store"}, RemoteDirs: []string{"/etc/synapse/media_store"}},
		},
		{
			name: "engine defaults to sqlite3, absolute media store",
			yaml: `server_name: "example.org:8448"
database:
  args:
    database: /var/lib/synapse/homeserver.db
media_store_path: /var/lib/synapse/media/
`,
			want: Config{ServerName: "example.org:8448", Engine: EngineSQLite, SQLitePath: "/var/lib/synapse/homeserver.db",
				LocalDirs: []string{"/var/lib/synapse/media"}, RemoteDirs: []string{"/var/lib/synapse/media"}},
		},
		{
			name: "legacy database_path",
			yaml: `server_name: example.org
database_path: "/data/homeserver.db"
media_store_path: "/data/media_store"
`,
			want: Config{ServerName: "example.org", Engine: EngineSQLite, SQLitePath: "/data/homeserver.db",
				LocalDirs: []string{"/data/media_store"}, RemoteDirs: []string{"/data/media_store"}},
		},
		{
			name: "psycopg2 with pool and keepalive args",
			yaml: `server_name: matrix.example.com
database:
  name: psycopg2
  txn_limit: 10000
  allow_unsafe_locale: false
  args:
    user: synapse_user
    password: "it's a \\secret"
    database: synapse
    host: /var/run/postgresql
    port: 5433
    cp_min: 5
    cp_max: 10
    keepalives_idle: 10
    keepalives_interval: 10
    keepalives_count: 3
media_store_path: /srv/media
`,
			want: Config{ServerName: "matrix.example.com", Engine: EnginePostgres,
				PostgresDSN: `dbname='synapse' host='/var/run/postgresql' password='it\'s a \\secret' port='5433' user='synapse_user'`,
				LocalDirs:   []string{"/srv/media"}, RemoteDirs: []string{"/srv/media"}},
		},
		{
			name: "databases: the one holding main",
			yaml: `server_name: example.org
databases:
  state_db:
    name: sqlite3
    data_stores: [state]
    args: {database: state.db}
  main_db:
    name: psycopg2
    data_stores: [main]
    args: {dbname: synapse, host: db.internal}
`,
			want: Config{ServerName: "example.org", Engine: EnginePostgres, PostgresDSN: `dbname='synapse' host='db.internal'`,
				LocalDirs: []string{"/etc/synapse/media_store"}, RemoteDirs: []string{"/etc/synapse/media_store"}},
		},
		{
			name: "backup media store",
			yaml: `server_name: example.org
database: {name: sqlite3, args: {database: hs.db}}
backup_media_store_path: ../backup
`,
			want: Config{ServerName: "example.org", Engine: EngineSQLite, SQLitePath: "/etc/synapse/hs.db",
				LocalDirs:  []string{"/etc/synapse/media_store", "/etc/backup"},
				RemoteDirs: []string{"/etc/synapse/media_store", "/etc/backup"}},
		},
		{
			name: "storage providers, local storage disabled",
			yaml: `server_name: example.org
database: {name: sqlite3, args: {database: hs.db}}
enable_local_media_storage: false
media_storage_providers:
- module: synapse.media.storage_provider.FileStorageProviderBackend
  store_remote: true
  config: {directory: /mnt/remote}
- module: file_system
  store_local: true
  config: {directory: /mnt/local}
- module: s3_storage_provider.S3StorageProviderBackend
  store_local: true
  store_remote: true
  config: {bucket: b}
`,
			want: Config{ServerName: "example.org", Engine: EngineSQLite, SQLitePath: "/etc/synapse/hs.db",
				LocalDirs: []string{"/mnt/local"}, RemoteDirs: []string{"/mnt/remote"},
				UnsupportedProviders: []string{"s3_storage_provider.S3StorageProviderBackend"}},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := ParseConfig([]byte(c.yaml), dir)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Errorf("got  %+v\nwant %+v", got, c.want)
			}
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	cases := []struct{ name, yaml, want string }{
		{"no server name", "database: {args: {database: a.db}}", "server_name"},
		{"bad server name", "server_name: ex/ample\ndatabase: {args: {database: a.db}}", "server_name"},
		{"no database", "server_name: example.org", "no database"},
		{"unknown engine", "server_name: example.org\ndatabase: {name: mysql}", "unsupported database engine"},
		{"both database and databases", "server_name: example.org\ndatabase: {args: {database: a.db}}\ndatabases: {x: {args: {database: b.db}}}", "both"},
		{"no main data store", "server_name: example.org\ndatabases: {x: {data_stores: [state], args: {database: b.db}}}", "main data store"},
		{"sqlite without path", "server_name: example.org\ndatabase: {name: sqlite3}", "args.database"},
		{"in-memory sqlite", "server_name: example.org\ndatabase: {args: {database: ':memory:'}}", "in-memory"},
		{"unknown postgres arg", "server_name: example.org\ndatabase: {name: psycopg2, args: {dsn: 'host=x'}}", `"dsn"`},
		{"postgres arg not a scalar", "server_name: example.org\ndatabase: {name: psycopg2, args: {host: [a, b]}}", `"host"`},
		{"backup and providers", "server_name: example.org\ndatabase: {args: {database: a.db}}\nbackup_media_store_path: /b\nmedia_storage_providers: [{module: file_system, config: {directory: /c}}]", "both"},
		{"file provider without directory", "server_name: example.org\ndatabase: {args: {database: a.db}}\nmedia_storage_providers: [{module: file_system}]", "config.directory"},
		{"only unreadable providers", "server_name: example.org\ndatabase: {args: {database: a.db}}\nenable_local_media_storage: false\nmedia_storage_providers: [{module: my.S3Provider, store_local: true}]", "my.S3Provider"},
		{"no media at all", "server_name: example.org\ndatabase: {args: {database: a.db}}\nenable_local_media_storage: false", "no storage provider"},
		{"not yaml", "server_name: [", "parsing"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(c.yaml), "/etc/synapse")
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want one containing %q", err, c.want)
			}
		})
	}
}

// TestPostgresDSNRoundTrip checks that awkward values survive quoting as
// pgx reads them back.
func TestPostgresDSNRoundTrip(t *testing.T) {
	args := map[string]any{"user": "a b", "password": `p'a\ss w"rd`, "dbname": "syn apse", "host": "127.0.0.1", "port": 6543}
	dsn, err := postgresDSN(args)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	if pc.User != "a b" || pc.Password != `p'a\ss w"rd` || pc.Database != "syn apse" || pc.Host != "127.0.0.1" || pc.Port != 6543 {
		t.Errorf("round trip gave user %q password %q db %q host %q port %d", pc.User, pc.Password, pc.Database, pc.Host, pc.Port)
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "homeserver.yaml")
	if err := os.WriteFile(p, []byte("server_name: example.org\ndatabase: {args: {database: hs.db}}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SQLitePath != filepath.Join(dir, "hs.db") || cfg.LocalDirs[0] != filepath.Join(dir, "media_store") {
		t.Errorf("paths not resolved against the config's directory: %+v", cfg)
	}

	big := filepath.Join(dir, "big.yaml")
	data := append([]byte("server_name: example.org\n#"), make([]byte, MaxConfigSize)...)
	for i := range data[26:] {
		data[26+i] = 'x'
	}
	if err := os.WriteFile(big, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadConfig(big); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("oversized config: %v", err)
	}
	if _, err := LoadConfig(filepath.Join(dir, "absent.yaml")); err == nil {
		t.Error("absent config loaded")
	}
}

// FuzzConfig parses arbitrary homeserver.yaml bytes: never a panic, and a
// config that parses is one OpenWith accepts (absolute paths, a valid
// server name, a known engine).
func FuzzConfig(f *testing.F) {
	f.Add([]byte("server_name: example.org\ndatabase: {name: sqlite3, args: {database: hs.db}}\n"))
	f.Add([]byte("server_name: example.org\ndatabase: {name: psycopg2, args: {user: u, password: p, host: h, port: 5432, cp_min: 1}}\nmedia_store_path: m\n"))
	f.Add([]byte("server_name: example.org\ndatabases: {a: {data_stores: [main], name: psycopg2, args: {dbname: x}}}\nmedia_storage_providers: [{module: file_system, store_local: true, config: {directory: d}}, {module: s3}]\n"))
	f.Add([]byte("server_name: example.org\ndatabase_path: x.db\nbackup_media_store_path: b\nenable_local_media_storage: false\n"))
	f.Add([]byte("a: &a [*a, *a]\nserver_name: *a\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfig(data, "/srv/synapse")
		if err != nil {
			return
		}
		if err := cfg.check(); err != nil {
			t.Fatalf("parsed config %+v fails OpenWith's check: %v", cfg, err)
		}
		if cfg.Engine == EnginePostgres {
			if _, err := pgx.ParseConfig(cfg.PostgresDSN); err != nil && isDSNSyntaxError(err) {
				t.Fatalf("DSN %q does not parse: %v", cfg.PostgresDSN, err)
			}
		}
	})
}

// isDSNSyntaxError reports pgx's errors for a malformed keyword/value
// string (as opposed to a well-formed one with values it rejects).
func isDSNSyntaxError(err error) bool {
	for _, m := range []string{"invalid keyword/value", "unterminated quoted string", `missing "="`, "NUL byte"} {
		if strings.Contains(err.Error(), m) {
			return true
		}
	}
	return false
}
