package bytesize

import (
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/dustin/go-humanize"
)

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		want    int64
		wantErr error
	}{
		{"0", 0, nil},
		{"1048576", 1048576, nil},
		{"1,048,576", 1048576, nil},
		{"50MiB", 50 << 20, nil},
		{"50mib", 50 << 20, nil},
		{"50Mi", 50 << 20, nil},
		{"10MB", 10_000_000, nil},
		{"10M", 10_000_000, nil},
		{"10 MB", 10_000_000, nil},
		{"10MB ", 10_000_000, nil},
		{"1KiB", 1024, nil},
		{"1k", 1000, nil},
		{"1B", 1, nil},
		{"2GiB", 2 << 30, nil},
		{"1GB", 1e9, nil},
		{"1TiB", 1 << 40, nil},
		{"1tb", 1e12, nil},
		{"1PiB", 1 << 50, nil},
		{"1pb", 1e15, nil},
		{"7EiB", 7 << 60, nil},
		{"9EB", 9e18, nil},
		{"1.5GiB", 3 << 29, nil},
		{".5KiB", 512, nil},
		{"1.KiB", 1024, nil},
		{"0.3KB", 300, nil}, // exact: a float would give 299.99…
		{"1.5", 1, nil},     // a fraction of a byte is dropped
		{"0.0000001KiB", 0, nil},
		{"9223372036854775807", math.MaxInt64, nil},
		{"9223372036854775808", 0, ErrRange},
		{"8EiB", 0, ErrRange},
		{"10EB", 0, ErrRange},
		{"99999999999999999999999999", 0, ErrRange},
		{"", 0, ErrSyntax},
		{" 1MiB", 0, ErrSyntax},
		{"-1", 0, ErrSyntax},
		{"+1", 0, ErrSyntax},
		{".", 0, ErrSyntax},
		{",", 0, ErrSyntax},
		{"MiB", 0, ErrSyntax},
		{"1e6", 0, ErrSyntax},
		{"0x10", 0, ErrSyntax},
		{"1.5.5", 0, ErrSyntax},
		{"1.5,5", 0, ErrSyntax},
		{"10 M B", 0, ErrSyntax},
		{"10MiBs", 0, ErrSyntax},
		{"10ZiB", 0, ErrSyntax},
		{"١٠", 0, ErrSyntax}, // non-ASCII digits
	}
	for _, tt := range tests {
		got, err := Parse(tt.in)
		if tt.wantErr != nil {
			if !errors.Is(err, tt.wantErr) {
				t.Errorf("Parse(%q) = %d, %v; want an error wrapping %v", tt.in, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("Parse(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
}

func TestFormat(t *testing.T) {
	tests := []struct {
		n    int64
		want string
	}{
		{0, "0"},
		{1, "1"},
		{1000, "1000"},
		{1024, "1KiB"},
		{1536, "1536"},
		{50 << 20, "50MiB"},
		{3 << 29, "1536MiB"},
		{1 << 62, "4EiB"},
		{math.MaxInt64, "9223372036854775807"},
	}
	for _, tt := range tests {
		if got := Format(tt.n); got != tt.want {
			t.Errorf("Format(%d) = %q, want %q", tt.n, got, tt.want)
		}
		if back, err := Parse(tt.want); err != nil || back != tt.n {
			t.Errorf("Parse(Format(%d)) = %d, %v", tt.n, back, err)
		}
	}
}

// FuzzParseSize checks that Parse never panics, answers within range,
// reads Format's output back exactly, and accepts what go-humanize's
// ParseBytes (the module's former parser) accepted, with the same value.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"0", "50MiB", "10 MB", "1,048,576", "1.5GiB", ".5k", "0.3KB", "9223372036854775807", "8EiB", "-1", "1e6", "", "١٠", "1.5,5"} {
		f.Add(s, int64(0))
	}
	f.Add("", int64(math.MaxInt64))
	f.Add("", int64(50<<20))
	f.Fuzz(func(t *testing.T, s string, n int64) {
		if n >= 0 {
			if back, err := Parse(Format(n)); err != nil || back != n {
				t.Fatalf("Parse(Format(%d) = %q) = %d, %v", n, Format(n), back, err)
			}
		}
		got, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrSyntax) && !errors.Is(err, ErrRange) {
				t.Fatalf("Parse(%q): error %v wraps neither ErrSyntax nor ErrRange", s, err)
			}
		} else if got < 0 {
			t.Fatalf("Parse(%q) = %d, negative", s, got)
		}
		old, oldErr := humanize.ParseBytes(s)
		if oldErr != nil || old > math.MaxInt64 {
			return
		}
		dot := strings.Contains(s, ".")
		if dot && strings.Contains(s[strings.Index(s, "."):], ",") {
			return // commas in the fraction are no longer accepted
		}
		if err != nil {
			t.Fatalf("Parse(%q): %v; go-humanize read %d", s, err, old)
		}
		if !dot && got != int64(old) {
			t.Fatalf("Parse(%q) = %d; go-humanize read %d", s, got, old)
		}
		// With a fraction go-humanize computes in float64: allow its
		// rounding error.
		if dot && math.Abs(float64(got)-float64(old)) > 1+float64(old)*1e-15 {
			t.Fatalf("Parse(%q) = %d; go-humanize read %d", s, got, old)
		}
	})
}
