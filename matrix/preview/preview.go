// Package preview implements the fetching core of the Matrix URL preview
// endpoint (GET /_matrix/client/v1/media/preview_url): it downloads a page
// through an SSRF-guarded HTTP client, extracts its OpenGraph metadata (with
// <title>, <meta name="description"> and first-<img> fallbacks) and fetches
// the preview image, reporting its type and dimensions. Storing the image and
// turning og:image into an mxc:// URI is left to the caller.
package preview

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"image"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"
	"unicode/utf8"

	// Image decoders registered for image.DecodeConfig.
	_ "image/gif"
	_ "image/jpeg"
	_ "image/png"

	_ "golang.org/x/image/webp"
	"golang.org/x/net/html"
	"golang.org/x/net/html/charset"
)

var (
	// ErrInvalidURL is returned (wrapped) when the URL to preview is not an
	// absolute http or https URL with a host and without user information.
	ErrInvalidURL = errors.New("invalid URL")

	// ErrUnreachable is returned (wrapped) when the URL cannot be fetched:
	// network failure, an address denied by the SSRF guard, too many
	// redirects, a timeout or a non-2xx response.
	ErrUnreachable = errors.New("URL unreachable")

	// ErrTooLarge is returned (wrapped) when an image is larger than
	// Options.MaxImageBytes.
	ErrTooLarge = errors.New("content too large")

	// ErrNotPreviewable is returned (wrapped) when the response is neither
	// HTML/XHTML nor a supported image (PNG, JPEG, GIF, WebP), or when an
	// image does not decode.
	ErrNotPreviewable = errors.New("content not previewable")
)

const (
	// DefaultMaxPageBytes is the default Options.MaxPageBytes (1 MiB).
	DefaultMaxPageBytes = 1 << 20
	// DefaultMaxImageBytes is the default Options.MaxImageBytes (10 MiB).
	DefaultMaxImageBytes = 10 << 20
	// DefaultUserAgent is the default Options.UserAgent.
	DefaultUserAgent = "caddy-matrix-media (URL preview)"
	// DefaultTimeout is the default Options.Timeout.
	DefaultTimeout = 10 * time.Second

	// maxValueRunes bounds every extracted metadata value.
	maxValueRunes = 500
	// maxFields bounds the number of distinct og:* keys kept from one page.
	maxFields = 64
)

// Options configures a Previewer.
type Options struct {
	// Client performs every request. Required; it must be an SSRF-guarded
	// client such as one built by federation.NewClient, which also bounds
	// redirects (federation.MaxRedirects).
	Client *http.Client

	// MaxPageBytes is how many bytes of an HTML page are read and parsed;
	// the rest of a larger page is ignored (not an error). Default 1 MiB.
	MaxPageBytes int64

	// MaxImageBytes is the largest image FetchImage accepts; larger images
	// fail with ErrTooLarge. Default 10 MiB.
	MaxImageBytes int64

	// UserAgent is sent with every request. Default
	// "caddy-matrix-media (URL preview)".
	UserAgent string

	// Timeout bounds one whole fetch (connect, redirects, headers and
	// body). Default 10s.
	Timeout time.Duration
}

// Preview is the metadata extracted from a page.
type Preview struct {
	// Fields holds the og:* keys of the preview_url response, values as
	// strings. It never contains og:image or its sub-properties
	// (og:image:width, …): the caller stores the image at ImageURL and adds
	// og:image (mxc://), og:image:type, og:image:width, og:image:height and
	// matrix:image:size itself. Never nil.
	Fields map[string]any

	// ImageURL is the absolute http(s) URL of the preview image, or "" if
	// there is none. When the previewed URL is itself an image, ImageURL is
	// that URL (after redirects) and Fields is empty.
	ImageURL string
}

// Image is a downloaded preview image.
type Image struct {
	// ContentType is the decoded format: image/png, image/jpeg, image/gif
	// or image/webp.
	ContentType string
	// Body is the complete image.
	Body []byte
	// Width and Height are the image dimensions in pixels.
	Width, Height int
}

// Previewer fetches URL previews. It is safe for concurrent use.
type Previewer struct {
	client        *http.Client
	maxPageBytes  int64
	maxImageBytes int64
	userAgent     string
	timeout       time.Duration
}

// New validates opts, applies defaults and returns a Previewer.
func New(opts Options) (*Previewer, error) {
	if opts.Client == nil {
		return nil, errors.New("creating previewer: Client is required")
	}
	if opts.MaxPageBytes < 0 || opts.MaxImageBytes < 0 || opts.Timeout < 0 {
		return nil, errors.New("creating previewer: limits must not be negative")
	}
	p := &Previewer{
		client:        opts.Client,
		maxPageBytes:  opts.MaxPageBytes,
		maxImageBytes: opts.MaxImageBytes,
		userAgent:     opts.UserAgent,
		timeout:       opts.Timeout,
	}
	if p.maxPageBytes == 0 {
		p.maxPageBytes = DefaultMaxPageBytes
	}
	if p.maxImageBytes == 0 {
		p.maxImageBytes = DefaultMaxImageBytes
	}
	if p.userAgent == "" {
		p.userAgent = DefaultUserAgent
	}
	if p.timeout == 0 {
		p.timeout = DefaultTimeout
	}
	return p, nil
}

// ValidateURL parses rawURL and checks that it may be previewed: an
// absolute http or https URL with a host, a valid port if any and no user
// information. The fragment is dropped. Errors wrap ErrInvalidURL.
func ValidateURL(rawURL string) (*url.URL, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("parsing URL: %w: %w", ErrInvalidURL, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("parsing URL: %w: scheme %q not allowed", ErrInvalidURL, u.Scheme)
	}
	if u.Opaque != "" || u.Hostname() == "" {
		return nil, fmt.Errorf("parsing URL: %w: no host", ErrInvalidURL)
	}
	if u.User != nil {
		return nil, fmt.Errorf("parsing URL: %w: user information not allowed", ErrInvalidURL)
	}
	if port := u.Port(); port != "" {
		if _, err := net.LookupPort("tcp", port); err != nil || port == "0" {
			return nil, fmt.Errorf("parsing URL: %w: invalid port %q", ErrInvalidURL, port)
		}
	}
	u.Fragment, u.RawFragment = "", ""
	return u, nil
}

// get performs a GET of u with the previewer's headers. The caller must
// close the body. Errors wrap ErrUnreachable.
func (p *Previewer) get(ctx context.Context, u *url.URL, accept string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("fetching %s: %w: %w", u.Redacted(), ErrUnreachable, err)
	}
	req.Header.Set("User-Agent", p.userAgent)
	req.Header.Set("Accept", accept)
	resp, err := p.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching %s: %w: %w", u.Redacted(), ErrUnreachable, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		resp.Body.Close()
		return nil, fmt.Errorf("fetching %s: %w: status %d", u.Redacted(), ErrUnreachable, resp.StatusCode)
	}
	return resp, nil
}

// Fetch downloads rawURL and extracts its preview. HTML and XHTML pages are
// parsed (at most MaxPageBytes); a supported image (PNG, JPEG, GIF, WebP)
// yields an empty Fields and ImageURL set to the final URL; anything else
// fails with ErrNotPreviewable.
func (p *Previewer) Fetch(ctx context.Context, rawURL string) (Preview, error) {
	u, err := ValidateURL(rawURL)
	if err != nil {
		return Preview{}, fmt.Errorf("previewing URL: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	resp, err := p.get(ctx, u, "text/html,application/xhtml+xml;q=0.9,image/*;q=0.8,*/*;q=0.1")
	if err != nil {
		return Preview{}, fmt.Errorf("previewing URL: %w", err)
	}
	defer resp.Body.Close()
	final := resp.Request.URL

	br := bufio.NewReaderSize(io.LimitReader(resp.Body, p.maxPageBytes), 1024)
	head, err := br.Peek(1024)
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, bufio.ErrBufferFull) {
		return Preview{}, fmt.Errorf("previewing URL: reading %s: %w: %w", final.Redacted(), ErrUnreachable, err)
	}
	contentType := resp.Header.Get("Content-Type")
	if contentType == "" {
		contentType = http.DetectContentType(head)
	}
	mediaType, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return Preview{}, fmt.Errorf("previewing URL: %w: unparsable Content-Type %q", ErrNotPreviewable, contentType)
	}
	switch {
	case mediaType == "text/html" || mediaType == "application/xhtml+xml":
	case supportedImageType(mediaType) != "":
		return Preview{Fields: map[string]any{}, ImageURL: final.String()}, nil
	default:
		return Preview{}, fmt.Errorf("previewing URL: %w: content type %q", ErrNotPreviewable, mediaType)
	}

	enc, _, _ := charset.DetermineEncoding(head, contentType)
	pv, err := parseHTML(enc.NewDecoder().Reader(br), final)
	if err != nil {
		return Preview{}, fmt.Errorf("previewing URL: reading %s: %w: %w", final.Redacted(), ErrUnreachable, err)
	}
	return pv, nil
}

// supportedImageType returns the canonical image type for mediaType, or ""
// if it is not a supported image type.
func supportedImageType(mediaType string) string {
	switch mediaType {
	case "image/png", "image/gif", "image/webp", "image/jpeg":
		return mediaType
	case "image/jpg", "image/pjpeg":
		return "image/jpeg"
	}
	return ""
}

// FetchImage downloads the image at imageURL (at most MaxImageBytes, else
// ErrTooLarge). The Content-Type must be image/png, image/jpeg, image/gif or
// image/webp and the body must decode as an image (else ErrNotPreviewable);
// Image.ContentType is the decoded format.
func (p *Previewer) FetchImage(ctx context.Context, imageURL string) (Image, error) {
	u, err := ValidateURL(imageURL)
	if err != nil {
		return Image{}, fmt.Errorf("fetching preview image: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	resp, err := p.get(ctx, u, "image/png,image/jpeg,image/gif,image/webp;q=0.9")
	if err != nil {
		return Image{}, fmt.Errorf("fetching preview image: %w", err)
	}
	defer resp.Body.Close()
	contentType := resp.Header.Get("Content-Type")
	mediaType, _, err := mime.ParseMediaType(contentType)
	if err != nil || supportedImageType(mediaType) == "" {
		return Image{}, fmt.Errorf("fetching preview image: %w: content type %q", ErrNotPreviewable, contentType)
	}
	if resp.ContentLength > p.maxImageBytes {
		return Image{}, fmt.Errorf("fetching preview image: %w: %d bytes, limit %d", ErrTooLarge, resp.ContentLength, p.maxImageBytes)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, p.maxImageBytes+1))
	if err != nil {
		return Image{}, fmt.Errorf("fetching preview image: reading %s: %w: %w", u.Redacted(), ErrUnreachable, err)
	}
	if int64(len(body)) > p.maxImageBytes {
		return Image{}, fmt.Errorf("fetching preview image: %w: more than %d bytes", ErrTooLarge, p.maxImageBytes)
	}
	cfg, format, err := image.DecodeConfig(bytes.NewReader(body))
	if err != nil {
		return Image{}, fmt.Errorf("fetching preview image: %w: decoding: %w", ErrNotPreviewable, err)
	}
	if cfg.Width <= 0 || cfg.Height <= 0 {
		return Image{}, fmt.Errorf("fetching preview image: %w: empty image %dx%d", ErrNotPreviewable, cfg.Width, cfg.Height)
	}
	return Image{ContentType: "image/" + format, Body: body, Width: cfg.Width, Height: cfg.Height}, nil
}

// pageMeta accumulates what the tokenizer finds in a page.
type pageMeta struct {
	og          map[string]string
	title       string
	description string
	firstImg    string
	base        *url.URL
}

// parseHTML tokenizes r (already decoded to UTF-8) and builds the preview;
// pageURL is the final URL of the page, used to resolve relative URLs.
func parseHTML(r io.Reader, pageURL *url.URL) (Preview, error) {
	m := pageMeta{og: map[string]string{}, base: pageURL}
	z := html.NewTokenizer(r)
	svgDepth := 0
	seenTitle, seenBase := false, false
	for {
		tt := z.Next()
		switch tt {
		case html.ErrorToken:
			if err := z.Err(); !errors.Is(err, io.EOF) {
				return Preview{}, fmt.Errorf("parsing HTML: %w", err)
			}
			return m.build(), nil
		case html.EndTagToken:
			if name, _ := z.TagName(); string(name) == "svg" && svgDepth > 0 {
				svgDepth--
			}
		case html.StartTagToken, html.SelfClosingTagToken:
			nameBytes, hasAttr := z.TagName()
			name := string(nameBytes)
			attrs := map[string]string{}
			for hasAttr {
				var k, v []byte
				k, v, hasAttr = z.TagAttr()
				if _, dup := attrs[string(k)]; !dup {
					attrs[string(k)] = string(v)
				}
			}
			switch name {
			case "svg":
				if tt == html.StartTagToken {
					svgDepth++
				}
			case "meta":
				m.meta(attrs)
			case "title":
				if seenTitle || svgDepth > 0 || tt == html.SelfClosingTagToken {
					continue
				}
				seenTitle = true
				if z.Next() == html.TextToken {
					m.title = clean(string(z.Text()))
				}
			case "base":
				if href, ok := attrs["href"]; ok && !seenBase {
					seenBase = true
					if b, err := pageURL.Parse(strings.TrimSpace(href)); err == nil {
						m.base = b
					}
				}
			case "img":
				if m.firstImg == "" {
					m.firstImg = strings.TrimSpace(attrs["src"])
				}
			}
		}
	}
}

// meta records one <meta> element's OpenGraph or description content.
func (m *pageMeta) meta(attrs map[string]string) {
	content, ok := attrs["content"]
	if !ok {
		return
	}
	content = clean(content)
	if content == "" {
		return
	}
	key := strings.ToLower(strings.TrimSpace(attrs["property"]))
	if key == "" {
		key = strings.ToLower(strings.TrimSpace(attrs["name"]))
	}
	switch {
	case key == "description":
		if m.description == "" {
			m.description = content
		}
	case strings.HasPrefix(key, "og:") && len(key) > 3 && len(key) <= 100:
		if _, dup := m.og[key]; !dup && len(m.og) < maxFields {
			m.og[key] = content
		}
	}
}

// build applies the fallbacks and resolves URLs into the final Preview.
func (m *pageMeta) build() Preview {
	fields := map[string]any{}
	for k, v := range m.og {
		if k == "og:image" || strings.HasPrefix(k, "og:image:") {
			continue
		}
		fields[k] = v
	}
	if _, ok := fields["og:title"]; !ok && m.title != "" {
		fields["og:title"] = m.title
	}
	if _, ok := fields["og:description"]; !ok && m.description != "" {
		fields["og:description"] = m.description
	}
	if raw, ok := m.og["og:url"]; ok {
		if u := m.resolve(raw); u != "" {
			fields["og:url"] = u
		} else {
			delete(fields, "og:url")
		}
	}
	var img string
	for _, cand := range []string{m.og["og:image"], m.og["og:image:secure_url"], m.og["og:image:url"], m.firstImg} {
		if img = m.resolve(cand); img != "" {
			break
		}
	}
	return Preview{Fields: fields, ImageURL: img}
}

// resolve resolves ref against the page's base URL and returns it if it is
// a valid http(s) URL of at most maxValueRunes characters, else "".
func (m *pageMeta) resolve(ref string) string {
	if ref == "" {
		return ""
	}
	u, err := m.base.Parse(ref)
	if err != nil {
		return ""
	}
	if _, err := ValidateURL(u.String()); err != nil {
		return ""
	}
	s := u.String()
	if utf8.RuneCountInString(s) > maxValueRunes {
		return ""
	}
	return s
}

// clean collapses runs of white space to single spaces, trims the ends and
// truncates the result to maxValueRunes runes.
func clean(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if utf8.RuneCountInString(s) <= maxValueRunes {
		return s
	}
	n := 0
	for i := range s {
		if n == maxValueRunes {
			return strings.TrimRight(s[:i], " ")
		}
		n++
	}
	return s
}
