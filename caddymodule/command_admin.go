package caddymodule

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
)

// adminCommands are the operators' subcommands of "caddy matrix-media":
// quarantine, protect, delete, purge, usage, media-info, jobs, stats and
// export, all through the running Caddy's admin API (see adminops.go,
// stats.go and export.go).
func adminCommands() []*cobra.Command {
	quarantine := &cobra.Command{
		Use:   "quarantine [--undo] (--user <user_id> | <mxc URI>...)",
		Short: "Quarantine media by content (every copy of the same bytes, on every site)",
		RunE:  runQuarantine,
	}
	quarantine.Flags().String("user", "", "Quarantine every local media item of this user")
	quarantine.Flags().Bool("undo", false, "Lift the quarantine of the given media instead")

	protect := &cobra.Command{
		Use:   "protect [--undo] <mxc URI>...",
		Short: "Protect media from quarantine (or, with --undo, remove the protection)",
		RunE:  runProtect,
	}
	protect.Flags().Bool("undo", false, "Remove the protection")

	del := &cobra.Command{
		Use:   "delete (<mxc URI>... | --user <user_id> | --server-name <name> --before <age|RFC 3339 time> [--size-gt <bytes>])",
		Short: "Delete media and, once nothing else references them, their blobs and thumbnails",
		RunE:  runDelete,
	}
	del.Flags().String("user", "", "Delete every local media item of this user (in batches, with progress)")
	del.Flags().String("server-name", "", "Delete this server's local media last used before --before")
	del.Flags().String("before", "", "Age (e.g. 90d, 720h) or RFC 3339 time: media last used before it")
	del.Flags().Int64("size-gt", 0, "Only media larger than this many bytes")

	purge := &cobra.Command{
		Use:   "purge --before <age|RFC 3339 time> [--detach]",
		Short: "Purge cached remote media last used before a time, as a resumable background job",
		RunE:  runPurge,
	}
	purge.Flags().String("before", "", "Age (e.g. 30d, 720h) or RFC 3339 time")
	purge.Flags().Bool("detach", false, "Start the purge and return without waiting")

	usage := &cobra.Command{
		Use: "usage (--server-name <name> [--order-by user_id|media_length|media_count] [--desc] [--limit n] [--search <text>]" +
			" | <user_id> | --top <n> | --recount [--user <user_id>])",
		Short: "Per-user media counts and bytes; one user's usage and quota rules; usage counter recounts",
		RunE:  runUsageCommand,
	}
	addUsageFlags(usage)
	usage.Flags().String("server-name", "", "The server name whose local media are counted")
	usage.Flags().String("order-by", "media_length", "Sort key: user_id, media_length or media_count")
	usage.Flags().Bool("desc", true, "Largest first")
	usage.Flags().Int("limit", 50, "How many users to show")
	usage.Flags().String("search", "", "Only users whose ID contains this text")

	info := &cobra.Command{
		Use:   "media-info <mxc URI>",
		Short: "Show what is stored about one media item",
		Args:  cobra.ExactArgs(1),
		RunE:  runMediaInfo,
	}
	jobsCmd := &cobra.Command{
		Use:   "jobs [--cancel <id>]",
		Short: "List the background jobs (purges, retention) with their progress",
		RunE:  runJobs,
	}
	jobsCmd.Flags().String("cancel", "", "Cancel the job with this id")
	return []*cobra.Command{quarantine, protect, del, purge, usage, info, jobsCmd, statsCommand(), exportCommand()}
}

// parseBefore reads a --before value: an age (90d, 36h, 15m; d is 24h) or an
// RFC 3339 time. now is the reference of ages.
func parseBefore(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, errors.New("--before is required")
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	age := s
	mult := time.Duration(1)
	if d, ok := strings.CutSuffix(s, "d"); ok {
		age, mult = d+"h", 24
	}
	dur, err := time.ParseDuration(age)
	if err != nil || dur < 0 {
		return time.Time{}, fmt.Errorf("--before %q: want an age such as 30d or 12h, or an RFC 3339 time", s)
	}
	return now.Add(-dur * mult), nil
}

func runQuarantine(cmd *cobra.Command, args []string) error {
	user, _ := cmd.Flags().GetString("user")
	undo, _ := cmd.Flags().GetBool("undo")
	switch {
	case undo && user != "":
		return errors.New("--undo takes mxc URIs, not --user")
	case (user == "") == (len(args) == 0):
		return errors.New("give either --user or mxc URIs")
	}
	if undo {
		var out struct {
			N int `json:"num_unquarantined"`
		}
		if err := adminRequest(cmd, http.MethodPost, adminPrefix+"unquarantine", adminMediaRequest{Media: args}, &out); err != nil {
			return err
		}
		fmt.Printf("%d media items no longer quarantined\n", out.N)
		return nil
	}
	var out struct {
		N int `json:"num_quarantined"`
	}
	if err := adminRequest(cmd, http.MethodPost, adminPrefix+"quarantine", adminMediaRequest{Media: args, UserID: user}, &out); err != nil {
		return err
	}
	fmt.Printf("%d media items quarantined\n", out.N)
	return nil
}

func runProtect(cmd *cobra.Command, args []string) error {
	undo, _ := cmd.Flags().GetBool("undo")
	if len(args) == 0 {
		return errors.New("give the mxc URIs to protect")
	}
	var out struct {
		N int `json:"num_changed"`
	}
	if err := adminRequest(cmd, http.MethodPost, adminPrefix+"protect", adminMediaRequest{Media: args, Undo: undo}, &out); err != nil {
		return err
	}
	verb := "protected"
	if undo {
		verb = "unprotected"
	}
	fmt.Printf("%d media items %s\n", out.N, verb)
	return nil
}

// deleteBatch is how many media one request of "delete --user" removes.
const deleteBatch = 500

func runDelete(cmd *cobra.Command, args []string) error {
	fl := cmd.Flags()
	user, _ := fl.GetString("user")
	server, _ := fl.GetString("server-name")
	before, _ := fl.GetString("before")
	sizeGT, _ := fl.GetInt64("size-gt")
	modes := 0
	for _, set := range []bool{len(args) > 0, user != "", server != ""} {
		if set {
			modes++
		}
	}
	if modes != 1 {
		return errors.New("give exactly one of: mxc URIs, --user, or --server-name with --before")
	}
	var total adminDeleted
	report := func() {
		fmt.Fprintf(os.Stderr, "deleted %d media items, %d thumbnails, %d blobs (%s)\n",
			total.Total, total.Thumbnails, total.Blobs, humanize.IBytes(uint64(total.Bytes)))
	}
	switch {
	case len(args) > 0:
		if err := adminRequest(cmd, http.MethodPost, adminPrefix+"delete", adminMediaRequest{Media: args}, &total); err != nil {
			return err
		}
		for _, uri := range total.DeletedMedia {
			fmt.Println(uri)
		}
	case user != "":
		bar := newProgressBar(os.Stderr)
		start := time.Now()
		for {
			var d adminDeleted
			if err := adminRequest(cmd, http.MethodPost, adminPrefix+"delete", adminMediaRequest{UserID: user, Limit: deleteBatch}, &d); err != nil {
				return err
			}
			total.Total += d.Total
			total.Thumbnails += d.Thumbnails
			total.Blobs += d.Blobs
			total.Bytes += d.Bytes
			bar.text(fmt.Sprintf("deleting media of %s: %d items, %s, %s elapsed",
				user, total.Total, humanize.IBytes(uint64(total.Bytes)), time.Since(start).Round(time.Second)), d.Total > 0)
			if d.Total < deleteBatch {
				break
			}
		}
		bar.finish()
	default:
		t, err := parseBefore(before, time.Now())
		if err != nil {
			return err
		}
		ts := t.UnixMilli()
		fmt.Fprintf(os.Stderr, "deleting local media of %s last used before %s...\n", server, t.Format(time.RFC3339))
		if err := adminRequest(cmd, http.MethodPost, adminPrefix+"delete",
			adminMediaRequest{ServerName: server, BeforeTS: &ts, SizeGT: sizeGT}, &total); err != nil {
			return err
		}
	}
	report()
	return nil
}

func runUsage(cmd *cobra.Command, _ []string) error {
	fl := cmd.Flags()
	server, _ := fl.GetString("server-name")
	order, _ := fl.GetString("order-by")
	desc, _ := fl.GetBool("desc")
	limit, _ := fl.GetInt("limit")
	search, _ := fl.GetString("search")
	if server == "" {
		return errors.New("--server-name is required")
	}
	q := url.Values{"server_name": {server}, "order_by": {order}, "limit": {strconv.Itoa(limit)}}
	if desc {
		q.Set("dir", "b")
	}
	if search != "" {
		q.Set("search_term", search)
	}
	var out adminUsage
	if err := adminRequest(cmd, http.MethodGet, adminPrefix+"usage?"+q.Encode(), nil, &out); err != nil {
		return err
	}
	fmt.Printf("%-40s %10s %12s\n", "USER", "MEDIA", "BYTES")
	for _, u := range out.Users {
		fmt.Printf("%-40s %10d %12s\n", u.UserID, u.MediaCount, humanize.IBytes(uint64(u.MediaLength)))
	}
	fmt.Printf("(%d of %d users)\n", len(out.Users), out.Total)
	return nil
}

func runMediaInfo(cmd *cobra.Command, args []string) error {
	ref, err := parseMXC(args[0])
	if err != nil {
		return err
	}
	var out adminMediaInfo
	if err := adminRequest(cmd, http.MethodGet, adminPrefix+"media/"+url.PathEscape(ref.ServerName)+"/"+url.PathEscape(ref.MediaID), nil, &out); err != nil {
		return err
	}
	fmt.Printf("%s\n  state %s, %s, %s, uploaded by %q as %q\n  sha256 %s in datastore %s\n  remote %t, protected %t, quarantined by %q\n",
		out.MXC, out.State, out.ContentType, humanize.IBytes(uint64(out.Size)), out.UserID, out.Filename,
		out.SHA256, out.Datastore, out.Remote, out.Protected, out.QuarantinedBy)
	return nil
}

// text draws one free-form progress line: on a terminal it replaces the
// previous one; otherwise a line is printed at most every 5 s, and always
// when final.
func (b *progressBar) text(line string, running bool) {
	if !b.terminal && time.Since(b.last) < 5*time.Second && running {
		return
	}
	b.last = time.Now()
	if b.terminal {
		fmt.Fprintf(b.w, "\r%s\x1b[K", line)
	} else {
		fmt.Fprintln(b.w, line)
	}
}

func runPurge(cmd *cobra.Command, _ []string) error {
	before, _ := cmd.Flags().GetString("before")
	detach, _ := cmd.Flags().GetBool("detach")
	t, err := parseBefore(before, time.Now())
	if err != nil {
		return err
	}
	var job jobView
	if err := adminRequest(cmd, http.MethodPost, adminPrefix+"purge", purgeRequest{BeforeTS: t.UnixMilli()}, &job); err != nil {
		return err
	}
	if job.ID == "" {
		return errors.New("the admin API did not start a purge")
	}
	fmt.Fprintf(os.Stderr, "purge %s started: cached remote media last used before %s\n", job.ID, t.Format(time.RFC3339))
	if detach {
		return nil
	}
	return watchJob(cmd, job.ID)
}

// watchJob shows a background job's progress until it ends (or Ctrl-C,
// which stops watching, not the job).
func watchJob(cmd *cobra.Command, id string) error {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt)
	defer signal.Stop(stop)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	bar := newProgressBar(os.Stderr)
	start := time.Now()
	for {
		var job jobView
		if err := adminRequest(cmd, http.MethodGet, adminPrefix+"jobs/"+url.PathEscape(id), nil, &job); err != nil {
			return err
		}
		running := job.State == "running"
		elapsed := time.Since(start).Seconds()
		rate := 0.0
		if elapsed > 0 {
			rate = float64(job.Items) / elapsed
		}
		bar.text(fmt.Sprintf("%s %s: %d items, %s removed, %.0f items/s",
			job.Kind, job.State, job.Items, humanize.IBytes(uint64(job.Bytes)), rate), running)
		if !running {
			bar.finish()
			if job.State != "done" {
				return fmt.Errorf("job %s ended %s: %s", id, job.State, job.Error)
			}
			return nil
		}
		select {
		case <-stop:
			bar.finish()
			fmt.Fprintf(os.Stderr, "stopped watching; the job goes on (cancel it with: caddy matrix-media jobs --cancel %s)\n", id)
			return nil
		case <-tick.C:
		}
	}
}

func runJobs(cmd *cobra.Command, _ []string) error {
	if id, _ := cmd.Flags().GetString("cancel"); id != "" {
		var job jobView
		if err := adminRequest(cmd, http.MethodDelete, adminPrefix+"jobs/"+url.PathEscape(id), nil, &job); err != nil {
			return err
		}
		fmt.Printf("job %s: %s after %d items\n", job.ID, job.State, job.Items)
		return nil
	}
	var list []jobView
	if err := adminRequest(cmd, http.MethodGet, adminPrefix+"jobs", nil, &list); err != nil {
		return err
	}
	fmt.Printf("%-40s %-14s %-10s %10s %12s  %s\n", "ID", "KIND", "STATE", "ITEMS", "BYTES", "STARTED")
	for _, j := range list {
		fmt.Printf("%-40s %-14s %-10s %10d %12s  %s\n", j.ID, j.Kind, j.State, j.Items,
			humanize.IBytes(uint64(j.Bytes)), j.CreatedAt.Format(time.RFC3339))
	}
	return nil
}
