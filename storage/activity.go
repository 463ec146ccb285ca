package storage

import (
	"context"
	"time"
)

// This file declares what an operator's console reads besides MediaStats:
// the newest uploads, uploads per hour, and the history of the storage
// numbers. Like the other optional capabilities they are discovered with a
// type assertion on the MetadataStore; storage/sqlstore implements them and
// storage/metatest checks them on SQLite and PostgreSQL.

// RecentMediaQuery selects a page of the newest ready local media.
type RecentMediaQuery struct {
	// ServerName selects one server name's local media; empty means the
	// local media of every server name.
	ServerName string
	// Before continues a listing: only media created strictly before
	// Before.CreatedAt, or at the same instant with a (ServerName, MediaID)
	// sorting before Before's. Zero means from the newest.
	Before RecentCursor
	// Limit bounds the page (<= 0: nothing).
	Limit int
}

// RecentCursor is the position of a media row in the order of RecentMedia:
// CreatedAt descending, then ServerName and MediaID descending.
type RecentCursor struct {
	CreatedAt time.Time
	MediaRef
}

// UploadHistogramQuery selects the hours whose uploads are counted.
type UploadHistogramQuery struct {
	// ServerName selects one server name's local media; empty means every
	// server name's.
	ServerName string
	// Since and Until bound the creation times counted: Since inclusive,
	// Until exclusive. Both are truncated to the hour (UTC) by the store.
	Since, Until time.Time
}

// UploadHour is the ready local media created in one hour (UTC).
type UploadHour struct {
	// Hour is the start of the hour.
	Hour time.Time
	// Count is how many ready local media were created in it, Bytes their
	// total size (each row counted, also when rows share a blob).
	Count, Bytes int64
}

// ActivityStore is implemented by metadata stores that list recent local
// uploads for operators.
type ActivityStore interface {
	// RecentMedia returns a page of ready local media, newest first (see
	// RecentCursor). Quarantined rows are included (with QuarantinedBy set,
	// as GetMedia fills it) so that an operator sees what was taken down.
	RecentMedia(ctx context.Context, q RecentMediaQuery) ([]Media, error)
	// UploadHistogram returns, in ascending order, the hours of the query's
	// range that have at least one upload.
	UploadHistogram(ctx context.Context, q UploadHistogramQuery) ([]UploadHour, error)
}

// StatsSnapshot is the storage numbers at one instant, recorded
// periodically so that their history can be shown.
type StatsSnapshot struct {
	// At is when the numbers were read.
	At time.Time
	// Datastores are the blob counts and bytes of each datastore.
	Datastores []DatastoreUsage
	// Sites are each server name's ready local media.
	Sites []SiteUsage
	// Remote is the cache of remote media.
	Remote Counted
	// ReferencedBytes is the bytes of every ready media row (each row
	// counted); ContentBytes the bytes of the distinct blobs they
	// reference. Their ratio is the deduplication ratio.
	ReferencedBytes, ContentBytes int64
}

// Counted is a number of things and their bytes.
type Counted struct {
	Count, Bytes int64
}

// DatastoreUsage is what one datastore holds.
type DatastoreUsage struct {
	Name string
	Counted
}

// SiteUsage is one server name's ready local media.
type SiteUsage struct {
	ServerName string
	Counted
}

// StatsHistoryStore is implemented by metadata stores that keep the history
// of the storage numbers.
type StatsHistoryStore interface {
	// RecordStatsSnapshot stores s. A snapshot at the same instant as a
	// stored one replaces it.
	RecordStatsSnapshot(ctx context.Context, s StatsSnapshot) error
	// StatsHistory returns the snapshots taken in [since, until), oldest
	// first, at most limit of them (<= 0: nothing); when more exist, they
	// are thinned evenly over the range (the first and the last kept).
	StatsHistory(ctx context.Context, since, until time.Time, limit int) ([]StatsSnapshot, error)
	// PruneStatsHistory deletes the snapshots taken before before and
	// reports how many it deleted.
	PruneStatsHistory(ctx context.Context, before time.Time) (int64, error)
}
