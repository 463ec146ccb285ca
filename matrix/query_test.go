package matrix

import "testing"

func TestQueryParam(t *testing.T) {
	tests := []struct {
		q, key, val string
		found, ok   bool
	}{
		{"a=1&b=2", "b", "2", true, true},
		{"a=1&a=2", "a", "1", true, true},
		{"filename=a+b%20c", "filename", "a b c", true, true},
		{"file%6Eame=x", "filename", "x", true, true},
		{"filename=%zz", "filename", "", true, false},
		{"x=%zz&filename=ok", "filename", "ok", true, true},
		{"filename", "filename", "", true, true},
		{"filename=", "filename", "", true, true},
		{"", "filename", "", false, true},
		{"filenamex=1", "filename", "", false, true},
	}
	for _, tc := range tests {
		v, found, ok := QueryParam(tc.q, tc.key)
		if v != tc.val || found != tc.found || ok != tc.ok {
			t.Errorf("QueryParam(%q, %q) = %q %v %v", tc.q, tc.key, v, found, ok)
		}
	}
}
