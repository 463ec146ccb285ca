package mediaadmin

import (
	"context"
	"errors"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// empty is the {} body of the endpoints that return nothing.
type empty struct{}

// errUnknownMedia is Synapse's answer for media it does not hold.
func errUnknownMedia() error { return matrix.NotFound("Unknown media") }

// mediaRef checks the server name and media ID of a path; invalid ones
// cannot name stored media, so they answer 404 like missing media.
func mediaRef(server, mediaID string) (storage.MediaRef, error) {
	if !matrix.ValidServerName(server) || !matrix.ValidMediaID(mediaID) {
		return storage.MediaRef{}, errUnknownMedia()
	}
	return storage.MediaRef{ServerName: server, MediaID: mediaID}, nil
}

// quarantineMedia: POST media/quarantine/{server}/{id} -> {}.
func (a *SiteAPI) quarantineMedia(ctx context.Context, _ *http.Request, rt route, c caller) (any, error) {
	ref, err := mediaRef(rt.server, rt.mediaID)
	if err != nil {
		return nil, err
	}
	if err := a.svc.QuarantineMedia(ctx, c.actor(), ref); err != nil {
		return nil, err
	}
	return empty{}, nil
}

// unquarantineMedia: POST media/unquarantine/{server}/{id} -> {}.
func (a *SiteAPI) unquarantineMedia(ctx context.Context, _ *http.Request, rt route, c caller) (any, error) {
	ref, err := mediaRef(rt.server, rt.mediaID)
	if err != nil {
		return nil, err
	}
	if err := a.svc.UnquarantineMedia(ctx, c.actor(), ref); err != nil {
		return nil, err
	}
	return empty{}, nil
}

// numQuarantined is the body of the user and room quarantine endpoints.
type numQuarantined struct {
	NumQuarantined int `json:"num_quarantined"`
}

// quarantineUser: POST user/{userId}/media/quarantine ->
// {"num_quarantined": n}. Users of other servers have no local media: 0.
func (a *SiteAPI) quarantineUser(ctx context.Context, _ *http.Request, rt route, c caller) (any, error) {
	n, err := a.svc.QuarantineUser(ctx, c.actor(), a.cfg.ServerName, rt.userID)
	if err != nil {
		return nil, err
	}
	return numQuarantined{n}, nil
}

// quarantineRoom: POST room/{roomId}/media/quarantine (and the legacy
// quarantine_media/{roomId}) -> {"num_quarantined": n}, from the room's
// media as the homeserver lists them.
func (a *SiteAPI) quarantineRoom(ctx context.Context, _ *http.Request, rt route, c caller) (any, error) {
	refs, err := a.hs.roomMedia(ctx, c.token, rt.roomID)
	if err != nil {
		return nil, err
	}
	a.logger.Info("quarantining a room's media", zap.String("actor", c.actor()),
		zap.String("room_id", rt.roomID), zap.Int("listed", len(refs)))
	n, err := a.svc.QuarantineRefs(ctx, c.actor(), refs)
	if err != nil {
		return nil, err
	}
	return numQuarantined{n}, nil
}

// protect: POST media/protect/{id} -> {} (local media).
func (a *SiteAPI) protect(ctx context.Context, _ *http.Request, rt route, c caller) (any, error) {
	ref, err := mediaRef(a.cfg.ServerName, rt.mediaID)
	if err != nil {
		return nil, err
	}
	if err := a.svc.Protect(ctx, c.actor(), ref); err != nil {
		return nil, err
	}
	return empty{}, nil
}

// unprotect: POST media/unprotect/{id} -> {} (local media).
func (a *SiteAPI) unprotect(ctx context.Context, _ *http.Request, rt route, c caller) (any, error) {
	ref, err := mediaRef(a.cfg.ServerName, rt.mediaID)
	if err != nil {
		return nil, err
	}
	if err := a.svc.Unprotect(ctx, c.actor(), ref); err != nil {
		return nil, err
	}
	return empty{}, nil
}

// mediaInfoJSON is Synapse's media_info object. Fields Synapse may send as
// null are pointers.
type mediaInfoJSON struct {
	MediaOrigin        *string `json:"media_origin"`
	UserID             *string `json:"user_id"`
	MediaID            string  `json:"media_id"`
	MediaType          string  `json:"media_type"`
	MediaLength        *int64  `json:"media_length"`
	UploadName         *string `json:"upload_name"`
	CreatedTS          int64   `json:"created_ts"`
	FilesystemID       *string `json:"filesystem_id"`
	URLCache           *string `json:"url_cache"`
	LastAccessTS       *int64  `json:"last_access_ts"`
	QuarantinedBy      *string `json:"quarantined_by"`
	Authenticated      *bool   `json:"authenticated"`
	SafeFromQuarantine *bool   `json:"safe_from_quarantine"`
	SHA256             *string `json:"sha256"`
}

// userMediaJSON is an item of Synapse's users/{userId}/media list (its
// LocalMedia record).
type userMediaJSON struct {
	MediaID            string  `json:"media_id"`
	MediaType          string  `json:"media_type"`
	MediaLength        *int64  `json:"media_length"`
	UploadName         *string `json:"upload_name"`
	CreatedTS          int64   `json:"created_ts"`
	URLCache           *string `json:"url_cache"`
	LastAccessTS       *int64  `json:"last_access_ts"`
	QuarantinedBy      *string `json:"quarantined_by"`
	SafeFromQuarantine bool    `json:"safe_from_quarantine"`
	UserID             *string `json:"user_id"`
	Authenticated      *bool   `json:"authenticated"`
	SHA256             *string `json:"sha256"`
}

// nullable returns nil for the zero value, else a pointer to v.
func nullable[T comparable](v T) *T {
	var zero T
	if v == zero {
		return nil
	}
	return &v
}

// millis returns t in Unix milliseconds, nil when zero.
func millis(t time.Time) *int64 {
	if t.IsZero() {
		return nil
	}
	ms := t.UnixMilli()
	return &ms
}

// quarantinedBy is who quarantined the item's content, nil when the item
// is not refused (not quarantined, or protected from it).
func quarantinedBy(m *storage.Media) *string {
	if !m.Refused() {
		return nil
	}
	return &m.QuarantinedBy
}

// length is the item's size, nil while pending.
func length(m *storage.Media) *int64 {
	if m.State != storage.StateReady {
		return nil
	}
	return &m.Size
}

// mediaInfo renders a media item as Synapse does. authenticated is not
// recorded by this module: null. filesystem_id of a remote copy is its
// content hash (the name of its blob); safe_from_quarantine of a remote
// copy is null unless an operator protected it.
func mediaInfo(m *storage.Media) mediaInfoJSON {
	j := mediaInfoJSON{
		MediaID:       m.MediaID,
		MediaType:     m.ContentType,
		MediaLength:   length(m),
		UploadName:    nullable(m.Filename),
		CreatedTS:     m.CreatedAt.UnixMilli(),
		LastAccessTS:  millis(m.LastAccessAt),
		QuarantinedBy: quarantinedBy(m),
		SHA256:        nullable(m.SHA256),
	}
	if m.Remote {
		j.MediaOrigin = &m.ServerName
		j.FilesystemID = nullable(m.SHA256)
		if m.Protected {
			j.SafeFromQuarantine = &m.Protected
		}
	} else {
		j.UserID = nullable(m.UserID)
		j.SafeFromQuarantine = &m.Protected
	}
	return j
}

// mediaInfo: GET media/{server}/{id} -> {"media_info": {...}}, for local
// media and cached remote copies.
func (a *SiteAPI) mediaInfo(ctx context.Context, _ *http.Request, rt route, _ caller) (any, error) {
	ref, err := mediaRef(rt.server, rt.mediaID)
	if err != nil {
		return nil, err
	}
	m, err := a.svc.MediaInfo(ctx, ref)
	if errors.Is(err, storage.ErrNotFound) {
		return nil, errUnknownMedia()
	}
	if err != nil {
		return nil, err
	}
	return struct {
		MediaInfo mediaInfoJSON `json:"media_info"`
	}{mediaInfo(&m)}, nil
}

// deletedJSON is the body of the deletion endpoints.
type deletedJSON struct {
	DeletedMedia []string `json:"deleted_media"`
	Total        int      `json:"total"`
}

// deletedBody renders what a deletion removed.
func deletedBody(d Deleted) deletedJSON {
	ids := make([]string, len(d.Media))
	for i, ref := range d.Media {
		ids[i] = ref.MediaID
	}
	return deletedJSON{DeletedMedia: ids, Total: len(ids)}
}

// errRemoteDelete is Synapse's answer to deleting another server's media.
func errRemoteDelete() error {
	return matrix.Unknown(http.StatusBadRequest, "Can only delete local media")
}

// deleteMedia: DELETE media/{server}/{id} -> {"deleted_media": [id],
// "total": 1}; local media only.
func (a *SiteAPI) deleteMedia(ctx context.Context, _ *http.Request, rt route, c caller) (any, error) {
	if rt.server != a.cfg.ServerName {
		return nil, errRemoteDelete()
	}
	ref, err := mediaRef(rt.server, rt.mediaID)
	if err != nil {
		return nil, err
	}
	if _, err := a.svc.MediaInfo(ctx, ref); err != nil {
		return nil, err
	}
	d, err := a.svc.DeleteMedia(ctx, c.actor(), []storage.MediaRef{ref})
	if err != nil {
		return nil, err
	}
	return deletedBody(d), nil
}

// deleteOld: POST media/delete?before_ts=&size_gt=&keep_profiles= (and the
// legacy media/{server}/delete) -> {"deleted_media": [...], "total": n}.
func (a *SiteAPI) deleteOld(ctx context.Context, r *http.Request, rt route, c caller) (any, error) {
	q := query(r.URL.RawQuery)
	before, err := q.beforeTS()
	if err != nil {
		return nil, err
	}
	sizeGT, _, err := q.integer("size_gt", 0, false)
	if err != nil {
		return nil, err
	}
	keep, err := q.boolean("keep_profiles", true)
	if err != nil {
		return nil, err
	}
	if rt.legacyServer && rt.server != a.cfg.ServerName {
		return nil, errRemoteDelete()
	}
	var avatars ProfileAvatars
	if keep {
		if a.hs.base == "" {
			return nil, matrix.InvalidParam("keep_profiles needs the homeserver's profiles and no homeserver is configured; pass keep_profiles=false")
		}
		avatars = a.profileAvatars(c.token)
	}
	d, err := a.svc.DeleteOldLocal(ctx, c.actor(), a.cfg.ServerName, time.UnixMilli(before), sizeGT, keep, avatars)
	if err != nil {
		return nil, err
	}
	return deletedBody(d), nil
}

// profileAvatars is the avatar lookup of keep_profiles: a failure to learn
// a user's avatar stops the deletion with a 502 that says how to go on.
func (a *SiteAPI) profileAvatars(token string) ProfileAvatars {
	lookup := a.hs.avatarLookup(token)
	return func(ctx context.Context, userIDs []string) (map[string]bool, error) {
		avatars, err := lookup(ctx, userIDs)
		if err != nil && ctx.Err() == nil {
			a.logger.Warn("profile lookup failed; media not deleted", zap.Error(err))
			return nil, matrix.Unknown(http.StatusBadGateway,
				"Could not look up users' profile avatars with the homeserver, so media kept for profiles cannot be told apart; retry, or pass keep_profiles=false")
		}
		return avatars, err
	}
}

// purgeRemote: POST purge_media_cache?before_ts= -> {"deleted": n}.
func (a *SiteAPI) purgeRemote(ctx context.Context, r *http.Request, _ route, c caller) (any, error) {
	before, err := query(r.URL.RawQuery).beforeTS()
	if err != nil {
		return nil, err
	}
	n, err := a.svc.PurgeRemote(ctx, c.actor(), time.UnixMilli(before))
	if err != nil {
		return nil, err
	}
	return struct {
		Deleted int64 `json:"deleted"`
	}{n}, nil
}

// mediaOrders maps Synapse's order_by values of the user media list to
// store sort keys.
var mediaOrders = map[string]storage.MediaOrder{
	"media_id":             storage.OrderMediaID,
	"upload_name":          storage.OrderFilename,
	"created_ts":           storage.OrderCreated,
	"last_access_ts":       storage.OrderLastAccess,
	"media_length":         storage.OrderSize,
	"media_type":           storage.OrderContentType,
	"quarantined_by":       storage.OrderQuarantinedBy,
	"safe_from_quarantine": storage.OrderProtected,
}

// mediaOrderNames lists the order_by values in Synapse's order, for its
// error message.
var mediaOrderNames = []string{"media_id", "upload_name", "created_ts", "last_access_ts",
	"media_length", "media_type", "quarantined_by", "safe_from_quarantine"}

// userMediaQuery parses the parameters shared by the list and delete user
// media endpoints, checking them in Synapse's order.
func (a *SiteAPI) userMediaQuery(r *http.Request, rt route) (storage.UserMediaQuery, error) {
	if err := localUser(rt.userID, a.cfg.ServerName); err != nil {
		return storage.UserMediaQuery{}, err
	}
	q := query(r.URL.RawQuery)
	from, _, err := q.integer("from", 0, false)
	if err != nil {
		return storage.UserMediaQuery{}, err
	}
	limit, _, err := q.integer("limit", DefaultLimit, false)
	if err != nil {
		return storage.UserMediaQuery{}, err
	}
	uq := storage.UserMediaQuery{ServerName: a.cfg.ServerName, UserID: rt.userID, Offset: int(from), Limit: int(limit)}
	if !q.has("order_by") && !q.has("dir") {
		// Synapse's default: newest first.
		uq.OrderBy, uq.Descending = storage.OrderCreated, true
		return uq, nil
	}
	order, err := q.enum("order_by", "created_ts", mediaOrderNames...)
	if err != nil {
		return storage.UserMediaQuery{}, err
	}
	uq.OrderBy = mediaOrders[order]
	if uq.Descending, err = q.direction(); err != nil {
		return storage.UserMediaQuery{}, err
	}
	return uq, nil
}

// listUserMedia: GET users/{userId}/media -> {"media": [...], "total": n,
// "next_token": m}. A user the homeserver does not know simply has no
// media (Synapse answers 404 "Unknown user"; this module has no user
// table).
func (a *SiteAPI) listUserMedia(ctx context.Context, r *http.Request, rt route, _ caller) (any, error) {
	uq, err := a.userMediaQuery(r, rt)
	if err != nil {
		return nil, err
	}
	page, total, err := a.svc.ListUserMedia(ctx, uq)
	if err != nil {
		return nil, err
	}
	items := make([]userMediaJSON, len(page))
	for i := range page {
		m := &page[i]
		items[i] = userMediaJSON{
			MediaID:            m.MediaID,
			MediaType:          m.ContentType,
			MediaLength:        length(m),
			UploadName:         nullable(m.Filename),
			CreatedTS:          m.CreatedAt.UnixMilli(),
			LastAccessTS:       millis(m.LastAccessAt),
			QuarantinedBy:      quarantinedBy(m),
			SafeFromQuarantine: m.Protected,
			UserID:             nullable(m.UserID),
			SHA256:             nullable(m.SHA256),
		}
	}
	return struct {
		Media     []userMediaJSON `json:"media"`
		Total     int64           `json:"total"`
		NextToken *int64          `json:"next_token,omitempty"`
	}{items, total, nextToken(uq.Offset, uq.Limit, len(page), total)}, nil
}

// nextToken is Synapse's pagination token: the offset of the next page
// while the current one did not reach total.
func nextToken(from, limit, got int, total int64) *int64 {
	// Subtracting cannot overflow (both are non-negative); adding could.
	if int64(limit) >= total-int64(from) {
		return nil
	}
	n := int64(from + got)
	return &n
}

// deleteUserMedia: DELETE users/{userId}/media -> {"deleted_media": [...],
// "total": n}: the page the list endpoint would return with the same
// parameters (default 100 items).
func (a *SiteAPI) deleteUserMedia(ctx context.Context, r *http.Request, rt route, c caller) (any, error) {
	uq, err := a.userMediaQuery(r, rt)
	if err != nil {
		return nil, err
	}
	d, err := a.svc.DeleteUserMedia(ctx, c.actor(), uq)
	if err != nil {
		return nil, err
	}
	return deletedBody(d), nil
}

// usageOrders maps Synapse's order_by values of the statistics to store
// sort keys. Display names live on the homeserver: ordering by them orders
// by user ID.
var usageOrders = map[string]storage.UsageOrder{
	"user_id":      storage.UsageByUserID,
	"displayname":  storage.UsageByUserID,
	"media_length": storage.UsageByBytes,
	"media_count":  storage.UsageByCount,
}

// usageJSON is one user of the statistics.
type usageJSON struct {
	UserID      string  `json:"user_id"`
	DisplayName *string `json:"displayname"`
	MediaCount  int64   `json:"media_count"`
	MediaLength int64   `json:"media_length"`
}

// usage: GET statistics/users/media -> {"users": [...], "total": n,
// "next_token": m}. search_term matches a substring of the user ID
// (case-insensitive), not display names; order_by=displayname orders by
// user ID; displayname comes from each user's global profile (null when
// unknown).
func (a *SiteAPI) usage(ctx context.Context, r *http.Request, _ route, c caller) (any, error) {
	q := query(r.URL.RawQuery)
	order, err := q.enum("order_by", "user_id", "media_length", "media_count", "user_id", "displayname")
	if err != nil {
		return nil, err
	}
	from, _, err := q.integer("from", 0, false)
	if err != nil {
		return nil, err
	}
	limit, _, err := q.integer("limit", DefaultLimit, false)
	if err != nil {
		return nil, err
	}
	fromTS, _, err := q.integer("from_ts", 0, false)
	if err != nil {
		return nil, err
	}
	untilTS, hasUntil, err := q.integer("until_ts", 0, false)
	if err != nil {
		return nil, err
	}
	if hasUntil && untilTS <= fromTS {
		return nil, matrix.InvalidParam("Query parameter until_ts must be greater than from_ts.")
	}
	search, hasSearch, err := q.get("search_term")
	if err != nil {
		return nil, err
	}
	if hasSearch && search == "" {
		return nil, matrix.InvalidParam("Query parameter search_term cannot be an empty string.")
	}
	desc, err := q.direction()
	if err != nil {
		return nil, err
	}
	uq := storage.UsageQuery{
		ServerName:     a.cfg.ServerName,
		UserIDContains: search,
		OrderBy:        usageOrders[order],
		Descending:     desc,
		Offset:         int(from),
		Limit:          int(limit),
	}
	if fromTS > 0 {
		uq.CreatedFrom = time.UnixMilli(fromTS)
	}
	if hasUntil {
		uq.CreatedUntil = time.UnixMilli(untilTS)
	}
	page, total, err := a.svc.Usage(ctx, uq)
	if err != nil {
		return nil, err
	}
	names := a.displayNames(ctx, c.token, page)
	users := make([]usageJSON, len(page))
	for i, u := range page {
		users[i] = usageJSON{UserID: u.UserID, DisplayName: names[u.UserID], MediaCount: u.Count, MediaLength: u.Bytes}
	}
	return struct {
		Users     []usageJSON `json:"users"`
		Total     int64       `json:"total"`
		NextToken *int64      `json:"next_token,omitempty"`
	}{users, total, nextToken(uq.Offset, uq.Limit, len(page), total)}, nil
}

// displayNames looks up the display names of a page's users, best effort:
// users whose profile cannot be read have none.
func (a *SiteAPI) displayNames(ctx context.Context, token string, page []storage.Usage) map[string]*string {
	if a.hs.base == "" || len(page) == 0 {
		return nil
	}
	ids := make([]string, len(page))
	for i, u := range page {
		ids[i] = u.UserID
	}
	ps, _ := a.hs.profiles(ctx, token, ids, false)
	names := make(map[string]*string, len(ps))
	for id, p := range ps {
		names[id] = p.DisplayName
	}
	return names
}
