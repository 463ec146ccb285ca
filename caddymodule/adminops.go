package caddymodule

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaadmin"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"

	"github.com/caddyserver/caddy/v2"
)

// maxAdminRefs bounds the media one admin API request names.
const maxAdminRefs = 10000

// The operators' endpoints of Caddy's admin API (see AdminAPI):
//
//	POST /matrix_media/quarantine    {"media":["mxc://s/id",...]} or {"user_id":"@u:s"}  -> {"num_quarantined":n}
//	POST /matrix_media/unquarantine  {"media":[...]}                                      -> {"num_unquarantined":n}
//	POST /matrix_media/protect       {"media":[...], "undo":false}                        -> {"num_changed":n}
//	POST /matrix_media/delete        {"media":[...]}                                      -> {"deleted_media":["mxc://..."],"total":n,...}
//	                                 {"user_id":"@u:s","limit":500}                       (one batch of the user's newest media)
//	                                 {"server_name":"s","before_ts":ms,"size_gt":n}       (local media last used before, as Synapse's media/delete with keep_profiles=false)
//	GET  /matrix_media/media/<server>/<id>                                                the media item, as Synapse's media info
//	GET  /matrix_media/usage?server_name=s[&order_by=user_id|media_length|media_count][&dir=f|b][&from=n][&limit=n][&search_term=t][&from_ts=ms][&until_ts=ms]
//
// They act on every site's media (quarantine is by content across sites);
// the actor logged is "caddy-admin-api".

// adminMediaRequest is the body of the quarantine, unquarantine, protect and
// delete endpoints. Which fields are allowed depends on the endpoint.
type adminMediaRequest struct {
	// Media are mxc URIs.
	Media []string `json:"media,omitempty"`
	// UserID selects a local user's media (quarantine, delete).
	UserID string `json:"user_id,omitempty"`
	// Limit bounds a deletion by user (default 100, at most 10000).
	Limit int `json:"limit,omitempty"`
	// ServerName, BeforeTS and SizeGT select local media by last use (delete).
	ServerName string `json:"server_name,omitempty"`
	BeforeTS   *int64 `json:"before_ts,omitempty"`
	SizeGT     int64  `json:"size_gt,omitempty"`
	// Undo unprotects (protect).
	Undo bool `json:"undo,omitempty"`
}

// refs parses the request's mxc URIs.
func (q adminMediaRequest) refs() ([]storage.MediaRef, error) {
	if len(q.Media) > maxAdminRefs {
		return nil, apiError(http.StatusBadRequest, fmt.Errorf("at most %d media per request", maxAdminRefs))
	}
	refs := make([]storage.MediaRef, 0, len(q.Media))
	for _, uri := range q.Media {
		ref, err := parseMXC(uri)
		if err != nil {
			return nil, apiError(http.StatusBadRequest, err)
		}
		refs = append(refs, ref)
	}
	return refs, nil
}

// parseMXC parses an mxc://<server_name>/<media_id> URI (matrix.ParseMXC)
// into a media reference.
func parseMXC(uri string) (storage.MediaRef, error) {
	server, id, err := matrix.ParseMXC(uri)
	if err != nil {
		return storage.MediaRef{}, err
	}
	return storage.MediaRef{ServerName: server, MediaID: id}, nil
}

// mxc formats a media reference as an mxc URI.
func mxc(ref storage.MediaRef) string { return "mxc://" + ref.ServerName + "/" + ref.MediaID }

// adminOpError maps an error of the media admin service to an admin API
// error: Matrix errors keep their status (404 unknown media, 400 bad
// parameters), a store that cannot be reached is 503, anything else 500.
func adminOpError(err error) error {
	var me *matrix.Error
	switch {
	case errors.As(err, &me):
		return apiError(me.Status, errors.New(me.Message))
	case errors.Is(err, storage.ErrNotFound):
		return apiError(http.StatusNotFound, err)
	case errors.Is(err, storage.ErrUnavailable):
		return apiError(http.StatusServiceUnavailable, err)
	default:
		return apiError(http.StatusInternalServerError, err)
	}
}

// adminService returns the resources' media admin service, or a 501 API
// error when the metadata store cannot administer media.
func (res *resources) adminService() (*mediaadmin.Service, error) {
	if res.admin == nil {
		return nil, apiError(http.StatusNotImplemented, errors.New("the metadata store does not support media administration"))
	}
	return res.admin, nil
}

// onResources adapts a handler of the running app's resources to Caddy's
// admin API: it acquires the resources for the request.
func onResources(serve func(res *resources, w http.ResponseWriter, r *http.Request) error) caddy.AdminHandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		res, err := currentResources()
		if err != nil {
			return err
		}
		defer res.release()
		return serve(res, w, r)
	}
}

// postOnly refuses methods other than POST.
func postOnly(r *http.Request) error {
	if r.Method != http.MethodPost {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	return nil
}

func (res *resources) serveQuarantine(w http.ResponseWriter, r *http.Request) error {
	if err := postOnly(r); err != nil {
		return err
	}
	var req adminMediaRequest
	if err := decodeAdminJSON(r, &req); err != nil {
		return err
	}
	svc, err := res.adminService()
	if err != nil {
		return err
	}
	ctx := r.Context()
	var n int
	switch {
	case req.UserID != "" && len(req.Media) == 0:
		_, server, uerr := matrix.SplitUserID(req.UserID)
		if uerr != nil {
			return apiError(http.StatusBadRequest, uerr)
		}
		n, err = svc.QuarantineUser(ctx, adminAPIRequester, server, req.UserID)
	case req.UserID == "" && len(req.Media) > 0:
		refs, rerr := req.refs()
		if rerr != nil {
			return rerr
		}
		n, err = svc.QuarantineRefs(ctx, adminAPIRequester, refs)
	default:
		return apiError(http.StatusBadRequest, errors.New(`give either "media" (mxc URIs) or "user_id"`))
	}
	if err != nil {
		return adminOpError(err)
	}
	return writeAdminJSON(w, http.StatusOK, map[string]int{"num_quarantined": n})
}

func (res *resources) serveUnquarantine(w http.ResponseWriter, r *http.Request) error {
	if err := postOnly(r); err != nil {
		return err
	}
	var req adminMediaRequest
	if err := decodeAdminJSON(r, &req); err != nil {
		return err
	}
	refs, err := req.refs()
	if err != nil {
		return err
	}
	if len(refs) == 0 || req.UserID != "" {
		return apiError(http.StatusBadRequest, errors.New(`give "media" (mxc URIs)`))
	}
	svc, err := res.adminService()
	if err != nil {
		return err
	}
	n := 0
	for _, ref := range refs {
		if err := svc.UnquarantineMedia(r.Context(), adminAPIRequester, ref); err != nil {
			return adminOpError(fmt.Errorf("%s: %w", mxc(ref), err))
		}
		n++
	}
	return writeAdminJSON(w, http.StatusOK, map[string]int{"num_unquarantined": n})
}

func (res *resources) serveProtect(w http.ResponseWriter, r *http.Request) error {
	if err := postOnly(r); err != nil {
		return err
	}
	var req adminMediaRequest
	if err := decodeAdminJSON(r, &req); err != nil {
		return err
	}
	refs, err := req.refs()
	if err != nil {
		return err
	}
	if len(refs) == 0 {
		return apiError(http.StatusBadRequest, errors.New(`give "media" (mxc URIs)`))
	}
	svc, err := res.adminService()
	if err != nil {
		return err
	}
	for i, ref := range refs {
		op := svc.Protect
		if req.Undo {
			op = svc.Unprotect
		}
		if err := op(r.Context(), adminAPIRequester, ref); err != nil {
			return adminOpError(fmt.Errorf("%s (after %d changed): %w", mxc(ref), i, err))
		}
	}
	return writeAdminJSON(w, http.StatusOK, map[string]int{"num_changed": len(refs)})
}

// adminDeleted is the answer of POST /matrix_media/delete.
type adminDeleted struct {
	DeletedMedia []string `json:"deleted_media"`
	Total        int      `json:"total"`
	Thumbnails   int      `json:"thumbnails"`
	Blobs        int      `json:"blobs"`
	Bytes        int64    `json:"bytes"`
}

func (res *resources) serveDelete(w http.ResponseWriter, r *http.Request) error {
	if err := postOnly(r); err != nil {
		return err
	}
	var req adminMediaRequest
	if err := decodeAdminJSON(r, &req); err != nil {
		return err
	}
	svc, err := res.adminService()
	if err != nil {
		return err
	}
	ctx := r.Context()
	var d mediaadmin.Deleted
	switch {
	case len(req.Media) > 0 && req.UserID == "" && req.ServerName == "" && req.BeforeTS == nil:
		refs, rerr := req.refs()
		if rerr != nil {
			return rerr
		}
		d, err = svc.DeleteMedia(ctx, adminAPIRequester, refs)
	case req.UserID != "" && len(req.Media) == 0 && req.ServerName == "" && req.BeforeTS == nil:
		_, server, uerr := matrix.SplitUserID(req.UserID)
		if uerr != nil {
			return apiError(http.StatusBadRequest, uerr)
		}
		limit := req.Limit
		if limit == 0 {
			limit = mediaadmin.DefaultLimit
		}
		if limit < 0 || limit > maxAdminRefs {
			return apiError(http.StatusBadRequest, fmt.Errorf("limit must be between 1 and %d", maxAdminRefs))
		}
		d, err = svc.DeleteUserMedia(ctx, adminAPIRequester, storage.UserMediaQuery{
			ServerName: server, UserID: req.UserID, OrderBy: storage.OrderCreated, Descending: true, Limit: limit,
		})
	case req.ServerName != "" && req.BeforeTS != nil && len(req.Media) == 0 && req.UserID == "":
		if !matrix.ValidServerName(req.ServerName) || *req.BeforeTS < 0 || req.SizeGT < 0 {
			return apiError(http.StatusBadRequest, errors.New("server_name must be a server name, before_ts and size_gt not negative"))
		}
		d, err = svc.DeleteOldLocal(ctx, adminAPIRequester, req.ServerName, time.UnixMilli(*req.BeforeTS), req.SizeGT, false, nil)
	default:
		return apiError(http.StatusBadRequest, errors.New(`give one of: "media" (mxc URIs); "user_id" (and "limit"); "server_name" with "before_ts" (and "size_gt")`))
	}
	if err != nil {
		return adminOpError(err)
	}
	out := adminDeleted{DeletedMedia: make([]string, 0, len(d.Media)), Total: len(d.Media),
		Thumbnails: d.Thumbnails, Blobs: d.Blobs, Bytes: d.Bytes}
	for _, ref := range d.Media {
		out.DeletedMedia = append(out.DeletedMedia, mxc(ref))
	}
	return writeAdminJSON(w, http.StatusOK, out)
}

// adminMediaInfo is one media item in GET /matrix_media/media/<server>/<id>.
type adminMediaInfo struct {
	MXC           string `json:"mxc"`
	State         string `json:"state"`
	UserID        string `json:"user_id,omitempty"`
	ContentType   string `json:"content_type,omitempty"`
	Filename      string `json:"filename,omitempty"`
	Size          int64  `json:"size"`
	SHA256        string `json:"sha256,omitempty"`
	Datastore     string `json:"datastore,omitempty"`
	Remote        bool   `json:"remote"`
	Protected     bool   `json:"protected"`
	QuarantinedBy string `json:"quarantined_by,omitempty"`
	CreatedTS     int64  `json:"created_ts,omitempty"`
	LastAccessTS  int64  `json:"last_access_ts,omitempty"`
}

// msOrZero is t in Unix milliseconds, 0 for the zero time.
func msOrZero(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func (res *resources) serveMediaInfo(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	rest := strings.TrimPrefix(r.URL.Path, adminPrefix+"media/")
	server, id, _ := strings.Cut(rest, "/")
	ref, err := parseMXC("mxc://" + server + "/" + id)
	if err != nil {
		return apiError(http.StatusBadRequest, err)
	}
	svc, err := res.adminService()
	if err != nil {
		return err
	}
	m, err := svc.MediaInfo(r.Context(), ref)
	if err != nil {
		return adminOpError(err)
	}
	return writeAdminJSON(w, http.StatusOK, adminMediaInfo{
		MXC: mxc(ref), State: string(m.State), UserID: m.UserID, ContentType: m.ContentType, Filename: m.Filename,
		Size: m.Size, SHA256: m.SHA256, Datastore: m.Datastore, Remote: m.Remote, Protected: m.Protected,
		QuarantinedBy: m.QuarantinedBy, CreatedTS: msOrZero(m.CreatedAt), LastAccessTS: msOrZero(m.LastAccessAt),
	})
}

// adminUsage is the answer of GET /matrix_media/usage.
type adminUsage struct {
	Users     []adminUserUsage `json:"users"`
	Total     int64            `json:"total"`
	NextToken *int64           `json:"next_token,omitempty"`
}

// adminUserUsage is one user in adminUsage.
type adminUserUsage struct {
	UserID      string `json:"user_id"`
	MediaCount  int64  `json:"media_count"`
	MediaLength int64  `json:"media_length"`
}

func (res *resources) serveUsage(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	q, from, err := usageQuery(r.URL.Query())
	if err != nil {
		return apiError(http.StatusBadRequest, err)
	}
	svc, err := res.adminService()
	if err != nil {
		return err
	}
	page, total, err := svc.Usage(r.Context(), q)
	if err != nil {
		return adminOpError(err)
	}
	out := adminUsage{Users: make([]adminUserUsage, 0, len(page)), Total: total}
	for _, u := range page {
		out.Users = append(out.Users, adminUserUsage{UserID: u.UserID, MediaCount: u.Count, MediaLength: u.Bytes})
	}
	if next := int64(from + len(page)); len(page) > 0 && next < total {
		out.NextToken = &next
	}
	return writeAdminJSON(w, http.StatusOK, out)
}

// usageQuery parses the query of GET /matrix_media/usage.
func usageQuery(v url.Values) (storage.UsageQuery, int, error) {
	q := storage.UsageQuery{ServerName: v.Get("server_name"), UserIDContains: v.Get("search_term"), Limit: 100}
	if !matrix.ValidServerName(q.ServerName) {
		return q, 0, errors.New("server_name is required")
	}
	ints := map[string]*int64{}
	var from, limit, fromTS, untilTS int64 = 0, 100, -1, -1
	ints["from"], ints["limit"], ints["from_ts"], ints["until_ts"] = &from, &limit, &fromTS, &untilTS
	for name, p := range ints {
		if s := v.Get(name); s != "" {
			n, err := strconv.ParseInt(s, 10, 64)
			if err != nil || n < 0 {
				return q, 0, fmt.Errorf("%s must be a non-negative integer", name)
			}
			*p = n
		}
	}
	if limit < 1 || limit > maxAdminRefs {
		return q, 0, fmt.Errorf("limit must be between 1 and %d", maxAdminRefs)
	}
	q.Offset, q.Limit = int(from), int(limit)
	if fromTS >= 0 {
		q.CreatedFrom = time.UnixMilli(fromTS)
	}
	if untilTS >= 0 {
		q.CreatedUntil = time.UnixMilli(untilTS)
	}
	switch v.Get("order_by") {
	case "", "user_id":
		q.OrderBy = storage.UsageByUserID
	case "media_length":
		q.OrderBy = storage.UsageByBytes
	case "media_count":
		q.OrderBy = storage.UsageByCount
	default:
		return q, 0, errors.New("order_by must be user_id, media_length or media_count")
	}
	switch v.Get("dir") {
	case "", "f":
	case "b":
		q.Descending = true
	default:
		return q, 0, errors.New("dir must be f or b")
	}
	return q, int(from), nil
}

// newAdminService builds the media admin service of the resources (nil, nil
// when the metadata store lacks the capability).
func newAdminService(res *resources, purger mediaadmin.RemotePurger, metrics *mediaadmin.Metrics) (*mediaadmin.Service, error) {
	if _, ok := storage.MetadataStore(res.meta).(storage.MediaAdmin); !ok {
		return nil, nil
	}
	return mediaadmin.New(mediaadmin.Options{
		Meta:        res.meta,
		Stores:      res.stores,
		Invalidator: res.repo,
		Purger:      purger,
		Logger:      res.logger.Named("admin"),
		Metrics:     metrics,
	})
}
