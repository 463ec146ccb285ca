package caddymodule

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/xmatrix"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "matrix-media",
		Usage: "<command>",
		Short: "Manage the matrix_media datastores of a running Caddy",
		Long: `
Commands for the Matrix media repository of a running Caddy, through its
admin API (use --address, or --config/--adapter to find it; the default is
localhost:2019):

  caddy matrix-media datastores
      lists the datastores with their blob counts and sizes

  caddy matrix-media generate-key --out <file> [--format synapse|dendrite]
      creates a new ed25519 federation signing key for the module (refuses
      to overwrite an existing file)

  caddy matrix-media merge-key --key <module key file> --into <homeserver key file>
      adds the module's key to the homeserver's signing-key file (Synapse
      or Dendrite format, detected), after writing a backup; running it
      again changes nothing. Restart the homeserver so that it publishes the
      key in /_matrix/key/v2/server.

  caddy matrix-media migrate --from <datastore> --to <datastore>
      moves every blob of one datastore to another in the background,
      verifying each hash after the copy and deleting the source only after
      the metadata points at the new copy; shows progress until it ends
      (Ctrl-C stops watching, the migration goes on; --cancel <id> stops
      it; running it again resumes with what is left)

  caddy matrix-media gc [--dry-run] [--grace <duration>]
      removes orphan blobs now: blob records nothing references and bytes
      no record names, unused for longer than the grace period (default:
      the configured one); --dry-run only counts them

  caddy matrix-media quarantine [--undo] (--user <user_id> | <mxc URI>...)
      quarantines media by content: every copy of the same bytes, local or
      remote, on every site, is refused (404) and re-uploads get 403;
      --undo lifts it

  caddy matrix-media protect [--undo] <mxc URI>...
      protects media from quarantine (sticker packs, shared assets)

  caddy matrix-media delete (<mxc URI>... | --user <user_id> | --server-name <name> --before <age|time> [--size-gt <bytes>])
      deletes media (local IDs are never issued again) and, once nothing
      else references them, their blobs and thumbnails in every datastore

  caddy matrix-media purge --before <age|time> [--detach]
      removes cached remote media last used before the time, as a
      resumable background job, showing its progress

  caddy matrix-media jobs [--cancel <id>]
      lists the background jobs (purges, retention) and their progress

  caddy matrix-media usage --server-name <name> [--order-by ...] [--limit n]
      per-user media counts and bytes

  caddy matrix-media usage <user_id>
      what the user stores (usage counters), the quota rule of each site
      with quotas and the user's rolling-window usage

  caddy matrix-media usage --top <n>
      the n users storing the most bytes

  caddy matrix-media usage --recount [--user <user_id>]
      rebuilds the usage counters from the media rows (repairs drift)

  caddy matrix-media stats [--top <n>] [--json]
      the headline numbers: blobs and bytes per datastore, what
      deduplication saves, media per site (ready, pending, quarantined)
      and cached remote media, the n users storing the most on each site
      (default 10), running background jobs with their progress and recent
      failures; --json prints the admin API's answer instead

  caddy matrix-media media-info <mxc URI>
      what is stored about one media item

  caddy matrix-media import <kind> --from <config file> [--server-name <name>]... [--include-remote] [--dry-run] [--workers n]
      imports the media of another media repository (its own configuration
      file names its database and files) into the running Caddy: server
      names and media IDs are kept, so every mxc:// URI keeps working;
      blobs are deduplicated and checked against the source's recorded
      SHA-256; quarantine and protection are carried over. Items already
      imported are skipped, so an interrupted import is resumed (and a
      finished one checked) by running it again. --server-name limits it to
      local media of those server names, --include-remote adds the source's
      remote media cache, --dry-run reads and verifies everything and writes
      nothing. Shows progress, then a report; exits non-zero when an item
      did not match its recorded hash, conflicts with a different item here
      or failed. Kinds: ` + importKinds() + `

  caddy matrix-media export (user <user_id> | server <server_name>) --out <file>
      writes a ZIP archive of a user's media or of a server name's local
      media: the files, manifest.json and an index.html to browse offline;
      quarantined media are listed without their content. The file appears
      under its name only once complete and checked (refuses to overwrite)
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.PersistentFlags().String("address", "", "The address of Caddy's admin API")
			cmd.PersistentFlags().StringP("config", "c", "", "Configuration file of the running Caddy (to find its admin address)")
			cmd.PersistentFlags().StringP("adapter", "a", "", "Name of the config adapter of --config")
			migrate := &cobra.Command{
				Use:   "migrate --from <datastore> --to <datastore>",
				Short: "Move every blob of one datastore to another, showing progress",
				RunE:  runMigrate,
			}
			migrate.Flags().String("from", "", "Datastore to empty")
			migrate.Flags().String("to", "", "Datastore to move the blobs to")
			migrate.Flags().Bool("detach", false, "Start the migration and return without waiting")
			migrate.Flags().String("cancel", "", "Cancel the migration with this id instead of starting one")
			cmd.AddCommand(migrate)
			gen := &cobra.Command{
				Use:   "generate-key --out <file>",
				Short: "Create a federation signing key for the module",
				RunE:  runGenerateKey,
			}
			gen.Flags().String("out", "", "File to write the key to (must not exist)")
			gen.Flags().String("format", "synapse", "Key file format: synapse or dendrite")
			cmd.AddCommand(gen)
			merge := &cobra.Command{
				Use:   "merge-key --key <file> --into <homeserver key file>",
				Short: "Add the module's signing key to a homeserver's signing-key file",
				RunE:  runMergeKey,
			}
			merge.Flags().String("key", "", "The module's key file (from generate-key)")
			merge.Flags().String("into", "", "The homeserver's signing-key file (Synapse or Dendrite format)")
			cmd.AddCommand(merge)
			gcCmd := &cobra.Command{
				Use:   "gc [--dry-run] [--grace <duration>]",
				Short: "Remove orphan blobs now",
				RunE:  runGC,
			}
			gcCmd.Flags().Bool("dry-run", false, "Only count what would be removed")
			gcCmd.Flags().String("grace", "", "Grace period instead of the configured one (e.g. 10m; 0s only while no upload runs)")
			cmd.AddCommand(gcCmd)
			cmd.AddCommand(adminCommands()...)
			cmd.AddCommand(importCommand())
			cmd.AddCommand(&cobra.Command{
				Use:   "datastores",
				Short: "List the datastores with their blob counts and sizes",
				RunE:  runDatastores,
			})
		},
	})
}

// adminAddress is the address of the admin API named by cmd's flags
// (--address, or the admin address of --config/--adapter; Caddy's default
// otherwise).
func adminAddress(cmd *cobra.Command) (string, error) {
	fl := cmd.Flags()
	addr, _ := fl.GetString("address")
	cfg, _ := fl.GetString("config")
	adapter, _ := fl.GetString("adapter")
	adminAddr, err := caddycmd.DetermineAdminAPIAddress(addr, nil, cfg, adapter)
	if err != nil {
		return "", fmt.Errorf("finding the admin API address: %w", err)
	}
	return adminAddr, nil
}

// adminRequest sends one request to the admin API named by cmd's flags and
// decodes a JSON answer into out.
func adminRequest(cmd *cobra.Command, method, path string, body any, out any) error {
	resp, err := adminResponse(cmd, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(out)
}

// adminResponse sends one request to the admin API named by cmd's flags,
// with body as JSON when not nil, and returns the answer (a 4xx or 5xx
// answer is an error). The caller closes its body.
func adminResponse(cmd *cobra.Command, method, path string, body any) (*http.Response, error) {
	adminAddr, err := adminAddress(cmd)
	if err != nil {
		return nil, err
	}
	var rd io.Reader
	headers := http.Header{}
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encoding request: %w", err)
		}
		rd = bytes.NewReader(b)
		headers.Set("Content-Type", "application/json")
	}
	return caddycmd.AdminAPIRequest(adminAddr, method, path, headers, rd)
}

func runDatastores(cmd *cobra.Command, _ []string) error {
	var list []datastoreInfo
	if err := adminRequest(cmd, http.MethodGet, adminPrefix+"datastores", nil, &list); err != nil {
		return err
	}
	for _, d := range list {
		fmt.Printf("%-20s %10d blobs %12s\n", d.Name, d.Blobs, humanize.IBytes(uint64(d.Bytes)))
	}
	return nil
}

func runMigrate(cmd *cobra.Command, _ []string) error {
	fl := cmd.Flags()
	from, _ := fl.GetString("from")
	to, _ := fl.GetString("to")
	detach, _ := fl.GetBool("detach")
	if id, _ := fl.GetString("cancel"); id != "" {
		var job migration
		if err := adminRequest(cmd, http.MethodDelete, adminPrefix+"migrations/"+id, nil, &job); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "cancelled migration %s after %d of %d blobs\n", id, job.Progress.DoneBlobs, job.Progress.TotalBlobs)
		return nil
	}
	if from == "" || to == "" {
		return errors.New("--from and --to are required")
	}
	var job migration
	if err := adminRequest(cmd, http.MethodPost, adminPrefix+"migrations", migrationRequest{From: from, To: to}, &job); err != nil {
		return err
	}
	if job.ID == "" {
		return errors.New("the admin API did not start a migration")
	}
	fmt.Fprintf(os.Stderr, "migration %s started: %s -> %s\n", job.ID, from, to)
	if detach {
		return nil
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt)
	defer signal.Stop(stop)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	bar := newProgressBar(os.Stderr)
	for {
		if err := adminRequest(cmd, http.MethodGet, adminPrefix+"migrations/"+job.ID, nil, &job); err != nil {
			return err
		}
		bar.draw(job)
		if !job.Progress.Running {
			bar.finish()
			if job.Error != "" {
				return fmt.Errorf("migration ended early: %s", job.Error)
			}
			if job.Progress.FailedBlobs > 0 {
				return fmt.Errorf("%d blobs could not be migrated (last error: %s); they stay in %s", job.Progress.FailedBlobs, job.Progress.LastError, from)
			}
			return nil
		}
		select {
		case <-stop:
			bar.finish()
			fmt.Fprintf(os.Stderr, "stopped watching; the migration goes on (cancel it with --cancel %s)\n", job.ID)
			return nil
		case <-tick.C:
		}
	}
}

// progressBar draws a migration's, a job's or an import's progress on one
// terminal line (or a line every few seconds when the output is not a
// terminal).
type progressBar struct {
	w        io.Writer
	terminal bool
	last     time.Time
}

// newProgressBar draws on w: a line redrawn in place when w is a terminal,
// plain lines otherwise.
func newProgressBar(w io.Writer) *progressBar {
	f, ok := w.(*os.File)
	if !ok {
		return &progressBar{w: w}
	}
	fi, err := f.Stat()
	return &progressBar{w: f, terminal: err == nil && fi.Mode()&os.ModeCharDevice != 0}
}

func (b *progressBar) draw(job migration) {
	if !b.terminal && time.Since(b.last) < 5*time.Second && job.Progress.Running {
		return
	}
	b.last = time.Now()
	b.line(job)
}

func (b *progressBar) line(job migration) {
	p := job.Progress
	frac := 1.0
	if p.Running {
		frac = 0
	}
	if p.TotalBlobs > 0 {
		frac = float64(p.DoneBlobs+p.FailedBlobs) / float64(p.TotalBlobs)
	}
	line := fmt.Sprintf("%s %d/%d blobs, %s/%s", meter(frac),
		p.DoneBlobs, p.TotalBlobs, humanize.IBytes(uint64(p.DoneBytes)), humanize.IBytes(uint64(p.TotalBytes)))
	if p.FailedBlobs > 0 {
		line += fmt.Sprintf(", %d failed", p.FailedBlobs)
	}
	if p.Running && p.TotalBlobs > 0 && p.DoneBlobs+p.FailedBlobs == p.TotalBlobs {
		line += ", deleting the old copies after a grace period"
	}
	if b.terminal {
		fmt.Fprintf(b.w, "\r%s\x1b[K", line)
	} else {
		fmt.Fprintln(b.w, line)
	}
}

// meter draws a bar 30 characters wide filled to frac (0 to 1), and the
// percentage.
func meter(frac float64) string {
	const width = 30
	frac = min(max(frac, 0), 1)
	filled := min(int(frac*width+0.5), width)
	return fmt.Sprintf("[%s%s] %3.0f%%", strings.Repeat("#", filled), strings.Repeat(" ", width-filled), frac*100)
}

func (b *progressBar) finish() {
	if b.terminal {
		fmt.Fprintln(b.w)
	}
}

func runGenerateKey(cmd *cobra.Command, _ []string) error {
	out, _ := cmd.Flags().GetString("out")
	format, _ := cmd.Flags().GetString("format")
	if out == "" {
		return errors.New("--out is required")
	}
	key, err := xmatrix.GenerateSigningKey(rand.Reader)
	if err != nil {
		return err
	}
	var data []byte
	switch format {
	case "synapse":
		data = xmatrix.FormatSynapse(key)
	case "dendrite":
		data = xmatrix.FormatDendrite(key)
	default:
		return fmt.Errorf("unknown --format %q (want synapse or dendrite)", format)
	}
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("creating key file: %w", err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("writing key file: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing key file: %w", err)
	}
	fmt.Fprintf(os.Stderr, "wrote %s key %s (public key %s) to %s\n", format, key.ID, key.PublicBase64(), out)
	return nil
}

func runMergeKey(cmd *cobra.Command, _ []string) error {
	keyPath, _ := cmd.Flags().GetString("key")
	into, _ := cmd.Flags().GetString("into")
	if keyPath == "" || into == "" {
		return errors.New("--key and --into are required")
	}
	keys, err := xmatrix.LoadSigningKeys(keyPath)
	if err != nil {
		return err
	}
	for _, k := range keys {
		changed, err := xmatrix.MergeKeyFile(into, k)
		if err != nil {
			return err
		}
		if changed {
			fmt.Fprintf(os.Stderr, "added %s to %s (a backup of the old file was written next to it); restart the homeserver\n", k.ID, into)
		} else {
			fmt.Fprintf(os.Stderr, "%s already holds %s: nothing to do\n", into, k.ID)
		}
	}
	return nil
}
