package mediaarchive

import (
	"archive/zip"
	"bytes"
	"context"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// chromiumPath finds Debian's chromium; the test fails without it (install
// it with ./xcaddy.sh deps or apt-get install chromium).
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "/usr/bin/chromium"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("chromium is not installed (apt-get install --no-install-recommends chromium, or ./xcaddy.sh deps)")
	return ""
}

// extract writes every entry of the archive under dir, refusing any name
// that is not a local path.
func extract(t *testing.T, archive []byte, dir string) {
	t.Helper()
	zr, err := zip.NewReader(bytes.NewReader(archive), int64(len(archive)))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range zr.File {
		if !filepath.IsLocal(f.Name) {
			t.Fatalf("entry %q is not a local path", f.Name)
		}
		b, _ := entry(t, zr, f.Name)
		p := filepath.Join(dir, filepath.FromSlash(f.Name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// pageState is what the browser reports of index.html.
type pageState struct {
	Rows []struct {
		Name string `json:"name"`
		MXC  string `json:"mxc"`
		Note string `json:"note"`
	} `json:"rows"`
	Images []struct {
		Src      string `json:"src"`
		Complete bool   `json:"complete"`
		Width    int    `json:"width"`
	} `json:"images"`
	Links []string `json:"links"`
}

const pageScript = `({
	rows: [...document.querySelectorAll("tr.item")].map(r => ({
		name: r.querySelector(".label").textContent,
		mxc: r.querySelector("td.mxc").textContent,
		note: (r.querySelector(".note") || {textContent: ""}).textContent,
	})),
	images: [...document.images].map(i => ({src: i.src, complete: i.complete, width: i.naturalWidth})),
	links: [...document.querySelectorAll("a[href]")].map(a => a.href),
})`

// TestIndexInChromium exports a user with and without previews, extracts
// the archive and opens index.html from disk in headless Chromium: every
// item's name (as DisplayName shows it) and mxc URI are on the page, the
// quarantined item says so, every image has loaded, and every link leads to
// a file of the archive.
func TestIndexInChromium(t *testing.T) {
	exe := chromiumPath(t)
	e := newEnv(t, backends[0].Open)
	fx := fixtures(t, "sqlite")
	seed(t, e, fx)

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.UserDataDir(t.TempDir()))
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	browser, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()
	if err := chromedp.Do(browser); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}

	for _, tc := range []struct {
		name  string
		thumb Thumbnailer
	}{{"previews", &goThumbnailer{}}, {"originals scaled", nil}} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if _, err := Export(context.Background(), &buf, e.source(), Selection{ServerName: "example.org", UserID: alice},
				ExportOptions{Thumbnailer: tc.thumb}); err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			extract(t, buf.Bytes(), dir)
			_, man := readArchive(t, buf.Bytes())

			ctx, cancel := context.WithTimeout(browser, 60*time.Second)
			defer cancel()
			ctx, cancelTab := chromedp.NewContext(ctx)
			defer cancelTab()
			page := (&url.URL{Scheme: "file", Path: filepath.Join(dir, IndexName)}).String()
			if err := chromedp.Do(ctx, chromedp.Navigate(page)); err != nil {
				t.Fatalf("opening %s: %v", page, err)
			}
			if _, err := chromedp.Run(ctx, chromedp.Poll[bool](`[...document.images].every(i => i.complete)`)); err != nil {
				t.Fatalf("waiting for the images: %v", err)
			}
			st, err := chromedp.Run(ctx, chromedp.Evaluate[pageState](pageScript))
			if err != nil {
				t.Fatal(err)
			}
			checkPage(t, st, man, dir)
		})
	}
}

// checkPage compares what Chromium shows with the manifest.
func checkPage(t *testing.T, st pageState, man Manifest, dir string) {
	t.Helper()
	if len(st.Rows) != len(man.Items) {
		t.Fatalf("the page lists %d items, the manifest %d", len(st.Rows), len(man.Items))
	}
	images := 0
	for i, it := range man.Items {
		wantName := DisplayName(it.UploadName)
		if wantName == "" {
			wantName = "(unnamed)"
		}
		if got := st.Rows[i]; got.Name != wantName || got.MXC != it.MXC {
			t.Errorf("row %d shows %q %q, want %q %q", i, got.Name, got.MXC, wantName, it.MXC)
		}
		if it.File == "" && !strings.Contains(st.Rows[i].Note, "quarantined") {
			t.Errorf("row %d (%s, no content) has note %q", i, it.MXC, st.Rows[i].Note)
		}
		if it.File != "" && browserImages[mediaType(it.ContentType)] {
			images++
		}
	}
	if images != 3 || len(st.Images) != images {
		t.Errorf("the page shows %d images, want %d (and the fixtures hold 3)", len(st.Images), images)
	}
	for _, img := range st.Images {
		if !img.Complete || img.Width <= 0 {
			t.Errorf("image %s did not load (complete %t, naturalWidth %d)", img.Src, img.Complete, img.Width)
		}
	}
	var targets []string
	for _, l := range st.Links {
		u, err := url.Parse(l)
		if err != nil || u.Scheme != "file" {
			t.Errorf("link %q is not a file URL", l)
			continue
		}
		rel, err := filepath.Rel(dir, u.Path)
		if err != nil || !filepath.IsLocal(rel) {
			t.Errorf("link %q leads out of the archive", l)
			continue
		}
		if fi, err := os.Stat(u.Path); err != nil || !fi.Mode().IsRegular() {
			t.Errorf("link %q: %v", l, err)
		}
		targets = append(targets, filepath.ToSlash(rel))
	}
	for _, it := range man.Items {
		if it.File != "" && !slices.Contains(targets, it.File) {
			t.Errorf("no link to %s", it.File)
		}
	}
}
