package mediaadmin

import (
	"net/http"
	"net/url"
	"strings"
)

// adminPrefix is the prefix of every path the SiteAPI answers.
const adminPrefix = "/_synapse/admin/v1/"

// endpoint identifies an operation of the admin API. Its string is the
// endpoint label of the request metric.
type endpoint string

// Endpoints of the admin API.
const (
	epUnknown          endpoint = "unknown"
	epQuarantineMedia  endpoint = "quarantine_media"   // POST media/quarantine/{server}/{id}
	epUnquarantine     endpoint = "unquarantine_media" // POST media/unquarantine/{server}/{id}
	epQuarantineUser   endpoint = "quarantine_user"    // POST user/{userId}/media/quarantine
	epQuarantineRoom   endpoint = "quarantine_room"    // POST room/{roomId}/media/quarantine, quarantine_media/{roomId}
	epProtect          endpoint = "protect_media"      // POST media/protect/{id}
	epUnprotect        endpoint = "unprotect_media"    // POST media/unprotect/{id}
	epMediaInfo        endpoint = "media_info"         // GET media/{server}/{id}
	epDeleteMedia      endpoint = "delete_media"       // DELETE media/{server}/{id}
	epDeleteOld        endpoint = "delete_old_media"   // POST media/delete, media/{server}/delete
	epPurgeRemote      endpoint = "purge_media_cache"  // POST purge_media_cache
	epListUserMedia    endpoint = "list_user_media"    // GET users/{userId}/media
	epDeleteUserMedia  endpoint = "delete_user_media"  // DELETE users/{userId}/media
	epUsage            endpoint = "user_media_stats"   // GET statistics/users/media
	epMethodNotAllowed endpoint = "method_not_allowed" // a known path with another method
)

// route is a parsed admin API request: which endpoint and its path
// parameters, percent-decoded. Which parameters are set depends on the
// endpoint.
type route struct {
	ep endpoint
	// server is the server name of media/.../{server}/{id} and of the
	// legacy media/{server}/delete; "" elsewhere.
	server string
	// mediaID is the media ID of the media endpoints.
	mediaID string
	// userID is the user of the user endpoints.
	userID string
	// roomID is the room of the room quarantine endpoints.
	roomID string
	// legacyServer is true for POST media/{server}/delete.
	legacyServer bool
}

// splitAdminPath returns the percent-decoded segments of path after
// /_synapse/admin/v1/, or ok false when path is not under it or holds a
// malformed escape. Splitting happens before decoding, so an escaped "/"
// (%2F) stays inside its segment.
func splitAdminPath(path string) (segs []string, ok bool) {
	rest, found := strings.CutPrefix(path, adminPrefix)
	if !found {
		return nil, false
	}
	segs = strings.Split(rest, "/")
	for i, s := range segs {
		if strings.IndexByte(s, '%') < 0 {
			continue
		}
		d, err := url.PathUnescape(s)
		if err != nil {
			return nil, false
		}
		segs[i] = d
	}
	return segs, true
}

// parseRoute matches an escaped request path (r.URL.EscapedPath()) and a
// method to an endpoint. It returns ok false for paths the SiteAPI does not
// answer (they belong to the homeserver); a path it answers with a method
// it does not accept gives epMethodNotAllowed. Between endpoints whose
// paths overlap, the method decides, in the order Synapse registers them:
// POST media/protect/{id} and media/unprotect/{id} before POST
// media/{server}/delete, and GET/DELETE media/{server}/{id} for every
// three-segment media path.
func parseRoute(method, path string) (route, bool) {
	segs, ok := splitAdminPath(path)
	if !ok {
		return route{}, false
	}
	post, get, del := method == http.MethodPost, method == http.MethodGet, method == http.MethodDelete
	notAllowed := route{ep: epMethodNotAllowed}
	switch len(segs) {
	case 1:
		if segs[0] == "purge_media_cache" {
			if post {
				return route{ep: epPurgeRemote}, true
			}
			return notAllowed, true
		}
	case 2:
		switch {
		case segs[0] == "media" && segs[1] == "delete":
			if post {
				return route{ep: epDeleteOld}, true
			}
			return notAllowed, true
		case segs[0] == "quarantine_media":
			if post {
				return route{ep: epQuarantineRoom, roomID: segs[1]}, true
			}
			return notAllowed, true
		}
	case 3:
		switch {
		case segs[0] == "media":
			switch {
			case post && segs[1] == "protect":
				return route{ep: epProtect, mediaID: segs[2]}, true
			case post && segs[1] == "unprotect":
				return route{ep: epUnprotect, mediaID: segs[2]}, true
			case post && segs[2] == "delete":
				return route{ep: epDeleteOld, server: segs[1], legacyServer: true}, true
			case get:
				return route{ep: epMediaInfo, server: segs[1], mediaID: segs[2]}, true
			case del:
				return route{ep: epDeleteMedia, server: segs[1], mediaID: segs[2]}, true
			}
			return notAllowed, true
		case segs[0] == "users" && segs[2] == "media":
			switch {
			case get:
				return route{ep: epListUserMedia, userID: segs[1]}, true
			case del:
				return route{ep: epDeleteUserMedia, userID: segs[1]}, true
			}
			return notAllowed, true
		case segs[0] == "statistics" && segs[1] == "users" && segs[2] == "media":
			if get {
				return route{ep: epUsage}, true
			}
			return notAllowed, true
		}
	case 4:
		switch {
		case segs[0] == "media" && (segs[1] == "quarantine" || segs[1] == "unquarantine"):
			if !post {
				return notAllowed, true
			}
			ep := epQuarantineMedia
			if segs[1] == "unquarantine" {
				ep = epUnquarantine
			}
			return route{ep: ep, server: segs[2], mediaID: segs[3]}, true
		case segs[0] == "user" && segs[2] == "media" && segs[3] == "quarantine":
			if post {
				return route{ep: epQuarantineUser, userID: segs[1]}, true
			}
			return notAllowed, true
		case segs[0] == "room" && segs[2] == "media" && segs[3] == "quarantine":
			if post {
				return route{ep: epQuarantineRoom, roomID: segs[1]}, true
			}
			return notAllowed, true
		}
	}
	return route{}, false
}

// IsAdminPath reports whether the SiteAPI answers path (whatever the
// method): the media admin endpoints it implements. Every other path under
// /_synapse/admin/ belongs to the homeserver. Pass the escaped path
// (r.URL.EscapedPath()); a decoded path gives the same answer unless a path
// parameter holds an escaped "/".
func IsAdminPath(path string) bool {
	// The method only chooses between endpoints of one path, never whether
	// the path is answered; GET covers every shape.
	_, ok := parseRoute(http.MethodGet, path)
	return ok
}
