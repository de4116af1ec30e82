package composefs

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/berth-dev/berth/internal/fsverity"
)

// TestBatchBuckets covers both ways Commit places objects: a staging
// bucket renamed whole into a store without that XX directory, and
// per-object renames into an XX directory that already exists. It also
// checks AddBytes (skips content the store or batch has, without writing
// it), streamed content bigger than one buffer, and the object mode under
// a restrictive umask.
func TestBatchBuckets(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	s, err := OpenStore(t.TempDir(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	first := []byte(strings.Repeat("first object ", 10))
	b := s.NewBatch()
	d1, err := b.AddBytes(first)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := b.AddBytes(first); err != nil || !bytes.Equal(again, d1) || b.Len() != 1 {
		t.Fatalf("AddBytes of the same content again: %x %v, %d pending", again, err, b.Len())
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	checkObject(t, s, d1, first)

	// Content whose digest falls into d1's bucket, and content for a
	// bucket the store does not have yet.
	var same, other []byte
	var dSame, dOther []byte
	for i := 0; same == nil || other == nil; i++ {
		c := []byte(fmt.Sprintf("candidate %d %s", i, strings.Repeat("x", 100)))
		d, err := fsverity.Digest(bytes.NewReader(c), fsverity.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		_, statErr := os.Stat(filepath.Join(s.Dir(), fmt.Sprintf("%02x", d[0])))
		switch {
		case d[0] == d1[0] && same == nil:
			same, dSame = c, d
		case d[0] != d1[0] && os.IsNotExist(statErr) && other == nil:
			other, dOther = c, d
		}
	}
	big := make([]byte, 3<<20+5)
	for i := range big {
		big[i] = byte(i * 13)
	}
	b = s.NewBatch()
	if d, err := b.AddBytes(first); err != nil || !bytes.Equal(d, d1) || b.Len() != 0 {
		t.Fatalf("AddBytes of content in the store: %x %v, %d pending, want nothing staged", d, err, b.Len())
	}
	for _, c := range [][]byte{same, other} {
		if _, err := b.AddBytes(c); err != nil {
			t.Fatal(err)
		}
	}
	dBig, n, err := b.AddReader(bytes.NewReader(big))
	if err != nil || n != int64(len(big)) {
		t.Fatalf("AddReader: %d bytes, %v", n, err)
	}
	if s.Has(dSame) || s.Has(dOther) || s.Has(dBig) {
		t.Fatal("objects visible before Commit")
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	checkObject(t, s, d1, first)
	checkObject(t, s, dSame, same)
	checkObject(t, s, dOther, other)
	checkObject(t, s, dBig, big)
	for _, e := range storeEntries(t, s.Dir()) {
		if strings.HasPrefix(e, tmpPrefix) {
			t.Errorf("left in store after Commit: %s", e)
		}
	}
	if _, err := b.AddBytes([]byte("late")); err == nil {
		t.Error("AddBytes after Commit succeeded")
	}
}
