package capped

import (
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testclock"
)

// op is one step of a table test: put (with an optional ttl), get, delete
// or advance the clock, and what get should return.
type op struct {
	do      string // "put", "ttl", "until", "get", "del", "tick"
	key     string
	val     int
	ttl     time.Duration
	wantVal int
	wantOK  bool
}

// keys lists the map's keys from most to least recently used.
func keys(m *Map[string, int]) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for n := m.head.next; n != &m.head; n = n.next {
		out = append(out, n.key)
	}
	return out
}

func TestMap(t *testing.T) {
	tests := []struct {
		name     string
		max      int
		ops      []op
		wantKeys []string // most recent first
	}{
		{
			name:     "get of a missing key",
			max:      2,
			ops:      []op{{do: "get", key: "a"}},
			wantKeys: nil,
		},
		{
			name: "put then get",
			max:  2,
			ops: []op{
				{do: "put", key: "a", val: 1},
				{do: "get", key: "a", wantVal: 1, wantOK: true},
			},
			wantKeys: []string{"a"},
		},
		{
			name: "least recently put is evicted",
			max:  2,
			ops: []op{
				{do: "put", key: "a", val: 1},
				{do: "put", key: "b", val: 2},
				{do: "put", key: "c", val: 3},
				{do: "get", key: "a"},
				{do: "get", key: "b", wantVal: 2, wantOK: true},
				{do: "get", key: "c", wantVal: 3, wantOK: true},
			},
			wantKeys: []string{"c", "b"},
		},
		{
			name: "a get protects from eviction",
			max:  2,
			ops: []op{
				{do: "put", key: "a", val: 1},
				{do: "put", key: "b", val: 2},
				{do: "get", key: "a", wantVal: 1, wantOK: true},
				{do: "put", key: "c", val: 3},
				{do: "get", key: "b"},
			},
			wantKeys: []string{"c", "a"},
		},
		{
			name: "replacing a key neither grows nor evicts",
			max:  2,
			ops: []op{
				{do: "put", key: "a", val: 1},
				{do: "put", key: "b", val: 2},
				{do: "put", key: "a", val: 10},
				{do: "get", key: "a", wantVal: 10, wantOK: true},
				{do: "get", key: "b", wantVal: 2, wantOK: true},
			},
			wantKeys: []string{"b", "a"},
		},
		{
			name: "ttl: live before, gone at the expiry instant",
			max:  4,
			ops: []op{
				{do: "ttl", key: "a", val: 1, ttl: time.Minute},
				{do: "tick", ttl: time.Minute - time.Nanosecond},
				{do: "get", key: "a", wantVal: 1, wantOK: true},
				{do: "tick", ttl: time.Nanosecond},
				{do: "get", key: "a"},
			},
			wantKeys: nil,
		},
		{
			name: "until: absolute deadline",
			max:  4,
			ops: []op{
				{do: "until", key: "a", val: 1, ttl: 2 * time.Second},
				{do: "tick", ttl: time.Second},
				{do: "get", key: "a", wantVal: 1, wantOK: true},
				{do: "tick", ttl: time.Second},
				{do: "get", key: "a"},
			},
		},
		{
			name: "put without ttl never expires",
			max:  4,
			ops: []op{
				{do: "put", key: "a", val: 1},
				{do: "tick", ttl: 100 * 365 * 24 * time.Hour},
				{do: "get", key: "a", wantVal: 1, wantOK: true},
			},
			wantKeys: []string{"a"},
		},
		{
			name: "replacing renews the expiry",
			max:  4,
			ops: []op{
				{do: "ttl", key: "a", val: 1, ttl: time.Second},
				{do: "tick", ttl: 900 * time.Millisecond},
				{do: "ttl", key: "a", val: 2, ttl: time.Second},
				{do: "tick", ttl: 900 * time.Millisecond},
				{do: "get", key: "a", wantVal: 2, wantOK: true},
			},
			wantKeys: []string{"a"},
		},
		{
			name: "delete",
			max:  4,
			ops: []op{
				{do: "put", key: "a", val: 1},
				{do: "put", key: "b", val: 2},
				{do: "del", key: "a"},
				{do: "del", key: "zz"},
				{do: "get", key: "a"},
			},
			wantKeys: []string{"b"},
		},
		{
			name: "an expired entry is evicted in LRU order like any other",
			max:  2,
			ops: []op{
				{do: "put", key: "a", val: 1},
				{do: "ttl", key: "b", val: 2, ttl: time.Second},
				{do: "tick", ttl: time.Hour},
				{do: "put", key: "c", val: 3},
				{do: "get", key: "a"},
				{do: "get", key: "b"},
			},
			wantKeys: []string{"c"},
		},
		{
			name: "capacity one",
			max:  1,
			ops: []op{
				{do: "put", key: "a", val: 1},
				{do: "put", key: "b", val: 2},
				{do: "put", key: "c", val: 3},
				{do: "get", key: "c", wantVal: 3, wantOK: true},
			},
			wantKeys: []string{"c"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock := testclock.New(time.Unix(1_700_000_000, 0))
			m := New(Options[string, int]{Max: tc.max, Now: clock.Now})
			for i, o := range tc.ops {
				switch o.do {
				case "put":
					m.Put(o.key, o.val)
				case "ttl":
					m.PutTTL(o.key, o.val, o.ttl)
				case "until":
					m.PutUntil(o.key, o.val, clock.Now().Add(o.ttl))
				case "get":
					v, ok := m.Get(o.key)
					if v != o.wantVal || ok != o.wantOK {
						t.Fatalf("op %d: Get(%q) = %d, %v, want %d, %v", i, o.key, v, ok, o.wantVal, o.wantOK)
					}
				case "del":
					m.Delete(o.key)
				case "tick":
					clock.Advance(o.ttl)
				default:
					t.Fatalf("bad op %q", o.do)
				}
			}
			if got := keys(m); !slices.Equal(got, tc.wantKeys) {
				t.Errorf("keys (most recent first) = %q, want %q", got, tc.wantKeys)
			}
			if m.Len() != len(tc.wantKeys) {
				t.Errorf("Len() = %d, want %d", m.Len(), len(tc.wantKeys))
			}
		})
	}
}

func TestNewPanicsWithoutMax(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Fatal("New with Max 0 did not panic")
		}
	}()
	New(Options[string, int]{})
}

// TestConcurrent hammers one map from several goroutines (run with -race)
// and then checks the bound and the list/map agreement.
func TestConcurrent(t *testing.T) {
	const max, workers, rounds = 64, 8, 2000
	clock := testclock.New(time.Unix(1_700_000_000, 0))
	m := New(Options[string, int]{Max: max, Now: clock.Now})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range rounds {
				k := strconv.Itoa((w*7 + i) % (max * 2))
				switch i % 5 {
				case 0:
					m.PutTTL(k, i, time.Second)
				case 1:
					m.Put(k, i)
				case 2:
					m.Delete(k)
				case 3:
					clock.Advance(time.Millisecond)
				default:
					if v, ok := m.Get(k); ok && v < 0 {
						t.Errorf("Get(%q) = %d", k, v)
					}
				}
			}
		}()
	}
	wg.Wait()
	if n := m.Len(); n > max {
		t.Fatalf("Len() = %d > Max %d", n, max)
	}
	ks := keys(m)
	if len(ks) != m.Len() {
		t.Fatalf("list holds %d keys, map %d", len(ks), m.Len())
	}
	for _, k := range ks {
		if _, ok := m.entries[k]; !ok {
			t.Fatalf("listed key %q missing from the map", k)
		}
	}
}

func BenchmarkGetHit(b *testing.B) {
	m := New(Options[string, int]{Max: 1024})
	for i := range 1024 {
		m.Put(strconv.Itoa(i), i)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		if _, ok := m.Get(strconv.Itoa(i & 1023)); !ok {
			b.Fatal("miss")
		}
	}
}

func BenchmarkPutEvict(b *testing.B) {
	m := New(Options[int, int]{Max: 1024})
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		m.PutTTL(i, i, time.Minute)
	}
}

func BenchmarkGetHitParallel(b *testing.B) {
	m := New(Options[int, string]{Max: 1024})
	for i := range 1024 {
		m.Put(i, fmt.Sprint(i))
	}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			m.Get(i & 1023)
			i++
		}
	})
}
