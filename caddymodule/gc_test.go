package caddymodule

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func TestGCCaddyfile(t *testing.T) {
	for i, tc := range []struct {
		input   string
		want    *GCConfig
		wantErr string
	}{
		{input: `matrix_media {
				gc off
			}`, want: &GCConfig{Off: true}},
		{input: `matrix_media {
				gc {
					interval 10m
					grace 2h
				}
			}`, want: &GCConfig{Interval: caddy.Duration(10 * time.Minute), Grace: caddy.Duration(2 * time.Hour)}},
		{input: `matrix_media {
				gc {
					off
				}
			}`, want: &GCConfig{Off: true}},
		{input: `matrix_media {
				gc on
			}`, wantErr: "gc takes a block, or 'off'"},
		{input: `matrix_media {
				gc {
					grace -1s
				}
			}`, wantErr: "grace"},
		{input: `matrix_media {
				gc {
					every 1h
				}
			}`, wantErr: "gc: unrecognized subdirective 'every'"},
		{input: `matrix_media {
				gc off
				gc off
			}`, wantErr: "gc specified more than once"},
	} {
		checkAppCaddyfile(t, i, tc.input, tc.wantErr, tc.want, func(a *App) *GCConfig { return a.GC })
	}
}

func TestGCPolicyDefaults(t *testing.T) {
	for i, tc := range []struct {
		in      *GCConfig
		want    gcPolicy
		wantErr bool
	}{
		{in: nil, want: gcPolicy{interval: time.Hour, grace: time.Hour}},
		{in: &GCConfig{}, want: gcPolicy{interval: time.Hour, grace: time.Hour}},
		{in: &GCConfig{Interval: caddy.Duration(time.Minute), Grace: caddy.Duration(time.Second), Off: true},
			want: gcPolicy{interval: time.Minute, grace: time.Second, off: true}},
		{in: &GCConfig{Grace: -1}, wantErr: true},
	} {
		got, err := gcPolicyOf(tc.in)
		if (err != nil) != tc.wantErr || (!tc.wantErr && got != tc.want) {
			t.Errorf("Test %d: gcPolicyOf(%+v) = %+v, %v; want %+v (error %v)", i, tc.in, got, err, tc.want, tc.wantErr)
		}
	}
}
