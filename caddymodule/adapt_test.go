package caddymodule

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"
)

// TestCaddyfileAdapt adapts every testdata/*.caddyfiletest Caddyfile (the part
// above the "----------" line) and compares the JSON with the part below.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "*.caddyfiletest"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no testdata/*.caddyfiletest files")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			caddyfile, want, ok := strings.Cut(string(data), "\n----------\n")
			if !ok {
				t.Fatalf("%s: no ---------- separator line", f)
			}
			if !caddytest.CompareAdapt(t, f, caddyfile, "caddyfile", strings.TrimRight(want, "\n")) {
				t.Errorf("%s: adapted JSON differs from the expected JSON (diff above)", f)
			}
		})
	}
}

// TestExampleCaddyfileAdapts keeps the repository's Caddyfile.example valid:
// it must adapt without warnings and configure both the app and the handler.
func TestExampleCaddyfileAdapts(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(data, nil)
	if err != nil {
		t.Fatalf("adapting Caddyfile.example: %v", err)
	}
	if len(warnings) > 0 {
		t.Errorf("adapting Caddyfile.example: warnings %+v", warnings)
	}
	var cfg struct {
		Apps struct {
			MatrixMedia *App `json:"matrix_media"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatalf("decoding adapted config: %v", err)
	}
	want := &App{
		Database: &Database{Driver: DriverSQLite}, MediaCacheSize: DefaultMediaCacheSize, MaxUploadSize: DefaultMaxUploadSize,
		TokenCacheSize: auth.DefaultTokenCacheSize, TokenCacheTTL: caddy.Duration(auth.DefaultTokenTTL),
		TokenNegativeTTL: caddy.Duration(auth.DefaultNegativeTokenTTL),
		BreakerThreshold: auth.DefaultBreakerThreshold, BreakerCooldown: caddy.Duration(auth.DefaultBreakerCooldown),
	}
	if !reflect.DeepEqual(cfg.Apps.MatrixMedia, want) {
		t.Errorf("matrix_media app = %+v, want the documented defaults %+v", cfg.Apps.MatrixMedia, want)
	}
	for _, s := range []string{`"handler":"matrix_media"`, `"server_name":"localhost"`, `"homeserver":"http://127.0.0.1:8008"`, `"handler":"reverse_proxy"`} {
		if !strings.Contains(string(out), s) {
			t.Errorf("adapted Caddyfile.example lacks %s:\n%s", s, out)
		}
	}
}
