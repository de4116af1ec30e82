package composefs

import "testing"

func TestXXH32KnownVectors(t *testing.T) {
	// Published XXH32 test vectors (seed 0 unless noted).
	cases := []struct {
		in   string
		seed uint32
		want uint32
	}{
		{"", 0, 0x02cc5d05},
		{"a", 0, 0x550d7456},
		{"ab", 0, 0x4999fc53},
		{"abc", 0, 0x32d153ff},
		{"abcd", 0, 0xa3643705},
		{"abcde", 0, 0x9738f19b},
		{"abcdef", 0, 0x8b7cd587},
		{"abcdefg", 0, 0x9dd093b3},
		{"abcdefgh", 0, 0x0bb3c6bb},
		{"abcdefghi", 0, 0xd03c13fd},
		{"abcdefghij", 0, 0x8b988cfe},
		{"abcdefghijklmnop", 0, 0x9d2d8b62},
		{"abcdefghijklmnopqrstuvwxyz0123456789", 0, 0x42ae804d},
		{"Nobody inspects the spammish repetition", 0, 0xe2293b2f},
		{"", 0x9e3779b1, 0x36b78ae7},
	}
	for _, c := range cases {
		if got := xxh32([]byte(c.in), c.seed); got != c.want {
			t.Errorf("xxh32(%q, %#x) = %#08x, want %#08x", c.in, c.seed, got, c.want)
		}
	}
}
