// Package xmatrix implements the signing foundation of Matrix federation for
// the media repository: canonical JSON, ed25519 signing keys (Synapse and
// Dendrite key files), signing and verifying JSON objects, the X-Matrix
// Authorization header, and verification of inbound federation requests
// against keys published at /_matrix/key/v2/server.
//
// Only the Go standard library is used.
package xmatrix

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// maxSafeInteger is 2^53-1, the largest integer canonical JSON allows (and the
// negation is the smallest).
const maxSafeInteger = 1<<53 - 1

// maxDepth bounds the nesting of arrays and objects accepted by the canonical
// encoder and the strict decoder.
const maxDepth = 512

// ErrNotCanonicalizable is wrapped by the errors of Canonical and
// CanonicalBytes when the value cannot be represented as Matrix canonical
// JSON (floats, out-of-range integers, invalid UTF-8, unsupported Go types,
// duplicate object keys, ...).
var ErrNotCanonicalizable = errors.New("value cannot be encoded as canonical JSON")

// Canonical encodes v as Matrix canonical JSON: object keys sorted by Unicode
// code point, no insignificant whitespace, integers only (in ±(2^53−1)),
// non-ASCII characters emitted as raw UTF-8 and only the escapes JSON
// requires (\" \\ \b \f \n \r \t and \u00xx with lower-case hex for the
// other control characters).
//
// v is expected to be a value as produced by encoding/json decoding into
// any: map[string]any, []any, string, json.Number or float64, bool and nil.
// For convenience int and int64 are accepted too (timestamps built in Go). A number is accepted when its value is an exact integer in
// range, whatever its spelling: 1e10 encodes as 10000000000 and -0 as 0 (as
// in the specification's examples), while 1.5 or 1e-1 are rejected.
func Canonical(v any) ([]byte, error) {
	out, err := appendCanonical(nil, v, 0)
	if err != nil {
		return nil, fmt.Errorf("encoding canonical JSON: %w", err)
	}
	return out, nil
}

// CanonicalBytes re-encodes the JSON document raw as canonical JSON. The
// document is decoded strictly: numbers keep their exact spelling until
// encoded, duplicate object keys and trailing data are rejected.
func CanonicalBytes(raw []byte) ([]byte, error) {
	v, err := decodeStrict(raw)
	if err != nil {
		return nil, fmt.Errorf("decoding JSON for canonicalization: %w", err)
	}
	return Canonical(v)
}

func appendCanonical(b []byte, v any, depth int) ([]byte, error) {
	if depth > maxDepth {
		return nil, fmt.Errorf("%w: nesting deeper than %d", ErrNotCanonicalizable, maxDepth)
	}
	switch x := v.(type) {
	case nil:
		return append(b, "null"...), nil
	case bool:
		if x {
			return append(b, "true"...), nil
		}
		return append(b, "false"...), nil
	case string:
		return appendString(b, x)
	case json.Number:
		n, err := parseIntegerNumber(string(x))
		if err != nil {
			return nil, err
		}
		return strconv.AppendInt(b, n, 10), nil
	case float64:
		if math.IsNaN(x) || math.IsInf(x, 0) || math.Trunc(x) != x {
			return nil, fmt.Errorf("%w: %v is not an integer", ErrNotCanonicalizable, x)
		}
		if math.Abs(x) > maxSafeInteger {
			return nil, fmt.Errorf("%w: %v is out of the integer range", ErrNotCanonicalizable, x)
		}
		return strconv.AppendInt(b, int64(x), 10), nil
	case int:
		return appendInt(b, int64(x))
	case int64:
		return appendInt(b, x)
	case []any:
		b = append(b, '[')
		for i, e := range x {
			if i > 0 {
				b = append(b, ',')
			}
			var err error
			if b, err = appendCanonical(b, e, depth+1); err != nil {
				return nil, err
			}
		}
		return append(b, ']'), nil
	case map[string]any:
		keys := sortedKeys(x)
		b = append(b, '{')
		for i, k := range keys {
			if i > 0 {
				b = append(b, ',')
			}
			var err error
			if b, err = appendString(b, k); err != nil {
				return nil, err
			}
			b = append(b, ':')
			if b, err = appendCanonical(b, x[k], depth+1); err != nil {
				return nil, err
			}
		}
		return append(b, '}'), nil
	default:
		return nil, fmt.Errorf("%w: unsupported type %T", ErrNotCanonicalizable, v)
	}
}

// sortedKeys returns the keys of m in code point order. For valid UTF-8
// (which appendString enforces) byte order equals code point order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func appendInt(b []byte, n int64) ([]byte, error) {
	if n > maxSafeInteger || n < -maxSafeInteger {
		return nil, fmt.Errorf("%w: %d is out of the integer range", ErrNotCanonicalizable, n)
	}
	return strconv.AppendInt(b, n, 10), nil
}

const hexDigits = "0123456789abcdef"

// appendString appends s as a JSON string with only the required escapes.
func appendString(b []byte, s string) ([]byte, error) {
	if !utf8.ValidString(s) {
		return nil, fmt.Errorf("%w: string is not valid UTF-8", ErrNotCanonicalizable)
	}
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"':
			b = append(b, '\\', '"')
		case '\\':
			b = append(b, '\\', '\\')
		case '\b':
			b = append(b, '\\', 'b')
		case '\f':
			b = append(b, '\\', 'f')
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
		}
		start = i + 1
	}
	b = append(b, s[start:]...)
	return append(b, '"'), nil
}

// parseIntegerNumber returns the value of the JSON number s if it is an
// exact integer within ±(2^53−1). It never materialises huge values, so
// inputs like 1e999999999 are cheap to reject.
func parseIntegerNumber(s string) (int64, error) {
	orig := s
	neg := false
	if strings.HasPrefix(s, "-") {
		neg = true
		s = s[1:]
	}
	mant, exp := s, ""
	if i := strings.IndexAny(s, "eE"); i >= 0 {
		mant, exp = s[:i], s[i+1:]
	}
	intPart, frac := mant, ""
	if i := strings.IndexByte(mant, '.'); i >= 0 {
		intPart, frac = mant[:i], mant[i+1:]
	}
	if intPart == "" || !allDigits(intPart) || !allDigits(frac) || (strings.Contains(mant, ".") && frac == "") {
		return 0, fmt.Errorf("%w: %q is not a JSON number", ErrNotCanonicalizable, orig)
	}
	digits := strings.TrimLeft(intPart+frac, "0")
	if digits == "" {
		return 0, nil // zero, including -0 and 0e5
	}
	// value = digits × 10^e10
	var e10 int64
	if exp != "" {
		esign := int64(1)
		switch exp[0] {
		case '+':
			exp = exp[1:]
		case '-':
			esign = -1
			exp = exp[1:]
		}
		if exp == "" || !allDigits(exp) {
			return 0, fmt.Errorf("%w: %q is not a JSON number", ErrNotCanonicalizable, orig)
		}
		exp = strings.TrimLeft(exp, "0")
		if len(exp) > 9 {
			if esign < 0 {
				return 0, fmt.Errorf("%w: %s is not an integer", ErrNotCanonicalizable, orig)
			}
			return 0, fmt.Errorf("%w: %s is out of the integer range", ErrNotCanonicalizable, orig)
		}
		if exp != "" {
			n, _ := strconv.ParseInt(exp, 10, 64)
			e10 = esign * n
		}
	}
	e10 -= int64(len(frac))
	trimmed := strings.TrimRight(digits, "0")
	e10 += int64(len(digits) - len(trimmed))
	digits = trimmed
	if e10 < 0 {
		return 0, fmt.Errorf("%w: %s is not an integer", ErrNotCanonicalizable, orig)
	}
	if int64(len(digits))+e10 > 16 {
		return 0, fmt.Errorf("%w: %s is out of the integer range", ErrNotCanonicalizable, orig)
	}
	n, err := strconv.ParseInt(digits+strings.Repeat("0", int(e10)), 10, 64)
	if err != nil || n > maxSafeInteger {
		return 0, fmt.Errorf("%w: %s is out of the integer range", ErrNotCanonicalizable, orig)
	}
	if neg {
		n = -n
	}
	return n, nil
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// decodeStrict decodes one JSON document into map[string]any, []any, string,
// json.Number, bool and nil values, rejecting duplicate object keys, nesting
// deeper than maxDepth and trailing data.
func decodeStrict(raw []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	v, err := decodeValue(dec, 0)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: trailing data after the JSON document", ErrNotCanonicalizable)
	}
	return v, nil
}

func decodeValue(dec *json.Decoder, depth int) (any, error) {
	if depth > maxDepth {
		return nil, fmt.Errorf("%w: nesting deeper than %d", ErrNotCanonicalizable, maxDepth)
	}
	tok, err := dec.Token()
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			m := map[string]any{}
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, err
				}
				k, ok := kt.(string)
				if !ok {
					return nil, fmt.Errorf("%w: object key is not a string", ErrNotCanonicalizable)
				}
				if _, dup := m[k]; dup {
					return nil, fmt.Errorf("%w: duplicate object key %q", ErrNotCanonicalizable, k)
				}
				v, err := decodeValue(dec, depth+1)
				if err != nil {
					return nil, err
				}
				m[k] = v
			}
			if _, err := dec.Token(); err != nil { // '}'
				return nil, err
			}
			return m, nil
		case '[':
			a := []any{}
			for dec.More() {
				v, err := decodeValue(dec, depth+1)
				if err != nil {
					return nil, err
				}
				a = append(a, v)
			}
			if _, err := dec.Token(); err != nil { // ']'
				return nil, err
			}
			return a, nil
		default:
			return nil, fmt.Errorf("%w: unexpected %q", ErrNotCanonicalizable, t)
		}
	default:
		return t, nil // string, json.Number, bool, nil
	}
}
