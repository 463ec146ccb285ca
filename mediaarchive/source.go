package mediaarchive

import (
	"archive/zip"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
)

// quarantinedByDefault is who quarantined an item, for items whose
// manifest does not say.
const quarantinedByDefault = "imported from a media archive"

// Source reads a media archive as an importer.Source. It is safe for
// sequential use; Walk may be called several times.
type Source struct {
	name   string
	closer io.Closer
	// files are the archive's entries by name; manifest is manifest.json.
	files    map[string]*zip.File
	manifest *zip.File
	header   Manifest
}

// Interface guard.
var _ importer.Source = (*Source)(nil)

// Open opens the archive file at configPath as an import source (the
// signature every source package has; for archives the "configuration" is
// the archive itself).
func Open(ctx context.Context, configPath string) (importer.Source, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("opening media archive: %w", err)
	}
	return OpenSource(configPath)
}

// OpenSource opens and validates the archive file at path (see the package
// doc). Errors of the archive's content wrap ErrInvalidArchive.
func OpenSource(path string) (*Source, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening media archive: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("opening media archive: %w", err)
	}
	s, err := NewSource(f, fi.Size(), "archive "+path)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("opening media archive %s: %w", path, err)
	}
	s.closer = f
	return s, nil
}

// NewSource reads the archive held by r (size bytes) and validates it.
// name is what Name returns. Closing the Source does not close r.
func NewSource(r io.ReaderAt, size int64, name string) (*Source, error) {
	zr, err := zip.NewReader(r, size)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidArchive, err)
	}
	s := &Source{name: name, files: make(map[string]*zip.File, len(zr.File))}
	for _, f := range zr.File {
		if strings.HasSuffix(f.Name, "/") {
			continue
		}
		if _, dup := s.files[f.Name]; dup {
			return nil, fmt.Errorf("%w: entry %.300q appears twice", ErrInvalidArchive, f.Name)
		}
		s.files[f.Name] = f
	}
	s.manifest = s.files[ManifestName]
	if s.manifest == nil {
		return nil, fmt.Errorf("%w: no %s", ErrInvalidArchive, ManifestName)
	}
	// The validation pass: the whole manifest, every item, every path.
	s.header, err = s.readItems(func(int, Item) error { return nil })
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Manifest returns the manifest's header fields (Items is nil).
func (s *Source) Manifest() Manifest { return s.header }

// Name describes the source.
func (s *Source) Name() string { return s.name }

// Close closes the archive file (when opened by OpenSource).
func (s *Source) Close() error {
	if s.closer == nil {
		return nil
	}
	return s.closer.Close()
}

// readItems streams the manifest, checks that each item's files are entries
// of the archive and calls fn with each item.
func (s *Source) readItems(fn func(int, Item) error) (Manifest, error) {
	rc, err := s.manifest.Open()
	if err != nil {
		return Manifest{}, fmt.Errorf("%w: opening %s: %w", ErrInvalidArchive, ManifestName, err)
	}
	defer rc.Close()
	return readManifest(rc, nil, func(i int, it Item) error {
		for _, p := range []string{it.File, it.Thumbnail} {
			if p != "" && s.files[p] == nil {
				return fmt.Errorf("%w: item %d (%s): %.300q is not in the archive", ErrInvalidArchive, i, it.MXC, p)
			}
		}
		return fn(i, it)
	})
}

// selected reports whether f selects it.
func selected(f importer.Filter, it Item) bool {
	if it.Remote {
		return f.IncludeRemote
	}
	return len(f.ServerNames) == 0 || slices.Contains(f.ServerNames, it.ServerName)
}

// Totals counts the items f selects and their recorded sizes, reading the
// manifest once.
func (s *Source) Totals(ctx context.Context, f importer.Filter) (importer.Totals, error) {
	var t importer.Totals
	_, err := s.readItems(func(_ int, it Item) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if selected(f, it) {
			t.Items++
			t.Bytes += it.Size
		}
		return nil
	})
	if err != nil {
		return importer.Totals{}, fmt.Errorf("counting the items of %s: %w", s.name, err)
	}
	return t, nil
}

// Walk calls fn for every item f selects, in manifest order, streaming the
// manifest. It stops at fn's first error and returns it as it is.
func (s *Source) Walk(ctx context.Context, f importer.Filter, fn func(importer.Item) error) error {
	_, err := s.readItems(func(_ int, it Item) error {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("listing %s: %w", s.name, err)
		}
		if !selected(f, it) {
			return nil
		}
		return fn(s.importItem(it))
	})
	return err
}

// importItem converts a manifest item.
func (s *Source) importItem(it Item) importer.Item {
	out := importer.Item{
		ServerName: it.ServerName, MediaID: it.MediaID, Remote: it.Remote, UserID: it.UserID,
		ContentType: it.ContentType, Filename: it.UploadName, CreatedAt: it.CreatedAt,
		Size: it.Size, SHA256: it.SHA256, Protected: it.Protected,
	}
	if it.Quarantined {
		out.QuarantinedBy = it.QuarantinedBy
		if out.QuarantinedBy == "" {
			out.QuarantinedBy = quarantinedByDefault
		}
	}
	file, mxc, why := s.files[it.File], it.MXC, it.Error
	switch {
	case file != nil:
	case it.Quarantined:
		why = "quarantined: content not exported"
	case why == "":
		why = "no content in the archive"
	}
	out.Open = func(ctx context.Context) (io.ReadCloser, error) {
		if file == nil {
			return nil, fmt.Errorf("%s: %s: %w", mxc, why, importer.ErrMissing)
		}
		rc, err := file.Open()
		if err != nil {
			return nil, fmt.Errorf("%s: opening %s: %w", mxc, file.Name, err)
		}
		return ctxReader{ctx: ctx, ReadCloser: rc}, nil
	}
	return out
}

// ctxReader stops reading once ctx is done.
type ctxReader struct {
	ctx context.Context
	io.ReadCloser
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.ReadCloser.Read(p)
}
