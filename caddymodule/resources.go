package caddymodule

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaadmin"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/cluster"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/s3store"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/sqlstore"
	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"

	"github.com/caddyserver/caddy/v2"
)

// resourcePool holds the stores and repositories of every loaded config, keyed
// by storeSettings.key. A reload provisions the new config before it cleans up
// the old one, so a key used by both keeps its value (open database, media
// cache, pending-upload waiters, metric values) across the reload.
var resourcePool = caddy.NewUsagePool()

// storeSettings are the resolved (placeholder-free, absolute) settings that
// decide which stores a config uses.
type storeSettings struct {
	// driver is "sqlite" or "postgres".
	driver string
	// dsn is the SQLite file path or the PostgreSQL connection string. It may
	// hold a password: it is never logged nor put in an error.
	dsn string
	// sqliteFullSync makes every SQLite commit durable (Database.Synchronous
	// "full").
	sqliteFullSync bool
	// storagePath is the root directory of the default file datastore; empty
	// when datastores are configured explicitly.
	storagePath string
	// datastores are the resolved datastores (never empty). They may hold
	// S3 keys: never logged.
	datastores []resolvedDatastore
	// mediaCacheSize is the number of media rows cached in memory.
	mediaCacheSize int
	// thumbnails are the thumbnail settings.
	thumbnails thumbnailSettings
	// maxRemoteSize bounds cached remote media.
	maxRemoteSize int64
	// maxFetches and maxFetchesPerServer bound remote fetches in flight
	// (0: the repository's defaults).
	maxFetches, maxFetchesPerServer int
	// jobs are the job runner's lease and poll interval, fixed when the
	// runner is built.
	jobs jobTimings
}

// key identifies the pooled resources. The media cache size is part of it
// because it is fixed when the repository is built: changing it and reloading
// builds a new repository rather than silently keeping the old size.
func (s storeSettings) key() string {
	return s.driver + "\x00" + s.dsn + "\x00" + strconv.FormatBool(s.sqliteFullSync) + "\x00" + datastoresKey(s.datastores) + "\x00" + strconv.Itoa(s.mediaCacheSize) +
		"\x00" + s.thumbnails.key() + "\x00" + strconv.FormatInt(s.maxRemoteSize, 10) +
		"\x00" + strconv.Itoa(s.maxFetches) + "/" + strconv.Itoa(s.maxFetchesPerServer) +
		"\x00" + s.jobs.key()
}

// datastoreNames lists the datastores' names, for logs.
func (s storeSettings) datastoreNames() []string {
	names := make([]string, len(s.datastores))
	for i, d := range s.datastores {
		names[i] = d.Name + " (" + d.Type + ")"
	}
	return names
}

// resources are the objects shared by every site of every config that uses the
// same storeSettings: both stores, the repository built on them, its metrics,
// and the background expiry loop. They are reference counted by resourcePool.
//
// Requests in flight are counted, so that when the last config using the
// resources is cleaned up (which Caddy does while the old servers still finish
// their requests) the stores are closed only once those requests are done.
// Work that outlives its request or runs on its own (thumbnail pre-generation
// and generations, remote media being stored, the expiry loop, migrations)
// holds the repository (mediaapi.Repository.Go); the stores are closed only
// once it has finished too, so nothing writes to a closed store.
type resources struct {
	stores *storage.Datastores
	// claim is this process's hold on an SQLite database (nil for
	// PostgreSQL), released once meta is closed.
	claim *databaseClaim
	// migrations runs blob migrations between the datastores (admin API).
	migrations *migrations
	// gc collects orphan blobs in the background and on demand (admin API),
	// with the gc policy of the config provisioned last.
	gc   *gcJob
	meta *sqlstore.Store
	// cluster coordinates this instance with the others sharing the
	// database (PostgreSQL); a cluster.Local on SQLite, which serves one
	// instance. clusterMetrics exports its counters.
	cluster        cluster.Coordinator
	clusterMetrics *clusterMetrics
	// capacityMetrics export the free space of the file datastores.
	capacityMetrics []prometheus.Collector
	repo            *mediaapi.Repository
	metrics         *mediaapi.Metrics
	logger          *zap.Logger

	// jobs runs the persisted background jobs (remote purges, retention),
	// resumes those of instances that died, and schedules retention.
	jobs *backgroundJobs
	// purger removes cached remote media as a background job (for the
	// admin layer: Synapse's purge_media_cache).
	purger mediaadmin.RemotePurger
	// admin performs operators' control (quarantine, deletion, usage) for
	// the Synapse-compatible API of every site and Caddy's admin API; nil
	// when the metadata store cannot administer media. adminMetrics counts
	// what it does.
	admin        *mediaadmin.Service
	adminMetrics *mediaadmin.Metrics

	// thumbs is the thumbnail generator (nil when thumbnails are off), here
	// for the previews of media exports, with their bounds.
	thumbs                 *thumbnails.Generator
	exportPreviewMaxSource int64
	exportPreviewTimeout   time.Duration
	// exports admits the media exports running at once (export.go).
	exports chan struct{}

	// stopExpiry stops the expiry and access flush loops, the job runner
	// (its jobs stay running in the database, released for the next
	// runner) and the retention scheduler: background work of the
	// repository, which closing the stores waits for through Drain.
	stopExpiry context.CancelFunc

	// inFlight counts requests using the resources; closing is set by
	// Destruct. Both are atomics so that the request path takes no lock.
	inFlight atomic.Int64
	closing  atomic.Bool
	// closeOnce closes the stores once; closed is closed after that, and
	// closeErr is then valid.
	closeOnce sync.Once
	closed    chan struct{}
	closeErr  error
	// drainWait bounds how long Destruct waits for background work before
	// it returns (the stores are then closed when the work is done).
	drainWait time.Duration
}

// defaultDrainWait is resources.drainWait: long enough for a thumbnail or a
// small remote fetch to finish, short enough not to hold up a reload for long.
const defaultDrainWait = 30 * time.Second

// openResources opens the stores described by s and builds the repository.
// ctx bounds only the opening (connecting, migrating); the returned resources
// live until Destruct.
func openResources(ctx context.Context, s storeSettings, logger *zap.Logger) (*resources, error) {
	metrics := mediaapi.NewMetrics()
	stores, err := openDatastores(ctx, s.datastores, func(name string) s3store.Observer { return metrics.StoreObserver(name) })
	if err != nil {
		return nil, err
	}
	// An SQLite database is claimed before it is opened, and the claim is
	// released after it is closed (closeNow), or here on failure.
	claim, err := claimDatabase(s)
	if err != nil {
		_ = stores.Close()
		return nil, err
	}
	opened := false
	defer func() {
		if !opened {
			claim.release()
		}
	}()
	meta, err := sqlstore.OpenWith(ctx, s.driver, s.dsn, sqlstore.Options{SQLiteFullSync: s.sqliteFullSync})
	if err != nil {
		_ = stores.Close()
		// The store's errors name the driver, never the DSN.
		return nil, fmt.Errorf("opening %s metadata database: %w", s.driver, err)
	}
	coord, err := openCluster(ctx, s, logger)
	if err != nil {
		_ = meta.Close()
		_ = stores.Close()
		return nil, err
	}
	redirects := map[string]mediaapi.RedirectPolicy{}
	for _, d := range s.datastores {
		if d.Redirect != nil {
			redirects[d.Name] = mediaapi.RedirectPolicy{Lifetime: d.Redirect.Lifetime, CDNBaseURL: d.Redirect.CDN}
		}
	}
	var (
		thumbnailer mediaapi.Thumbnailer
		generator   *thumbnails.Generator
	)
	if !s.thumbnails.disabled {
		g, err := thumbnails.New(s.thumbnails.generator)
		if err != nil {
			_ = coord.Close()
			_ = meta.Close()
			_ = stores.Close()
			return nil, fmt.Errorf("starting the thumbnail generator: %w", err)
		}
		thumbnailer, generator = g, g
	}
	repo, err := mediaapi.NewRepository(stores, meta, mediaapi.RepositoryOptions{
		Thumbnailer:               thumbnailer,
		Thumbnails:                s.thumbnails.policy,
		ThumbnailMaxSourceBytes:   s.thumbnails.maxSource,
		ThumbnailMemory:           s.thumbnails.maxMemory,
		ThumbnailTimeout:          s.thumbnails.timeout,
		QuarantinePlaceholder:     s.thumbnails.placeholder,
		QuarantinePlaceholderType: s.thumbnails.placeholderType,
		MaxRemoteSize:             s.maxRemoteSize,
		MaxRemoteFetches:          s.maxFetches,
		MaxRemoteFetchesPerServer: s.maxFetchesPerServer,
		Redirects:                 redirects,
		MediaCacheSize:            s.mediaCacheSize,
		Logger:                    logger,
		Metrics:                   metrics,
		Cluster:                   coord,
	})
	if err != nil {
		_ = coord.Close()
		_ = meta.Close()
		_ = stores.Close()
		return nil, fmt.Errorf("building media repository: %w", err)
	}
	gcJob, err := newGCJob(meta, stores, logger)
	if err != nil {
		_ = coord.Close()
		_ = meta.Close()
		_ = stores.Close()
		return nil, fmt.Errorf("starting the orphan collector: %w", err)
	}
	bg, err := openJobs(meta, stores, repo, s.jobs, logger)
	if err != nil {
		gcJob.close()
		_ = coord.Close()
		_ = meta.Close()
		_ = stores.Close()
		return nil, err
	}
	loopCtx, stop := context.WithCancel(context.Background())
	res := &resources{
		stores:     stores,
		migrations: newMigrations(meta, stores, bg.runner, logger),
		gc:         gcJob,
		meta:       meta,
		cluster:    coord,
		repo:       repo,

		clusterMetrics:  newClusterMetrics(coord),
		capacityMetrics: capacityCollectors(stores),
		metrics:         metrics,
		logger:          logger,
		jobs:            bg,
		purger:          bg.retention,
		stopExpiry:      stop,
		closed:          make(chan struct{}),
		drainWait:       defaultDrainWait,

		thumbs:                 generator,
		exportPreviewMaxSource: min(cmp.Or(s.thumbnails.maxSource, thumbnails.DefaultMaxSourceBytes), exportPreviewMaxSource),
		exportPreviewTimeout:   cmp.Or(s.thumbnails.timeout, defaultExportPreviewTimeout),
		exports:                make(chan struct{}, maxConcurrentExports),
	}
	res.adminMetrics = mediaadmin.NewMetrics()
	if res.admin, err = newAdminService(res, res.purger, res.adminMetrics); err != nil {
		stop()
		bg.runner.Close()
		gcJob.close()
		_ = coord.Close()
		_ = meta.Close()
		_ = stores.Close()
		return nil, fmt.Errorf("building the media admin service: %w", err)
	}
	repo.Go("pending_expiry", func() { repo.RunPendingExpiry(loopCtx) })
	// Flushes once more when stopped; Drain flushes what requests noted
	// after that, before the stores close.
	repo.Go("access_flush", func() { repo.RunAccessFlush(loopCtx) })
	repo.Go("jobs", func() { bg.runner.Run(loopCtx) })
	repo.Go("retention", func() { bg.retention.RunScheduler(loopCtx) })
	res.claim, opened = claim, true
	return res, nil
}

// acquire registers a request that is about to use the resources. It returns
// false when the resources are closing; the caller must then not use them.
// Every successful acquire must be paired with one release.
//
// Destruct sets closing before it reads inFlight, and acquire increments
// inFlight before it reads closing, so either Destruct sees the request (and
// leaves the closing to its release) or the request sees closing (and backs
// out): stores are never closed under a request.
func (r *resources) acquire() bool {
	r.inFlight.Add(1)
	if r.closing.Load() {
		r.release()
		return false
	}
	return true
}

// release ends a request registered with acquire; the last one out after
// Destruct closes the stores.
func (r *resources) release() {
	if r.inFlight.Add(-1) == 0 && r.closing.Load() {
		r.closeStores()
	}
}

// Destruct implements caddy.Destructor. It is called by resourcePool when the
// last config using the resources is cleaned up. It stops the expiry loop, the
// job runner and the retention scheduler, the migrations and the collector
// at once, and closes the stores as soon as no
// request and no background work uses them any more. It waits up to
// drainWait for that; when requests or work remain longer, the close happens
// after Destruct has returned.
func (r *resources) Destruct() error {
	r.migrations.stop()
	r.gc.close()
	r.stopExpiry()
	r.closing.Store(true)
	if r.inFlight.Load() != 0 {
		r.logger.Info("matrix_media stores will close once in-flight requests finish")
		return nil
	}
	r.closeStores()
	select {
	case <-r.closed:
		return r.closeErr
	case <-time.After(r.drainWait):
		r.logger.Warn("matrix_media stores will close once background work finishes")
		return nil
	}
}

// closeStores closes both stores once the repository's background work has
// finished (see mediaapi.Repository.Drain), on a goroutine of its own; only
// the first call does anything. closed is closed when it is done.
func (r *resources) closeStores() {
	r.closeOnce.Do(func() {
		go func() {
			_ = r.repo.Drain(context.Background())
			r.closeNow()
		}()
	})
}

// closeNow closes both stores, sets closeErr and closes closed.
func (r *resources) closeNow() {
	err := errors.Join(r.cluster.Close(), r.meta.Close(), r.stores.Close())
	r.claim.release()
	if err != nil {
		err = fmt.Errorf("closing matrix_media stores: %w", err)
		r.logger.Error("closing stores", zap.Error(err))
	}
	r.closeErr = err
	close(r.closed)
}

// absPath makes p absolute, so that two spellings of one directory share one
// pool entry.
func absPath(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("resolving path: %w", err)
	}
	return abs, nil
}

// Interface guard.
var _ caddy.Destructor = (*resources)(nil)
