package s3store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/blobtest"
)

// testPartSize is the part size of the S3-specific tests: the smallest S3
// allows, so multipart uploads stay small.
const testPartSize = MinPartSize

// recorder is an Observer that keeps every call.
type recorder struct {
	mu  sync.Mutex
	ops []string
	// failed lists the operations that ended in an error.
	failed []string
	// bytes sums the bytes per operation.
	bytes map[string]int64
}

func (r *recorder) ObserveS3(op string, _ time.Duration, n int64, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ops = append(r.ops, op)
	if err != nil {
		r.failed = append(r.failed, op)
	}
	if r.bytes == nil {
		r.bytes = map[string]int64{}
	}
	r.bytes[op] += n
}

// count returns how many times op was observed.
func (r *recorder) count(op string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, o := range r.ops {
		if o == op {
			n++
		}
	}
	return n
}

// countFailed returns how many times op was observed failing.
func (r *recorder) countFailed(op string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, o := range r.failed {
		if o == op {
			n++
		}
	}
	return n
}

// newTestStore starts a fake S3 server and opens a store on it.
func newTestStore(t testing.TB, mod func(*Config)) (*Store, *tests3.Server) {
	t.Helper()
	srv := tests3.Start(t)
	cfg := Config{
		Endpoint:        srv.URL(),
		Bucket:          srv.Bucket(),
		PathStyle:       true,
		AccessKeyID:     srv.AccessKey(),
		SecretAccessKey: srv.SecretKey(),
		RetryMaxBackoff: 20 * time.Millisecond,
	}
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return s, srv
}

func TestConformance(t *testing.T) {
	blobtest.Run(t, func(t *testing.T) storage.BlobStore {
		s, _ := newTestStore(t, nil)
		return s
	})
}

// TestConformanceSmallParts runs the suite with 5 MiB parts and a key
// prefix, so that its larger bodies (4 and 8 MiB) also take the multipart
// path.
func TestConformanceSmallParts(t *testing.T) {
	blobtest.Run(t, func(t *testing.T) storage.BlobStore {
		s, srv := newTestStore(t, func(c *Config) {
			c.PartSize = testPartSize
			c.Prefix = "media/"
		})
		t.Cleanup(func() { checkNoLeftovers(t, s, srv, "media/") })
		return s
	})
}

// checkNoLeftovers waits for background clean-ups and checks that the bucket
// holds no tmp object, no multipart upload, and only keys of the blob layout.
func checkNoLeftovers(t testing.TB, s *Store, srv *tests3.Server, prefix string) {
	t.Helper()
	s.cleanups.Wait()
	for _, k := range srv.Objects(t) {
		rest, ok := strings.CutPrefix(k, prefix+"blobs/")
		if !ok || len(rest) != 70 || rest[:2] != rest[6:8] || rest[3:5] != rest[8:10] {
			t.Errorf("unexpected object %q left in the bucket", k)
		}
	}
	if n := srv.MultipartUploads(t); n != 0 {
		t.Errorf("%d multipart uploads left in progress", n)
	}
}

func TestLayout(t *testing.T) {
	s, srv := newTestStore(t, func(c *Config) { c.Prefix = "p/" })
	defer s.Close()
	body := []byte("hello")
	res, err := s.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1})
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	h := blobtest.SHA256Hex(body)
	want := []string{"p/blobs/" + h[0:2] + "/" + h[2:4] + "/" + h}
	if got := srv.Objects(t); len(got) != 1 || got[0] != want[0] || res.SHA256 != h {
		t.Errorf("objects = %q, want %q", got, want)
	}
}

func TestMultipartRoundTrip(t *testing.T) {
	rec := &recorder{}
	s, srv := newTestStore(t, func(c *Config) { c.PartSize = testPartSize; c.Observer = rec })
	defer s.Close()
	ctx := context.Background()
	body := blobtest.RandomBytes(1, 3*testPartSize+1)
	for _, known := range []bool{true, false} {
		opts := storage.PutOptions{ExpectedSize: -1}
		if known {
			opts.ExpectedSize = int64(len(body))
		}
		res, err := s.Put(ctx, bytes.NewReader(body), opts)
		if err != nil {
			t.Fatalf("Put(known=%v): %v", known, err)
		}
		if res.SHA256 != blobtest.SHA256Hex(body) || res.Size != int64(len(body)) || res.Existed != !known {
			t.Errorf("Put(known=%v) = %+v", known, res)
		}
	}
	// First Put: 4 parts; the second one reads the whole body again (into
	// parts) but aborts instead of completing.
	if got := rec.count("UploadPart"); got != 7 {
		t.Errorf("UploadPart calls = %d, want 7 (4 + 3 before the abort)", got)
	}
	if got := rec.count("CompleteMultipartUpload"); got != 1 {
		t.Errorf("CompleteMultipartUpload calls = %d, want 1", got)
	}
	if got := rec.count("AbortMultipartUpload"); got != 1 {
		t.Errorf("AbortMultipartUpload calls = %d, want 1", got)
	}
	if got := rec.count("CopyObject"); got != 1 {
		t.Errorf("CopyObject calls = %d, want 1", got)
	}
	blob, err := s.Open(ctx, blobtest.SHA256Hex(body))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer blob.Content.Close()
	var got bytes.Buffer
	if _, err := io.Copy(&got, blob.Content); err != nil {
		t.Fatalf("reading: %v", err)
	}
	if blob.Size != int64(len(body)) || !bytes.Equal(got.Bytes(), body) {
		t.Errorf("read back %d bytes (size %d), want the %d stored", got.Len(), blob.Size, len(body))
	}
	checkNoLeftovers(t, s, srv, "")
}

// TestSinglePartBoundary checks that a body of exactly one part is written
// with one PutObject and one byte more takes the multipart path.
func TestSinglePartBoundary(t *testing.T) {
	for _, tt := range []struct {
		size      int
		wantParts int
	}{{testPartSize, 0}, {testPartSize + 1, 2}} {
		rec := &recorder{}
		s, srv := newTestStore(t, func(c *Config) { c.PartSize = testPartSize; c.Observer = rec })
		body := blobtest.RandomBytes(uint64(tt.size), tt.size)
		if _, err := s.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1}); err != nil {
			t.Fatalf("Put(%d): %v", tt.size, err)
		}
		if got := rec.count("UploadPart"); got != tt.wantParts {
			t.Errorf("size %d: UploadPart calls = %d, want %d", tt.size, got, tt.wantParts)
		}
		if got, want := rec.count("PutObject"), map[bool]int{true: 1, false: 0}[tt.wantParts == 0]; got != want {
			t.Errorf("size %d: PutObject calls = %d, want %d", tt.size, got, want)
		}
		checkNoLeftovers(t, s, srv, "")
		s.Close()
	}
}

// failingReader yields data up to failAt bytes, then fails with err.
type failingReader struct {
	data   []byte
	failAt int
	err    error
	off    int
}

func (r *failingReader) Read(p []byte) (int, error) {
	if r.off >= r.failAt {
		return 0, r.err
	}
	n := copy(p, r.data[r.off:r.failAt])
	r.off += n
	return n, nil
}

func TestMultipartReaderErrorLeavesNothing(t *testing.T) {
	errBroken := errors.New("client went away")
	body := blobtest.RandomBytes(2, 3*testPartSize+1)
	for _, failAt := range []int{testPartSize + 1, 2*testPartSize + 100, len(body) - 1} {
		s, srv := newTestStore(t, func(c *Config) { c.PartSize = testPartSize })
		_, err := s.Put(context.Background(), &failingReader{data: body, failAt: failAt, err: errBroken},
			storage.PutOptions{ExpectedSize: -1})
		if !errors.Is(err, errBroken) {
			t.Fatalf("failAt %d: Put error = %v, want the reader's", failAt, err)
		}
		checkNoLeftovers(t, s, srv, "")
		if got := srv.Objects(t); len(got) != 0 {
			t.Errorf("failAt %d: objects left: %q", failAt, got)
		}
		s.Close()
	}
}

func TestMultipartCancelLeavesNothing(t *testing.T) {
	s, srv := newTestStore(t, func(c *Config) { c.PartSize = testPartSize })
	defer s.Close()
	body := blobtest.RandomBytes(3, 3*testPartSize)
	ctx, cancel := context.WithCancel(context.Background())
	r := &hookReader{data: body, at: 2*testPartSize + 10, hook: cancel}
	_, err := s.Put(ctx, r, storage.PutOptions{ExpectedSize: int64(len(body))})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Put error = %v, want context.Canceled", err)
	}
	if errors.Is(err, ErrUnavailable) {
		t.Errorf("cancelled Put reported ErrUnavailable: %v", err)
	}
	checkNoLeftovers(t, s, srv, "")
	if got := srv.Objects(t); len(got) != 0 {
		t.Errorf("objects left: %q", got)
	}
}

// hookReader yields data and calls hook once, when at bytes have been
// handed out.
type hookReader struct {
	data []byte
	at   int
	hook func()
	off  int
	done bool
}

func (r *hookReader) Read(p []byte) (int, error) {
	if r.off >= len(r.data) {
		return 0, io.EOF
	}
	if !r.done && r.off >= r.at {
		r.done = true
		r.hook()
	}
	n := copy(p, r.data[r.off:])
	r.off += n
	return n, nil
}

func TestServerDiesMidPut(t *testing.T) {
	rec := &recorder{}
	s, srv := newTestStore(t, func(c *Config) {
		c.PartSize = testPartSize
		c.MaxRetries = 1
		c.Observer = rec
	})
	defer s.Close()
	body := blobtest.RandomBytes(4, 4*testPartSize)
	// Stop the server once a part upload has had time to start: the part
	// upload in flight (or the next one) fails.
	r := &hookReader{data: body, at: 2*testPartSize + 1, hook: func() {
		time.Sleep(5 * time.Millisecond)
		srv.Stop()
	}}
	_, err := s.Put(context.Background(), r, storage.PutOptions{ExpectedSize: -1})
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Put error = %v, want ErrUnavailable", err)
	}
	// The clean-up could not reach S3; it must finish once S3 is back.
	time.Sleep(300 * time.Millisecond)
	if got := rec.countFailed("AbortMultipartUpload"); got == 0 {
		t.Errorf("no failed AbortMultipartUpload while S3 was down")
	}
	srv.Restart(t)
	checkNoLeftovers(t, s, srv, "")
	if got, failed := rec.count("AbortMultipartUpload"), rec.countFailed("AbortMultipartUpload"); got != failed+1 {
		t.Errorf("AbortMultipartUpload: %d calls, %d failed; want exactly one success", got, failed)
	}
	if got := srv.Objects(t); len(got) != 0 {
		t.Errorf("objects left: %q", got)
	}
	// The store works again.
	res, err := s.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1})
	if err != nil || res.SHA256 != blobtest.SHA256Hex(body) || res.Existed {
		t.Fatalf("Put after restart = %+v, %v", res, err)
	}
	checkNoLeftovers(t, s, srv, "")
}

func TestUnavailable(t *testing.T) {
	s, srv := newTestStore(t, func(c *Config) { c.MaxRetries = 1 })
	defer s.Close()
	ctx := context.Background()
	body := blobtest.RandomBytes(5, 1000)
	if _, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1}); err != nil {
		t.Fatalf("Put: %v", err)
	}
	h := blobtest.SHA256Hex(body)
	blob, err := s.Open(ctx, h)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer blob.Content.Close()
	srv.Stop()

	checks := map[string]func() error{
		"Put": func() error {
			_, err := s.Put(ctx, bytes.NewReader([]byte("x")), storage.PutOptions{ExpectedSize: -1})
			return err
		},
		"Stat": func() error { _, err := s.Stat(ctx, h); return err },
		"Open": func() error {
			b, err := s.Open(ctx, h)
			if err == nil {
				b.Content.Close()
			}
			return err
		},
		"Read":       func() error { _, err := io.ReadAll(blob.Content); return err },
		"Delete":     func() error { return s.Delete(ctx, h) },
		"OpenRange":  func() error { _, err := s.OpenRange(ctx, h, 0, 10); return err },
		"BucketCORS": func() error { _, err := s.BucketCORS(ctx); return err },
		"New": func() error {
			_, err := New(ctx, Config{Endpoint: srv.URL(), Bucket: srv.Bucket(), PathStyle: true,
				AccessKeyID: "k", SecretAccessKey: "s", MaxRetries: -1})
			return err
		},
	}
	for name, f := range checks {
		err := f()
		if !errors.Is(err, ErrUnavailable) || !errors.Is(err, storage.ErrUnavailable) {
			t.Errorf("%s with S3 stopped: error = %v, want ErrUnavailable (and storage.ErrUnavailable)", name, err)
		}
		if errors.Is(err, storage.ErrNotFound) {
			t.Errorf("%s with S3 stopped: error %v wraps ErrNotFound", name, err)
		}
		if err != nil && strings.Contains(err.Error(), srv.SecretKey()) {
			t.Errorf("%s error leaks the secret key: %v", name, err)
		}
	}
	// Not found stays not found, not unavailable.
	srv.Restart(t)
	if _, err := s.Stat(ctx, blobtest.SHA256Hex([]byte("missing"))); !errors.Is(err, storage.ErrNotFound) || errors.Is(err, ErrUnavailable) {
		t.Errorf("Stat of a missing blob = %v, want ErrNotFound only", err)
	}
}

func TestNewErrors(t *testing.T) {
	srv := tests3.Start(t)
	ctx := context.Background()
	base := Config{Endpoint: srv.URL(), Bucket: srv.Bucket(), PathStyle: true,
		AccessKeyID: srv.AccessKey(), SecretAccessKey: srv.SecretKey()}
	tests := []struct {
		name string
		mod  func(*Config)
	}{
		{"NoBucket", func(c *Config) { c.Bucket = "" }},
		{"NoKeys", func(c *Config) { c.AccessKeyID, c.SecretAccessKey = "", "" }},
		{"NoSecret", func(c *Config) { c.SecretAccessKey = "" }},
		{"PartTooSmall", func(c *Config) { c.PartSize = MinPartSize - 1 }},
		{"MissingBucket", func(c *Config) { c.Bucket = "no-such-bucket" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := base
			tt.mod(&cfg)
			s, err := New(ctx, cfg)
			if err == nil {
				s.Close()
				t.Fatal("New succeeded")
			}
			if strings.Contains(err.Error(), srv.SecretKey()) {
				t.Errorf("error leaks the secret key: %v", err)
			}
		})
	}
	t.Run("DefaultCredentialsFromEnv", func(t *testing.T) {
		t.Setenv("AWS_ACCESS_KEY_ID", "env-key")
		t.Setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
		cfg := base
		cfg.AccessKeyID, cfg.SecretAccessKey, cfg.UseDefaultCredentials = "", "", true
		s, err := New(ctx, cfg)
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		s.Close()
	})
}

func TestOpenRangeAndSeek(t *testing.T) {
	s, _ := newTestStore(t, nil)
	defer s.Close()
	ctx := context.Background()
	body := blobtest.RandomBytes(6, 1<<20+333)
	h := blobtest.SHA256Hex(body)
	if _, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1}); err != nil {
		t.Fatalf("Put: %v", err)
	}
	size := int64(len(body))
	for _, rg := range []struct{ off, n int64 }{{0, 1}, {0, size}, {1, 100}, {500_000, 300_000}, {size - 1, 1}, {size - 10, 10}, {7, 0}} {
		rc, err := s.OpenRange(ctx, h, rg.off, rg.n)
		if err != nil {
			t.Fatalf("OpenRange(%d, %d): %v", rg.off, rg.n, err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, body[rg.off:rg.off+rg.n]) {
			t.Errorf("OpenRange(%d, %d) = %d bytes, %v; want the stored bytes", rg.off, rg.n, len(got), err)
		}
	}
	if _, err := s.OpenRange(ctx, blobtest.SHA256Hex([]byte("missing")), 0, 10); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("OpenRange of a missing blob = %v, want ErrNotFound", err)
	}
	if _, err := s.OpenRange(ctx, "nope", 0, 10); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("OpenRange of a malformed hash = %v, want ErrNotFound", err)
	}

	rec := &recorder{}
	s.observer = rec
	blob, err := s.Open(ctx, h)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer blob.Content.Close()
	// Sequential small reads stream one GetObject; a seek starts another.
	p := make([]byte, 1000)
	for i := range 3 {
		if _, err := io.ReadFull(blob.Content, p); err != nil || !bytes.Equal(p, body[i*1000:(i+1)*1000]) {
			t.Fatalf("read %d: %v", i, err)
		}
	}
	if _, err := blob.Content.Seek(900_000, io.SeekStart); err != nil {
		t.Fatalf("Seek: %v", err)
	}
	if _, err := io.ReadFull(blob.Content, p); err != nil || !bytes.Equal(p, body[900_000:901_000]) {
		t.Fatalf("read after seek: %v", err)
	}
	// Seeking to where the reader already is keeps the stream.
	if _, err := blob.Content.Seek(0, io.SeekCurrent); err != nil {
		t.Fatalf("Seek: %v", err)
	}
	if _, err := io.ReadFull(blob.Content, p); err != nil || !bytes.Equal(p, body[901_000:902_000]) {
		t.Fatalf("read after no-op seek: %v", err)
	}
	blob.Content.Close()
	if got := rec.count("GetObject"); got != 2 {
		t.Errorf("GetObject calls = %d, want 2 (one per contiguous run)", got)
	}
	if _, err := blob.Content.Read(p); err == nil {
		t.Error("Read after Close succeeded")
	}
}

func TestPresignGet(t *testing.T) {
	s, _ := newTestStore(t, nil)
	defer s.Close()
	ctx := context.Background()
	body := blobtest.RandomBytes(7, 70_000)
	h := blobtest.SHA256Hex(body)
	if _, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1}); err != nil {
		t.Fatalf("Put: %v", err)
	}
	const disp = `attachment; filename="cat.png"`
	u, err := s.PresignGet(ctx, h, time.Minute, "image/png", disp)
	if err != nil {
		t.Fatalf("PresignGet: %v", err)
	}
	if !strings.Contains(u, "X-Amz-Signature=") {
		t.Errorf("presigned URL %q has no signature", u)
	}
	resp, err := http.Get(u)
	if err != nil {
		t.Fatalf("GET presigned URL: %v", err)
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading presigned response: %v", err)
	}
	if resp.StatusCode != http.StatusOK || !bytes.Equal(got, body) {
		t.Errorf("presigned GET = %d, %d bytes; want 200 and the %d stored bytes", resp.StatusCode, len(got), len(body))
	}
	if ct := resp.Header.Get("Content-Type"); ct != "image/png" {
		t.Errorf("Content-Type = %q, want image/png", ct)
	}
	if cd := resp.Header.Get("Content-Disposition"); cd != disp {
		t.Errorf("Content-Disposition = %q, want %q", cd, disp)
	}
	if _, err := s.PresignGet(ctx, "../x", time.Minute, "", ""); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("PresignGet of a malformed hash = %v, want ErrNotFound", err)
	}
}

// countingWriter records the size of each Write.
type countingWriter struct {
	bytes.Buffer
	writes, largest int
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.writes++
	w.largest = max(w.largest, len(p))
	return w.Buffer.Write(p)
}

func TestWriterTo(t *testing.T) {
	s, _ := newTestStore(t, nil)
	defer s.Close()
	ctx := context.Background()
	body := blobtest.RandomBytes(8, 3<<20+5)
	h := blobtest.SHA256Hex(body)
	if _, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: -1}); err != nil {
		t.Fatalf("Put: %v", err)
	}
	blob, err := s.Open(ctx, h)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer blob.Content.Close()
	if _, ok := blob.Content.(io.WriterTo); !ok {
		t.Fatal("Blob.Content does not implement io.WriterTo")
	}
	if _, err := blob.Content.Seek(5, io.SeekStart); err != nil {
		t.Fatalf("Seek: %v", err)
	}
	var w countingWriter
	n, err := io.Copy(&w, blob.Content)
	if err != nil || n != int64(len(body)-5) || !bytes.Equal(w.Bytes(), body[5:]) {
		t.Fatalf("io.Copy = %d, %v; want %d stored bytes", n, err, len(body)-5)
	}
	if w.largest <= 32<<10 {
		t.Errorf("largest write %d bytes: io.Copy used its 32 KiB buffer, not WriteTo's", w.largest)
	}
	if w.largest > chunkSize {
		t.Errorf("largest write %d bytes, over the %d buffer", w.largest, chunkSize)
	}
}

// TestCandidateNoWrite checks that an identical body given with its
// candidate reads the candidate and writes nothing, and that a body diverging
// from it is stored from the candidate's prefix plus the rest.
func TestCandidateNoWrite(t *testing.T) {
	rec := &recorder{}
	s, srv := newTestStore(t, func(c *Config) { c.PartSize = testPartSize; c.Observer = rec })
	defer s.Close()
	ctx := context.Background()
	base := blobtest.RandomBytes(9, 2*testPartSize+12345)
	cand, err := s.Put(ctx, bytes.NewReader(base), storage.PutOptions{ExpectedSize: -1})
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	writes := func() int {
		return rec.count("PutObject") + rec.count("UploadPart") + rec.count("CreateMultipartUpload")
	}
	before := writes()
	res, err := s.Put(ctx, bytes.NewReader(base), storage.PutOptions{ExpectedSize: int64(len(base)), Candidate: cand.SHA256})
	if err != nil || !res.Existed {
		t.Fatalf("Put of the candidate's bytes = %+v, %v; want Existed", res, err)
	}
	if w := writes() - before; w != 0 {
		t.Errorf("Put of the candidate's bytes made %d write requests, want 0", w)
	}

	other := bytes.Clone(base)
	other[len(other)-3] ^= 1
	res, err = s.Put(ctx, bytes.NewReader(other), storage.PutOptions{ExpectedSize: int64(len(other)), Candidate: cand.SHA256})
	if err != nil || res.Existed || res.SHA256 != blobtest.SHA256Hex(other) {
		t.Fatalf("Put of a diverging body = %+v, %v", res, err)
	}
	blob, err := s.Open(ctx, res.SHA256)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	got, err := io.ReadAll(blob.Content)
	blob.Content.Close()
	if err != nil || !bytes.Equal(got, other) {
		t.Errorf("diverging body read back as %d bytes, %v", len(got), err)
	}
	checkNoLeftovers(t, s, srv, "")
}

// TestBufferBudget runs more concurrent multipart uploads than the buffer
// budget holds parts: they all complete (an upload waits for budget only
// while holding none), small uploads take only their own size, and a Put
// waiting for budget stops when its context is cancelled.
func TestBufferBudget(t *testing.T) {
	s, srv := newTestStore(t, func(c *Config) {
		c.PartSize = MinPartSize
		c.MaxBufferBytes = MinPartSize + 1<<20
	})
	ctx := context.Background()
	const n = 4
	bodies := make([][]byte, n)
	errs := make(chan error, n+8)
	var wg sync.WaitGroup
	for i := range n {
		bodies[i] = blobtest.RandomBytes(uint64(100+i), 2*MinPartSize+12345)
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := s.Put(ctx, bytes.NewReader(bodies[i]), storage.PutOptions{ExpectedSize: -1})
			if err == nil && res.SHA256 != blobtest.SHA256Hex(bodies[i]) {
				err = fmt.Errorf("upload %d stored as %s", i, res.SHA256)
			}
			errs <- err
		}()
	}
	// Small uploads of known length fit in the 1 MiB left over.
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := blobtest.RandomBytes(uint64(200+i), 100<<10)
			_, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range bodies {
		blob, err := s.Open(ctx, blobtest.SHA256Hex(b))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(blob.Content)
		blob.Content.Close()
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("read back: %v", err)
		}
	}
	checkNoLeftovers(t, s, srv, "")

	// Hold the whole budget: a Put of unknown length waits, and gives up
	// with its context.
	if err := s.budget.Acquire(ctx, s.partSize+1<<20); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	_, err := s.Put(cctx, bytes.NewReader(blobtest.RandomBytes(7, 1000)), storage.PutOptions{ExpectedSize: -1})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Put without budget: %v, want the context's deadline", err)
	}
	s.budget.Release(s.partSize + 1<<20)
}
