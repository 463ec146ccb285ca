package synapse

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// MaxConfigSize is the largest homeserver.yaml LoadConfig reads (4 MiB;
// Synapse's fully commented sample configuration is about 100 KiB).
const MaxConfigSize = 4 << 20

// Database engines, as Synapse names them in database.name.
const (
	// EngineSQLite is Synapse's "sqlite3" engine.
	EngineSQLite = "sqlite3"
	// EnginePostgres is Synapse's "psycopg2" engine (PostgreSQL).
	EnginePostgres = "psycopg2"
)

// Config is what a Source needs to read a Synapse media repository. Open
// builds it from homeserver.yaml; tests and tools may fill it directly and
// call OpenWith.
type Config struct {
	// ServerName is Synapse's server_name: the server name of its local
	// media. Required.
	ServerName string
	// Engine is EngineSQLite or EnginePostgres. Required.
	Engine string
	// SQLitePath is the absolute path of the SQLite database (EngineSQLite).
	SQLitePath string
	// PostgresDSN is a connection string for pgx, keyword/value or URL
	// (EnginePostgres); empty uses libpq's defaults and PG* environment
	// variables, as psycopg2 does. The connection is made read-only
	// whatever it says.
	PostgresDSN string
	// LocalDirs are the directories searched, in order, for
	// local_content/...: the media store first, then file-system storage
	// providers that store local media. Absolute paths.
	LocalDirs []string
	// RemoteDirs are the same for remote_content/... (the remote media
	// cache).
	RemoteDirs []string
	// UnsupportedProviders names the configured media storage providers
	// this package cannot read (for example S3 providers). Media only they
	// hold is reported missing, with these names in the error.
	UnsupportedProviders []string
	// PageSize is how many rows one database query returns while walking.
	// Default 1000.
	PageSize int
}

// DefaultPageSize is Config.PageSize when it is not set.
const DefaultPageSize = 1000

// yamlConfig is the part of homeserver.yaml the importer reads.
type yamlConfig struct {
	ServerName              string                  `yaml:"server_name"`
	Database                *yamlDatabase           `yaml:"database"`
	Databases               map[string]yamlDatabase `yaml:"databases"`
	DatabasePath            string                  `yaml:"database_path"`
	MediaStorePath          *string                 `yaml:"media_store_path"`
	EnableLocalMediaStorage *bool                   `yaml:"enable_local_media_storage"`
	BackupMediaStorePath    string                  `yaml:"backup_media_store_path"`
	MediaStorageProviders   []yamlProvider          `yaml:"media_storage_providers"`
}

// yamlDatabase is one entry of database or databases.
type yamlDatabase struct {
	Name       string         `yaml:"name"`
	Args       map[string]any `yaml:"args"`
	DataStores []string       `yaml:"data_stores"`
}

// yamlProvider is one entry of media_storage_providers.
type yamlProvider struct {
	Module      string         `yaml:"module"`
	StoreLocal  bool           `yaml:"store_local"`
	StoreRemote bool           `yaml:"store_remote"`
	Config      map[string]any `yaml:"config"`
}

// fileSystemProviders are the module names Synapse maps to its file-system
// storage provider, whose directory has the media store's layout.
var fileSystemProviders = map[string]bool{
	"file_system":                            true,
	"synapse.rest.media.v1.storage_provider": true,
	"synapse.media.storage_provider.FileStorageProviderBackend": true,
}

// LoadConfig reads Synapse's homeserver.yaml at path (at most
// MaxConfigSize bytes) and returns the Config it describes; relative paths
// in it are resolved against the directory of path (see ParseConfig).
func LoadConfig(path string) (Config, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return Config{}, fmt.Errorf("resolving %s: %w", path, err)
	}
	data, err := readBounded(abs, MaxConfigSize)
	if err != nil {
		return Config{}, err
	}
	cfg, err := ParseConfig(data, filepath.Dir(abs))
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", abs, err)
	}
	return cfg, nil
}

// readBounded reads the file at path, failing if it is larger than max.
func readBounded(path string, max int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening synapse config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("reading synapse config %s: %w", path, err)
	}
	if int64(len(data)) > max {
		return nil, fmt.Errorf("synapse config %s is larger than %d bytes", path, max)
	}
	return data, nil
}

// ParseConfig parses the bytes of a homeserver.yaml. dir is the absolute
// directory relative paths are resolved against: media_store_path (default
// "media_store"), the SQLite database path, backup_media_store_path and the
// directories of file-system storage providers. Synapse itself resolves
// them against its working directory; the usual deployments (the Docker
// image's /data, Debian's /etc/matrix-synapse with absolute paths) keep
// them absolute or next to the config file, which is what this assumes.
//
// Only one file is read: settings Synapse would take from further -c files
// or a conf.d directory must be in this one.
func ParseConfig(data []byte, dir string) (Config, error) {
	var y yamlConfig
	if err := yaml.Unmarshal(data, &y); err != nil {
		return Config{}, fmt.Errorf("parsing synapse config: %w", err)
	}
	if !matrix.ValidServerName(y.ServerName) {
		return Config{}, fmt.Errorf("synapse config: server_name %q is not a valid server name", y.ServerName)
	}
	cfg := Config{ServerName: y.ServerName}
	if err := y.database(dir, &cfg); err != nil {
		return Config{}, err
	}
	if err := y.mediaDirs(dir, &cfg); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// database fills cfg's engine and connection from database, databases or
// the legacy database_path, as Synapse reads them.
func (y *yamlConfig) database(dir string, cfg *Config) error {
	db, err := y.mainDatabase()
	if err != nil {
		return err
	}
	engine := db.Name
	if engine == "" {
		engine = EngineSQLite // Synapse's default
	}
	switch engine {
	case EngineSQLite:
		p, err := sqlitePath(db.Args, dir)
		if err != nil {
			return err
		}
		cfg.Engine, cfg.SQLitePath = EngineSQLite, p
	case EnginePostgres:
		dsn, err := postgresDSN(db.Args)
		if err != nil {
			return err
		}
		cfg.Engine, cfg.PostgresDSN = EnginePostgres, dsn
	default:
		return fmt.Errorf("synapse config: unsupported database engine %q (Synapse knows sqlite3 and psycopg2)", engine)
	}
	return nil
}

// mainDatabase picks the database holding Synapse's "main" data store,
// which has the media tables.
func (y *yamlConfig) mainDatabase() (yamlDatabase, error) {
	switch {
	case y.Database != nil && len(y.Databases) > 0:
		return yamlDatabase{}, errors.New("synapse config: both database and databases are set")
	case y.Database != nil:
		db := *y.Database
		if y.DatabasePath != "" && (db.Name == "" || db.Name == EngineSQLite) {
			db.Args = withArg(db.Args, "database", y.DatabasePath)
		}
		return db, nil
	case len(y.Databases) > 0:
		return y.mainOfMany()
	case y.DatabasePath != "":
		return yamlDatabase{Name: EngineSQLite, Args: map[string]any{"database": y.DatabasePath}}, nil
	default:
		return yamlDatabase{}, errors.New("synapse config: no database configured")
	}
}

// mainOfMany finds the entry of databases whose data_stores (default
// main and state) include main.
func (y *yamlConfig) mainOfMany() (yamlDatabase, error) {
	names := make([]string, 0, len(y.Databases))
	for name := range y.Databases {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		db := y.Databases[name]
		stores := db.DataStores
		if stores == nil {
			stores = []string{"main", "state"}
		}
		for _, s := range stores {
			if s == "main" {
				return db, nil
			}
		}
	}
	return yamlDatabase{}, errors.New("synapse config: no entry of databases holds the main data store")
}

// withArg returns a copy of args with key set to value.
func withArg(args map[string]any, key string, value any) map[string]any {
	out := make(map[string]any, len(args)+1)
	for k, v := range args {
		out[k] = v
	}
	out[key] = value
	return out
}

// sqlitePath is the absolute path of the SQLite database in args.database.
func sqlitePath(args map[string]any, dir string) (string, error) {
	p, ok := args["database"].(string)
	if !ok || p == "" {
		return "", errors.New("synapse config: sqlite3 database needs args.database (the database file)")
	}
	if p == ":memory:" {
		return "", errors.New("synapse config: an in-memory sqlite3 database holds no media to import")
	}
	return resolve(dir, p), nil
}

// postgresArgs are the psycopg2 (libpq) connection arguments passed on to
// pgx, with their pgx spelling.
var postgresArgs = map[string]string{
	"host": "host", "port": "port", "user": "user", "password": "password",
	"passfile": "passfile", "dbname": "dbname", "database": "dbname",
	"connect_timeout": "connect_timeout", "sslmode": "sslmode",
	"sslkey": "sslkey", "sslcert": "sslcert", "sslrootcert": "sslrootcert",
	"sslpassword": "sslpassword", "sslsni": "sslsni",
	"sslnegotiation": "sslnegotiation", "sslcertmode": "sslcertmode",
	"target_session_attrs": "target_session_attrs", "service": "service",
	"servicefile": "servicefile", "channel_binding": "channel_binding",
	"require_auth": "require_auth", "krbsrvname": "krbsrvname",
	"krbspn": "krbspn", "application_name": "application_name",
	"options": "options",
}

// ignoredPostgresArg reports arguments that only tune Synapse's own
// connection pool or TCP keepalives and do not matter to a reader.
func ignoredPostgresArg(k string) bool {
	return strings.HasPrefix(k, "cp_") || strings.HasPrefix(k, "keepalives") || k == "tcp_user_timeout"
}

// postgresDSN turns psycopg2's args into a keyword/value connection string.
// Synapse passes args (except the cp_* pool settings) to psycopg2.connect,
// that is to libpq; unknown keys are refused rather than sent to the server.
func postgresDSN(args map[string]any) (string, error) {
	keys := make([]string, 0, len(args))
	for k := range args {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		if ignoredPostgresArg(k) {
			continue
		}
		name, ok := postgresArgs[k]
		if !ok {
			return "", fmt.Errorf("synapse config: database arg %q is not supported by the importer", k)
		}
		v, err := scalarString(args[k])
		if err == nil && strings.IndexByte(v, 0) >= 0 {
			err = errors.New("NUL byte in value")
		}
		if err != nil {
			return "", fmt.Errorf("synapse config: database arg %q: %w", k, err)
		}
		parts = append(parts, name+"="+quoteConnValue(v))
	}
	return strings.Join(parts, " "), nil
}

// scalarString formats a YAML scalar (string, number, boolean).
func scalarString(v any) (string, error) {
	switch x := v.(type) {
	case string:
		return x, nil
	case int:
		return strconv.Itoa(x), nil
	case int64:
		return strconv.FormatInt(x, 10), nil
	case uint64:
		return strconv.FormatUint(x, 10), nil
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64), nil
	case bool:
		return strconv.FormatBool(x), nil
	default:
		return "", fmt.Errorf("want a string or number, got %T", v)
	}
}

// quoteConnValue quotes a value for a keyword/value connection string.
func quoteConnValue(v string) string {
	v = strings.ReplaceAll(v, `\`, `\\`)
	v = strings.ReplaceAll(v, `'`, `\'`)
	return "'" + v + "'"
}

// mediaDirs fills the directories holding media files and the storage
// providers that cannot be read.
func (y *yamlConfig) mediaDirs(dir string, cfg *Config) error {
	providers := y.MediaStorageProviders
	if y.BackupMediaStorePath != "" {
		if len(providers) > 0 {
			return errors.New("synapse config: both backup_media_store_path and media_storage_providers are set")
		}
		providers = []yamlProvider{{
			Module: "file_system", StoreLocal: true, StoreRemote: true,
			Config: map[string]any{"directory": y.BackupMediaStorePath},
		}}
	}
	if y.EnableLocalMediaStorage == nil || *y.EnableLocalMediaStorage {
		store := "media_store" // Synapse's default
		if y.MediaStorePath != nil && *y.MediaStorePath != "" {
			store = *y.MediaStorePath
		}
		store = resolve(dir, store)
		cfg.LocalDirs = append(cfg.LocalDirs, store)
		cfg.RemoteDirs = append(cfg.RemoteDirs, store)
	}
	for i, p := range providers {
		if err := addProvider(dir, i, p, cfg); err != nil {
			return err
		}
	}
	if len(cfg.LocalDirs) == 0 && len(cfg.RemoteDirs) == 0 {
		if len(cfg.UnsupportedProviders) == 0 {
			return errors.New("synapse config: enable_local_media_storage is false and no storage provider is configured")
		}
		return fmt.Errorf("synapse config: media is kept only in storage providers the importer cannot read: %s",
			strings.Join(cfg.UnsupportedProviders, ", "))
	}
	return nil
}

// addProvider adds a file-system storage provider's directory to the
// media it stores, or records another provider as unsupported.
func addProvider(dir string, i int, p yamlProvider, cfg *Config) error {
	if !fileSystemProviders[p.Module] {
		name := p.Module
		if name == "" {
			name = fmt.Sprintf("media_storage_providers[%d] without module", i)
		}
		cfg.UnsupportedProviders = append(cfg.UnsupportedProviders, name)
		return nil
	}
	d, ok := p.Config["directory"].(string)
	if !ok || d == "" {
		return fmt.Errorf("synapse config: media_storage_providers[%d] (%s) needs config.directory", i, p.Module)
	}
	d = resolve(dir, d)
	if p.StoreLocal {
		cfg.LocalDirs = append(cfg.LocalDirs, d)
	}
	if p.StoreRemote {
		cfg.RemoteDirs = append(cfg.RemoteDirs, d)
	}
	return nil
}

// resolve makes p absolute against dir.
func resolve(dir, p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	return filepath.Join(dir, p)
}
