package fsutil

import "testing"

func TestMountinfoUnescape(t *testing.T) {
	if got := UnescapeMountinfo(`/a\040b\134c`); got != `/a b\c` {
		t.Fatalf("%q", got)
	}
}

func TestParseMountinfoFieldsAndEscapes(t *testing.T) {
	text := "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n" +
		"garbage line\n" +
		"40 30 0:45 / /sysroot ro shared:2 - overlay composefs ro,lowerdir=/a,upperdir=/u\\040p,workdir=/w\n"
	ms := ParseMountinfo(text)
	if len(ms) != 2 {
		t.Fatalf("%d mounts, want 2: %+v", len(ms), ms)
	}
	if m := ms[0]; m.Dev != "98:0" || m.Root != "/mnt1" || m.Point != "/mnt/a b" || m.FSType != "ext3" || m.Source != "/dev/root" {
		t.Errorf("first: %+v", m)
	}
	if m := ms[1]; m.FSType != "overlay" || m.SuperOptions != "ro,lowerdir=/a,upperdir=/u\\040p,workdir=/w" {
		t.Errorf("second: %+v", m)
	}
}
