package boot

import "testing"

func TestParseEntryName(t *testing.T) {
	for _, tc := range []struct {
		file     string
		ok       bool
		id       string
		counting bool
		left     int
		done     int
		state    string
	}{
		{"berth-7-3fa2c41b09de+3.efi", true, "7-3fa2c41b09de", true, 3, 0, "indeterminate"},
		{"berth-7-3fa2c41b09de+2-1.efi", true, "7-3fa2c41b09de", true, 2, 1, "indeterminate"},
		{"berth-7-3fa2c41b09de+0-3.efi", true, "7-3fa2c41b09de", true, 0, 3, "bad"},
		{"berth-7-3fa2c41b09de+0.conf", true, "7-3fa2c41b09de", true, 0, 0, "bad"},
		{"berth-7-3fa2c41b09de.efi", true, "7-3fa2c41b09de", false, 0, 0, "good"},
		{"berth-7-3fa2c41b09de.conf", true, "7-3fa2c41b09de", false, 0, 0, "good"},
		{"BERTH-7-3FA2C41B09DE+1-2.EFI", true, "7-3fa2c41b09de", true, 1, 2, "indeterminate"}, // FAT is case-insensitive
		{"berth-7-3fa2c41b09de+.efi", false, "", false, 0, 0, ""},
		{"berth-7-3fa2c41b09de+-1.efi", false, "", false, 0, 0, ""},
		{"berth-7-3fa2c41b09de+3-.efi", false, "", false, 0, 0, ""},
		{"berth-7-3fa2c41b09de+a.efi", false, "", false, 0, 0, ""},
		{"berth-7-3fa2c41b09de+3-x.efi", false, "", false, 0, 0, ""},
		{"berth-7-3fa2c41b09de+99999.efi", false, "", false, 0, 0, ""},
		{"berth-+3.efi", false, "", false, 0, 0, ""},
		{"berth-a+b+3.efi", false, "", false, 0, 0, ""},
		{"berth-../x.efi", false, "", false, 0, 0, ""},
		{"debian-6.12.efi", false, "", false, 0, 0, ""},
		{"berth-7-abc.efi.berth-new", false, "", false, 0, 0, ""},
	} {
		n, err := ParseEntryName(tc.file)
		if (err == nil) != tc.ok {
			t.Errorf("%s: err %v, want ok=%v", tc.file, err, tc.ok)
			continue
		}
		if !tc.ok {
			continue
		}
		if n.ID != tc.id || n.Counting != tc.counting || n.Left != tc.left || n.Done != tc.done || n.State() != tc.state {
			t.Errorf("%s: got %+v state %s", tc.file, n, n.State())
		}
	}
}

func TestEntryNameLifecycle(t *testing.T) {
	n, err := NewEntryName("7-3fa2c41b09de", DefaultTries, ".efi")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"berth-7-3fa2c41b09de+3.efi",
		"berth-7-3fa2c41b09de+2-1.efi",
		"berth-7-3fa2c41b09de+1-2.efi",
		"berth-7-3fa2c41b09de+0-3.efi",
		"berth-7-3fa2c41b09de+0-3.efi", // no tries left: stays bad
	}
	for i, w := range want {
		if n.String() != w {
			t.Errorf("step %d: %s, want %s", i, n, w)
		}
		back, err := ParseEntryName(n.String())
		if err != nil || back != n {
			t.Errorf("round trip %s: %+v %v", n, back, err)
		}
		n = n.Tried()
	}
	if b := n.Blessed().String(); b != "berth-7-3fa2c41b09de.efi" {
		t.Errorf("blessed %s", b)
	}
	if n, _ := NewEntryName("x", 0, ".conf"); n.String() != "berth-x.conf" {
		t.Errorf("uncounted %s", n)
	}
	for _, bad := range []string{"", "A", "a+b", "a/b", "a.", "a..b", "-a"} {
		if _, err := NewEntryName(bad, 3, ".efi"); err == nil {
			t.Errorf("id %q accepted", bad)
		}
	}
}

func TestVersionCompare(t *testing.T) {
	// Pairs with a < b, after systemd's test-string-util strverscmp cases.
	for _, p := range [][2]string{
		{"1", "2"}, {"9", "10"}, {"1.2", "1.10"}, {"122", "123"}, {"1.0~rc1", "1.0"},
		{"123-9", "123.1-1"}, {"1.0", "1.0.1"}, {"a", "b"}, {"abc", "abcd"}, {"1a", "1b"},
		{"00123", "124"}, {"berth-9-ffffffffffff.efi", "berth-10-000000000000.efi"},
		{"berth-7-3fa2c41b09de.efi", "berth-8-0000c41b09de.efi"}, {"1^1", "1.1"}, {"", "1"},
	} {
		if r := versionCompare(p[0], p[1]); r >= 0 {
			t.Errorf("versionCompare(%q, %q) = %d, want < 0", p[0], p[1], r)
		}
		if r := versionCompare(p[1], p[0]); r <= 0 {
			t.Errorf("versionCompare(%q, %q) = %d, want > 0", p[1], p[0], r)
		}
	}
	for _, p := range [][2]string{{"123", "0123"}, {"1.2", "1.2"}} {
		if r := versionCompare(p[0], p[1]); r != 0 {
			t.Errorf("versionCompare(%q, %q) = %d, want 0", p[0], p[1], r)
		}
	}
}
