package dendrite

import (
	"bytes"
	"context"
	"crypto/rand"
	"image"
	"image/color"
	"image/png"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testdendrite"
	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

// upload is one file sent to Dendrite's media API.
type upload struct {
	localpart, filename, contentType string
	body                             []byte
}

// TestRealDendrite uploads media through a real Dendrite v0.13.8's own
// media API, stops it, opens its dendrite.yaml and checks every item the
// source lists against what was uploaded: ID, uploader, name, type, size,
// SHA-256, creation time and exact bytes. It runs on Dendrite's SQLite
// databases (media_api.database) and on one PostgreSQL database
// (global.database, the fallback).
func TestRealDendrite(t *testing.T) {
	for _, backend := range []string{"sqlite", "postgres"} {
		t.Run(backend, func(t *testing.T) {
			opts := testdendrite.Options{ServerName: "dendrite.test"}
			if backend == "postgres" {
				opts.Database = testpg.DSN(t)
			}
			testRealDendrite(t, opts, backend)
		})
	}
}

func testRealDendrite(t *testing.T, opts testdendrite.Options, backend string) {
	d := testdendrite.Start(t, opts)
	passwords := map[string]string{"alice": "alice-password-1", "bob": "bob-password-1"}
	tokens := map[string]string{}
	for lp, pw := range passwords {
		d.CreateUser(t, lp, pw, false)
		tokens[lp] = d.Login(t, lp, pw)
	}

	text := []byte("Grüße aus Köln — ☕ and a newline\n")
	big := make([]byte, 300<<10)
	_, _ = rand.Read(big)
	uploads := []upload{
		{"alice", "café ☕ résumé.txt", "text/plain; charset=utf-8", text},
		{"alice", "pixel.png", "image/png", tinyPNG(t)},
		// The same bytes again, by someone else: Dendrite keeps one file.
		{"bob", "copy of café.txt", "text/plain", text},
		{"bob", "", "application/octet-stream", big},
		{"alice", "日本語のファイル名 (1).pdf", "application/pdf", []byte("%PDF-1.4\n%âãÏÓ\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n")},
		{"bob", `semi;colon "quoted" 100%.json`, "application/json", []byte(`{"hello":"world"}`)},
	}

	before := time.Now()
	byID := map[string]upload{}
	for _, u := range uploads {
		uri := d.UploadMedia(t, tokens[u.localpart], u.filename, u.contentType, u.body)
		server, id, ok := strings.Cut(strings.TrimPrefix(uri, "mxc://"), "/")
		if !ok || server != d.ServerName() {
			t.Fatalf("upload answered %q, want mxc://%s/<id>", uri, d.ServerName())
		}
		byID[id] = u
	}
	after := time.Now()
	d.Stop(t)

	// Dendrite stored the twice-uploaded bytes once, where the source looks.
	if _, err := os.Stat(filepath.Join(d.MediaPath(), filepath.FromSlash(hashPath(dendriteHash(text))))); err != nil {
		t.Errorf("dendrite's file for the text: %v", err)
	}

	src := open(t, d.ConfigPath())
	if !strings.Contains(src.Name(), backend) {
		t.Errorf("Name() = %q, want it to say %s", src.Name(), backend)
	}
	items := walk(t, src, importer.Filter{IncludeRemote: true})
	if len(items) != len(uploads) {
		t.Fatalf("walked %d items, want the %d uploaded", len(items), len(uploads))
	}
	var wantBytes int64
	for _, u := range uploads {
		wantBytes += int64(len(u.body))
	}
	if tot, err := src.Totals(context.Background(), importer.Filter{}); err != nil || tot != (importer.Totals{Items: int64(len(uploads)), Bytes: wantBytes}) {
		t.Errorf("Totals = %+v, %v; want %d items, %d bytes", tot, err, len(uploads), wantBytes)
	}
	for _, it := range items {
		u, ok := byID[it.MediaID]
		if !ok {
			t.Errorf("item %s/%s was not uploaded", it.ServerName, it.MediaID)
			continue
		}
		delete(byID, it.MediaID)
		checkRealItem(t, it, u, "@"+u.localpart+":"+d.ServerName(), before, after)
	}
	if len(byID) != 0 {
		t.Errorf("uploads not listed: %v", byID)
	}
	if remote := walk(t, src, importer.Filter{ServerNames: []string{"other.example"}, IncludeRemote: true}); len(remote) != 0 {
		t.Errorf("remote media listed from a Dendrite that cached none: %d items", len(remote))
	}
}

// checkRealItem compares an item with its upload.
func checkRealItem(t *testing.T, it importer.Item, u upload, userID string, before, after time.Time) {
	t.Helper()
	open := it.Open
	got := it
	got.Open = nil
	got.CreatedAt = time.Time{}
	expected := importer.Item{
		ServerName: "dendrite.test", MediaID: it.MediaID, UserID: userID,
		ContentType: u.contentType, Filename: u.filename,
		Size: int64(len(u.body)), SHA256: hexSHA(u.body),
	}
	if !reflect.DeepEqual(got, expected) {
		t.Errorf("item %s:\n got  %+v\n want %+v", it.MediaID, got, expected)
	}
	// Dendrite records milliseconds.
	if it.CreatedAt.Before(before.Truncate(time.Millisecond)) || it.CreatedAt.After(after) {
		t.Errorf("item %s created at %v, want between %v and %v", it.MediaID, it.CreatedAt, before, after)
	}
	checkOpen(t, it.MediaID, open, want{body: u.body})
}

// tinyPNG encodes a 3x2 image.
func tinyPNG(t *testing.T) []byte {
	t.Helper()
	img := image.NewRGBA(image.Rect(0, 0, 3, 2))
	img.Set(1, 1, color.RGBA{R: 200, G: 10, B: 30, A: 255})
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
