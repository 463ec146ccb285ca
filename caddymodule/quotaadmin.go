package caddymodule

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// The per-user usage endpoints of Caddy's admin API (quotas, issue 13):
//
//	GET  /matrix_media/usage/top[?limit=n]      the users storing the most bytes (default 20, at most 10000)
//	                                            -> {"users":[{"user_id":"@u:s","bytes":n,"files":n},...]}
//	GET  /matrix_media/usage/user/<user_id>     what the user stores, the quota rule of each site with quotas
//	                                            and the user's rolling-window usage (mediaapi.UserQuotaReport)
//	POST /matrix_media/usage/recount            {"user_id":"@u:s"} (optional: every user when absent):
//	                                            rebuild the usage counters from the media rows -> {"changed":n}
//
// The counters are per user ID, over every site. They are served from the
// database's counters, never as metric labels (a label per user would grow
// without bound).

// defaultTopUsers is how many users usage/top lists by default.
const defaultTopUsers = 20

// adminTopUsage is the answer of GET /matrix_media/usage/top.
type adminTopUsage struct {
	Users []adminQuotaUsage `json:"users"`
}

// adminQuotaUsage is one user's counters.
type adminQuotaUsage struct {
	UserID string `json:"user_id"`
	Bytes  int64  `json:"bytes"`
	Files  int64  `json:"files"`
}

// adminRecountRequest is the body of POST /matrix_media/usage/recount.
type adminRecountRequest struct {
	// UserID limits the recount to one user; empty: every user.
	UserID string `json:"user_id,omitempty"`
}

// adminRecount is the answer of POST /matrix_media/usage/recount.
type adminRecount struct {
	Changed int64 `json:"changed"`
}

// serveUsageSub dispatches /matrix_media/usage/<...>.
func (res *resources) serveUsageSub(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, adminPrefix+"usage/")
	qs := res.repo.QuotaStore()
	if qs == nil {
		return apiError(http.StatusNotFound, mediaapi.ErrNoQuotaStore)
	}
	switch {
	case rest == "top":
		return serveTopUsage(qs, w, r)
	case rest == "recount":
		return serveRecount(qs, w, r)
	case strings.HasPrefix(rest, "user/"):
		if r.Method != http.MethodGet {
			return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
		}
		user, err := url.PathUnescape(strings.TrimPrefix(rest, "user/"))
		if err != nil || !validUserID(user) {
			return apiError(http.StatusBadRequest, fmt.Errorf("%q is not a Matrix user ID", strings.TrimPrefix(rest, "user/")))
		}
		rep, err := res.repo.UserQuota(r.Context(), user)
		if err != nil {
			return adminOpError(err)
		}
		return writeAdminJSON(w, http.StatusOK, rep)
	}
	return apiError(http.StatusNotFound, fmt.Errorf("unknown usage endpoint %q", rest))
}

// validUserID is the module's one check of a user ID (matrix.SplitUserID).
func validUserID(s string) bool {
	_, _, err := matrix.SplitUserID(s)
	return err == nil
}

func serveTopUsage(qs storage.QuotaStore, w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	limit := defaultTopUsers
	if s := r.URL.Query().Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > maxAdminRefs {
			return apiError(http.StatusBadRequest, fmt.Errorf("limit must be between 1 and %d", maxAdminRefs))
		}
		limit = n
	}
	top, err := qs.TopUsage(r.Context(), limit)
	if err != nil {
		return adminOpError(err)
	}
	out := adminTopUsage{Users: make([]adminQuotaUsage, 0, len(top))}
	for _, u := range top {
		out.Users = append(out.Users, adminQuotaUsage{UserID: u.UserID, Bytes: u.Bytes, Files: u.Files})
	}
	return writeAdminJSON(w, http.StatusOK, out)
}

func serveRecount(qs storage.QuotaStore, w http.ResponseWriter, r *http.Request) error {
	if err := postOnly(r); err != nil {
		return err
	}
	var req adminRecountRequest
	if r.ContentLength != 0 {
		if err := decodeAdminJSON(r, &req); err != nil {
			return err
		}
	}
	if req.UserID != "" && !validUserID(req.UserID) {
		return apiError(http.StatusBadRequest, fmt.Errorf("%q is not a Matrix user ID", req.UserID))
	}
	n, err := qs.RecountUsage(r.Context(), req.UserID)
	if err != nil {
		return adminOpError(err)
	}
	return writeAdminJSON(w, http.StatusOK, adminRecount{Changed: n})
}

// addUsageFlags adds the quota forms' flags to the usage command.
func addUsageFlags(cmd *cobra.Command) {
	cmd.Flags().Bool("recount", false, "Rebuild the per-user usage counters from the media rows (with --user: one user's)")
	cmd.Flags().String("user", "", "With --recount: only this user")
	cmd.Flags().Int("top", 0, "List the n users storing the most bytes (all sites together)")
}

// runUsageCommand runs "caddy matrix-media usage": with a user ID, the
// user's usage and quota rules; with --recount, a recount; with --top, the
// top users; otherwise the per-server statistics (runUsage).
func runUsageCommand(cmd *cobra.Command, args []string) error {
	fl := cmd.Flags()
	recount, _ := fl.GetBool("recount")
	user, _ := fl.GetString("user")
	top, _ := fl.GetInt("top")
	switch {
	case len(args) > 1:
		return errors.New("give at most one user ID")
	case recount && len(args) > 0:
		return errors.New("--recount takes --user, not a user ID argument")
	case user != "" && !recount:
		return errors.New("--user goes with --recount (to show a user, give the user ID as the argument)")
	case recount:
		var out adminRecount
		if err := adminRequest(cmd, http.MethodPost, adminPrefix+"usage/recount", adminRecountRequest{UserID: user}, &out); err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "usage counters of %d users corrected\n", out.Changed)
		return nil
	case top > 0:
		var out adminTopUsage
		if err := adminRequest(cmd, http.MethodGet, adminPrefix+"usage/top?limit="+strconv.Itoa(top), nil, &out); err != nil {
			return err
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%-40s %10s %12s\n", "USER", "FILES", "BYTES")
		for _, u := range out.Users {
			fmt.Fprintf(cmd.OutOrStdout(), "%-40s %10d %12s\n", u.UserID, u.Files, humanize.IBytes(uint64(u.Bytes)))
		}
		return nil
	case len(args) == 1:
		var rep mediaapi.UserQuotaReport
		if err := adminRequest(cmd, http.MethodGet, adminPrefix+"usage/user/"+url.PathEscape(args[0]), nil, &rep); err != nil {
			return err
		}
		printUserQuota(cmd.OutOrStdout(), rep)
		return nil
	}
	return runUsage(cmd, args)
}

// printUserQuota prints a user's usage report.
func printUserQuota(out io.Writer, rep mediaapi.UserQuotaReport) {
	fmt.Fprintf(out, "%s stores %s in %d files\n", rep.UserID, humanize.IBytes(uint64(rep.Bytes)), rep.Files)
	if len(rep.Sites) == 0 {
		fmt.Fprintln(out, "no site has quotas")
	}
	limit := func(n int64, bytes bool) string {
		switch {
		case n <= 0:
			return "no limit"
		case bytes:
			return humanize.IBytes(uint64(n))
		}
		return strconv.FormatInt(n, 10)
	}
	for _, s := range rep.Sites {
		if s.Rule == 0 {
			fmt.Fprintf(out, "  %s: no rule matches (no quota)\n", s.ServerName)
			continue
		}
		fmt.Fprintf(out, "  %s: rule %d (%s): bytes %s, files %s, largest upload %s",
			s.ServerName, s.Rule, s.Users, limit(s.MaxBytes, true), limit(s.MaxFiles, false), humanize.IBytes(uint64(s.MaxUploadSize)))
		switch {
		case s.MaxPending < 0:
			fmt.Fprint(out, ", pending IDs: no limit")
		case s.MaxPending > 0:
			fmt.Fprintf(out, ", pending IDs: %d", s.MaxPending)
		}
		if s.ExemptAdmins || s.ExemptAppservices {
			fmt.Fprintf(out, " (exempt: admins %t, appservices %t)", s.ExemptAdmins, s.ExemptAppservices)
		}
		fmt.Fprintln(out)
		for _, w := range s.Windows {
			fmt.Fprintf(out, "    last %s: %s of %s, %d of %s files\n", w.Window,
				humanize.IBytes(uint64(w.UsedBytes)), limit(w.MaxBytes, true), w.UsedFiles, limit(w.MaxFiles, false))
		}
	}
}
