package mmr

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"gopkg.in/yaml.v3"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// Limits on the configuration read by Open.
const (
	// maxConfigBytes bounds one configuration file. matrix-media-repo's
	// sample configuration, comments included, is about 40 KiB.
	maxConfigBytes = 1 << 20
	// maxConfigFiles bounds the files of a configuration directory.
	maxConfigFiles = 256
)

// Datastore types matrix-media-repo knows.
const (
	typeFile = "file"
	typeS3   = "s3"
)

// config is what an import needs from matrix-media-repo's configuration.
type config struct {
	// DSN is database.postgres: a PostgreSQL connection string.
	DSN string
	// LocalServers are the server names the media repository serves
	// (homeservers[].name and the names of per-domain configuration
	// files), sorted and unique. Media of any other origin is remote cache.
	LocalServers []string
	// Datastores are every datastore configured, in the main configuration
	// and in per-domain ones, each once.
	Datastores []datastoreConfig
}

// datastoreConfig is one entry of a datastores: list.
type datastoreConfig struct {
	// ID is the datastore's id, the value of media.datastore_id for the
	// media it holds. Empty in configurations older than
	// matrix-media-repo 1.3, where the datastores table names it.
	ID string `yaml:"id"`
	// Type is "file" or "s3" (older versions also knew "ipfs").
	Type string `yaml:"type"`
	// Options are the datastore's opts: map (path for a file datastore;
	// endpoint, bucketName, accessKeyId, accessSecret, ssl, region, ... for
	// S3).
	Options map[string]string `yaml:"opts"`
}

// configFile is one configuration file's name and content.
type configFile struct {
	Name string
	Data []byte
}

// loadConfig reads matrix-media-repo's configuration at path: a file, or a
// directory whose files are read in name order, as matrix-media-repo does.
func loadConfig(path string) (config, error) {
	files, err := readConfigFiles(path)
	if err != nil {
		return config{}, err
	}
	return parseConfig(files)
}

// readConfigFiles returns the file at path, or the regular files of the
// directory at path sorted by name, each at most maxConfigBytes long.
func readConfigFiles(path string) ([]configFile, error) {
	info, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("reading matrix-media-repo config: %w", err)
	}
	if !info.IsDir() {
		f, err := readConfigFile(path)
		if err != nil {
			return nil, err
		}
		return []configFile{f}, nil
	}
	entries, err := os.ReadDir(path)
	if err != nil {
		return nil, fmt.Errorf("reading matrix-media-repo config directory: %w", err)
	}
	var names []string
	for _, e := range entries {
		p := filepath.Join(path, e.Name())
		st, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("reading matrix-media-repo config: %w", err)
		}
		if st.IsDir() {
			continue
		}
		names = append(names, p)
	}
	if len(names) > maxConfigFiles {
		return nil, fmt.Errorf("reading matrix-media-repo config directory %s: %d files, more than %d", path, len(names), maxConfigFiles)
	}
	sort.Strings(names)
	files := make([]configFile, 0, len(names))
	for _, n := range names {
		f, err := readConfigFile(n)
		if err != nil {
			return nil, err
		}
		files = append(files, f)
	}
	return files, nil
}

// readConfigFile reads one configuration file of at most maxConfigBytes.
func readConfigFile(path string) (configFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return configFile{}, fmt.Errorf("reading matrix-media-repo config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigBytes+1))
	if err != nil {
		return configFile{}, fmt.Errorf("reading matrix-media-repo config %s: %w", path, err)
	}
	if len(data) > maxConfigBytes {
		return configFile{}, fmt.Errorf("reading matrix-media-repo config %s: larger than %d bytes", path, maxConfigBytes)
	}
	return configFile{Name: path, Data: data}, nil
}

// parseConfig builds the configuration from files in order. As in
// matrix-media-repo, a file with a top-level string "homeserver" is a
// per-domain configuration (its server is local, its datastores are used
// for its media); every other file is laid over the ones before it, each
// top-level key replacing the same key of earlier files.
func parseConfig(files []configFile) (config, error) {
	main := map[string]yaml.Node{}
	var domains []domainFile
	for _, f := range files {
		top, err := decodeTop(f)
		if err != nil {
			return config{}, err
		}
		if name, ok := domainName(top); ok {
			domains = append(domains, domainFile{file: f.Name, name: name, top: top})
			continue
		}
		for k, v := range top {
			main[k] = v
		}
	}
	return buildConfig(main, domains)
}

// domainFile is a per-domain configuration file.
type domainFile struct {
	file string
	name string
	top  map[string]yaml.Node
}

// decodeTop decodes a file's top-level mapping. An empty file is an empty
// mapping.
func decodeTop(f configFile) (map[string]yaml.Node, error) {
	top := map[string]yaml.Node{}
	if err := yaml.Unmarshal(f.Data, &top); err != nil {
		return nil, fmt.Errorf("parsing matrix-media-repo config %s: %w", f.Name, err)
	}
	return top, nil
}

// domainName returns the value of a top-level string "homeserver" key.
func domainName(top map[string]yaml.Node) (string, bool) {
	n, ok := top["homeserver"]
	if !ok || n.Kind != yaml.ScalarNode || n.ShortTag() != "!!str" {
		return "", false
	}
	return n.Value, true
}

// mainYAML is the part of the main configuration an import reads.
type mainYAML struct {
	Database struct {
		Postgres string `yaml:"postgres"`
	} `yaml:"database"`
	Homeservers []struct {
		Name string `yaml:"name"`
	} `yaml:"homeservers"`
	Datastores []datastoreConfig `yaml:"datastores"`
}

// buildConfig decodes the merged main configuration and the per-domain
// ones and checks them.
func buildConfig(main map[string]yaml.Node, domains []domainFile) (config, error) {
	var m mainYAML
	if err := decodeKeys(main, "main configuration",
		keyTarget{"database", &m.Database}, keyTarget{"homeservers", &m.Homeservers}, keyTarget{"datastores", &m.Datastores}); err != nil {
		return config{}, err
	}
	if m.Database.Postgres == "" {
		return config{}, errors.New("matrix-media-repo config: database.postgres is not set")
	}
	c := config{DSN: m.Database.Postgres}
	for _, hs := range m.Homeservers {
		c.LocalServers = append(c.LocalServers, hs.Name)
	}
	all := [][]datastoreConfig{m.Datastores}
	for _, d := range domains {
		c.LocalServers = append(c.LocalServers, d.name)
		var ds []datastoreConfig
		if err := decodeKeys(d.top, d.file, keyTarget{"datastores", &ds}); err != nil {
			return config{}, err
		}
		all = append(all, ds)
	}
	if err := checkServers(c.LocalServers); err != nil {
		return config{}, err
	}
	slices.Sort(c.LocalServers)
	c.LocalServers = slices.Compact(c.LocalServers)
	var err error
	if c.Datastores, err = mergeDatastores(all); err != nil {
		return config{}, err
	}
	return c, nil
}

// keyTarget is a top-level key and the pointer its value is decoded into.
type keyTarget struct {
	key  string
	into any
}

// decodeKeys decodes top-level keys of top into their targets. Absent keys
// leave their target as it is.
func decodeKeys(top map[string]yaml.Node, where string, targets ...keyTarget) error {
	for _, t := range targets {
		n, ok := top[t.key]
		if !ok {
			continue
		}
		if err := n.Decode(t.into); err != nil {
			return fmt.Errorf("matrix-media-repo config (%s): %s: %w", where, t.key, err)
		}
	}
	return nil
}

// checkServers checks that there is at least one local server and that
// every name is a server name.
func checkServers(names []string) error {
	if len(names) == 0 {
		return errors.New("matrix-media-repo config: no homeservers configured")
	}
	for _, n := range names {
		if !matrix.ValidServerName(n) {
			return fmt.Errorf("matrix-media-repo config: homeserver %q is not a server name", n)
		}
	}
	return nil
}

// mergeDatastores checks every datastore and returns each once. The same
// id defined twice alike (a per-domain configuration repeating the main
// list) is one datastore; defined differently, it is an error, since the
// media naming it could be in either. Datastores without an id are kept
// each once.
func mergeDatastores(lists [][]datastoreConfig) ([]datastoreConfig, error) {
	var out []datastoreConfig
	for _, list := range lists {
		for _, d := range list {
			if err := checkDatastore(d); err != nil {
				return nil, err
			}
			if i := slices.IndexFunc(out, func(o datastoreConfig) bool { return sameDatastore(o, d) }); i >= 0 {
				if d.ID != "" && !equalDatastore(out[i], d) {
					return nil, fmt.Errorf("matrix-media-repo config: datastore %q is defined twice, differently", d.ID)
				}
				continue
			}
			out = append(out, d)
		}
	}
	return out, nil
}

// sameDatastore reports whether a and b name the same datastore: the same
// id, or, without ids, the same definition.
func sameDatastore(a, b datastoreConfig) bool {
	if a.ID != "" || b.ID != "" {
		return a.ID == b.ID
	}
	return equalDatastore(a, b)
}

// equalDatastore reports whether a and b have the same type and options.
func equalDatastore(a, b datastoreConfig) bool {
	if a.Type != b.Type || len(a.Options) != len(b.Options) {
		return false
	}
	for k, v := range a.Options {
		if w, ok := b.Options[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// checkDatastore checks the options a datastore of a known type needs.
// Datastores of other types are kept: reading their media reports the
// type as unsupported.
func checkDatastore(d datastoreConfig) error {
	need := map[string][]string{typeFile: {"path"}, typeS3: {"endpoint", "bucketName"}}[d.Type]
	for _, k := range need {
		if d.Options[k] == "" {
			return fmt.Errorf("matrix-media-repo config: %s datastore %q: opts.%s is not set", d.Type, d.ID, k)
		}
	}
	return nil
}
