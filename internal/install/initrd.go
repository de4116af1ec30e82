package install

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/initrd"
)

// initrdCacheVersion changes when the cache key's inputs change meaning.
const initrdCacheVersion = "berth-initrd-cache 1"

// The initramfs is cached in berth/boot/ as initrd-<kver>-<key>.img
// (initrdFor, storeInitrd): the key covers the kernel version, the module
// tree of the image (paths, modes, content digests), the module list, the
// compression and the berth-init binary, so any change to what would go in
// rebuilds it.

// initrdKey hashes the inputs of the initramfs. It returns "" (no caching)
// when the module directory is not a plain directory in the tree.
func initrdKey(tree *composefs.Inode, kver, initBinary string) (string, error) {
	if kver == "" || strings.ContainsAny(kver, "/\x00") || kver == "." || kver == ".." {
		return "", fmt.Errorf("initramfs: invalid kernel version %q", kver)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\nkernel %s\ncompression %s\nmodules %s\n", initrdCacheVersion, kver, initrd.Zstd, strings.Join(initrd.DefaultModules, ","))
	f, err := os.Open(initBinary)
	if err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	ih := sha256.New()
	_, err = io.Copy(ih, f)
	f.Close()
	if err != nil {
		return "", fmt.Errorf("initramfs: read %s: %w", initBinary, err)
	}
	fmt.Fprintf(h, "init %x\n", ih.Sum(nil))
	var modDir *composefs.Inode
	for _, p := range []string{"usr/lib/modules/" + kver, "lib/modules/" + kver} {
		if n := tree.Lookup(p); n != nil && n.IsDir() {
			modDir = n
			break
		}
	}
	if modDir == nil {
		return "", nil
	}
	err = composefs.WalkTree(modDir, func(p string, n *composefs.Inode) error {
		content := ""
		switch {
		case n.Digest != nil:
			content = hex.EncodeToString(n.Digest)
		case n.Payload != "":
			content = "payload:" + n.Payload
		case n.Inline != nil:
			s := sha256.Sum256(n.Inline)
			content = hex.EncodeToString(s[:])
		case n.Type() == composefs.SIFLNK:
			content = "->" + n.Target
		}
		fmt.Fprintf(h, "%q %o %d %s\n", p, n.Mode, n.Size, content)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("initramfs: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
