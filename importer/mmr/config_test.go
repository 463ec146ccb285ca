package mmr

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// sampleConfig is shaped like matrix-media-repo's config.sample.yaml (with
// the sections an import ignores shortened).
const sampleConfig = `repo:
  bindAddress: '127.0.0.1'
  port: 8000
  logDirectory: logs
federation:
  backoffAt: 20
  ignoredHosts:
    - example.org
database:
  postgres: "postgres://your_username:your_password@localhost/database_name?sslmode=require"
  pool:
    maxConnections: 25
    maxIdleConnections: 5
homeservers:
  - name: example.org
    csApi: "https://example.org/"
    backoffAt: 10
    adminApiKind: "synapse"
  - name: "[::1]:8448"
    csApi: "https://localhost/"
accessTokens:
  maxCacheTimeSeconds: 0
  appservices:
    - id: Name_of_appservice_for_your_reference
      asToken: Secret_token_for_appservices_to_use
      userNamespaces:
        - regex: "@_example_bridge_.+:yourdomain.com"
admins:
  - "@your_username:example.org"
datastores:
  - type: file
    id: "UNIQUE_ID_HERE"
    forKinds: ["thumbnails"]
    opts:
      path: /var/matrix/media
  - type: s3
    id: "ANOTHER_UNIQUE_ID_HERE"
    forKinds: ["thumbnails", "remote_media", "local_media", "archives"]
    opts:
      tempPath: "/tmp/mediarepo_s3_upload"
      endpoint: sfo2.digitaloceanspaces.com
      accessKeyId: ""
      accessSecret: ""
      ssl: true
      bucketName: "your-media-bucket"
      prefixLength: 3
archiving:
  enabled: true
  targetBytesPerPart: 209715200
`

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		files   []string
		want    config
		wantErr string
	}{
		{
			name:  "sample",
			files: []string{sampleConfig},
			want: config{
				DSN:          "postgres://your_username:your_password@localhost/database_name?sslmode=require",
				LocalServers: []string{"[::1]:8448", "example.org"},
				Datastores: []datastoreConfig{
					{ID: "UNIQUE_ID_HERE", Type: "file", Options: map[string]string{"path": "/var/matrix/media"}},
					{ID: "ANOTHER_UNIQUE_ID_HERE", Type: "s3", Options: map[string]string{
						"tempPath": "/tmp/mediarepo_s3_upload", "endpoint": "sfo2.digitaloceanspaces.com",
						"accessKeyId": "", "accessSecret": "", "ssl": "true", "bucketName": "your-media-bucket", "prefixLength": "3",
					}},
				},
			},
		},
		{
			// A configuration directory: later files replace top-level
			// keys; per-domain files add their server and datastores.
			name: "directory",
			files: []string{
				sampleConfig,
				"datastores:\n  - type: file\n    id: main2\n    opts:\n      path: /srv/media\n",
				"homeserver: third.example\ndatastores:\n  - type: file\n    id: main2\n    opts:\n      path: /srv/media\n" +
					"  - type: file\n    id: third\n    opts:\n      path: /srv/third\n",
				"homeserver: fourth.example\nuploads:\n  maxBytes: 10\n",
			},
			want: config{
				DSN:          "postgres://your_username:your_password@localhost/database_name?sslmode=require",
				LocalServers: []string{"[::1]:8448", "example.org", "fourth.example", "third.example"},
				Datastores: []datastoreConfig{
					{ID: "main2", Type: "file", Options: map[string]string{"path": "/srv/media"}},
					{ID: "third", Type: "file", Options: map[string]string{"path": "/srv/third"}},
				},
			},
		},
		{
			name:  "datastores without ids",
			files: []string{"database: {postgres: x}\nhomeservers: [{name: a.example}]\ndatastores:\n  - {type: file, opts: {path: /a}}\n  - {type: file, opts: {path: /a}}\n  - {type: ipfs, opts: {}}\n"},
			want: config{DSN: "x", LocalServers: []string{"a.example"}, Datastores: []datastoreConfig{
				{Type: "file", Options: map[string]string{"path": "/a"}},
				{Type: "ipfs", Options: map[string]string{}},
			}},
		},
		{name: "empty", files: []string{""}, wantErr: "database.postgres is not set"},
		{name: "no homeservers", files: []string{"database: {postgres: x}\n"}, wantErr: "no homeservers"},
		{name: "bad server name", files: []string{"database: {postgres: x}\nhomeservers: [{name: 'bad name'}]\n"}, wantErr: "not a server name"},
		{name: "bad domain name", files: []string{"database: {postgres: x}\nhomeservers: [{name: a.example}]\n", "homeserver: 'x/y'\n"}, wantErr: "not a server name"},
		{name: "file without path", files: []string{"database: {postgres: x}\nhomeservers: [{name: a.example}]\ndatastores: [{type: file, id: f}]\n"}, wantErr: "opts.path"},
		{name: "s3 without bucket", files: []string{"database: {postgres: x}\nhomeservers: [{name: a.example}]\ndatastores: [{type: s3, id: s, opts: {endpoint: e}}]\n"}, wantErr: "opts.bucketName"},
		{name: "one id, two datastores", files: []string{"database: {postgres: x}\nhomeservers: [{name: a.example}]\ndatastores: [{type: file, id: f, opts: {path: /a}}]\n",
			"homeserver: b.example\ndatastores: [{type: file, id: f, opts: {path: /b}}]\n"}, wantErr: "defined twice"},
		{name: "not YAML", files: []string{"database: [\n"}, wantErr: "parsing"},
		{name: "homeservers not a list", files: []string{"database: {postgres: x}\nhomeservers: example.org\n"}, wantErr: "homeservers"},
		{name: "nested opts", files: []string{"database: {postgres: x}\nhomeservers: [{name: a.example}]\ndatastores: [{type: file, id: f, opts: {path: [1]}}]\n"}, wantErr: "datastores"},
		{name: "duplicate key", files: []string{"database: {postgres: x}\ndatabase: {postgres: y}\n"}, wantErr: "already defined"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var files []configFile
			for i, f := range tc.files {
				files = append(files, configFile{Name: string(rune('a'+i)) + ".yaml", Data: []byte(f)})
			}
			got, err := parseConfig(files)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseConfig: %v, want an error mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseConfig: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("parseConfig:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestLoadConfigDirectory(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Read in name order: 20 overrides 10's database; subdirectories are
	// skipped.
	write("20-db.yaml", "database: {postgres: second}\n")
	write("10-main.yaml", "database: {postgres: first}\nhomeservers: [{name: a.example}]\n")
	write("30-domain.yaml", "homeserver: b.example\n")
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o700); err != nil {
		t.Fatal(err)
	}
	got, err := loadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.DSN != "second" || !slices.Equal(got.LocalServers, []string{"a.example", "b.example"}) {
		t.Errorf("loadConfig(dir) = %+v", got)
	}

	t.Run("too large", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "big.yaml")
		big := "database: {postgres: x}\nhomeservers: [{name: a.example}]\n# " + strings.Repeat("x", maxConfigBytes) + "\n"
		if err := os.WriteFile(p, []byte(big), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := loadConfig(p); err == nil || !strings.Contains(err.Error(), "larger than") {
			t.Errorf("loadConfig: %v, want a size error", err)
		}
	})
	t.Run("too many files", func(t *testing.T) {
		d := t.TempDir()
		for i := 0; i <= maxConfigFiles; i++ {
			if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("f%04d.yaml", i)), nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := loadConfig(d); err == nil || !strings.Contains(err.Error(), "files, more than") {
			t.Errorf("loadConfig: %v, want a file count error", err)
		}
	})
}

func TestParseS3Options(t *testing.T) {
	tests := []struct {
		name    string
		opts    map[string]string
		want    s3Options
		wantErr string
	}{
		{"defaults", map[string]string{"endpoint": "sfo2.digitaloceanspaces.com", "bucketName": "b"},
			s3Options{endpoint: "sfo2.digitaloceanspaces.com", bucket: "b", secure: true, region: "us-east-1"}, ""},
		{"all set", map[string]string{"endpoint": "127.0.0.1:9000", "bucketName": "b", "accessKeyId": "k", "accessSecret": "s", "ssl": "false", "region": "fr-par"},
			s3Options{endpoint: "127.0.0.1:9000", bucket: "b", accessKey: "k", secret: "s", secure: false, region: "fr-par"}, ""},
		{"aws region from endpoint", map[string]string{"endpoint": "s3.eu-west-1.amazonaws.com", "bucketName": "b", "ssl": "True"},
			s3Options{endpoint: "s3.eu-west-1.amazonaws.com", bucket: "b", secure: true, region: "eu-west-1"}, ""},
		{"scheme", map[string]string{"endpoint": "https://s3.example", "bucketName": "b"}, s3Options{}, "endpoint"},
		{"path", map[string]string{"endpoint": "s3.example/bucket", "bucketName": "b"}, s3Options{}, "endpoint"},
		{"bad ssl", map[string]string{"endpoint": "s3.example", "bucketName": "b", "ssl": "sometimes"}, s3Options{}, "ssl"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseS3Options(tc.opts)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseS3Options: %v, want an error mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("parseS3Options = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestAWSRegion(t *testing.T) {
	for endpoint, want := range map[string]string{
		"s3.amazonaws.com":                        "us-east-1",
		"s3.eu-central-1.amazonaws.com":           "eu-central-1",
		"s3-ap-southeast-2.amazonaws.com":         "ap-southeast-2",
		"s3.dualstack.us-west-2.amazonaws.com":    "us-west-2",
		"s3.us-gov-west-1.amazonaws.com:443":      "us-gov-west-1",
		"s3-external-1.amazonaws.com":             "us-east-1",
		"s3-accelerate.amazonaws.com":             "us-east-1",
		"bucket.s3.amazonaws.com":                 "us-east-1",
		"ec2.amazonaws.com":                       "us-east-1",
		"sfo2.digitaloceanspaces.com":             "us-east-1",
		"minio.internal:9000":                     "us-east-1",
		"S3.EU-WEST-3.AMAZONAWS.COM":              "eu-west-3",
		"s3.eu-west-1.amazonaws.com.evil.example": "us-east-1",
	} {
		if got := awsRegion(endpoint); got != want {
			t.Errorf("awsRegion(%q) = %q, want %q", endpoint, got, want)
		}
	}
}

func TestVirtualHosted(t *testing.T) {
	tests := []struct {
		endpoint, bucket string
		secure, want     bool
	}{
		{"s3.amazonaws.com", "media", true, true},
		{"s3.eu-west-1.amazonaws.com", "media", true, true},
		{"s3.eu-west-1.amazonaws.com", "media.example.org", true, false},
		{"s3.eu-west-1.amazonaws.com", "media.example.org", false, true},
		{"storage.googleapis.com", "media", true, true},
		{"oss-cn-hangzhou.aliyuncs.com", "media", true, true},
		{"sfo2.digitaloceanspaces.com", "media", true, false},
		{"127.0.0.1:9000", "media", false, false},
		{"minio.example:9000", "media", true, false},
	}
	for _, tc := range tests {
		if got := virtualHosted(tc.endpoint, tc.bucket, tc.secure); got != tc.want {
			t.Errorf("virtualHosted(%q, %q, %v) = %v, want %v", tc.endpoint, tc.bucket, tc.secure, got, tc.want)
		}
	}
}

func TestLegacyURI(t *testing.T) {
	tests := []struct {
		d    datastoreConfig
		want string
	}{
		{datastoreConfig{Type: "file", Options: map[string]string{"path": "/var/matrix/media"}}, "/var/matrix/media"},
		{datastoreConfig{Type: "s3", Options: map[string]string{"endpoint": "s3.example", "bucketName": "b"}}, "s3://s3.example/b"},
		{datastoreConfig{Type: "s3", Options: map[string]string{"endpoint": "s3.example", "bucketName": "b", "region": "nl-ams"}}, "s3://s3.example/b?region=nl-ams"},
		{datastoreConfig{Type: "s3", Options: map[string]string{"endpoint": "s3.example", "bucketName": "b", "region": ""}}, "s3://s3.example/b?region="},
		{datastoreConfig{Type: "ipfs"}, "ipfs://localhost"},
	}
	for _, tc := range tests {
		if got := legacyURI(tc.d); got != tc.want {
			t.Errorf("legacyURI(%+v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

// FuzzConfig feeds arbitrary bytes to the configuration parser, as one
// file and as the second file of a directory: it must return a checked
// configuration or an error, never panic.
func FuzzConfig(f *testing.F) {
	f.Add([]byte(sampleConfig), []byte("homeserver: b.example\n"))
	f.Add([]byte("database: {postgres: x}\nhomeservers: [{name: a.example}]\n"), []byte("datastores: [{type: s3, id: s, opts: {endpoint: e, bucketName: b}}]\n"))
	f.Add([]byte("a: &a [*a, *a]\n"), []byte(""))
	f.Add([]byte("homeserver: 7\n"), []byte("homeserver: {x: y}\n"))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		for _, files := range [][]configFile{{{Name: "a", Data: a}}, {{Name: "a", Data: a}, {Name: "b", Data: b}}} {
			c, err := parseConfig(files)
			if err != nil {
				continue
			}
			if c.DSN == "" || len(c.LocalServers) == 0 || !slices.IsSorted(c.LocalServers) {
				t.Fatalf("parseConfig accepted %+v", c)
			}
			for _, d := range c.Datastores {
				if err := checkDatastore(d); err != nil {
					t.Fatalf("parseConfig accepted datastore %+v: %v", d, err)
				}
			}
		}
	})
}
