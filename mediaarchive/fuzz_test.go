package mediaarchive

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
)

// FuzzManifest decodes arbitrary manifests: errors wrap ErrInvalidArchive,
// nothing panics, and every item accepted passes the checks again.
func FuzzManifest(f *testing.F) {
	f.Add([]byte(manifestJSON(itemJSON(""))))
	f.Add([]byte(manifestJSON(itemJSON(""), itemJSON(`,"quarantined":true,"quarantined_by":"@m:example.org"`))))
	f.Add([]byte(manifestJSON()))
	f.Add([]byte(`{"items":[]}`))
	f.Add([]byte(`{"format":"caddy-matrix-media-archive","version":1,"export":{"kind":"user","server_name":"a.b","user_id":"@u:a.b"},"items":[{}]}`))
	f.Add([]byte(`[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[`))
	f.Add([]byte(`{"format":"` + strings.Repeat("\\u0000", 100) + `"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		_, err := readManifest(bytes.NewReader(data), nil, func(_ int, it Item) error {
			if cerr := checkItem(it); cerr != nil {
				t.Errorf("an item that fails its checks was accepted: %v", cerr)
			}
			return nil
		})
		if err != nil && !errors.Is(err, ErrInvalidArchive) {
			t.Errorf("error %v does not wrap ErrInvalidArchive", err)
		}
	})
}

// FuzzOpenArchive opens arbitrary bytes as an archive and, when they are
// accepted, lists and reads every item (each up to 1 MiB): errors, never a
// panic or an unbounded allocation.
func FuzzOpenArchive(f *testing.F) {
	f.Add(validArchive(f))
	f.Add(buildZip(f, zipEntry{ManifestName, []byte(manifestJSON())}))
	f.Add(buildZip(f, zipEntry{"media/example.org/abc/hello.txt", []byte("hellO")}, zipEntry{ManifestName, []byte(manifestJSON(itemJSON("")))}))
	f.Add([]byte("PK\x05\x06\x00\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x00\x00"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		src, err := NewSource(bytes.NewReader(data), int64(len(data)), "fuzz")
		if err != nil {
			if !errors.Is(err, ErrInvalidArchive) {
				t.Errorf("error %v does not wrap ErrInvalidArchive", err)
			}
			return
		}
		defer src.Close()
		ctx := context.Background()
		if _, err := src.Totals(ctx, importer.Filter{IncludeRemote: true}); err != nil {
			t.Errorf("Totals of an accepted archive: %v", err)
		}
		n := 0
		err = src.Walk(ctx, importer.Filter{IncludeRemote: true}, func(it importer.Item) error {
			if n++; n > 100 {
				return io.EOF
			}
			rc, err := it.Open(ctx)
			if err != nil {
				return nil
			}
			defer rc.Close()
			_, _ = io.Copy(io.Discard, io.LimitReader(rc, 1<<20))
			return nil
		})
		if err != nil && err != io.EOF {
			t.Errorf("Walk of an accepted archive: %v", err)
		}
	})
}
