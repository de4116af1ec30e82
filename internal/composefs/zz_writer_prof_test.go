package composefs

import (
	"os"
	"testing"
	"time"
)

func TestZZWriterProfUsr(t *testing.T) {
	if os.Getenv("WRITER_PROF") == "" {
		t.Skip()
	}
	for i := 0; i < 2; i++ {
		t0 := time.Now()
		root, err := ScanDir("/usr", ScanOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t1 := time.Now()
		d, err := ImageDigest(root, WriteOptions{}, 1)
		t.Logf("scan %v, image digest %v: %x %v", t1.Sub(t0), time.Since(t1), d, err)
	}
}
