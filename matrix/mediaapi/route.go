package mediaapi

import (
	"net/http"
	"net/url"
	"strings"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// Path prefixes of the media API.
const (
	prefixLegacy             = "/_matrix/media/"
	prefixClientV1           = "/_matrix/client/v1/media/"
	prefixClientUnstable     = "/_matrix/client/unstable/org.matrix.msc3916/media/"
	prefixFederationV1       = "/_matrix/federation/v1/media/"
	prefixFederationUnstable = "/_matrix/federation/unstable/org.matrix.msc3916.v2/media/"
)

// endpoint identifies what a request is for. It is also the "endpoint" label
// of the metrics, so the set is fixed.
type endpoint uint8

const (
	epUnknown endpoint = iota
	epUpload
	epCreate
	epUploadPut
	epDownload
	epConfig
	epOptions
	epThumbnail
	epFedDownload
	epFedThumbnail
	epPreview
	epUsage
	numEndpoints
)

// endpointNames are the metric label values of the endpoints.
var endpointNames = [numEndpoints]string{
	epUnknown:      "unknown",
	epUpload:       "upload",
	epCreate:       "create",
	epUploadPut:    "upload_put",
	epDownload:     "download",
	epConfig:       "config",
	epOptions:      "options",
	epThumbnail:    "thumbnail",
	epFedDownload:  "federation_download",
	epFedThumbnail: "federation_thumbnail",
	epPreview:      "preview_url",
	epUsage:        "usage",
}

// allowHeaders are the Allow header values of 405 responses, per endpoint.
var allowHeaders = [numEndpoints][]string{
	epUpload:       hdr("POST, OPTIONS"),
	epCreate:       hdr("POST, OPTIONS"),
	epUploadPut:    hdr("PUT, OPTIONS"),
	epDownload:     hdr("GET, HEAD, OPTIONS"),
	epConfig:       hdr("GET, HEAD, OPTIONS"),
	epThumbnail:    hdr("GET, HEAD, OPTIONS"),
	epFedDownload:  hdr("GET, OPTIONS"),
	epFedThumbnail: hdr("GET, OPTIONS"),
	epPreview:      hdr("GET, OPTIONS"),
	epUsage:        hdr("GET, HEAD, OPTIONS"),
}

// route is a parsed request path. Parameters are kept escaped, as they
// appeared in the path: they are decoded (and rejected if malformed) only
// after authentication, so that an unauthenticated request to a known
// endpoint gets 401 whatever its parameters.
type route struct {
	ep endpoint
	// legacy is true under /_matrix/media/ (unauthenticated downloads,
	// public caching), false under /_matrix/client/.../media/.
	legacy bool
	// rawServer, rawMediaID and rawFileName are the escaped path parameters.
	rawServer, rawMediaID, rawFileName string
	// hasFileName is true when the download path has a fileName segment.
	hasFileName bool
}

// allows reports whether method may be used on the route's endpoint.
func (rt *route) allows(method string) bool {
	switch rt.ep {
	case epUpload, epCreate:
		return method == http.MethodPost
	case epUploadPut:
		return method == http.MethodPut
	case epDownload, epConfig, epThumbnail, epUsage:
		return method == http.MethodGet || method == http.MethodHead
	case epFedDownload, epFedThumbnail, epPreview:
		return method == http.MethodGet
	}
	return false
}

// maxSegments is one more than the longest route (download/{s}/{id}/{file}
// after the version), so that longer paths are seen as unknown.
const maxSegments = 5

// splitSegments splits p on '/' into at most maxSegments segments without
// allocating; n > maxSegments means there were more.
func splitSegments(p string, segs *[maxSegments]string) (n int) {
	for {
		i := strings.IndexByte(p, '/')
		if n == maxSegments {
			return n + 1
		}
		if i < 0 {
			segs[n] = p
			return n + 1
		}
		segs[n] = p[:i]
		n++
		p = p[i+1:]
	}
}

// parseRoute identifies the endpoint of an escaped request path. Literal
// segments are matched exactly (an escaped literal is not recognized);
// parameter segments are kept raw.
func parseRoute(p string) route {
	var rt route
	var rest string
	var segs [maxSegments]string
	switch {
	case strings.HasPrefix(p, prefixLegacy):
		rt.legacy = true
		rest = p[len(prefixLegacy):]
		i := strings.IndexByte(rest, '/')
		if i < 0 {
			return route{}
		}
		version := rest[:i]
		rest = rest[i+1:]
		switch version {
		case "v3", "r0", "v1":
		case "unstable":
			const msc2246 = "fi.mau.msc2246/"
			if rest == "org.matrix.msc4034/usage" {
				rt.ep = epUsage
				return rt
			}
			if !strings.HasPrefix(rest, msc2246) {
				return route{}
			}
			n := splitSegments(rest[len(msc2246):], &segs)
			switch {
			case n == 1 && segs[0] == "create":
				rt.ep = epCreate
			case n == 3 && segs[0] == "upload":
				rt.ep = epUploadPut
				rt.rawServer, rt.rawMediaID = segs[1], segs[2]
			default:
				return route{}
			}
			return rt
		default:
			return route{}
		}
		n := splitSegments(rest, &segs)
		switch {
		case n == 1 && segs[0] == "upload":
			rt.ep = epUpload
		case n == 3 && segs[0] == "upload" && version != "v1":
			rt.ep = epUploadPut
			rt.rawServer, rt.rawMediaID = segs[1], segs[2]
		case n == 1 && segs[0] == "create" && version == "v1":
			rt.ep = epCreate
		case n > maxSegments || !rt.setReadEndpoint(segs[:n]):
			return route{}
		}
		return rt
	case strings.HasPrefix(p, prefixClientV1):
		rest = p[len(prefixClientV1):]
		if rest == "usage" {
			// MSC4034: only on the authenticated v1 prefix.
			rt.ep = epUsage
			return rt
		}
	case strings.HasPrefix(p, prefixClientUnstable):
		rest = p[len(prefixClientUnstable):]
	case strings.HasPrefix(p, prefixFederationV1):
		return parseFederationRoute(p[len(prefixFederationV1):])
	case strings.HasPrefix(p, prefixFederationUnstable):
		return parseFederationRoute(p[len(prefixFederationUnstable):])
	default:
		return route{}
	}
	n := splitSegments(rest, &segs)
	if n > maxSegments || !rt.setReadEndpoint(segs[:n]) {
		return route{}
	}
	return rt
}

// parseFederationRoute recognises download/{mediaId} and thumbnail/{mediaId}
// of the federation media API (the server name is implied: ours).
func parseFederationRoute(rest string) route {
	var segs [maxSegments]string
	n := splitSegments(rest, &segs)
	if n != 2 {
		return route{}
	}
	rt := route{rawMediaID: segs[1]}
	switch segs[0] {
	case "download":
		rt.ep = epFedDownload
	case "thumbnail":
		rt.ep = epFedThumbnail
	default:
		return route{}
	}
	return rt
}

// setReadEndpoint recognises the endpoints that the legacy and the
// authenticated prefixes share: config, download and thumbnail. It reports whether segs
// named one.
func (rt *route) setReadEndpoint(segs []string) bool {
	switch {
	case len(segs) == 1 && segs[0] == "config":
		rt.ep = epConfig
	case len(segs) == 1 && segs[0] == "preview_url":
		rt.ep = epPreview
	case (len(segs) == 3 || len(segs) == 4) && segs[0] == "download":
		rt.setDownload(segs)
	case len(segs) == 3 && segs[0] == "thumbnail":
		rt.ep = epThumbnail
		rt.rawServer, rt.rawMediaID = segs[1], segs[2]
	default:
		return false
	}
	return true
}

func (rt *route) setDownload(segs []string) {
	rt.ep = epDownload
	rt.rawServer, rt.rawMediaID = segs[1], segs[2]
	if len(segs) == 4 {
		rt.rawFileName = segs[3]
		rt.hasFileName = true
	}
}

// unescapeSegment decodes one escaped path segment. It fails on invalid
// escapes, on a decoded '/' or NUL, and on the dot segments "." and "..".
func unescapeSegment(raw string) (string, bool) {
	v := raw
	if strings.IndexByte(raw, '%') >= 0 {
		var err error
		v, err = url.PathUnescape(raw)
		if err != nil {
			return "", false
		}
	}
	if v == "." || v == ".." || strings.IndexByte(v, '/') >= 0 || strings.IndexByte(v, 0) >= 0 {
		return "", false
	}
	return v, true
}

// mediaRef unescapes and validates the route's server name and media ID.
func (rt *route) mediaRef() (server, id string, err *matrix.Error) {
	server, ok := unescapeSegment(rt.rawServer)
	if !ok || !matrix.ValidServerName(server) {
		return "", "", matrix.InvalidParam("Invalid server name")
	}
	id, ok = unescapeSegment(rt.rawMediaID)
	if !ok || !matrix.ValidMediaID(id) {
		return "", "", matrix.InvalidParam("Invalid media ID")
	}
	return server, id, nil
}
