package caddymodule

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
)

// caddyfileSeeds are Caddyfile snippets for both fuzz targets: valid
// blocks, near misses and lexer edge cases.
var caddyfileSeeds = []string{
	"matrix_media {\n\tserver_name example.org\n\thomeserver http://127.0.0.1:8008\n}",
	"matrix_media {\n\tserver_name example.org:8448\n\thomeserver {env.HS}\n\tmax_upload_size 50MiB\n\tmax_pending_uploads unlimited\n\tfreeze_legacy 2024-09-01T00:00:00Z\n\tadmins @a:example.org @b:example.org\n\tallow_user_export\n\tadmin_token s3cret @admin:example.org\n\tappservice bridge {\n\t\tas_token t\n\t\tsender_localpart bot\n\t\tuser_namespace @bridge_.*\n\t}\n}",
	"matrix_media {\n\tdatabase postgres \"postgres://u@h/db\"\n\tstorage_path /var/lib/media\n\tdatastore s3 {\n\t\tbucket b\n\t\tendpoint http://127.0.0.1:9000\n\t}\n\tthumbnails {\n\t\tsize 32 32 crop\n\t\tmax_frames 10\n\t}\n\tpreviews off\n\tfederation {\n\t\tmax_remote_size 10MiB\n\t}\n}",
	"matrix_media {\n\tmax_upload_size -1\n\tpending_expiry 0s\n\tmax_pending_uploads 99999999999999999999\n}",
	"matrix_media extra {\n}",
	"matrix_media {\n\tthumbnails {\n\t\tsize\n\t}\n\tthumbnails off\n}",
	"matrix_media {\n\tserver_name\n\tserver_name a b\n}",
	"matrix_media {\n\tappservice {\n\t\t{\n\t}\n}",
	"matrix_media",
	"",
	"matrix_media `unterminated",
	"matrix_media {\n\tfreeze_legacy yesterday\n\tsigning_key\n}",
	"matrix_media {\n\tserver_name a.test\n\thomeserver http://hs\n\tquotas {\n\t\texempt_admins\n\t\trule @*:a.test {\n\t\t\tmax_bytes 1GiB\n\t\t\tmax_pending unlimited\n\t\t\twindow 1h max_bytes 0 max_files 3\n\t\t\tinfo_uri https://a.test/q\n\t\t\tcan_upgrade\n\t\t}\n\t}\n}",
	"matrix_media {\n\tquotas {\n\t\trule * {\n\t\t\twindow -1h max_files\n\t\t}\n\t}\n}",
}

// caddyfileDispenser lexes input as Caddyfile tokens. (NewTestDispenser
// exits the process on a lexer error, which a fuzzer finds at once.)
func caddyfileDispenser(t *testing.T, input string) *caddyfile.Dispenser {
	tokens, err := caddyfile.Tokenize([]byte(input), "Caddyfile")
	if err != nil {
		t.Skip() // not a Caddyfile at all: Caddy refuses it before us
	}
	return caddyfile.NewDispenser(tokens)
}

// jsonRoundTrip checks that v, as parsed from input, encodes to JSON that
// decodes into an equal value (what Caddy does with an adapted config).
func jsonRoundTrip[T any](t *testing.T, input string, v *T) {
	t.Helper()
	first, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("%q: parsed value does not encode: %v", input, err)
	}
	var again T
	if err := json.Unmarshal(first, &again); err != nil {
		t.Fatalf("%q: JSON %s does not decode: %v", input, first, err)
	}
	second, err := json.Marshal(&again)
	if err != nil || !bytes.Equal(first, second) {
		t.Fatalf("%q: JSON round trip changed %s into %s (%v)", input, first, second, err)
	}
}

// FuzzHandlerCaddyfile parses arbitrary matrix_media handler blocks: no
// panic, the same answer twice, and an accepted handler survives the JSON
// round trip of an adapted config.
func FuzzHandlerCaddyfile(f *testing.F) {
	for _, s := range caddyfileSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		var h1, h2 Handler
		err1 := h1.UnmarshalCaddyfile(caddyfileDispenser(t, input))
		err2 := h2.UnmarshalCaddyfile(caddyfileDispenser(t, input))
		if (err1 == nil) != (err2 == nil) {
			t.Fatalf("%q: parsed twice, errors %v and %v", input, err1, err2)
		}
		if err1 != nil {
			return
		}
		j1, _ := json.Marshal(&h1)
		j2, _ := json.Marshal(&h2)
		if !bytes.Equal(j1, j2) {
			t.Fatalf("%q: parsed twice into %s and %s", input, j1, j2)
		}
		jsonRoundTrip(t, input, &h1)
	})
}

// FuzzGlobalCaddyfile parses arbitrary matrix_media global options: no
// panic, an accepted option yields the app's JSON that decodes into an App
// and round-trips, and a second occurrence is refused.
func FuzzGlobalCaddyfile(f *testing.F) {
	for _, s := range caddyfileSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		v, err := parseGlobalOption(caddyfileDispenser(t, input), nil)
		if err != nil {
			return
		}
		app, ok := v.(httpcaddyfile.App)
		if !ok || app.Name != "matrix_media" {
			t.Fatalf("%q: global option value %#v", input, v)
		}
		var a App
		if err := json.Unmarshal(app.Value, &a); err != nil {
			t.Fatalf("%q: app JSON %s does not decode: %v", input, app.Value, err)
		}
		jsonRoundTrip(t, input, &a)
		if _, err := parseGlobalOption(caddyfileDispenser(t, input), v); err == nil {
			t.Fatalf("%q: a second matrix_media global option was accepted", input)
		}
	})
}
