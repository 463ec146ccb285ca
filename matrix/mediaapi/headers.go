package mediaapi

import (
	"io"
	"net/http"
	"strings"
	"time"
)

// hdr makes a one-value header slice with len == cap, so that a later
// Header.Add copies instead of writing into the shared array. The values made
// with it are never modified.
func hdr(v string) []string { return []string{v}[:1:1] }

// Header values shared by every response, assigned directly into the header
// map (keys are in canonical form) so that the hot path allocates nothing for
// them.
var (
	hdrCORSOrigin  = hdr("*")
	hdrCORSMethods = hdr("GET, HEAD, POST, PUT, DELETE, OPTIONS")
	hdrCORSHeaders = hdr("X-Requested-With, Content-Type, Authorization, Date")
	hdrCORSExpose  = hdr("Content-Disposition, Content-Length, Content-Range, Content-Type, ETag, Last-Modified, Accept-Ranges, Retry-After")

	hdrJSON        = hdr("application/json")
	hdrOctetStream = hdr("application/octet-stream")

	hdrCSP          = hdr("sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; object-src 'self';")
	hdrXCSP         = hdr("sandbox;")
	hdrCORP         = hdr("cross-origin")
	hdrNoSniff      = hdr("nosniff")
	hdrReferrer     = hdr("no-referrer")
	hdrRobots       = hdr("noindex, nofollow, noarchive, noimageindex")
	hdrCacheLegacy  = hdr("public, max-age=31536000, immutable")
	hdrCacheClient  = hdr("private, max-age=31536000, immutable")
	hdrAcceptRanges = hdr("bytes")
	hdrClose        = hdr("close")
)

// setCORS adds the CORS headers every media response carries, errors
// included (spec "Web Browser Clients").
func setCORS(h http.Header) {
	h["Access-Control-Allow-Origin"] = hdrCORSOrigin
	h["Access-Control-Allow-Methods"] = hdrCORSMethods
	h["Access-Control-Allow-Headers"] = hdrCORSHeaders
	h["Access-Control-Expose-Headers"] = hdrCORSExpose
}

// setMediaSecurity adds the headers that keep served media from being
// interpreted as part of a web page, and the caching headers of immutable
// content.
func setMediaSecurity(h http.Header, legacy bool) {
	h["Content-Security-Policy"] = hdrCSP
	h["X-Content-Security-Policy"] = hdrXCSP
	h["Cross-Origin-Resource-Policy"] = hdrCORP
	h["X-Content-Type-Options"] = hdrNoSniff
	h["Referrer-Policy"] = hdrReferrer
	h["X-Robots-Tag"] = hdrRobots
	if legacy {
		h["Cache-Control"] = hdrCacheLegacy
	} else {
		h["Cache-Control"] = hdrCacheClient
	}
}

// Bounds of the lingering read after an early refusal (see guardBody).
const (
	// refusalLingerTime is how long the unwanted body of a refused request
	// is read and discarded after the refusal was sent.
	refusalLingerTime = 5 * time.Second
	// refusalLingerBytes is how much of it is read at most.
	refusalLingerBytes = 32 << 20
)

// guardBody prepares a request that carries a body (upload, create, PUT)
// for refusals decided before the body is read. An error response written
// while the body has not been read to its end gets Connection: close, and
// the returned finish (deferred by ServeHTTP, after the request was counted) sends it at once and
// then reads and discards what the client still sends of the body, for at
// most refusalLingerTime and refusalLingerBytes, before net/http closes the
// connection.
//
// Without the header, net/http (and Caddy, whose body wrapper takes
// net/http's fast path away) would first read and discard up to 256 KiB of
// the unwanted body, so a client that sends only the headers (or waits for
// 100 Continue) would get nothing until a timeout. Without the lingering
// read, a client still writing its body when the connection closes gets a
// TCP reset, which also destroys the refusal it has not read yet: measured
// with Go's own client, 18 of 30 over-size uploads got "connection reset"
// instead of the 413. A client that asked for 100 Continue sends no body,
// so nothing is read for it. Only HTTP/1 requests are guarded: HTTP/2 and
// HTTP/3 forbid the header (Go's HTTP/2 server would send it anyway, and a
// strict client rejects the response) and end just the stream of an unread
// body.
func guardBody(w http.ResponseWriter, r *http.Request) (http.ResponseWriter, *http.Request, func()) {
	if r.ProtoMajor != 1 || r.ContentLength == 0 || r.Body == nil || r.Body == http.NoBody {
		return w, r, func() {}
	}
	b := &eofBody{ReadCloser: r.Body}
	r2 := *r
	r2.Body = b
	rw := &refusalWriter{ResponseWriter: w, body: b}
	return rw, &r2, func() { rw.linger(r) }
}

// eofBody is a request body that remembers whether it was read to its end.
type eofBody struct {
	io.ReadCloser
	sawEOF bool
}

// Read reads from the body.
func (b *eofBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.sawEOF = true
	}
	return n, err
}

// refusalWriter adds Connection: close to error responses written before
// its request's body was read to its end.
type refusalWriter struct {
	http.ResponseWriter
	body *eofBody
	// refused is set when such a response was written.
	refused bool
}

// WriteHeader writes the status, closing the connection after an early
// refusal.
func (w *refusalWriter) WriteHeader(code int) {
	if code >= http.StatusBadRequest && !w.body.sawEOF {
		w.Header()["Connection"] = hdrClose
		w.refused = true
	}
	w.ResponseWriter.WriteHeader(code)
}

// linger sends an early refusal at once and then reads and discards the
// body the client may still be sending, within the refusalLinger bounds, so
// that the connection's close does not reset a client before it read the
// refusal. Where the read deadline cannot be set nothing is read (a client
// that sends nothing would hold the handler).
func (w *refusalWriter) linger(r *http.Request) {
	if !w.refused {
		return
	}
	rc := http.NewResponseController(w.ResponseWriter)
	_ = rc.Flush()
	if strings.EqualFold(r.Header.Get("Expect"), "100-continue") {
		return
	}
	if rc.SetReadDeadline(time.Now().Add(refusalLingerTime)) != nil {
		return
	}
	_, _ = io.CopyN(io.Discard, w.body, refusalLingerBytes)
}

// Unwrap returns the wrapped writer (for http.ResponseController).
func (w *refusalWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
