// Package initrd builds berth's own initramfs: a newc cpio with berth-init
// as /init and the kernel modules needed to reach a composefs root on the
// usual storage, taken from the image's /usr/lib/modules/<kver>.
//
// The output is deterministic: the same inputs give the same bytes (all
// timestamps 0, owners root, entries in sorted order, inode numbers
// assigned in that order, single-threaded compression).
package initrd

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/u-root/u-root/pkg/cpio"

	"github.com/berth-dev/berth/internal/initrd/layout"
	"github.com/berth-dev/berth/internal/kmod"
)

// The modules berth's initramfs carries (with their dependencies), by
// role. Narrower than a distribution initrd on purpose: berth-init mounts
// a local root filesystem that can hold fs-verity files (DESIGN §3: ext4
// or btrfs; XFS has no fs-verity) and a composefs image on it; it does not
// set up LVM, LUKS, RAID or network roots, so device-mapper and friends
// would be dead weight.
var (
	// AlwaysModules are loaded on every boot: composefs.
	AlwaysModules = []string{"erofs", "overlay", "loop"}
	// StorageModules are the disk controllers and their protocols; each is
	// loaded only when a present device matches one of its aliases
	// (all of them as a fallback when the root device does not appear).
	StorageModules = []string{
		"virtio_blk", "virtio_pci", "virtio_scsi", // VMs
		"nvme", "ahci", "sd_mod", // NVMe, SATA (and SCSI disks)
		"xhci_pci", "ehci_pci", "usb_storage", "uas", // USB disks
		"mmc_block", "sdhci_pci", "sdhci_acpi", // eMMC, SD cards
		"tpm_tis", "tpm_crb", // for measured boot (built in on most kernels)
	}
	// FilesystemModules are root filesystems; only the one on the root
	// device is loaded.
	FilesystemModules = []string{"ext4", "btrfs"}
)

// DefaultModules are all modules berth's initramfs carries by default.
var DefaultModules = append(append(append([]string{}, AlwaysModules...), StorageModules...), FilesystemModules...)

// Compression of the cpio archive.
const (
	Zstd = "zstd"
	Gzip = "gzip"
	None = "none"
)

// rootFilesystems maps root filesystem modules to the filesystem types
// (as blkdev reports them) they mount.
var rootFilesystems = map[string][]string{
	"ext4":  {"ext4", "ext3", "ext2"},
	"btrfs": {"btrfs"},
	"xfs":   {"xfs"},
	"f2fs":  {"f2fs"},
}

// moduleLists sorts the wanted modules into berth-init's lists (module
// paths, each list a full closure in load order; berth-init's loader skips
// what is already loaded): always (loaded on every boot), storage (device
// drivers, loaded when a device matches their aliases, all as a fallback)
// and per root filesystem type. A wanted module with a device alias (an
// alias with a bus prefix: "pci:…", "virtio:…", "mmc:block") is a device
// driver ("devname:" aliases name /dev nodes, not devices); root
// filesystems are known by name; everything else is always loaded.
func moduleLists(ix *kmod.Index, wanted []string) (always, storage []string, perFS map[string][]string) {
	device := map[string]bool{}
	isDevice := func(alias string) bool {
		return strings.Contains(alias, ":") && !strings.HasPrefix(alias, "devname:")
	}
	for _, p := range ix.Patterns {
		if isDevice(p.Pattern) {
			device[p.Module] = true
		}
	}
	for alias, mods := range ix.Alias {
		if isDevice(alias) {
			for _, m := range mods {
				device[m] = true
			}
		}
	}
	var alwaysNames, hwNames []string
	perFS = map[string][]string{}
	for _, w := range wanted {
		n := strings.ReplaceAll(w, "-", "_")
		if types, ok := rootFilesystems[n]; ok {
			if list := ix.Resolve([]string{w}).Order; len(list) > 0 {
				for _, t := range types {
					perFS[t] = list
				}
			}
			continue
		}
		if device[n] {
			hwNames = append(hwNames, w)
		} else {
			alwaysNames = append(alwaysNames, w)
		}
	}
	return ix.Resolve(alwaysNames).Order, ix.Resolve(hwNames).Order, perFS
}

func sortedKeys(m map[string][]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// maxModule bounds one module file read from a (possibly hostile) image.
const maxModule = 64 << 20

// Options for Build.
type Options struct {
	// Root is the image's root filesystem (os.DirFS of an unpacked root, or
	// composefs.TreeFS of an image in the store).
	Root fs.FS
	// KernelVersion names /usr/lib/modules/<KernelVersion>.
	KernelVersion string
	// InitBinary is the host path of the (static) berth-init; default:
	// berth-init next to the running executable, else /usr/lib/berth/berth-init.
	InitBinary string
	// Compression is Zstd (default), Gzip or None.
	Compression string
	// Modules overrides DefaultModules.
	Modules []string
}

// Report describes a built initramfs.
type Report struct {
	KernelVersion    string   `json:"kernel_version"`
	InitBinary       string   `json:"init_binary"`
	InitSize         int64    `json:"init_size"`
	Modules          []string `json:"modules"` // paths below /usr/lib/modules/<kver>, load order
	ModulesSize      int64    `json:"modules_size"`
	Builtin          []string `json:"builtin"` // wanted, built into the kernel
	Missing          []string `json:"missing"` // wanted, neither module nor built in
	Entries          int      `json:"entries"`
	UncompressedSize int64    `json:"uncompressed_size"`
	Size             int64    `json:"size"` // bytes written to w
	Compression      string   `json:"compression"`
	// KernelDecompresses is the module compression the kernel's config
	// says it decompresses itself (".xz", ...; "" none or unknown).
	KernelDecompresses string `json:"kernel_decompresses"`
	// Decompressed counts modules stored uncompressed because the kernel
	// cannot decompress their format.
	Decompressed int `json:"decompressed"`
}

// Build writes the initramfs to w.
func Build(w io.Writer, opts Options) (*Report, error) {
	if opts.Root == nil {
		return nil, errors.New("build initramfs: no image root given")
	}
	kver := opts.KernelVersion
	if kver == "" || strings.ContainsAny(kver, "/\x00") || kver == "." || kver == ".." {
		return nil, fmt.Errorf("build initramfs: invalid kernel version %q", kver)
	}
	comp := opts.Compression
	if comp == "" {
		comp = Zstd
	}
	if comp != Zstd && comp != Gzip && comp != None {
		return nil, fmt.Errorf("build initramfs: unknown compression %q (zstd, gzip or none)", comp)
	}
	initPath, err := findInit(opts.InitBinary)
	if err != nil {
		return nil, err
	}
	initData, err := readStaticELF(initPath)
	if err != nil {
		return nil, err
	}
	modDir := ""
	for _, d := range []string{"usr/lib/modules/" + kver, "lib/modules/" + kver} {
		if fi, err := fs.Stat(opts.Root, d); err == nil && fi.IsDir() {
			modDir = d
			break
		}
	}
	if modDir == "" {
		return nil, fmt.Errorf("build initramfs: the image has no /usr/lib/modules/%s", kver)
	}
	ix, err := kmod.ReadIndex(opts.Root, modDir)
	if err != nil {
		return nil, fmt.Errorf("build initramfs: %w", err)
	}
	wanted := opts.Modules
	if wanted == nil {
		wanted = DefaultModules
	}
	cl := ix.Resolve(wanted)
	rep := &Report{KernelVersion: kver, InitBinary: initPath, InitSize: int64(len(initData)),
		Modules: cl.Order, Builtin: cl.Builtin, Missing: cl.Missing, Compression: comp}

	a := newArchive()
	for _, d := range []string{"dev", "proc", "sys", "run", "sysroot", "tmp", "etc", "etc/berth", "usr", "usr/lib", "usr/lib/modules"} {
		a.dir(d, 0o755)
	}
	a.dirMode["tmp"] = 0o1777
	a.add(cpio.Record{Info: cpio.Info{Name: "dev/console", Mode: cpio.S_IFCHR | 0o600, Rmajor: 5, Rminor: 1}})
	a.add(cpio.Symlink("lib", "usr/lib"))
	a.add(cpio.StaticRecord(initData, cpio.Info{Name: "init", Mode: cpio.S_IFREG | 0o755}))
	a.add(cpio.StaticRecord([]byte("NAME=berth\nID=berth\nPRETTY_NAME=\"berth initramfs\"\n"), cpio.Info{Name: "etc/initrd-release", Mode: cpio.S_IFREG | 0o644}))

	// Modules stay compressed when the kernel decompresses their format
	// itself (berth-init then needs no decompressor); otherwise they are
	// stored uncompressed and the archive's compression covers them.
	kernelFormat := kernelModuleDecompression(opts.Root, modDir, kver)
	inArchive := map[string]string{} // image path → archive path
	for _, m := range cl.Order {
		inArchive[m] = m
		if c := kmod.CompressionOf(m); c != "" && c != kernelFormat {
			inArchive[m] = strings.TrimSuffix(m, c)
		}
	}
	rep.KernelDecompresses = kernelFormat
	dst := "usr/lib/modules/" + kver
	var dep bytes.Buffer
	for _, m := range cl.Order {
		data, err := readModule(opts.Root, path.Join(modDir, m))
		if err != nil {
			return nil, err
		}
		if c := kmod.CompressionOf(m); inArchive[m] != m {
			if data, err = decompressModule(data, c); err != nil {
				return nil, fmt.Errorf("build initramfs: decompress module %s: %w", m, err)
			}
			rep.Decompressed++
		}
		rep.ModulesSize += int64(len(data))
		name := path.Join(dst, inArchive[m])
		a.mkdirs(path.Dir(name))
		a.add(cpio.StaticRecord(data, cpio.Info{Name: name, Mode: cpio.S_IFREG | 0o644}))
		fmt.Fprintf(&dep, "%s:", inArchive[m])
		for _, d := range ix.Deps[m] {
			fmt.Fprintf(&dep, " %s", inArchive[d])
		}
		dep.WriteByte('\n')
	}
	a.mkdirs(dst)
	// modules.dep of exactly what is inside; modules.alias and
	// modules.softdep of what is inside (berth-init matches devices against
	// the aliases and resolves soft dependencies).
	a.add(cpio.StaticRecord(sortedLines(dep.Bytes()), cpio.Info{Name: dst + "/modules.dep", Mode: cpio.S_IFREG | 0o644}))
	inside := map[string]bool{}
	for _, m := range cl.Order {
		inside[kmod.Name(m)] = true
	}
	for _, f := range []string{"modules.alias", "modules.softdep"} {
		if b := filterModuleLines(opts.Root, path.Join(modDir, f), inside); len(b) > 0 {
			a.add(cpio.StaticRecord(b, cpio.Info{Name: dst + "/" + f, Mode: cpio.S_IFREG | 0o644}))
		}
	}
	for _, f := range []string{"modules.builtin"} {
		if b, err := fs.ReadFile(opts.Root, path.Join(modDir, f)); err == nil && len(b) < maxModule {
			a.add(cpio.StaticRecord(b, cpio.Info{Name: dst + "/" + f, Mode: cpio.S_IFREG | 0o644}))
		}
	}
	always, storage, perFS := moduleLists(ix, wanted)
	list := func(paths []string) []byte {
		var b strings.Builder
		for _, p := range paths {
			b.WriteString(inArchive[p] + "\n")
		}
		return []byte(b.String())
	}
	a.add(cpio.StaticRecord(list(always), cpio.Info{Name: layout.ModulesLoadList, Mode: cpio.S_IFREG | 0o644}))
	a.add(cpio.StaticRecord(list(storage), cpio.Info{Name: layout.StorageModulesList, Mode: cpio.S_IFREG | 0o644}))
	if len(perFS) > 0 {
		a.dir(layout.FilesystemModulesDir, 0o755)
		for _, fsName := range sortedKeys(perFS) {
			a.add(cpio.StaticRecord(list(perFS[fsName]), cpio.Info{Name: layout.FilesystemModulesDir + "/" + fsName, Mode: cpio.S_IFREG | 0o644}))
		}
	}

	cw := &countWriter{w: w}
	var out io.Writer = cw
	var closer io.Closer
	switch comp {
	case Zstd:
		// One thread and a fixed window: deterministic output that the
		// kernel's zstd decompressor (which bounds the window) accepts.
		zw, err := zstd.NewWriter(cw, zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(zstd.SpeedBestCompression),
			zstd.WithWindowSize(8<<20), zstd.WithEncoderCRC(true))
		if err != nil {
			return nil, err
		}
		out, closer = zw, zw
	case Gzip:
		gw, err := gzip.NewWriterLevel(cw, gzip.BestCompression)
		if err != nil {
			return nil, err
		}
		out, closer = gw, gw
	}
	uc := &countWriter{w: out}
	n, err := a.write(uc)
	if err != nil {
		return nil, fmt.Errorf("build initramfs: write cpio: %w", err)
	}
	if closer != nil {
		if err := closer.Close(); err != nil {
			return nil, fmt.Errorf("build initramfs: compress: %w", err)
		}
	}
	rep.Entries, rep.UncompressedSize, rep.Size = n, uc.n, cw.n
	return rep, nil
}

func sortedLines(b []byte) []byte {
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	sort.Strings(lines)
	if len(lines) == 1 && lines[0] == "" {
		return nil
	}
	return []byte(strings.Join(lines, "\n") + "\n")
}

func findInit(p string) (string, error) {
	if p != "" {
		return p, nil
	}
	var tried []string
	if exe, err := os.Executable(); err == nil {
		c := filepath.Join(filepath.Dir(exe), "berth-init")
		if _, err := os.Stat(c); err == nil {
			return c, nil
		}
		tried = append(tried, c)
	}
	c := "/usr/lib/berth/berth-init"
	if _, err := os.Stat(c); err == nil {
		return c, nil
	}
	tried = append(tried, c)
	return "", fmt.Errorf("build initramfs: berth-init not found (looked at %s); build it (make) or pass its path", strings.Join(tried, ", "))
}

// readStaticELF reads berth-init and refuses a dynamically linked binary:
// the initramfs has no dynamic loader, so it would fail only at boot.
func readStaticELF(p string) ([]byte, error) {
	data, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("build initramfs: read berth-init: %w", err)
	}
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("build initramfs: %s is not an ELF executable: %w", p, err)
	}
	for _, pr := range f.Progs {
		if pr.Type == elf.PT_INTERP {
			return nil, fmt.Errorf("build initramfs: %s is dynamically linked; build berth-init with CGO_ENABLED=0", p)
		}
	}
	return data, nil
}

// readModule reads one module file from the image, refusing symlinks
// (where the FS can tell) and oversized files.
func readModule(fsys fs.FS, name string) ([]byte, error) {
	var fi fs.FileInfo
	var err error
	if rl, ok := fsys.(fs.ReadLinkFS); ok {
		fi, err = rl.Lstat(name)
	} else {
		fi, err = fs.Stat(fsys, name)
	}
	if err != nil {
		return nil, fmt.Errorf("build initramfs: module %s: %w", name, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("build initramfs: module %s is not a regular file (%s)", name, fi.Mode().Type())
	}
	if fi.Size() > maxModule {
		return nil, fmt.Errorf("build initramfs: module %s is %d bytes, more than the %d allowed", name, fi.Size(), maxModule)
	}
	f, err := fsys.Open(name)
	if err != nil {
		return nil, fmt.Errorf("build initramfs: module %s: %w", name, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxModule+1))
	if err != nil {
		return nil, fmt.Errorf("build initramfs: read module %s: %w", name, err)
	}
	if len(b) > maxModule {
		return nil, fmt.Errorf("build initramfs: module %s is larger than %d bytes", name, maxModule)
	}
	return b, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// archive collects records and writes them sorted, parents first, with
// explicit directory modes (u-root's helpers would create 0777 ones).
type archive struct {
	recs    map[string]cpio.Record
	dirMode map[string]uint64
}

func newArchive() *archive {
	return &archive{recs: map[string]cpio.Record{}, dirMode: map[string]uint64{}}
}

func (a *archive) dir(name string, mode uint64) { a.dirMode[name] = mode }

func (a *archive) mkdirs(name string) {
	for d := name; d != "." && d != "/" && d != ""; d = path.Dir(d) {
		if _, ok := a.dirMode[d]; !ok {
			a.dirMode[d] = 0o755
		}
	}
}

func (a *archive) add(r cpio.Record) {
	a.mkdirs(path.Dir(r.Name))
	a.recs[r.Name] = r
}

func (a *archive) write(w io.Writer) (int, error) {
	for d, m := range a.dirMode {
		a.recs[d] = cpio.Directory(d, m)
	}
	names := make([]string, 0, len(a.recs))
	for n := range a.recs {
		names = append(names, n)
	}
	// Sorting by path components puts every directory before its contents.
	sort.Slice(names, func(i, j int) bool {
		return strings.ReplaceAll(names[i], "/", "\x00") < strings.ReplaceAll(names[j], "/", "\x00")
	})
	rw := cpio.Newc.Writer(w)
	for i, n := range names {
		r := a.recs[n]
		r.Ino = uint64(i + 1)
		r.UID, r.GID, r.MTime = 0, 0, 0
		r.NLink = 1
		if r.Mode&cpio.S_IFMT == cpio.S_IFDIR {
			r.NLink = 2
		}
		if err := rw.WriteRecord(r); err != nil {
			return i, fmt.Errorf("%s: %w", n, err)
		}
	}
	if err := cpio.WriteTrailer(rw); err != nil {
		return len(names), err
	}
	return len(names), nil
}
