package mediaapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// RemoteMedia is media fetched from another server.
type RemoteMedia struct {
	// ContentType and ContentDisposition are as the remote sent them.
	ContentType, ContentDisposition string
	// Size is the announced length, -1 when unknown.
	Size int64
	// Body streams the content; the caller closes it. Reading beyond the
	// fetcher's size limit fails with an error wrapping ErrRemoteTooLarge.
	Body io.ReadCloser
}

// Errors a RemoteFetcher returns (wrapped), mapped to the spec's answers.
var (
	// ErrRemoteNotFound: the remote does not have the media (404).
	ErrRemoteNotFound = errors.New("remote media not found")
	// ErrRemoteNotYetUploaded: the remote media is still pending (504).
	ErrRemoteNotYetUploaded = errors.New("remote media not yet uploaded")
	// ErrRemoteTooLarge: the remote media is over the size limit (502
	// M_TOO_LARGE).
	ErrRemoteTooLarge = errors.New("remote media too large")
	// ErrRemoteUnavailable: the remote failed or could not be reached (502).
	ErrRemoteUnavailable = errors.New("remote server unavailable")
)

// RemoteFetcher downloads media from other servers over federation, signed
// as the site's server.
type RemoteFetcher interface {
	Download(ctx context.Context, server, mediaID string, timeout time.Duration) (RemoteMedia, error)
}

// RemoteThumbnailer fetches thumbnails made by other servers
// (FederationFetcher implements it).
type RemoteThumbnailer interface {
	Thumbnail(ctx context.Context, server, mediaID string, width, height int, method string, animated bool, timeout time.Duration) (RemoteMedia, error)
}

// remoteTimeout bounds one remote fetch, whatever the client's timeout_ms.
const remoteTimeout = 5 * time.Minute

// remoteFlight is one fetch of a remote media item in progress.
type remoteFlight struct {
	done chan struct{}
	// e and err are the outcome, valid once done is closed.
	e   *mediaEntry
	err error
}

// joinRemote returns the flight of key, and whether the caller leads it
// (and must finish it with finishRemote).
func (r *Repository) joinRemote(key string) (*remoteFlight, bool) {
	r.remoteMu.Lock()
	defer r.remoteMu.Unlock()
	if f, ok := r.remoteFlights[key]; ok {
		return f, false
	}
	f := &remoteFlight{done: make(chan struct{})}
	r.remoteFlights[key] = f
	return f, true
}

// finishRemote ends a flight led by the caller.
func (r *Repository) finishRemote(key string, f *remoteFlight, e *mediaEntry, err error) {
	r.remoteMu.Lock()
	delete(r.remoteFlights, key)
	r.remoteMu.Unlock()
	f.e, f.err = e, err
	close(f.done)
}

// cachedRemote returns the cached copy of a remote item: (nil, 0) when there
// is none yet; on failure the error is written and its status returned.
func (s *Site) cachedRemote(w http.ResponseWriter, r *http.Request, server, id string) (*mediaEntry, int) {
	e, m, err := s.repo.lookup(r.Context(), mediaKey{server, id})
	switch {
	case err == nil && e != nil && m.Remote:
		return e, 0
	case err == nil:
		// A row that is not a ready remote copy (cannot happen for a
		// server name that is not ours, unless the configuration changed).
		return nil, writeErr(w, matrix.NotFound("Media not found"))
	case !errors.Is(err, storage.ErrNotFound):
		return nil, s.internalError(w, "looking up remote media", err)
	}
	return nil, 0
}

// remoteEntry returns the cached remote media item (server, id), fetching it
// from its server first when it is not cached. Concurrent requests for one
// item make one fetch. On failure it writes the error and returns its
// status.
func (s *Site) remoteEntry(w http.ResponseWriter, r *http.Request, server, id string, timeout time.Duration) (*mediaEntry, int) {
	if s.cfg.Remote == nil {
		return nil, writeErr(w, matrix.NotFound("Media not found"))
	}
	if e, st := s.cachedRemote(w, r, server, id); e != nil || st != 0 {
		return e, st
	}
	key := server + "/" + id
	f, leader := s.repo.joinRemote(key)
	if leader {
		go func() {
			// Detached from this request: others may be waiting.
			ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), remoteTimeout)
			defer cancel()
			e, err := s.repo.fetchRemote(ctx, s.cfg.Remote, server, id, timeout)
			s.repo.finishRemote(key, f, e, err)
		}()
	}
	return s.awaitRemote(w, r, f)
}

// awaitRemote waits for a flight's outcome.
func (s *Site) awaitRemote(w http.ResponseWriter, r *http.Request, f *remoteFlight) (*mediaEntry, int) {
	select {
	case <-f.done:
		if f.err != nil {
			return nil, s.remoteError(w, r, f.err)
		}
		return f.e, 0
	case <-r.Context().Done():
		writeErr(w, matrix.Unknown(http.StatusInternalServerError, "Request cancelled"))
		return nil, statusClientGone
	}
}

// serveRemoteDownload answers a download of remote media. A whole GET that
// finds the item neither cached nor being fetched leads the fetch and
// streams the bytes to its client while they are stored (the client does not
// wait for the whole file to be stored first); every other request waits for
// the cached copy and is served from it.
func (s *Site) serveRemoteDownload(w http.ResponseWriter, r *http.Request, server, id, fileName string, timeout time.Duration, legacy bool) int {
	if s.cfg.Remote == nil {
		return writeErr(w, matrix.NotFound("Media not found"))
	}
	e, st := s.cachedRemote(w, r, server, id)
	if st != 0 {
		return st
	}
	if e == nil {
		key := server + "/" + id
		f, leader := s.repo.joinRemote(key)
		streamable := r.Method == http.MethodGet && r.Header.Get("Range") == "" && !legacy
		switch {
		case leader && streamable:
			return s.streamRemote(w, r, key, f, server, id, fileName, timeout)
		case leader:
			go func() {
				ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), remoteTimeout)
				defer cancel()
				e, err := s.repo.fetchRemote(ctx, s.cfg.Remote, server, id, timeout)
				s.repo.finishRemote(key, f, e, err)
			}()
		}
		if e, st = s.awaitRemote(w, r, f); st != 0 {
			return st
		}
	}
	if legacy && s.frozen(e.m.CreatedAt) {
		return writeErr(w, matrix.NotFound("Media not found"))
	}
	return s.sendMedia(w, r, e, fileName, legacy)
}

// streamRemote fetches remote media for the flight it leads and sends the
// bytes to the client as they are stored. The fetch and the storing go on
// if the client goes away; a failure after the response started cuts the
// connection, so the client never takes a truncated body for a whole one.
func (s *Site) streamRemote(w http.ResponseWriter, r *http.Request, key string, f *remoteFlight, server, id, fileName string, timeout time.Duration) int {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), remoteTimeout)
	// Once the store runs in its goroutine, it owns ctx (and the body).
	detached := false
	defer func() {
		if !detached {
			cancel()
		}
	}()
	start := time.Now()
	rm, err := s.cfg.Remote.Download(ctx, server, id, timeout)
	if err != nil {
		s.repo.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
		s.repo.finishRemote(key, f, nil, err)
		return s.remoteError(w, r, err)
	}
	defer rm.Body.Close()
	if rm.Size > s.repo.remoteMaxSize {
		err := fmt.Errorf("fetching %s/%s: announced %d bytes, limit %d: %w", server, id, rm.Size, s.repo.remoteMaxSize, ErrRemoteTooLarge)
		s.repo.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
		s.repo.finishRemote(key, f, nil, err)
		return s.remoteError(w, r, err)
	}

	ct := rm.ContentType
	if ct == "" {
		ct = "application/octet-stream"
	}
	name := fileName
	if name == "" {
		name = dispositionFileName(rm.ContentDisposition)
	}
	h := w.Header()
	setMediaSecurity(h, false)
	h["Content-Type"] = []string{ct}
	h["Content-Disposition"] = []string{matrix.ContentDisposition(ct, name, false)}
	if rm.Size >= 0 {
		h["Content-Length"] = []string{strconv.FormatInt(rm.Size, 10)}
	}
	w.WriteHeader(http.StatusOK)

	// The bytes go to the client and, through a pipe, to a goroutine that
	// stores them: once the last byte is sent the response ends, while the
	// store finishes (flushes to disk, records the row) on its own and then
	// completes the flight for the requests waiting on it.
	pr, pw := io.Pipe()
	go func() {
		defer cancel()
		e, err := s.repo.storeRemote(ctx, server, id, rm, pr, start)
		pr.CloseWithError(err) // unblocks the copy below if storing failed early
		s.repo.finishRemote(key, f, e, err)
		if err != nil {
			s.repo.logger.Warn("storing remote media failed while streaming it", zap.String("server_name", server),
				zap.String("media_id", id), zap.Error(err))
		}
	}()
	detached = true
	tee := &clientTee{w: w}
	bp := s.repo.copyBufs.Get().(*[]byte)
	defer s.repo.copyBufs.Put(bp)
	_, err = io.CopyBuffer(io.MultiWriter(pw, tee), rm.Body, *bp)
	pw.CloseWithError(err) // nil: EOF for the store
	s.repo.metrics.downloadBytes.Add(float64(tee.n))
	if err != nil {
		// The fetch or the store failed midway: cut the response so the
		// client does not take a truncated body for a whole one.
		panic(http.ErrAbortHandler)
	}
	return http.StatusOK
}

// clientTee writes to the client until the first failure and then drops
// the rest, so that a client going away does not stop the storing.
type clientTee struct {
	w      io.Writer
	n      int64
	failed bool
}

// Write sends p to the client unless an earlier write failed, and always
// reports success.
func (t *clientTee) Write(p []byte) (int, error) {
	if !t.failed {
		n, err := t.w.Write(p)
		t.n += int64(n)
		if err != nil {
			t.failed = true
		}
	}
	return len(p), nil
}

// fetchRemote downloads remote media, stores it content-addressed (kind
// remote, deduplicated with everything else) and records it.
func (r *Repository) fetchRemote(ctx context.Context, f RemoteFetcher, server, id string, timeout time.Duration) (*mediaEntry, error) {
	start := time.Now()
	rm, err := f.Download(ctx, server, id, timeout)
	if err != nil {
		r.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
		return nil, err
	}
	defer rm.Body.Close()
	return r.storeRemote(ctx, server, id, rm, rm.Body, start)
}

// storeRemote stores the body of fetched remote media and records it.
func (r *Repository) storeRemote(ctx context.Context, server, id string, rm RemoteMedia, body io.Reader, start time.Time) (*mediaEntry, error) {
	res, err := storage.IngestTo(ctx, r.stores, r.meta, storage.KindRemote, body, storage.PutOptions{
		MaxSize: r.remoteMaxSize, ExpectedSize: rm.Size,
	})
	if err != nil {
		if errors.Is(err, storage.ErrTooLarge) {
			err = fmt.Errorf("storing remote media: %w: %w", ErrRemoteTooLarge, err)
		} else if errors.Is(err, storage.ErrSizeMismatch) {
			err = fmt.Errorf("storing remote media: %w: %w", ErrRemoteUnavailable, err)
		}
		r.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
		return nil, fmt.Errorf("fetching %s/%s: %w", server, id, err)
	}
	now := r.now()
	m := storage.Media{
		ServerName: server, MediaID: id, State: storage.StateReady, Remote: true,
		SHA256: res.SHA256, Size: res.Size, Datastore: res.Datastore,
		ContentType: rm.ContentType, Filename: dispositionFileName(rm.ContentDisposition),
		CreatedAt: now, UploadedAt: now,
	}
	err = r.meta.InsertMedia(ctx, m)
	switch {
	case errors.Is(err, storage.ErrConflict):
		// Fetched meanwhile by another instance: use its row.
		m, err = r.meta.GetMedia(ctx, server, id)
		if err != nil {
			return nil, fmt.Errorf("reading remote media recorded by another instance: %w", err)
		}
	case err != nil:
		return nil, fmt.Errorf("recording remote media: %w", err)
	default:
		m.CreatedAt, m.UploadedAt = m.CreatedAt.Truncate(time.Millisecond), m.UploadedAt.Truncate(time.Millisecond)
	}
	r.metrics.remoteFetch("ok", res.Size, time.Since(start))
	e := newMediaEntry(m)
	if r.cache != nil {
		r.cache.put(mediaKey{server, id}, e)
	}
	r.logger.Info("remote media cached", zap.String("server_name", server), zap.String("media_id", id),
		zap.Int64("size", res.Size), zap.Bool("dedup", res.Existed), zap.Duration("duration", time.Since(start)))
	return e, nil
}

// dispositionFileName is the file name of a Content-Disposition value, or "".
func dispositionFileName(cd string) string {
	if cd == "" {
		return ""
	}
	_, params, err := mime.ParseMediaType(cd)
	if err != nil {
		return ""
	}
	name := params["filename"]
	if !validFileName(name) {
		return ""
	}
	return name
}

// remoteResult is the metric label of a remote fetch outcome.
func remoteResult(err error) string {
	switch {
	case errors.Is(err, ErrRemoteNotFound):
		return "not_found"
	case errors.Is(err, ErrRemoteNotYetUploaded):
		return "not_yet_uploaded"
	case errors.Is(err, ErrRemoteTooLarge):
		return "too_large"
	case errors.Is(err, ErrRemoteUnavailable):
		return "unavailable"
	default:
		return "error"
	}
}

// remoteError answers a failed remote fetch.
func (s *Site) remoteError(w http.ResponseWriter, r *http.Request, err error) int {
	switch {
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
	case errors.Is(err, storage.ErrUnavailable):
		s.repo.logger.Error("media storage unavailable while caching remote media", zap.Error(err))
		return writeErr(w, matrix.Unknown(http.StatusBadGateway, "Media storage is unavailable, try again later"))
	default:
		return s.internalError(w, "fetching remote media", err)
	}
}

// FederationFetcher adapts a federation.MediaClient to RemoteFetcher.
type FederationFetcher struct {
	// Client fetches over federation, signed as the site. Required.
	Client *federation.MediaClient
}

// Download implements RemoteFetcher.
func (f FederationFetcher) Download(ctx context.Context, server, mediaID string, timeout time.Duration) (RemoteMedia, error) {
	m, err := f.Client.Download(ctx, server, mediaID, timeout)
	if err != nil {
		return RemoteMedia{}, mapFederationError(err)
	}
	return RemoteMedia{ContentType: m.ContentType, ContentDisposition: m.ContentDisposition, Size: m.Size,
		Body: remoteBody{m.Body}}, nil
}

// Thumbnail implements RemoteThumbnailer.
func (f FederationFetcher) Thumbnail(ctx context.Context, server, mediaID string, width, height int, method string, animated bool, timeout time.Duration) (RemoteMedia, error) {
	m, err := f.Client.Thumbnail(ctx, server, mediaID, width, height, method, animated, timeout)
	if err != nil {
		return RemoteMedia{}, mapFederationError(err)
	}
	return RemoteMedia{ContentType: m.ContentType, ContentDisposition: m.ContentDisposition, Size: m.Size,
		Body: remoteBody{m.Body}}, nil
}

// mapFederationError maps federation client errors to the RemoteFetcher
// errors.
func mapFederationError(err error) error {
	switch {
	case errors.Is(err, federation.ErrNotFound):
		return fmt.Errorf("%w: %w", ErrRemoteNotFound, err)
	case errors.Is(err, federation.ErrNotYetUploaded):
		return fmt.Errorf("%w: %w", ErrRemoteNotYetUploaded, err)
	case errors.Is(err, federation.ErrRemoteTooLarge):
		return fmt.Errorf("%w: %w", ErrRemoteTooLarge, err)
	default:
		return fmt.Errorf("%w: %w", ErrRemoteUnavailable, err)
	}
}

// remoteThumbnailEntry returns the remote server's own thumbnail k of a
// remote media item, fetched once and cached content-addressed like remote
// media, under an internal media ID that no request can name ('~' is not
// allowed in media IDs).
func (s *Site) remoteThumbnailEntry(w http.ResponseWriter, r *http.Request, rt RemoteThumbnailer, k storage.ThumbnailKey, timeout time.Duration) (*mediaEntry, int) {
	anim := "s"
	if k.Animated {
		anim = "a"
	}
	internalID := k.MediaID + "~" + strconv.Itoa(k.Width) + "x" + strconv.Itoa(k.Height) + "~" + k.Method + "~" + anim
	if e, st := s.cachedRemote(w, r, k.ServerName, internalID); e != nil || st != 0 {
		return e, st
	}
	key := k.ServerName + "/" + internalID
	f, leader := s.repo.joinRemote(key)
	if leader {
		go func() {
			ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), remoteTimeout)
			defer cancel()
			start := time.Now()
			rm, err := rt.Thumbnail(ctx, k.ServerName, k.MediaID, k.Width, k.Height, k.Method, k.Animated, timeout)
			if err != nil {
				s.repo.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
				s.repo.finishRemote(key, f, nil, err)
				return
			}
			defer rm.Body.Close()
			if !strings.HasPrefix(rm.ContentType, "image/") {
				err := fmt.Errorf("remote thumbnail of type %q: %w", rm.ContentType, ErrRemoteUnavailable)
				s.repo.finishRemote(key, f, nil, err)
				return
			}
			e, err := s.repo.storeRemote(ctx, k.ServerName, internalID, rm, rm.Body, start)
			s.repo.finishRemote(key, f, e, err)
		}()
	}
	return s.awaitRemote(w, r, f)
}

// remoteBody maps read errors of a federation body to the RemoteFetcher
// errors (a body over the size limit, a connection cut short).
type remoteBody struct{ io.ReadCloser }

// Read reads the body, mapping its errors.
func (b remoteBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	switch {
	case err == nil || err == io.EOF:
	case errors.Is(err, federation.ErrRemoteTooLarge) || errors.Is(err, federation.ErrTooLarge):
		err = fmt.Errorf("%w: %w", ErrRemoteTooLarge, err)
	default:
		err = fmt.Errorf("%w: %w", ErrRemoteUnavailable, err)
	}
	return n, err
}
