package tests3

import (
	"bytes"
	"io"
	"net/http"
	"slices"
	"testing"
)

// do sends a plain HTTP request (gofakes3 does not check signatures).
func do(t *testing.T, method, url string, body []byte) (*http.Response, []byte, error) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatalf("building request: %v", err)
	}
	req.ContentLength = int64(len(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

func TestStopRestart(t *testing.T) {
	srv := Start(t)
	obj := srv.URL() + "/" + srv.Bucket() + "/a/b"
	if resp, body, err := do(t, http.MethodPut, obj, []byte("hello")); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("PUT: %v %v %s", resp, err, body)
	}
	if got := srv.Objects(t); !slices.Equal(got, []string{"a/b"}) {
		t.Errorf("Objects = %q, want [a/b]", got)
	}
	if n := srv.MultipartUploads(t); n != 0 {
		t.Errorf("MultipartUploads = %d, want 0", n)
	}
	if resp, body, err := do(t, http.MethodPost, srv.URL()+"/"+srv.Bucket()+"/big?uploads", nil); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("initiating multipart upload: %v %v %s", resp, err, body)
	}
	if n := srv.MultipartUploads(t); n != 1 {
		t.Errorf("MultipartUploads = %d, want 1", n)
	}

	srv.Stop()
	if _, _, err := do(t, http.MethodGet, obj, nil); err == nil {
		t.Fatal("GET succeeded while stopped")
	}
	if got := srv.Objects(t); !slices.Equal(got, []string{"a/b"}) {
		t.Errorf("Objects while stopped = %q, want [a/b]", got)
	}
	srv.Stop() // idempotent

	srv.Restart(t)
	srv.Restart(t) // idempotent
	resp, body, err := do(t, http.MethodGet, obj, nil)
	if err != nil || resp.StatusCode != http.StatusOK || string(body) != "hello" {
		t.Fatalf("GET after restart = %v, %q, %v", resp, body, err)
	}
	if n := srv.MultipartUploads(t); n != 1 {
		t.Errorf("MultipartUploads after restart = %d, want 1 (kept across restarts)", n)
	}
}
