package mediaapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/userglob"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Per-user quotas (fair use).
//
// A site's QuotaConfig lists rules; the first rule whose user-ID glob
// matches the uploader applies, and a user no rule matches has no quota.
// Every limit field of 0 (or absent) is no limit from that field: a rule
// with nothing set never refuses anything (matrix-media-repo's maxBytes: 0
// rejected every upload; here 0 is never "nothing allowed").
//
// An upload (POST upload, PUT of a /create ID) is checked in three steps,
// so that nothing the user sends can get past a limit:
//
//  1. before the body is read: the user's stored bytes and files and what
//     they uploaded within each rolling window, decided by
//     QuotaStore.CheckUpload (storage.UploadLimits.Check, the one place
//     quota decisions are made; one query, see the store for how windows
//     are summed). With a Content-Length the upload is refused
//     right there when it would not fit; without one, the bytes left become
//     the bound of the streamed ingest, and a body that passes it is cut
//     (its partial blob discarded by the blob store) and refused as over
//     quota, not as too large;
//  2. the body is stored (deduplicated: a duplicate still counts at its
//     full size);
//  3. the row is written by InsertMediaLimited / CompletePendingLimited,
//     which check the same limits in the row's transaction, so that two
//     uploads racing for the last bytes (on one instance or several sharing
//     the database) cannot both get in. A refusal here leaves the stored
//     blob unreferenced; the garbage collector removes it.
//
// Refusals answer 403 M_FORBIDDEN with a message saying which limit, or,
// when the rule has an info_uri, 403 M_USER_LIMIT_EXCEEDED (Matrix v1.18,
// MSC4335) with info_uri and can_upgrade (and soft_limit, the MSC draft's
// name of can_upgrade). A rule's max_upload_size answers 413 M_TOO_LARGE
// like the site's, and max_pending 429 M_LIMIT_EXCEEDED like the site's
// max_pending_uploads (the spec's answers for those). Each refusal is
// counted in caddy_matrix_media_limit_rejections_total with a quota_*
// reason.

// QuotaConfig is the quota policy of a site.
type QuotaConfig struct {
	// Rules are tried in order; the first whose Users pattern matches the
	// user applies. Default: none (no quotas).
	Rules []QuotaRule
	// ExemptAdmins exempts media admins from every rule. Default false.
	ExemptAdmins bool
	// ExemptAppservices exempts users authenticated with an appservice's
	// as_token (its sender and the users it acts as). Default false.
	ExemptAppservices bool
}

// QuotaRule is what one group of users may store. A limit of 0 is no limit
// from that field; negative values are invalid (except MaxPending).
type QuotaRule struct {
	// Users is a glob of the user IDs the rule applies to: `*` is any run of
	// characters, `?` one character (package userglob), e.g.
	// "@*:example.org", "@bot_*:example.org" or an exact user ID. Required.
	Users string
	// MaxBytes bounds the bytes of media the user stores. Default 0: none.
	MaxBytes int64
	// MaxFiles bounds the number of media items the user stores. Default 0:
	// none.
	MaxFiles int64
	// MaxPending replaces the site's MaxPendingUploads for these users:
	// how many /create IDs they may hold. Default 0: the site's; -1: no
	// limit.
	MaxPending int
	// MaxUploadSize replaces the site's MaxUploadSize for these users (and
	// is what config advertises to them as m.upload.size). Default 0: the
	// site's.
	MaxUploadSize int64
	// Windows bound what the user uploads within rolling windows (as
	// Synapse's media_upload_limits). Default: none.
	Windows []QuotaWindow
	// InfoURI, when set, makes refusals 403 M_USER_LIMIT_EXCEEDED with this
	// info_uri (a page explaining the limits or how to raise them) instead
	// of M_FORBIDDEN. Default: none.
	InfoURI string
	// CanUpgrade is sent as can_upgrade (and soft_limit) with
	// M_USER_LIMIT_EXCEEDED: whether the user can raise their limit, e.g.
	// by paying. Default false.
	CanUpgrade bool
}

// QuotaWindow bounds uploads within a rolling window.
type QuotaWindow struct {
	// Window is the window's length (> 0). Required.
	Window time.Duration
	// MaxBytes bounds the bytes uploaded within the window. Default 0:
	// none.
	MaxBytes int64
	// MaxFiles bounds the files uploaded within the window. Default 0:
	// none.
	MaxFiles int64
}

// quotaPolicy is a validated QuotaConfig.
type quotaPolicy struct {
	rules             []QuotaRule
	globs             []userglob.Pattern
	exemptAdmins      bool
	exemptAppservices bool
}

// newQuotaPolicy validates cfg; nil when it has no rules.
func newQuotaPolicy(cfg QuotaConfig) (*quotaPolicy, error) {
	if len(cfg.Rules) == 0 {
		return nil, nil
	}
	p := &quotaPolicy{exemptAdmins: cfg.ExemptAdmins, exemptAppservices: cfg.ExemptAppservices}
	for i, rule := range cfg.Rules {
		g, err := userglob.Compile(rule.Users)
		if err != nil {
			return nil, fmt.Errorf("quota rule %d: %w", i+1, err)
		}
		if err := rule.validate(); err != nil {
			return nil, fmt.Errorf("quota rule %d (%s): %w", i+1, rule.Users, err)
		}
		rule.Windows = append([]QuotaWindow(nil), rule.Windows...)
		p.rules = append(p.rules, rule)
		p.globs = append(p.globs, g)
	}
	return p, nil
}

// validate checks the rule's numbers.
func (q *QuotaRule) validate() error {
	switch {
	case q.MaxBytes < 0:
		return fmt.Errorf("negative max_bytes %d", q.MaxBytes)
	case q.MaxFiles < 0:
		return fmt.Errorf("negative max_files %d", q.MaxFiles)
	case q.MaxPending < -1:
		return fmt.Errorf("max_pending %d: want -1 (no limit), 0 (the site's) or more", q.MaxPending)
	case q.MaxUploadSize < 0:
		return fmt.Errorf("negative max_upload_size %d", q.MaxUploadSize)
	case q.CanUpgrade && q.InfoURI == "":
		return errors.New("can_upgrade needs an info_uri (it is sent with M_USER_LIMIT_EXCEEDED only)")
	}
	if q.InfoURI != "" {
		u, err := url.Parse(q.InfoURI)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return fmt.Errorf("info_uri %q is not an http(s) URL", q.InfoURI)
		}
	}
	for j, w := range q.Windows {
		switch {
		case w.Window <= 0:
			return fmt.Errorf("window %d: the window length must be positive, got %s", j+1, w.Window)
		case w.Window > storage.MaxWindow:
			return fmt.Errorf("window %d: %s is longer than the longest window kept (%s)", j+1, w.Window, storage.MaxWindow)
		case w.MaxBytes < 0 || w.MaxFiles < 0:
			return fmt.Errorf("window %d: negative limit", j+1)
		}
	}
	return nil
}

// match returns the first rule matching userID and its index, or nil.
func (p *quotaPolicy) match(userID string) (*QuotaRule, int) {
	for i := range p.rules {
		if p.globs[i].Match(userID) {
			return &p.rules[i], i
		}
	}
	return nil, -1
}

// limits are the store-side limits of the rule at now.
func (q *QuotaRule) limits(now time.Time) storage.UploadLimits {
	lim := storage.UploadLimits{MaxBytes: q.MaxBytes, MaxFiles: q.MaxFiles, Now: now}
	for _, w := range q.Windows {
		// Windows that bound nothing are skipped by the store.
		lim.Windows = append(lim.Windows, storage.WindowLimit{Window: w.Window, MaxBytes: w.MaxBytes, MaxFiles: w.MaxFiles})
	}
	return lim
}

// bounded reports whether the rule limits stored or uploaded content (not
// only sizes or pending IDs).
func (q *QuotaRule) bounded() bool {
	if q.MaxBytes > 0 || q.MaxFiles > 0 {
		return true
	}
	for _, w := range q.Windows {
		if w.MaxBytes > 0 || w.MaxFiles > 0 {
			return true
		}
	}
	return false
}

// quotaFor returns the rule that applies to user on this site: nil when
// the site has no quotas, no rule matches or the user is exempt. Whether a
// user is a media admin is only asked when it matters (a rule matched and
// admins are exempt).
func (s *Site) quotaFor(r *http.Request, user auth.User) *QuotaRule {
	p := s.quota
	if p == nil {
		return nil
	}
	rule, _ := p.match(user.UserID)
	switch {
	case rule == nil:
		return nil
	case p.exemptAppservices && user.AppserviceID != "":
		return nil
	case p.exemptAdmins && s.isAdmin(r, user):
		return nil
	}
	return rule
}

// maxUploadFor is the largest upload of a user under rule (nil: none).
func (s *Site) maxUploadFor(rule *QuotaRule) int64 {
	if rule != nil && rule.MaxUploadSize > 0 {
		return rule.MaxUploadSize
	}
	return s.cfg.MaxUploadSize
}

// maxPendingFor is the pending-ID limit of a user under rule (0: none).
func (s *Site) maxPendingFor(rule *QuotaRule) int {
	if rule != nil && rule.MaxPending != 0 {
		return max(rule.MaxPending, 0)
	}
	return s.maxPending
}

// uploadQuota is what an upload of one user may add: the rule, its limits
// and the bytes left before the tightest byte limit (for the streamed
// ingest of a body of unknown length).
type uploadQuota struct {
	rule *QuotaRule
	// maxUpload is the user's largest upload (the rule's or the site's).
	maxUpload int64
	// limits are checked again in the row's transaction.
	limits storage.UploadLimits
	// room is what the user may still add: room.Bytes (-1: no byte limit)
	// and the byte limit reported when a body passes it.
	room storage.Headroom
}

// ingestBound is the most bytes the ingest may store for this upload, and
// whether that bound is the quota's (rather than the upload size limit).
func (q *uploadQuota) ingestBound() (int64, bool) {
	if q.room.Bytes >= 0 && q.room.Bytes < q.maxUpload {
		return q.room.Bytes, true
	}
	return q.maxUpload, false
}

// overBound is the refusal of a body of unknown length that passed the
// quota's bound.
func (q *uploadQuota) overBound() *storage.QuotaExceededError {
	e := q.room.Tight
	e.Adding = q.room.Bytes + 1
	return &e
}

// checkQuota looks at what the user stores and uploaded recently before an
// upload of size bytes (-1: unknown) is read, and returns what the upload
// may add. An upload that cannot fit gives a *storage.QuotaExceededError.
func (s *Site) checkQuota(ctx context.Context, rule *QuotaRule, userID string, size int64) (*uploadQuota, error) {
	q := &uploadQuota{rule: rule, maxUpload: s.maxUploadFor(rule), room: storage.Headroom{Bytes: -1}}
	if rule == nil || !rule.bounded() {
		return q, nil
	}
	q.limits = rule.limits(s.repo.now())
	h, err := s.repo.quotas.CheckUpload(ctx, userID, q.limits, size, q.maxUpload)
	if err != nil {
		if _, ok := asQuotaExceeded(err); ok {
			return nil, err
		}
		return nil, fmt.Errorf("checking the quota of %s: %w", userID, err)
	}
	q.room = h
	return q, nil
}

// quotaReasons are the limit_rejections_total reasons of the store's limits.
var quotaReasons = map[storage.QuotaLimit]string{
	storage.LimitBytes:       "quota_bytes",
	storage.LimitFiles:       "quota_files",
	storage.LimitWindowBytes: "quota_window_bytes",
	storage.LimitWindowFiles: "quota_window_files",
}

// quotaError maps a refusal by a quota to its Matrix error and counts it:
// the one place quota refusals become responses. err is a
// *storage.QuotaExceededError (from checkQuota, the bounded ingest or the
// store's Limited insertion); rule is the rule that refused.
func (s *Site) quotaError(rule *QuotaRule, qe *storage.QuotaExceededError) *matrix.Error {
	reason := quotaReasons[qe.Limit]
	if reason == "" {
		reason = "quota_bytes"
	}
	s.repo.metrics.LimitRejected(s.cfg.ServerName, reason)
	var msg string
	switch qe.Limit {
	case storage.LimitFiles:
		msg = fmt.Sprintf("You have reached your limit of %d stored files; delete some media to upload more", qe.Max)
	case storage.LimitWindowFiles:
		msg = fmt.Sprintf("You may upload at most %d files per %s; try again later", qe.Max, humanWindow(qe.Window))
	case storage.LimitWindowBytes:
		msg = fmt.Sprintf("You may upload at most %s per %s (you uploaded %s); try again later",
			humanize.IBytes(uint64(qe.Max)), humanWindow(qe.Window), humanize.IBytes(uint64(qe.Used)))
	default:
		msg = fmt.Sprintf("This upload would exceed your storage quota of %s (you store %s); delete some media to upload more",
			humanize.IBytes(uint64(qe.Max)), humanize.IBytes(uint64(qe.Used)))
	}
	if rule != nil && rule.InfoURI != "" {
		return &matrix.Error{
			Status:  http.StatusForbidden,
			ErrCode: matrix.CodeUserLimitExceeded,
			Message: msg,
			Extra: map[string]any{
				"info_uri":    rule.InfoURI,
				"can_upgrade": rule.CanUpgrade,
				// The MSC4335 draft's name of can_upgrade, for clients
				// built against it.
				"soft_limit": rule.CanUpgrade,
			},
		}
	}
	return matrix.Forbidden(msg)
}

// humanWindow writes a window length the way people say it.
func humanWindow(d time.Duration) string {
	switch {
	case d%(24*time.Hour) == 0:
		if n := d / (24 * time.Hour); n != 1 {
			return strconv.FormatInt(int64(n), 10) + " days"
		}
		return "day"
	case d%time.Hour == 0:
		if n := d / time.Hour; n != 1 {
			return strconv.FormatInt(int64(n), 10) + " hours"
		}
		return "hour"
	}
	return d.String()
}

// asQuotaExceeded returns err's *storage.QuotaExceededError, if any.
func asQuotaExceeded(err error) (*storage.QuotaExceededError, bool) {
	var qe *storage.QuotaExceededError
	ok := errors.As(err, &qe)
	return qe, ok
}

// serveUsage answers GET /_matrix/client/v1/media/usage (and the MSC4034
// unstable path) with what the caller stores.
func (s *Site) serveUsage(w http.ResponseWriter, r *http.Request) int {
	user, st := s.authenticate(w, r, false)
	if st != 0 {
		return st
	}
	if s.repo.quotas == nil {
		return writeErr(w, matrix.Unrecognized("Media usage is not available on this server"))
	}
	u, err := s.repo.quotas.UserUsage(r.Context(), user.UserID)
	if err != nil {
		return s.internalError(w, "reading media usage", err)
	}
	used, files := strconv.FormatInt(u.Bytes, 10), strconv.FormatInt(u.Files, 10)
	return writeJSON(w, []byte(`{"m.storage.used":`+used+`,"m.storage.files":`+files+
		`,"org.matrix.msc4034.storage.used":`+used+`,"org.matrix.msc4034.storage.files":`+files+`}`))
}

// configBodyFor is the config answer of a user under rule: m.upload.size
// (their largest upload) and, when the rule bounds them, m.storage.size and
// m.storage.max_files (MSC4034, with unstable aliases).
func (s *Site) configBodyFor(rule *QuotaRule) []byte {
	if rule == nil {
		return s.configBody
	}
	b := []byte(`{"m.upload.size":`)
	b = strconv.AppendInt(b, s.maxUploadFor(rule), 10)
	if rule.MaxBytes > 0 {
		n := strconv.FormatInt(rule.MaxBytes, 10)
		b = append(b, `,"m.storage.size":`+n+`,"org.matrix.msc4034.storage.size":`+n...)
	}
	if rule.MaxFiles > 0 {
		n := strconv.FormatInt(rule.MaxFiles, 10)
		b = append(b, `,"m.storage.max_files":`+n+`,"org.matrix.msc4034.storage.max_files":`+n...)
	}
	return append(b, '}')
}

// quotaSites are the sites with quota rules, by server name, for the
// operators' per-user reports (UserQuota).
type quotaSites struct {
	mu    sync.Mutex
	sites map[*Site]struct{}
}

func (q *quotaSites) add(s *Site) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.sites == nil {
		q.sites = make(map[*Site]struct{})
	}
	q.sites[s] = struct{}{}
}

func (q *quotaSites) remove(s *Site) {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.sites, s)
}

func (q *quotaSites) list() []*Site {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := make([]*Site, 0, len(q.sites))
	for s := range q.sites {
		out = append(out, s)
	}
	return out
}

// minUploadHistory is the least upload history kept for the rolling
// windows, whatever the rules say (so that a window added by a config
// reload within a day finds its uploads).
const minUploadHistory = 24 * time.Hour

// uploadHistory is how far back the rolling windows of every site with
// quota rules reach: the longest window, at least minUploadHistory.
// Instances sharing a database should share their quota rules: each
// prunes what its own longest window does not need.
func (r *Repository) uploadHistory() time.Duration {
	longest := minUploadHistory
	for _, s := range r.quotaSites.list() {
		for _, rule := range s.quota.rules {
			for _, w := range rule.Windows {
				longest = max(longest, w.Window)
			}
		}
	}
	return longest
}

// pruneUploadHistory drops the per-user upload history older than
// uploadHistory (and a minute, for the window edge); a failure is logged
// and tried again on the next pass.
func (r *Repository) pruneUploadHistory(ctx context.Context) {
	if r.quotas == nil {
		return
	}
	before := r.now().Add(-r.uploadHistory() - storage.WindowResolution)
	n, err := r.quotas.PruneUploadHistory(ctx, before)
	switch {
	case err != nil && ctx.Err() == nil:
		r.logger.Error("pruning the upload history of the rolling windows", zap.Error(err))
	case n > 0:
		r.logger.Debug("pruned upload history", zap.Int64("minutes", n), zap.Time("before", before))
	}
}

// ErrNoQuotaStore is returned by the usage methods of a Repository whose
// metadata store keeps no usage counters (not a storage.QuotaStore).
var ErrNoQuotaStore = errors.New("the metadata store keeps no per-user usage")

// UserQuotaReport is what one user stores and the quota rules that apply to
// them on each site with quotas.
type UserQuotaReport struct {
	// UserID is the user.
	UserID string `json:"user_id"`
	// Bytes and Files are what the user stores (every site together: the
	// counters are per user ID).
	Bytes int64 `json:"bytes"`
	Files int64 `json:"files"`
	// Sites are the sites with quota rules, sorted by server name.
	Sites []SiteQuotaReport `json:"sites"`
}

// SiteQuotaReport is the rule of one site that applies to a user.
type SiteQuotaReport struct {
	// ServerName is the site.
	ServerName string `json:"server_name"`
	// Rule is the 1-based index of the matching rule (0: none matches),
	// Users its pattern.
	Rule  int    `json:"rule"`
	Users string `json:"users,omitempty"`
	// MaxBytes, MaxFiles, MaxPending and MaxUploadSize are the rule's
	// limits (0: none; for MaxPending and MaxUploadSize: the site's).
	MaxBytes      int64 `json:"max_bytes,omitempty"`
	MaxFiles      int64 `json:"max_files,omitempty"`
	MaxPending    int   `json:"max_pending,omitempty"`
	MaxUploadSize int64 `json:"max_upload_size"`
	// Windows are the rule's rolling windows and what the user uploaded in
	// each.
	Windows []WindowUsage `json:"windows,omitempty"`
	// ExemptAdmins and ExemptAppservices tell whether admins and appservice
	// users are exempt on the site (whether this user is one is decided
	// per request).
	ExemptAdmins      bool `json:"exempt_admins,omitempty"`
	ExemptAppservices bool `json:"exempt_appservices,omitempty"`
}

// WindowUsage is a rolling window and what a user uploaded within it.
type WindowUsage struct {
	// Window is the window's length (a Go duration string).
	Window string `json:"window"`
	// MaxBytes and MaxFiles are its limits (0: none).
	MaxBytes int64 `json:"max_bytes,omitempty"`
	MaxFiles int64 `json:"max_files,omitempty"`
	// UsedBytes and UsedFiles are what was uploaded within it, now.
	UsedBytes int64 `json:"used_bytes"`
	UsedFiles int64 `json:"used_files"`
}

// QuotaStore returns the metadata store's usage capability, or nil.
func (r *Repository) QuotaStore() storage.QuotaStore { return r.quotas }

// UserQuota reports what userID stores and the rules of every site with
// quotas that apply to them, with their window usage.
func (r *Repository) UserQuota(ctx context.Context, userID string) (UserQuotaReport, error) {
	if r.quotas == nil {
		return UserQuotaReport{}, ErrNoQuotaStore
	}
	u, err := r.quotas.UserUsage(ctx, userID)
	if err != nil {
		return UserQuotaReport{}, fmt.Errorf("reading the usage of %s: %w", userID, err)
	}
	rep := UserQuotaReport{UserID: userID, Bytes: u.Bytes, Files: u.Files, Sites: []SiteQuotaReport{}}
	now := r.now()
	for _, s := range r.quotaSites.list() {
		sr := SiteQuotaReport{ServerName: s.cfg.ServerName, MaxUploadSize: s.cfg.MaxUploadSize,
			ExemptAdmins: s.quota.exemptAdmins, ExemptAppservices: s.quota.exemptAppservices}
		if rule, i := s.quota.match(userID); rule != nil {
			sr.Rule, sr.Users = i+1, rule.Users
			sr.MaxBytes, sr.MaxFiles, sr.MaxPending = rule.MaxBytes, rule.MaxFiles, rule.MaxPending
			sr.MaxUploadSize = s.maxUploadFor(rule)
			for _, w := range rule.Windows {
				b, f, err := r.quotas.UploadedSince(ctx, userID, now.Add(-w.Window))
				if err != nil {
					return UserQuotaReport{}, fmt.Errorf("reading the uploads of %s: %w", userID, err)
				}
				sr.Windows = append(sr.Windows, WindowUsage{Window: w.Window.String(), MaxBytes: w.MaxBytes, MaxFiles: w.MaxFiles, UsedBytes: b, UsedFiles: f})
			}
		}
		rep.Sites = append(rep.Sites, sr)
	}
	slices.SortFunc(rep.Sites, func(a, b SiteQuotaReport) int { return strings.Compare(a.ServerName, b.ServerName) })
	return rep, nil
}
