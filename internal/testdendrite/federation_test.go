package testdendrite

import (
	"strings"
	"testing"
	"time"
)

func TestConfigYAMLFederation(t *testing.T) {
	tests := []struct {
		name   string
		opts   Options
		want   []string
		absent []string
	}{
		{
			name: "default: federation off",
			opts: Options{ServerName: "localhost", SharedSecret: "s"},
			want: []string{
				"disable_federation: true",
				"disable_tls_validation: false",
				"key_validity_period: 168h0m0s",
				"metrics:\n    enabled: false",
			},
		},
		{
			name: "federation without TLS validation, metrics",
			opts: Options{ServerName: "127.0.0.1:8448", SharedSecret: "s", Metrics: true, Federation: &FederationOptions{
				CertFile: "c.pem", KeyFile: "k.pem", DisableTLSValidation: true, KeyValidityPeriod: time.Hour,
			}},
			want: []string{
				`server_name: "127.0.0.1:8448"`,
				"disable_federation: false",
				"disable_tls_validation: true",
				"key_validity_period: 1h0m0s",
				"metrics:\n    enabled: true",
				"key_perspectives: []",
			},
			absent: []string{"disable_federation: true"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			y := configYAML("/tmp/x", "/tmp/x/key.pem", tc.opts)
			for _, w := range tc.want {
				if !strings.Contains(y, w) {
					t.Errorf("config lacks %q", w)
				}
			}
			for _, a := range tc.absent {
				if strings.Contains(y, a) {
					t.Errorf("config has %q", a)
				}
			}
		})
	}
}
