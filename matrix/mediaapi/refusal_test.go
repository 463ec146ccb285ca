package mediaapi

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// rawRequest sends only the headers of a request with a body of
// contentLength bytes and returns the response read from the socket, which
// must arrive while the body was never sent.
func rawRequest(t *testing.T, addr, method, path, token string, contentLength int64, expect bool) *http.Response {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: media.test\r\nContent-Type: image/png\r\nContent-Length: %d\r\n", method, path, contentLength)
	if token != "" {
		fmt.Fprintf(&b, "Authorization: Bearer %s\r\n", token)
	}
	if expect {
		b.WriteString("Expect: 100-continue\r\n")
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(conn, b.String()); err != nil {
		t.Fatal(err)
	}
	// A bound for a broken server only (the body never comes: a server that
	// waits for it would wait for ever).
	_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("no response while the body was not sent: %v", err)
	}
	if resp.StatusCode == http.StatusContinue {
		t.Fatal("got 100 Continue for a request refused from its headers")
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// Refusals decided from the headers (size, auth, pending upload state) reach
// the client at once, with Connection: close, while it has sent only the
// headers: also when it waits for 100 Continue.
func TestEarlyRefusalsDoNotWaitForTheBody(t *testing.T) {
	e := newEnv(t)
	srv := httptest.NewServer(e.site)
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	pending := e.create("alice")
	tests := []struct {
		name, method, path, token string
		length                    int64
		status                    int
		code                      string
	}{
		{"over the limit", "POST", "/_matrix/media/v3/upload", "alice", 1<<20 + 1, 413, "M_TOO_LARGE"},
		{"small body, no token", "POST", "/_matrix/media/v3/upload", "", 100000, 401, "M_MISSING_TOKEN"},
		{"small body, unknown token", "POST", "/_matrix/media/v3/upload", "nobody", 100000, 401, "M_UNKNOWN_TOKEN"},
		{"put over the limit", "PUT", "/_matrix/media/v3/upload/test/" + pending, "alice", 1<<20 + 1, 413, "M_TOO_LARGE"},
		{"put by another user", "PUT", "/_matrix/media/v3/upload/test/" + pending, "bob", 100000, 403, "M_FORBIDDEN"},
		{"put to an unknown id", "PUT", "/_matrix/media/v3/upload/test/AAAAAAAAAAAAAAAAAAAAAAAA", "alice", 100000, 404, "M_NOT_FOUND"},
	}
	for _, tc := range tests {
		for _, expect := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/expect=%v", tc.name, expect), func(t *testing.T) {
				resp := rawRequest(t, addr, tc.method, tc.path, tc.token, tc.length, expect)
				var body struct {
					ErrCode string `json:"errcode"`
				}
				if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != tc.status || body.ErrCode != tc.code {
					t.Fatalf("%d %s, want %d %s", resp.StatusCode, body.ErrCode, tc.status, tc.code)
				}
				if !resp.Close {
					t.Fatalf("refusal without Connection: close (header %q)", resp.Header.Get("Connection"))
				}
			})
		}
	}
	// An upload whose body was read keeps its connection.
	req, _ := http.NewRequest("POST", srv.URL+"/_matrix/media/v3/upload", strings.NewReader("hello"))
	req.Header.Set("Authorization", "Bearer alice")
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Close {
		t.Fatalf("complete upload: %d, close %v", resp.StatusCode, resp.Close)
	}
}

// cancelAtEOF is a request body that cancels the request's context as soon
// as its last byte was read: a client that went away right after sending.
type cancelAtEOF struct {
	r      io.Reader
	cancel context.CancelFunc
}

func (c *cancelAtEOF) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if err == io.EOF {
		c.cancel()
	}
	return n, err
}

func (c *cancelAtEOF) Close() error { return nil }

// A client that disconnects after its body was received gets its upload
// recorded all the same: the metadata write runs on a detached context, no
// blob is left without a row, and nothing is logged as an error.
func TestUploadClientGoneAfterBody(t *testing.T) {
	for _, put := range []bool{false, true} {
		t.Run(fmt.Sprintf("put=%v", put), func(t *testing.T) {
			logs := &syncBuffer{}
			e := newEnv(t, func(_ *SiteConfig, o *RepositoryOptions) { o.Logger = observedLogger(logs) })
			path := "/_matrix/media/v3/upload?filename=a.txt"
			var id string
			if put {
				id = e.create("alice")
				path = "/_matrix/media/v3/upload/test/" + id + "?filename=a.txt"
			}
			content := "content sent in full before the client left"
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			method := "POST"
			if put {
				method = "PUT"
			}
			r := httptest.NewRequest(method, "http://media.test"+path, nil).WithContext(ctx)
			r.Body = &cancelAtEOF{r: strings.NewReader(content), cancel: cancel}
			r.ContentLength = int64(len(content))
			r.Header.Set("Authorization", "Bearer alice")
			r.Header.Set("Content-Type", "text/plain")
			rec := httptest.NewRecorder()
			e.site.ServeHTTP(rec, r)
			if ctx.Err() == nil {
				t.Fatal("the request context was not cancelled")
			}
			if !put {
				if rec.Code != 200 {
					t.Fatalf("%d %s", rec.Code, rec.Body)
				}
				id = mediaIDFromURI(t, rec, testServer)
			}
			m, err := e.sql.GetMedia(context.Background(), testServer, id)
			if err != nil || m.State != storage.StateReady || m.Filename != "a.txt" || m.Size != int64(len(content)) {
				t.Fatalf("row %+v, %v", m, err)
			}
			b, err := e.blobs.Open(context.Background(), m.SHA256)
			if err != nil {
				t.Fatalf("the row's blob: %v", err)
			}
			got, _ := io.ReadAll(b.Content)
			b.Content.Close()
			if string(got) != content {
				t.Fatalf("blob %q", got)
			}
			if files := e.blobFiles(); len(files) != 1 {
				t.Fatalf("blob files %v, want just the row's", files)
			}
			if strings.Contains(logs.String(), `"level":"error"`) {
				t.Fatalf("error logged: %s", logs.String())
			}
		})
	}
}

// Over HTTP/2 an early refusal also arrives while the body is held back, and
// carries no Connection header (which HTTP/2 forbids).
func TestEarlyRefusalHTTP2(t *testing.T) {
	e := newEnv(t)
	sent := make(chan string, 1) // the Connection header the handler set
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.site.ServeHTTP(w, r)
		sent <- w.Header().Get("Connection")
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()
	pr, pw := io.Pipe()
	defer pw.Close() // the body is never sent
	req, err := http.NewRequest("POST", srv.URL+"/_matrix/media/v3/upload", pr)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = 1<<20 + 1
	req.Header.Set("Authorization", "Bearer alice")
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("protocol %s, want HTTP/2", resp.Proto)
	}
	if c := <-sent; resp.StatusCode != 413 || c != "" {
		t.Fatalf("%d, Connection %q; want 413 without Connection", resp.StatusCode, c)
	}
}

// wrappedBody hides the request body's type from net/http, as Caddy's body
// wrapper does: net/http then no longer skips an unread body larger than
// 256 KiB by itself.
type wrappedBody struct{ io.ReadCloser }

// A client that sends its whole over-size body without waiting (Go's own
// client does) reads the early refusal instead of a connection reset: the
// refusal is sent at once and the rest of the body is read and discarded
// before the connection closes. Measured before the lingering read: 18 of
// 30 such uploads failed with "connection reset by peer".
func TestEarlyRefusalReachesAClientStillSending(t *testing.T) {
	e := newEnv(t)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.Body = wrappedBody{r.Body}
		e.site.ServeHTTP(w, r)
	}))
	defer srv.Close()
	body := make([]byte, 2<<20+1)
	for i := range 20 {
		// A new connection each time, like a client after a refusal.
		client := &http.Client{Transport: &http.Transport{}, Timeout: time.Minute}
		req, _ := http.NewRequest("POST", srv.URL+"/_matrix/media/v3/upload", strings.NewReader(string(body)))
		req.Header.Set("Authorization", "Bearer alice")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("upload %d: %v (want 413 M_TOO_LARGE)", i, err)
		}
		var got struct {
			ErrCode string `json:"errcode"`
		}
		err = json.NewDecoder(resp.Body).Decode(&got)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge || got.ErrCode != "M_TOO_LARGE" {
			t.Fatalf("upload %d: %d %q (%v), want 413 M_TOO_LARGE", i, resp.StatusCode, got.ErrCode, err)
		}
		if !resp.Close {
			t.Fatalf("upload %d: refusal without Connection: close", i)
		}
	}
}
