package preview

import (
	"encoding/json"
	"net/url"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzParseHTML feeds arbitrary pages to the HTML metadata parser and
// checks what the preview_url response is built from: it never fails on a
// complete body; Fields holds only og:* keys (never og:image*), at most
// maxFields of them plus the title and description fallbacks, each a
// cleaned string of at most maxValueRunes runes; URLs (og:url and the image)
// are absolute http(s) URLs that ValidateURL accepts; and the result
// encodes as JSON.
func FuzzParseHTML(f *testing.F) {
	for _, page := range []string{
		`<html><head><title> A  page </title><meta property="og:title" content="OG title"><meta property="og:image" content="/img.png"></head></html>`,
		`<meta name="description" content="desc"><img src="x.jpg"><base href="https://cdn.example/">`,
		`<svg><title>not the title</title></svg><title>real</title>`,
		`<meta property="og:url" content="javascript:alert(1)"><meta property="og:image:secure_url" content="https://i.example/a.png">`,
		`<meta property="OG:Description" content="` + strings.Repeat("ä ", 600) + `">`,
		`<base href="ftp://x/"><img src="a.png"><title/>`,
		"<title>\x00\xff</title><meta content=\"x\" property=\"og:\">",
		`<meta property="og:image" content="http://[::1]:99999/">`,
	} {
		f.Add(page)
	}
	page, _ := url.Parse("https://example.org/dir/page.html")
	f.Fuzz(func(t *testing.T, body string) {
		p, err := parseHTML(strings.NewReader(body), page)
		if err != nil {
			t.Fatalf("parseHTML(%q): %v", body, err)
		}
		if p.Fields == nil {
			t.Fatalf("parseHTML(%q): nil Fields", body)
		}
		if len(p.Fields) > maxFields+2 {
			t.Fatalf("parseHTML(%q): %d fields", body, len(p.Fields))
		}
		for k, v := range p.Fields {
			if !strings.HasPrefix(k, "og:") || k == "og:image" || strings.HasPrefix(k, "og:image:") || len(k) > 100 {
				t.Fatalf("parseHTML(%q): field %q", body, k)
			}
			s, ok := v.(string)
			if !ok || s == "" || utf8.RuneCountInString(s) > maxValueRunes || s != strings.Join(strings.Fields(s), " ") {
				t.Fatalf("parseHTML(%q): field %q = %q", body, k, v)
			}
		}
		checkURL := func(what, u string) {
			if u == "" {
				return
			}
			if _, err := ValidateURL(u); err != nil || utf8.RuneCountInString(u) > maxValueRunes {
				t.Fatalf("parseHTML(%q): %s %q: %v", body, what, u, err)
			}
		}
		checkURL("image URL", p.ImageURL)
		if u, ok := p.Fields["og:url"]; ok {
			checkURL("og:url", u.(string))
		}
		if _, err := json.Marshal(p.Fields); err != nil {
			t.Fatalf("parseHTML(%q): fields do not encode: %v", body, err)
		}
	})
}
