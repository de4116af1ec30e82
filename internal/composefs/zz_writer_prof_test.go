package composefs

import (
	"io"
	"os"
	"testing"
	"time"
)

func TestZZWriterProfWrite(t *testing.T) {
	if os.Getenv("WRITER_PROF") == "" {
		t.Skip()
	}
	root, err := ScanDir("/usr", ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		t0 := time.Now()
		if err := Write(io.Discard, root, WriteOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Logf("write %v", time.Since(t0))
	}
}
