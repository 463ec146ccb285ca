package auth

import (
	"context"
	"strconv"
	"testing"
)

// BenchmarkTokenCacheHit measures a warm cache lookup (hash, map, LRU move)
// from parallel goroutines over 1000 distinct tokens, as on a busy site.
func BenchmarkTokenCacheHit(b *testing.B) {
	f := newAuthFixture(b, CacheOptions{})
	tokens := make([]string, 1000)
	for i := range tokens {
		tokens[i] = "syt_dXNlcg_" + strconv.Itoa(i) + "_abcdefghijklmnopqrst_0a1b2c"
		f.hs.addToken(tokens[i], "@user"+strconv.Itoa(i)+":hs")
		if _, err := f.auth(tokens[i]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := f.site.Authenticate(context.Background(), Credentials{Token: tokens[i%len(tokens)]}); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	if n := f.hs.whoamis.Load(); n != int64(len(tokens)) {
		b.Fatalf("%d whoami calls, want %d", n, len(tokens))
	}
}
