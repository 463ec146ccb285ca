package caddymodule

import (
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage/jobs"
)

// Bounds of JobsConfig.
const (
	// minJobLease is the shortest lease: renewals come every third of it,
	// and each is a database write.
	minJobLease = time.Second
	// minJobPoll is the shortest poll interval: each poll is a query.
	minJobPoll = 100 * time.Millisecond
)

// JobsConfig times the persisted background jobs (remote media purges,
// retention) of the instances sharing a database. Whoever holds a job's
// lease runs it; when an instance dies, another resumes its jobs once their
// lease has expired and it polls. Shorter values move jobs sooner, at the
// cost of more database writes (a renewal every third of the lease, for each
// running job) and queries (one per poll interval, for each instance).
type JobsConfig struct {
	// Lease is how long an instance holds a running job without renewing
	// it. A job whose instance died resumes elsewhere after at most the
	// lease plus the poll interval. At least 1s. Default: 1m.
	Lease caddy.Duration `json:"lease,omitempty"`

	// PollInterval is how often each instance looks for jobs whose
	// instance died (and once at start). At least 100ms and shorter than
	// the lease. Default: 30s, or half the lease when that is shorter.
	PollInterval caddy.Duration `json:"poll_interval,omitempty"`
}

// jobTimings are the resolved JobsConfig.
type jobTimings struct {
	lease, poll time.Duration
}

// key identifies the timings in storeSettings.key: the runner is built
// with them.
func (t jobTimings) key() string { return t.lease.String() + "/" + t.poll.String() }

// jobTimingsOf validates c and applies its defaults (nil: the defaults).
func jobTimingsOf(c *JobsConfig) (jobTimings, error) {
	t := jobTimings{lease: jobs.DefaultLease}
	if c == nil {
		c = &JobsConfig{}
	}
	if c.Lease != 0 {
		if time.Duration(c.Lease) < minJobLease {
			return t, fmt.Errorf("jobs: lease must be at least %v, got %v", minJobLease, time.Duration(c.Lease))
		}
		t.lease = time.Duration(c.Lease)
	}
	if c.PollInterval == 0 {
		t.poll = min(jobs.DefaultPollInterval, t.lease/2)
		return t, nil
	}
	t.poll = time.Duration(c.PollInterval)
	if t.poll < minJobPoll {
		return t, fmt.Errorf("jobs: poll_interval must be at least %v, got %v", minJobPoll, t.poll)
	}
	if t.poll >= t.lease {
		return t, fmt.Errorf("jobs: poll_interval (%v) must be shorter than the lease (%v)", t.poll, t.lease)
	}
	return t, nil
}

// parseJobs parses the jobs block of the global option.
func parseJobs(d *caddyfile.Dispenser) (*JobsConfig, error) {
	c := &JobsConfig{}
	if d.NextArg() {
		return nil, d.Err("matrix_media: jobs takes a block")
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch sub := d.Val(); sub {
		case "lease":
			c.Lease, err = positiveDuration(d)
		case "poll_interval":
			c.PollInterval, err = positiveDuration(d)
		default:
			return nil, d.Errf("matrix_media: jobs: unrecognized subdirective '%s'", sub)
		}
		if err != nil {
			return nil, err
		}
	}
	return c, nil
}
