package composefs

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestUpstreamDumpAssets checks ParseDump+Write against the sha256 of the
// images mkcomposefs 1.0.8 makes from the dump files of the composefs
// repository's tests/assets (hardlinks, ACLs, long symlinks, whiteouts, a
// whole CentOS Stream tree). Those files are not part of this repository:
// point CFS_ASSETS at a checkout's tests/assets to run it.
func TestUpstreamDumpAssets(t *testing.T) {
	dir := os.Getenv("CFS_ASSETS")
	if dir == "" {
		t.Skip("set CFS_ASSETS to containers/composefs tests/assets to compare with mkcomposefs's own test vectors")
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*.sha256"))
	for _, sf := range files {
		name := strings.TrimSuffix(filepath.Base(sf), ".sha256")
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || len(data) == 0 {
			t.Logf("%s: input not available, skipped", name)
			continue
		}
		if strings.HasSuffix(name, ".gz") {
			zr, err := gzip.NewReader(bytes.NewReader(data))
			if err != nil {
				t.Fatal(err)
			}
			data, _ = io.ReadAll(zr)
		}
		want, _ := os.ReadFile(sf)
		opts := WriteOptions{}
		if v, err := os.ReadFile(filepath.Join(dir, name+".version")); err == nil {
			n, _ := strconv.Atoi(strings.TrimSpace(string(v)))
			opts = WriteOptions{MinVersion: n, MaxVersion: PinVersion}
		}
		root, err := ParseDump(bytes.NewReader(data))
		if err != nil {
			t.Errorf("%s: parse: %v", name, err)
			continue
		}
		var buf bytes.Buffer
		if err := Write(&buf, root, opts); err != nil {
			t.Errorf("%s: write: %v", name, err)
			continue
		}
		got := sha256.Sum256(buf.Bytes())
		if hex.EncodeToString(got[:]) != strings.TrimSpace(string(want)) {
			t.Errorf("%s: sha256 %x, want %s", name, got, want)
		} else {
			t.Logf("%s: OK (%d bytes)", name, buf.Len())
		}
	}
}

// TestUpstreamShouldFail: every should-fail-*.dump of the composefs tests
// is rejected (by ParseDump or Write).
func TestUpstreamShouldFail(t *testing.T) {
	dir := os.Getenv("CFS_ASSETS")
	if dir == "" {
		t.Skip("set CFS_ASSETS to containers/composefs tests/assets to run mkcomposefs's should-fail inputs")
	}
	files, _ := filepath.Glob(filepath.Join(dir, "should-fail-*.dump"))
	for _, f := range files {
		data, _ := os.ReadFile(f)
		root, err := ParseDump(bytes.NewReader(data))
		if err == nil {
			err = Write(io.Discard, root, WriteOptions{})
		}
		if err == nil {
			t.Errorf("%s: no error", filepath.Base(f))
		} else {
			t.Logf("%s: %v", filepath.Base(f), err)
		}
	}
}
