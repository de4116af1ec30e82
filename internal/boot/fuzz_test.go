package boot

import "testing"

// FuzzParseEntryName: parsing never panics, and what parses formats back
// to a name that parses to the same value.
func FuzzParseEntryName(f *testing.F) {
	for _, s := range []string{"berth-7-3fa2c41b09de+3.efi", "berth-1-a+2-1.conf", "berth-x.efi", "berth-+.efi"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseEntryName(s)
		if err != nil {
			return
		}
		back, err := ParseEntryName(n.String())
		if err != nil || back != n {
			t.Fatalf("%q -> %+v -> %q -> %+v %v", s, n, n.String(), back, err)
		}
	})
}

// FuzzVersionCompare: antisymmetric and reflexive.
func FuzzVersionCompare(f *testing.F) {
	f.Add("1.2~rc1", "1.2")
	f.Add("berth-10-a.efi", "berth-9-b.efi")
	f.Fuzz(func(t *testing.T, a, b string) {
		if versionCompare(a, b) != -versionCompare(b, a) {
			t.Fatalf("not antisymmetric: %q %q", a, b)
		}
		if versionCompare(a, a) != 0 {
			t.Fatalf("not reflexive: %q", a)
		}
	})
}
