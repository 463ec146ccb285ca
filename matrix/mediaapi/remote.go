package mediaapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/exactio"
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
	server string
	done   chan struct{}
	// e and err are the outcome, valid once done is closed.
	e   *mediaEntry
	err error
	// turn is the flight's cluster-wide turn to fetch (see remoteTurn),
	// ended by finishRemote.
	turn *turn
}

// admissionRetryAfter is the Retry-After of a fetch refused by the bounds.
const admissionRetryAfter = time.Second

// joinRemote returns the flight of key, and whether the caller leads it
// (and must finish it with finishRemote). A new flight is admitted only
// within the fetch bounds (in total, and per remote server): beyond them it
// fails with 429 M_LIMIT_EXCEEDED before any work (or goroutine) starts.
// Joining a flight in progress costs no fetch and is always admitted.
func (r *Repository) joinRemote(server, key string) (*remoteFlight, bool, error) {
	r.remoteMu.Lock()
	defer r.remoteMu.Unlock()
	if f, ok := r.remoteFlights[key]; ok {
		return f, false, nil
	}
	if len(r.remoteFlights) >= r.maxFetches {
		r.metrics.admissionRejected("remote_total")
		return nil, false, matrix.LimitExceeded("Too many remote media fetches in progress, retry shortly", admissionRetryAfter)
	}
	if r.remotePerServer[server] >= r.maxFetchesPerServer {
		r.metrics.admissionRejected("remote_server")
		return nil, false, matrix.LimitExceeded("Too many media fetches from this server in progress, retry shortly", admissionRetryAfter)
	}
	f := &remoteFlight{server: server, done: make(chan struct{})}
	r.remoteFlights[key] = f
	r.remotePerServer[server]++
	r.metrics.remoteRunning.Inc()
	return f, true, nil
}

// finishRemote ends a flight led by the caller. A successful flight must
// end only once its row is visible to lookups (cached and recorded), so that
// a request that finds no flight also finds the row.
func (r *Repository) finishRemote(key string, f *remoteFlight, e *mediaEntry, err error) {
	r.remoteMu.Lock()
	delete(r.remoteFlights, key)
	if n := r.remotePerServer[f.server]; n <= 1 {
		delete(r.remotePerServer, f.server)
	} else {
		r.remotePerServer[f.server] = n - 1
	}
	r.remoteMu.Unlock()
	r.metrics.remoteRunning.Dec()
	f.e, f.err = e, err
	close(f.done)
	f.turn.end()
}

// streamRemote fetches remote media for the flight it leads and sends the
// bytes to the client as they are stored (the client does not wait for the
// whole file to be stored first). The fetch and the storing go on if the
// client goes away. Errors before the response started are returned; once it
// started the result is a *respondedError, and a failure cuts the connection
// (panic(http.ErrAbortHandler)), so the client never takes a truncated body
// for a whole one.
//
// Quarantine is by content, which is known only once the last byte has been
// hashed. So when the store can quarantine, the last byte is held back until
// the row is recorded: content that turns out quarantined (or whose storing
// failed) cuts the response, which never completes. Content whose size and
// first bytes match a stored blob that is quarantined is not streamed at
// all: it is stored first and the caller answers from its row (404). A
// non-nil entry is returned only then.
func (s *Site) streamRemote(o *resolveOptions, key string, f *remoteFlight, server, id string) (*mediaEntry, error) {
	st, timeout := o.stream, o.timeout
	w, r := st.w, st.r
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), remoteTimeout)
	// Once the store runs in its goroutine, it owns ctx (and the body).
	detached := false
	defer func() {
		if detached {
			return
		}
		cancel()
		// The flight is still ours: a panic must not leave it (and its
		// admission slot) held for ever.
		if v := recover(); v != nil {
			s.repo.finishRemote(key, f, nil, fmt.Errorf("remote_stream: %w: %v", ErrPanicked, v))
			panic(v)
		}
	}()
	start := time.Now()
	rm, err := s.cfg.Remote.Download(ctx, server, id, timeout)
	if err != nil {
		s.repo.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
		s.repo.finishRemote(key, f, nil, err)
		return nil, err
	}
	defer rm.Body.Close()
	if err := s.repo.checkAnnouncedSize(server, id, rm.Size); err != nil {
		s.repo.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
		s.repo.finishRemote(key, f, nil, err)
		return nil, err
	}
	rm.ContentType = storedContentType(rm.ContentType)
	body := sizedBody(rm.Body, rm.Size)
	holdBack := s.repo.admin != nil
	if holdBack {
		var known bool
		if body, known, err = s.repo.likelyQuarantined(ctx, body, rm.Size); err != nil {
			s.repo.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
			s.repo.finishRemote(key, f, nil, err)
			return nil, err
		}
		if known {
			e, err := s.repo.storeRemote(ctx, server, id, rm, body, start)
			s.repo.finishRemote(key, f, e, err)
			return e, err
		}
	}

	if rm.Size >= 0 {
		// Charged like a local download of the whole file, before it is
		// sent.
		s.chargeStreamed(o, rm.Size)
	}
	name := st.fileName
	if name == "" {
		name = dispositionFileName(rm.ContentDisposition)
	}
	h := w.Header()
	setMediaSecurity(h, false)
	h["Content-Type"] = []string{rm.ContentType}
	h["Content-Disposition"] = []string{matrix.ContentDisposition(rm.ContentType, name, false)}
	if rm.Size >= 0 {
		h["Content-Length"] = []string{strconv.FormatInt(rm.Size, 10)}
	}
	w.WriteHeader(http.StatusOK)

	// The bytes go to the client and, through a pipe, to a goroutine that
	// stores them: once the last byte is sent the response ends, while the
	// store finishes (flushes to disk, records the row) on its own and then
	// completes the flight for the requests waiting on it; the flight stays
	// until the row is recorded, so later requests wait for it rather than
	// fetch again. With holdBack the response ends only once the flight did.
	pr, pw := io.Pipe()
	var e *mediaEntry
	s.repo.goFinish("remote_store", func() (err error) {
		e, err = s.repo.storeRemote(ctx, server, id, rm, pr, start)
		return err
	}, func(err error) {
		defer cancel()
		pr.CloseWithError(err) // unblocks the copy below if storing failed early
		s.repo.finishRemote(key, f, e, err)
		if err != nil {
			s.repo.logger.Warn("storing remote media failed while streaming it", zap.String("server_name", server),
				zap.String("media_id", id), zap.Error(err))
		}
	})
	detached = true
	tee := &clientTee{w: w, holdBack: holdBack}
	bp := s.repo.copyBufs.Get().(*[]byte)
	defer s.repo.copyBufs.Put(bp)
	err = relayRemote(body, pw, tee, *bp)
	pw.CloseWithError(err) // nil: EOF for the store
	if err == nil && holdBack {
		// The flight ends once the row is recorded (or storing failed).
		select {
		case <-f.done:
			if f.err != nil || f.e.m.Refused() {
				err = errors.Join(f.err, errHeldBack)
			} else {
				tee.release()
			}
		case <-r.Context().Done():
			err = r.Context().Err()
		}
	}
	s.repo.metrics.downloadBytes.Add(float64(tee.n))
	if rm.Size < 0 {
		// No length announced: what was sent.
		s.chargeStreamed(o, tee.n)
	}
	if err != nil {
		// The fetch or the store failed midway, or the content is
		// quarantined: cut the response so the client does not take a
		// truncated body for a whole one.
		if errors.Is(err, errHeldBack) && f.err == nil {
			s.repo.logger.Info("refused quarantined remote media while streaming it", zap.String("server_name", server),
				zap.String("media_id", id), zap.String("sha256", f.e.m.SHA256))
		}
		panic(http.ErrAbortHandler)
	}
	return nil, &respondedError{status: http.StatusOK}
}

// errHeldBack says a streamed response was cut before its held-back last
// byte.
var errHeldBack = errors.New("streamed response cut before its last byte")

// likelyQuarantined reads the head of a remote body of known size (the
// first storage.PrefixSize bytes) and reports whether a stored blob of the
// same size and head is quarantined: then the content is almost certainly
// quarantined and must not be streamed. It returns a reader of the whole
// body. A failed lookup counts as no (the held-back last byte still guards
// the response); a body that fails while its head is read is an error.
func (r *Repository) likelyQuarantined(ctx context.Context, body io.Reader, size int64) (io.Reader, bool, error) {
	if size < 0 {
		return body, false, nil
	}
	head := make([]byte, min(size, storage.PrefixSize))
	if _, err := io.ReadFull(body, head); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			err = fmt.Errorf("%w: body ended before its announced %d bytes: %w", ErrRemoteUnavailable, size, err)
		}
		return nil, false, fmt.Errorf("reading remote media: %w", err)
	}
	body = io.MultiReader(bytes.NewReader(head), body)
	sum := sha256.Sum256(head)
	cand, err := r.meta.FindBlobByPrefix(ctx, size, hex.EncodeToString(sum[:]))
	if err != nil {
		return body, false, nil
	}
	_, err = r.admin.GetQuarantine(ctx, cand.SHA256)
	return body, err == nil, nil
}

// checkAnnouncedSize refuses remote media whose announced size is over the
// limit, before any byte is read or sent.
func (r *Repository) checkAnnouncedSize(server, id string, size int64) error {
	if size > r.remoteMaxSize {
		return fmt.Errorf("fetching %s/%s: announced %d bytes, limit %d: %w", server, id, size, r.remoteMaxSize, ErrRemoteTooLarge)
	}
	return nil
}

// sizedBody makes a body of announced size fail when it ends early or goes
// on past its size, so that a copy of it never ends cleanly short.
func sizedBody(body io.Reader, size int64) io.Reader {
	if size < 0 {
		return body
	}
	return exactio.NewReader(body, size, "remote media", ErrRemoteUnavailable)
}

// relayRemote passes body to the store (store) and to the client (tee) in
// chunks of up to len(buf)-1 bytes, each read in full before it is passed on
// (the last one excepted). A remote body arrives in pieces of a TLS record
// (16 KiB) or less; passing each piece on as it came would cost a hand-off
// to the storing goroutine and a write to the client's HTTP/2 stream (a
// hand-off to its connection goroutine, and a DATA frame) per piece. It
// returns nil once body ended cleanly (io.EOF), else the first error of
// body or of the store; failures of the client are the tee's.
func relayRemote(body io.Reader, store io.Writer, tee *clientTee, buf []byte) error {
	for {
		// buf[0] is room for the byte the tee holds back (writeChunk).
		n, rerr := fill(body, buf[1:])
		if n > 0 {
			if _, err := store.Write(buf[1 : 1+n]); err != nil {
				return err
			}
			tee.writeChunk(buf[:1+n])
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// fill reads from r into buf until buf is full or r fails; it returns the
// bytes read and r's error (io.EOF itself at a clean end), nil when buf
// was filled.
func fill(r io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		k, err := r.Read(buf[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// clientTee writes to the client until the first failure and then drops
// the rest, so that a client going away does not stop the storing. With
// holdBack the last byte written so far is kept back, and sent by release.
type clientTee struct {
	w        io.Writer
	n        int64
	failed   bool
	holdBack bool
	// last[0] is the held-back byte when held.
	last [1]byte
	held bool
}

// writeChunk sends chunk[1:] to the client unless an earlier write failed;
// with holdBack it sends the byte held back before and all of chunk[1:] but
// its last byte, which it holds back in turn. chunk[0] is room it may
// overwrite: the held-back byte is put there, so that it goes out in the same
// write as the bytes after it (a write of its own would be a DATA frame of
// its own on HTTP/2).
func (t *clientTee) writeChunk(chunk []byte) {
	p := chunk[1:]
	if !t.holdBack || len(p) == 0 {
		t.send(p)
		return
	}
	out := p[:len(p)-1]
	if t.held {
		chunk[0] = t.last[0]
		out = chunk[:len(chunk)-1]
	}
	t.last[0], t.held = p[len(p)-1], true
	t.send(out)
}

// release sends the held-back byte.
func (t *clientTee) release() {
	if t.held {
		t.send(t.last[:])
		t.held = false
	}
}

// send writes p to the client unless an earlier write failed.
func (t *clientTee) send(p []byte) {
	if t.failed || len(p) == 0 {
		return
	}
	n, err := t.w.Write(p)
	t.n += int64(n)
	if err != nil {
		t.failed = true
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
	if err := r.checkAnnouncedSize(server, id, rm.Size); err != nil {
		r.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
		return nil, err
	}
	return r.storeRemote(ctx, server, id, rm, sizedBody(rm.Body, rm.Size), start)
}

// storeRemote stores the body of fetched remote media and records it. The
// remote's Content-Type is checked like an upload's (storedContentType).
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
	if r.hooks.beforeRecord != nil {
		r.hooks.beforeRecord(server, id)
	}
	now := r.now()
	m := storage.Media{
		ServerName: server, MediaID: id, State: storage.StateReady, Remote: true,
		SHA256: res.SHA256, Size: res.Size, Datastore: res.Datastore,
		ContentType: storedContentType(rm.ContentType), Filename: dispositionFileName(rm.ContentDisposition),
		CreatedAt: now, UploadedAt: now,
	}
	gen := r.cacheGen.Load()
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
	case r.admin != nil:
		// Stored whatever its content; whether that content is
		// quarantined (and the item refused) comes with the row.
		if m, err = r.meta.GetMedia(ctx, server, id); err != nil {
			return nil, fmt.Errorf("reading recorded remote media: %w", err)
		}
	default:
		m.CreatedAt, m.UploadedAt = m.CreatedAt.Truncate(time.Millisecond), m.UploadedAt.Truncate(time.Millisecond)
	}
	r.metrics.remoteFetch("ok", res.Size, time.Since(start))
	e := newMediaEntry(m)
	r.cachePut(gen, mediaKey{server, id}, e)
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
	if !matrix.ValidFileName(name) {
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
// allowed in media IDs). The fetch is admitted by the same bounds as remote
// media, and made by one instance of the cluster (remoteTurn).
func (s *Site) remoteThumbnailEntry(ctx context.Context, rt RemoteThumbnailer, k storage.ThumbnailKey, o *resolveOptions) (*mediaEntry, error) {
	timeout := o.timeout
	anim := "s"
	if k.Animated {
		anim = "a"
	}
	internalID := k.MediaID + "~" + strconv.Itoa(k.Width) + "x" + strconv.Itoa(k.Height) + "~" + k.Method + "~" + anim
	ik := mediaKey{k.ServerName, internalID}
	if e, err := s.repo.cachedRemote(ctx, ik); e != nil || err != nil {
		return e, err
	}
	if err := s.admitWork(o, true); err != nil {
		return nil, err
	}
	f, key, e, err := s.joinFlight(ctx, ik)
	if f == nil {
		return e, err
	}
	if e, err, done := s.remoteTurn(ctx, key, f, ik); done {
		return e, err
	}
	return s.leadFetch(ctx, "remote_thumbnail_fetch", key, f, func(fctx context.Context) (*mediaEntry, error) {
		start := time.Now()
		rm, err := rt.Thumbnail(fctx, k.ServerName, k.MediaID, k.Width, k.Height, k.Method, k.Animated, timeout)
		if err != nil {
			s.repo.metrics.remoteFetch(remoteResult(err), 0, time.Since(start))
			return nil, err
		}
		defer rm.Body.Close()
		if ct := storedContentType(rm.ContentType); !strings.HasPrefix(ct, "image/") {
			return nil, fmt.Errorf("remote thumbnail of type %q: %w", rm.ContentType, ErrRemoteUnavailable)
		}
		if err := s.repo.checkAnnouncedSize(k.ServerName, internalID, rm.Size); err != nil {
			return nil, err
		}
		return s.repo.storeRemote(fctx, k.ServerName, internalID, rm, sizedBody(rm.Body, rm.Size), start)
	})
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
