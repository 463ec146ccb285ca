package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// The statistics endpoint of Caddy's admin API (issue 16, "See it"):
//
//	GET /matrix_media/stats[?top=n]   the headline numbers of the media repository (adminStats)
//
// It reads aggregates: the blob counts of each datastore, the media rows
// grouped by site (storage.StatsStore, one scan of the media table), the n
// users storing the most bytes on each site (storage.MediaAdmin.ListUsage)
// and the newest background jobs. It is meant for operators on demand, not
// for monitoring scrapes (the metrics are for those).

// Bounds of GET /matrix_media/stats.
const (
	// defaultStatsTop is how many top uploaders each site lists by default.
	defaultStatsTop = 10
	// maxStatsTop bounds ?top=.
	maxStatsTop = 1000
	// maxStatsSitesTop bounds the sites whose top uploaders are listed
	// (one query each); the sites after it show their counts only.
	maxStatsSitesTop = 100
	// statsJobWindow is how many of the newest jobs are searched for
	// running and failed ones.
	statsJobWindow = 200
	// statsFailedJobs is how many recent failed jobs are listed.
	statsFailedJobs = 5
)

// adminStats is the answer of GET /matrix_media/stats.
type adminStats struct {
	// Datastores are the blob counts and bytes of each datastore, Blobs
	// their total.
	Datastores []datastoreInfo `json:"datastores"`
	Blobs      adminCount      `json:"blobs"`
	// Dedup compares the bytes of the media rows with the bytes of the
	// distinct blobs they reference.
	Dedup adminDedup `json:"dedup"`
	// Thumbnails are the generated thumbnails.
	Thumbnails adminCount `json:"thumbnails"`
	// Media are the totals over every site and the remote cache.
	Media adminMediaTotals `json:"media"`
	// Sites are the local media of each server name, with their top
	// uploaders; Remote is the cache of remote media.
	Sites  []adminSiteStats `json:"sites"`
	Remote adminMediaCounts `json:"remote"`
	// Jobs are the running background jobs and the recent failures.
	Jobs adminJobStats `json:"jobs"`
}

// adminCount is a number of things and their bytes.
type adminCount struct {
	Count int64 `json:"count"`
	Bytes int64 `json:"bytes"`
}

// adminDedup is what deduplication saves.
type adminDedup struct {
	// ReferencedBytes is the sum of the sizes of every ready media row
	// (local and remote), as if each had its own copy.
	ReferencedBytes int64 `json:"referenced_bytes"`
	// StoredBlobs and StoredBytes are the distinct blobs those rows
	// reference and their bytes: what is stored for them.
	StoredBlobs int64 `json:"stored_blobs"`
	StoredBytes int64 `json:"stored_bytes"`
	// SavedBytes is ReferencedBytes minus StoredBytes.
	SavedBytes int64 `json:"saved_bytes"`
	// Ratio is ReferencedBytes divided by StoredBytes (1 when nothing is
	// stored).
	Ratio float64 `json:"ratio"`
}

// adminMediaTotals are the media counts of the whole repository.
type adminMediaTotals struct {
	// Local and LocalBytes are the ready local media and their bytes,
	// Remote and RemoteBytes the cached remote media.
	Local       int64 `json:"local"`
	LocalBytes  int64 `json:"local_bytes"`
	Remote      int64 `json:"remote"`
	RemoteBytes int64 `json:"remote_bytes"`
	// Pending are the media IDs reserved and not uploaded yet.
	Pending int64 `json:"pending"`
	// Quarantined are the ready media (local and remote, among the
	// counts above) refused because their content is quarantined.
	Quarantined int64 `json:"quarantined"`
}

// adminMediaCounts are the media counts of one site or of the remote cache.
type adminMediaCounts struct {
	// Media are the ready media, Bytes their bytes.
	Media int64 `json:"media"`
	Bytes int64 `json:"bytes"`
	// Pending and Quarantined are as in adminMediaTotals.
	Pending     int64 `json:"pending"`
	Quarantined int64 `json:"quarantined"`
}

// adminSiteStats are one server name's local media.
type adminSiteStats struct {
	ServerName string `json:"server_name"`
	adminMediaCounts
	// Users is how many users have ready media on the site; TopUploaders
	// the ones storing the most bytes, largest first (absent when there
	// are none, with ?top=0, and beyond maxStatsSitesTop sites, whose
	// Users is 0).
	Users        int64            `json:"users"`
	TopUploaders []adminUserUsage `json:"top_uploaders,omitempty"`
}

// adminJobStats are the background jobs worth a look.
type adminJobStats struct {
	// Running are the running jobs, newest first, with their progress.
	Running []jobView `json:"running"`
	// RecentFailed are the newest failed jobs.
	RecentFailed []jobView `json:"recent_failed"`
}

// serveStats answers GET /matrix_media/stats.
func (res *resources) serveStats(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	top := defaultStatsTop
	if s := r.URL.Query().Get("top"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 || n > maxStatsTop {
			return apiError(http.StatusBadRequest, fmt.Errorf("top must be an integer from 0 to %d", maxStatsTop))
		}
		top = n
	}
	out, err := res.stats(r.Context(), top)
	if err != nil {
		return err
	}
	return writeAdminJSON(w, http.StatusOK, out)
}

// stats gathers the statistics, with top uploaders per site.
func (res *resources) stats(ctx context.Context, top int) (adminStats, error) {
	ss, ok := storage.MetadataStore(res.meta).(storage.StatsStore)
	if !ok {
		return adminStats{}, apiError(http.StatusNotImplemented, errors.New("the metadata store does not report statistics"))
	}
	var out adminStats
	ds, err := res.datastoreInfos(ctx)
	if err != nil {
		return out, err
	}
	out.Datastores = ds
	for _, d := range ds {
		out.Blobs.Count += d.Blobs
		out.Blobs.Bytes += d.Bytes
	}
	st, err := ss.MediaStats(ctx)
	if err != nil {
		return out, adminOpError(err)
	}
	out.Thumbnails = adminCount{Count: st.Thumbnails, Bytes: st.ThumbnailBytes}
	out.Dedup = dedupOf(st)
	out.Remote = mediaCountsOf(st.Remote)
	out.Media = adminMediaTotals{Remote: st.Remote.Ready, RemoteBytes: st.Remote.Bytes,
		Pending: st.Remote.Pending, Quarantined: st.Remote.Quarantined}
	out.Sites = make([]adminSiteStats, 0, len(st.Local))
	for i, l := range st.Local {
		out.Media.Local += l.Ready
		out.Media.LocalBytes += l.Bytes
		out.Media.Pending += l.Pending
		out.Media.Quarantined += l.Quarantined
		site := adminSiteStats{ServerName: l.ServerName, adminMediaCounts: mediaCountsOf(l.MediaCounts)}
		if i < maxStatsSitesTop && l.Ready > 0 && res.admin != nil {
			page, total, err := res.admin.Usage(ctx, storage.UsageQuery{
				ServerName: l.ServerName, OrderBy: storage.UsageByBytes, Descending: true, Limit: top,
			})
			if err != nil {
				return out, adminOpError(err)
			}
			site.Users = total
			site.TopUploaders = make([]adminUserUsage, 0, len(page))
			for _, u := range page {
				site.TopUploaders = append(site.TopUploaders, adminUserUsage{UserID: u.UserID, MediaCount: u.Count, MediaLength: u.Bytes})
			}
		}
		out.Sites = append(out.Sites, site)
	}
	out.Jobs, err = res.jobStats(ctx)
	return out, err
}

// dedupOf computes what deduplication saves.
func dedupOf(st storage.MediaStats) adminDedup {
	d := adminDedup{ReferencedBytes: st.ReferencedBytes(), StoredBlobs: st.ContentBlobs, StoredBytes: st.ContentBytes, Ratio: 1}
	d.SavedBytes = d.ReferencedBytes - d.StoredBytes
	if d.StoredBytes > 0 {
		d.Ratio = float64(d.ReferencedBytes) / float64(d.StoredBytes)
	}
	return d
}

// mediaCountsOf converts the store's counts.
func mediaCountsOf(c storage.MediaCounts) adminMediaCounts {
	return adminMediaCounts{Media: c.Ready, Bytes: c.Bytes, Pending: c.Pending, Quarantined: c.Quarantined}
}

// jobStats picks the running and the recently failed jobs among the
// newest statsJobWindow.
func (res *resources) jobStats(ctx context.Context) (adminJobStats, error) {
	out := adminJobStats{Running: []jobView{}, RecentFailed: []jobView{}}
	if res.jobs == nil {
		return out, nil
	}
	js, err := res.jobs.runner.List(ctx, statsJobWindow)
	if err != nil {
		return out, adminOpError(err)
	}
	for _, j := range js {
		switch {
		case j.State == storage.JobRunning:
			out.Running = append(out.Running, viewJob(j))
		case j.State == storage.JobFailed && len(out.RecentFailed) < statsFailedJobs:
			out.RecentFailed = append(out.RecentFailed, viewJob(j))
		}
	}
	return out, nil
}
