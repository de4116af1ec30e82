package install

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/initrd"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/store"
)

// The preflight: every check that can fail on the image or on this
// machine, run on an image already in a store (an installation's staging
// store, or the system's store for an upgrade) before the target disk, the
// target filesystem or the deployment list is touched. Install
// (ToDisk/ToFilesystem) and new deployments (DeployImage: upgrade, switch,
// deploy create) share it. It only reads; what it gathers (kernel, stub,
// initramfs) is what the deployment is then made with, so what was checked
// is what gets installed.

// checkOpts say what the preflight demands.
type checkOpts struct {
	Kernel           string // kernel version wanted ("" = the newest)
	InsecureNoVerity bool   // the root is not verified: overlayfs verity= and CONFIG_FS_VERITY are not needed
	SkipKernelCheck  bool   // do not refuse a kernel by its version number (distribution backports)
	Filesystem       string // root filesystem type for the kernel configuration check ("" = unknown)
	HostRoot         string // this machine's root for systemd-stub/systemd-boot fallbacks ("" = "/")
	ESP              string // the ESP whose systemd-boot stays when image and host have none ("" = a new ESP)
	Runtime          *runtime.Set
}

// checked is what the preflight found.
type checked struct {
	tree         *composefs.Inode
	kver         string
	linux        []byte // the kernel image
	stub         []byte
	stubFrom     string // "image:/…", "host:/…" or "kept:…" (bootfiles.go)
	bootFrom     string // where systemd-boot comes from, likewise
	bootSize     int64
	osrel        []byte
	rt           *runtime.Set
	initrd       []byte
	initrdName   string // cache file name in berth/boot ("" = not cacheable)
	initrdCached bool   // initrd came from the cache of the store checked
}

// hostFS is this machine's root for the fallbacks.
func hostFS(root string) fs.FS {
	if root == "" {
		root = "/"
	}
	return os.DirFS(root)
}

// checkImage runs the preflight on img in the store of l.
func checkImage(l store.Layout, img *oci.Image, o checkOpts) (*checked, error) {
	c := &checked{rt: o.Runtime}
	if c.rt == nil {
		var err error
		if c.rt, err = runtime.Locate(); err != nil {
			return nil, err
		}
	}
	if c.rt.InitBinary() == "" {
		return nil, errors.New("berth's runtime has no berth-init binary")
	}
	tree, err := oci.LoadTree(l.Sysroot, img)
	if err != nil {
		return nil, err
	}
	c.tree = tree
	treeFS := composefs.TreeFS(tree, l.Objects())
	c.osrel, _ = fsutil.ReadFileFS(treeFS, "etc/os-release", 64<<10)
	if c.osrel == nil {
		c.osrel, _ = fsutil.ReadFileFS(treeFS, "usr/lib/os-release", 64<<10)
	}
	osrel := parseOSRelease(c.osrel)

	kernels, err := oci.FindKernels(tree)
	var nk *oci.NoKernelError
	if errors.As(err, &nk) {
		return nil, noKernelError(osrel, img.Architecture, nk)
	}
	if err != nil {
		return nil, err
	}
	if c.kver, err = pickKernel(kernels, o.Kernel); err != nil {
		return nil, err
	}
	verity := !o.InsecureNoVerity
	if !o.SkipKernelCheck {
		if err := checkKernelVersion(c.kver, osrel, img.Architecture, verity); err != nil {
			return nil, err
		}
	}
	if err := checkKernelConfig(treeFS, c.kver, verity, o.Filesystem); err != nil {
		return nil, err
	}
	if c.linux, err = readKernel(treeFS, c.kver); err != nil {
		return nil, err
	}
	host := hostFS(o.HostRoot)
	if c.stub, c.stubFrom, err = findStubCarried(l, treeFS, host); err != nil {
		return nil, err
	}
	var bootBin []byte
	if bootBin, c.bootFrom, err = findBootLoader(o.ESP, treeFS, host); err != nil {
		return nil, err
	}
	c.bootSize = int64(len(bootBin))
	if c.initrd, c.initrdName, c.initrdCached, err = initrdFor(l, treeFS, tree, c.kver, c.rt.InitBinary()); err != nil {
		return nil, fmt.Errorf("initramfs for kernel %s: %w", c.kver, err)
	}
	return c, nil
}

// initrdFor returns berth's initramfs for kernel kver of the image: from
// l's cache (berth/boot/) when one with the same key is there, else built
// in memory. It writes nothing; storeInitrd caches it.
func initrdFor(l store.Layout, fsys fs.FS, tree *composefs.Inode, kver, initBinary string) (data []byte, name string, cached bool, err error) {
	if initBinary == "" {
		return nil, "", false, errors.New("initramfs: no berth-init binary in berth's runtime")
	}
	key, err := initrdKey(tree, kver, initBinary)
	if err != nil {
		return nil, "", false, err
	}
	if key != "" {
		name = "initrd-" + kver + "-" + key[:16] + ".img"
		if b, err := os.ReadFile(filepath.Join(l.Boot(), name)); err == nil && len(b) > 0 {
			return b, name, true, nil
		}
	}
	var buf bytes.Buffer
	if _, err := initrd.Build(&buf, initrd.Options{Root: fsys, KernelVersion: kver, InitBinary: initBinary, Compression: initrd.Zstd}); err != nil {
		return nil, "", false, err
	}
	return buf.Bytes(), name, false, nil
}

// storeInitrd puts the initramfs into l's cache (unless it is there) and
// returns its path ("" when it is not cacheable).
func storeInitrd(l store.Layout, c *checked) (string, error) {
	if c.initrdName == "" {
		return "", nil
	}
	p := filepath.Join(l.Boot(), c.initrdName)
	if b, err := os.ReadFile(p); err == nil && bytes.Equal(b, c.initrd) {
		return p, nil
	}
	if err := fsutil.MkdirAllSync(l.Boot(), 0o755); err != nil {
		return "", err
	}
	if err := fsutil.WriteFileAtomic(p, c.initrd, 0o644); err != nil {
		return "", fmt.Errorf("initramfs cache: %w", err)
	}
	return p, nil
}

// runtimeBytes is the content size of berth's runtime.
func runtimeBytes(rt *runtime.Set) int64 {
	var n int64
	for _, f := range rt.Files {
		n += int64(len(f.Data))
		if f.Source != "" {
			if fi, err := os.Stat(f.Source); err == nil {
				n += fi.Size()
			}
		}
	}
	return n
}

// rootNeeds is the space a root filesystem needs for an image whose store
// takes storeBytes (as the staging copy measured it), plus the first
// deployment (berth's runtime, its composefs image), the initramfs cache,
// and headroom for filesystem metadata and the first boots.
func rootNeeds(storeBytes int64, c *checked) int64 {
	n := storeBytes + runtimeBytes(c.rt) + int64(len(c.initrd)) + 16<<20
	return n + n/10 + 256<<20
}

// espNeeds is the space the boot entry and systemd-boot take on the ESP.
func espNeeds(c *checked) int64 {
	uki := int64(len(c.stub)+len(c.linux)+len(c.initrd)+len(c.osrel)) + 1<<20
	return uki + 2*c.bootSize + 1<<20
}

// diskNeeds is the smallest disk for rootNeeds: GPT, the ESP, the root
// partition (at least minRootSize) and the backup GPT.
func diskNeeds(root int64) int64 {
	root = max(root, minRootSize)
	root = (root + alignment - 1) / alignment * alignment
	return alignment + ESPSize + root + alignment
}
