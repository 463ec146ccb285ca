package mediaapi

import (
	"io"
	"net/http"
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

// guardBody prepares a request that carries a body (upload, create) for
// refusals decided before the body is read: an error response written while
// the body has not been read to its end gets Connection: close. Without it,
// net/http (and Caddy, whose body wrapper takes net/http's fast path away)
// would first read and discard up to 256 KiB of the unwanted body, so a
// client that sends only the headers (or waits for 100 Continue) would get
// nothing until a timeout. With it, the refusal is sent at once and the
// connection closed after it. Only HTTP/1 requests are guarded: HTTP/2 and
// HTTP/3 forbid the header (Go's HTTP/2 server would send it anyway, and a
// strict client rejects the response) and end just the stream of an unread
// body.
func guardBody(w http.ResponseWriter, r *http.Request) (http.ResponseWriter, *http.Request) {
	if r.ProtoMajor != 1 || r.ContentLength == 0 || r.Body == nil || r.Body == http.NoBody {
		return w, r
	}
	b := &eofBody{ReadCloser: r.Body}
	r2 := *r
	r2.Body = b
	return &refusalWriter{ResponseWriter: w, body: b}, &r2
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
}

// WriteHeader writes the status, closing the connection after an early
// refusal.
func (w *refusalWriter) WriteHeader(code int) {
	if code >= http.StatusBadRequest && !w.body.sawEOF {
		w.Header()["Connection"] = hdrClose
	}
	w.ResponseWriter.WriteHeader(code)
}

// Unwrap returns the wrapped writer (for http.ResponseController).
func (w *refusalWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
