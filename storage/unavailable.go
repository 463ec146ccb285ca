package storage

import "errors"

// ErrUnavailable reports that a blob store's backend could not be reached or
// failed (network errors, timeouts, 5xx answers of an object store): the
// request may succeed later. Callers answer 502/503, not 500.
var ErrUnavailable = errors.New("storage backend unavailable")
