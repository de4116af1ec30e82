package kmod

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"
)

func TestResolve(t *testing.T) {
	fsys := fstest.MapFS{
		"m/modules.dep": {Data: []byte(
			"kernel/fs/overlayfs/overlay.ko.xz:\n" +
				"kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n" +
				"kernel/fs/jbd2/jbd2.ko.xz: kernel/lib/crc16.ko.xz\n" +
				"kernel/fs/mbcache.ko.xz:\n" +
				"kernel/lib/crc16.ko.xz:\n" +
				"kernel/crypto/crc32c_generic.ko.xz:\n" +
				"kernel/drivers/block/virtio_blk.ko.xz:\n")},
		"m/modules.builtin": {Data: []byte("kernel/drivers/char/tpm/tpm_crb.ko\n")},
		"m/modules.softdep": {Data: []byte("# comment\nsoftdep ext4 pre: crc32c post: nothing\n")},
		"m/modules.alias":   {Data: []byte("alias crc32c crc32c_generic\nalias pci:v* virtio_blk\n")},
	}
	ix, err := ReadIndex(fsys, "m")
	if err != nil {
		t.Fatal(err)
	}
	c := ix.Resolve([]string{"ext4", "virtio-blk", "tpm_crb", "nvme", "overlay"})
	got := strings.Join(c.Order, " ")
	want := "kernel/crypto/crc32c_generic.ko.xz kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz kernel/fs/ext4/ext4.ko.xz kernel/drivers/block/virtio_blk.ko.xz kernel/fs/overlayfs/overlay.ko.xz"
	if got != want {
		t.Errorf("order:\n got %s\nwant %s", got, want)
	}
	if strings.Join(c.Builtin, ",") != "tpm_crb" || strings.Join(c.Missing, ",") != "nvme" {
		t.Errorf("builtin %v missing %v", c.Builtin, c.Missing)
	}
}

func TestReadIndexRefusesTraversal(t *testing.T) {
	for _, dep := range []string{"../../etc/shadow.ko:\n", "/abs.ko:\n", "a.ko: ../b.ko\n", "no colon\n"} {
		fsys := fstest.MapFS{"m/modules.dep": {Data: []byte(dep)}}
		if _, err := ReadIndex(fsys, "m"); err == nil {
			t.Errorf("modules.dep %q accepted", dep)
		}
	}
}

func TestName(t *testing.T) {
	for in, want := range map[string]string{"a/b/virtio-blk.ko.xz": "virtio_blk", "sd_mod.ko": "sd_mod", "x.ko.zst": "x", "y.ko.gz": "y"} {
		if got := Name(in); got != want {
			t.Errorf("Name(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestDecompressDebianModule decompresses a real Debian .ko.xz with the
// pure-Go decoder (the fallback path when the kernel cannot decompress).
func TestDecompressDebianModule(t *testing.T) {
	mods, _ := filepath.Glob("/var/cache/berth-e2e/trixie-rootfs/usr/lib/modules/*/kernel/fs/overlayfs/overlay.ko.xz")
	if len(mods) == 0 {
		t.Skip("trixie rootfs not built (test/guest/build-rootfs.sh); no real .ko.xz to decompress")
	}
	b, err := Decompress(mods[0])
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, []byte("\x7fELF")) || !bytes.Contains(b, []byte("name=overlay")) {
		t.Fatalf("decompressed %s is not the overlay module (%d bytes)", mods[0], len(b))
	}
	if _, err := os.Stat(mods[0]); err != nil {
		t.Fatal(err)
	}
}
