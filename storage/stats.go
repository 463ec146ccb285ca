package storage

import "context"

// MediaCounts counts the media rows of one server name, or of every cached
// remote item together (MediaStats).
type MediaCounts struct {
	// Ready counts the ready rows; Bytes sums their sizes, each row counted
	// even when rows share a blob (deduplicated content).
	Ready, Bytes int64
	// Pending counts the media IDs reserved by /create and not uploaded
	// yet (expired ones included until they are deleted); 0 for remote
	// media.
	Pending int64
	// Quarantined counts the ready rows (among Ready) that are refused:
	// their content is quarantined and they are not protected.
	Quarantined int64
}

// SiteMediaCounts are the counts of one server name's local media.
type SiteMediaCounts struct {
	ServerName string
	MediaCounts
}

// MediaStats are the headline numbers of a metadata store.
type MediaStats struct {
	// Local are the counts of local media, per server name, in byte order
	// of the server names; only server names with rows appear.
	Local []SiteMediaCounts
	// Remote are the counts of every cached remote item together (remote
	// server names are not bounded; they are not broken down).
	Remote MediaCounts
	// ContentBlobs counts the distinct blobs that ready media rows
	// reference, ContentBytes their sizes: what the media content occupies
	// once deduplicated. The bytes of every ready row (the sum of the
	// Bytes of Local and Remote) divided by ContentBytes is the
	// deduplication ratio.
	ContentBlobs, ContentBytes int64
	// Thumbnails counts the thumbnail rows, ThumbnailBytes their sizes.
	Thumbnails, ThumbnailBytes int64
}

// ReferencedBytes is the bytes of every ready media row, local and remote
// (each row counted, also when rows share a blob).
func (s MediaStats) ReferencedBytes() int64 {
	n := s.Remote.Bytes
	for _, l := range s.Local {
		n += l.Bytes
	}
	return n
}

// StatsStore is implemented by metadata stores that report their headline
// numbers for operators. The numbers are aggregates over whole tables:
// computing them reads every media row (a scan, no per-row round trip), so
// callers use them on demand, not per request.
type StatsStore interface {
	// MediaStats returns the counts of media and thumbnails and the size of
	// the deduplicated content, read in one consistent snapshot.
	MediaStats(ctx context.Context) (MediaStats, error)
}
