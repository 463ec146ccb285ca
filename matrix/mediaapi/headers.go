package mediaapi

import (
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
