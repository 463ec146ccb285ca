// Package bytesize parses and formats the sizes written in the module's
// configuration (max_upload_size 50MiB, upload_bytes 2GiB/1h, max_bytes 1GB,
// ...). It is the one size parser of the module, so every size setting
// accepts the same syntax.
//
// Syntax: a decimal number, then optional white space, then an optional
// unit, case-insensitive, then optional white space.
//
//   - The number is ASCII digits, which may be grouped with commas
//     (1,048,576), with an optional fraction after a dot (1.5GiB, .5MiB).
//     At least one digit; no sign, no exponent, no leading space.
//   - Units: none or b (bytes); k, kb (1000); ki, kib (1024); m, mb
//     (1000²); mi, mib (1024²); and likewise g/gi, t/ti, p/pi and e/ei
//     with or without the trailing b. So 10MB is 10,000,000 bytes and 10MiB
//     10,485,760.
//   - A fraction of a byte is dropped (1.5 is 1 byte; 0.3KB is 300).
//   - The value must be at most 2⁶³-1 bytes (math.MaxInt64, 8 EiB less a
//     byte).
//
// This is the syntax of github.com/dustin/go-humanize's ParseBytes, which
// the module used before, computed exactly (no float rounding), except
// that commas are not allowed in the fraction.
package bytesize

import (
	"errors"
	"fmt"
	"math/big"
	"strconv"
	"strings"
)

// units maps each accepted unit (lower case) to its multiplier.
var units = map[string]int64{
	"": 1, "b": 1,
	"k": 1e3, "kb": 1e3, "ki": 1 << 10, "kib": 1 << 10,
	"m": 1e6, "mb": 1e6, "mi": 1 << 20, "mib": 1 << 20,
	"g": 1e9, "gb": 1e9, "gi": 1 << 30, "gib": 1 << 30,
	"t": 1e12, "tb": 1e12, "ti": 1 << 40, "tib": 1 << 40,
	"p": 1e15, "pb": 1e15, "pi": 1 << 50, "pib": 1 << 50,
	"e": 1e18, "eb": 1e18, "ei": 1 << 60, "eib": 1 << 60,
}

// binaryUnits are the units Format writes, largest first.
var binaryUnits = []struct {
	name string
	size int64
}{{"EiB", 1 << 60}, {"PiB", 1 << 50}, {"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}}

// ErrSyntax is wrapped by the error of a size that is not written in the
// package's syntax.
var ErrSyntax = errors.New("not a size (want a number with an optional unit, such as 50MiB, 10MB, 1.5GiB or 1048576)")

// ErrRange is wrapped by the error of a size above math.MaxInt64 bytes.
var ErrRange = errors.New("size larger than 8 EiB")

// Parse returns the number of bytes s stands for (see the package doc for
// the syntax), from 0 to math.MaxInt64.
func Parse(s string) (int64, error) {
	i := 0
	var whole, frac strings.Builder
	for i < len(s) && (isDigit(s[i]) || s[i] == ',') {
		if s[i] != ',' {
			whole.WriteByte(s[i])
		}
		i++
	}
	if i < len(s) && s[i] == '.' {
		i++
		for i < len(s) && isDigit(s[i]) {
			frac.WriteByte(s[i])
			i++
		}
	}
	if whole.Len()+frac.Len() == 0 {
		return 0, fmt.Errorf("%q: %w", s, ErrSyntax)
	}
	unit, ok := units[strings.ToLower(strings.TrimSpace(s[i:]))]
	if !ok {
		return 0, fmt.Errorf("%q: unknown unit %q: %w", s, strings.TrimSpace(s[i:]), ErrSyntax)
	}
	// n = (whole.frac digits as an integer) * unit / 10^len(frac), exactly.
	n, ok := new(big.Int).SetString(whole.String()+frac.String(), 10)
	if !ok {
		return 0, fmt.Errorf("%q: %w", s, ErrSyntax)
	}
	n.Mul(n, big.NewInt(unit))
	if frac.Len() > 0 {
		n.Quo(n, new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(frac.Len())), nil))
	}
	if !n.IsInt64() {
		return 0, fmt.Errorf("%q: %w", s, ErrRange)
	}
	return n.Int64(), nil
}

// Format writes n (at least 0) so that Parse reads it back exactly: in the
// largest binary unit that divides it (50MiB), else in bytes (1000).
func Format(n int64) string {
	if n > 0 {
		for _, u := range binaryUnits {
			if n%u.size == 0 {
				return strconv.FormatInt(n/u.size, 10) + u.name
			}
		}
	}
	return strconv.FormatInt(n, 10)
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }
