package auth

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestNewWhoamiValidation(t *testing.T) {
	bad := []string{"", "ftp://x", "http://", "://x", "http://x?q=1", "http://x#f", "x:y"}
	for _, u := range bad {
		if _, err := NewWhoami(u, nil); err == nil {
			t.Errorf("NewWhoami(%q) succeeded", u)
		}
	}
	w, err := NewWhoami("http://hs.example:8008/prefix/", nil)
	if err != nil {
		t.Fatal(err)
	}
	if w.url != "http://hs.example:8008/prefix/_matrix/client/v3/account/whoami" {
		t.Fatalf("url = %q", w.url)
	}
}

func TestWhoamiAuthenticate(t *testing.T) {
	var gotPaths []string
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotPaths = append(gotPaths, r.Method+" "+r.URL.Path)
		w.Header().Set("Content-Type", "application/json")
		switch r.Header.Get("Authorization") {
		case "Bearer alice":
			_, _ = w.Write([]byte(`{"user_id":"@alice:test","device_id":"DEV","is_guest":false}`))
		case "Bearer guest":
			_, _ = w.Write([]byte(`{"user_id":"@guest1:test","is_guest":true}`))
		case "Bearer nouser":
			_, _ = w.Write([]byte(`{"device_id":"DEV"}`))
		case "Bearer nosigil":
			_, _ = w.Write([]byte(`{"user_id":"alice:test"}`))
		case "Bearer noserver":
			_, _ = w.Write([]byte(`{"user_id":"@alice"}`))
		case "Bearer badserver":
			_, _ = w.Write([]byte(`{"user_id":"@alice:te st"}`))
		case "Bearer badlocal":
			_, _ = w.Write([]byte(`{"user_id":"@al\u0000ice:test"}`))
		case "Bearer longuser":
			_, _ = w.Write([]byte(`{"user_id":"@` + strings.Repeat("a", 300) + `:test"}`))
		case "Bearer garbage":
			_, _ = w.Write([]byte(`<html>oops</html>`))
		case "Bearer huge":
			_, _ = w.Write([]byte(`{"user_id":"@alice:test","pad":"` + strings.Repeat("x", 70<<10) + `"}`))
		case "Bearer five":
			w.WriteHeader(http.StatusBadGateway)
			_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN"}`))
		case "Bearer forbidden-token":
			w.WriteHeader(http.StatusForbidden)
			_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN_TOKEN","error":"nope"}`))
		case "Bearer html401":
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`<html>login</html>`))
		case "Bearer limited":
			w.WriteHeader(http.StatusTooManyRequests)
			_, _ = w.Write([]byte(`{"errcode":"M_LIMIT_EXCEEDED"}`))
		case "":
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`{"errcode":"M_MISSING_TOKEN","error":"missing"}`))
		default:
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN_TOKEN","error":"unknown"}`))
		}
	}))
	defer hs.Close()

	w, err := NewWhoami(hs.URL, hs.Client())
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		token   string
		want    User
		wantErr error
	}{
		{"alice", User{UserID: "@alice:test", DeviceID: "DEV"}, nil},
		{"guest", User{UserID: "@guest1:test", IsGuest: true}, nil},
		{"bob", User{}, ErrUnknownToken},
		{"forbidden-token", User{}, ErrUnknownToken},
		{"nouser", User{}, ErrHomeserverUnavailable},
		{"nosigil", User{}, ErrHomeserverUnavailable},
		{"noserver", User{}, ErrHomeserverUnavailable},
		{"badserver", User{}, ErrHomeserverUnavailable},
		{"badlocal", User{}, ErrHomeserverUnavailable},
		{"longuser", User{}, ErrHomeserverUnavailable},
		{"garbage", User{}, ErrHomeserverUnavailable},
		{"huge", User{}, ErrHomeserverUnavailable},
		{"five", User{}, ErrHomeserverUnavailable},
		{"html401", User{}, ErrHomeserverUnavailable},
		{"limited", User{}, ErrHomeserverUnavailable},
		{"", User{}, ErrUnknownToken},
		{"has space", User{}, ErrUnknownToken},
		{"bad\nline", User{}, ErrUnknownToken},
	}
	for _, tc := range tests {
		u, err := w.CheckToken(context.Background(), tc.token)
		if tc.wantErr != nil {
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("token %q: err = %v, want %v", tc.token, err, tc.wantErr)
			}
			if err != nil && tc.token != "" && strings.Contains(err.Error(), tc.token) {
				t.Errorf("token %q leaked into error %q", tc.token, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("token %q: %v", tc.token, err)
			continue
		}
		if u != tc.want {
			t.Errorf("token %q: user = %+v, want %+v", tc.token, u, tc.want)
		}
	}
	for _, p := range gotPaths {
		if p != "GET /_matrix/client/v3/account/whoami" {
			t.Errorf("homeserver saw %q", p)
		}
	}
	if len(gotPaths) == 0 {
		t.Fatal("homeserver never called")
	}
}

func TestWhoamiTimeout(t *testing.T) {
	release := make(chan struct{})
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer hs.Close()
	defer close(release)

	// The deadline is on the context, so the assertion does not depend on
	// how fast the machine is: the server never answers.
	w, err := NewWhoami(hs.URL, hs.Client())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := w.CheckToken(ctx, "alice"); !errors.Is(err, ErrHomeserverTimeout) {
		t.Fatalf("err = %v, want ErrHomeserverTimeout", err)
	}

	// A client-level timeout is a timeout too.
	w2, err := NewWhoami(hs.URL, &http.Client{Timeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w2.CheckToken(context.Background(), "alice"); !errors.Is(err, ErrHomeserverTimeout) {
		t.Fatalf("err = %v, want ErrHomeserverTimeout", err)
	}
}

func TestWhoamiConnectionRefused(t *testing.T) {
	// Listen and close to get a loopback port with nothing behind it.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	w, err := NewWhoami("http://"+addr, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.CheckToken(context.Background(), "alice"); !errors.Is(err, ErrHomeserverUnavailable) {
		t.Fatalf("err = %v, want ErrHomeserverUnavailable", err)
	}
}
