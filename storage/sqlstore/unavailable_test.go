package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/mattn/go-sqlite3"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

func TestClassify(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	for i, tc := range []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("x: %w", refused), true},
		{&pgconn.PgError{Code: "57P01"}, true},
		{&pgconn.PgError{Code: "08006"}, true},
		{&pgconn.PgError{Code: "53300"}, true},
		{&pgconn.PgError{Code: "23505"}, false},
		{sqlite3.Error{Code: sqlite3.ErrBusy}, true},
		{sqlite3.Error{Code: sqlite3.ErrConstraint}, false},
		{context.DeadlineExceeded, true},
		{context.Canceled, false},
		{sql.ErrNoRows, false},
		{errors.New("sql: database is closed"), true},
	} {
		got := classify(tc.err)
		if errors.Is(got, storage.ErrUnavailable) != tc.want {
			t.Errorf("Test %d: classify(%v) = %v, unavailable want %v", i, tc.err, got, tc.want)
		}
		if !errors.Is(got, tc.err) {
			t.Errorf("Test %d: classify lost the original error", i)
		}
	}
}

// TestUnreachablePostgres checks that a store whose server went away
// answers errors wrapping storage.ErrUnavailable.
func TestUnreachablePostgres(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	db, err := sql.Open("pgx", "postgres://postgres@"+addr+"/x?sslmode=disable&connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	s := &Store{dialect: dialectPostgres, write: db, read: db, q: newQueries(dialectPostgres)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := s.GetMedia(ctx, "example.org", "x"); !errors.Is(err, storage.ErrUnavailable) {
		t.Errorf("GetMedia: %v, want ErrUnavailable", err)
	}
	if _, err := s.RecordBlob(ctx, storage.BlobRecord{SHA256: "ab"}); !errors.Is(err, storage.ErrUnavailable) {
		t.Errorf("RecordBlob: %v, want ErrUnavailable", err)
	}
}
