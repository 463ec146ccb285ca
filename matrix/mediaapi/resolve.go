package mediaapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// This file answers "which media is this": one resolver for the download
// and thumbnail endpoints. A media item is
//
//   - local: its server name is one of the sites of this repository (the
//     requesting site or a sibling site of the same Caddy): served straight
//     from the shared store, waiting for a pending upload if needed;
//   - remote: cached from an earlier fetch, or fetched now over federation
//     (one fetch per item, admitted by the fetch bounds before it starts).
//
// The requesting site's rules apply in both cases: its authentication (done
// by the handler), its legacy freeze and its remote fetcher.

// localNames are the server names served by the sites of a repository,
// reference counted: during a config reload the same name is registered by
// the old and the new site.
type localNames struct {
	mu    sync.RWMutex
	names map[string]int
}

// register adds one reference to name.
func (l *localNames) register(name string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.names == nil {
		l.names = make(map[string]int)
	}
	l.names[name]++
}

// unregister drops one reference to name.
func (l *localNames) unregister(name string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.names[name] <= 1 {
		delete(l.names, name)
		return
	}
	l.names[name]--
}

// has reports whether a site serves name.
func (l *localNames) has(name string) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.names[name] > 0
}

// IsLocal reports whether a site of this repository serves the server name
// (its media is local: served from the shared store, never fetched).
func (r *Repository) IsLocal(serverName string) bool { return r.locals.has(serverName) }

// Close retires the site: its server name stops being local to the
// repository (once every site registered under it is closed), so that media
// of that name is treated as remote again. Call it when the site is no
// longer served, e.g. from the Caddy handler's Cleanup after a reload. It is
// safe to call more than once.
func (s *Site) Close() {
	s.closeOnce.Do(func() {
		s.repo.locals.unregister(s.cfg.ServerName)
		s.repo.quotaSites.remove(s)
	})
}

// resolveOptions say how a request may find its media.
type resolveOptions struct {
	// legacy: the unauthenticated legacy endpoint. The site's freeze
	// applies and allow_remote is honoured.
	legacy bool
	// allowRemote is the legacy allow_remote parameter (default true).
	allowRemote bool
	// timeout is how long to wait for a pending upload (timeout_ms), here
	// or on the remote server.
	timeout time.Duration
	// req and user (nil: anonymous) are the client request resolving,
	// for the rate limits charged along the way (admitWork): a remote
	// fetch (or joining one) is charged to RateRemote before it starts.
	// Without req nothing is charged.
	req  *http.Request
	user *auth.User
	// deferDownload says the handler has not charged the request's
	// RateDownload yet, to charge it with the download's bytes in one
	// Limiter call once the entry is known (chargeDownload). resolve
	// charges it itself (and clears it) before waiting for a pending
	// upload or fetching remote media.
	deferDownload bool
	// stream, when set, is the response of a whole GET: if this request
	// leads a new remote fetch, the bytes are sent to it while they are
	// stored, and resolve returns a *respondedError.
	stream *streamTarget
}

// streamTarget is a response a first remote download streams to.
type streamTarget struct {
	w        http.ResponseWriter
	r        *http.Request
	fileName string
}

// respondedError says the response was already written (a streamed remote
// download, or an error answered midway); status is for metrics.
type respondedError struct{ status int }

func (e *respondedError) Error() string {
	return fmt.Sprintf("response already written (%d)", e.status)
}

// errMediaNotFound is the answer for unknown, frozen or unreachable media.
var errMediaNotFound = matrix.NotFound("Media not found")

// errRefused is the answer for refused media (quarantined content): the
// same as errMediaNotFound to the client, a value of its own so that
// thumbnails can answer with the placeholder instead.
var errRefused = matrix.NotFound("Media not found")

// admit returns the ready entry e unless its content is quarantined (and
// the item not protected), in which case the answer is 404 M_NOT_FOUND
// (errRefused). Every path that serves media or thumbnails goes through
// it: local (own and sibling sites), cached remote, freshly fetched remote,
// federation. The row's quarantine comes with the row itself (GetMedia joins
// it), so this costs no query; a cached row is kept up to date by
// ForgetContent.
func admit(e *mediaEntry) (*mediaEntry, error) {
	if e.m.Refused() {
		return nil, errRefused
	}
	return e, nil
}

// resolve returns the ready media item (server, id) for the site's request:
// local (any site of this repository), cached remote, or fetched now.
// Errors are *matrix.Error, *respondedError, or errors of the store and the
// remote fetcher, which fail maps to answers.
func (s *Site) resolve(ctx context.Context, server, id string, o *resolveOptions) (*mediaEntry, error) {
	if s.isLocal(server) {
		return s.resolveLocal(ctx, mediaKey{server, id}, o)
	}
	return s.resolveRemote(ctx, server, id, o)
}

// isLocal reports whether server is the site's own server name or that of
// another site of this repository.
func (s *Site) isLocal(server string) bool {
	return server == s.cfg.ServerName || s.repo.IsLocal(server)
}

// mayFetch reports whether the request may fetch remote media that is not
// cached: always on authenticated endpoints; on legacy ones only with
// allow_remote and outside the legacy freeze (a copy fetched now is created
// now).
func (s *Site) mayFetch(o *resolveOptions) bool {
	return !o.legacy || (o.allowRemote && !s.frozen(s.repo.now()))
}

// resolveLocal returns a local media item, waiting up to o.timeout for a
// pending upload.
func (s *Site) resolveLocal(ctx context.Context, key mediaKey, o *resolveOptions) (*mediaEntry, error) {
	e, m, err := s.repo.lookup(ctx, key)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return nil, errMediaNotFound
	case err != nil:
		return nil, fmt.Errorf("looking up media: %w", err)
	}
	if o.legacy && s.frozen(m.CreatedAt) {
		return nil, errMediaNotFound
	}
	if e == nil {
		if err := s.admitWork(o, false); err != nil {
			return nil, err
		}
		if e, err = s.waitForUpload(ctx, key, m, o.timeout); err != nil {
			return nil, err
		}
	}
	return admit(e)
}

// resolveRemote returns remote media: the cached copy, or a fresh one
// fetched now (or by a fetch in progress). Everything that can refuse the
// request (no fetcher, allow_remote=false, the freeze, the fetch bounds) is
// decided before any fetch starts.
func (s *Site) resolveRemote(ctx context.Context, server, id string, o *resolveOptions) (*mediaEntry, error) {
	if s.cfg.Remote == nil || (o.legacy && !o.allowRemote) {
		return nil, errMediaNotFound
	}
	e, err := s.repo.cachedRemote(ctx, mediaKey{server, id})
	if err != nil {
		return nil, err
	}
	if e == nil && s.repo.hooks.missed != nil {
		s.repo.hooks.missed(server + "/" + id)
	}
	if e == nil {
		// Not cached: decided before anything is fetched or stored.
		if !s.mayFetch(o) {
			return nil, errMediaNotFound
		}
		if err := s.admitWork(o, true); err != nil {
			return nil, err
		}
		if e, err = s.fetchOrJoin(ctx, server, id, o); err != nil {
			return nil, err
		}
	}
	if o.legacy && s.frozen(e.m.CreatedAt) {
		return nil, errMediaNotFound
	}
	return admit(e)
}

// admitRemoteThumbnail admits a thumbnail made by a remote server (te,
// cached under an internal ID) of the remote item server/id: refused when
// its own bytes are quarantined, or when the original is cached here and
// refused.
func (s *Site) admitRemoteThumbnail(ctx context.Context, server, id string, te *mediaEntry) (*mediaEntry, error) {
	if te.m.Refused() {
		return nil, errRefused
	}
	e, _, err := s.repo.lookup(ctx, mediaKey{server, id})
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return te, nil
	case err != nil:
		return nil, fmt.Errorf("looking up remote media: %w", err)
	case e != nil && e.m.Refused():
		return nil, errRefused
	}
	return te, nil
}

// cachedRemote returns the cached copy of a remote item, nil when there is
// none yet.
func (r *Repository) cachedRemote(ctx context.Context, k mediaKey) (*mediaEntry, error) {
	e, m, err := r.lookup(ctx, k)
	switch {
	case err == nil && e != nil && m.Remote:
		return e, nil
	case err == nil:
		// A row that is not a ready remote copy (a server name that was
		// local under an earlier configuration).
		return nil, errMediaNotFound
	case errors.Is(err, storage.ErrNotFound):
		return nil, nil
	default:
		return nil, fmt.Errorf("looking up remote media: %w", err)
	}
}

// fetchOrJoin joins the fetch of a remote item in progress, or leads a new
// one when the fetch bounds admit it.
func (s *Site) fetchOrJoin(ctx context.Context, server, id string, o *resolveOptions) (*mediaEntry, error) {
	f, key, e, err := s.joinFlight(ctx, mediaKey{server, id})
	if f == nil {
		return e, err
	}
	if e, err, done := s.remoteTurn(ctx, key, f, mediaKey{server, id}); done {
		return e, err
	}
	if o.stream != nil {
		return s.streamRemote(o, key, f, server, id)
	}
	// Not o itself: the fetch outlives the request's options.
	timeout := o.timeout
	return s.leadFetch(ctx, "remote_fetch", key, f, func(fctx context.Context) (*mediaEntry, error) {
		return s.repo.fetchRemote(fctx, s.cfg.Remote, server, id, timeout)
	})
}

// joinFlight joins the flight of the remote item k, or starts one when the
// fetch bounds admit it. A nil flight means the outcome (e, err) is known: a
// follower waited for its leader; a refused admission; or the new leader
// found the item recorded by a fetch that ended between the caller's lookup
// and the join (flights end only once their row is visible, so one look
// again is enough). Otherwise the caller leads the returned flight, named
// key, and must end it (leadFetch or finishRemote).
func (s *Site) joinFlight(ctx context.Context, k mediaKey) (f *remoteFlight, key string, e *mediaEntry, err error) {
	key = k.server + "/" + k.id
	f, leader, err := s.repo.joinRemote(k.server, key)
	if err != nil {
		return nil, key, nil, err
	}
	if s.repo.hooks.joined != nil {
		s.repo.hooks.joined(key, leader)
	}
	if !leader {
		e, err = awaitRemote(ctx, f)
		return nil, key, e, err
	}
	// Detached from this request: the outcome goes to every waiter, and
	// this client leaving must not become their error.
	if e, err := s.repo.cachedRemote(context.WithoutCancel(ctx), k); e != nil || err != nil {
		s.repo.finishRemote(key, f, e, err)
		return nil, key, e, err
	}
	return f, key, nil, nil
}

// remoteTurn makes the flight f (named key) of the remote item k, which
// the caller leads in this process, the only fetch of k in the cluster: it
// waits for k's cluster lock, or for another instance to record k. done
// reports that the flight ended (with the item recorded elsewhere, or an
// error); otherwise the caller fetches, and finishRemote ends the turn once
// the row is recorded. The wait is detached from the client, like the fetch
// it stands for (others in this process may be waiting on the flight), and
// bounded by remoteTimeout.
func (s *Site) remoteTurn(ctx context.Context, key string, f *remoteFlight, k mediaKey) (*mediaEntry, error, bool) {
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), remoteTimeout)
	defer cancel()
	var found *mediaEntry
	t, err := s.repo.waitTurn(wctx, "remote/"+key, func(c context.Context) (bool, error) {
		var err error
		found, err = s.repo.cachedRemote(c, k)
		return found != nil, err
	})
	if t == nil {
		s.repo.finishRemote(key, f, found, err)
		return found, err, true
	}
	f.turn = t
	return nil, nil, false
}

// leadFetch runs fetch for the flight f (named key) that the caller leads,
// detached from the request (others may be waiting) and bounded by
// remoteTimeout, ends the flight with its outcome, also when fetch panics
// or the repository is draining (goFinish), and waits for it.
func (s *Site) leadFetch(ctx context.Context, where, key string, f *remoteFlight, fetch func(context.Context) (*mediaEntry, error)) (*mediaEntry, error) {
	var e *mediaEntry
	s.repo.goFinish(where, func() (err error) {
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), remoteTimeout)
		defer cancel()
		e, err = fetch(fctx)
		return err
	}, func(err error) { s.repo.finishRemote(key, f, e, err) })
	return awaitRemote(ctx, f)
}

// awaitRemote waits for a flight's outcome.
func awaitRemote(ctx context.Context, f *remoteFlight) (*mediaEntry, error) {
	select {
	case <-f.done:
		return f.e, f.err
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for remote media: %w", ctx.Err())
	}
}

// fail answers a failed resolution (or any step error) and returns the
// status, for metrics: *matrix.Error as is, a response already written as
// its status, and store and remote errors mapped to the spec's answers.
func (s *Site) fail(w http.ResponseWriter, r *http.Request, err error) int {
	var me *matrix.Error
	var done *respondedError
	switch {
	case errors.As(err, &done):
		return done.status
	case errors.As(err, &me):
		return writeErr(w, me)
	case r.Context().Err() != nil:
		writeErr(w, matrix.Unknown(http.StatusInternalServerError, "Request cancelled"))
		return statusClientGone
	case errors.Is(err, ErrRemoteNotFound):
		return writeErr(w, matrix.NotFound("Media not found"))
	case errors.Is(err, ErrRemoteNotYetUploaded):
		return writeErr(w, matrix.NotYetUploaded("Remote media has not been uploaded yet"))
	case errors.Is(err, ErrRemoteTooLarge):
		return writeErr(w, matrix.NewError(http.StatusBadGateway, matrix.CodeTooLarge, "Remote media is too large"))
	case errors.Is(err, ErrRemoteUnavailable):
		s.repo.logger.Warn("fetching remote media failed", zap.Error(err))
		return writeErr(w, matrix.Unknown(http.StatusBadGateway, "Could not fetch the media from its server"))
	case errors.Is(err, ErrShuttingDown):
		w.Header().Set("Retry-After", "1")
		return writeErr(w, matrix.Unknown(http.StatusServiceUnavailable, "The media repository is reloading, retry"))
	default:
		// Including storage.ErrUnavailable: 503 with Retry-After.
		return s.internalError(w, "resolving media", err)
	}
}
