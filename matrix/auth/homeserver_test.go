package auth

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestGetHomeserver: answers are read whole with their Matrix error, a body
// over the limit and a failed round trip are homeserver errors, and the
// token is sent but never echoed in errors.
func TestGetHomeserver(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer secret-token" {
			http.Error(w, "no token", http.StatusTeapot)
			return
		}
		switch r.URL.Path {
		case "/ok":
			_, _ = w.Write([]byte(`{"a":1}`))
		case "/unrecognized":
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`))
		case "/notfound":
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"errcode":"M_NOT_FOUND","error":"No such room"}`))
		case "/html":
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`<html>404</html>`))
		case "/big":
			_, _ = w.Write([]byte(strings.Repeat("x", 200)))
		case "/slow":
			time.Sleep(300 * time.Millisecond)
		}
	}))
	defer srv.Close()
	ctx := context.Background()
	for _, tc := range []struct {
		path       string
		status     int
		noSuchAPI  bool
		describe   string
		wantErrIs  error
		shortLimit bool
	}{
		{path: "/ok", status: 200, describe: "200"},
		{path: "/unrecognized", status: 404, noSuchAPI: true, describe: "404 M_UNRECOGNIZED: Unrecognized request"},
		{path: "/notfound", status: 404, describe: "404 M_NOT_FOUND: No such room"},
		{path: "/html", status: 404, noSuchAPI: true, describe: "404"},
		{path: "/big", shortLimit: true, wantErrIs: ErrHomeserverUnavailable},
	} {
		limit := int64(1024)
		if tc.shortLimit {
			limit = 100
		}
		a, err := GetHomeserver(ctx, srv.Client(), srv.URL+tc.path, "secret-token", limit, "test")
		if tc.wantErrIs != nil {
			if !errors.Is(err, tc.wantErrIs) || strings.Contains(err.Error(), "secret-token") {
				t.Errorf("%s: err = %v, want %v without the token", tc.path, err, tc.wantErrIs)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tc.path, err)
		}
		if a.Status != tc.status || a.NoSuchAPI() != tc.noSuchAPI || a.Describe() != tc.describe {
			t.Errorf("%s: status %d noSuchAPI %v describe %q, want %d %v %q", tc.path, a.Status, a.NoSuchAPI(), a.Describe(), tc.status, tc.noSuchAPI, tc.describe)
		}
	}
	a, _ := GetHomeserver(ctx, srv.Client(), srv.URL+"/ok", "secret-token", 1024, "test")
	if string(a.Body) != `{"a":1}` {
		t.Errorf("body = %q", a.Body)
	}
	tctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := GetHomeserver(tctx, srv.Client(), srv.URL+"/slow", "secret-token", 1024, "test"); !errors.Is(err, ErrHomeserverTimeout) {
		t.Errorf("slow: err = %v, want ErrHomeserverTimeout", err)
	}
	srv.Close()
	if _, err := GetHomeserver(ctx, http.DefaultClient, srv.URL+"/ok", "secret-token", 1024, "test"); !errors.Is(err, ErrHomeserverUnavailable) {
		t.Errorf("closed server: err = %v, want ErrHomeserverUnavailable", err)
	}
}
