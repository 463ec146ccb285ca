package dendrite

import (
	"fmt"
	"strconv"
	"strings"
)

// origins says which media origins a walk reads.
type origins int

const (
	// allOrigins reads local and remote media.
	allOrigins origins = iota
	// localOnly reads media whose origin is the server name.
	localOnly
	// remoteOnly reads every other origin (the remote media cache).
	remoteOnly
)

// selection is what a filter selects.
type selection struct {
	serverName string
	origins    origins
}

// pageKey is the last row of a page: the next page starts after it.
type pageKey struct {
	mediaID, origin string
}

// dialect is the kind of Dendrite database, SQLite or PostgreSQL: its
// name in descriptions, and what differs between the two, their numbered
// placeholders.
type dialect string

const (
	sqliteDialect   dialect = "sqlite"
	postgresDialect dialect = "postgres"
)

// placeholder renders the n-th argument (from 1): ?n for SQLite, $n for
// PostgreSQL.
func (d dialect) placeholder(n int) string {
	if d == postgresDialect {
		return "$" + strconv.Itoa(n)
	}
	return "?" + strconv.Itoa(n)
}

// mediaColumns are the columns item needs, in row's scan order.
const mediaColumns = "media_id, media_origin, content_type, file_size_bytes, creation_ts, upload_name, base64hash, user_id"

// where renders the WHERE clause of sel (and of the key when not nil),
// with its arguments.
func (d dialect) where(sel selection, after *pageKey) (string, []any) {
	var conds []string
	var args []any
	arg := func(v any) string {
		args = append(args, v)
		return d.placeholder(len(args))
	}
	switch sel.origins {
	case localOnly:
		conds = append(conds, "media_origin = "+arg(sel.serverName))
	case remoteOnly:
		conds = append(conds, "media_origin <> "+arg(sel.serverName))
	}
	if after != nil {
		// Row values follow the unique index (media_id, media_origin).
		conds = append(conds, "(media_id, media_origin) > ("+arg(after.mediaID)+", "+arg(after.origin)+")")
	}
	if len(conds) == 0 {
		return "", nil
	}
	return " WHERE " + strings.Join(conds, " AND "), args
}

// pageQuery reads the pageSize rows of sel after the key.
func (d dialect) pageQuery(sel selection, after *pageKey) (string, []any) {
	w, args := d.where(sel, after)
	return fmt.Sprintf("SELECT %s FROM mediaapi_media_repository%s ORDER BY media_id, media_origin LIMIT %d", mediaColumns, w, pageSize), args
}

// totalsQuery counts the rows of sel and sums their non-negative sizes.
func (d dialect) totalsQuery(sel selection) (string, []any) {
	w, args := d.where(sel, nil)
	return "SELECT COUNT(*), CAST(COALESCE(SUM(CASE WHEN file_size_bytes > 0 THEN file_size_bytes ELSE 0 END), 0) AS BIGINT) FROM mediaapi_media_repository" + w, args
}
