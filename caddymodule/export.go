package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaadmin"
	"github.com/caddy-matrix-media/caddy-matrix-media/mediaarchive"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"
)

// Media exports (package mediaarchive) are served by Caddy's admin API
// (GET /matrix_media/export, used by "caddy matrix-media export") and by
// each site (mediaadmin's export endpoints, for Matrix clients). Both call
// resources.export.
const (
	// maxConcurrentExports bounds the exports running at once on one set
	// of resources, admin API and sites together; more are refused (429).
	maxConcurrentExports = 2
	// exportPreviewMaxSource bounds the images an export makes previews
	// of: each is read whole into memory, one at a time per export.
	exportPreviewMaxSource = 32 << 20
	// exportPreviewWidth and exportPreviewHeight are the box previews fit.
	exportPreviewWidth, exportPreviewHeight = 160, 120
	// defaultExportPreviewTimeout bounds one preview when the thumbnail
	// settings give no timeout.
	defaultExportPreviewTimeout = time.Minute
)

// exportThumbnailer makes the previews of an export's index.html with the
// module's thumbnail generator (libvips).
type exportThumbnailer struct {
	gen       *thumbnails.Generator
	maxSource int64
	timeout   time.Duration
}

// Thumbnail implements mediaarchive.Thumbnailer: a still JPEG or PNG that
// fits the preview box; a JPEG or PNG already smaller is its own preview.
func (t exportThumbnailer) Thumbnail(ctx context.Context, m storage.Media, content io.Reader) (mediaarchive.Thumbnail, error) {
	if m.Size > t.maxSource {
		return mediaarchive.Thumbnail{}, fmt.Errorf("image of %d bytes is over the preview bound of %d", m.Size, t.maxSource)
	}
	src, err := io.ReadAll(io.LimitReader(content, t.maxSource+1))
	if err != nil {
		return mediaarchive.Thumbnail{}, fmt.Errorf("reading the image: %w", err)
	}
	if int64(len(src)) > t.maxSource {
		return mediaarchive.Thumbnail{}, fmt.Errorf("image is over the preview bound of %d bytes", t.maxSource)
	}
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	res, err := t.gen.Generate(ctx, src, thumbnails.Request{Width: exportPreviewWidth, Height: exportPreviewHeight, Method: thumbnails.MethodScale})
	if errors.Is(err, thumbnails.ErrSmallerThanRequest) {
		if mt, _, _ := mime.ParseMediaType(m.ContentType); mt == "image/jpeg" || mt == "image/png" {
			return mediaarchive.Thumbnail{ContentType: mt, Data: src}, nil
		}
	}
	if err != nil {
		return mediaarchive.Thumbnail{}, fmt.Errorf("making a preview: %w", err)
	}
	return mediaarchive.Thumbnail{ContentType: res.ContentType, Data: res.Data}, nil
}

// export writes the archive of serverName's local media (of userID only,
// when set) to w. It is the mediaadmin.ExportFunc of every site and the
// admin API's export; at most maxConcurrentExports run at once, the others
// get mediaadmin.ErrExportBusy.
func (res *resources) export(ctx context.Context, w io.Writer, serverName, userID string) error {
	select {
	case res.exports <- struct{}{}:
		defer func() { <-res.exports }()
	default:
		return mediaadmin.ErrExportBusy
	}
	var opts mediaarchive.ExportOptions
	if res.thumbs != nil {
		opts.Thumbnailer = exportThumbnailer{gen: res.thumbs, maxSource: res.exportPreviewMaxSource, timeout: res.exportPreviewTimeout}
	}
	start := time.Now()
	sum, err := mediaarchive.Export(ctx, w, mediaarchive.ExportSource{Meta: res.meta, Stores: res.stores},
		mediaarchive.Selection{ServerName: serverName, UserID: userID}, opts)
	fields := []zap.Field{zap.String("server_name", serverName), zap.String("user_id", userID),
		zap.Int64("items", sum.Items), zap.Int64("files", sum.Files), zap.Int64("bytes", sum.Bytes),
		zap.Int64("quarantined", sum.Quarantined), zap.Int64("missing", sum.Missing), zap.Int64("damaged", sum.Damaged),
		zap.Int64("previews", sum.Thumbnails), zap.Int64("preview_failures", sum.ThumbnailFailures),
		zap.Duration("duration", time.Since(start))}
	if err != nil {
		res.logger.Warn("media export failed", append(fields, zap.Error(err))...)
		return err
	}
	if sum.Missing > 0 || sum.Damaged > 0 {
		res.logger.Warn("media export wrote items whose content is missing or damaged in the store", fields...)
	}
	res.logger.Info("media export written", fields...)
	return nil
}

// serveExport answers GET /matrix_media/export?user=<user_id> or
// ?server=<server_name>: the archive, streamed. A failure after the first
// byte aborts the response.
func (res *resources) serveExport(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	sel, err := exportSelection(r)
	if err != nil {
		return apiError(http.StatusBadRequest, err)
	}
	started, err := mediaadmin.StreamArchive(w, mediaadmin.ExportFilename(sel.ServerName, sel.UserID), func(out io.Writer) error {
		return res.export(r.Context(), out, sel.ServerName, sel.UserID)
	})
	switch {
	case err == nil:
		return nil
	case !started && errors.Is(err, mediaadmin.ErrExportBusy):
		w.Header().Set("Retry-After", "30")
		return apiError(http.StatusTooManyRequests, err)
	case !started:
		return adminOpError(err)
	}
	mediaadmin.AbortResponse()
	return nil
}

// exportSelection reads the query of GET /matrix_media/export: exactly one
// of user (a user ID: their media on their server name) and server (a
// server name: its local media).
func exportSelection(r *http.Request) (mediaarchive.Selection, error) {
	q := r.URL.Query()
	user, server := q.Get("user"), q.Get("server")
	switch {
	case user != "" && server == "":
		return mediaarchive.UserSelection(user)
	case server != "" && user == "":
		if !matrix.ValidServerName(server) {
			return mediaarchive.Selection{}, fmt.Errorf("%q is not a server name", server)
		}
		return mediaarchive.Selection{ServerName: server}, nil
	}
	return mediaarchive.Selection{}, errors.New("give either user=<user_id> or server=<server_name>")
}
