package mediaadmin

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"sync"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Bounds of homeserver answers.
const (
	// maxRoomMediaBody bounds a room's media list (about 100,000 mxc URIs).
	maxRoomMediaBody = 16 << 20
	// maxProfileBody bounds a profile.
	maxProfileBody = 64 << 10
	// profileConcurrency bounds the profile requests one admin request
	// makes at a time.
	profileConcurrency = 8
)

// homeserver asks the site's homeserver what the module cannot know: a
// room's media and users' profiles. Every request carries the caller's
// access token.
type homeserver struct {
	// base is the client-server base URL without a trailing slash; "" when
	// the site has no homeserver URL.
	base   string
	client *http.Client
}

// get makes one GET request to path (already escaped) with token.
func (h *homeserver) get(ctx context.Context, token, path string, limit int64) (auth.HomeserverAnswer, error) {
	return auth.GetHomeserver(ctx, h.client, h.base+path, token, limit, "homeserver")
}

// roomMedia asks the homeserver for the media of room (Synapse's GET
// /_synapse/admin/v1/room/{roomId}/media) and returns them as references;
// malformed mxc URIs are skipped. A homeserver without that API gives 501
// M_UNRECOGNIZED; one that refuses the caller 403 M_FORBIDDEN.
func (h *homeserver) roomMedia(ctx context.Context, token, roomID string) ([]storage.MediaRef, error) {
	if h.base == "" {
		return nil, matrix.NewError(http.StatusNotImplemented, matrix.CodeUnrecognized,
			"No homeserver is configured to list the room's media; quarantine by user or media ID instead")
	}
	path := "/_synapse/admin/v1/room/" + url.PathEscape(roomID) + "/media"
	a, err := h.get(ctx, token, path, maxRoomMediaBody)
	if err != nil {
		return nil, fmt.Errorf("listing media of room %s: %w", roomID, err)
	}
	switch {
	case a.Status == http.StatusOK:
		var body struct {
			Local  []string `json:"local"`
			Remote []string `json:"remote"`
		}
		if err := json.Unmarshal(a.Body, &body); err != nil {
			return nil, fmt.Errorf("listing media of room %s: decoding the homeserver's answer: %w: %w", roomID, auth.ErrHomeserverUnavailable, err)
		}
		refs := make([]storage.MediaRef, 0, len(body.Local)+len(body.Remote))
		for _, uri := range append(body.Local, body.Remote...) {
			if server, id, err := matrix.ParseMXC(uri); err == nil {
				refs = append(refs, storage.MediaRef{ServerName: server, MediaID: id})
			}
		}
		return refs, nil
	case a.NoSuchAPI():
		return nil, matrix.NewError(http.StatusNotImplemented, matrix.CodeUnrecognized,
			"The homeserver does not list a room's media (GET /_synapse/admin/v1/room/{roomId}/media answered "+
				a.Describe()+"); quarantine by user or media ID instead")
	case a.Status == http.StatusUnauthorized || a.Status == http.StatusForbidden:
		return nil, matrix.Forbidden("The homeserver refused to list the room's media for this access token (" + a.Describe() + ")")
	case a.Status == http.StatusNotFound:
		return nil, matrix.NotFound("The homeserver does not know the room (" + a.Describe() + ")")
	case a.Status == http.StatusBadRequest:
		code := a.ErrCode
		if code == "" {
			code = matrix.CodeUnknown
		}
		return nil, matrix.NewError(http.StatusBadRequest, code, "The homeserver refused to list the room's media ("+a.Describe()+")")
	default:
		return nil, fmt.Errorf("listing media of room %s: homeserver answered %s: %w", roomID, a.Describe(), auth.ErrHomeserverUnavailable)
	}
}

// profile is the part of a global profile the admin API uses.
type profile struct {
	// AvatarURL and DisplayName are nil when not set.
	AvatarURL   *string `json:"avatar_url"`
	DisplayName *string `json:"displayname"`
}

// profile fetches userID's global profile (GET
// /_matrix/client/v3/profile/{userId}). A user without a profile (404)
// gives found false and no error; any other failure an error.
func (h *homeserver) profile(ctx context.Context, token, userID string) (p profile, found bool, err error) {
	if h.base == "" {
		return profile{}, false, fmt.Errorf("looking up the profile of %s: no homeserver is configured: %w", userID, auth.ErrHomeserverUnavailable)
	}
	a, err := h.get(ctx, token, "/_matrix/client/v3/profile/"+url.PathEscape(userID), maxProfileBody)
	if err != nil {
		return profile{}, false, fmt.Errorf("looking up the profile of %s: %w", userID, err)
	}
	switch a.Status {
	case http.StatusOK:
		// Values of other types (a homeserver bug) count as unset.
		var raw map[string]json.RawMessage
		if err := json.Unmarshal(a.Body, &raw); err != nil {
			return profile{}, false, fmt.Errorf("looking up the profile of %s: decoding: %w: %w", userID, auth.ErrHomeserverUnavailable, err)
		}
		p.AvatarURL = jsonString(raw["avatar_url"])
		p.DisplayName = jsonString(raw["displayname"])
		return p, true, nil
	case http.StatusNotFound:
		return profile{}, false, nil
	default:
		return profile{}, false, fmt.Errorf("looking up the profile of %s: homeserver answered %s: %w", userID, a.Describe(), auth.ErrHomeserverUnavailable)
	}
}

// jsonString returns the string a JSON value holds, or nil.
func jsonString(raw json.RawMessage) *string {
	var s string
	if len(raw) == 0 || json.Unmarshal(raw, &s) != nil {
		return nil
	}
	return &s
}

// profiles fetches the profiles of userIDs, profileConcurrency at a time.
// Users without a profile are absent from the result. With failFast, the
// first error is returned (and the requests not yet started are not made);
// without, failures leave the user absent.
func (h *homeserver) profiles(ctx context.Context, token string, userIDs []string, failFast bool) (map[string]profile, error) {
	out := make(map[string]profile, len(userIDs))
	var (
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
	)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, profileConcurrency)
	for _, id := range userIDs {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			p, found, err := h.profile(ctx, token, id)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil && failFast:
				if firstErr == nil {
					firstErr = err
					cancel()
				}
			case found:
				out[id] = p
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	if failFast && ctx.Err() != nil {
		return nil, fmt.Errorf("looking up profiles: %w", context.Cause(ctx))
	}
	return out, nil
}

// avatarLookup returns the ProfileAvatars of DeleteOldLocal for a request
// made with token: the mxc URIs of the users' global profile avatars.
func (h *homeserver) avatarLookup(token string) ProfileAvatars {
	return func(ctx context.Context, userIDs []string) (map[string]bool, error) {
		ps, err := h.profiles(ctx, token, userIDs, true)
		if err != nil {
			return nil, err
		}
		avatars := make(map[string]bool, len(ps))
		for _, p := range ps {
			if p.AvatarURL != nil && *p.AvatarURL != "" {
				avatars[*p.AvatarURL] = true
			}
		}
		return avatars, nil
	}
}
