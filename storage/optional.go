package storage

import (
	"context"
	"io"
	"time"
)

// RangeOpener is implemented by blob stores that read a byte range in one
// request (object stores), which is cheaper than Open followed by Seek: no
// separate size lookup, and nothing fetched beyond the range.
type RangeOpener interface {
	// OpenRange returns length bytes of the blob starting at offset, or an
	// error wrapping ErrNotFound (or ErrUnavailable).
	OpenRange(ctx context.Context, sha256 string, offset, length int64) (io.ReadCloser, error)
}

// Presigner is implemented by blob stores whose blobs can be fetched directly
// by clients with a signed, expiring URL.
type Presigner interface {
	// PresignGet returns a URL valid for ttl that serves the blob with the
	// given Content-Type and Content-Disposition.
	PresignGet(ctx context.Context, sha256 string, ttl time.Duration, contentType, contentDisposition string) (string, error)
}
