// Package retention removes what ages out of the media repository, as
// background jobs of storage/jobs: the remote media cache (by age on demand,
// the "purge_remote" job; by age and by a byte budget on a schedule, the
// "retention" job) and thumbnails nobody looked at for a while (they are
// generated again on demand). It knows neither Matrix nor Caddy.
//
// Two other kinds of data expire elsewhere and need nothing here: expired
// /create reservations are deleted by the media repository's pending-expiry
// loop (mediaapi.Repository.RunPendingExpiry), and URL previews live in an
// in-memory cache with a TTL.
//
// # Order of deletion
//
// Removal follows storage.RemoveMedia: media rows (and their thumbnails) are
// deleted first, in one short transaction per batch, then every blob they
// referenced is offered to BlobCollector.DeleteUnreferencedBlob, which
// removes it (record, then bytes, in one transaction per blob) only while
// nothing references it and nothing claimed it within the grace period. A
// blob shared with media that stays (deduplication) is kept. A crash between
// the two steps leaves unreferenced blobs for storage/gc. Remote purges do
// not tombstone media IDs: a purged remote item is fetched again when asked
// for.
//
// Each batch is a few short transactions, so uploads and downloads running
// at the same time wait at most for one of them. After each batch the job
// saves its cursor; a job interrupted (restart, dead instance) resumes from
// there, and a batch done twice deletes nothing the second time.
package retention

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/gc"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/jobs"
)

// Job kinds registered by New.
const (
	// KindPurgeRemote removes cached remote media last accessed before a
	// time (params: purgeParams).
	KindPurgeRemote = "purge_remote"
	// KindRetention applies a Policy once (params: retentionParams).
	KindRetention = "retention"
)

// Defaults.
const (
	// DefaultInterval is Policy.Interval when zero.
	DefaultInterval = time.Hour
	// DefaultBatchSize is how many media or thumbnails one batch removes.
	DefaultBatchSize = 500
	// DefaultGrace is Options.Grace when zero: the orphan collector's.
	DefaultGrace = gc.DefaultGrace
)

// runningScan bounds how many of the newest jobs StartRetention looks
// through for a retention job still running.
const runningScan = 200

// Store is what retention needs of the metadata store.
type Store interface {
	storage.MetadataStore
	storage.MediaAdmin
	storage.Retainer
	storage.BlobCollector
}

// Policy says what ages out. Every rule is off at its zero value.
type Policy struct {
	// RemoteMaxAge removes cached remote media not accessed (or, never
	// accessed, created) for that long. 0: off.
	RemoteMaxAge time.Duration
	// RemoteMaxBytes bounds the remote media cache: beyond it, the least
	// recently accessed remote media are removed until it fits. 0: off.
	RemoteMaxBytes int64
	// ThumbnailMaxAge removes thumbnails of media not accessed for that long
	// (they are generated again when asked for). 0: off.
	ThumbnailMaxAge time.Duration
	// Interval is how often the policy is applied. 0: DefaultInterval.
	Interval time.Duration
}

// Enabled reports whether any rule is on.
func (p Policy) Enabled() bool {
	return p.RemoteMaxAge > 0 || p.RemoteMaxBytes > 0 || p.ThumbnailMaxAge > 0
}

// Validate rejects negative values.
func (p Policy) Validate() error {
	if p.RemoteMaxAge < 0 || p.RemoteMaxBytes < 0 || p.ThumbnailMaxAge < 0 || p.Interval < 0 {
		return errors.New("retention: durations and sizes must not be negative")
	}
	return nil
}

// interval is Interval with its default.
func (p Policy) interval() time.Duration {
	if p.Interval > 0 {
		return p.Interval
	}
	return DefaultInterval
}

// Options configure a Service.
type Options struct {
	// Meta is the metadata store. Required.
	Meta Store
	// Stores are the datastores holding the blobs. Required.
	Stores *storage.Datastores
	// Runner runs the jobs; New registers the kinds on it. Required.
	Runner *jobs.Runner
	// Grace: blobs claimed within it are left to the orphan collector
	// rather than deleted (an upload may be about to reference them).
	// Default: DefaultGrace.
	Grace time.Duration
	// BatchSize is how many items one batch removes. Default:
	// DefaultBatchSize.
	BatchSize int
	// Now is the clock of cutoffs. Default: time.Now.
	Now func() time.Time
	// Logger receives a line per batch removed, naming who asked for it.
	// Default: none.
	Logger *zap.Logger
	// Forget is called with each media item removed, and ForgetContent
	// with the content of each batch of thumbnails removed, so that caches
	// (of every instance) drop them. Default: nothing is called.
	Forget        func(storage.MediaRef)
	ForgetContent func(ctx context.Context, sha256 string) error
}

// Service runs retention and remote purges as jobs of a runner.
type Service struct {
	// forget and forgetContent are Options.Forget and ForgetContent.
	forget        func(storage.MediaRef)
	forgetContent func(ctx context.Context, sha256 string) error

	meta   Store
	stores *storage.Datastores
	runner *jobs.Runner
	batch  int
	now    func() time.Time
	logger *zap.Logger

	// policy and grace change on reload (SetPolicy, SetGrace); wake tells
	// RunScheduler to re-read the policy.
	mu     sync.Mutex
	policy Policy
	grace  time.Duration
	wake   chan struct{}
}

// New builds the service and registers its job kinds on opts.Runner. The
// policy is off until SetPolicy.
func New(opts Options) (*Service, error) {
	if opts.Meta == nil || opts.Stores == nil || opts.Runner == nil {
		return nil, errors.New("retention: a metadata store, datastores and a job runner are required")
	}
	if opts.Grace < 0 || opts.BatchSize < 0 {
		return nil, errors.New("retention: grace and batch size must not be negative")
	}
	s := &Service{
		meta: opts.Meta, stores: opts.Stores, runner: opts.Runner, grace: opts.Grace, batch: opts.BatchSize,
		now: opts.Now, logger: opts.Logger, wake: make(chan struct{}, 1),
		forget: opts.Forget, forgetContent: opts.ForgetContent,
	}
	if s.forget == nil {
		s.forget = func(storage.MediaRef) {}
	}
	if s.forgetContent == nil {
		s.forgetContent = func(context.Context, string) error { return nil }
	}
	if s.grace == 0 {
		s.grace = DefaultGrace
	}
	if s.batch == 0 {
		s.batch = DefaultBatchSize
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.logger == nil {
		s.logger = zap.NewNop()
	}
	s.runner.Register(KindPurgeRemote, s.runPurge)
	s.runner.Register(KindRetention, s.runRetention)
	return s, nil
}

// SetPolicy sets the policy the scheduler applies (the last call wins).
func (s *Service) SetPolicy(p Policy) {
	s.mu.Lock()
	changed := s.policy != p
	s.policy = p
	s.mu.Unlock()
	if changed {
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
}

// SetGrace changes the grace period of the batches that start from now on
// (blobs claimed within it are left to the orphan collector); 0 or less
// means DefaultGrace. Caddy passes the orphan collector's configured
// grace, so that both treat uploads in progress alike.
func (s *Service) SetGrace(d time.Duration) {
	if d <= 0 {
		d = DefaultGrace
	}
	s.mu.Lock()
	s.grace = d
	s.mu.Unlock()
}

// currentGrace is the grace period in force.
func (s *Service) currentGrace() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.grace
}

// Policy returns the current policy.
func (s *Service) Policy() Policy {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.policy
}

// RunScheduler starts a retention job every Interval while the policy is
// enabled, until ctx ends. A policy change restarts the wait. The first run
// comes one interval after start (or after the change).
func (s *Service) RunScheduler(ctx context.Context) {
	for {
		p := s.Policy()
		var tick <-chan time.Time
		var t *time.Timer
		if p.Enabled() {
			t = time.NewTimer(p.interval())
			tick = t.C
		}
		select {
		case <-ctx.Done():
		case <-s.wake:
		case <-tick:
			if _, _, err := s.StartRetention(ctx, "retention"); err != nil && ctx.Err() == nil {
				s.logger.Error("starting retention job", zap.Error(err))
			}
		}
		if t != nil {
			t.Stop()
		}
		if ctx.Err() != nil {
			return
		}
	}
}

// StartRetention starts a job applying the current policy now, unless the
// policy is off, a retention job is still running (on any instance), or
// another instance started the job of this interval already. It returns the
// job started or found running, and whether it started one.
func (s *Service) StartRetention(ctx context.Context, requestedBy string) (storage.Job, bool, error) {
	p := s.Policy()
	if !p.Enabled() {
		return storage.Job{}, false, nil
	}
	js, err := s.runner.List(ctx, runningScan)
	if err != nil {
		return storage.Job{}, false, err
	}
	for _, j := range js {
		if j.Kind == KindRetention && j.State == storage.JobRunning {
			return j, false, nil
		}
	}
	now := s.now()
	params := retentionParams{RemoteMaxBytes: p.RemoteMaxBytes}
	if p.RemoteMaxAge > 0 {
		params.RemoteBeforeMS = now.Add(-p.RemoteMaxAge).UnixMilli()
	}
	if p.ThumbnailMaxAge > 0 {
		params.ThumbnailBeforeMS = now.Add(-p.ThumbnailMaxAge).UnixMilli()
	}
	raw, err := json.Marshal(params)
	if err != nil {
		return storage.Job{}, false, fmt.Errorf("encoding retention parameters: %w", err)
	}
	// One job per interval slot, whichever instance gets there first.
	id := "retention-" + now.Truncate(p.interval()).UTC().Format("20060102T150405Z")
	j, err := s.runner.StartWithID(ctx, id, KindRetention, raw, requestedBy)
	if errors.Is(err, storage.ErrConflict) {
		return storage.Job{}, false, nil
	}
	if err != nil {
		return storage.Job{}, false, err
	}
	return j, true, nil
}

// StartPurgeRemote starts a job removing the cached remote media last
// accessed (or, never accessed, created) before before, and returns it.
func (s *Service) StartPurgeRemote(ctx context.Context, before time.Time, requestedBy string) (storage.Job, error) {
	raw, err := json.Marshal(purgeParams{BeforeMS: before.UnixMilli()})
	if err != nil {
		return storage.Job{}, fmt.Errorf("encoding purge parameters: %w", err)
	}
	return s.runner.Start(ctx, KindPurgeRemote, raw, requestedBy)
}

// PurgeRemote removes the cached remote media last accessed before before,
// as a purge_remote job, and returns how many media it removed. When ctx
// ends first it returns ctx's error and the job goes on in the background.
func (s *Service) PurgeRemote(ctx context.Context, before time.Time, requestedBy string) (int64, error) {
	j, err := s.StartPurgeRemote(ctx, before, requestedBy)
	if err != nil {
		return 0, err
	}
	j, err = s.runner.Wait(ctx, j.ID)
	if err != nil {
		return j.Items, err
	}
	switch j.State {
	case storage.JobDone:
		return j.Items, nil
	case storage.JobCancelled:
		return j.Items, fmt.Errorf("purge job %s was cancelled", j.ID)
	default:
		return j.Items, fmt.Errorf("purge job %s failed: %s", j.ID, j.Error)
	}
}

// purgeParams are the parameters of a purge_remote job.
type purgeParams struct {
	// BeforeMS: media last accessed before it, in ms since the epoch.
	BeforeMS int64 `json:"before_ms"`
}

// retentionParams are the parameters of a retention job: the policy with
// its cutoffs fixed when the job started, so that a resumed job removes
// what the first run would have.
type retentionParams struct {
	RemoteBeforeMS    int64 `json:"remote_before_ms,omitempty"`
	RemoteMaxBytes    int64 `json:"remote_max_bytes,omitempty"`
	ThumbnailBeforeMS int64 `json:"thumbnail_before_ms,omitempty"`
}

// Phases of a retention job, in order.
const (
	phaseRemoteAge  = "remote_age"
	phaseRemoteLRU  = "remote_lru"
	phaseThumbnails = "thumbnails"
	phaseEnd        = "end"
)

// cursor is where a job resumes: the phase (retention jobs) and the last
// media removed or skipped.
type cursor struct {
	Phase      string `json:"phase,omitempty"`
	ServerName string `json:"server_name,omitempty"`
	MediaID    string `json:"media_id,omitempty"`
}

func (c cursor) ref() storage.MediaRef {
	return storage.MediaRef{ServerName: c.ServerName, MediaID: c.MediaID}
}

// parseCursor decodes a saved cursor ("" is the start).
func parseCursor(s string) (cursor, error) {
	var c cursor
	if s == "" {
		return c, nil
	}
	if err := json.Unmarshal([]byte(s), &c); err != nil {
		return c, fmt.Errorf("decoding job cursor: %w", err)
	}
	return c, nil
}

// save saves c as p's cursor.
func save(ctx context.Context, p *jobs.Progress, c cursor) error {
	raw, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("encoding job cursor: %w", err)
	}
	return p.Save(ctx, string(raw))
}

// runPurge is the purge_remote job.
func (s *Service) runPurge(ctx context.Context, p *jobs.Progress) error {
	var params purgeParams
	if err := json.Unmarshal(p.Params(), &params); err != nil {
		return fmt.Errorf("decoding purge parameters: %w", err)
	}
	c, err := parseCursor(p.Cursor())
	if err != nil {
		return err
	}
	return s.removeOld(ctx, p, time.UnixMilli(params.BeforeMS), c)
}

// runRetention is the retention job: remote media by age, then the remote
// cache's byte budget, then thumbnails.
func (s *Service) runRetention(ctx context.Context, p *jobs.Progress) error {
	var params retentionParams
	if err := json.Unmarshal(p.Params(), &params); err != nil {
		return fmt.Errorf("decoding retention parameters: %w", err)
	}
	c, err := parseCursor(p.Cursor())
	if err != nil {
		return err
	}
	if c.Phase == "" {
		c.Phase = phaseRemoteAge
	}
	for c.Phase != phaseEnd {
		var next string
		switch c.Phase {
		case phaseRemoteAge:
			if params.RemoteBeforeMS != 0 {
				err = s.removeOld(ctx, p, time.UnixMilli(params.RemoteBeforeMS), c)
			}
			next = phaseRemoteLRU
		case phaseRemoteLRU:
			if params.RemoteMaxBytes > 0 {
				err = s.evictLRU(ctx, p, params.RemoteMaxBytes)
			}
			next = phaseThumbnails
		case phaseThumbnails:
			if params.ThumbnailBeforeMS != 0 {
				err = s.expireThumbnails(ctx, p, time.UnixMilli(params.ThumbnailBeforeMS))
			}
			next = phaseEnd
		default:
			return fmt.Errorf("unknown retention phase %q", c.Phase)
		}
		if err != nil {
			return err
		}
		c = cursor{Phase: next}
		if err := save(ctx, p, c); err != nil {
			return err
		}
	}
	return nil
}

// removeOld removes, batch by batch, the ready remote media last accessed
// before before and ordered after c, saving c after each batch. Quarantined
// media are included (their quarantine is kept by content hash, so a
// purged copy fetched again is still refused); protected media are not.
func (s *Service) removeOld(ctx context.Context, p *jobs.Progress, before time.Time, c cursor) error {
	for {
		page, err := s.meta.ListOldMedia(ctx, storage.OldMediaQuery{
			Remote: true, Before: before, IncludeQuarantined: true, After: c.ref(), Limit: s.batch,
		})
		if err != nil {
			return fmt.Errorf("listing old remote media: %w", err)
		}
		if len(page) == 0 {
			return nil
		}
		refs := make([]storage.MediaRef, len(page))
		for i, m := range page {
			refs[i] = storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID}
		}
		if _, err := s.remove(ctx, p, refs, "old remote media"); err != nil {
			return err
		}
		last := refs[len(refs)-1]
		c.ServerName, c.MediaID = last.ServerName, last.MediaID
		if err := save(ctx, p, c); err != nil {
			return err
		}
		if len(page) < s.batch {
			return nil
		}
	}
}

// evictLRU removes the least recently accessed remote media until the
// remote cache holds at most budget bytes. Protected media are never
// evicted (the cache may stay over budget because of them).
func (s *Service) evictLRU(ctx context.Context, p *jobs.Progress, budget int64) error {
	for {
		_, size, err := s.meta.RemoteCacheSize(ctx)
		if err != nil {
			return fmt.Errorf("measuring the remote media cache: %w", err)
		}
		excess := size - budget
		if excess <= 0 {
			return nil
		}
		lru, err := s.meta.ListRemoteLRU(ctx, s.batch)
		if err != nil {
			return fmt.Errorf("listing remote media by last access: %w", err)
		}
		var refs []storage.MediaRef
		var sum int64
		for _, e := range lru {
			refs = append(refs, e.MediaRef)
			sum += e.Size
			if sum >= excess {
				break
			}
		}
		if len(refs) == 0 {
			return nil
		}
		removed, err := s.remove(ctx, p, refs, "least recently used remote media")
		if err != nil {
			return err
		}
		if err := save(ctx, p, cursor{Phase: phaseRemoteLRU}); err != nil {
			return err
		}
		if len(removed.Media) == 0 {
			// Listed rows vanished meanwhile (another deletion): measure
			// again next run rather than spinning.
			return nil
		}
	}
}

// expireThumbnails removes, batch by batch, the thumbnails of media not
// accessed since cutoff, and then their blobs that nothing else references.
func (s *Service) expireThumbnails(ctx context.Context, p *jobs.Progress, cutoff time.Time) error {
	for {
		n, blobs, err := s.meta.DeleteThumbnailsNotAccessedSince(ctx, cutoff, s.batch)
		if err != nil {
			return fmt.Errorf("deleting old thumbnails: %w", err)
		}
		for _, h := range blobs {
			_ = s.forgetContent(ctx, h)
		}
		freed, deleted, err := s.deleteBlobs(ctx, blobs)
		p.Add(int64(n), freed)
		if n > 0 {
			s.logger.Info("removed thumbnails not accessed recently",
				zap.String("job", p.ID()), zap.String("requested_by", p.RequestedBy()),
				zap.Time("not_accessed_since", cutoff), zap.Int("thumbnails", n),
				zap.Int("blobs", deleted), zap.Int64("bytes", freed))
		}
		if err != nil {
			return err
		}
		if err := save(ctx, p, cursor{Phase: phaseThumbnails}); err != nil {
			return err
		}
		if n < s.batch {
			return nil
		}
	}
}

// remove removes refs through storage.RemoveMedia, counts and logs them.
func (s *Service) remove(ctx context.Context, p *jobs.Progress, refs []storage.MediaRef, what string) (storage.Removed, error) {
	removed, err := storage.RemoveMedia(ctx, s.meta, s.stores, refs, storage.RemoveOptions{
		Tombstone: false, Grace: s.currentGrace(), Now: s.now,
		// The rows are counted (and the count saved, with the cursor as
		// it was) once their deletion commits: a runner that dies while
		// the blobs are deleted leaves them counted, and the runner that
		// resumes, listing from that cursor, no longer finds them.
		RowsDeleted: func(media []storage.Media) error {
			p.Add(int64(len(media)), 0)
			for _, m := range media {
				s.forget(storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID})
			}
			return p.Save(ctx, p.Cursor())
		},
	})
	p.Add(0, removed.Bytes)
	if len(removed.Media) > 0 {
		first, last := removed.Media[0], removed.Media[len(removed.Media)-1]
		s.logger.Info("removed "+what,
			zap.String("job", p.ID()), zap.String("requested_by", p.RequestedBy()),
			zap.Int("media", len(removed.Media)), zap.Int("thumbnails", removed.Thumbnails),
			zap.Int("blobs", removed.Blobs), zap.Int64("bytes", removed.Bytes), zap.Int("kept_blobs", removed.KeptBlobs),
			zap.String("first", "mxc://"+first.ServerName+"/"+first.MediaID),
			zap.String("last", "mxc://"+last.ServerName+"/"+last.MediaID))
	}
	switch {
	case err == nil:
	case len(removed.Media) > 0 && ctx.Err() == nil && !errors.Is(err, storage.ErrUnavailable):
		// The rows are gone; blobs that failed are left to the garbage
		// collector. Go on with the next batch.
		s.logger.Warn("some blobs of removed media were left to the garbage collector",
			zap.String("job", p.ID()), zap.Error(err))
	default:
		return removed, fmt.Errorf("removing %s: %w", what, err)
	}
	return removed, nil
}

// deleteBlobs offers each hash to BlobCollector.DeleteUnreferencedBlob
// (with the grace), deleting the bytes from the blob's datastore. It returns
// the bytes freed and the blobs deleted; an error stops at the first
// failure.
func (s *Service) deleteBlobs(ctx context.Context, hashes []string) (freed int64, deleted int, err error) {
	cutoff := s.now().Add(-s.currentGrace())
	for _, h := range hashes {
		var size int64
		ok, err := s.meta.DeleteUnreferencedBlob(ctx, h, cutoff, func(ctx context.Context, rec storage.BlobRecord) error {
			store, found := s.stores.Get(rec.Datastore)
			if !found {
				return fmt.Errorf("blob %s is recorded in unknown datastore %q", rec.SHA256, rec.Datastore)
			}
			size = rec.Size
			if err := store.Delete(ctx, rec.SHA256); err != nil {
				return fmt.Errorf("deleting bytes from datastore %s: %w", rec.Datastore, err)
			}
			return nil
		})
		if err != nil {
			return freed, deleted, fmt.Errorf("deleting thumbnail blob %s: %w", h, err)
		}
		if ok {
			freed += size
			deleted++
		}
	}
	return freed, deleted, nil
}
