package mediaapi

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
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
	m, err := r.meta.GetMedia(ctx, k.server, k.id)
	if err != nil {
		return nil, storage.Media{}, err
	}
	if m.State != storage.StateReady {
		return nil, m, nil
	}
	e := newMediaEntry(m)
	if r.cache != nil {
		r.cache.put(k, e)
	}
	return e, m, nil
}

// serveDownload handles GET and HEAD of
// .../download/{serverName}/{mediaId}[/{fileName}].
func (s *Site) serveDownload(w http.ResponseWriter, r *http.Request, rt *route) int {
	if !rt.legacy {
		// Authenticated media (MSC3916): guests may download (MSC4189).
		if _, st := s.authenticate(w, r, true); st != 0 {
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
		if !ok || !validFileName(fileName) {
			return writeErr(w, matrix.InvalidParam("Invalid file name"))
		}
	}
	timeout, merr := s.downloadTimeout(r.URL.RawQuery)
	if merr != nil {
		return writeErr(w, merr)
	}
	if server != s.cfg.ServerName {
		// Remote media needs federation, which comes later.
		return writeErr(w, matrix.NotFound("Media not found"))
	}

	key := mediaKey{server, id}
	e, m, err := s.repo.lookup(r.Context(), key)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return writeErr(w, matrix.NotFound("Media not found"))
	case err != nil:
		return s.internalError(w, "looking up media", err)
	}
	if rt.legacy && s.frozen(m.CreatedAt) {
		return writeErr(w, matrix.NotFound("Media not found"))
	}
	if e == nil {
		var st int
		e, st = s.waitForUpload(w, r, key, m, timeout)
		if st != 0 {
			return st
		}
	}
	return s.sendMedia(w, r, e, fileName, rt.legacy)
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
// content: woken at once by a PUT in this process, and re-reading the store
// every 500 ms for uploads completed by another instance. It gives up early
// when the client disconnects. On failure it writes the error and returns its
// status.
func (s *Site) waitForUpload(w http.ResponseWriter, r *http.Request, key mediaKey, m storage.Media, timeout time.Duration) (*mediaEntry, int) {
	if !s.repo.now().Before(m.ExpiresAt) {
		return nil, writeErr(w, matrix.NotFound("Media not found"))
	}
	if timeout <= 0 {
		return nil, writeErr(w, matrix.NotYetUploaded("Media has not been uploaded yet"))
	}
	ch, unsubscribe := s.repo.waits.subscribe(key)
	defer func() { unsubscribe() }()
	s.repo.metrics.waiting.Inc()
	defer s.repo.metrics.waiting.Dec()

	timer := time.NewTimer(timeout)
	defer timer.Stop()
	ticker := time.NewTicker(s.repo.pollInterval)
	defer ticker.Stop()
	ctx := r.Context()
	for {
		// The first check also covers an upload that completed between the
		// caller's lookup and the subscription.
		if e, st, done := s.recheckPending(w, r, key); done {
			return e, st
		}
		select {
		case <-ch:
			// Completed here: the next check finds it ready. Subscribe again
			// in case it does not (a store that lags behind its writes).
			unsubscribe()
			ch, unsubscribe = s.repo.waits.subscribe(key)
		case <-ticker.C:
		case <-timer.C:
			if e, st, done := s.recheckPending(w, r, key); done {
				return e, st
			}
			return nil, writeErr(w, matrix.NotYetUploaded("Media has not been uploaded yet"))
		case <-ctx.Done():
			writeErr(w, matrix.NotYetUploaded("Media has not been uploaded yet"))
			return nil, statusClientGone
		}
	}
}

// recheckPending reads the item again while waiting. done reports a final
// answer: the ready entry, or an error already written (status).
func (s *Site) recheckPending(w http.ResponseWriter, r *http.Request, key mediaKey) (e *mediaEntry, status int, done bool) {
	e, m, err := s.repo.lookup(r.Context(), key)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		// Expired and cleaned up meanwhile.
		return nil, writeErr(w, matrix.NotFound("Media not found")), true
	case err != nil:
		if r.Context().Err() != nil {
			return nil, 0, false // the select notices the disconnect
		}
		return nil, s.internalError(w, "looking up pending media", err), true
	case e != nil:
		return e, 0, true
	case !s.repo.now().Before(m.ExpiresAt):
		return nil, writeErr(w, matrix.NotFound("Media not found")), true
	}
	return nil, 0, false
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

	blob, err := s.repo.blobs.Open(r.Context(), e.m.SHA256)
	if err != nil {
		if errors.Is(err, storage.ErrNotFound) {
			s.repo.logger.Error("media content is missing from the blob store",
				zap.String("server_name", e.m.ServerName), zap.String("media_id", e.m.MediaID),
				zap.String("sha256", e.m.SHA256))
			return writeErr(w, matrix.NotFound("Media content not found"))
		}
		if r.Context().Err() != nil {
			writeErr(w, matrix.Unknown(http.StatusInternalServerError, "Request cancelled"))
			return statusClientGone
		}
		return s.internalError(w, "opening media content", err)
	}
	defer blob.Content.Close()
	size := e.m.Size
	if blob.Size != size {
		return s.internalError(w, "serving media", errors.New("blob size "+strconv.FormatInt(blob.Size, 10)+
			" differs from recorded size "+strconv.FormatInt(size, 10)+" for "+e.m.SHA256))
	}

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

	setMediaSecurity(h, legacy)
	h["Content-Type"] = e.contentType
	if fileName != "" {
		h["Content-Disposition"] = []string{matrix.ContentDisposition(e.contentType[0], fileName, false)}
	} else {
		h["Content-Disposition"] = e.disposition
	}
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
	if r.Method == http.MethodHead || length == 0 {
		return status
	}
	if start > 0 {
		if _, err := blob.Content.Seek(start, io.SeekStart); err != nil {
			s.repo.logger.Error("seeking in media content", zap.String("sha256", e.m.SHA256), zap.Error(err))
			return status
		}
	}
	n, err := copyBody(w, blob.Content, start+length == size, length)
	s.repo.metrics.downloadBytes.Add(float64(n))
	if err != nil {
		if ce := s.repo.logger.Check(zapcore.DebugLevel, "media download interrupted"); ce != nil {
			ce.Write(zap.String("media_id", e.m.MediaID), zap.Int64("sent", n), zap.Error(err))
		}
	}
	return status
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
// range, to w. w is used as given so that its ReadFrom stays reachable: when
// the range runs to the end of the file and content is an *os.File, the bare
// file is handed to ReadFrom. Wrappers that add their own io.LimitReader
// (Caddy's write_idle timeout writer hands 64 KiB LimitReaders down) then
// still reach the kernel's sendfile, which unwraps exactly one LimitReader
// around an *os.File; io.CopyN would add a second one and lose sendfile.
func copyBody(w http.ResponseWriter, content io.Reader, toEOF bool, length int64) (int64, error) {
	if f, ok := content.(*os.File); ok && toEOF {
		if rf, ok := w.(io.ReaderFrom); ok {
			return rf.ReadFrom(f)
		}
	}
	return io.CopyN(w, content, length)
}
