// Package mediaadmin holds operators' control of the media repository: the
// operations behind takedown and deletion (Service: quarantine by content,
// protection, deletion of local media, purge of the remote cache, listings
// and usage) and the Synapse-compatible media admin API that exposes them on
// each site (SiteAPI), so that tools written for Synapse (synadm, admin web
// consoles) work unchanged. The SiteAPI also answers the module's own
// export endpoints (export.go): who may export what is decided here, the
// archive itself is written by an ExportFunc (package mediaarchive, wired
// by the Caddy layer) and streamed to the client.
//
// The Service knows nothing of HTTP: the Caddy layer calls it from the
// SiteAPI of each site, from Caddy's admin API and from the command line.
// Every takedown and deletion is logged with who asked for it (the actor: a
// Matrix user ID, or a label such as "caddy-admin-api").
//
// Quarantine is by content: quarantining one media item records its blob's
// SHA-256 (storage.MediaAdmin.QuarantineContent), which refuses every ready
// media item with the same bytes, local or remote, on every site, except
// protected ones. Unquarantining any one of them lifts it for all.
// Deletion goes through storage.RemoveMedia: rows first, then the blobs
// nothing references any more. Deleted local media IDs are tombstoned (never
// issued again); purged remote copies are not (fetching them again is fine).
// After each change the Invalidator drops what the media API cached.
package mediaadmin

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Defaults of Options.
const (
	// DefaultDeleteGrace is the default Options.DeleteGrace.
	DefaultDeleteGrace = time.Minute
	// DefaultBatchSize is the default Options.BatchSize.
	DefaultBatchSize = 500
	// DefaultLimit is the page size of the list endpoints and the number of
	// media DELETE users/{userId}/media removes when the request gives no
	// limit (as Synapse).
	DefaultLimit = 100
)

// Invalidator drops what the media API caches about media, so that a
// quarantine, protection change or deletion takes effect at once. The media
// API's Repository implements it.
type Invalidator interface {
	// Forget drops the cached row of one media item.
	Forget(serverName, mediaID string)
	// ForgetContent drops the cached rows of every media item whose content
	// is sha256.
	ForgetContent(ctx context.Context, sha256 string) error
}

// RemotePurger purges cached remote media last accessed before a time (the
// background-job layer implements it: a resumable job that returns when it
// is done).
type RemotePurger interface {
	// PurgeRemote removes cached remote media last accessed before before
	// (never quarantined or protected ones) and returns how many items it
	// removed. requestedBy names who asked.
	PurgeRemote(ctx context.Context, before time.Time, requestedBy string) (removed int64, err error)
}

// ProfileAvatars returns the avatars of the given users' global profiles as
// a set of mxc URIs ("mxc://server/mediaID"). Users without an avatar, or
// unknown, are simply absent. An error aborts the deletion that asked.
type ProfileAvatars func(ctx context.Context, userIDs []string) (map[string]bool, error)

// Options configure a Service.
type Options struct {
	// Meta is the metadata store. Required; it must implement
	// storage.MediaAdmin (and storage.BlobCollector, which deletion needs).
	Meta storage.MetadataStore
	// Stores are the configured datastores, whose blobs deletion removes.
	// Required.
	Stores *storage.Datastores
	// Invalidator drops cached media rows after each change. Default: none
	// (nothing is cached).
	Invalidator Invalidator
	// Purger runs remote cache purges as background jobs. Default nil: the
	// purge runs inline, in batches of BatchSize, in the caller's request.
	Purger RemotePurger
	// DeleteGrace keeps a deleted media item's blob when it was claimed (by
	// an upload of the same bytes) within that long; the garbage collector
	// removes it later if it stays unreferenced. Default 0 means
	// DefaultDeleteGrace (1m); negative means no grace (tests, or no upload
	// running).
	DeleteGrace time.Duration
	// BatchSize is how many rows one listing or deletion step handles.
	// Default DefaultBatchSize (500).
	BatchSize int
	// Logger logs every takedown and deletion. Default: no logs.
	Logger *zap.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Metrics counts what the service did. Default: none.
	Metrics *Metrics
}

// Service performs operators' control operations. It is safe for concurrent
// use.
type Service struct {
	meta        storage.MetadataStore
	admin       storage.MediaAdmin
	stores      *storage.Datastores
	invalidator Invalidator
	purger      RemotePurger
	grace       time.Duration
	batch       int
	logger      *zap.Logger
	now         func() time.Time
	metrics     *Metrics
}

// New checks opts and returns the service.
func New(opts Options) (*Service, error) {
	if opts.Meta == nil || opts.Stores == nil {
		return nil, errors.New("creating media admin service: Meta and Stores are required")
	}
	ma, ok := opts.Meta.(storage.MediaAdmin)
	if !ok {
		return nil, fmt.Errorf("creating media admin service: metadata store %T does not support media administration (storage.MediaAdmin)", opts.Meta)
	}
	if _, ok := opts.Meta.(storage.BlobCollector); !ok {
		return nil, fmt.Errorf("creating media admin service: metadata store %T does not support blob collection (storage.BlobCollector)", opts.Meta)
	}
	if opts.BatchSize < 0 {
		return nil, fmt.Errorf("creating media admin service: negative batch size %d", opts.BatchSize)
	}
	s := &Service{
		meta:        opts.Meta,
		admin:       ma,
		stores:      opts.Stores,
		invalidator: opts.Invalidator,
		purger:      opts.Purger,
		grace:       opts.DeleteGrace,
		batch:       cmp.Or(opts.BatchSize, DefaultBatchSize),
		logger:      opts.Logger,
		now:         opts.Now,
		metrics:     opts.Metrics,
	}
	switch {
	case s.grace == 0:
		s.grace = DefaultDeleteGrace
	case s.grace < 0:
		s.grace = 0
	}
	if s.logger == nil {
		s.logger = zap.NewNop()
	}
	if s.now == nil {
		s.now = time.Now
	}
	return s, nil
}

// logFields are the fields of every takedown and deletion log line.
func logFields(actor string, ref storage.MediaRef, sha256 string, count int64) []zap.Field {
	return []zap.Field{
		zap.String("actor", actor),
		zap.String("server_name", ref.ServerName),
		zap.String("media_id", ref.MediaID),
		zap.String("sha256", sha256),
		zap.Int64("count", count),
	}
}

// readyMedia returns the ready media item ref, or an error wrapping
// storage.ErrNotFound when it is missing or still pending.
func (s *Service) readyMedia(ctx context.Context, ref storage.MediaRef) (storage.Media, error) {
	m, err := s.meta.GetMedia(ctx, ref.ServerName, ref.MediaID)
	if err != nil {
		return storage.Media{}, fmt.Errorf("looking up mxc://%s/%s: %w", ref.ServerName, ref.MediaID, err)
	}
	if m.State != storage.StateReady {
		return storage.Media{}, fmt.Errorf("looking up mxc://%s/%s: not uploaded yet: %w", ref.ServerName, ref.MediaID, storage.ErrNotFound)
	}
	return m, nil
}

// forgetContent asks the invalidator to drop the rows of content sha256. A
// failure is logged, not returned: the change is stored, and the cache
// expires on its own.
func (s *Service) forgetContent(ctx context.Context, sha256 string) {
	if s.invalidator == nil {
		return
	}
	if err := s.invalidator.ForgetContent(ctx, sha256); err != nil {
		s.logger.Warn("could not drop cached media of quarantined content", zap.String("sha256", sha256), zap.Error(err))
	}
}

// forget asks the invalidator to drop one media row.
func (s *Service) forget(ref storage.MediaRef) {
	if s.invalidator != nil {
		s.invalidator.Forget(ref.ServerName, ref.MediaID)
	}
}

// quarantineHash quarantines content sha256 for actor and drops the cached
// rows that share it. It reports whether the hash was newly quarantined.
func (s *Service) quarantineHash(ctx context.Context, actor, sha256 string) (bool, error) {
	added, err := s.admin.QuarantineContent(ctx, storage.Quarantine{SHA256: sha256, By: actor, At: s.now()})
	if err != nil {
		return false, fmt.Errorf("quarantining content %s: %w", sha256, err)
	}
	s.forgetContent(ctx, sha256)
	return added, nil
}

// QuarantineMedia quarantines the content of the ready media item ref: it
// and every media item with the same bytes are refused from then on, except
// protected ones. Quarantining a protected item does nothing and succeeds
// (Synapse's "safe_from_quarantine"); quarantining content already
// quarantined keeps its first record. A missing or pending item gives an
// error wrapping storage.ErrNotFound.
func (s *Service) QuarantineMedia(ctx context.Context, actor string, ref storage.MediaRef) error {
	m, err := s.readyMedia(ctx, ref)
	if err != nil {
		return fmt.Errorf("quarantining media: %w", err)
	}
	if m.Protected {
		s.logger.Info("media not quarantined: protected", logFields(actor, ref, m.SHA256, 0)...)
		return nil
	}
	added, err := s.quarantineHash(ctx, actor, m.SHA256)
	if err != nil {
		return fmt.Errorf("quarantining media: %w", err)
	}
	s.forget(ref)
	s.logger.Info("media quarantined", append(logFields(actor, ref, m.SHA256, 1), zap.Bool("already_quarantined", !added))...)
	s.metrics.count(actionQuarantined, 1)
	return nil
}

// UnquarantineMedia lifts the quarantine of the content of the ready media
// item ref, for every media item with the same bytes. Content not
// quarantined is left as it is. A missing or pending item gives an error
// wrapping storage.ErrNotFound.
func (s *Service) UnquarantineMedia(ctx context.Context, actor string, ref storage.MediaRef) error {
	m, err := s.readyMedia(ctx, ref)
	if err != nil {
		return fmt.Errorf("unquarantining media: %w", err)
	}
	lifted, err := s.admin.UnquarantineContent(ctx, m.SHA256)
	if err != nil {
		return fmt.Errorf("unquarantining media: content %s: %w", m.SHA256, err)
	}
	s.forgetContent(ctx, m.SHA256)
	s.forget(ref)
	s.logger.Info("media unquarantined", append(logFields(actor, ref, m.SHA256, 1), zap.Bool("was_quarantined", lifted))...)
	s.metrics.count(actionUnquarantined, 1)
	return nil
}

// QuarantineUser quarantines the content of every ready media item that
// userID uploaded on serverName (local media only), and returns
// num_quarantined: how many of the user's items are now refused because of
// it, counting those whose content was already quarantined and leaving out
// protected ones (as Synapse, which counts every unprotected row it marks).
// Other media sharing that content are refused too but not counted.
func (s *Service) QuarantineUser(ctx context.Context, actor, serverName, userID string) (int, error) {
	hashes := map[string]bool{}
	var items int
	q := storage.UserMediaQuery{ServerName: serverName, UserID: userID, OrderBy: storage.OrderMediaID, Limit: s.batch}
	for {
		page, _, err := s.admin.ListUserMedia(ctx, q)
		if err != nil {
			return 0, fmt.Errorf("quarantining media of %s: listing: %w", userID, err)
		}
		for _, m := range page {
			if m.Protected || m.SHA256 == "" {
				continue
			}
			items++
			hashes[m.SHA256] = true
		}
		if len(page) < q.Limit {
			break
		}
		q.Offset += len(page)
	}
	if err := s.quarantineHashes(ctx, actor, hashes); err != nil {
		return 0, fmt.Errorf("quarantining media of %s: %w", userID, err)
	}
	s.logger.Info("user's media quarantined",
		zap.String("actor", actor), zap.String("server_name", serverName),
		zap.String("user_id", userID), zap.Int("count", items), zap.Int("contents", len(hashes)))
	s.metrics.count(actionQuarantined, items)
	return items, nil
}

// quarantineHashes quarantines each hash, in a stable order.
func (s *Service) quarantineHashes(ctx context.Context, actor string, hashes map[string]bool) error {
	keys := make([]string, 0, len(hashes))
	for h := range hashes {
		keys = append(keys, h)
	}
	slices.Sort(keys)
	for _, h := range keys {
		if _, err := s.quarantineHash(ctx, actor, h); err != nil {
			return err
		}
	}
	return nil
}

// QuarantineRefs quarantines the content of each ready media item in refs
// (a room's media, as the homeserver listed them) and returns how many of
// them are now refused: items that are missing (remote media never fetched),
// pending or protected are skipped and not counted; duplicates in refs are
// counted once.
func (s *Service) QuarantineRefs(ctx context.Context, actor string, refs []storage.MediaRef) (int, error) {
	hashes := map[string]bool{}
	seen := make(map[storage.MediaRef]bool, len(refs))
	var items int
	for _, ref := range refs {
		if seen[ref] {
			continue
		}
		seen[ref] = true
		m, err := s.readyMedia(ctx, ref)
		if errors.Is(err, storage.ErrNotFound) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("quarantining media: %w", err)
		}
		if m.Protected {
			continue
		}
		items++
		hashes[m.SHA256] = true
		s.forget(ref)
	}
	if err := s.quarantineHashes(ctx, actor, hashes); err != nil {
		return 0, fmt.Errorf("quarantining media: %w", err)
	}
	s.logger.Info("media quarantined by list", zap.String("actor", actor),
		zap.Int("count", items), zap.Int("listed", len(refs)), zap.Int("contents", len(hashes)))
	s.metrics.count(actionQuarantined, items)
	return items, nil
}

// Protect marks media item ref protected: it is never refused, even when
// its content is quarantined, and quarantine operations skip it. A missing
// item gives an error wrapping storage.ErrNotFound.
func (s *Service) Protect(ctx context.Context, actor string, ref storage.MediaRef) error {
	return s.setProtected(ctx, actor, ref, true)
}

// Unprotect removes the protection of media item ref: it is refused again if
// its content is quarantined. A missing item gives an error wrapping
// storage.ErrNotFound.
func (s *Service) Unprotect(ctx context.Context, actor string, ref storage.MediaRef) error {
	return s.setProtected(ctx, actor, ref, false)
}

func (s *Service) setProtected(ctx context.Context, actor string, ref storage.MediaRef, protected bool) error {
	if err := s.admin.SetProtected(ctx, ref, protected); err != nil {
		return fmt.Errorf("setting protection of mxc://%s/%s: %w", ref.ServerName, ref.MediaID, err)
	}
	s.forget(ref)
	msg, action := "media protected", actionProtected
	if !protected {
		msg, action = "media unprotected", actionUnprotected
	}
	s.logger.Info(msg, logFields(actor, ref, "", 1)...)
	s.metrics.count(action, 1)
	return nil
}

// MediaInfo returns media item ref in any state (local, or a cached remote
// copy), or an error wrapping storage.ErrNotFound.
func (s *Service) MediaInfo(ctx context.Context, ref storage.MediaRef) (storage.Media, error) {
	m, err := s.meta.GetMedia(ctx, ref.ServerName, ref.MediaID)
	if err != nil {
		return storage.Media{}, fmt.Errorf("looking up mxc://%s/%s: %w", ref.ServerName, ref.MediaID, err)
	}
	return m, nil
}

// Deleted describes what a deletion removed.
type Deleted struct {
	// Media are the deleted items, in the order the store reported them.
	Media []storage.MediaRef
	// Thumbnails counts the thumbnails deleted with them.
	Thumbnails int
	// Blobs counts the blobs whose bytes were deleted (blobs still shared
	// with other media, or claimed within the grace, are kept).
	Blobs int
	// Bytes is the size of those blobs.
	Bytes int64
	// KeptBlobs counts the blobs of deleted media that were kept (still
	// referenced, claimed within the grace, or failed; the garbage collector
	// removes those that become unreferenced).
	KeptBlobs int
}

// add merges r into d.
func (d *Deleted) add(r storage.Removed) {
	for _, m := range r.Media {
		d.Media = append(d.Media, storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID})
	}
	d.Thumbnails += r.Thumbnails
	d.Blobs += r.Blobs
	d.Bytes += r.Bytes
	d.KeptBlobs += r.KeptBlobs
}

// remove deletes refs (tombstoned or not), drops them from the cache and
// logs each one.
func (s *Service) remove(ctx context.Context, actor string, refs []storage.MediaRef, tombstone bool, reason string) (storage.Removed, error) {
	if len(refs) == 0 {
		return storage.Removed{}, nil
	}
	r, err := storage.RemoveMedia(ctx, s.meta, s.stores, refs, storage.RemoveOptions{Tombstone: tombstone, Grace: s.grace, Now: s.now})
	// Rows may be gone even when blob removal failed: forget and log what
	// was deleted either way.
	for _, m := range r.Media {
		ref := storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID}
		s.forget(ref)
		s.logger.Info("media deleted", append(logFields(actor, ref, m.SHA256, 1),
			zap.String("reason", reason), zap.Bool("remote", m.Remote), zap.Int64("size", m.Size))...)
	}
	s.metrics.deleted(reason, len(r.Media), r.Bytes)
	if err != nil {
		return r, fmt.Errorf("deleting media: %w", err)
	}
	return r, nil
}

// DeleteMedia deletes the given media items (in any state) with their
// thumbnails, then the blobs nothing references any more. Local items are
// tombstoned: their IDs are never issued again; remote copies are not (they
// may be fetched again). Missing items are skipped.
func (s *Service) DeleteMedia(ctx context.Context, actor string, refs []storage.MediaRef) (Deleted, error) {
	var local, remote []storage.MediaRef
	for _, ref := range refs {
		m, err := s.meta.GetMedia(ctx, ref.ServerName, ref.MediaID)
		if errors.Is(err, storage.ErrNotFound) {
			continue
		}
		if err != nil {
			return Deleted{}, fmt.Errorf("deleting media: looking up mxc://%s/%s: %w", ref.ServerName, ref.MediaID, err)
		}
		if m.Remote {
			remote = append(remote, ref)
		} else {
			local = append(local, ref)
		}
	}
	var d Deleted
	for _, part := range []struct {
		refs      []storage.MediaRef
		tombstone bool
	}{{local, true}, {remote, false}} {
		r, err := s.remove(ctx, actor, part.refs, part.tombstone, reasonAdmin)
		d.add(r)
		if err != nil {
			return d, err
		}
	}
	return d, nil
}

// DeleteOldLocal deletes serverName's local media last accessed (or, never
// accessed, created) before before and larger than sizeGT bytes, in batches,
// as Synapse's "delete local media by date or size": quarantined and
// protected media are kept. With keepProfiles, media whose mxc URI
// profileAvatars reports as an avatar of their uploader's global profile
// are kept too (profileAvatars is then required); per-room avatars and room
// avatars are not detected. It returns what it deleted, also when it stops
// on an error halfway.
func (s *Service) DeleteOldLocal(ctx context.Context, actor, serverName string, before time.Time, sizeGT int64, keepProfiles bool, profileAvatars ProfileAvatars) (Deleted, error) {
	if keepProfiles && profileAvatars == nil {
		return Deleted{}, errors.New("deleting old media: keeping profile avatars needs a profile lookup")
	}
	q := storage.OldMediaQuery{ServerName: serverName, Before: before, SizeGreaterThan: sizeGT, Limit: s.batch}
	var d Deleted
	for {
		page, err := s.admin.ListOldMedia(ctx, q)
		if err != nil {
			return d, fmt.Errorf("deleting old media: listing: %w", err)
		}
		if len(page) == 0 {
			break
		}
		var avatars map[string]bool
		if keepProfiles {
			avatars, err = profileAvatars(ctx, uploaders(page))
			if err != nil {
				return d, fmt.Errorf("deleting old media: looking up profile avatars: %w", err)
			}
		}
		refs := make([]storage.MediaRef, 0, len(page))
		for _, m := range page {
			if avatars["mxc://"+m.ServerName+"/"+m.MediaID] {
				continue
			}
			refs = append(refs, storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID})
		}
		r, err := s.remove(ctx, actor, refs, true, reasonOldLocal)
		d.add(r)
		if err != nil {
			return d, err
		}
		if len(page) < q.Limit {
			break
		}
		last := page[len(page)-1]
		q.After = storage.MediaRef{ServerName: last.ServerName, MediaID: last.MediaID}
	}
	s.logger.Info("old local media deleted", zap.String("actor", actor), zap.String("server_name", serverName),
		zap.Time("before", before), zap.Int64("size_gt", sizeGT), zap.Bool("keep_profiles", keepProfiles),
		zap.Int("count", len(d.Media)), zap.Int64("bytes", d.Bytes))
	return d, nil
}

// uploaders returns the distinct, non-empty uploaders of page, sorted.
func uploaders(page []storage.Media) []string {
	var ids []string
	for _, m := range page {
		if m.UserID != "" {
			ids = append(ids, m.UserID)
		}
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}

// PurgeRemote removes cached remote media last accessed (or, never
// accessed, fetched) before before, except quarantined and protected ones
// (as Synapse), and returns how many items it removed. With a Purger it runs
// as a background job and returns when the job is done; without, inline in
// batches.
func (s *Service) PurgeRemote(ctx context.Context, actor string, before time.Time) (int64, error) {
	s.logger.Info("remote media purge started", zap.String("actor", actor), zap.Time("before", before))
	if s.purger != nil {
		n, err := s.purger.PurgeRemote(ctx, before, actor)
		if err != nil {
			return n, fmt.Errorf("purging remote media: %w", err)
		}
		s.logger.Info("remote media purged", zap.String("actor", actor), zap.Time("before", before), zap.Int64("count", n))
		return n, nil
	}
	q := storage.OldMediaQuery{Remote: true, Before: before, Limit: s.batch}
	var n int64
	for {
		page, err := s.admin.ListOldMedia(ctx, q)
		if err != nil {
			return n, fmt.Errorf("purging remote media: listing: %w", err)
		}
		refs := make([]storage.MediaRef, len(page))
		for i, m := range page {
			refs[i] = storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID}
		}
		r, err := s.remove(ctx, actor, refs, false, reasonPurgeRemote)
		n += int64(len(r.Media))
		if err != nil {
			return n, fmt.Errorf("purging remote media: %w", err)
		}
		if len(page) < q.Limit {
			break
		}
		q.After = refs[len(refs)-1]
	}
	s.logger.Info("remote media purged", zap.String("actor", actor), zap.Time("before", before), zap.Int64("count", n))
	return n, nil
}

// ListUserMedia returns a page of a user's ready local media and how many
// they have in all.
func (s *Service) ListUserMedia(ctx context.Context, q storage.UserMediaQuery) ([]storage.Media, int64, error) {
	page, total, err := s.admin.ListUserMedia(ctx, q)
	if err != nil {
		return nil, 0, fmt.Errorf("listing media of %s: %w", q.UserID, err)
	}
	return page, total, nil
}

// DeleteUserMedia deletes the page of the user's media that q selects (as
// Synapse: the same parameters as ListUserMedia; q.Limit <= 0 deletes
// nothing, and the HTTP API's default is DefaultLimit). Deleted IDs are
// tombstoned.
func (s *Service) DeleteUserMedia(ctx context.Context, actor string, q storage.UserMediaQuery) (Deleted, error) {
	page, _, err := s.admin.ListUserMedia(ctx, q)
	if err != nil {
		return Deleted{}, fmt.Errorf("deleting media of %s: listing: %w", q.UserID, err)
	}
	refs := make([]storage.MediaRef, len(page))
	for i, m := range page {
		refs[i] = storage.MediaRef{ServerName: m.ServerName, MediaID: m.MediaID}
	}
	var d Deleted
	r, err := s.remove(ctx, actor, refs, true, reasonUserMedia)
	d.add(r)
	if err != nil {
		return d, fmt.Errorf("deleting media of %s: %w", q.UserID, err)
	}
	return d, nil
}

// Usage returns a page of per-user usage of local media and how many users
// match in all.
func (s *Service) Usage(ctx context.Context, q storage.UsageQuery) ([]storage.Usage, int64, error) {
	page, total, err := s.admin.ListUsage(ctx, q)
	if err != nil {
		return nil, 0, fmt.Errorf("listing media usage: %w", err)
	}
	return page, total, nil
}
