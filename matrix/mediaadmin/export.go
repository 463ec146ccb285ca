package mediaadmin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// exportPrefix is the prefix of the export endpoints. They are the module's
// own (no Matrix spec or homeserver has media exports), so they live under
// a prefix of their own that no homeserver uses:
//
//	GET /_matrix_media/v1/export/user/{userId}       one user's media on this site
//	GET /_matrix_media/v1/export/server/{serverName} every local media item of this site
const exportPrefix = "/_matrix_media/v1/export/"

// Endpoints of the export API (labels of the request metric).
const (
	epExportUser   endpoint = "export_user"
	epExportServer endpoint = "export_server"
)

// ExportFunc writes the archive of serverName's local media to w: of the
// user userID only when it is not empty (package mediaarchive's format).
// It returns ErrExportBusy when too many exports run already. Once it has
// written to w, its errors can no longer become an error response.
type ExportFunc func(ctx context.Context, w io.Writer, serverName, userID string) error

// ErrExportBusy reports that an export was refused because too many run
// already (429 M_LIMIT_EXCEEDED).
var ErrExportBusy = errors.New("too many media exports running")

// exportRetryAfter is the Retry-After of a refused export.
const exportRetryAfter = 30 * time.Second

// exportRoute is a parsed export request.
type exportRoute struct {
	ep endpoint
	// subject is the percent-decoded user ID or server name.
	subject string
}

// parseExportRoute matches an escaped request path to an export endpoint.
func parseExportRoute(path string) (exportRoute, bool) {
	rest, ok := strings.CutPrefix(path, exportPrefix)
	if !ok {
		return exportRoute{}, false
	}
	kind, arg, ok := strings.Cut(rest, "/")
	if !ok || arg == "" || strings.Contains(arg, "/") {
		return exportRoute{}, false
	}
	subject, err := url.PathUnescape(arg)
	if err != nil {
		return exportRoute{}, false
	}
	switch kind {
	case "user":
		return exportRoute{ep: epExportUser, subject: subject}, true
	case "server":
		return exportRoute{ep: epExportServer, subject: subject}, true
	}
	return exportRoute{}, false
}

// IsExportPath reports whether path (escaped, r.URL.EscapedPath()) is one
// of the export endpoints the SiteAPI answers (whatever the method).
func IsExportPath(path string) bool {
	_, ok := parseExportRoute(path)
	return ok
}

// serveExport answers an export request: a ZIP archive streamed as it is
// written, or a Matrix error when the request is refused or the export
// fails before its first byte. Media admins may export any local user and
// the whole server; with SiteConfig.AllowUserExport, any other user may
// export their own media.
func (a *SiteAPI) serveExport(w http.ResponseWriter, r *http.Request, rt exportRoute) {
	if r.Method != http.MethodGet {
		a.finish(w, r, rt.ep, nil, matrix.MethodNotAllowed("Unrecognized request"))
		return
	}
	if a.cfg.Export == nil {
		a.finish(w, r, rt.ep, nil, matrix.Unrecognized("Media exports are not available"))
		return
	}
	c, admin, err := a.identify(r)
	if err == nil {
		err = a.mayExport(rt, c, admin)
	}
	if err != nil {
		a.finish(w, r, rt.ep, nil, err)
		return
	}
	userID := ""
	if rt.ep == epExportUser {
		userID = rt.subject
	}
	start := time.Now()
	started, err := StreamArchive(w, ExportFilename(a.cfg.ServerName, userID), func(out io.Writer) error {
		return a.cfg.Export(r.Context(), out, a.cfg.ServerName, userID)
	})
	fields := []zap.Field{zap.String("actor", c.actor()), zap.String("server_name", a.cfg.ServerName),
		zap.String("user_id", userID), zap.Duration("duration", time.Since(start))}
	switch {
	case err == nil:
		a.logger.Info("media exported", fields...)
		a.metrics.request(string(rt.ep), http.StatusOK)
	case !started:
		a.finish(w, r, rt.ep, nil, err)
	default:
		a.logger.Warn("media export failed after it started; aborting the response", append(fields, zap.Error(err))...)
		status := http.StatusInternalServerError
		if r.Context().Err() != nil {
			status = statusClientGone
		}
		a.metrics.request(string(rt.ep), status)
		AbortResponse()
	}
}

// mayExport decides whether c may make the export rt: admins may export the
// site's server and its local users; other users only themselves, when the
// site allows it.
func (a *SiteAPI) mayExport(rt exportRoute, c caller, admin bool) error {
	self := rt.ep == epExportUser && rt.subject == c.user.UserID
	switch {
	case !admin && !(self && a.cfg.AllowUserExport):
		if rt.ep == epExportUser && a.cfg.AllowUserExport {
			return matrix.Forbidden("You may only export your own media")
		}
		return matrix.Forbidden("You are not a server admin")
	case rt.ep == epExportServer && rt.subject != a.cfg.ServerName:
		return matrix.Unknown(http.StatusBadRequest, "Can only export this server's media")
	case rt.ep == epExportUser:
		return localUser(rt.subject, a.cfg.ServerName)
	}
	return nil
}

// ExportFilename is the name offered for the archive of serverName's media
// (of userID only, when set): the server name and, for a user, the
// localpart, in file-name-safe ASCII, e.g. "media-alice-example.org.zip".
func ExportFilename(serverName, userID string) string {
	name := "media-" + serverName
	if local, _, err := matrix.SplitUserID(userID); err == nil {
		name = "media-" + local + "-" + serverName
	}
	safe := strings.Map(func(r rune) rune {
		if r < 0x80 && (r == '.' || r == '-' || r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			return r
		}
		return '_'
	}, name)
	return safe + ".zip"
}

// archiveWriter sends the headers of an archive response with its first
// byte.
type archiveWriter struct {
	w        http.ResponseWriter
	filename string
	started  bool
}

func (a *archiveWriter) Write(p []byte) (int, error) {
	if !a.started {
		a.started = true
		h := a.w.Header()
		h.Set("Content-Type", "application/zip")
		h.Set("Content-Disposition", fmt.Sprintf(`attachment; filename="%s"`, a.filename))
		h.Set("Cache-Control", "no-store")
		h.Set("X-Content-Type-Options", "nosniff")
		a.w.WriteHeader(http.StatusOK)
	}
	return a.w.Write(p)
}

// StreamArchive answers a request with the ZIP archive write produces,
// streamed: 200 with Content-Type application/zip and an attachment
// Content-Disposition of filename (which must be a plain ASCII file name),
// sent with the first byte write writes. It returns write's error and
// whether the response had started: when it had not, the caller answers
// with an error response; when it had, the caller must abort the response
// (AbortResponse) so that the client sees a failed transfer rather than a
// truncated archive.
func StreamArchive(w http.ResponseWriter, filename string, write func(io.Writer) error) (started bool, err error) {
	aw := &archiveWriter{w: w, filename: filename}
	err = write(aw)
	return aw.started, err
}

// AbortResponse aborts the response being written: the server closes the
// connection (HTTP/1) or resets the stream (HTTP/2) without finishing the
// body, so that the client cannot take a truncated archive for a whole one.
// It does not return: it panics with http.ErrAbortHandler, which net/http
// recovers silently by design.
func AbortResponse() {
	panic(http.ErrAbortHandler)
}
