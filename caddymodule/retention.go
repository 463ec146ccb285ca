package caddymodule

import (
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/jobs"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/retention"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// RetentionConfig says what ages out of the media repository (the retention
// option). Every rule is off by default, because removing data should never
// surprise; a reasonable setting for a server that federates is
// remote_max_age 90d, remote_max_bytes sized to the disk, thumbnail_max_age
// 30d. Removed remote media are fetched again and thumbnails generated again
// when asked for. One instance at a time applies the policy when several
// share a PostgreSQL database; expired /create reservations and cached URL
// previews expire on their own whatever this says.
type RetentionConfig struct {
	// RemoteMaxAge removes cached remote media not accessed (or, never
	// accessed, created) for that long. Protected media stay; quarantined
	// ones go (their quarantine is kept by content). Default: 0, off.
	RemoteMaxAge caddy.Duration `json:"remote_max_age,omitempty"`
	// RemoteMaxBytes bounds the remote media cache, in bytes: beyond it the
	// least recently accessed remote media are removed until it fits.
	// Default: 0, off.
	RemoteMaxBytes int64 `json:"remote_max_bytes,omitempty"`
	// ThumbnailMaxAge removes the thumbnails of media not accessed for that
	// long (they are generated again on demand). Default: 0, off.
	ThumbnailMaxAge caddy.Duration `json:"thumbnail_max_age,omitempty"`
	// Interval is how often the policy is applied; the first run comes one
	// interval after start. Default: 1h.
	Interval caddy.Duration `json:"interval,omitempty"`
}

// retentionPolicyOf resolves c (nil: everything off).
func retentionPolicyOf(c *RetentionConfig) (retention.Policy, error) {
	if c == nil {
		return retention.Policy{Interval: retention.DefaultInterval}, nil
	}
	p := retention.Policy{
		RemoteMaxAge:    time.Duration(c.RemoteMaxAge),
		RemoteMaxBytes:  c.RemoteMaxBytes,
		ThumbnailMaxAge: time.Duration(c.ThumbnailMaxAge),
		Interval:        time.Duration(c.Interval),
	}
	if err := p.Validate(); err != nil {
		return p, err
	}
	if p.Interval == 0 {
		p.Interval = retention.DefaultInterval
	}
	return p, nil
}

// parseRetention parses the retention block of the global option.
func parseRetention(d *caddyfile.Dispenser) (*RetentionConfig, error) {
	c := &RetentionConfig{}
	if d.NextArg() {
		return nil, d.Err("matrix_media: retention takes a block")
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch sub := d.Val(); sub {
		case "remote_max_age":
			c.RemoteMaxAge, err = positiveDuration(d)
		case "remote_max_bytes":
			c.RemoteMaxBytes, err = byteSize(d)
		case "thumbnail_max_age":
			c.ThumbnailMaxAge, err = positiveDuration(d)
		case "interval":
			c.Interval, err = positiveDuration(d)
		default:
			return nil, d.Errf("matrix_media: retention: unrecognized subdirective '%s'", sub)
		}
		if err != nil {
			return nil, err
		}
	}
	return c, nil
}

// jobStore is what the job runner and retention need of the metadata store.
type jobStore interface {
	retention.Store
	storage.JobStore
}

// backgroundJobs are the job runner and the retention service of one set of
// resources.
type backgroundJobs struct {
	runner    *jobs.Runner
	metrics   *jobs.Metrics
	retention *retention.Service
}

// openJobs builds the job runner, with timings t, and the retention service
// on meta, which drops what it removes from repo's caches. They run nothing
// until startJobs.
func openJobs(meta *sqlstore.Store, stores *storage.Datastores, repo *mediaapi.Repository, t jobTimings, logger *zap.Logger) (*backgroundJobs, error) {
	var js jobStore = meta
	metrics := jobs.NewMetrics()
	runner, err := jobs.New(jobs.Options{Store: js, Lease: t.lease, PollInterval: t.poll, Logger: logger.Named("jobs"), Metrics: metrics})
	if err != nil {
		return nil, fmt.Errorf("starting the job runner: %w", err)
	}
	svc, err := retention.New(retention.Options{
		Meta: js, Stores: stores, Runner: runner, Grace: DefaultGCGrace, Logger: logger.Named("retention"),
		Forget:        func(ref storage.MediaRef) { repo.Forget(ref.ServerName, ref.MediaID) },
		ForgetContent: repo.ForgetContent,
	})
	if err != nil {
		runner.Close()
		return nil, fmt.Errorf("starting retention: %w", err)
	}
	return &backgroundJobs{runner: runner, metrics: metrics, retention: svc}, nil
}
