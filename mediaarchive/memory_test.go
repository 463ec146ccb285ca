package mediaarchive

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// heapProbe is a writer that counts what it is given and samples the heap in use every sampleEvery bytes.
type heapProbe struct {
	n, next, sampleEvery int64
	peak                 uint64
}

func (p *heapProbe) Write(b []byte) (int, error) {
	p.n += int64(len(b))
	if p.n >= p.next {
		p.next = p.n + p.sampleEvery
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		p.peak = max(p.peak, ms.HeapInuse)
	}
	return len(b), nil
}

// TestExportMemoryBounded exports 200 MiB in 50 items (video, stored, and
// octet-stream, deflated) and checks that the heap in use never grows by
// more than 24 MiB: the content is streamed, never held. It logs the
// export's throughput.
func TestExportMemoryBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 200 MiB; skipped under -short")
	}
	e := newEnv(t, backends[0].Open)
	const items, size = 50, 4 << 20
	r := rand.NewChaCha8([32]byte{7})
	buf := make([]byte, size)
	at := ms(2025, 5, 5, 5, 5, 5, 5)
	for i := range items {
		_, _ = r.Read(buf)
		ctype := "video/mp4"
		if i%5 == 0 {
			ctype = "application/octet-stream"
		}
		e.put(t, storage.Media{ServerName: "example.org", MediaID: fmt.Sprintf("big%02d", i), UserID: alice,
			ContentType: ctype, Filename: fmt.Sprintf("clip %d.mp4", i), CreatedAt: at}, buf)
	}
	buf = nil
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	probe := &heapProbe{sampleEvery: 4 << 20}
	start := time.Now()
	sum, err := Export(context.Background(), probe, e.source(), Selection{ServerName: "example.org", UserID: alice}, ExportOptions{})
	elapsed := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Files != items || sum.Bytes != items*size {
		t.Fatalf("summary %+v", sum)
	}
	growth := int64(probe.peak) - int64(before.HeapInuse)
	t.Logf("exported %d MiB (archive %d MiB) in %v: %.0f MB/s; heap in use %d MiB before, peak %d MiB (growth %d MiB)",
		sum.Bytes>>20, probe.n>>20, elapsed.Round(time.Millisecond), float64(probe.n)/1e6/elapsed.Seconds(),
		before.HeapInuse>>20, probe.peak>>20, growth>>20)
	if probe.n < items*size {
		t.Errorf("archive of %d bytes holds less than its content", probe.n)
	}
	if growth > 24<<20 {
		t.Errorf("heap in use grew by %d MiB during a %d MiB export", growth>>20, probe.n>>20)
	}
}
