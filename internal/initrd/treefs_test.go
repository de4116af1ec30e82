package initrd

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsverity"
)

// TestBuildFromStoreImage builds from an image in the object store
// (composefs.TreeFS), the path of `berth initramfs build --image`.
func TestBuildFromStoreImage(t *testing.T) {
	initBin := staticInit(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	k := filepath.Join(src, "usr/lib/modules/6.1.0-store")
	big := bytes.Repeat([]byte("erofs module bytes "), 20) // external: read from the object store
	files := map[string][]byte{
		"modules.dep":                 []byte("kernel/fs/erofs/erofs.ko.xz: kernel/lib/lz4.ko.xz\nkernel/lib/lz4.ko.xz:\n"),
		"kernel/fs/erofs/erofs.ko.xz": big,
		"kernel/lib/lz4.ko.xz":        []byte("lz4"), // inline in the image
	}
	// The kernel decompresses xz modules itself: they are copied as they are.
	os.MkdirAll(filepath.Join(src, "boot"), 0o755)
	os.WriteFile(filepath.Join(src, "boot/config-6.1.0-store"), []byte("CONFIG_MODULE_DECOMPRESS=y\nCONFIG_MODULE_COMPRESS_XZ=y\n"), 0o644)
	for p, b := range files {
		os.MkdirAll(filepath.Join(k, filepath.Dir(p)), 0o755)
		if err := os.WriteFile(filepath.Join(k, p), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	os.Symlink("usr/lib", filepath.Join(src, "lib"))
	objects := filepath.Join(dir, "objects")
	st, err := composefs.OpenStore(objects, fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	b := st.NewBatch()
	root, err := composefs.ScanDir(src, composefs.ScanOptions{Store: b})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	rep, err := Build(&out, Options{Root: composefs.TreeFS(root, objects), KernelVersion: "6.1.0-store", InitBinary: initBin, Modules: []string{"erofs"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Modules) != 2 {
		t.Fatalf("modules: %v", rep.Modules)
	}
	m := readArchive(t, out.Bytes())
	if got := content(t, m["usr/lib/modules/6.1.0-store/kernel/fs/erofs/erofs.ko.xz"]); got != string(big) {
		t.Fatalf("external module content differs (%d bytes)", len(got))
	}
	if got := content(t, m["usr/lib/modules/6.1.0-store/kernel/lib/lz4.ko.xz"]); got != "lz4" {
		t.Fatalf("inline module content %q", got)
	}
}
