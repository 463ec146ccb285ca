package synapse

import (
	"fmt"
	"strconv"
	"strings"
)

// localRequired and remoteRequired are the columns every supported Synapse
// schema has (full schema 72); optional ones came later: safe_from_quarantine
// (delta 58/08, local only) and sha256 (delta 91/01).
var (
	localRequired = []string{"media_id", "media_type", "media_length", "created_ts",
		"upload_name", "user_id", "quarantined_by", "url_cache"}
	remoteRequired = []string{"media_origin", "media_id", "media_type", "created_ts",
		"upload_name", "media_length", "filesystem_id", "quarantined_by"}
)

// localWhere selects finished uploads that are not URL-preview downloads.
const localWhere = "media_id IS NOT NULL AND url_cache IS NULL AND media_length IS NOT NULL"

// remoteWhere selects rows with a key.
const remoteWhere = "media_origin IS NOT NULL AND media_id IS NOT NULL"

// localQueries are the statements reading local_media_repository.
type localQueries struct {
	// first and next read a page (next after a media ID); totals counts.
	first, next, totals string
}

// remoteQueries are the statements reading remote_media_cache.
type remoteQueries struct {
	// first and next read a page (next after an origin and media ID);
	// totals counts.
	first, next, totals string
}

// newLocalQueries builds the local statements for the columns the table has.
func newLocalQueries(cols map[string]bool, pg bool) (localQueries, error) {
	if err := requireColumns("local_media_repository", cols, localRequired); err != nil {
		return localQueries{}, err
	}
	sel := "SELECT media_id, media_type, media_length, created_ts, upload_name, user_id, quarantined_by, " +
		optional(cols, "safe_from_quarantine") + ", " + optional(cols, "sha256") +
		" FROM local_media_repository WHERE " + localWhere
	return localQueries{
		first:  rebind(sel+" ORDER BY media_id LIMIT ?", pg),
		next:   rebind(sel+" AND media_id > ? ORDER BY media_id LIMIT ?", pg),
		totals: "SELECT COUNT(*), COALESCE(SUM(media_length), 0) FROM local_media_repository WHERE " + localWhere,
	}, nil
}

// newRemoteQueries builds the remote statements for the columns the table
// has.
func newRemoteQueries(cols map[string]bool, pg bool) (remoteQueries, error) {
	if err := requireColumns("remote_media_cache", cols, remoteRequired); err != nil {
		return remoteQueries{}, err
	}
	sel := "SELECT media_origin, media_id, media_type, media_length, created_ts, upload_name, filesystem_id, quarantined_by, " +
		optional(cols, "sha256") + " FROM remote_media_cache WHERE " + remoteWhere
	order := " ORDER BY media_origin, media_id LIMIT ?"
	return remoteQueries{
		first:  rebind(sel+order, pg),
		next:   rebind(sel+" AND (media_origin, media_id) > (?, ?)"+order, pg),
		totals: "SELECT COUNT(*), COALESCE(SUM(media_length), 0) FROM remote_media_cache WHERE " + remoteWhere,
	}, nil
}

// requireColumns fails unless table has every column of want.
func requireColumns(table string, cols map[string]bool, want []string) error {
	var missing []string
	for _, c := range want {
		if !cols[c] {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("synapse's %s table lacks columns %s: not a supported Synapse schema",
			table, strings.Join(missing, ", "))
	}
	return nil
}

// optional selects column c when the table has it, else NULL.
func optional(cols map[string]bool, c string) string {
	if cols[c] {
		return c
	}
	return "NULL"
}

// rebind turns ? placeholders into PostgreSQL's $n when pg is set. The
// statements here hold no ? other than placeholders.
func rebind(q string, pg bool) string {
	if !pg {
		return q
	}
	var b strings.Builder
	n := 0
	for _, r := range q {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}
