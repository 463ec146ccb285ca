package mediaapi

import (
	"context"
	"net/url"
	"strings"
	"testing"
)

// An upload whose Content-Type is a list (browsers take its last type) is
// stored as sent and served as an attachment.
func TestUploadContentTypeListServedAsAttachment(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		ct, wantDisp string
	}{
		{"text/plain; charset=utf-8, text/html", "attachment"},
		{"text/plain;,text/html", "attachment"},
		{"image/png;x=y,text/html", "attachment"},
		{"image/png, text/html", "attachment"},
		{"text/plain;", "attachment"},
		{"text/plain; charset=utf-8", "inline"},
		{"image/png;x=y", "inline"},
	}
	for _, tc := range tests {
		t.Run(tc.ct, func(t *testing.T) {
			id := e.upload("alice", []byte("<script>alert(1)</script>"), tc.ct, "")
			m, err := e.sql.GetMedia(context.Background(), testServer, id)
			if err != nil || m.ContentType != tc.ct {
				t.Fatalf("stored %q, %v; want %q", m.ContentType, err, tc.ct)
			}
			for _, path := range []string{"/_matrix/media/v3/download/test/" + id, "/_matrix/client/v1/media/download/test/" + id} {
				rec := e.do(req{method: "GET", path: path, token: "alice"})
				if rec.Code != 200 {
					t.Fatalf("%s: %d %s", path, rec.Code, rec.Body)
				}
				if cd := rec.Header().Get("Content-Disposition"); cd != tc.wantDisp {
					t.Fatalf("%s: Content-Disposition %q, want %q", path, cd, tc.wantDisp)
				}
			}
		})
	}
}

// Bidirectional controls in the filename are stripped at upload, and from
// any name when a download's Content-Disposition is made.
func TestUploadFilenameBidiControls(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name, want string
	}{
		{"invoice\u202Egnp.exe", "invoicegnp.exe"},
		{"\u2066a\u2069\u200E\u200F\u061C.pdf", "a.pdf"},
		{"\u202Dx\u202A\u202B\u202C\u2067\u2068.txt", "x.txt"},
		{"ملف.pdf", "ملف.pdf"},
	}
	for _, tc := range tests {
		t.Run(tc.want, func(t *testing.T) {
			id := e.upload("alice", []byte("data"), "application/pdf", "?filename="+url.QueryEscape(tc.name))
			m, err := e.sql.GetMedia(context.Background(), testServer, id)
			if err != nil || m.Filename != tc.want {
				t.Fatalf("stored filename %q, %v; want %q", m.Filename, err, tc.want)
			}
			rec := e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id, token: "alice"})
			cd := rec.Header().Get("Content-Disposition")
			if rec.Code != 200 || !strings.HasPrefix(cd, "attachment; filename") {
				t.Fatalf("%d %q", rec.Code, cd)
			}
			// A name in the download URL is cleaned the same way.
			rec = e.do(req{method: "GET", path: "/_matrix/client/v1/media/download/test/" + id + "/" + url.PathEscape(tc.name), token: "alice"})
			if cd2 := rec.Header().Get("Content-Disposition"); rec.Code != 200 || cd2 != cd {
				t.Fatalf("URL name: %d %q, want %q", rec.Code, cd2, cd)
			}
		})
	}
}
