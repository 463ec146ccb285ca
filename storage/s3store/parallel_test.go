package s3store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/tests3"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/blobtest"
)

// testRangePart is the part size of the parallel read tests.
const testRangePart = MinParallelPartSize

// Fault modes of faultProxy.
const (
	faultNone = iota
	// faultStatus answers 500 to every attempt.
	faultStatus
	// faultTruncate sends the headers and half the body, then drops the
	// connection.
	faultTruncate
	// faultStall sends the headers and nothing more until the client goes.
	faultStall
)

// faultProxy forwards to a fake S3 server and injects a fault into the
// GETs whose Range starts at a given offset.
type faultProxy struct {
	mode atomic.Int32
	at   atomic.Int64
	// hits counts faulty responses; active those still being answered.
	hits, active atomic.Int64
}

func (p *faultProxy) start(t *testing.T, target string) string {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mode := p.mode.Load()
		if r.Method != http.MethodGet || mode == faultNone ||
			!strings.HasPrefix(r.Header.Get("Range"), fmt.Sprintf("bytes=%d-", p.at.Load())) {
			rp.ServeHTTP(w, r)
			return
		}
		p.hits.Add(1)
		p.active.Add(1)
		defer p.active.Add(-1)
		switch mode {
		case faultStatus:
			w.WriteHeader(http.StatusInternalServerError)
			_, _ = io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code><Message>injected</Message></Error>`)
		case faultTruncate:
			body := proxyHead(rp, w, r)
			_, _ = w.Write(body[:len(body)/2])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		case faultStall:
			proxyHead(rp, w, r)
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// newParallelStore opens a store with 1 MiB parallel parts, 4 in flight,
// behind a fault proxy.
func newParallelStore(t *testing.T, mod func(*Config)) (*Store, *faultProxy) {
	t.Helper()
	fake := tests3.Start(t)
	proxy := &faultProxy{}
	cfg := Config{
		Endpoint: proxy.start(t, fake.URL()), Bucket: fake.Bucket(), PathStyle: true,
		AccessKeyID: fake.AccessKey(), SecretAccessKey: fake.SecretKey(),
		RetryMaxBackoff: 10 * time.Millisecond, ParallelPartSize: testRangePart,
	}
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s, proxy
}

// putBody stores body and returns its hash.
func putBody(t *testing.T, s *Store, body []byte) string {
	t.Helper()
	res, err := s.Put(context.Background(), bytes.NewReader(body), storage.PutOptions{ExpectedSize: int64(len(body))})
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	return res.SHA256
}

// checkBudgetWhole fails unless no read holds part buffers and the whole
// budget is free.
func checkBudgetWhole(t *testing.T, s *Store, total int64) {
	t.Helper()
	if held := s.rangeHeld.Load(); held != 0 {
		t.Errorf("reads still hold %d bytes of budget", held)
	}
	if !s.budget.TryAcquire(total) {
		t.Errorf("budget of %d bytes is not whole", total)
		return
	}
	s.budget.Release(total)
}

// oddReader reads from r with buffers of cycling odd sizes, so that reads
// end anywhere relative to the part boundaries.
func readOdd(r io.Reader) ([]byte, error) {
	var out bytes.Buffer
	sizes := []int{1, 777, 4096, 65537, 300_001, 12345}
	buf := make([]byte, 300_001)
	for i := 0; ; i++ {
		n, err := r.Read(buf[:sizes[i%len(sizes)]])
		out.Write(buf[:n])
		if err == io.EOF {
			return out.Bytes(), nil
		}
		if err != nil {
			return out.Bytes(), err
		}
	}
}

// Parallel reads return exactly the requested bytes in order, for ranges of
// many parts with odd sizes and offsets, with one GetObject per part, and
// leave the budget whole; ranges of at most one part take one GetObject.
func TestParallelRangesExact(t *testing.T) {
	rec := &recorder{}
	s, _ := newParallelStore(t, func(c *Config) { c.Observer = rec })
	const ps = testRangePart
	body := blobtest.RandomBytes(41, 7*ps+12345)
	h := putBody(t, s, body)
	size := int64(len(body))
	for _, tc := range []struct {
		off, n int64
	}{
		{0, size},
		{1, size - 1},
		{ps - 1, 3*ps + 2},
		{size - ps - 1, ps + 1},
		{3 * ps, 2 * ps},
		{5, ps},          // one part: a single GetObject
		{ps + 3, 99_999}, // small
	} {
		t.Run(fmt.Sprintf("%d+%d", tc.off, tc.n), func(t *testing.T) {
			before := rec.count("GetObject")
			rc, err := s.OpenRange(context.Background(), h, tc.off, tc.n)
			if err != nil {
				t.Fatalf("OpenRange: %v", err)
			}
			got, err := readOdd(rc)
			rc.Close()
			if err != nil || !bytes.Equal(got, body[tc.off:tc.off+tc.n]) {
				t.Fatalf("read %d bytes, %v; want the %d stored bytes", len(got), err, tc.n)
			}
			wantGets := int((tc.n + ps - 1) / ps)
			if got := rec.count("GetObject") - before; got != wantGets {
				t.Errorf("GetObject calls = %d, want %d (one per part)", got, wantGets)
			}
			checkBudgetWhole(t, s, 6*DefaultPartSize)
		})
	}
}

// With parallel reads off, a large range is one GetObject.
func TestParallelOff(t *testing.T) {
	rec := &recorder{}
	s, _ := newParallelStore(t, func(c *Config) { c.Observer = rec; c.ParallelParts = 1 })
	body := blobtest.RandomBytes(42, 3*testRangePart+5)
	h := putBody(t, s, body)
	rc, err := s.OpenRange(context.Background(), h, 0, int64(len(body)))
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, %v", len(got), err)
	}
	if n := rec.count("GetObject"); n != 1 {
		t.Errorf("GetObject calls = %d, want 1", n)
	}
}

// A read that finds the budget short fetches fewer parts ahead, down to a
// single GetObject for the whole range, and still returns the right bytes;
// it never waits for budget.
func TestParallelBudgetShort(t *testing.T) {
	rec := &recorder{}
	s, _ := newParallelStore(t, func(c *Config) { c.Observer = rec })
	total := int64(6 * DefaultPartSize)
	body := blobtest.RandomBytes(43, 6*testRangePart+777)
	h := putBody(t, s, body)
	for _, tc := range []struct {
		name     string
		free     int64
		wantGets int
	}{
		{"no buffer", 0, 1},
		{"one buffer", testRangePart, 7},
		{"one buffer and a bit", testRangePart + testRangePart/2, 7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := s.budget.Acquire(context.Background(), total-tc.free); err != nil {
				t.Fatal(err)
			}
			before := rec.count("GetObject")
			rc, err := s.OpenRange(context.Background(), h, 0, int64(len(body)))
			if err != nil {
				t.Fatal(err)
			}
			got, err := readOdd(rc)
			rc.Close()
			s.budget.Release(total - tc.free)
			if err != nil || !bytes.Equal(got, body) {
				t.Fatalf("read %d bytes, %v", len(got), err)
			}
			if n := rec.count("GetObject") - before; n != tc.wantGets {
				t.Errorf("GetObject calls = %d, want %d", n, tc.wantGets)
			}
			checkBudgetWhole(t, s, total)
		})
	}
	// Reads together hold at most half the budget: with a small budget,
	// a read gets fewer buffers than ParallelParts-1.
	s2, _ := newParallelStore(t, func(c *Config) {
		c.PartSize = MinPartSize
		c.MaxBufferBytes = MinPartSize
		c.ParallelParts = 8
	})
	h2 := putBody(t, s2, body)
	rc, err := s2.OpenRange(context.Background(), h2, 0, int64(len(body)))
	if err != nil {
		t.Fatal(err)
	}
	if held, max := s2.rangeHeld.Load(), int64(MinPartSize/2); held > max {
		t.Errorf("read holds %d bytes, over half the budget (%d)", held, max)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, %v", len(got), err)
	}
	checkBudgetWhole(t, s2, MinPartSize)
}

// A part that fails (after the SDK's retries, or mid-body) fails the read:
// the bytes before it are returned, then an error wrapping ErrUnavailable,
// never io.EOF; the budget is whole after Close.
func TestParallelPartFailureCutsRead(t *testing.T) {
	const ps = testRangePart
	for _, tc := range []struct {
		name string
		mode int32
		at   int64
	}{
		{"500 on a part read ahead", faultStatus, 3 * ps},
		{"truncated part read ahead", faultTruncate, 2 * ps},
		{"truncated last part", faultTruncate, 6 * ps},
		{"500 on a later head", faultStatus, 4 * ps},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, proxy := newParallelStore(t, nil)
			body := blobtest.RandomBytes(44, 6*ps+4321)
			h := putBody(t, s, body)
			proxy.at.Store(tc.at)
			proxy.mode.Store(tc.mode)
			rc, err := s.OpenRange(context.Background(), h, 0, int64(len(body)))
			if err != nil {
				t.Fatal(err)
			}
			got, err := readOdd(rc)
			if !errors.Is(err, storage.ErrUnavailable) {
				t.Errorf("read %d bytes, error %v; want an error wrapping ErrUnavailable", len(got), err)
			}
			// A part is read as it arrives: a truncated one gives what came.
			limit := tc.at
			if tc.mode == faultTruncate {
				limit += min(ps, int64(len(body))-tc.at) / 2
			}
			if int64(len(got)) > limit || !bytes.Equal(got, body[:len(got)]) {
				t.Errorf("read %d bytes before the error, want at most the %d sent, all correct", len(got), limit)
			}
			if _, err2 := rc.Read(make([]byte, 10)); err2 == nil || err2 == io.EOF {
				t.Errorf("Read after the failure = %v, want the error again", err2)
			}
			rc.Close()
			if proxy.hits.Load() == 0 {
				t.Error("the fault was never injected")
			}
			checkBudgetWhole(t, s, 6*DefaultPartSize)
		})
	}
}

// A streamed part (opened ahead, read straight from its body) that breaks
// off is opened once more from the byte reached, so the read still returns
// the right bytes.
func TestParallelStreamedPartReopened(t *testing.T) {
	const ps = testRangePart
	rec := &recorder{}
	s, proxy := newParallelStore(t, func(c *Config) { c.Observer = rec })
	body := blobtest.RandomBytes(47, 6*ps+99)
	h := putBody(t, s, body)
	// With 4 parts in flight the queue is S0 B1 B2 B3, then S4 joins when
	// S0 is done: part 4 is streamed.
	proxy.at.Store(4 * ps)
	proxy.mode.Store(faultTruncate)
	rc, err := s.OpenRange(context.Background(), h, 0, int64(len(body)))
	if err != nil {
		t.Fatal(err)
	}
	got, err := readOdd(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, %v; want all %d", len(got), err, len(body))
	}
	if proxy.hits.Load() != 1 {
		t.Errorf("fault injected %d times, want 1", proxy.hits.Load())
	}
	if n := rec.count("GetObject"); n != 8 {
		t.Errorf("GetObject calls = %d, want 8 (7 parts, one reopened)", n)
	}
	checkBudgetWhole(t, s, 6*DefaultPartSize)
}

// A reader whose context ends, or that is closed while a Read waits for a
// stalled part, stops every GetObject and gives its buffers back.
func TestParallelCancelReleases(t *testing.T) {
	const ps = testRangePart
	for _, viaClose := range []bool{false, true} {
		t.Run(fmt.Sprintf("close=%v", viaClose), func(t *testing.T) {
			s, proxy := newParallelStore(t, nil)
			body := blobtest.RandomBytes(45, 8*ps+1)
			h := putBody(t, s, body)
			proxy.at.Store(ps)
			proxy.mode.Store(faultStall)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			rc, err := s.OpenRange(ctx, h, 0, int64(len(body)))
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			var n int64
			go func() {
				var err error
				n, err = io.Copy(io.Discard, rc)
				done <- err
			}()
			// Wait until the stalled part is being answered, then end the
			// reader while Read waits for it.
			waitFor(t, "the stalled part", func() bool { return proxy.active.Load() > 0 })
			if viaClose {
				rc.Close()
			} else {
				cancel()
			}
			err = <-done
			if err == nil || n > ps {
				t.Errorf("copy = %d bytes, %v; want at most the first part, then an error", n, err)
			}
			rc.Close()
			checkBudgetWhole(t, s, 6*DefaultPartSize)
			waitFor(t, "the stalled GetObject to be dropped", func() bool { return proxy.active.Load() == 0 })
		})
	}
}

// Closing a reader at any moment while another goroutine reads it ends the
// read and leaves the budget whole (run with -race).
func TestParallelCloseDuringReads(t *testing.T) {
	s, _ := newParallelStore(t, nil)
	body := blobtest.RandomBytes(46, 5*testRangePart+3)
	h := putBody(t, s, body)
	var wg sync.WaitGroup
	for i := range 8 {
		rc, err := s.OpenRange(context.Background(), h, int64(i), int64(len(body)-i))
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := readOdd(rc)
			if err == nil && !bytes.Equal(got, body[i:]) {
				t.Errorf("reader %d: wrong bytes", i)
			}
			if err != nil && !bytes.Equal(got, body[i:i+len(got)]) {
				t.Errorf("reader %d: wrong bytes before the close", i)
			}
		}()
		time.Sleep(time.Duration(i) * 3 * time.Millisecond)
		rc.Close()
	}
	wg.Wait()
	checkBudgetWhole(t, s, 6*DefaultPartSize)
}

// waitFor polls cond for up to 10 seconds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A missing blob is reported by OpenRange, not by the first Read, and
// holds no budget.
func TestParallelMissing(t *testing.T) {
	s, _ := newParallelStore(t, nil)
	_, err := s.OpenRange(context.Background(), blobtest.SHA256Hex([]byte("missing")), 0, 5*testRangePart)
	if !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("OpenRange of a missing blob = %v, want ErrNotFound", err)
	}
	checkBudgetWhole(t, s, 6*DefaultPartSize)
}
