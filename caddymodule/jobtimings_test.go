package caddymodule

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func TestJobsCaddyfile(t *testing.T) {
	for i, tc := range []struct {
		input   string
		want    *JobsConfig
		wantErr string
	}{
		{input: `matrix_media {
				jobs {
					lease 3s
					poll_interval 500ms
				}
			}`, want: &JobsConfig{Lease: caddy.Duration(3 * time.Second), PollInterval: caddy.Duration(500 * time.Millisecond)}},
		{input: `matrix_media {
				jobs {
					lease 2m
				}
			}`, want: &JobsConfig{Lease: caddy.Duration(2 * time.Minute)}},
		{input: `matrix_media {
				jobs {
				}
			}`, want: &JobsConfig{}},
		{input: `matrix_media {
				jobs off
			}`, wantErr: "jobs takes a block"},
		{input: `matrix_media {
				jobs {
					lease 0s
				}
			}`, wantErr: "lease must be positive"},
		{input: `matrix_media {
				jobs {
					poll_interval soon
				}
			}`, wantErr: "parsing poll_interval"},
		{input: `matrix_media {
				jobs {
					lease
				}
			}`, wantErr: "wrong argument count"},
		{input: `matrix_media {
				jobs {
					renew 1s
				}
			}`, wantErr: "jobs: unrecognized subdirective 'renew'"},
		{input: `matrix_media {
				jobs {
				}
				jobs {
				}
			}`, wantErr: "jobs specified more than once"},
	} {
		checkAppCaddyfile(t, i, tc.input, tc.wantErr, tc.want, func(a *App) *JobsConfig { return a.Jobs })
	}
}

func TestJobTimingsOf(t *testing.T) {
	d := func(s string) caddy.Duration {
		v, err := time.ParseDuration(s)
		if err != nil {
			t.Fatal(err)
		}
		return caddy.Duration(v)
	}
	for _, tc := range []struct {
		name    string
		in      *JobsConfig
		want    jobTimings
		wantErr string
	}{
		{name: "none", in: nil, want: jobTimings{lease: time.Minute, poll: 30 * time.Second}},
		{name: "empty", in: &JobsConfig{}, want: jobTimings{lease: time.Minute, poll: 30 * time.Second}},
		{name: "short lease, default poll halves it", in: &JobsConfig{Lease: d("3s")}, want: jobTimings{lease: 3 * time.Second, poll: 1500 * time.Millisecond}},
		{name: "long lease keeps the default poll", in: &JobsConfig{Lease: d("10m")}, want: jobTimings{lease: 10 * time.Minute, poll: 30 * time.Second}},
		{name: "both", in: &JobsConfig{Lease: d("3s"), PollInterval: d("500ms")}, want: jobTimings{lease: 3 * time.Second, poll: 500 * time.Millisecond}},
		{name: "smallest", in: &JobsConfig{Lease: d("1s"), PollInterval: d("100ms")}, want: jobTimings{lease: time.Second, poll: 100 * time.Millisecond}},
		{name: "poll with the default lease", in: &JobsConfig{PollInterval: d("5s")}, want: jobTimings{lease: time.Minute, poll: 5 * time.Second}},
		{name: "lease too short", in: &JobsConfig{Lease: d("999ms")}, wantErr: "jobs: lease must be at least 1s, got 999ms"},
		{name: "negative lease", in: &JobsConfig{Lease: d("-1s")}, wantErr: "jobs: lease must be at least 1s"},
		{name: "poll too short", in: &JobsConfig{PollInterval: d("99ms")}, wantErr: "jobs: poll_interval must be at least 100ms, got 99ms"},
		{name: "negative poll", in: &JobsConfig{PollInterval: d("-1s")}, wantErr: "jobs: poll_interval must be at least 100ms"},
		{name: "poll equal to the lease", in: &JobsConfig{Lease: d("3s"), PollInterval: d("3s")}, wantErr: "jobs: poll_interval (3s) must be shorter than the lease (3s)"},
		{name: "poll beyond the default lease", in: &JobsConfig{PollInterval: d("2m")}, wantErr: "jobs: poll_interval (2m0s) must be shorter than the lease (1m0s)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := jobTimingsOf(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("jobTimingsOf = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// The jobs option, in JSON, reaches the job runner; a reload that changes it
// builds a new runner, one that keeps it keeps the runner; an invalid value
// fails the provisioning.
func TestAppJobTimings(t *testing.T) {
	cfg := *testAppConfig(t)
	if err := json.Unmarshal([]byte(`{"jobs":{"lease":"3s","poll_interval":"500ms"}}`), &cfg); err != nil {
		t.Fatal(err)
	}
	first, unloadFirst := provisionApp(t, cfg)
	defer unloadFirst()
	runner := first.res.jobs.runner
	if runner.Lease() != 3*time.Second || runner.PollInterval() != 500*time.Millisecond {
		t.Fatalf("runner lease %v, poll %v; want 3s, 500ms", runner.Lease(), runner.PollInterval())
	}

	same, unloadSame := provisionApp(t, cfg)
	defer unloadSame()
	if same.res != first.res {
		t.Error("a reload with the same jobs option built new resources")
	}

	changed := cfg
	changed.Jobs = &JobsConfig{Lease: caddy.Duration(5 * time.Second)}
	second, unloadSecond := provisionApp(t, changed)
	defer unloadSecond()
	if second.res == first.res {
		t.Fatal("a reload with another lease kept the old runner")
	}
	if r := second.res.jobs.runner; r.Lease() != 5*time.Second || r.PollInterval() != 2500*time.Millisecond {
		t.Errorf("reloaded runner lease %v, poll %v; want 5s, 2.5s", r.Lease(), r.PollInterval())
	}

	defaults, unloadDefaults := provisionApp(t, *testAppConfig(t))
	defer unloadDefaults()
	if r := defaults.res.jobs.runner; r.Lease() != time.Minute || r.PollInterval() != 30*time.Second {
		t.Errorf("default runner lease %v, poll %v; want 1m, 30s", r.Lease(), r.PollInterval())
	}

	ctx, cancel := newCaddyContext(t, nil)
	defer cancel()
	bad := *testAppConfig(t)
	bad.Jobs = &JobsConfig{Lease: caddy.Duration(2 * time.Second), PollInterval: caddy.Duration(2 * time.Second)}
	err := bad.Provision(ctx)
	if cerr := bad.Cleanup(); cerr != nil {
		t.Errorf("cleanup after the failed provisioning: %v", cerr)
	}
	if err == nil || !strings.Contains(err.Error(), "jobs: poll_interval (2s) must be shorter than the lease (2s)") {
		t.Fatalf("provisioning with poll_interval = lease: %v", err)
	}
}
