package fsutil

import "testing"

func TestMountinfoUnescape(t *testing.T) {
	if got := UnescapeMountinfo(`/a\040b\134c`); got != `/a b\c` {
		t.Fatalf("%q", got)
	}
}
