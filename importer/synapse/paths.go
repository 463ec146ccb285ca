package synapse

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// ErrInvalidPath reports a row whose IDs do not name a file of the media
// store (characters a path cannot carry safely, or too short to split as
// Synapse does). Its Open touches no file. It wraps importer.ErrInvalid, so
// that an import counts such a row as invalid.
var ErrInvalidPath = fmt.Errorf("synapse row names no valid media store path: %w", importer.ErrInvalid)

// minIDLength is the shortest ID Synapse can store: it splits IDs into
// id[0:2]/id[2:4]/id[4:] and refuses an empty component.
const minIDLength = 5

// localPath is the path of a local media file relative to the media store.
// The media ID must be one we accept (matrix.ValidMediaID), whose
// characters are all safe in a path component.
func localPath(mediaID string) (string, error) {
	if !matrix.ValidMediaID(mediaID) || len(mediaID) < minIDLength {
		return "", fmt.Errorf("%w: local media ID %q", ErrInvalidPath, mediaID)
	}
	return jailed(filepath.Join("local_content", mediaID[0:2], mediaID[2:4], mediaID[4:]))
}

// remotePath is the path of a cached remote file relative to the media
// store. The origin must be a server name (no '/', never "." or "..") and
// the filesystem ID, which Synapse draws from letters, must pass the media
// ID check (the same safe character set).
func remotePath(origin, fsid string) (string, error) {
	if !matrix.ValidServerName(origin) {
		return "", fmt.Errorf("%w: remote media origin %q", ErrInvalidPath, origin)
	}
	if !matrix.ValidMediaID(fsid) || len(fsid) < minIDLength {
		return "", fmt.Errorf("%w: filesystem ID %q of remote media from %s", ErrInvalidPath, fsid, origin)
	}
	return jailed(filepath.Join("remote_content", origin, fsid[0:2], fsid[2:4], fsid[4:]))
}

// jailed returns rel if it stays inside the directory it is joined to, a
// second check behind the validators.
func jailed(rel string) (string, error) {
	if !filepath.IsLocal(rel) {
		return "", fmt.Errorf("%w: %q leaves the media store", ErrInvalidPath, rel)
	}
	return rel, nil
}

// opener returns an Item.Open that opens rel in the first of dirs holding
// it, or fails with relErr when the row names no valid path.
func (s *Source) opener(dirs []string, rel string, relErr error) func(context.Context) (io.ReadCloser, error) {
	return func(ctx context.Context) (io.ReadCloser, error) {
		if relErr != nil {
			return nil, relErr
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		return openIn(dirs, rel, s.cfg.UnsupportedProviders)
	}
}

// openIn opens rel in the first of dirs holding it. A file in none of them
// gives an error wrapping importer.ErrMissing; a directory or other
// non-regular file in its place is an error of its own.
func openIn(dirs []string, rel string, unsupported []string) (io.ReadCloser, error) {
	for _, d := range dirs {
		p := filepath.Join(d, rel)
		f, err := os.Open(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("opening synapse media file: %w", err)
		}
		st, err := f.Stat()
		if err != nil {
			_ = f.Close()
			return nil, fmt.Errorf("synapse media file: %w", err)
		}
		if !st.Mode().IsRegular() {
			_ = f.Close()
			return nil, fmt.Errorf("synapse media file %s is not a regular file", p)
		}
		return f, nil
	}
	return nil, missing(dirs, rel, unsupported)
}

// missing is the ErrMissing error for rel, naming where it was looked for
// and the storage providers that may hold it.
func missing(dirs []string, rel string, unsupported []string) error {
	if len(dirs) == 0 {
		return fmt.Errorf("%w: %s: no readable directory holds this kind of media (storage providers: %s)",
			importer.ErrMissing, rel, strings.Join(unsupported, ", "))
	}
	err := fmt.Errorf("%w: %s not found in %s", importer.ErrMissing, rel, strings.Join(dirs, ", "))
	if len(unsupported) > 0 {
		err = fmt.Errorf("%w (it may be in storage providers the importer cannot read: %s)",
			err, strings.Join(unsupported, ", "))
	}
	return err
}
