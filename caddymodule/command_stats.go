package caddymodule

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
)

// statsCommand is "caddy matrix-media stats": the headline numbers of
// GET /matrix_media/stats as tables, or as JSON.
func statsCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "stats [--top <n>] [--json]",
		Short: "Show storage, deduplication, media per site, top uploaders and background jobs",
		Args:  cobra.NoArgs,
		RunE:  runStats,
	}
	c.Flags().Int("top", defaultStatsTop, "How many top uploaders to list for each site (0: none)")
	c.Flags().Bool("json", false, "Print the admin API's JSON answer instead of tables")
	return c
}

func runStats(cmd *cobra.Command, _ []string) error {
	top, _ := cmd.Flags().GetInt("top")
	asJSON, _ := cmd.Flags().GetBool("json")
	if top < 0 || top > maxStatsTop {
		return fmt.Errorf("--top must be from 0 to %d", maxStatsTop)
	}
	resp, err := adminResponse(cmd, http.MethodGet, adminPrefix+"stats?top="+strconv.Itoa(top), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("reading the statistics: %w", err)
	}
	out := cmd.OutOrStdout()
	if asJSON {
		var buf bytes.Buffer
		if err := json.Indent(&buf, body, "", "  "); err != nil {
			return fmt.Errorf("the admin API answered no JSON: %w", err)
		}
		buf.WriteByte('\n')
		_, err := buf.WriteTo(out)
		return err
	}
	var st adminStats
	if err := json.Unmarshal(body, &st); err != nil {
		return fmt.Errorf("decoding the statistics: %w", err)
	}
	printStats(out, st)
	return nil
}

// ib formats bytes for people (KiB, MiB, ...).
func ib(n int64) string { return humanize.IBytes(uint64(max(n, 0))) }

// printStats prints the statistics as tables.
func printStats(w io.Writer, st adminStats) {
	fmt.Fprintln(w, "STORAGE")
	fmt.Fprintf(w, "  %-30s %10s %12s\n", "DATASTORE", "BLOBS", "BYTES")
	for _, d := range st.Datastores {
		fmt.Fprintf(w, "  %-30s %10d %12s\n", d.Name, d.Blobs, ib(d.Bytes))
	}
	fmt.Fprintf(w, "  %-30s %10d %12s\n", "total", st.Blobs.Count, ib(st.Blobs.Bytes))
	fmt.Fprintf(w, "  thumbnails: %d (%s)\n", st.Thumbnails.Count, ib(st.Thumbnails.Bytes))

	d := st.Dedup
	fmt.Fprintln(w, "\nDEDUPLICATION")
	fmt.Fprintf(w, "  media rows reference %s, stored once in %d blobs of %s\n", ib(d.ReferencedBytes), d.StoredBlobs, ib(d.StoredBytes))
	fmt.Fprintf(w, "  saved %s (ratio %.2f)\n", ib(d.SavedBytes), d.Ratio)

	fmt.Fprintln(w, "\nMEDIA")
	row := "  %-30s %10d %12s %10s %12d\n"
	fmt.Fprintf(w, "  %-30s %10s %12s %10s %12s\n", "SITE", "MEDIA", "BYTES", "PENDING", "QUARANTINED")
	for _, s := range st.Sites {
		fmt.Fprintf(w, row, s.ServerName, s.Media, ib(s.Bytes), strconv.FormatInt(s.Pending, 10), s.Quarantined)
	}
	fmt.Fprintf(w, row, "remote (cached)", st.Remote.Media, ib(st.Remote.Bytes), "-", st.Remote.Quarantined)
	m := st.Media
	fmt.Fprintf(w, row, "total", m.Local+m.Remote, ib(m.LocalBytes+m.RemoteBytes), strconv.FormatInt(m.Pending, 10), m.Quarantined)

	for _, s := range st.Sites {
		if len(s.TopUploaders) == 0 {
			continue
		}
		users := "users"
		if s.Users == 1 {
			users = "user"
		}
		fmt.Fprintf(w, "\nTOP UPLOADERS: %s (%d of %d %s)\n", s.ServerName, len(s.TopUploaders), s.Users, users)
		fmt.Fprintf(w, "  %-40s %10s %12s\n", "USER", "MEDIA", "BYTES")
		for _, u := range s.TopUploaders {
			fmt.Fprintf(w, "  %-40s %10d %12s\n", u.UserID, u.MediaCount, ib(u.MediaLength))
		}
	}

	fmt.Fprintln(w, "\nJOBS")
	if len(st.Jobs.Running) == 0 {
		fmt.Fprintln(w, "  running: none")
	} else {
		fmt.Fprintln(w, "  running:")
		fmt.Fprintf(w, "  %-36s %-14s %10s %12s %9s  %s\n", "ID", "KIND", "ITEMS", "BYTES", "PROGRESS", "STARTED")
		for _, j := range st.Jobs.Running {
			fmt.Fprintf(w, "  %-36s %-14s %10d %12s %9s  %s\n", j.ID, j.Kind, j.Items, ib(j.Bytes), jobProgress(j),
				j.CreatedAt.Local().Format(time.DateTime))
		}
	}
	if len(st.Jobs.RecentFailed) == 0 {
		fmt.Fprintln(w, "  recent failures: none")
		return
	}
	fmt.Fprintln(w, "  recent failures:")
	for _, j := range st.Jobs.RecentFailed {
		ended := j.UpdatedAt
		if j.FinishedAt != nil {
			ended = *j.FinishedAt
		}
		fmt.Fprintf(w, "  %-36s %-14s %s  %s\n", j.ID, j.Kind, ended.Local().Format(time.DateTime), j.Error)
	}
}

// jobProgress is a running job's progress as a percentage when its params
// give the total (a migrate job's total_blobs), "-" otherwise.
func jobProgress(j jobView) string {
	var p struct {
		TotalBlobs int64 `json:"total_blobs"`
	}
	if len(j.Params) == 0 || json.Unmarshal(j.Params, &p) != nil || p.TotalBlobs <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f%%", min(float64(j.Items)/float64(p.TotalBlobs), 1)*100)
}
