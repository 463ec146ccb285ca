// Package grafana holds the Grafana dashboard of the module
// (matrix-media.json); its test checks that the file is a dashboard
// Grafana's published schema accepts.
package grafana

import (
	"encoding/json"
	"errors"
	"os"
	"regexp"
	"slices"
	"testing"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

// TestDashboardMatchesGrafanaSchema decodes the dashboard strictly with the
// types Grafana generates from its dashboard schema (grafana-foundation-sdk):
// an unknown field, a missing required field or a value of the wrong type
// fails, as do panel options the panel plugins' schemas refuse. The sharing
// fields of Grafana's "export for sharing externally" format (__inputs,
// __requires), which the import dialog reads and the schema does not
// model, are checked apart: every ${DS_…} input is declared and used.
func TestDashboardMatchesGrafanaSchema(t *testing.T) {
	raw, err := os.ReadFile("matrix-media.json")
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		t.Fatal(err)
	}
	var inputs []struct {
		Name, Type, PluginID string
	}
	if err := json.Unmarshal(fields["__inputs"], &inputs); err != nil {
		t.Fatalf("__inputs: %v", err)
	}
	var requires []struct{ Type, ID, Version string }
	if err := json.Unmarshal(fields["__requires"], &requires); err != nil {
		t.Fatalf("__requires: %v", err)
	}
	delete(fields, "__inputs")
	delete(fields, "__requires")
	rest, err := json.Marshal(fields)
	if err != nil {
		t.Fatal(err)
	}

	used := map[string]bool{}
	for _, m := range regexp.MustCompile(`\$\{(DS_[A-Z0-9_]+)\}`).FindAllStringSubmatch(string(rest), -1) {
		used[m[1]] = true
	}
	declared := map[string]bool{}
	for _, in := range inputs {
		declared[in.Name] = true
		if in.Type != "datasource" || in.PluginID != "prometheus" {
			t.Errorf("input %s: type %q plugin %q, want a prometheus datasource", in.Name, in.Type, in.PluginID)
		}
		if !used[in.Name] {
			t.Errorf("input %s is declared but never used", in.Name)
		}
	}
	for name := range used {
		if !declared[name] {
			t.Errorf("${%s} is used but not declared in __inputs", name)
		}
	}
	if !slices.ContainsFunc(requires, func(r struct{ Type, ID, Version string }) bool {
		return r.ID == "grafana" && r.Version >= "10"
	}) {
		t.Errorf("__requires %+v: want grafana 10 or later", requires)
	}

	plugins.RegisterDefaultPlugins()
	//lint:ignore SA1019 the file is a classic (schemaVersion 38+) dashboard, the JSON model Grafana 10 and later import; dashboardv2 is the newer v2 resource format
	var d dashboard.Dashboard
	if err := d.UnmarshalJSONStrict(rest); failed(err) {
		t.Fatalf("the dashboard does not match Grafana's schema:\n%v", err)
	}
	if err := d.Validate(); failed(err) {
		t.Fatalf("the dashboard fails Grafana's schema validation:\n%v", err)
	}
	if len(d.Panels) < 30 {
		t.Errorf("%d panels decoded, want the whole dashboard", len(d.Panels))
	}
}

// failed reports whether err is an error: the SDK returns its error list
// type, empty and typed, when nothing failed.
func failed(err error) bool {
	var list cog.BuildErrors
	if errors.As(err, &list) {
		return len(list) > 0
	}
	return err != nil
}
