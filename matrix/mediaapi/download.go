package mediaapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// lookup returns the media item k: a cache entry when it is ready (entry
// non-nil), or the pending row (entry nil). Errors wrap storage.ErrNotFound
// for unknown items. Ready rows read from the store enter the cache; pending
// rows never do.
func (r *Repository) lookup(ctx context.Context, k mediaKey) (*mediaEntry, storage.Media, error) {
	if r.cache != nil {
		if e := r.cache.get(k); e != nil {
			return e, e.m, nil
		}
	}
	gen := r.cacheGen.Load()
	m, err := r.meta.GetMedia(ctx, k.server, k.id)
	if err != nil {
		return nil, storage.Media{}, err
	}
	if m.State != storage.StateReady {
		return nil, m, nil
	}
	e := newMediaEntry(m)
	r.cachePut(gen, k, e)
	return e, m, nil
}

// cachePut caches the entry of a row read (or written) after the cache
// generation was gen. When an invalidation (Forget, ForgetContent) ran
// since, the row may predate it and is not kept: an invalidation either sees
// the entry in its scan or bumped the generation before this check.
func (r *Repository) cachePut(gen uint64, k mediaKey, e *mediaEntry) {
	if r.cache == nil {
		return
	}
	r.cache.put(k, e)
	if r.cacheGen.Load() != gen {
		r.cache.remove(k)
	}
}

// serveDownload handles GET and HEAD of
// .../download/{serverName}/{mediaId}[/{fileName}].
func (s *Site) serveDownload(w http.ResponseWriter, r *http.Request, rt *route) int {
	var user *auth.User
	if !rt.legacy {
		// Authenticated media (MSC3916): guests may download (MSC4189).
		u, st := s.authenticate(w, r, true)
		if st != 0 {
			return st
		}
		user = &u
	}
	// With download_bytes limited, the request is charged with its bytes,
	// in one Limiter call, once they are known (chargeDownload), or by
	// resolve before it waits or fetches (admitWork), or alone when
	// resolving fails (checking the request's parameters costs nothing).
	deferDownload := s.rate.has(RateDownloadBytes)
	if !deferDownload {
		if st := s.limit(w, r, user, rateCost{class: RateDownload, cost: 1}); st != 0 {
			return st
		}
	}
	server, id, merr := rt.mediaRef()
	if merr != nil {
		return writeErr(w, merr)
	}
	var fileName string
	if rt.hasFileName && rt.rawFileName != "" {
		var ok bool
		fileName, ok = unescapeSegment(rt.rawFileName)
		if !ok || !matrix.ValidFileName(fileName) {
			return writeErr(w, matrix.InvalidParam("Invalid file name"))
		}
	}
	timeout, merr := s.downloadTimeout(r.URL.RawQuery)
	if merr != nil {
		return writeErr(w, merr)
	}
	o := resolveOptions{legacy: rt.legacy, allowRemote: allowRemote(r.URL.RawQuery), timeout: timeout,
		req: r, user: user, deferDownload: deferDownload}
	if r.Method == http.MethodGet && r.Header.Get("Range") == "" && !rt.legacy {
		// A first download of remote media streams while it is stored.
		o.stream = &streamTarget{w: w, r: r, fileName: fileName}
	}
	e, err := s.resolve(r.Context(), server, id, &o)
	if err != nil {
		if o.deferDownload {
			// Unknown media costs a request too.
			if merr := s.checkLimit(r, user, rateCost{class: RateDownload, cost: 1}); merr != nil {
				return writeErr(w, merr)
			}
		}
		return s.fail(w, r, err)
	}
	if merr := s.chargeDownload(&o, e); merr != nil {
		return writeErr(w, merr)
	}
	s.repo.noteAccess(&e.m)
	return s.sendMedia(w, r, e, fileName, rt.legacy)
}

// allowRemote reads the legacy allow_remote parameter (default true).
func allowRemote(rawQuery string) bool {
	v, found, _ := matrix.QueryParam(rawQuery, "allow_remote")
	return !found || v != "false"
}

// frozen reports whether media created at created is hidden from the
// unauthenticated legacy endpoints.
func (s *Site) frozen(created time.Time) bool {
	return s.cfg.FreezeLegacy && (s.cfg.FreezeSince.IsZero() || !created.Before(s.cfg.FreezeSince))
}

// downloadTimeout reads timeout_ms (or MSC2246's unstable name): how long to
// wait for a pending upload. Default 20 s, capped at MaxDownloadTimeout.
func (s *Site) downloadTimeout(rawQuery string) (time.Duration, *matrix.Error) {
	v, found, ok := matrix.QueryParam(rawQuery, "timeout_ms")
	if !found {
		v, found, ok = matrix.QueryParam(rawQuery, "fi.mau.msc2246.timeout_ms")
	}
	if !found {
		return s.downloadWait, nil
	}
	if !ok {
		return 0, matrix.InvalidParam("timeout_ms must be a non-negative integer")
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		if errors.Is(err, strconv.ErrRange) && v != "" && v[0] != '-' {
			return s.cfg.MaxDownloadTimeout, nil
		}
		return 0, matrix.InvalidParam("timeout_ms must be a non-negative integer")
	}
	if n < 0 {
		return 0, matrix.InvalidParam("timeout_ms must be a non-negative integer")
	}
	if n >= s.cfg.MaxDownloadTimeout.Milliseconds() {
		return s.cfg.MaxDownloadTimeout, nil
	}
	return time.Duration(n) * time.Millisecond, nil
}

// waitForUpload waits up to timeout for the pending item m to get its
// content: woken through the cluster coordinator when a PUT on any instance
// completes it (and, should that notification be lost, by the
// coordinator's fallback wake-up), re-reading the store each time. It gives
// up early when ctx ends (the client disconnected).
func (s *Site) waitForUpload(ctx context.Context, key mediaKey, m storage.Media, timeout time.Duration) (*mediaEntry, error) {
	if !s.repo.now().Before(m.ExpiresAt) {
		return nil, errMediaNotFound
	}
	if timeout <= 0 {
		return nil, matrix.NotYetUploaded("Media has not been uploaded yet")
	}
	sub, unsubscribe := s.repo.waits.subscribe(s.repo.cluster, key)
	defer unsubscribe()
	s.repo.metrics.waiting.Inc()
	defer s.repo.metrics.waiting.Dec()

	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		// The first check also covers an upload that completed between the
		// caller's lookup and the subscription.
		if e, err, done := s.recheckPending(ctx, key); done {
			return e, err
		}
		select {
		case <-sub.C:
		case <-timer.C:
			if e, err, done := s.recheckPending(ctx, key); done {
				return e, err
			}
			return nil, matrix.NotYetUploaded("Media has not been uploaded yet")
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for an upload: %w", ctx.Err())
		}
	}
}

// recheckPending reads the item again while waiting. done reports a final
// answer: the ready entry, or an error.
func (s *Site) recheckPending(ctx context.Context, key mediaKey) (e *mediaEntry, err error, done bool) {
	e, m, err := s.repo.lookup(ctx, key)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		// Expired and cleaned up meanwhile.
		return nil, errMediaNotFound, true
	case err != nil:
		if ctx.Err() != nil {
			return nil, nil, false // the select notices the disconnect
		}
		return nil, fmt.Errorf("looking up pending media: %w", err), true
	case e != nil:
		return e, nil, true
	case !s.repo.now().Before(m.ExpiresAt):
		return nil, errMediaNotFound, true
	}
	return nil, nil, false
}

// sendMedia writes a ready media item: conditional requests, one byte range,
// HEAD, and a body copied straight from the blob (sendfile when the blob is a
// file and w a plain connection).
func (s *Site) sendMedia(w http.ResponseWriter, r *http.Request, e *mediaEntry, fileName string, legacy bool) int {
	h := w.Header()
	if notModified(r, e) {
		setMediaSecurity(h, legacy)
		h["Etag"] = e.etag
		h["Last-Modified"] = e.lastModified
		w.WriteHeader(http.StatusNotModified)
		return http.StatusNotModified
	}

	size := e.m.Size
	status := http.StatusOK
	start, length := int64(0), size
	if rv := r.Header["Range"]; len(rv) > 0 && ifRangeHolds(r, e) {
		var kind rangeKind
		start, length, kind = parseRange(rv[0], size)
		switch kind {
		case rangeSatisfiable:
			status = http.StatusPartialContent
		case rangeUnsatisfiable:
			h["Content-Range"] = []string{"bytes */" + e.contentLength[0]}
			h["Accept-Ranges"] = hdrAcceptRanges
			return writeErr(w, matrix.Unknown(http.StatusRequestedRangeNotSatisfiable, "Requested range not satisfiable"))
		default:
			start, length = 0, size
		}
	}
	disposition := e.disposition
	if fileName != "" {
		disposition = []string{matrix.ContentDisposition(e.contentType[0], fileName, false)}
	}

	if st, done := s.redirect(w, r, e, disposition[0], legacy); done {
		return st
	}
	content, err := s.openContent(r, e, start, length)
	if err != nil {
		return s.contentError(w, r, e, err)
	}
	if content != nil {
		defer content.Close()
	}

	setMediaSecurity(h, legacy)
	h["Content-Type"] = e.contentType
	h["Content-Disposition"] = disposition
	h["Etag"] = e.etag
	h["Last-Modified"] = e.lastModified
	h["Accept-Ranges"] = hdrAcceptRanges
	if status == http.StatusPartialContent {
		h["Content-Range"] = []string{contentRange(start, length, size)}
		h["Content-Length"] = []string{strconv.FormatInt(length, 10)}
	} else {
		h["Content-Length"] = e.contentLength
	}
	w.WriteHeader(status)
	if content == nil || r.Method == http.MethodHead || length == 0 {
		return status
	}
	n, err := copyBody(w, content, start+length == size, length, &s.repo.copyBufs)
	s.repo.metrics.downloadBytes.Add(float64(n))
	s.repo.metrics.datastoreBytes(e.m.Datastore, "out").Add(float64(n))
	if err == nil && n < length {
		err = fmt.Errorf("copying media content: %w after %d of %d bytes", io.ErrUnexpectedEOF, n, length)
	}
	if err != nil {
		if ce := s.repo.logger.Check(zapcore.DebugLevel, "media download interrupted"); ce != nil {
			ce.Write(zap.String("media_id", e.m.MediaID), zap.Int64("sent", n), zap.Error(err))
		}
		// The status line is out: cut the connection, so that the client
		// (and a compressing layer in front of us, which would otherwise
		// end its stream cleanly) never sees a complete-looking response.
		panic(http.ErrAbortHandler)
	}
	return status
}

// openContent opens the content of e positioned at start, to read length
// bytes: the blob itself for stores that open files (so that sendfile stays
// possible), one ranged read for stores that support it. It returns nil
// content (and no error) when nothing needs to be read: a HEAD or an empty
// body from a ranged store, after checking that the blob exists. A blob not
// found where the cached row says is looked up again once, since a migration
// may have moved it. Content held in memory (e.data) is read from there.
func (s *Site) openContent(r *http.Request, e *mediaEntry, start, length int64) (io.ReadCloser, error) {
	if e.data != nil {
		if r.Method == http.MethodHead || length == 0 {
			return nil, nil
		}
		return io.NopCloser(bytes.NewReader(e.data[start : start+length])), nil
	}
	for attempt := 0; ; attempt++ {
		rc, err := s.openContentIn(r, e, start, length)
		if err == nil || attempt > 0 || !errors.Is(err, storage.ErrNotFound) {
			return rc, err
		}
		moved, ok := s.repo.relocate(r.Context(), e)
		if !ok {
			return nil, err
		}
		e = moved
	}
}

// openContentIn is one attempt of openContent, in e's datastore.
func (s *Site) openContentIn(r *http.Request, e *mediaEntry, start, length int64) (io.ReadCloser, error) {
	store, ok := s.repo.stores.Get(e.m.Datastore)
	if !ok {
		return nil, fmt.Errorf("opening media content: blob %s is recorded in datastore %q, which is not configured: %w",
			e.m.SHA256, e.m.Datastore, storage.ErrNotFound)
	}
	ctx := r.Context()
	if ro, ok := store.(storage.RangeOpener); ok {
		if r.Method == http.MethodHead || length == 0 {
			_, err := store.Stat(ctx, e.m.SHA256)
			return nil, err
		}
		return ro.OpenRange(ctx, e.m.SHA256, start, length)
	}
	blob, err := store.Open(ctx, e.m.SHA256)
	if err != nil {
		return nil, err
	}
	if blob.Size != e.m.Size {
		_ = blob.Content.Close()
		return nil, fmt.Errorf("opening media content: blob %s has %d bytes, recorded size %d", e.m.SHA256, blob.Size, e.m.Size)
	}
	if start > 0 {
		if _, err := blob.Content.Seek(start, io.SeekStart); err != nil {
			_ = blob.Content.Close()
			return nil, fmt.Errorf("seeking in media content: %w", err)
		}
	}
	return blob.Content, nil
}

// relocate re-reads where e's blob lives, for a blob that was not found in
// its cached datastore. It returns the updated entry (also cached) when the
// blob is now recorded in another datastore.
func (r *Repository) relocate(ctx context.Context, e *mediaEntry) (*mediaEntry, bool) {
	gen := r.cacheGen.Load()
	rec, err := r.meta.GetBlob(ctx, e.m.SHA256)
	if err != nil || rec.Datastore == e.m.Datastore {
		return nil, false
	}
	m := e.m
	m.Datastore = rec.Datastore
	moved := newMediaEntry(m)
	r.cachePut(gen, mediaKey{m.ServerName, m.MediaID}, moved)
	return moved, true
}

// contentError answers a failure to open media content.
func (s *Site) contentError(w http.ResponseWriter, r *http.Request, e *mediaEntry, err error) int {
	switch {
	case r.Context().Err() != nil:
		writeErr(w, matrix.Unknown(http.StatusInternalServerError, "Request cancelled"))
		return statusClientGone
	case errors.Is(err, storage.ErrNotFound):
		s.repo.logger.Error("media content is missing from its datastore",
			zap.String("server_name", e.m.ServerName), zap.String("media_id", e.m.MediaID),
			zap.String("sha256", e.m.SHA256), zap.String("datastore", e.m.Datastore), zap.Error(err))
		return writeErr(w, matrix.NotFound("Media content not found"))
	case errors.Is(err, storage.ErrUnavailable):
		s.repo.logger.Error("media storage unavailable during a download",
			zap.String("datastore", e.m.Datastore), zap.Error(err))
		return writeErr(w, storageUnavailable(w))
	default:
		return s.internalError(w, "opening media content", err)
	}
}

// redirect answers with a 307 to a presigned URL of the content when the
// datastore has a redirect policy and the endpoint allows redirects: always
// on the authenticated endpoints, on the legacy ones only when the client
// sent allow_redirect=true (as the spec requires). done reports that the
// response was written.
func (s *Site) redirect(w http.ResponseWriter, r *http.Request, e *mediaEntry, disposition string, legacy bool) (int, bool) {
	if r.Method != http.MethodGet {
		return 0, false
	}
	if legacy {
		if v, _, _ := matrix.QueryParam(r.URL.RawQuery, "allow_redirect"); v != "true" {
			return 0, false
		}
	}
	u, ok := s.presignedURL(r, e, disposition, false)
	if !ok {
		return 0, false
	}
	h := w.Header()
	setMediaSecurity(h, legacy)
	h["Location"] = []string{u}
	// The URL expires: neither clients nor proxies may keep the redirect.
	h["Cache-Control"] = []string{"no-store"}
	w.WriteHeader(http.StatusTemporaryRedirect)
	s.repo.metrics.redirects.Inc()
	return http.StatusTemporaryRedirect, true
}

// presignedURL returns a presigned URL of e's content when its datastore has
// a redirect policy that applies (an automatic one: to clients only, and
// while its checks pass) and can presign. forFederation is true for a
// federation answer's Location part.
func (s *Site) presignedURL(r *http.Request, e *mediaEntry, disposition string, forFederation bool) (string, bool) {
	if e.data != nil {
		return "", false // not stored yet
	}
	policy, ok := s.repo.redirects[e.m.Datastore]
	if !ok {
		return "", false
	}
	if a, auto := s.repo.autoRedirects[e.m.Datastore]; auto && (forFederation || !a.active()) {
		// Automatic policies are checked for clients; homeservers differ
		// in following a federation Location part (Dendrite refuses it).
		return "", false
	}
	store, ok := s.repo.stores.Get(e.m.Datastore)
	if !ok {
		return "", false
	}
	ps, ok := store.(storage.Presigner)
	if !ok {
		return "", false
	}
	u, err := ps.PresignGet(r.Context(), e.m.SHA256, policy.Lifetime, e.contentType[0], disposition)
	if err != nil {
		// Serving the bytes ourselves still works.
		s.repo.logger.Warn("presigning a download redirect failed; serving directly", zap.Error(err))
		return "", false
	}
	if policy.CDNBaseURL != nil {
		if u, err = rebase(u, policy.CDNBaseURL); err != nil {
			s.repo.logger.Warn("rewriting a presigned URL for the CDN failed; serving directly", zap.Error(err))
			return "", false
		}
	}
	return u, true
}

// rebase replaces the scheme and host of the URL raw with base's, and puts
// base's path in front of its path.
func rebase(raw string, base *url.URL) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("parsing presigned url: %w", err)
	}
	u.Scheme, u.Host = base.Scheme, base.Host
	if base.Path != "" {
		u.Path = base.Path + u.Path
		if u.RawPath != "" {
			u.RawPath = base.EscapedPath() + u.RawPath
		}
	}
	return u.String(), nil
}

// notModified evaluates If-None-Match (weak comparison, lists and "*"), or
// when absent If-Modified-Since.
func notModified(r *http.Request, e *mediaEntry) bool {
	if inm := r.Header["If-None-Match"]; len(inm) > 0 {
		for _, v := range inm {
			for v != "" {
				var item string
				item, v, _ = strings.Cut(v, ",")
				item = matrix.TrimSpaceASCII(item)
				if item == "*" {
					return true
				}
				item = strings.TrimPrefix(item, "W/")
				if item == e.etagValue {
					return true
				}
			}
		}
		return false
	}
	if ims := r.Header["If-Modified-Since"]; len(ims) > 0 {
		t, err := http.ParseTime(ims[0])
		if err != nil {
			return false
		}
		mod, err := http.ParseTime(e.lastModValue)
		return err == nil && !mod.After(t)
	}
	return false
}

// ifRangeHolds reports whether a Range header may be honoured: there is no
// If-Range, or it names our entity (strong ETag match, or exactly our
// Last-Modified date).
func ifRangeHolds(r *http.Request, e *mediaEntry) bool {
	ir := r.Header["If-Range"]
	if len(ir) == 0 {
		return true
	}
	v := matrix.TrimSpaceASCII(ir[0])
	if strings.HasPrefix(v, `"`) || strings.HasPrefix(v, "W/") {
		return v == e.etagValue
	}
	return v == e.lastModValue
}

// rangeKind classifies a Range header.
type rangeKind uint8

const (
	// rangeIgnored: absent, malformed, multi-range or another unit; serve
	// the whole content with 200.
	rangeIgnored rangeKind = iota
	// rangeSatisfiable: serve [start, start+length) with 206.
	rangeSatisfiable
	// rangeUnsatisfiable: 416.
	rangeUnsatisfiable
)

// parseRange parses a single byte range ("bytes=a-b", "bytes=a-",
// "bytes=-n") against a content of the given size.
func parseRange(v string, size int64) (start, length int64, kind rangeKind) {
	const unit = "bytes="
	if len(v) < len(unit) || !matrix.EqualFoldASCII(v[:len(unit)], unit) {
		return 0, 0, rangeIgnored
	}
	spec := matrix.TrimSpaceASCII(v[len(unit):])
	if strings.IndexByte(spec, ',') >= 0 {
		return 0, 0, rangeIgnored
	}
	first, last, ok := strings.Cut(spec, "-")
	if !ok {
		return 0, 0, rangeIgnored
	}
	first, last = matrix.TrimSpaceASCII(first), matrix.TrimSpaceASCII(last)
	if first == "" {
		// Suffix range: the last n bytes.
		n, ok := parseDigits(last)
		if !ok {
			return 0, 0, rangeIgnored
		}
		if n == 0 || size == 0 {
			return 0, 0, rangeUnsatisfiable
		}
		n = min(n, size)
		return size - n, n, rangeSatisfiable
	}
	a, ok := parseDigits(first)
	if !ok {
		return 0, 0, rangeIgnored
	}
	b := size - 1
	if last != "" {
		b, ok = parseDigits(last)
		if !ok || b < a {
			return 0, 0, rangeIgnored
		}
		b = min(b, size-1)
	}
	if a >= size {
		return 0, 0, rangeUnsatisfiable
	}
	return a, b - a + 1, rangeSatisfiable
}

// parseDigits parses a non-empty decimal number without sign.
func parseDigits(s string) (int64, bool) {
	if s == "" {
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n, err == nil
}

// contentRange formats "bytes start-end/size".
func contentRange(start, length, size int64) string {
	var buf [72]byte
	b := append(buf[:0], "bytes "...)
	b = strconv.AppendInt(b, start, 10)
	b = append(b, '-')
	b = strconv.AppendInt(b, start+length-1, 10)
	b = append(b, '/')
	b = strconv.AppendInt(b, size, 10)
	return string(b)
}

// copyBody writes length bytes of content, positioned at the start of the
// range, to w. Content that is not a file is copied with a 256 KiB buffer
// (hiding w's ReadFrom, which would copy in 32 KiB steps). w is used as given so that its ReadFrom stays reachable: when
// the range runs to the end of the file and content is an *os.File, the bare
// file is handed to ReadFrom. Wrappers that add their own io.LimitReader
// (Caddy's write_idle timeout writer hands 64 KiB LimitReaders down) then
// still reach the kernel's sendfile, which unwraps exactly one LimitReader
// around an *os.File; io.CopyN would add a second one and lose sendfile.
func copyBody(w http.ResponseWriter, content io.Reader, toEOF bool, length int64, bufs *sync.Pool) (int64, error) {
	if f, ok := content.(*os.File); ok && toEOF {
		if rf, ok := w.(io.ReaderFrom); ok {
			return rf.ReadFrom(f)
		}
	}
	if _, ok := content.(*os.File); ok {
		return io.CopyN(w, content, length)
	}
	if length > pipelineThreshold {
		closeSrc := func() {}
		if c, ok := content.(io.Closer); ok {
			closeSrc = func() { _ = c.Close() }
		}
		return pipelinedCopy(w, io.LimitReader(content, length), closeSrc, bufs)
	}
	bp := bufs.Get().(*[]byte)
	defer bufs.Put(bp)
	return io.CopyBuffer(writerOnly{w}, io.LimitReader(content, length), *bp)
}

// pipelineThreshold is the body length above which content that is not a
// file is copied by pipelinedCopy.
const pipelineThreshold = 2 * copyBufSize

// pipelineDepth is how many buffers pipelinedCopy cycles through.
const pipelineDepth = 4

// pipelinedCopy copies r to w with a reader goroutine filling buffers while
// the caller writes the previous ones, so that reading from a remote store
// and writing to the client overlap instead of taking turns. When writing
// fails it calls closeSrc, which ends a read in progress, and waits for the
// reader to stop before the buffers go back to the pool.
func pipelinedCopy(w io.Writer, r io.Reader, closeSrc func(), bufs *sync.Pool) (int64, error) {
	type chunk struct {
		b   *[]byte
		n   int
		err error
	}
	full := make(chan chunk, pipelineDepth)
	free := make(chan *[]byte, pipelineDepth)
	stop := make(chan struct{})
	for range pipelineDepth {
		free <- bufs.Get().(*[]byte)
	}
	go func() {
		defer close(full)
		for {
			var b *[]byte
			select {
			case <-stop:
				return
			default:
			}
			select {
			case b = <-free:
			case <-stop:
				return
			}
			n, err := io.ReadFull(r, *b)
			if err == io.ErrUnexpectedEOF {
				err = io.EOF
			}
			full <- chunk{b, n, err}
			if err != nil {
				return
			}
		}
	}()
	var written int64
	var werr error
	for c := range full {
		if werr == nil && c.n > 0 {
			var n int
			n, werr = w.Write((*c.b)[:c.n])
			written += int64(n)
			if werr != nil {
				close(stop)
				closeSrc()
			}
		}
		free <- c.b // never blocks: free holds every buffer at most once
		if werr == nil && c.err != nil && c.err != io.EOF {
			werr = c.err
		}
	}
	// The reader has returned: every buffer is back in free.
	for range pipelineDepth {
		bufs.Put(<-free)
	}
	return written, werr
}

// copyBufSize is the buffer size for copying content that is not a file.
const copyBufSize = 256 << 10

// writerOnly hides every method but Write.
type writerOnly struct{ io.Writer }
