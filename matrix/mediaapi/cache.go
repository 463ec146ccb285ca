package mediaapi

import (
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// mediaKey identifies a media item. A struct key makes map lookups free of
// allocations (no concatenation).
type mediaKey struct {
	server, id string
}

// mediaEntry is a ready media row plus the response header values derived
// from it, computed once when the row enters the cache. Entries are immutable.
type mediaEntry struct {
	m storage.Media

	contentType   []string
	contentLength []string
	etag          []string
	lastModified  []string
	// disposition uses the stored file name.
	disposition []string
	// etagValue is etag[0], for conditional request checks.
	etagValue string
	// lastModValue is lastModified[0].
	lastModValue string
	// data, when not nil, is the whole content held in memory: a thumbnail
	// answered while it is being stored (see Repository.thumbnail). It is
	// served from memory, never redirected, and never changed.
	data []byte
}

// newMediaEntry derives the header values of a ready media row.
func newMediaEntry(m storage.Media) *mediaEntry {
	ct := m.ContentType
	e := &mediaEntry{m: m}
	if ct == "" {
		e.contentType = hdrOctetStream
		ct = "application/octet-stream"
	} else {
		e.contentType = hdr(ct)
	}
	e.contentLength = hdr(strconv.FormatInt(m.Size, 10))
	e.etagValue = `"` + m.SHA256 + `"`
	e.etag = hdr(e.etagValue)
	mod := m.UploadedAt
	if mod.IsZero() {
		mod = m.CreatedAt
	}
	e.lastModValue = mod.UTC().Format(http.TimeFormat)
	e.lastModified = hdr(e.lastModValue)
	e.disposition = hdr(matrix.ContentDisposition(ct, m.Filename, false))
	return e
}

// mediaCache is a bounded cache of ready media entries with CLOCK
// (second-chance) eviction, an approximation of LRU whose hits only take a
// read lock and set a flag: entries used since the clock hand last passed
// survive one more round.
//
// It is deliberately not an internal/capped.Map (the module's bounded-cache
// type): it sits on the download hot path, where concurrent hits of the same
// popular media must not serialize. A capped.Map hit takes an exclusive lock
// to move the entry to the front of its LRU list; a hit here takes only the
// read lock. Entries never expire (a row leaves by remove), so the Map's
// per-entry expiry would buy nothing either.
type mediaCache struct {
	mu    sync.RWMutex
	items map[mediaKey]int // index into slots
	slots []*cacheSlot
	hand  int
	cap   int
}

type cacheSlot struct {
	key   mediaKey
	entry *mediaEntry
	used  atomic.Bool
}

func newMediaCache(capacity int) *mediaCache {
	return &mediaCache{
		items: make(map[mediaKey]int, min(capacity, 1024)),
		cap:   capacity,
	}
}

// get returns the cached entry or nil.
func (c *mediaCache) get(k mediaKey) *mediaEntry {
	c.mu.RLock()
	i, ok := c.items[k]
	if !ok {
		c.mu.RUnlock()
		return nil
	}
	s := c.slots[i]
	e := s.entry
	if !s.used.Load() {
		// Only write when the flag changes, so hot entries do not bounce
		// their cache line between cores.
		s.used.Store(true)
	}
	c.mu.RUnlock()
	return e
}

// put adds or replaces an entry, evicting one when full.
func (c *mediaCache) put(k mediaKey, e *mediaEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i, ok := c.items[k]; ok {
		// Slots are read under the read lock only, so replace rather than
		// mutate.
		c.slots[i] = &cacheSlot{key: k, entry: e}
		return
	}
	if len(c.slots) < c.cap {
		c.slots = append(c.slots, &cacheSlot{key: k, entry: e})
		c.items[k] = len(c.slots) - 1
		return
	}
	// Advance the hand past recently used slots, clearing their flag.
	for {
		s := c.slots[c.hand]
		if s.used.Load() {
			s.used.Store(false)
			c.hand = (c.hand + 1) % len(c.slots)
			continue
		}
		delete(c.items, s.key)
		c.slots[c.hand] = &cacheSlot{key: k, entry: e}
		c.items[k] = c.hand
		c.hand = (c.hand + 1) % len(c.slots)
		return
	}
}

// remove drops an entry if present.
func (c *mediaCache) remove(k mediaKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	i, ok := c.items[k]
	if !ok {
		return
	}
	delete(c.items, k)
	last := len(c.slots) - 1
	if i != last {
		moved := c.slots[last]
		c.slots[i] = moved
		c.items[moved.key] = i
	}
	c.slots[last] = nil
	c.slots = c.slots[:last]
	if c.hand >= len(c.slots) {
		c.hand = 0
	}
}

// removeIf drops every entry for which drop returns true. The entries are
// chosen under the read lock (drop must not block) and removed one by one,
// so that downloads are never held up by a whole scan.
func (c *mediaCache) removeIf(drop func(mediaKey, *mediaEntry) bool) {
	if c == nil {
		return
	}
	var keys []mediaKey
	c.mu.RLock()
	for _, s := range c.slots {
		if drop(s.key, s.entry) {
			keys = append(keys, s.key)
		}
	}
	c.mu.RUnlock()
	for _, k := range keys {
		c.remove(k)
	}
}

// len returns the number of cached entries.
func (c *mediaCache) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.items)
}
