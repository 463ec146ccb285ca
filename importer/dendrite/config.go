package dendrite

import (
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// MaxConfigBytes bounds the size of the dendrite.yaml Open reads. Dendrite's
// sample configuration is about 20 KiB.
const MaxConfigBytes = 1 << 20

// configVersion is the only dendrite.yaml format version Dendrite v0.13.8
// loads.
const configVersion = 2

// ErrConfig is wrapped by every error about the content of dendrite.yaml.
var ErrConfig = errors.New("invalid dendrite configuration")

// dbKind is the kind of database a connection string names.
type dbKind int

const (
	kindSQLite dbKind = iota + 1
	kindPostgres
)

// config is what the importer needs from dendrite.yaml, resolved: paths are
// absolute.
type config struct {
	// serverName is global.server_name: media of this origin is local.
	serverName string
	// kind is the media API database's kind.
	kind dbKind
	// sqlitePath is the absolute path of the SQLite database file (kindSQLite).
	sqlitePath string
	// postgresDSN is the PostgreSQL connection string (kindPostgres).
	postgresDSN string
	// basePath is media_api.base_path, absolute and clean.
	basePath string
}

// fileConfig is the part of dendrite.yaml the importer reads; everything
// else is ignored.
type fileConfig struct {
	Version int `yaml:"version"`
	Global  struct {
		ServerName string          `yaml:"server_name"`
		Database   databaseOptions `yaml:"database"`
	} `yaml:"global"`
	MediaAPI struct {
		Database databaseOptions `yaml:"database"`
		BasePath string          `yaml:"base_path"`
	} `yaml:"media_api"`
}

// databaseOptions is a component's (or the global) database block.
type databaseOptions struct {
	ConnectionString string `yaml:"connection_string"`
}

// readConfigFile reads at most MaxConfigBytes of path.
func readConfigFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening the dendrite config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxConfigBytes+1))
	if err != nil {
		return nil, fmt.Errorf("reading the dendrite config %s: %w", path, err)
	}
	if len(data) > MaxConfigBytes {
		return nil, fmt.Errorf("the dendrite config %s: %w: larger than %d bytes", path, ErrConfig, MaxConfigBytes)
	}
	return data, nil
}

// parseConfig decodes dendrite.yaml and resolves it as Dendrite v0.13.8
// would when started in workDir (an absolute directory): the media API's
// own database, else the global one; relative paths against workDir.
func parseConfig(data []byte, workDir string) (config, error) {
	var fc fileConfig
	if err := yaml.Unmarshal(data, &fc); err != nil {
		return config{}, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if fc.Version != configVersion {
		return config{}, fmt.Errorf("%w: version is %d, want %d (is this a dendrite.yaml?)", ErrConfig, fc.Version, configVersion)
	}
	c := config{serverName: fc.Global.ServerName}
	if !matrix.ValidServerName(c.serverName) {
		return config{}, fmt.Errorf("%w: global.server_name %q is not a server name", ErrConfig, c.serverName)
	}
	if err := c.resolveDatabase(fc, workDir); err != nil {
		return config{}, err
	}
	if fc.MediaAPI.BasePath == "" {
		return config{}, fmt.Errorf("%w: media_api.base_path is empty", ErrConfig)
	}
	c.basePath = absPath(workDir, fc.MediaAPI.BasePath)
	return c, nil
}

// resolveDatabase picks the media API's connection string as Dendrite's
// connection manager does (its own when set, else global.database's) and
// classifies it as Dendrite does: "file:" is SQLite, anything else
// PostgreSQL (we accept only the forms lib/pq would: a postgres:// or
// postgresql:// URL, or key=value pairs).
func (c *config) resolveDatabase(fc fileConfig, workDir string) error {
	cs, field := fc.MediaAPI.Database.ConnectionString, "media_api.database.connection_string"
	if cs == "" {
		cs, field = fc.Global.Database.ConnectionString, "global.database.connection_string"
	}
	switch {
	case cs == "":
		return fmt.Errorf("%w: neither media_api.database.connection_string nor global.database.connection_string is set", ErrConfig)
	case strings.HasPrefix(cs, "file:"):
		p, err := sqliteFile(cs)
		if err != nil {
			return fmt.Errorf("%w: %s: %w", ErrConfig, field, err)
		}
		c.kind, c.sqlitePath = kindSQLite, absPath(workDir, p)
	case strings.HasPrefix(cs, "postgres://"), strings.HasPrefix(cs, "postgresql://"), strings.Contains(cs, "="):
		c.kind, c.postgresDSN = kindPostgres, cs
	default:
		return fmt.Errorf("%w: %s is neither file:... (SQLite) nor a PostgreSQL connection string", ErrConfig, field)
	}
	return nil
}

// sqliteFile returns the file a "file:" connection string names, as
// Dendrite's ParseFileURI does: "file:name.db" (relative, taken verbatim up
// to a '?') or "file:///abs/name.db" (the URL's decoded path). Query
// parameters are dropped, as Dendrite drops them.
func sqliteFile(cs string) (string, error) {
	u, err := url.Parse(cs)
	if err != nil {
		return "", fmt.Errorf("parsing the SQLite URI: %w", err)
	}
	var p string
	switch {
	case u.Opaque != "":
		p = u.Opaque
	case u.Path != "":
		p = u.Path
	default:
		return "", errors.New("the SQLite URI names no file")
	}
	if strings.IndexByte(p, 0) >= 0 {
		return "", errors.New("the SQLite file name has a NUL byte")
	}
	return p, nil
}

// absPath resolves p against dir (absolute) and cleans it, as Dendrite does.
func absPath(dir, p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	return filepath.Join(dir, p)
}
