package mediaapi

import (
	"errors"
	"net/http"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"
)

// FederationConfig enables a site's federation media endpoints
// (GET /_matrix/federation/v1/media/{download,thumbnail}/{mediaId}).
type FederationConfig struct {
	// Verifier checks the X-Matrix signature of inbound requests. Required.
	Verifier *xmatrix.Verifier
}

// serveFederation answers a federation media request for one of this site's
// own media items: X-Matrix verified, rate limited (the download or
// thumbnail class, per origin server and per client IP), then a
// multipart/mixed body with "{}" and the content (or a Location part when
// the datastore redirects). Errors are plain Matrix JSON.
func (s *Site) serveFederation(w http.ResponseWriter, r *http.Request, rt *route) int {
	fed := s.cfg.Federation
	if fed == nil || fed.Verifier == nil {
		return writeErr(w, matrix.Unrecognized("Federation media is not enabled on this server"))
	}
	// RequestURI is the request-target exactly as received (the Caddy layer
	// restores it if a rewrite changed it): what the origin signed.
	origin, err := fed.Verifier.Verify(r.Context(), r, r.RequestURI, nil)
	if err != nil {
		s.repo.metrics.federationVerifyFailed(verifyFailureReason(err))
		if r.Context().Err() != nil {
			writeErr(w, matrix.Unknown(http.StatusInternalServerError, "Request cancelled"))
			return statusClientGone
		}
		status := xmatrix.StatusCode(err)
		return writeErr(w, matrix.NewError(status, matrix.CodeUnauthorized, "Request not authenticated: "+verifyFailureMessage(err)))
	}
	// Limited per origin server and per client IP, once the origin is
	// known to be who it says.
	class := RateDownload
	if rt.ep == epFedThumbnail {
		class = RateThumbnail
	}
	if merr := s.checkFederation(r, origin, class); merr != nil {
		return writeErr(w, merr)
	}
	id, ok := unescapeSegment(rt.rawMediaID)
	if !ok || !matrix.ValidMediaID(id) {
		return writeErr(w, matrix.InvalidParam("Invalid media ID"))
	}
	timeout, merr := s.downloadTimeout(r.URL.RawQuery)
	if merr != nil {
		return writeErr(w, merr)
	}
	var params thumbnailParams
	if rt.ep == epFedThumbnail {
		if s.repo.thumbs == nil {
			return writeErr(w, matrix.Unrecognized("Thumbnails are not enabled on this server"))
		}
		if params, merr = parseThumbnailParams(r.URL.RawQuery); merr != nil {
			return writeErr(w, merr)
		}
	}
	// Only this site's own media is served to other servers: neither a
	// sibling site's (its own federation endpoint serves it) nor remote
	// copies.
	e, err := s.resolveLocal(r.Context(), mediaKey{s.cfg.ServerName, id}, &resolveOptions{timeout: timeout})
	if err == nil && e.m.Remote {
		err = errMediaNotFound
	}
	if err != nil {
		return s.fail(w, r, err)
	}
	if rt.ep == epFedThumbnail {
		// No Accept negotiation over federation: the automatic format, so
		// that the client endpoints of both servers agree.
		tk := s.repo.thumbnailKey(e.m, params, "")
		te, err := s.repo.thumbnail(r.Context(), e, tk, params.animated)
		if err != nil {
			return s.thumbnailError(w, r, err)
		}
		s.repo.noteThumbnailAccess(&e.m)
		e = te
	} else {
		s.repo.noteAccess(&e.m)
	}
	if u, ok := s.presignedURL(r, e, e.disposition[0], true); ok {
		if err := federation.WriteMediaRedirect(w, u); err != nil {
			return s.internalError(w, "writing federation redirect", err)
		}
		s.repo.metrics.redirects.Inc()
		s.repo.logger.Debug("federation media redirected", zap.String("origin", origin), zap.String("media_id", id))
		return http.StatusOK
	}
	content, err := s.openContent(r, e, 0, e.m.Size)
	if err != nil {
		return s.contentError(w, r, e, err)
	}
	defer content.Close()
	if err := federation.WriteMediaResponse(w, e.contentType[0], e.disposition[0], content, e.m.Size); err != nil {
		// The status line is out: cut the connection so the peer sees a
		// truncated response, not a complete short one.
		panic(http.ErrAbortHandler)
	}
	s.repo.metrics.downloadBytes.Add(float64(e.m.Size))
	s.repo.metrics.datastoreBytes(e.m.Datastore, "out").Add(float64(e.m.Size))
	return http.StatusOK
}

// verifyFailureReason is the metric label of a verification failure.
func verifyFailureReason(err error) string {
	switch {
	case errors.Is(err, xmatrix.ErrMissingAuth):
		return "missing"
	case errors.Is(err, xmatrix.ErrMalformedAuth):
		return "malformed"
	case errors.Is(err, xmatrix.ErrWrongDestination):
		return "wrong_destination"
	case errors.Is(err, xmatrix.ErrNoKey):
		return "no_key"
	case errors.Is(err, xmatrix.ErrBadSignature):
		return "bad_signature"
	default:
		return "error"
	}
}

// verifyFailureMessage is the client-facing reason of a failure.
func verifyFailureMessage(err error) string {
	switch verifyFailureReason(err) {
	case "missing":
		return "missing X-Matrix Authorization header"
	case "malformed":
		return "malformed X-Matrix Authorization header"
	case "wrong_destination":
		return "destination is not this server"
	case "no_key":
		return "no valid key of the origin server"
	case "bad_signature":
		return "invalid signature"
	default:
		return "verification failed"
	}
}
