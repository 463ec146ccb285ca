package e2e

import (
	"encoding/json"
	"fmt"
	"sync"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/testpg"
)

// TestQuotaAcrossInstances runs two Caddy processes on one PostgreSQL
// database and one storage directory, with the same quota rule: 20
// concurrent uploads of 1,000 distinct bytes each, spread over both, race
// for a quota of 10,000 bytes. Exactly 10 succeed, the others get 403
// M_FORBIDDEN, and both instances report the same usage.
func TestQuotaAcrossInstances(t *testing.T) {
	dsn := testpg.DSN(t)
	hs := newHomeserver(t, map[string]string{"tok": "@alice:a.test"})
	quota := []string{"quotas {", "\trule @*:a.test {", "\t\tmax_bytes 10000", "\t}", "}"}
	cfgA := newConfig(t, hs, site{serverName: "a.test", extra: quota})
	cfgA.database = "postgres {env.MATRIX_MEDIA_E2E_DSN}"
	cfgB := newConfig(t, hs, site{serverName: "a.test", extra: quota})
	cfgB.database, cfgB.storagePath = cfgA.database, cfgA.storagePath
	instA := startCaddy(t, cfgA, "MATRIX_MEDIA_E2E_DSN="+dsn)
	instB := startCaddy(t, cfgB, "MATRIX_MEDIA_E2E_DSN="+dsn)
	clients := []*siteClient{newSiteClient(instA, "a.test", "tok", true), newSiteClient(instB, "a.test", "tok", true)}

	const uploads, size = 20, 1000
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		statuses = map[string]int{}
	)
	for i := range uploads {
		wg.Go(func() {
			body := fmt.Appendf(nil, "%0*d", size, i)
			r, err := clients[i%2].do(request{method: "POST", path: "/_matrix/media/v3/upload", body: body, contentType: "application/octet-stream"})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				statuses[err.Error()]++
			default:
				statuses[fmt.Sprintf("%d %s", r.status, r.errcode())]++
			}
		})
	}
	wg.Wait()
	if statuses["200 "] != 10 || statuses["403 M_FORBIDDEN"] != 10 {
		t.Fatalf("outcomes %v: want 10 uploads stored and 10 refused", statuses)
	}
	for i, c := range clients {
		r := c.must(t, request{method: "GET", path: "/_matrix/client/v1/media/usage"})
		var usage map[string]int64
		if r.status != 200 || json.Unmarshal(r.body, &usage) != nil || usage["m.storage.used"] != 10*size || usage["m.storage.files"] != 10 {
			t.Errorf("usage through instance %d: %d %s", i, r.status, r.body)
		}
	}
}
