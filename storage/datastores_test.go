package storage_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// closeStore is a BlobStore that only records Close.
type closeStore struct {
	storage.BlobStore
	closed int
	err    error
}

func (c *closeStore) Close() error {
	c.closed++
	return c.err
}

func TestNewDatastores(t *testing.T) {
	s1, s2, s3 := &closeStore{}, &closeStore{}, &closeStore{}
	ds := func(name string, s storage.BlobStore, kinds ...storage.Kind) storage.Datastore {
		return storage.Datastore{Name: name, Store: s, Kinds: kinds}
	}
	tests := []struct {
		name    string
		in      []storage.Datastore
		wantErr string
		// kinds maps each kind to the datastore expected from ForKind.
		kinds map[storage.Kind]string
	}{
		{
			name:  "one local store takes every kind",
			in:    []storage.Datastore{ds("disk", s1, storage.KindLocal)},
			kinds: map[storage.Kind]string{storage.KindLocal: "disk", storage.KindRemote: "disk", storage.KindThumbnails: "disk"},
		},
		{
			name: "kinds split, read-only store allowed",
			in: []storage.Datastore{
				ds("old", s1),
				ds("disk", s2, storage.KindLocal, storage.KindThumbnails),
				ds("s3", s3, storage.KindRemote),
			},
			kinds: map[storage.Kind]string{storage.KindLocal: "disk", storage.KindRemote: "s3", storage.KindThumbnails: "disk"},
		},
		{
			name:  "unaccepted kinds fall back to local",
			in:    []storage.Datastore{ds("t", s1, storage.KindThumbnails), ds("l", s2, storage.KindLocal)},
			kinds: map[storage.Kind]string{storage.KindLocal: "l", storage.KindRemote: "l", storage.KindThumbnails: "t"},
		},
		{name: "none", wantErr: "no datastore accepts kind \"local\""},
		{name: "no local", in: []storage.Datastore{ds("r", s1, storage.KindRemote)}, wantErr: "no datastore accepts kind \"local\""},
		{name: "empty name", in: []storage.Datastore{ds("", s1, storage.KindLocal)}, wantErr: "has no name"},
		{name: "duplicate name", in: []storage.Datastore{ds("a", s1, storage.KindLocal), ds("a", s2)}, wantErr: "used twice"},
		{name: "nil store", in: []storage.Datastore{ds("a", nil, storage.KindLocal)}, wantErr: "has no store"},
		{name: "unknown kind", in: []storage.Datastore{ds("a", s1, storage.KindLocal, "avatars")}, wantErr: "unknown kind"},
		{
			name:    "kind twice",
			in:      []storage.Datastore{ds("a", s1, storage.KindLocal, storage.KindRemote), ds("b", s2, storage.KindRemote)},
			wantErr: "accepted by both \"a\" and \"b\"",
		},
		{
			name:    "kind twice in one store",
			in:      []storage.Datastore{ds("a", s1, storage.KindLocal, storage.KindLocal)},
			wantErr: "accepted by both",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := storage.NewDatastores(tt.in...)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("NewDatastores error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("NewDatastores: %v", err)
			}
			var names []string
			for _, in := range tt.in {
				names = append(names, in.Name)
				got, ok := d.Get(in.Name)
				if !ok || got != in.Store {
					t.Errorf("Get(%q) = %v, %v; want its store", in.Name, got, ok)
				}
			}
			if got := d.Names(); !slices.Equal(got, names) {
				t.Errorf("Names() = %v, want %v", got, names)
			}
			if _, ok := d.Get("missing"); ok {
				t.Error("Get(missing) found a store")
			}
			for k, want := range tt.kinds {
				name, store := d.ForKind(k)
				wantStore, _ := d.Get(want)
				if name != want || store != wantStore {
					t.Errorf("ForKind(%s) = %q, want %q", k, name, want)
				}
			}
		})
	}
}

func TestDatastoresNamesIsACopy(t *testing.T) {
	d, err := storage.NewDatastores(storage.Datastore{Name: "a", Store: &closeStore{}, Kinds: []storage.Kind{storage.KindLocal}})
	if err != nil {
		t.Fatal(err)
	}
	d.Names()[0] = "changed"
	if got := d.Names(); got[0] != "a" {
		t.Fatalf("Names() after changing a returned slice = %v", got)
	}
}

func TestDatastoresClose(t *testing.T) {
	errA, errC := errors.New("a broke"), errors.New("c broke")
	a, b, c := &closeStore{err: errA}, &closeStore{}, &closeStore{err: errC}
	d, err := storage.NewDatastores(
		storage.Datastore{Name: "a", Store: a, Kinds: []storage.Kind{storage.KindLocal}},
		storage.Datastore{Name: "b", Store: b},
		storage.Datastore{Name: "c", Store: c},
	)
	if err != nil {
		t.Fatal(err)
	}
	err = d.Close()
	if !errors.Is(err, errA) || !errors.Is(err, errC) || !strings.Contains(err.Error(), "closing datastore c") {
		t.Fatalf("Close() = %v, want both errors joined with the datastore names", err)
	}
	for name, s := range map[string]*closeStore{"a": a, "b": b, "c": c} {
		if s.closed != 1 {
			t.Errorf("store %s closed %d times, want 1", name, s.closed)
		}
	}
}
