package exactio

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"
)

var errClass = errors.New("class")

func TestReader(t *testing.T) {
	for _, tc := range []struct {
		name      string
		src       string
		n         int64
		want      string
		wantErr   bool
		unexpEOF  bool
		oneByteRd bool
	}{
		{name: "exact", src: "hello", n: 5, want: "hello"},
		{name: "exact, one byte a read", src: "hello", n: 5, want: "hello", oneByteRd: true},
		{name: "empty", src: "", n: 0, want: ""},
		{name: "short", src: "hel", n: 5, want: "hel", wantErr: true, unexpEOF: true},
		{name: "short, one byte a read", src: "hel", n: 5, want: "hel", wantErr: true, unexpEOF: true, oneByteRd: true},
		{name: "long", src: "hello!", n: 5, want: "hello", wantErr: true},
		{name: "long by one, one byte a read", src: "hello!", n: 5, want: "hello", wantErr: true, oneByteRd: true},
		{name: "zero announced, one sent", src: "x", n: 0, want: "", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var src io.Reader = bytes.NewReader([]byte(tc.src))
			if tc.oneByteRd {
				src = iotest.OneByteReader(src)
			}
			got, err := io.ReadAll(NewReader(src, tc.n, "test stream", errClass))
			if string(got) != tc.want {
				t.Errorf("read %q, want %q", got, tc.want)
			}
			if (err != nil) != tc.wantErr {
				t.Fatalf("error %v, want error %v", err, tc.wantErr)
			}
			if err != nil && !errors.Is(err, errClass) {
				t.Errorf("error %v does not wrap the class", err)
			}
			if got := errors.Is(err, io.ErrUnexpectedEOF); got != tc.unexpEOF {
				t.Errorf("error %v: wraps io.ErrUnexpectedEOF = %v, want %v", err, got, tc.unexpEOF)
			}
		})
	}
}

func TestReaderPassesSourceErrors(t *testing.T) {
	boom := errors.New("boom")
	_, err := io.ReadAll(NewReader(iotest.ErrReader(boom), 4, "x", errClass))
	if !errors.Is(err, boom) {
		t.Fatalf("error %v, want the source's", err)
	}
}
