package composefs

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/berth-dev/berth/internal/fsverity"
)

func TestCreateAndPathDigest(t *testing.T) {
	src := wtScanTree(t)
	work := t.TempDir()
	out := filepath.Join(work, "img.cfs")
	store := filepath.Join(work, "objects")
	d, err := Create(CreateOptions{Source: src, Output: out, DigestStore: store})
	if err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if fd, _ := fsverity.Digest(bytes.NewReader(img), fsverity.SHA256); !bytes.Equal(fd, d) {
		t.Errorf("Create returned %x, image digest is %x", d, fd)
	}
	// Digest only, and the digest command on the directory and the image.
	only, err := Create(CreateOptions{Source: src})
	if err != nil || !bytes.Equal(only, d) {
		t.Errorf("digest-only Create = %x, %v; want %x", only, err, d)
	}
	for _, p := range []string{src, out} {
		pd, _, err := PathDigest(p, ScanOptions{}, WriteOptions{})
		if err != nil || !bytes.Equal(pd, d) {
			t.Errorf("PathDigest(%s) = %x, %v; want %x", p, pd, err, d)
		}
	}
	root, _ := ScanDir(src, ScanOptions{})
	wtWalk(root, "", func(p string, n *Inode) {
		if n.Digest != nil {
			if _, err := os.Stat(filepath.Join(store, n.Payload)); err != nil {
				t.Errorf("%s: object not in the digest store: %v", p, err)
			}
		}
	})
	// The same image from its dump, through standard input and output.
	var dump, stdout bytes.Buffer
	if err := WriteDump(&dump, root); err != nil {
		t.Fatal(err)
	}
	dd, err := Create(CreateOptions{Source: "-", FromFile: true, Output: "-", Stdin: &dump, Stdout: &stdout})
	if err != nil || !bytes.Equal(dd, d) || !bytes.Equal(stdout.Bytes(), img) {
		t.Errorf("Create from dump via stdin/stdout = %x, %v (image equal %v)", dd, err, bytes.Equal(stdout.Bytes(), img))
	}
	if _, err := Create(CreateOptions{Source: "-", FromFile: true, DigestStore: store, Stdin: &dump}); err == nil {
		t.Error("a digest store with a dump source was accepted")
	}
	if _, err := Create(CreateOptions{Source: filepath.Join(work, "missing")}); err == nil {
		t.Error("missing source accepted")
	}
}

func TestVersionOptions(t *testing.T) {
	cases := []struct {
		min, max       int
		minSet, maxSet bool
		wantMin        int
		wantMax        int // effective
	}{
		{0, 0, false, false, 0, 1},
		{1, 0, true, false, 1, 1},
		{0, 0, true, true, 0, 0},
		{0, 0, false, true, 0, 0},
		{0, 1, true, true, 0, 1},
		{1, 0, true, true, 1, 1},
	}
	for _, c := range cases {
		o := VersionOptions(c.min, c.max, c.minSet, c.maxSet)
		min, max, err := o.versions()
		if err != nil || min != c.wantMin || max != c.wantMax {
			t.Errorf("VersionOptions(%d,%d,%v,%v) = %+v -> %d..%d %v; want %d..%d", c.min, c.max, c.minSet, c.maxSet, o, min, max, err, c.wantMin, c.wantMax)
		}
	}
}
