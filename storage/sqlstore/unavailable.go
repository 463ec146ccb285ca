package sqlstore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/mattn/go-sqlite3"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// classify wraps err with storage.ErrUnavailable when it shows that the
// database could not serve the request (unreachable, restarting, shutting
// down, out of connections, locked for too long), so that callers answer
// 503 and the client retries, rather than 500. Other errors, and a context
// cancelled by the caller, are returned as they are.
func classify(err error) error {
	if err == nil || errors.Is(err, storage.ErrUnavailable) || !unavailable(err) {
		return err
	}
	return fmt.Errorf("%w: %w", storage.ErrUnavailable, err)
}

// unavailable reports whether err means the database is unavailable.
func unavailable(err error) bool {
	if errors.Is(err, context.Canceled) {
		return false
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		// Class 08: connection exception; 57P01-57P05: shutdown, crash,
		// cannot connect now, idle session timeout; 53300: too many
		// connections; 40001/40P01 are retryable but the caller's to retry.
		return strings.HasPrefix(pe.Code, "08") || strings.HasPrefix(pe.Code, "57P") || pe.Code == "53300"
	}
	var se sqlite3.Error
	if errors.As(err, &se) {
		return se.Code == sqlite3.ErrBusy || se.Code == sqlite3.ErrLocked
	}
	var ce *pgconn.ConnectError
	var ne net.Error
	switch {
	case errors.As(err, &ce), errors.As(err, &ne), pgconn.Timeout(err):
		return true
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, driver.ErrBadConn), errors.Is(err, sql.ErrConnDone),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return true
	}
	// pgx reports a connection it closed after a failure as "conn closed",
	// and database/sql a pool closed by a reload as "database is closed".
	msg := err.Error()
	return strings.Contains(msg, "conn closed") || strings.Contains(msg, "sql: database is closed")
}
