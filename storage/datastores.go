package storage

import (
	"errors"
	"fmt"
	"slices"
)

// Kind is a class of media that a datastore accepts new blobs for.
type Kind string

// Media kinds.
const (
	// KindLocal is media uploaded by local users. Exactly one datastore must
	// accept it; kinds accepted by no datastore fall back to it.
	KindLocal Kind = "local"
	// KindRemote is media cached from other servers.
	KindRemote Kind = "remote"
	// KindThumbnails is generated thumbnails.
	KindThumbnails Kind = "thumbnails"
)

// knownKinds are the kinds NewDatastores accepts.
var knownKinds = []Kind{KindLocal, KindRemote, KindThumbnails}

// Datastore is one named blob store and the kinds of media whose new blobs it
// receives.
type Datastore struct {
	// Name identifies the datastore in blob records; unique, non-empty.
	Name string
	// Store holds the bytes.
	Store BlobStore
	// Kinds are the kinds of media written to this datastore. None means the
	// datastore only serves blobs already recorded in it (for example while
	// they are migrated away, or as a migration target).
	Kinds []Kind
}

// Datastores is the set of configured datastores: blobs are read from the
// datastore named in their record and new blobs are written to the datastore
// of their kind. It is immutable after NewDatastores and safe for concurrent
// use.
type Datastores struct {
	names  []string
	stores map[string]BlobStore
	kinds  map[Kind]string
	local  string
}

// NewDatastores checks and indexes ds: names must be unique and non-empty,
// stores non-nil, kinds known and each accepted by at most one datastore, and
// one datastore must accept KindLocal. Kinds accepted by none fall back to
// the KindLocal datastore.
func NewDatastores(ds ...Datastore) (*Datastores, error) {
	d := &Datastores{stores: make(map[string]BlobStore, len(ds)), kinds: map[Kind]string{}}
	for i, s := range ds {
		if s.Name == "" {
			return nil, fmt.Errorf("configuring datastores: datastore %d has no name", i)
		}
		if _, dup := d.stores[s.Name]; dup {
			return nil, fmt.Errorf("configuring datastores: name %q used twice", s.Name)
		}
		if s.Store == nil {
			return nil, fmt.Errorf("configuring datastores: datastore %q has no store", s.Name)
		}
		for _, k := range s.Kinds {
			if !slices.Contains(knownKinds, k) {
				return nil, fmt.Errorf("configuring datastores: datastore %q: unknown kind %q (want one of %v)", s.Name, k, knownKinds)
			}
			if other, taken := d.kinds[k]; taken {
				return nil, fmt.Errorf("configuring datastores: kind %q accepted by both %q and %q", k, other, s.Name)
			}
			d.kinds[k] = s.Name
		}
		d.stores[s.Name] = s.Store
		d.names = append(d.names, s.Name)
	}
	local, ok := d.kinds[KindLocal]
	if !ok {
		return nil, fmt.Errorf("configuring datastores: no datastore accepts kind %q", KindLocal)
	}
	d.local = local
	return d, nil
}

// Get returns the store of the named datastore.
func (d *Datastores) Get(name string) (BlobStore, bool) {
	s, ok := d.stores[name]
	return s, ok
}

// ForKind returns the datastore that new blobs of kind k are written to: the
// one accepting k, else the one accepting KindLocal.
func (d *Datastores) ForKind(k Kind) (name string, store BlobStore) {
	name, ok := d.kinds[k]
	if !ok {
		name = d.local
	}
	return name, d.stores[name]
}

// Names returns the datastore names in configuration order.
func (d *Datastores) Names() []string {
	return slices.Clone(d.names)
}

// Close closes every store and returns their errors joined.
func (d *Datastores) Close() error {
	var errs []error
	for _, name := range d.names {
		if err := d.stores[name].Close(); err != nil {
			errs = append(errs, fmt.Errorf("closing datastore %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}
