package mediaapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/capped"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/federation"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/preview"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Previewer fetches pages and images for URL previews
// (*preview.Previewer implements it).
type Previewer interface {
	Fetch(ctx context.Context, rawURL string) (preview.Preview, error)
	FetchImage(ctx context.Context, imageURL string) (preview.Image, error)
}

// previewTTL is how long a URL's preview is reused.
const previewTTL = time.Hour

// maxCachedPreviews bounds the in-memory preview cache.
const maxCachedPreviews = 4096

// newPreviewCache returns the cache of recent preview bodies by previewKey, each
// kept for previewTTL from its request, at most maxCachedPreviews, least
// recently used evicted. now is the repository's clock.
func newPreviewCache(now func() time.Time) *capped.Map[string, []byte] {
	return capped.New(capped.Options[string, []byte]{Max: maxCachedPreviews, Now: now})
}

// servePreview handles GET preview_url: the OpenGraph data of a page, with
// its image stored as media of this site (og:image becomes its mxc URI).
func (s *Site) servePreview(w http.ResponseWriter, r *http.Request) int {
	if s.cfg.Previews == nil {
		return writeErr(w, matrix.Unrecognized("URL previews are not enabled on this server"))
	}
	user, st := s.authenticate(w, r, false)
	if st != 0 {
		return st
	}
	if st := s.limit(w, r, &user, rateCost{class: RatePreview, cost: 1}); st != 0 {
		return st
	}
	raw, found, ok := matrix.QueryParam(r.URL.RawQuery, "url")
	if !found || raw == "" {
		return writeErr(w, matrix.MissingParam("Missing url parameter"))
	}
	if _, err := preview.ValidateURL(raw); !ok || err != nil {
		return writeErr(w, matrix.InvalidParam("Invalid url parameter: an absolute http(s) URL is needed"))
	}
	if v, found, _ := matrix.QueryParam(r.URL.RawQuery, "ts"); found {
		if _, err := strconv.ParseInt(v, 10, 64); err != nil {
			return writeErr(w, matrix.InvalidParam("ts must be an integer"))
		}
	}
	key := previewKey(s.cfg.ServerName, raw)
	if body, ok := s.repo.previews.Get(key); ok {
		return writeJSON(w, body)
	}
	v, err, _ := s.repo.previewFlights.Do(key, func() (any, error) {
		// Cached before the flight ends, so that a request arriving
		// after it finds the preview instead of fetching the page again.
		body, err := s.makePreview(context.WithoutCancel(r.Context()), raw, user.UserID)
		if err == nil {
			s.repo.previews.PutUntil(key, body, s.repo.now().Add(previewTTL))
		}
		return body, err
	})
	if err != nil {
		return s.previewError(w, r, err)
	}
	return writeJSON(w, v.([]byte))
}

// previewKey is the cache and coalescing key of a preview of rawURL made for
// a site: each site gets previews whose og:image is its own media.
func previewKey(serverName, rawURL string) string {
	return serverName + "\x00" + rawURL
}

// makePreview fetches the page (and its image) and builds the JSON body.
func (s *Site) makePreview(ctx context.Context, raw, userID string) ([]byte, error) {
	p, err := s.cfg.Previews.Fetch(ctx, raw)
	if err != nil {
		return nil, err
	}
	fields := p.Fields
	if fields == nil {
		fields = map[string]any{}
	}
	if p.ImageURL != "" {
		img, err := s.cfg.Previews.FetchImage(ctx, p.ImageURL)
		switch {
		case err == nil:
			mxc, err := s.storePreviewImage(ctx, img, userID)
			if errors.Is(err, errPreviewImageQuarantined) {
				// A preview without its image is still a preview.
				delete(fields, "og:image")
				break
			}
			if err != nil {
				return nil, err
			}
			fields["og:image"] = mxc
			fields["og:image:type"] = img.ContentType
			fields["matrix:image:size"] = len(img.Body)
			if img.Width > 0 && img.Height > 0 {
				fields["og:image:width"] = img.Width
				fields["og:image:height"] = img.Height
			}
		default:
			// A preview without its image is still a preview.
			delete(fields, "og:image")
			s.repo.logger.Debug("preview image not fetched", zap.Error(err))
		}
	} else {
		delete(fields, "og:image")
	}
	body, err := json.Marshal(fields)
	if err != nil {
		return nil, err
	}
	return body, nil
}

// errPreviewImageQuarantined says a preview's image is quarantined content.
var errPreviewImageQuarantined = errors.New("preview image is quarantined")

// storePreviewImage stores a preview image as media of this site, owned by
// the user who asked for the preview, and returns its mxc URI.
func (s *Site) storePreviewImage(ctx context.Context, img preview.Image, userID string) (string, error) {
	res, err := storage.IngestTo(ctx, s.repo.stores, s.repo.meta, storage.KindLocal, bytes.NewReader(img.Body),
		storage.PutOptions{ExpectedSize: int64(len(img.Body)), MaxSize: s.cfg.MaxUploadSize})
	if err != nil {
		return "", err
	}
	if s.repo.admin != nil {
		// A quarantined image is left out of the preview (its blob is left
		// to the garbage collector).
		_, err := s.repo.admin.GetQuarantine(ctx, res.SHA256)
		switch {
		case err == nil:
			return "", errPreviewImageQuarantined
		case !errors.Is(err, storage.ErrNotFound):
			return "", fmt.Errorf("checking the quarantine of a preview image: %w", err)
		}
	}
	now := s.repo.now()
	m := storage.Media{ServerName: s.cfg.ServerName, State: storage.StateReady, UserID: userID,
		SHA256: res.SHA256, Size: res.Size, ContentType: img.ContentType, CreatedAt: now, UploadedAt: now}
	for range idAttempts {
		m.MediaID = matrix.NewMediaID()
		err = s.repo.meta.InsertMedia(ctx, m)
		if !errors.Is(err, storage.ErrConflict) {
			break
		}
	}
	if err != nil {
		return "", err
	}
	return s.mxcPrefix + m.MediaID, nil
}

// previewError answers a failed preview.
func (s *Site) previewError(w http.ResponseWriter, r *http.Request, err error) int {
	switch {
	case r.Context().Err() != nil:
		writeErr(w, matrix.Unknown(http.StatusInternalServerError, "Request cancelled"))
		return statusClientGone
	case errors.Is(err, preview.ErrInvalidURL):
		return writeErr(w, matrix.InvalidParam("Invalid url parameter"))
	case errors.Is(err, preview.ErrNotPreviewable):
		return writeErr(w, matrix.Unknown(http.StatusBadGateway, "The URL's content type cannot be previewed"))
	case errors.Is(err, preview.ErrTooLarge):
		return writeErr(w, matrix.NewError(http.StatusBadGateway, matrix.CodeTooLarge, "The URL's content is too large to preview"))
	case errors.Is(err, federation.ErrAddressDenied):
		return writeErr(w, matrix.Forbidden("The URL points to an address that may not be previewed"))
	case errors.Is(err, preview.ErrUnreachable):
		return writeErr(w, matrix.Unknown(http.StatusBadGateway, "Could not fetch the URL"))
	case errors.Is(err, storage.ErrUnavailable):
		return writeErr(w, matrix.Unknown(http.StatusBadGateway, "Media storage is unavailable, try again later"))
	default:
		return s.internalError(w, "previewing URL", err)
	}
}
