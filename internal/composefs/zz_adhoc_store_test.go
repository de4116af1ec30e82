package composefs

import (
	"bytes"
	"os"
	"testing"
)

func TestAdhocStoreReadMk(t *testing.T) {
	for _, p := range []string{"/var/tmp/storework/t1.cfs", "/var/tmp/storework/t2.cfs", "/var/tmp/storework/wt0.cfs", "/var/tmp/storework/wt1.cfs"} {
		data, _ := os.ReadFile(p)
		im, err := ParseImage(data)
		if err != nil { t.Fatal(err) }
		if err := im.Check(); err != nil { t.Fatal(err) }
		tr, err := im.Tree()
		if err != nil { t.Fatal(err) }
		var buf bytes.Buffer
		if err := Write(&buf, tr, VersionOptions(im.Version(), im.Version(), true, true)); err != nil { t.Fatal(err) }
		if !bytes.Equal(buf.Bytes(), data) { t.Errorf("%s: rewrite differs (%d vs %d)", p, buf.Len(), len(data)) }
		n := 0
		im.Walk(func(p string, n2 *Inode) error { n++; return nil })
		t.Logf("%s: %d entries, version %d", p, n, im.Version())
	}
}
