package federation

import (
	"bytes"
	"cmp"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
)

const testCT = "multipart/mixed; boundary=gc0p4Jq0M2Yt08jU534c0p"

// crlf converts LF line endings to CRLF.
func crlf(s string) string { return strings.ReplaceAll(s, "\n", "\r\n") }

func TestReadMediaResponse(t *testing.T) {
	lfBody := "--gc0p4Jq0M2Yt08jU534c0p\n" +
		"Content-Type: application/json\n\n" +
		"{}\n" +
		"--gc0p4Jq0M2Yt08jU534c0p\n" +
		"Content-Type: text/plain\n" +
		"Content-Disposition: inline; filename=test_upload\n\n" +
		"file_to_stream\n" +
		"--gc0p4Jq0M2Yt08jU534c0p--\n"
	tests := []struct {
		name     string
		ct       string
		body     string
		max      int64
		wantErr  error // checked on ReadMediaResponse
		wantMeta string
		wantCT   string
		wantCD   string
		wantLoc  string
		wantBody string
		wantSize int64 // 0 means -1 (none announced) unless wantZero
		wantZero bool  // the part announced Content-Length 0
		bodyErr  error // checked on reading Body
	}{
		{
			name: "synapse CRLF with leading CRLF preamble",
			ct:   "multipart/mixed; boundary=6067d4698f8d40a0a794ea7d7379d53a",
			body: "\r\n--6067d4698f8d40a0a794ea7d7379d53a\r\n" +
				"Content-Type: application/json\r\n\r\n{}\r\n" +
				"--6067d4698f8d40a0a794ea7d7379d53a\r\n" +
				"Content-Type: text/plain\r\n" +
				"Content-Disposition: inline; filename=test_upload\r\n\r\n" +
				"file_to_stream\r\n" +
				"--6067d4698f8d40a0a794ea7d7379d53a--\r\n",
			max: 100, wantMeta: "{}", wantCT: "text/plain", wantCD: "inline; filename=test_upload", wantBody: "file_to_stream",
		},
		{
			name: "LF only",
			ct:   testCT, body: lfBody, max: 100,
			wantMeta: "{}", wantCT: "text/plain", wantCD: "inline; filename=test_upload", wantBody: "file_to_stream",
		},
		{
			name: "CRLF version of the LF body",
			ct:   testCT, body: crlf(lfBody), max: 100,
			wantMeta: "{}", wantCT: "text/plain", wantCD: "inline; filename=test_upload", wantBody: "file_to_stream",
		},
		{
			name: "no closing delimiter: truncated, the body fails at EOF",
			ct:   testCT,
			body: crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: image/png\n\n") + "PNGDATA",
			max:  100, wantMeta: "{}", wantCT: "image/png", wantBody: "PNGDATA", bodyErr: ErrMalformed,
		},
		{
			name: "cut inside the closing delimiter",
			ct:   testCT,
			body: crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: image/png\n\n") + "PNGDATA\r\n--gc0p4J",
			max:  100, wantMeta: "{}", wantCT: "image/png", wantBody: "PNGDATA\r\n--gc0p4J", bodyErr: ErrMalformed,
		},
		{
			name: "media part with its Content-Length",
			ct:   testCT, body: strings.Replace(lfBody, "Content-Type: text/plain\n", "Content-Type: text/plain\nContent-Length: 14\n", 1),
			max: 100, wantMeta: "{}", wantCT: "text/plain", wantCD: "inline; filename=test_upload", wantBody: "file_to_stream", wantSize: 14,
		},
		{
			name: "media part Content-Length over the limit: refused before reading",
			ct:   testCT, body: strings.Replace(lfBody, "Content-Type: text/plain\n", "Content-Type: text/plain\nContent-Length: 14\n", 1),
			max: 13, wantErr: ErrTooLarge,
		},
		{
			name: "media part longer than its Content-Length",
			ct:   testCT, body: strings.Replace(lfBody, "Content-Type: text/plain\n", "Content-Type: text/plain\nContent-Length: 4\n", 1),
			max: 100, wantMeta: "{}", wantCT: "text/plain", wantCD: "inline; filename=test_upload", wantBody: "file", wantSize: 4, bodyErr: ErrMalformed,
		},
		{
			// The announced length is the part: its 40 bytes are passed on
			// (the delimiter among them is not looked for), then the
			// delimiter is missing.
			name: "media part shorter than its Content-Length",
			ct:   testCT, body: strings.Replace(lfBody, "Content-Type: text/plain\n", "Content-Type: text/plain\nContent-Length: 40\n", 1),
			max: 100, wantMeta: "{}", wantCT: "text/plain", wantCD: "inline; filename=test_upload", wantBody: "file_to_stream\n--gc0p4Jq0M2Yt08jU534c0p-", wantSize: 40, bodyErr: ErrMalformed,
		},
		{
			name: "media part cut within its Content-Length",
			ct:   testCT, body: crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: image/png\nContent-Length: 20\n\n") + "PNGDATA",
			max: 100, wantMeta: "{}", wantCT: "image/png", wantBody: "PNGDATA", wantSize: 20, bodyErr: ErrMalformed,
		},
		{
			name: "media part of its Content-Length without a delimiter after it",
			ct:   testCT, body: crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: image/png\nContent-Length: 7\n\n") + "PNGDATA",
			max: 100, wantMeta: "{}", wantCT: "image/png", wantBody: "PNGDATA", wantSize: 7, bodyErr: ErrMalformed,
		},
		{
			name: "media part of its Content-Length cut inside the closing delimiter",
			ct:   testCT, body: crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: image/png\nContent-Length: 7\n\n") + "PNGDATA\r\n--gc0p4J",
			max: 100, wantMeta: "{}", wantCT: "image/png", wantBody: "PNGDATA", wantSize: 7, bodyErr: ErrMalformed,
		},
		{
			name: "media part of its Content-Length holding near-delimiters, CRLF",
			ct:   testCT, body: crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: image/png\nContent-Length: 31\n\n") + "a\r\n--gc0p4Jq0M2Yt08jU534c0pX\r\nb" + "\r\n--gc0p4Jq0M2Yt08jU534c0p--\r\n",
			max: 100, wantMeta: "{}", wantCT: "image/png", wantBody: "a\r\n--gc0p4Jq0M2Yt08jU534c0pX\r\nb", wantSize: 31,
		},
		{
			name: "empty media part with Content-Length 0, delimiter right after the headers",
			ct:   testCT, body: "--gc0p4Jq0M2Yt08jU534c0p\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Length: 0\n\n--gc0p4Jq0M2Yt08jU534c0p--\n",
			max: 100, wantMeta: "{}", wantBody: "", wantZero: true,
		},
		{
			name: "media part with Content-Length 0 followed by bytes",
			ct:   testCT, body: "--gc0p4Jq0M2Yt08jU534c0p\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Length: 0\n\nx\n--gc0p4Jq0M2Yt08jU534c0p--\n",
			max: 100, wantMeta: "{}", wantBody: "", wantZero: true, bodyErr: ErrMalformed,
		},
		{
			name: "invalid media part Content-Length",
			ct:   testCT, body: strings.Replace(lfBody, "Content-Type: text/plain\n", "Content-Type: text/plain\nContent-Length: -1\n", 1),
			max: 100, wantErr: ErrMalformed,
		},
		{
			name: "preamble, transport padding, quoted boundary param, body containing near-delimiters",
			ct:   `multipart/mixed; boundary="gc0p4Jq0M2Yt08jU534c0p"`,
			body: "This is a preamble.\r\n--gc0p4Jq0M2Yt08jU534c0p \t\r\n" +
				"content-type: application/json; charset=utf-8\r\n\r\n{\"a\":1}\r\n" +
				"--gc0p4Jq0M2Yt08jU534c0p  \r\n" +
				"Content-Type: application/octet-stream\r\n\r\n" +
				"line1\r\n--gc0p4Jq0M2Yt08jU534c0pX\r\n-gc0p4Jq0M2Yt08jU534c0p\r\nend" +
				"\r\n--gc0p4Jq0M2Yt08jU534c0p--  \r\nepilogue",
			max: 1000, wantMeta: `{"a":1}`, wantCT: "application/octet-stream",
			wantBody: "line1\r\n--gc0p4Jq0M2Yt08jU534c0pX\r\n-gc0p4Jq0M2Yt08jU534c0p\r\nend",
		},
		{
			name: "Location part with MMR-style malformed closing delimiter",
			ct:   testCT,
			body: "--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n" +
				"--gc0p4Jq0M2Yt08jU534c0p\nLocation: https://cdn.example.org/ab/c1/2345.txt\n\n" +
				"-gc0p4Jq0M2Yt08jU534c0p\n",
			max: 0, wantMeta: "{}", wantLoc: "https://cdn.example.org/ab/c1/2345.txt",
		},
		{
			name: "empty media body",
			ct:   testCT,
			body: crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: text/plain\n\n\n--gc0p4Jq0M2Yt08jU534c0p--\n"),
			max:  0, wantMeta: "{}", wantCT: "text/plain", wantBody: "",
		},
		{
			name: "body exactly at the limit",
			ct:   testCT, body: lfBody, max: int64(len("file_to_stream")),
			wantMeta: "{}", wantCT: "text/plain", wantCD: "inline; filename=test_upload", wantBody: "file_to_stream",
		},
		{
			name: "oversized body",
			ct:   testCT, body: lfBody, max: 5,
			wantMeta: "{}", wantCT: "text/plain", wantCD: "inline; filename=test_upload", wantBody: "file_", bodyErr: ErrTooLarge,
		},
		{name: "not multipart", ct: "application/json", body: "{}", max: 10, wantErr: ErrMalformed},
		{name: "no boundary", ct: "multipart/mixed", body: lfBody, max: 10, wantErr: ErrMalformed},
		{name: "unparsable content type", ct: "multipart/mixed; boundary", body: lfBody, max: 10, wantErr: ErrMalformed},
		{name: "no delimiter at all", ct: testCT, body: "just some text\n", max: 10, wantErr: ErrMalformed},
		{name: "empty body", ct: testCT, body: "", max: 10, wantErr: ErrMalformed},
		{
			name: "only a metadata part",
			ct:   testCT, body: crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p--\n"),
			max: 10, wantErr: ErrMalformed,
		},
		{
			name: "truncated metadata part",
			ct:   testCT, body: crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}"),
			max: 10, wantErr: ErrMalformed,
		},
		{
			name: "metadata not JSON",
			ct:   testCT, body: strings.Replace(lfBody, "{}", "nope", 1),
			max: 10, wantErr: ErrMalformed,
		},
		{
			name: "metadata wrong content type",
			ct:   testCT, body: strings.Replace(lfBody, "application/json", "text/html", 1),
			max: 10, wantErr: ErrMalformed,
		},
		{
			name: "garbage header line",
			ct:   testCT, body: strings.Replace(lfBody, "Content-Type: text/plain", "garbage", 1),
			max: 10, wantErr: ErrMalformed,
		},
		{
			name: "relative Location",
			ct:   testCT, body: "--gc0p4Jq0M2Yt08jU534c0p\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nLocation: /local\n\n",
			max: 10, wantErr: ErrMalformed,
		},
		{
			name: "javascript Location",
			ct:   testCT, body: "--gc0p4Jq0M2Yt08jU534c0p\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nLocation: javascript:alert(1)\n\n",
			max: 10, wantErr: ErrMalformed,
		},
	}
	for _, tc := range tests {
		for _, mode := range []string{"whole", "onebyte"} {
			t.Run(tc.name+"/"+mode, func(t *testing.T) {
				var r io.Reader = strings.NewReader(tc.body)
				if mode == "onebyte" {
					r = iotest.OneByteReader(r)
				}
				mp, err := ReadMediaResponse(tc.ct, r, tc.max)
				if tc.wantErr != nil {
					if !errors.Is(err, tc.wantErr) {
						t.Fatalf("err = %v, want %v", err, tc.wantErr)
					}
					return
				}
				if err != nil {
					t.Fatalf("ReadMediaResponse: %v", err)
				}
				if string(mp.Metadata) != tc.wantMeta {
					t.Errorf("metadata = %q, want %q", mp.Metadata, tc.wantMeta)
				}
				if mp.ContentType != tc.wantCT || mp.ContentDisposition != tc.wantCD || mp.Location != tc.wantLoc {
					t.Errorf("headers = %q %q %q, want %q %q %q", mp.ContentType, mp.ContentDisposition, mp.Location, tc.wantCT, tc.wantCD, tc.wantLoc)
				}
				want := cmp.Or(tc.wantSize, -1)
				if tc.wantZero {
					want = 0
				}
				if mp.Size != want {
					t.Errorf("size = %d, want %d", mp.Size, want)
				}
				if tc.wantLoc != "" {
					if mp.Body != nil {
						t.Errorf("Body set for a Location part")
					}
					return
				}
				got, err := io.ReadAll(mp.Body)
				if tc.bodyErr != nil {
					if !errors.Is(err, tc.bodyErr) {
						t.Errorf("body err = %v, want %v", err, tc.bodyErr)
					}
				} else if err != nil {
					t.Errorf("reading body: %v", err)
				}
				if string(got) != tc.wantBody {
					t.Errorf("body = %q, want %q", got, tc.wantBody)
				}
			})
		}
	}
}

// TestReadMediaResponseStreams checks that the media part is not buffered:
// the body is returned before the (endless) remainder is read.
func TestReadMediaResponseStreams(t *testing.T) {
	head := crlf("--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/json\n\n{}\n--gc0p4Jq0M2Yt08jU534c0p\nContent-Type: application/octet-stream\n\n")
	endless := io.MultiReader(strings.NewReader(head), zeroReader{})
	mp, err := ReadMediaResponse(testCT, endless, 1<<20)
	if err != nil {
		t.Fatalf("ReadMediaResponse: %v", err)
	}
	n, err := io.Copy(io.Discard, mp.Body)
	if !errors.Is(err, ErrTooLarge) || n != 1<<20 {
		t.Fatalf("copied %d bytes, err %v; want %d and ErrTooLarge", n, err, 1<<20)
	}
}

// zeroReader is an endless stream of 'a' bytes.
type zeroReader struct{}

func (zeroReader) Read(b []byte) (int, error) {
	for i := range b {
		b[i] = 'a'
	}
	return len(b), nil
}

func TestWriteMediaResponseRoundTrip(t *testing.T) {
	// A body large enough to cross several read buffers and containing
	// CRLF and dashes.
	big := strings.Repeat("0123456789\r\n--abc\n", 10000)
	tests := []struct {
		name, ct, cd, body string
		size               int64
		wantCT             string
	}{
		{"known size", "image/png", "inline; filename=a.png", big, int64(len(big)), "image/png"},
		{"unknown size", "text/plain", "", "hello", -1, "text/plain"},
		{"empty", "", "attachment", "", 0, "application/octet-stream"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			if err := WriteMediaResponse(rec, tc.ct, tc.cd, strings.NewReader(tc.body), tc.size); err != nil {
				t.Fatalf("WriteMediaResponse: %v", err)
			}
			res := rec.Result()
			if res.StatusCode != 200 {
				t.Fatalf("status %d", res.StatusCode)
			}
			raw := rec.Body.Bytes()
			if tc.size >= 0 && res.Header.Get("Content-Length") != strconv.Itoa(len(raw)) {
				t.Errorf("Content-Length %q, body %d bytes", res.Header.Get("Content-Length"), len(raw))
			}
			if tc.size < 0 && res.Header.Get("Content-Length") != "" {
				t.Errorf("Content-Length set for unknown size")
			}
			ct := res.Header.Get("Content-Type")
			if tc.body == "hello" {
				b := strings.TrimPrefix(ct, "multipart/mixed; boundary=")
				want := "--" + b + "\r\nContent-Type: application/json\r\n\r\n{}\r\n--" + b +
					"\r\nContent-Type: text/plain\r\n\r\nhello\r\n--" + b + "--\r\n"
				if len(b) != 32 || string(raw) != want {
					t.Errorf("output = %q, want %q", raw, want)
				}
			}

			// Our reader.
			mp, err := ReadMediaResponse(ct, bytes.NewReader(raw), int64(len(tc.body)))
			if err != nil {
				t.Fatalf("ReadMediaResponse: %v", err)
			}
			got, err := io.ReadAll(mp.Body)
			if err != nil || string(got) != tc.body {
				t.Fatalf("our reader: body %d bytes (err %v), want %d", len(got), err, len(tc.body))
			}
			if mp.ContentType != tc.wantCT || mp.ContentDisposition != tc.cd || string(mp.Metadata) != "{}" {
				t.Errorf("our reader: %q %q %q", mp.ContentType, mp.ContentDisposition, mp.Metadata)
			}

			// Go's mime/multipart.
			mt, params, err := mime.ParseMediaType(ct)
			if err != nil || mt != "multipart/mixed" {
				t.Fatalf("content type %q: %v", ct, err)
			}
			mr := multipart.NewReader(bytes.NewReader(raw), params["boundary"])
			p1, err := mr.NextPart()
			if err != nil {
				t.Fatalf("part 1: %v", err)
			}
			meta, _ := io.ReadAll(p1)
			if p1.Header.Get("Content-Type") != "application/json" || string(meta) != "{}" {
				t.Errorf("part 1 = %q %q", p1.Header.Get("Content-Type"), meta)
			}
			p2, err := mr.NextPart()
			if err != nil {
				t.Fatalf("part 2: %v", err)
			}
			data, _ := io.ReadAll(p2)
			if string(data) != tc.body || p2.Header.Get("Content-Type") != tc.wantCT || p2.Header.Get("Content-Disposition") != tc.cd {
				t.Errorf("part 2: %d bytes, %q %q", len(data), p2.Header.Get("Content-Type"), p2.Header.Get("Content-Disposition"))
			}
			if _, err := mr.NextPart(); err != io.EOF {
				t.Errorf("after part 2: %v, want EOF", err)
			}
		})
	}
}

func TestWriteMediaResponseErrors(t *testing.T) {
	rec := httptest.NewRecorder()
	if err := WriteMediaResponse(rec, "text/plain\r\nX-Evil: 1", "", strings.NewReader("x"), 1); err == nil {
		t.Error("header injection accepted")
	}
	if rec.Body.Len() != 0 {
		t.Error("wrote output for an invalid header")
	}
	rec = httptest.NewRecorder()
	err := WriteMediaResponse(rec, "text/plain", "", strings.NewReader("short"), 10)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("short body: err = %v, want ErrUnexpectedEOF", err)
	}
}

func TestWriteMediaRedirect(t *testing.T) {
	const loc = "https://cdn.example.org/ab/c1/2345.txt?sig=a%20b"
	rec := httptest.NewRecorder()
	if err := WriteMediaRedirect(rec, loc); err != nil {
		t.Fatalf("WriteMediaRedirect: %v", err)
	}
	res := rec.Result()
	ct := res.Header.Get("Content-Type")
	if res.StatusCode != 200 || res.Header.Get("Content-Length") != strconv.Itoa(rec.Body.Len()) {
		t.Fatalf("status %d, length %q vs %d", res.StatusCode, res.Header.Get("Content-Length"), rec.Body.Len())
	}
	mp, err := ReadMediaResponse(ct, bytes.NewReader(rec.Body.Bytes()), 0)
	if err != nil || mp.Location != loc || mp.Body != nil {
		t.Fatalf("our reader: %+v, %v", mp, err)
	}
	_, params, _ := mime.ParseMediaType(ct)
	mr := multipart.NewReader(bytes.NewReader(rec.Body.Bytes()), params["boundary"])
	if _, err := mr.NextPart(); err != nil {
		t.Fatalf("part 1: %v", err)
	}
	p2, err := mr.NextPart()
	if err != nil {
		t.Fatalf("part 2: %v", err)
	}
	data, _ := io.ReadAll(p2)
	if p2.Header.Get("Location") != loc || len(data) != 0 {
		t.Errorf("part 2: Location %q, %d body bytes", p2.Header.Get("Location"), len(data))
	}
	for _, bad := range []string{"", "/relative", "ftp://x/y", "https://x/\r\nX: y"} {
		if err := WriteMediaRedirect(httptest.NewRecorder(), bad); err == nil {
			t.Errorf("WriteMediaRedirect(%q) accepted", bad)
		}
	}
}

func FuzzReadMediaResponse(f *testing.F) {
	seedCT := "multipart/mixed; boundary=b0undary"
	f.Add(seedCT, []byte("--b0undary\r\nContent-Type: application/json\r\n\r\n{}\r\n--b0undary\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b0undary--\r\n"), uint16(3))
	f.Add(seedCT, []byte("--b0undary\n\n{}\n--b0undary\nLocation: https://x.example/a\n\n-b0undary\n"), uint16(0))
	f.Add(seedCT, []byte("pre\n--b0undary \n\n{}\n--b0undary\n\nabc\n--b0undar"), uint16(100))
	f.Add(seedCT, []byte("--b0undary\r\n\r\n{}\r\n--b0undary\r\nContent-Length: 5\r\n\r\nhello\r\n--b0undary--\r\n"), uint16(10))
	f.Add(seedCT, []byte("--b0undary\r\n\r\n{}\r\n--b0undary\r\nContent-Length: 0\r\n\r\n--b0undary--"), uint16(10))
	f.Add("multipart/mixed; boundary=\"a b\"", []byte("--a b\r\n\r\n{}\r\n--a b\r\n\r\n\r\n--a b--"), uint16(1))
	rec := httptest.NewRecorder()
	_ = WriteMediaResponse(rec, "image/png", "inline", strings.NewReader("PNG\r\n--x"), 9)
	f.Add(rec.Header().Get("Content-Type"), rec.Body.Bytes(), uint16(9))
	f.Fuzz(func(t *testing.T, ct string, data []byte, max uint16) {
		mp, err := ReadMediaResponse(ct, bytes.NewReader(data), int64(max))
		if err != nil {
			return
		}
		if (mp.Location == "") == (mp.Body == nil) {
			t.Fatalf("exactly one of Location and Body must be set: %+v", mp)
		}
		if mp.Body == nil {
			return
		}
		got, err := io.ReadAll(mp.Body)
		if int64(len(got)) > int64(max) {
			t.Fatalf("read %d bytes, limit %d", len(got), max)
		}
		if err != nil && !errors.Is(err, ErrTooLarge) && !errors.Is(err, ErrMalformed) {
			t.Fatalf("unexpected body error %v", err)
		}
		if len(got) > len(data) {
			t.Fatalf("body longer than input")
		}
		if err == nil && mp.Size >= 0 && int64(len(got)) != mp.Size {
			t.Fatalf("body of %d bytes ended cleanly, Content-Length %d", len(got), mp.Size)
		}
	})
}
