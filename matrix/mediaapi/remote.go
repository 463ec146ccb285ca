package mediaapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
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

// remoteTimeout bounds one remote fetch, whatever the client's timeout_ms.
const remoteTimeout = 5 * time.Minute

// remoteEntry returns the cached remote media item (server, id), fetching it
// from its server first when it is not cached. Concurrent requests for one
// item make one fetch. On failure it writes the error and returns its
// status.
func (s *Site) remoteEntry(w http.ResponseWriter, r *http.Request, server, id string, timeout time.Duration) (*mediaEntry, int) {
	if s.cfg.Remote == nil {
		return nil, writeErr(w, matrix.NotFound("Media not found"))
	}
	key := mediaKey{server, id}
	e, m, err := s.repo.lookup(r.Context(), key)
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
	ch := s.repo.remoteFlights.DoChan(server+"/"+id, func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), remoteTimeout)
		defer cancel()
		return s.repo.fetchRemote(ctx, s.cfg.Remote, server, id, timeout)
	})
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, s.remoteError(w, r, res.Err)
		}
		return res.Val.(*mediaEntry), 0
	case <-r.Context().Done():
		writeErr(w, matrix.Unknown(http.StatusInternalServerError, "Request cancelled"))
		return nil, statusClientGone
	}
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
	res, err := storage.IngestTo(ctx, r.stores, r.meta, storage.KindRemote, rm.Body, storage.PutOptions{
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
	Client *federation.MediaClient
}

// Download implements RemoteFetcher.
func (f FederationFetcher) Download(ctx context.Context, server, mediaID string, timeout time.Duration) (RemoteMedia, error) {
	m, err := f.Client.Download(ctx, server, mediaID, timeout)
	if err != nil {
		switch {
		case errors.Is(err, federation.ErrNotFound):
			err = fmt.Errorf("%w: %w", ErrRemoteNotFound, err)
		case errors.Is(err, federation.ErrNotYetUploaded):
			err = fmt.Errorf("%w: %w", ErrRemoteNotYetUploaded, err)
		case errors.Is(err, federation.ErrRemoteTooLarge):
			err = fmt.Errorf("%w: %w", ErrRemoteTooLarge, err)
		default:
			err = fmt.Errorf("%w: %w", ErrRemoteUnavailable, err)
		}
		return RemoteMedia{}, err
	}
	return RemoteMedia{ContentType: m.ContentType, ContentDisposition: m.ContentDisposition, Size: m.Size,
		Body: remoteBody{m.Body}}, nil
}

// remoteBody maps read errors of a federation body to the RemoteFetcher
// errors (a body over the size limit, a connection cut short).
type remoteBody struct{ io.ReadCloser }

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
