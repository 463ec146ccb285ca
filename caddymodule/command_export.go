package caddymodule

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/caddy-matrix-media/caddy-matrix-media/mediaarchive"
)

// exportCommand is "caddy matrix-media export".
func exportCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "export (user <user_id> | server <server_name>) --out <file>",
		Short: "Write a ZIP archive of a user's or a server name's media (files, manifest.json, index.html)",
		Args:  cobra.ExactArgs(2),
		RunE:  runExport,
	}
	cmd.Flags().String("out", "", "Archive file to write (must not exist)")
	return cmd
}

func runExport(cmd *cobra.Command, args []string) error {
	out, _ := cmd.Flags().GetString("out")
	if out == "" {
		return errors.New("--out is required")
	}
	q := url.Values{}
	switch args[0] {
	case "user":
		q.Set("user", args[1])
	case "server":
		q.Set("server", args[1])
	default:
		return fmt.Errorf("export %q: want user <user_id> or server <server_name>", args[0])
	}
	if _, err := os.Lstat(out); err == nil {
		return fmt.Errorf("%s already exists: not overwriting it", out)
	}
	resp, err := adminResponse(cmd, http.MethodGet, adminPrefix+"export?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	bar := newProgressBar(os.Stderr)
	start := time.Now()
	man, err := writeArchiveFile(out, resp.Body, func(n int64, done bool) {
		rate := float64(n) / max(time.Since(start).Seconds(), 1e-3)
		bar.text(fmt.Sprintf("exporting %s %s: %s, %s/s", args[0], args[1],
			humanize.IBytes(uint64(n)), humanize.IBytes(uint64(rate))), !done)
	})
	bar.finish()
	if err != nil {
		return err
	}
	t := man.Totals
	fmt.Fprintf(os.Stderr, "wrote %s: %d media items, %d files (%s)", out, t.Items, t.Files, humanize.IBytes(uint64(t.Bytes)))
	if withheld := t.Items - t.Files; withheld > 0 {
		fmt.Fprintf(os.Stderr, "; %d listed without content (quarantined, or missing from the store: see manifest.json)", withheld)
	}
	fmt.Fprintln(os.Stderr)
	return nil
}

// writeArchiveFile writes the archive read from body to out, never leaving
// a partial file under that name: it writes out+".partial" (which must not
// exist), syncs it, checks that it is a whole, valid archive
// (mediaarchive.OpenSource), and links it to out, refusing to replace an
// existing file. On any failure the partial file is removed. progress is
// called as bytes arrive, and once more at the end. It returns the
// archive's manifest header.
func writeArchiveFile(out string, body io.Reader, progress func(n int64, done bool)) (mediaarchive.Manifest, error) {
	partial := out + ".partial"
	f, err := os.OpenFile(partial, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return mediaarchive.Manifest{}, fmt.Errorf("creating %s (remove it if no export is running): %w", partial, err)
	}
	keep := false
	defer func() {
		if !keep {
			_ = os.Remove(partial)
		}
	}()
	n, err := io.Copy(f, &progressReader{r: body, report: progress})
	progress(n, true)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return mediaarchive.Manifest{}, fmt.Errorf("writing %s after %d bytes: %w", partial, n, err)
	}
	src, err := mediaarchive.OpenSource(partial)
	if err != nil {
		return mediaarchive.Manifest{}, fmt.Errorf("the export is not a whole archive (did the export fail?): %w", err)
	}
	man := src.Manifest()
	_ = src.Close()
	if err := publish(partial, out); err != nil {
		return mediaarchive.Manifest{}, err
	}
	keep = true // renamed
	return man, nil
}

// publish gives the complete file partial the name out without replacing
// an existing out: a hard link where the file system has them (atomic
// refusal), else a check and a rename. The directory is synced after.
func publish(partial, out string) error {
	err := os.Link(partial, out)
	switch {
	case errors.Is(err, fs.ErrExist):
		return fmt.Errorf("%s appeared meanwhile: not overwriting it", out)
	case err == nil:
		if err := os.Remove(partial); err != nil {
			return fmt.Errorf("removing %s: %w", partial, err)
		}
	default:
		if _, serr := os.Lstat(out); serr == nil {
			return fmt.Errorf("%s appeared meanwhile: not overwriting it", out)
		}
		if err := os.Rename(partial, out); err != nil {
			return fmt.Errorf("renaming %s to %s: %w", partial, out, err)
		}
	}
	dir, err := os.Open(filepath.Dir(out))
	if err != nil {
		return fmt.Errorf("syncing the directory of %s: %w", out, err)
	}
	defer dir.Close()
	if err := dir.Sync(); err != nil {
		return fmt.Errorf("syncing the directory of %s: %w", out, err)
	}
	return nil
}

// progressReader reports how many bytes were read, at most every 250ms.
type progressReader struct {
	r      io.Reader
	n      int64
	last   time.Time
	report func(n int64, done bool)
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.n += int64(n)
	if now := time.Now(); now.Sub(p.last) >= 250*time.Millisecond {
		p.last = now
		p.report(p.n, false)
	}
	return n, err
}
