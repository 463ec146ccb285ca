package mediaapi

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

// limitingWriter mimics Caddy's write_idle writer: its ReadFrom wraps the
// source in a LimitReader, so the kernel's sendfile only sees an *os.File
// when the source it is handed is the bare file.
type limitingWriter struct {
	*httptest.ResponseRecorder
	sources []string
}

func (w *limitingWriter) ReadFrom(r io.Reader) (int64, error) {
	switch src := r.(type) {
	case *os.File:
		w.sources = append(w.sources, "file")
	case *io.LimitedReader:
		if _, ok := src.R.(*os.File); ok {
			w.sources = append(w.sources, "limited-file")
		} else {
			w.sources = append(w.sources, "nested")
		}
	default:
		w.sources = append(w.sources, "other")
	}
	return io.Copy(w.ResponseRecorder, io.LimitReader(struct{ io.Reader }{r}, 1<<40))
}

func TestCopyBodyKeepsBareFileForSendfile(t *testing.T) {
	content := bytes.Repeat([]byte("0123456789"), 1000)
	path := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	for i, tc := range []struct {
		start, length int64
		wantSource    string
	}{
		{0, int64(len(content)), "file"},           // whole download
		{9000, int64(len(content)) - 9000, "file"}, // open-ended range
		{10, 20, "limited-file"},                   // range inside the file
	} {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Seek(tc.start, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		w := &limitingWriter{ResponseRecorder: httptest.NewRecorder()}
		n, err := copyBody(w, f, tc.start+tc.length == int64(len(content)), tc.length, &sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }})
		f.Close()
		if err != nil || n != tc.length {
			t.Fatalf("Test %d: copyBody = %d, %v; want %d", i, n, err, tc.length)
		}
		if len(w.sources) != 1 || w.sources[0] != tc.wantSource {
			t.Errorf("Test %d: ReadFrom got %v, want [%s]", i, w.sources, tc.wantSource)
		}
		if got := w.Body.Bytes(); !bytes.Equal(got, content[tc.start:tc.start+tc.length]) {
			t.Errorf("Test %d: body differs (%d bytes)", i, len(got))
		}
	}
	var _ http.ResponseWriter = (*limitingWriter)(nil)
}

// chunkyReader returns data in small reads, optionally failing at the end.
type chunkyReader struct {
	data   []byte
	err    error
	closed atomic.Bool
}

func (c *chunkyReader) Read(p []byte) (int, error) {
	if c.closed.Load() {
		return 0, errors.New("read on closed source")
	}
	if len(c.data) == 0 {
		if c.err != nil {
			return 0, c.err
		}
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), 7000)], c.data)
	c.data = c.data[n:]
	return n, nil
}

// failingWriter accepts limit bytes, then fails.
type failingWriter struct {
	buf   bytes.Buffer
	limit int
}

func (f *failingWriter) Write(p []byte) (int, error) {
	if f.buf.Len()+len(p) > f.limit {
		return 0, errors.New("client went away")
	}
	return f.buf.Write(p)
}

func TestPipelinedCopy(t *testing.T) {
	pool := &sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}
	// More data than the pipeline's buffers hold: buffers must cycle.
	data := bytes.Repeat([]byte("0123456789abcdef"), 3*pipelineDepth*copyBufSize/16+777)
	t.Run("whole", func(t *testing.T) {
		var out bytes.Buffer
		n, err := pipelinedCopy(&out, &chunkyReader{data: data}, func() {}, pool)
		if err != nil || n != int64(len(data)) || !bytes.Equal(out.Bytes(), data) {
			t.Fatalf("n=%d err=%v equal=%v", n, err, bytes.Equal(out.Bytes(), data))
		}
	})
	t.Run("read error", func(t *testing.T) {
		var out bytes.Buffer
		_, err := pipelinedCopy(&out, &chunkyReader{data: data[:1000], err: errors.New("s3 reset")}, func() {}, pool)
		if err == nil || err.Error() != "s3 reset" || out.Len() != 1000 {
			t.Fatalf("err=%v wrote %d", err, out.Len())
		}
	})
	t.Run("write error closes the source", func(t *testing.T) {
		src := &chunkyReader{data: data}
		w := &failingWriter{limit: copyBufSize + 10}
		n, err := pipelinedCopy(w, src, func() { src.closed.Store(true) }, pool)
		if err == nil || n != copyBufSize || !src.closed.Load() {
			t.Fatalf("n=%d err=%v closed=%v", n, err, src.closed.Load())
		}
	})
}
