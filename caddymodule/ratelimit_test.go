package caddymodule

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/ratelimit"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
)

func rule(n int64, w time.Duration) *RateRuleConfig {
	return &RateRuleConfig{Limit: n, Window: caddy.Duration(w)}
}

func TestParseRateLimits(t *testing.T) {
	for i, tc := range []struct {
		input   string
		want    *RateLimitsConfig
		wantErr string
	}{
		{
			input: `rate_limits`,
			want:  &RateLimitsConfig{},
		},
		{
			input: `rate_limits {
				upload per_ip 30/1m burst 60
				upload per_user off
				download 100/10s
				upload_bytes per_user 1GiB/1h burst 100MiB
				failed_auth per_ip 10/1m
				exempt 10.0.0.0/8 192.0.2.1 2001:db8::/32
				exempt_loopback
				exempt_admins
				exempt_appservices
			}`,
			want: &RateLimitsConfig{
				Upload:         &RateClassConfig{PerIP: &RateRuleConfig{Limit: 30, Window: caddy.Duration(time.Minute), Burst: 60}, PerUser: &RateRuleConfig{Off: true}},
				Download:       &RateClassConfig{PerIP: rule(100, 10*time.Second), PerUser: rule(100, 10*time.Second)},
				UploadBytes:    &RateClassConfig{PerUser: &RateRuleConfig{Limit: 1 << 30, Window: caddy.Duration(time.Hour), Burst: 100 << 20}},
				FailedAuth:     &RateClassConfig{PerIP: rule(10, time.Minute)},
				Exempt:         []string{"10.0.0.0/8", "192.0.2.1", "2001:db8::/32"},
				ExemptLoopback: true, ExemptAdmins: true, ExemptAppservices: true,
			},
		},
		{
			input: "rate_limits {\ndownload_bytes per_ip 1.5GiB/1h burst 1,000MB\n}",
			want:  &RateLimitsConfig{DownloadBytes: &RateClassConfig{PerIP: &RateRuleConfig{Limit: 3 << 29, Window: caddy.Duration(time.Hour), Burst: 1e9}}},
		},
		{input: "rate_limits {\nupload_bytes 0/1h\n}", wantErr: "must be between 1 byte and 8EiB"},
		{input: "rate_limits {\nupload_bytes 8EiB/1h\n}", wantErr: "larger than 8 EiB"},
		{input: "rate_limits {\nupload_bytes lots/1h\n}", wantErr: "not a size"},
		{
			input: `rate_limits {
				download per_server 100/1m burst 20
				thumbnail per_server off
			}`,
			want: &RateLimitsConfig{
				Download:  &RateClassConfig{PerServer: &RateRuleConfig{Limit: 100, Window: caddy.Duration(time.Minute), Burst: 20}},
				Thumbnail: &RateClassConfig{PerServer: &RateRuleConfig{Off: true}},
			},
		},
		{input: "rate_limits {\nupload per_server 1/1m\n}", wantErr: "no per_server bucket"},
		{input: "rate_limits {\nuploads 1/1m\n}", wantErr: "unknown class"},
		{input: "rate_limits {\nupload 1\n}", wantErr: "<limit>/<window>"},
		{input: "rate_limits {\nupload 0/1m\n}", wantErr: "invalid count"},
		{input: "rate_limits {\nupload 1/0s\n}", wantErr: "invalid window"},
		{input: "rate_limits {\nupload 10GiB/1h\n}", wantErr: "invalid count"},
		{input: "rate_limits {\nupload 1/1m burst\n}", wantErr: "<limit>/<window>"},
		{input: "rate_limits {\nupload 1/1m bursts 3\n}", wantErr: "want burst"},
		{input: "rate_limits {\nexempt not-a-net\n}", wantErr: "invalid address"},
		{input: "rate_limits {\nexempt\n}", wantErr: "wrong argument count"},
		{input: "rate_limits {\nexempt_admins yes\n}", wantErr: "wrong argument count"},
		{input: `rate_limits extra`, wantErr: "wrong argument count"},
	} {
		d := caddyfile.NewTestDispenser(tc.input)
		d.Next()
		got, err := parseRateLimits(d)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Test %d: err = %v, want %q", i, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("Test %d: %v", i, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			g, _ := json.Marshal(got)
			w, _ := json.Marshal(tc.want)
			t.Errorf("Test %d:\n got %s\nwant %s", i, g, w)
		}
	}
}

// TestHandlerCaddyfileRateLimits checks the block inside the directive.
func TestHandlerCaddyfileRateLimits(t *testing.T) {
	d := caddyfile.NewTestDispenser(`matrix_media {
		server_name example.org
		homeserver http://hs
		rate_limits {
			thumbnail per_ip 5/1s
		}
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	want := &RateLimitsConfig{Thumbnail: &RateClassConfig{PerIP: rule(5, time.Second)}}
	if !reflect.DeepEqual(h.RateLimits, want) {
		t.Fatalf("RateLimits = %+v", h.RateLimits)
	}
	var a App
	if err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`matrix_media {
		rate_limit_keys 5000
	}`)); err != nil || a.RateLimitKeys != 5000 {
		t.Fatalf("rate_limit_keys: %d, %v", a.RateLimitKeys, err)
	}
}

func TestRateLimitsBuild(t *testing.T) {
	l := ratelimit.NewMemory(ratelimit.MemoryOptions{})
	// nil: no limits.
	if rl, err := (*RateLimitsConfig)(nil).build(l); rl != nil || err != nil {
		t.Fatalf("nil config: %v, %v", rl, err)
	}
	// Empty block: the defaults.
	rl, err := (&RateLimitsConfig{}).build(l)
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		class  mediaapi.RateClass
		ip     ratelimit.Rule
		user   ratelimit.Rule
		server ratelimit.Rule
	}{
		{mediaapi.RateUpload, ratelimit.Rule{Rate: 1, Burst: 60}, ratelimit.Rule{Rate: 0.5, Burst: 30}, ratelimit.Rule{}},
		{mediaapi.RateDownload, ratelimit.Rule{Rate: 10, Burst: 600}, ratelimit.Rule{Rate: 10, Burst: 600}, ratelimit.Rule{Rate: 20, Burst: 1200}},
		{mediaapi.RateThumbnail, ratelimit.Rule{Rate: 20, Burst: 1200}, ratelimit.Rule{Rate: 20, Burst: 1200}, ratelimit.Rule{Rate: 40, Burst: 2400}},
		{mediaapi.RateDownloadBytes, ratelimit.Rule{Rate: float64(50<<30) / 3600, Burst: 50 << 30}, ratelimit.Rule{Rate: float64(20<<30) / 3600, Burst: 20 << 30}, ratelimit.Rule{}},
		{mediaapi.RateFailedAuth, ratelimit.Rule{Rate: 0.5, Burst: 30}, ratelimit.Rule{}, ratelimit.Rule{}},
	}
	for _, c := range checks {
		if got := rl.Classes[c.class]; got.PerIP != c.ip || got.PerUser != c.user || got.PerServer != c.server {
			t.Errorf("default %s = %+v, want ip %+v user %+v server %+v", c.class, got, c.ip, c.user, c.server)
		}
	}
	if len(rl.Exempt) != 0 || rl.ExemptAdmins || rl.ExemptAppservices {
		t.Errorf("default exemptions: %+v", rl)
	}
	// Overrides, off, exemptions.
	rl, err = (&RateLimitsConfig{
		Upload:         &RateClassConfig{PerIP: &RateRuleConfig{Off: true}, PerUser: &RateRuleConfig{Limit: 10, Window: caddy.Duration(10 * time.Second), Burst: 3}},
		Exempt:         []string{"192.0.2.0/24", "2001:db8::1"},
		ExemptLoopback: true,
	}).build(l)
	if err != nil {
		t.Fatal(err)
	}
	if got := rl.Classes[mediaapi.RateUpload]; got.PerIP != (ratelimit.Rule{}) || got.PerUser != (ratelimit.Rule{Rate: 1, Burst: 3}) {
		t.Errorf("upload = %+v", got)
	}
	wantNets := []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8::1/128"),
		netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	if !reflect.DeepEqual(rl.Exempt, wantNets) {
		t.Errorf("Exempt = %v, want %v", rl.Exempt, wantNets)
	}
	for i, bad := range []*RateLimitsConfig{
		{Upload: &RateClassConfig{PerIP: &RateRuleConfig{Limit: 1}}},
		{Upload: &RateClassConfig{PerIP: &RateRuleConfig{Window: caddy.Duration(time.Second)}}},
		{Upload: &RateClassConfig{PerIP: &RateRuleConfig{Limit: 1, Window: caddy.Duration(time.Second), Burst: -1}}},
		{FailedAuth: &RateClassConfig{PerUser: rule(1, time.Second)}},
		{Upload: &RateClassConfig{PerServer: rule(1, time.Second)}},
		{Download: &RateClassConfig{PerServer: &RateRuleConfig{Limit: 1}}},
		{Exempt: []string{"300.0.0.1"}},
	} {
		if _, err := bad.build(l); err == nil {
			t.Errorf("bad config %d accepted", i)
		}
	}
}

// TestRateLimitsJSON checks the JSON form (what the docs show).
func TestRateLimitsJSON(t *testing.T) {
	var h Handler
	err := json.Unmarshal([]byte(`{"server_name":"example.org","homeserver":"http://hs","rate_limits":{
		"upload":{"per_ip":{"limit":30,"window":"1m","burst":60},"per_user":{"off":true}},
		"download_bytes":{"per_user":{"limit":1073741824,"window":"1h"}},
		"thumbnail":{"per_server":{"limit":60,"window":"1m"}},
		"exempt":["10.0.0.0/8"],"exempt_admins":true}}`), &h)
	if err != nil {
		t.Fatal(err)
	}
	rl, err := h.RateLimits.build(ratelimit.NewMemory(ratelimit.MemoryOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	if got := rl.Classes[mediaapi.RateUpload]; got.PerIP != (ratelimit.Rule{Rate: 0.5, Burst: 60}) || got.PerUser != (ratelimit.Rule{}) {
		t.Errorf("upload = %+v", got)
	}
	if got := rl.Classes[mediaapi.RateDownloadBytes].PerUser; got != (ratelimit.Rule{Rate: float64(1<<30) / 3600, Burst: 1 << 30}) {
		t.Errorf("download_bytes per_user = %+v", got)
	}
	if got := rl.Classes[mediaapi.RateThumbnail].PerServer; got != (ratelimit.Rule{Rate: 1, Burst: 60}) {
		t.Errorf("thumbnail per_server = %+v", got)
	}
	if !rl.ExemptAdmins || len(rl.Exempt) != 1 {
		t.Errorf("exemptions: %+v", rl)
	}
}
