package federation

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/textproto"
	"net/url"
	"strconv"
	"strings"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/exactio"
)

// ErrTooLarge is returned by MediaPart.Body once the media has more bytes
// than the limit given to ReadMediaResponse.
var ErrTooLarge = errors.New("media larger than the allowed size")

// ErrMalformed is returned (wrapped) by ReadMediaResponse for responses that
// are not a well-formed federation media multipart body, and by
// MediaPart.Body for a body that ends before its closing delimiter (a
// truncated response).
var ErrMalformed = errors.New("malformed federation media response")

// Parser limits for the parts that are buffered.
const (
	// maxMetadataBytes caps the JSON metadata part.
	maxMetadataBytes = 64 << 10
	// maxHeaderBytes caps the header block of one part.
	maxHeaderBytes = 16 << 10
	// maxHeaderLines caps the number of header lines of one part.
	maxHeaderLines = 100
	// maxPreambleBytes caps the preamble before the first delimiter.
	maxPreambleBytes = 64 << 10
	// maxBoundaryLen is a lenient cap on the boundary (RFC 2046 says 70).
	maxBoundaryLen = 200
	// readBufSize is the size of the streaming read buffer; it must be far
	// larger than a delimiter line.
	readBufSize = 32 << 10
)

// MediaPart is the parsed federation media response. Exactly one of
// Location and Body is set.
type MediaPart struct {
	// Metadata is the raw JSON object of the first part (currently "{}").
	Metadata []byte
	// ContentType is the Content-Type header of the media part ("" if the
	// remote sent none).
	ContentType string
	// ContentDisposition is the Content-Disposition header of the media
	// part, if any.
	ContentDisposition string
	// Size is the media part's own Content-Length when it sent one, else
	// -1. Body then yields exactly Size bytes or an error.
	Size int64
	// Location is the URL to fetch the media from when the remote answered
	// with a redirect part; Body is nil then. It is an absolute http(s)
	// URL and must not be cached.
	Location string
	// Body streams the media bytes. Reading more than the limit given to
	// ReadMediaResponse yields ErrTooLarge. It reads from the response
	// body passed to ReadMediaResponse, which the caller still closes.
	Body io.Reader
}

// ReadMediaResponse parses the body of a 200 answer of
// /_matrix/federation/v1/media/download or /thumbnail: multipart/mixed with
// a JSON metadata part followed by either the media (streamed, not
// buffered) or a part with a Location header. It tolerates LF-only line
// endings, a preamble and transport padding after delimiters, but not a media
// part that ends at EOF without a delimiter after it: that is a truncated
// response, and Body fails with ErrMalformed (wrapping
// io.ErrUnexpectedEOF) instead of ending cleanly. maxBytes (>= 0) bounds the
// media size: a media part whose Content-Length is over it fails at once
// with ErrTooLarge, before any of its bytes is read.
func ReadMediaResponse(contentType string, body io.Reader, maxBytes int64) (MediaPart, error) {
	if maxBytes < 0 {
		return MediaPart{}, fmt.Errorf("reading media response: negative size limit %d", maxBytes)
	}
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		return MediaPart{}, fmt.Errorf("parsing media response content type: %w: %w", ErrMalformed, err)
	}
	if mt != "multipart/mixed" {
		return MediaPart{}, fmt.Errorf("parsing media response content type: %w: %q is not multipart/mixed", ErrMalformed, mt)
	}
	boundary := params["boundary"]
	if boundary == "" || len(boundary) > maxBoundaryLen || strings.ContainsAny(boundary, "\r\n") {
		return MediaPart{}, fmt.Errorf("parsing media response content type: %w: missing or invalid boundary", ErrMalformed)
	}
	m := &mpReader{
		br:     bufio.NewReaderSize(body, readBufSize),
		dash:   []byte("--" + boundary),
		nlDash: []byte("\n--" + boundary),
	}
	if err := m.skipPreamble(); err != nil {
		return MediaPart{}, err
	}

	h1, err := m.readHeaders()
	if err != nil {
		return MediaPart{}, fmt.Errorf("reading metadata part: %w", err)
	}
	if ct := h1.Get("Content-Type"); ct != "" {
		if t, _, err := mime.ParseMediaType(ct); err != nil || t != "application/json" {
			return MediaPart{}, fmt.Errorf("reading metadata part: %w: content type %q is not application/json", ErrMalformed, ct)
		}
	}
	p1 := &partReader{m: m, atStart: true, left: -1}
	meta, err := io.ReadAll(io.LimitReader(p1, maxMetadataBytes+1))
	if err != nil {
		return MediaPart{}, fmt.Errorf("reading metadata part: %w", err)
	}
	if len(meta) > maxMetadataBytes {
		return MediaPart{}, fmt.Errorf("reading metadata part: %w: larger than %d bytes", ErrMalformed, maxMetadataBytes)
	}
	if !p1.sawDelim || p1.final {
		return MediaPart{}, fmt.Errorf("reading media response: %w: missing media part", ErrMalformed)
	}
	meta = bytes.TrimSpace(meta)
	if len(meta) == 0 || meta[0] != '{' || !json.Valid(meta) {
		return MediaPart{}, fmt.Errorf("reading metadata part: %w: not a JSON object", ErrMalformed)
	}

	h2, err := m.readHeaders()
	if err != nil {
		return MediaPart{}, fmt.Errorf("reading media part: %w", err)
	}
	if loc := h2.Get("Location"); loc != "" {
		u, err := url.Parse(loc)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return MediaPart{}, fmt.Errorf("reading media part: %w: invalid Location %q", ErrMalformed, loc)
		}
		return MediaPart{Metadata: meta, Location: loc, Size: -1}, nil
	}
	size := int64(-1)
	if cl := h2.Get("Content-Length"); cl != "" {
		n, err := strconv.ParseInt(cl, 10, 64)
		if err != nil || n < 0 {
			return MediaPart{}, fmt.Errorf("reading media part: %w: invalid Content-Length %q", ErrMalformed, cl)
		}
		if n > maxBytes {
			return MediaPart{}, fmt.Errorf("reading media part: %w: Content-Length %d, limit %d", ErrTooLarge, n, maxBytes)
		}
		size = n
	}
	var media io.Reader = &limitedBody{r: &partReader{m: m, atStart: true, requireDelim: true, left: size}, remaining: maxBytes}
	if size >= 0 {
		media = exactio.NewReader(media, size, "media part", ErrMalformed)
	}
	return MediaPart{
		Metadata:           meta,
		ContentType:        h2.Get("Content-Type"),
		ContentDisposition: h2.Get("Content-Disposition"),
		Size:               size,
		Body:               media,
	}, nil
}

// mpReader is the shared state of one multipart body being parsed.
type mpReader struct {
	br     *bufio.Reader
	dash   []byte // "--boundary"
	nlDash []byte // "\n--boundary"
}

// readLine reads one line of at most limit bytes (terminator excluded) and
// returns it without its LF or CRLF. A last line ended by EOF is returned
// with a nil error; io.EOF is returned only when nothing was read. n is the
// number of bytes consumed.
func (m *mpReader) readLine(limit int) (line []byte, n int, err error) {
	for {
		chunk, err := m.br.ReadSlice('\n')
		n += len(chunk)
		if len(line)+len(chunk) > limit+2 {
			return nil, n, fmt.Errorf("reading line: %w: line too long", ErrMalformed)
		}
		line = append(line, chunk...)
		switch {
		case err == nil:
			line = bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r"))
			return line, n, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			if len(line) == 0 {
				return nil, n, io.EOF
			}
			return bytes.TrimSuffix(line, []byte("\r")), n, nil
		default:
			return nil, n, fmt.Errorf("reading line: %w", err)
		}
	}
}

// skipPreamble consumes everything up to and including the first delimiter
// line.
func (m *mpReader) skipPreamble() error {
	budget := maxPreambleBytes
	for {
		line, n, err := m.readLine(budget)
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("reading media response: %w: no multipart delimiter", ErrMalformed)
		}
		if err != nil {
			return fmt.Errorf("reading media response preamble: %w", err)
		}
		budget -= n
		line = bytes.TrimRight(line, " \t")
		if bytes.Equal(line, m.dash) {
			return nil
		}
		if len(line) == len(m.dash)+2 && bytes.HasPrefix(line, m.dash) && bytes.HasSuffix(line, []byte("--")) {
			return fmt.Errorf("reading media response: %w: no parts", ErrMalformed)
		}
		if budget <= 0 {
			return fmt.Errorf("reading media response: %w: preamble too long", ErrMalformed)
		}
	}
}

// readHeaders reads one part's header block up to the empty line. EOF ends
// the block leniently (a truncated response then yields an empty body).
func (m *mpReader) readHeaders() (textproto.MIMEHeader, error) {
	h := textproto.MIMEHeader{}
	budget := maxHeaderBytes
	lastKey := ""
	for lines := 0; ; lines++ {
		if lines > maxHeaderLines {
			return nil, fmt.Errorf("reading part headers: %w: too many header lines", ErrMalformed)
		}
		line, n, err := m.readLine(budget)
		if errors.Is(err, io.EOF) {
			return h, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading part headers: %w", err)
		}
		budget -= n
		if budget < 0 {
			return nil, fmt.Errorf("reading part headers: %w: headers too large", ErrMalformed)
		}
		if len(line) == 0 {
			return h, nil
		}
		if line[0] == ' ' || line[0] == '\t' {
			if lastKey == "" {
				return nil, fmt.Errorf("reading part headers: %w: continuation without header", ErrMalformed)
			}
			vs := h[lastKey]
			vs[len(vs)-1] += " " + strings.TrimSpace(string(line))
			continue
		}
		i := bytes.IndexByte(line, ':')
		if i <= 0 {
			return nil, fmt.Errorf("reading part headers: %w: bad header line", ErrMalformed)
		}
		key := strings.TrimSpace(string(line[:i]))
		if key == "" || strings.ContainsAny(key, " \t") {
			return nil, fmt.Errorf("reading part headers: %w: bad header name", ErrMalformed)
		}
		lastKey = textproto.CanonicalMIMEHeaderKey(key)
		h.Add(lastKey, strings.TrimSpace(string(line[i+1:])))
	}
}

// partReader streams one part's body up to the next delimiter, which it
// consumes together with the rest of its line. The line break before a
// delimiter belongs to the delimiter. EOF without a delimiter ends the part,
// or fails it when requireDelim is set (a truncated media part).
//
// A part whose length is known (left >= 0, its Content-Length) is its next
// left bytes, passed on without looking for a delimiter in them (nor
// copying them through the read buffer when the caller's buffer is larger);
// the delimiter must follow right after them. Bytes before the delimiter
// beyond the length, or EOF before the length or the delimiter, are
// ErrMalformed.
type partReader struct {
	m            *mpReader
	left         int64 // bytes of the body still to read when its length is known, else -1
	requireDelim bool  // EOF before a delimiter is an error
	atStart      bool  // nothing of the body consumed yet: a delimiter may start at offset 0
	sawDelim     bool  // the part ended at a delimiter (not at EOF)
	final        bool  // that delimiter was the closing one
	done         bool  // the part is finished
	err          error // sticky read error
}

// delimCheck is the outcome of looking at the bytes after "--boundary".
type delimCheck int

const (
	delimNo delimCheck = iota
	delimYes
	delimNeedMore
)

// checkAfter decides whether rest, the bytes following a "--boundary"
// candidate, complete a delimiter line: "--" (closing), or optional spaces
// and tabs then LF, CRLF or EOF. consumed is how much of rest belongs to the
// delimiter line.
func checkAfter(rest []byte, eof bool) (res delimCheck, consumed int, final bool) {
	if len(rest) >= 2 && rest[0] == '-' && rest[1] == '-' {
		return delimYes, 2, true
	}
	if len(rest) == 1 && rest[0] == '-' && !eof {
		return delimNeedMore, 0, false
	}
	j := 0
	for j < len(rest) && (rest[j] == ' ' || rest[j] == '\t') {
		j++
	}
	if j == len(rest) {
		if eof {
			return delimYes, j, false
		}
		return delimNeedMore, 0, false
	}
	switch rest[j] {
	case '\n':
		return delimYes, j + 1, false
	case '\r':
		if j+1 == len(rest) {
			if eof {
				return delimYes, j + 1, false
			}
			return delimNeedMore, 0, false
		}
		if rest[j+1] == '\n' {
			return delimYes, j + 2, false
		}
	}
	return delimNo, 0, false
}

// Read implements io.Reader.
func (p *partReader) Read(b []byte) (int, error) {
	if p.err != nil {
		return 0, p.err
	}
	if p.done {
		return 0, io.EOF
	}
	if len(b) == 0 {
		return 0, nil
	}
	br := p.m.br
	if p.left > 0 {
		return p.readKnown(b)
	}
	eof := false
	for {
		peek, _ := br.Peek(br.Buffered())
		n, delimAt, delimLen, final, need := p.scan(peek, eof)
		if n > 0 && p.left == 0 {
			p.err = fmt.Errorf("reading multipart body: %w: more bytes than the part's Content-Length before its delimiter", ErrMalformed)
			return 0, p.err
		}
		if n > 0 {
			if n > len(b) {
				n = len(b)
			}
			copy(b, peek[:n])
			if _, err := br.Discard(n); err != nil {
				p.err = fmt.Errorf("reading multipart body: %w", err)
				return 0, p.err
			}
			p.atStart = false
			return n, nil
		}
		if delimLen > 0 {
			if _, err := br.Discard(delimAt + delimLen); err != nil {
				p.err = fmt.Errorf("reading multipart body: %w", err)
				return 0, p.err
			}
			p.done, p.sawDelim, p.final = true, true, final
			return 0, io.EOF
		}
		if !need {
			// Nothing buffered and at EOF: the part ends without a
			// delimiter, which the media part must have.
			if p.requireDelim {
				p.err = fmt.Errorf("reading multipart body: %w: %w before the closing delimiter", ErrMalformed, io.ErrUnexpectedEOF)
				return 0, p.err
			}
			p.done = true
			return 0, io.EOF
		}
		if eof || len(peek) == br.Size() {
			// Cannot happen: scan never asks for more at EOF or with a
			// full buffer. Guard against looping forever anyway.
			p.err = fmt.Errorf("reading multipart body: %w: parser stalled", ErrMalformed)
			return 0, p.err
		}
		if _, err := br.Peek(len(peek) + 1); err != nil {
			if !errors.Is(err, io.EOF) {
				p.err = fmt.Errorf("reading multipart body: %w", err)
				return 0, p.err
			}
			eof = true
		}
	}
}

// readKnown reads the next bytes of a part of known length (p.left > 0).
func (p *partReader) readKnown(b []byte) (int, error) {
	if int64(len(b)) > p.left {
		b = b[:p.left]
	}
	n, err := p.m.br.Read(b)
	p.left -= int64(n)
	if n > 0 {
		p.atStart = false
	}
	switch {
	case errors.Is(err, io.EOF) && n == 0:
		p.err = fmt.Errorf("reading multipart body: %w: %w with %d bytes of the part's Content-Length missing", ErrMalformed, io.ErrUnexpectedEOF, p.left)
		return 0, p.err
	case errors.Is(err, io.EOF):
		// Reported by the next call.
		return n, nil
	case err != nil:
		p.err = fmt.Errorf("reading multipart body: %w", err)
		return n, p.err
	}
	return n, nil
}

// scan inspects the buffered bytes. It returns either n > 0 bytes that are
// certainly body, or a delimiter at delimAt spanning delimLen bytes, or
// need=true when more input is required to decide; all zero means the part
// is over (EOF, nothing left).
func (p *partReader) scan(peek []byte, eof bool) (n, delimAt, delimLen int, final, need bool) {
	full := len(peek) == p.m.br.Size()
	if p.atStart {
		dash := p.m.dash
		if len(peek) < len(dash) && bytes.HasPrefix(dash, peek) && !eof {
			return 0, 0, 0, false, true
		}
		if bytes.HasPrefix(peek, dash) {
			res, c, fin := checkAfter(peek[len(dash):], eof)
			switch {
			case res == delimYes:
				return 0, 0, len(dash) + c, fin, false
			case res == delimNeedMore && !full:
				return 0, 0, 0, false, true
			}
		}
	}
	from := 0
	for {
		i := bytes.Index(peek[from:], p.m.nlDash)
		if i < 0 {
			break
		}
		i += from
		bodyEnd := i
		if i > 0 && peek[i-1] == '\r' {
			bodyEnd = i - 1
		}
		res, c, fin := checkAfter(peek[i+len(p.m.nlDash):], eof)
		switch {
		case res == delimYes:
			if bodyEnd > 0 {
				return bodyEnd, 0, 0, false, false
			}
			return 0, i, len(p.m.nlDash) + c, fin, false
		case res == delimNeedMore && !full:
			if bodyEnd > 0 {
				return bodyEnd, 0, 0, false, false
			}
			return 0, 0, 0, false, true
		}
		// Not a delimiter (or undecidable with a full buffer): the
		// candidate's LF is body; keep searching after it.
		from = i + 1
	}
	if eof {
		return len(peek), 0, 0, false, false
	}
	// Keep back a tail that could be the start of "\r\n--boundary".
	// Bytes up to a rejected candidate are certainly body too.
	safe := max(len(peek)-len(p.m.nlDash)-1, from)
	if safe > 0 {
		return safe, 0, 0, false, false
	}
	return 0, 0, 0, false, true
}

// limitedBody passes through at most remaining bytes and then reports
// ErrTooLarge if the underlying reader has more.
type limitedBody struct {
	r         io.Reader
	remaining int64
	err       error
}

// Read implements io.Reader.
func (l *limitedBody) Read(b []byte) (int, error) {
	if l.err != nil {
		return 0, l.err
	}
	if l.remaining <= 0 {
		var one [1]byte
		n, err := l.r.Read(one[:])
		switch {
		case n > 0:
			l.err = ErrTooLarge
		case err != nil:
			l.err = err
		}
		return 0, l.err
	}
	if int64(len(b)) > l.remaining {
		b = b[:l.remaining]
	}
	n, err := l.r.Read(b)
	l.remaining -= int64(n)
	if err != nil {
		l.err = err
	}
	return n, err
}

// newBoundary returns a random 32-hex-digit multipart boundary.
func newBoundary() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generating boundary: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// validHeaderValue reports whether v can be written as a header value
// without allowing header injection (no control characters but tab).
func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		c := v[i]
		if (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// metadataPart is the opening of every response: the first delimiter and
// the JSON metadata part.
func metadataPart(boundary string) string {
	return "--" + boundary + "\r\nContent-Type: application/json\r\n\r\n{}\r\n--" + boundary + "\r\n"
}

// WriteMediaResponse answers a federation media request with status 200 and
// a multipart/mixed body: a "{}" JSON metadata part and the media part with
// the given Content-Type (default application/octet-stream) and optional
// Content-Disposition, using CRLF line endings and a random boundary. When
// size >= 0 exactly size bytes are copied from body and Content-Length is
// set; size < 0 streams body to EOF. Once the header is written an error
// means a truncated response; the caller should abort the connection
// (panic(http.ErrAbortHandler)) rather than write anything else.
func WriteMediaResponse(w http.ResponseWriter, contentType, contentDisposition string, body io.Reader, size int64) error {
	if contentType == "" {
		contentType = "application/octet-stream"
	}
	if !validHeaderValue(contentType) || !validHeaderValue(contentDisposition) {
		return fmt.Errorf("writing media response: invalid header value")
	}
	boundary, err := newBoundary()
	if err != nil {
		return fmt.Errorf("writing media response: %w", err)
	}
	var head strings.Builder
	head.WriteString(metadataPart(boundary))
	head.WriteString("Content-Type: " + contentType + "\r\n")
	if size >= 0 {
		// The part's own length lets the peer refuse media over its limit
		// before reading it.
		head.WriteString("Content-Length: " + strconv.FormatInt(size, 10) + "\r\n")
	}
	if contentDisposition != "" {
		head.WriteString("Content-Disposition: " + contentDisposition + "\r\n")
	}
	head.WriteString("\r\n")
	tail := "\r\n--" + boundary + "--\r\n"

	h := w.Header()
	h.Set("Content-Type", "multipart/mixed; boundary="+boundary)
	if size >= 0 {
		h.Set("Content-Length", strconv.FormatInt(int64(head.Len())+size+int64(len(tail)), 10))
	} else {
		h.Del("Content-Length")
	}
	w.WriteHeader(http.StatusOK)
	if _, err := io.WriteString(w, head.String()); err != nil {
		return fmt.Errorf("writing media response head: %w", err)
	}
	if size >= 0 {
		if _, err := io.CopyN(w, body, size); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("copying media body: %w", err)
		}
	} else if _, err := io.Copy(w, body); err != nil {
		return fmt.Errorf("copying media body: %w", err)
	}
	if _, err := io.WriteString(w, tail); err != nil {
		return fmt.Errorf("writing media response tail: %w", err)
	}
	return nil
}

// WriteMediaRedirect answers a federation media request with status 200 and
// the multipart/mixed redirect form: the "{}" metadata part and a part whose
// only header is Location (an absolute http(s) URL) and whose body is empty.
// (Federation endpoints must not answer with a top-level 307/308.)
func WriteMediaRedirect(w http.ResponseWriter, location string) error {
	u, err := url.Parse(location)
	if err != nil || !validHeaderValue(location) || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("writing media redirect: invalid location %q", location)
	}
	boundary, err := newBoundary()
	if err != nil {
		return fmt.Errorf("writing media redirect: %w", err)
	}
	body := metadataPart(boundary) + "Location: " + location + "\r\n\r\n\r\n--" + boundary + "--\r\n"
	h := w.Header()
	h.Set("Content-Type", "multipart/mixed; boundary="+boundary)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if _, err := io.WriteString(w, body); err != nil {
		return fmt.Errorf("writing media redirect: %w", err)
	}
	return nil
}
