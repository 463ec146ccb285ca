package mediaapi

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// idAttempts is how many fresh media IDs are tried when one collides (which
// with 143 random bits only a broken random source would cause).
const idAttempts = 3

// uploadMeta is the validated metadata of an upload request.
type uploadMeta struct {
	contentType string
	filename    string
}

// parseUploadMeta validates the Content-Type header and the filename query
// parameter. The Content-Type is kept exactly as sent (default
// application/octet-stream); it must be at most 255 visible-ASCII characters
// (spaces and tabs allowed); one that is not exactly one valid media type
// (such as a list) is stored as sent and served as an attachment
// (matrix.InlineSafe). The file name must be valid UTF-8 without control
// characters, at most 255 bytes; its bidirectional controls (U+202E and
// friends, which can disguise an extension) are removed.
func parseUploadMeta(r *http.Request) (uploadMeta, *matrix.Error) {
	var um uploadMeta
	um.contentType = "application/octet-stream"
	if vs := r.Header["Content-Type"]; len(vs) > 0 && vs[0] != "" {
		ct := vs[0]
		if merr := checkContentType(ct); merr != nil {
			return um, merr
		}
		um.contentType = ct
	}
	name, found, ok := matrix.QueryParam(r.URL.RawQuery, "filename")
	if found && (!ok || !matrix.ValidFileName(name)) {
		return um, matrix.InvalidParam("filename must be valid UTF-8 of at most 255 bytes without control characters")
	}
	um.filename = matrix.StripBidiControls(name)
	return um, nil
}

// bodyReader remembers a read error of the request body, so that a failed
// store can be told apart from a client that went away mid-upload.
type bodyReader struct {
	r   io.Reader
	err error
}

func (b *bodyReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err != nil && err != io.EOF {
		b.err = err
	}
	return n, err
}

// admitUpload decides, before the body is read, whether user may upload it:
// the announced size against the user's largest upload (413), then the
// user's quota (checkQuota, 403). On refusal it writes the error response
// and returns its status; otherwise it returns what the upload may add.
func (s *Site) admitUpload(w http.ResponseWriter, r *http.Request, user auth.User) (*uploadQuota, int) {
	rule := s.quotaFor(r, user)
	maxUpload := s.maxUploadFor(rule)
	if r.ContentLength > maxUpload {
		return nil, writeErr(w, s.tooLarge(rule, maxUpload))
	}
	q, err := s.checkQuota(r.Context(), rule, user.UserID, r.ContentLength)
	if err != nil {
		if qe, ok := asQuotaExceeded(err); ok {
			return nil, writeErr(w, s.quotaError(rule, qe))
		}
		return nil, s.internalError(w, "checking the quota of an upload", err)
	}
	return q, 0
}

// receiveUpload checks the upload's metadata (content type, file name),
// then streams the body into the blob store within the bounds of q. On
// failure it writes the error response and returns its status.
func (s *Site) receiveUpload(w http.ResponseWriter, r *http.Request, q *uploadQuota) (uploadMeta, storage.IngestResult, int) {
	um, merr := parseUploadMeta(r)
	if merr != nil {
		return uploadMeta{}, storage.IngestResult{}, writeErr(w, merr)
	}
	res, st := s.ingest(w, r, q)
	if st == 0 && s.repo.hooks.uploadReceived != nil {
		s.repo.hooks.uploadReceived()
	}
	return um, res, st
}

// tooLarge is the error for a body over the user's upload limit (the
// site's, or the one of the user's quota rule, which is then counted as a
// quota refusal).
func (s *Site) tooLarge(rule *QuotaRule, limit int64) *matrix.Error {
	if rule != nil && rule.MaxUploadSize > 0 {
		s.repo.metrics.LimitRejected(s.cfg.ServerName, "quota_upload_size")
	}
	return matrix.TooLarge("Upload is larger than the limit of " + strconv.FormatInt(limit, 10) + " bytes")
}

// ingest streams the request body into the blob store (deduplicating) and
// records the blob. On failure it writes the error response and returns its
// status. The store runs detached from the request's context: a client that
// goes away mid-body ends it through the body's read error, while one that
// goes away after its last byte still gets its upload stored (and recorded
// by the caller, see recordCtx), never a half-done one. The body is bounded
// by the user's largest upload and by the bytes their quota has left
// (q.ingestBound): a body of unknown length that passes the quota's bound
// is cut, its partial blob discarded by the store, and refused as over
// quota (403), not as too large.
func (s *Site) ingest(w http.ResponseWriter, r *http.Request, q *uploadQuota) (storage.IngestResult, int) {
	expected := r.ContentLength
	if expected < 0 {
		expected = -1
	}
	body := &bodyReader{r: r.Body}
	if r.Body == nil {
		body.r = http.NoBody
	}
	bound, byQuota := q.ingestBound()
	if bound == 0 {
		// PutOptions.MaxSize 0 would be no bound: only an empty body fits.
		body.r = io.LimitReader(body.r, 1)
	}
	res, err := storage.IngestTo(context.WithoutCancel(r.Context()), s.repo.stores, s.repo.meta, storage.KindLocal, body, storage.PutOptions{
		MaxSize:      bound,
		ExpectedSize: expected,
	})
	if err == nil && bound == 0 && res.Size > 0 {
		err = storage.ErrTooLarge
	}
	switch {
	case err == nil:
		s.repo.metrics.uploadBytes.Add(float64(res.Size))
		if res.Existed {
			s.repo.metrics.dedupHits.Inc()
		} else {
			s.repo.metrics.datastoreBytes(res.Datastore, "in").Add(float64(res.Size))
		}
		return res, 0
	case errors.Is(err, storage.ErrTooLarge) && byQuota:
		return res, writeErr(w, s.quotaError(q.rule, q.overBound()))
	case errors.Is(err, storage.ErrTooLarge):
		return res, writeErr(w, s.tooLarge(q.rule, q.maxUpload))
	case errors.Is(err, storage.ErrSizeMismatch):
		return res, writeErr(w, matrix.Unknown(http.StatusBadRequest, "Request body length differs from Content-Length"))
	case body.err != nil || r.Context().Err() != nil:
		st := writeErr(w, matrix.Unknown(http.StatusBadRequest, "Failed to read the request body"))
		if r.Context().Err() != nil {
			// Nobody will read the answer; count it as abandoned.
			st = statusClientGone
		}
		return res, st
	case errors.Is(err, storage.ErrUnavailable):
		s.repo.logger.Error("media storage unavailable during an upload", zap.Error(err))
		return res, writeErr(w, storageUnavailable(w))
	default:
		return res, s.internalError(w, "storing upload", err)
	}
}

// metadataWriteTimeout bounds the recording of an upload whose body was
// received, which does not stop when the client goes away.
const metadataWriteTimeout = 30 * time.Second

// recordCtx is the context of the metadata write that completes an upload:
// detached from the request (a client that left after sending its body still
// gets its upload recorded, and no blob is left without its row), bounded by
// metadataWriteTimeout.
func recordCtx(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(r.Context()), metadataWriteTimeout)
}

// serveUpload handles POST /_matrix/media/v3/upload.
func (s *Site) serveUpload(w http.ResponseWriter, r *http.Request) int {
	user, st := s.authenticate(w, r, false)
	if st != 0 {
		return st
	}
	if st := s.limit(w, r, &user, s.uploadCosts(r)...); st != 0 {
		return st
	}
	gen := s.repo.cacheGen.Load()
	q, st := s.admitUpload(w, r, user)
	if st != 0 {
		return st
	}
	um, res, st := s.receiveUpload(w, r, q)
	if st != 0 {
		return st
	}
	s.chargeUpload(r, &user, res.Size)
	ctx, cancel := recordCtx(r)
	defer cancel()
	now := s.repo.now()
	m := storage.Media{
		ServerName:        s.cfg.ServerName,
		State:             storage.StateReady,
		UserID:            user.UserID,
		SHA256:            res.SHA256,
		Size:              res.Size,
		Datastore:         res.Datastore,
		ContentType:       um.contentType,
		Filename:          um.filename,
		CreatedAt:         now,
		UploadedAt:        now,
		RefuseQuarantined: s.checksQuarantine(),
	}
	var err error
	for range idAttempts {
		m.MediaID = matrix.NewMediaID()
		if q.limits.Now.IsZero() {
			err = s.repo.meta.InsertMedia(ctx, m)
		} else {
			err = s.repo.quotas.InsertMediaLimited(ctx, m, q.limits)
		}
		if !errors.Is(err, storage.ErrConflict) {
			break
		}
	}
	if qe, ok := asQuotaExceeded(err); ok {
		// Another upload of the user took the room meanwhile; the blob
		// stays unreferenced for the collector.
		return writeErr(w, s.quotaError(q.rule, qe))
	}
	if errors.Is(err, storage.ErrQuarantined) {
		return s.refuseQuarantined(w, user, err)
	}
	if err != nil {
		return s.internalError(w, "recording upload", err)
	}
	if s.repo.cache != nil {
		// The store keeps milliseconds: cache what a later read would return
		// (unless the content was quarantined since the check, gen).
		m.CreatedAt = m.CreatedAt.Truncate(time.Millisecond)
		m.UploadedAt = m.UploadedAt.Truncate(time.Millisecond)
		s.repo.cachePut(gen, mediaKey{m.ServerName, m.MediaID}, newMediaEntry(m))
	}
	s.logUpload(user, m, res.Existed)
	s.repo.pregenerate(m)
	return writeJSON(w, []byte(`{"content_uri":"`+s.mxcPrefix+m.MediaID+`"}`))
}

func (s *Site) logUpload(user auth.User, m storage.Media, existed bool) {
	if ce := s.repo.logger.Check(zap.InfoLevel, "media uploaded"); ce != nil {
		ce.Write(
			zap.String("server_name", m.ServerName),
			zap.String("media_id", m.MediaID),
			zap.String("user_id", user.UserID),
			zap.Int64("size", m.Size),
			zap.Bool("dedup", existed),
		)
	}
}

// isAdmin reports whether user is a media admin. A failure to find out (the
// homeserver's admin API failing) counts as no, and is logged.
func (s *Site) isAdmin(r *http.Request, user auth.User) bool {
	if user.IsAdmin {
		return true
	}
	if s.cfg.Admins == nil {
		return false
	}
	ok, err := s.cfg.Admins.IsAdmin(r.Context(), user, auth.RequestCredentials(r).Token)
	if err != nil {
		s.repo.logger.Warn("checking whether a user is a media admin", zap.String("user_id", user.UserID), zap.Error(err))
	}
	return ok && err == nil
}

// serveCreate handles POST /_matrix/media/v1/create. The body (normally {})
// is ignored. A user whose quota has no room for one more file (even an
// empty one) is refused here as at an upload.
func (s *Site) serveCreate(w http.ResponseWriter, r *http.Request) int {
	user, st := s.authenticate(w, r, false)
	if st != 0 {
		return st
	}
	rule := s.quotaFor(r, user)
	maxPending := s.maxPendingFor(rule)
	if st := s.limit(w, r, &user, rateCost{class: RateUpload, cost: 1}); st != 0 {
		return st
	}
	// An ID whose upload could not fit even empty (files used up) is
	// refused now rather than at its PUT.
	if _, err := s.checkQuota(r.Context(), rule, user.UserID, 0); err != nil {
		if qe, ok := asQuotaExceeded(err); ok {
			return writeErr(w, s.quotaError(rule, qe))
		}
		return s.internalError(w, "checking the quota of a new media ID", err)
	}
	now := s.repo.now()
	m := storage.Media{
		ServerName: s.cfg.ServerName,
		State:      storage.StatePending,
		UserID:     user.UserID,
		CreatedAt:  now,
		ExpiresAt:  now.Add(s.cfg.PendingExpiry),
	}
	var err error
	for range idAttempts {
		m.MediaID = matrix.NewMediaID()
		err = s.repo.meta.CreatePending(r.Context(), m, maxPending)
		if !errors.Is(err, storage.ErrConflict) {
			break
		}
	}
	switch {
	case err == nil:
	case errors.Is(err, storage.ErrLimitExceeded) && s.isAdmin(r, user):
		// Admins are not held to the limit: try again without it.
		if err = s.repo.meta.CreatePending(r.Context(), m, 0); err != nil {
			return s.internalError(w, "creating pending media", err)
		}
	case errors.Is(err, storage.ErrLimitExceeded):
		retry := time.Second
		oldest, oerr := s.repo.meta.OldestPendingExpiry(r.Context(), s.cfg.ServerName, user.UserID, now)
		switch {
		case oerr == nil:
			retry = max(oldest.Sub(now), time.Second)
		case !errors.Is(oerr, storage.ErrNotFound):
			s.repo.logger.Error("finding oldest pending upload", zap.Error(oerr))
		}
		s.repo.metrics.LimitRejected(s.cfg.ServerName, "quota_pending")
		return writeErr(w, matrix.LimitExceeded("Too many pending uploads", retry))
	default:
		return s.internalError(w, "creating pending media", err)
	}
	body := `{"content_uri":"` + s.mxcPrefix + m.MediaID + `","unused_expires_at":` +
		strconv.FormatInt(m.ExpiresAt.UnixMilli(), 10) + `}`
	return writeJSON(w, []byte(body))
}

// servePut handles PUT /_matrix/media/v3/upload/{serverName}/{mediaId}: the
// content of a media ID reserved with create. The checks run in Synapse's
// order so that a second PUT is refused with 409 before its body (possibly
// empty) is looked at.
func (s *Site) servePut(w http.ResponseWriter, r *http.Request, rt *route) int {
	user, st := s.authenticate(w, r, false)
	if st != 0 {
		return st
	}
	server, id, merr := rt.mediaRef()
	switch {
	case merr != nil:
		return writeErr(w, merr)
	case server != s.cfg.ServerName:
		return writeErr(w, matrix.NotFound("Non-local server name specified"))
	}
	key := mediaKey{server, id}
	if !s.repo.waits.tryLockPut(key) {
		return writeErr(w, matrix.CannotOverwriteMedia("Media ID is already being uploaded to"))
	}
	defer s.repo.waits.unlockPut(key)

	m, err := s.repo.meta.GetMedia(r.Context(), server, id)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return writeErr(w, matrix.NotFound("Unknown media ID"))
	case err != nil:
		return s.internalError(w, "looking up pending media", err)
	case m.UserID != user.UserID:
		return writeErr(w, matrix.Forbidden("You may not upload to this media ID"))
	case m.State != storage.StatePending:
		return writeErr(w, matrix.CannotOverwriteMedia("Media ID already has content"))
	case !s.repo.now().Before(m.ExpiresAt):
		return writeErr(w, matrix.NotFound("Media ID has expired"))
	}
	if st := s.limit(w, r, &user, s.uploadCosts(r)...); st != 0 {
		return st
	}

	q, st := s.admitUpload(w, r, user)
	if st != 0 {
		return st
	}
	um, res, st := s.receiveUpload(w, r, q)
	if st != 0 {
		return st
	}
	s.chargeUpload(r, &user, res.Size)
	ctx, cancel := recordCtx(r)
	defer cancel()
	m.RefuseQuarantined = s.checksQuarantine()
	m.SHA256 = res.SHA256
	m.Size = res.Size
	m.Datastore = res.Datastore
	m.ContentType = um.contentType
	m.Filename = um.filename
	m.UploadedAt = s.repo.now()
	if q.limits.Now.IsZero() {
		err = s.repo.meta.CompletePending(ctx, m)
	} else {
		err = s.repo.quotas.CompletePendingLimited(ctx, m, q.limits)
	}
	qe, overQuota := asQuotaExceeded(err)
	switch {
	case overQuota:
		return writeErr(w, s.quotaError(q.rule, qe))
	case errors.Is(err, storage.ErrQuarantined):
		return s.refuseQuarantined(w, user, err)
	case err == nil:
	case errors.Is(err, storage.ErrConflict):
		return writeErr(w, matrix.CannotOverwriteMedia("Media ID already has content"))
	case errors.Is(err, storage.ErrNotFound):
		return writeErr(w, matrix.NotFound("Media ID has expired"))
	default:
		return s.internalError(w, "completing pending media", err)
	}
	s.repo.publish(ctx, mediaTopic(key))
	s.logUpload(user, m, res.Existed)
	s.repo.pregenerate(m)
	return writeJSON(w, emptyObject)
}

var emptyObject = []byte(`{}`)

// errContentQuarantined is the answer to an upload of quarantined content.
var errContentQuarantined = matrix.Forbidden("This media has been quarantined and cannot be uploaded")

// checksQuarantine reports whether uploads are checked against the
// quarantine: when the metadata store keeps one (storage.MediaAdmin). The
// check itself runs in the transaction that writes the media row
// (storage.Media.RefuseQuarantined), after the body was stored and before
// any row refers to it.
func (s *Site) checksQuarantine() bool { return s.repo.admin != nil }

// refuseQuarantined answers 403 M_FORBIDDEN to an upload whose content is
// quarantined (err wraps storage.ErrQuarantined and names who quarantined
// it), and returns its status. No media row was written: the blob just
// ingested (or claimed, when it was a duplicate) is left unreferenced, and
// the garbage collector removes it after its grace period unless something
// else references it.
func (s *Site) refuseQuarantined(w http.ResponseWriter, user auth.User, err error) int {
	s.repo.logger.Info("refused an upload of quarantined media", zap.String("server_name", s.cfg.ServerName),
		zap.String("user_id", user.UserID), zap.Error(err))
	return writeErr(w, errContentQuarantined)
}
