package mediaapi

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
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
