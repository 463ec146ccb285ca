package dendrite

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseConfig(t *testing.T) {
	const work = "/srv/dendrite"
	tests := []struct {
		name string
		yaml string
		want config
	}{
		{
			name: "relative sqlite file and base path resolve against the work dir",
			yaml: `version: 2
global: {server_name: example.org}
media_api:
  database: {connection_string: "file:dendrite_mediaapi.db"}
  base_path: ./media_store
`,
			want: config{serverName: "example.org", kind: kindSQLite, sqlitePath: "/srv/dendrite/dendrite_mediaapi.db", basePath: "/srv/dendrite/media_store"},
		},
		{
			name: "absolute sqlite URL, query dropped, absolute base path cleaned",
			yaml: `version: 2
global: {server_name: "hs.example:8448"}
media_api:
  database: {connection_string: "file:///var/lib/dendrite/media%20api.db?_busy_timeout=5000"}
  base_path: /var/lib/dendrite//media/../media_store/
`,
			want: config{serverName: "hs.example:8448", kind: kindSQLite, sqlitePath: "/var/lib/dendrite/media api.db", basePath: "/var/lib/dendrite/media_store"},
		},
		{
			name: "opaque sqlite file is taken verbatim up to the query",
			yaml: `version: 2
global: {server_name: localhost}
media_api:
  database: {connection_string: "file:data/media%20x.db?cache=shared"}
  base_path: media
`,
			want: config{serverName: "localhost", kind: kindSQLite, sqlitePath: "/srv/dendrite/data/media%20x.db", basePath: "/srv/dendrite/media"},
		},
		{
			name: "global database when the media API has none",
			yaml: `version: 2
global:
  server_name: example.org
  database:
    connection_string: postgres://dendrite:secret@db.internal/dendrite?sslmode=disable
    max_open_conns: 90
media_api:
  base_path: /data/media
`,
			want: config{serverName: "example.org", kind: kindPostgres, postgresDSN: "postgres://dendrite:secret@db.internal/dendrite?sslmode=disable", basePath: "/data/media"},
		},
		{
			name: "the media API's own database wins over the global one",
			yaml: `version: 2
global:
  server_name: example.org
  database: {connection_string: "postgresql://global/db"}
media_api:
  database: {connection_string: "host=/run/postgresql dbname=media user=dendrite"}
  base_path: /data/media
`,
			want: config{serverName: "example.org", kind: kindPostgres, postgresDSN: "host=/run/postgresql dbname=media user=dendrite", basePath: "/data/media"},
		},
		{
			name: "an empty media API database block falls back",
			yaml: `version: 2
global:
  server_name: example.org
  database: {connection_string: "file:dendrite.db"}
media_api:
  database: {connection_string: ""}
  base_path: /data/media
`,
			want: config{serverName: "example.org", kind: kindSQLite, sqlitePath: "/srv/dendrite/dendrite.db", basePath: "/data/media"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseConfig([]byte(tt.yaml), work)
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			if got != tt.want {
				t.Errorf("parseConfig =\n %+v\nwant\n %+v", got, tt.want)
			}
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	const media = "media_api: {database: {connection_string: \"file:m.db\"}, base_path: /m}\n"
	tests := []struct {
		name, yaml, wantInError string
	}{
		{"not yaml", "version: [2\n", "yaml"},
		{"empty", "", "version is 0"},
		{"a synapse homeserver.yaml", "server_name: example.org\nmedia_store_path: /m\n", "version is 0"},
		{"old version", "version: 1\nglobal: {server_name: example.org}\n" + media, "version is 1"},
		{"no server name", "version: 2\n" + media, "global.server_name"},
		{"bad server name", "version: 2\nglobal: {server_name: \"exa mple.org\"}\n" + media, "global.server_name"},
		{"no database", "version: 2\nglobal: {server_name: example.org}\nmedia_api: {base_path: /m}\n", "neither"},
		{"unknown database", "version: 2\nglobal: {server_name: example.org}\nmedia_api: {database: {connection_string: \"mysql:m\"}, base_path: /m}\n", "media_api.database.connection_string is neither"},
		{"sqlite without file", "version: 2\nglobal: {server_name: example.org}\nmedia_api: {database: {connection_string: \"file:\"}, base_path: /m}\n", "names no file"},
		{"sqlite with a host only", "version: 2\nglobal: {server_name: example.org}\nmedia_api: {database: {connection_string: \"file://host\"}, base_path: /m}\n", "names no file"},
		{"global sqlite without file", "version: 2\nglobal: {server_name: example.org, database: {connection_string: \"file:\"}}\nmedia_api: {base_path: /m}\n", "global.database.connection_string"},
		{"no base path", "version: 2\nglobal: {server_name: example.org}\nmedia_api: {database: {connection_string: \"file:m.db\"}}\n", "base_path is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseConfig([]byte(tt.yaml), "/w")
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.wantInError) {
				t.Errorf("parseConfig error = %v, want ErrConfig mentioning %q", err, tt.wantInError)
			}
		})
	}
}

func TestLoadConfigOptions(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "dendrite.yaml")
	writeFile(t, path, []byte("version: 2\nglobal: {server_name: example.org}\nmedia_api: {database: {connection_string: \"file:media.db\"}, base_path: ./media_store}\n"))

	cfg, err := loadConfig(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.sqlitePath != filepath.Join(dir, "media.db") || cfg.basePath != filepath.Join(dir, "media_store") {
		t.Errorf("default work dir: %+v, want paths in %s", cfg, dir)
	}

	other := t.TempDir()
	cfg, err = loadConfig(path, Options{WorkDir: other, BasePath: "/elsewhere/media"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.sqlitePath != filepath.Join(other, "media.db") || cfg.basePath != "/elsewhere/media" {
		t.Errorf("with options: %+v, want the database in %s and base path /elsewhere/media", cfg, other)
	}

	cwd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	cfg, err = loadConfig(path, Options{BasePath: "copied/media"})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(cwd, "copied/media"); cfg.basePath != want {
		t.Errorf("relative BasePath: %q, want %q (relative to the current directory)", cfg.basePath, want)
	}
}

func TestLoadConfigTooLarge(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dendrite.yaml")
	body := "version: 2\nglobal: {server_name: example.org}\nmedia_api: {database: {connection_string: \"file:m.db\"}, base_path: /m}\n"
	writeFile(t, path, []byte(body+"#"+strings.Repeat("x", MaxConfigBytes-len(body))+"\n"))
	if _, err := loadConfig(path, Options{}); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("oversized config: %v, want ErrConfig larger than", err)
	}
	if _, err := loadConfig(filepath.Join(t.TempDir(), "absent.yaml"), Options{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("absent config: %v, want not exist", err)
	}
}

// FuzzConfig feeds parseConfig arbitrary YAML: it must never panic, and
// what it accepts must be usable: a valid server name, absolute clean
// paths, and a database of a known kind.
func FuzzConfig(f *testing.F) {
	f.Add([]byte("version: 2\nglobal: {server_name: example.org}\nmedia_api: {database: {connection_string: \"file:dendrite_mediaapi.db\"}, base_path: ./media_store}\n"))
	f.Add([]byte("version: 2\nglobal: {server_name: \"[::1]:8448\", database: {connection_string: \"postgres://u:p@h/d\"}}\nmedia_api: {base_path: /m}\n"))
	f.Add([]byte("version: 2\nglobal: {server_name: a}\nmedia_api: {database: {connection_string: \"file:///x/../y.db?q\"}, base_path: \"../../m\"}\n"))
	f.Add([]byte("a: &a [*a, *a]\nb: *a\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := parseConfig(data, "/work")
		if err != nil {
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("error %v does not wrap ErrConfig", err)
			}
			return
		}
		if !filepath.IsAbs(cfg.basePath) || filepath.Clean(cfg.basePath) != cfg.basePath {
			t.Errorf("base path %q is not absolute and clean", cfg.basePath)
		}
		switch cfg.kind {
		case kindSQLite:
			if !filepath.IsAbs(cfg.sqlitePath) || cfg.postgresDSN != "" {
				t.Errorf("sqlite config %+v", cfg)
			}
		case kindPostgres:
			if cfg.postgresDSN == "" || cfg.sqlitePath != "" {
				t.Errorf("postgres config %+v", cfg)
			}
		default:
			t.Errorf("unknown kind in %+v", cfg)
		}
		if cfg.serverName == "" {
			t.Errorf("empty server name in %+v", cfg)
		}
	})
}

// writeFile writes data to path, creating its directory.
func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}
