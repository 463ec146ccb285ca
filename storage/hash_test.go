package storage_test

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

func TestValidSHA256(t *testing.T) {
	sum := sha256.Sum256([]byte("x"))
	good := hex.EncodeToString(sum[:])
	tests := map[string]bool{
		good:                    true,
		strings.Repeat("0", 64): true,
		strings.Repeat("f", 64): true,
		strings.ToUpper(good):   false,
		good[:63]:               false,
		good + "a":              false,
		"":                      false,
		"g" + good[1:]:          false,
		"/" + good[1:]:          false,
		strings.Repeat(".", 64): false,
		good[:63] + "\x00":      false,
		strings.Repeat("é", 32): false,
	}
	for h, want := range tests {
		if got := storage.ValidSHA256(h); got != want {
			t.Errorf("ValidSHA256(%q) = %v, want %v", h, got, want)
		}
	}
}
