package initrd

import (
	"bytes"
	"debug/elf"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/berth-dev/berth/internal/testenv"
	"github.com/klauspost/compress/zstd"
	"github.com/u-root/u-root/pkg/cpio"
)

const trixie = "/var/cache/berth-e2e/trixie-rootfs"

// staticInit returns a static ELF usable as InitBinary: the test binary
// itself when it is static (CGO_ENABLED=0), else skips.
func staticInit(t *testing.T) string {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.Open(exe)
	if err != nil {
		testenv.SkipOrFail(t, "test binary is not ELF: %v", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			testenv.SkipOrFail(t, "test binary is dynamically linked (run with CGO_ENABLED=0, as make unit does)")
		}
	}
	return exe
}

func trixieKver(t *testing.T) string {
	testenv.RequireFile(t, filepath.Join(trixie, ".recipe"), testenv.Guest)
	ents, _ := os.ReadDir(filepath.Join(trixie, "usr/lib/modules"))
	if len(ents) == 0 {
		t.Fatalf("guest rootfs %s has no /usr/lib/modules: rebuild it (%s)", trixie, testenv.Guest)
	}
	return ents[0].Name()
}

func readArchive(t *testing.T, data []byte) map[string]cpio.Record {
	t.Helper()
	zr, err := zstd.NewReader(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	defer zr.Close()
	var raw bytes.Buffer
	if _, err := raw.ReadFrom(zr); err != nil {
		t.Fatal(err)
	}
	recs, err := cpio.ReadAllRecords(cpio.Newc.Reader(bytes.NewReader(raw.Bytes())))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]cpio.Record{}
	for _, r := range recs {
		if _, dup := m[r.Name]; dup {
			t.Fatalf("duplicate entry %s", r.Name)
		}
		m[r.Name] = r
	}
	return m
}

func content(t *testing.T, r cpio.Record) string {
	b := make([]byte, r.FileSize)
	if _, err := r.ReadAt(b, 0); err != nil && r.FileSize > 0 {
		t.Fatal(err)
	}
	return string(b)
}

func TestBuildSynthetic(t *testing.T) {
	initBin := staticInit(t)
	k := "usr/lib/modules/6.1.0-test/"
	fsys := fstest.MapFS{
		k + "modules.dep":                       {Data: []byte("kernel/fs/erofs/erofs.ko.xz: kernel/lib/lz4.ko.xz\nkernel/lib/lz4.ko.xz:\nkernel/fs/overlayfs/overlay.ko.xz:\nkernel/unused.ko.xz:\n")},
		k + "modules.builtin":                   {Data: []byte("kernel/drivers/block/loop.ko\n")},
		k + "modules.alias":                     {Data: []byte("alias fs-erofs erofs\nalias pci:v*d*sv*sd*bc01sc08i02* nvme\n")},
		"boot/config-6.1.0-test":                {Data: []byte("CONFIG_MODULE_DECOMPRESS=y\nCONFIG_MODULE_COMPRESS_XZ=y\n")},
		k + "kernel/fs/erofs/erofs.ko.xz":       {Data: []byte("erofs module")},
		k + "kernel/lib/lz4.ko.xz":              {Data: []byte("lz4 module")},
		k + "kernel/fs/overlayfs/overlay.ko.xz": {Data: []byte("overlay module")},
		k + "kernel/unused.ko.xz":               {Data: []byte("unused")},
	}
	var out bytes.Buffer
	rep, err := Build(&out, Options{Root: fsys, KernelVersion: "6.1.0-test", InitBinary: initBin, Modules: []string{"erofs", "overlay", "loop", "nvme"}})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(rep.Modules, " ") != "kernel/lib/lz4.ko.xz kernel/fs/erofs/erofs.ko.xz kernel/fs/overlayfs/overlay.ko.xz" ||
		strings.Join(rep.Builtin, " ") != "loop" || strings.Join(rep.Missing, " ") != "nvme" {
		t.Fatalf("report: %+v", rep)
	}
	if rep.Size != int64(out.Len()) {
		t.Fatalf("report size %d, wrote %d", rep.Size, out.Len())
	}
	m := readArchive(t, out.Bytes())
	if r, ok := m["init"]; !ok || r.Mode != cpio.S_IFREG|0o755 || r.FileSize != uint64(rep.InitSize) {
		t.Fatalf("/init missing or wrong: %+v", r.Info)
	}
	if content(t, m["etc/berth/modules.load"]) != strings.Join(rep.Modules, "\n")+"\n" {
		t.Fatal("modules.load differs from the report")
	}
	if got := content(t, m["usr/lib/modules/6.1.0-test/modules.alias"]); got != "alias fs-erofs erofs\n" {
		t.Fatalf("modules.alias = %q, want only the aliases of modules inside", got)
	}
	if content(t, m["usr/lib/modules/6.1.0-test/kernel/fs/erofs/erofs.ko.xz"]) != "erofs module" {
		t.Fatal("module content differs")
	}
	if _, ok := m["usr/lib/modules/6.1.0-test/kernel/unused.ko.xz"]; ok {
		t.Fatal("module outside the closure was included")
	}
	for name, r := range m {
		if r.Mode&cpio.S_IFMT == cpio.S_IFDIR && r.Mode&0o7777 != 0o755 && name != "tmp" {
			t.Errorf("directory %s has mode %o", name, r.Mode&0o7777)
		}
		if r.MTime != 0 || r.UID != 0 || r.GID != 0 {
			t.Errorf("%s: mtime/uid/gid not zero", name)
		}
		if d := path.Dir(name); d != "." {
			if p, ok := m[d]; !ok || p.Mode&cpio.S_IFMT != cpio.S_IFDIR {
				t.Errorf("%s: parent %s missing", name, d)
			}
		}
	}
	if r := m["dev/console"]; r.Mode != cpio.S_IFCHR|0o600 || r.Rmajor != 5 || r.Rminor != 1 {
		t.Errorf("dev/console: %+v", r.Info)
	}
	// Same inputs, same bytes.
	var again bytes.Buffer
	if _, err := Build(&again, Options{Root: fsys, KernelVersion: "6.1.0-test", InitBinary: initBin, Modules: []string{"erofs", "overlay", "loop", "nvme"}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), again.Bytes()) {
		t.Fatal("two builds from the same inputs differ")
	}
}

func TestBuildRefusesHostileInput(t *testing.T) {
	initBin := staticInit(t)
	k := "usr/lib/modules/v/"
	for name, fsys := range map[string]fstest.MapFS{
		"traversal in modules.dep": {k + "modules.dep": {Data: []byte("../../../etc/shadow:\n")}},
		"module is a symlink": {k + "modules.dep": {Data: []byte("kernel/erofs.ko:\n")},
			k + "kernel/erofs.ko": {Data: []byte("/etc/shadow"), Mode: os.ModeSymlink}},
		"no modules dir": {"etc/x": {Data: []byte("x")}},
	} {
		if _, err := Build(&bytes.Buffer{}, Options{Root: fsys, KernelVersion: "v", InitBinary: initBin, Modules: []string{"erofs"}}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	for _, kv := range []string{"", "..", "a/b"} {
		if _, err := Build(&bytes.Buffer{}, Options{Root: fstest.MapFS{}, KernelVersion: kv, InitBinary: initBin}); err == nil {
			t.Errorf("kernel version %q accepted", kv)
		}
	}
	// A dynamically linked berth-init would fail only at boot: refuse it now.
	if _, err := os.Stat("/bin/ls"); err == nil {
		_, err := Build(&bytes.Buffer{}, Options{Root: fstest.MapFS{}, KernelVersion: "v", InitBinary: "/bin/ls"})
		if err == nil || !strings.Contains(err.Error(), "dynamically linked") {
			t.Errorf("dynamic init: %v", err)
		}
	}
}

// TestBuildTrixie builds the initramfs for Debian trixie's kernel, lists it
// with cpio -t, and checks that the archive's modules.dep is covered: every
// module and every dependency it names is in the archive, and nothing that
// berth wants is missing.
func TestBuildTrixie(t *testing.T) {
	initBin := staticInit(t)
	kver := trixieKver(t)
	var out bytes.Buffer
	rep, err := Build(&out, Options{Root: os.DirFS(trixie), KernelVersion: kver, InitBinary: initBin})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("trixie %s: %d bytes zstd (%d uncompressed), %d modules (%d bytes), builtin %v, missing %v",
		kver, rep.Size, rep.UncompressedSize, len(rep.Modules), rep.ModulesSize, rep.Builtin, rep.Missing)
	if len(rep.Missing) != 0 {
		t.Errorf("missing modules for %s: %v", kver, rep.Missing)
	}
	var listed []string
	if testenv.HaveTool(t, "cpio", "cpio") {
		c := exec.Command("sh", "-c", "zstd -dc | cpio -t --quiet")
		c.Stdin = bytes.NewReader(out.Bytes())
		o, err := c.Output()
		if err != nil {
			t.Fatalf("zstd -dc | cpio -t: %v", err)
		}
		listed = strings.Fields(string(o))
	} else {
		for n := range readArchive(t, out.Bytes()) {
			listed = append(listed, n)
		}
	}
	have := map[string]bool{}
	for _, n := range listed {
		have[n] = true
	}
	if !have["init"] {
		t.Fatal("cpio -t does not list init")
	}
	m := readArchive(t, out.Bytes())
	dir := "usr/lib/modules/" + kver + "/"
	dep := content(t, m[dir+"modules.dep"])
	var mods []string
	for _, l := range strings.Split(strings.TrimSpace(dep), "\n") {
		mod, deps, _ := strings.Cut(l, ":")
		mods = append(mods, mod)
		for _, p := range append([]string{mod}, strings.Fields(deps)...) {
			if !have[dir+p] {
				t.Errorf("modules.dep names %s, which cpio -t does not list", p)
			}
		}
	}
	sort.Strings(mods)
	// Everything in the archive is on a list: always loaded, storage
	// (loaded on a matching device, or all as a fallback), or one
	// filesystem's list once the root device's type is known.
	loadSet := map[string]bool{}
	for _, l := range strings.Fields(content(t, m["etc/berth/modules.load"]) + " " + content(t, m["etc/berth/modules.storage"])) {
		loadSet[l] = true
	}
	for name, rec := range m {
		if strings.HasPrefix(name, "etc/berth/modules.fs/") {
			for _, l := range strings.Fields(content(t, rec)) {
				loadSet[l] = true
			}
		}
	}
	var load []string
	for l := range loadSet {
		load = append(load, l)
	}
	sort.Strings(load)
	if strings.Join(mods, " ") != strings.Join(load, " ") {
		t.Errorf("modules.load + modules.storage + modules.fs/* and modules.dep differ:\n%s\n%s", strings.Join(mods, " "), strings.Join(load, " "))
	}
	// btrfs (and its raid6/xor benchmarks) is not loaded for an ext4 root.
	// Device drivers are not loaded unconditionally, composefs is.
	if always := content(t, m["etc/berth/modules.load"]); !strings.Contains(always, "/erofs.ko") || !strings.Contains(always, "/overlay.ko") || !strings.Contains(always, "/loop.ko") {
		t.Errorf("modules.load = %q, want erofs, overlay, loop", always)
	}
	for _, l := range strings.Fields(content(t, m["etc/berth/modules.load"])) {
		if strings.Contains(l, "/btrfs/") || strings.Contains(l, "raid6") || strings.Contains(l, "/ext4/") || strings.Contains(l, "ahci") || strings.Contains(l, "nvme") || strings.Contains(l, "usb") || strings.Contains(l, "mmc") {
			t.Errorf("modules.load loads %s on every boot", l)
		}
	}
	// Every storage driver is found by its device alias.
	alias := content(t, m[dir+"modules.alias"])
	for _, a := range []string{" virtio_blk\n", " nvme\n", " ahci\n", " sd_mod\n", " xhci_pci\n", " usb_storage\n", " uas\n", " mmc_block\n", " sdhci_pci\n"} {
		if !strings.Contains(alias, a) {
			t.Errorf("modules.alias has no alias for%s", strings.TrimSuffix(a, "\n"))
		}
	}
	// The kernel decompresses xz itself (trixie's config): modules stay .ko.xz.
	if rep.KernelDecompresses != ".xz" || rep.Decompressed != 0 {
		t.Errorf("kernel decompresses %q, %d modules decompressed at build time; want .xz, 0", rep.KernelDecompresses, rep.Decompressed)
	}
	if ext4 := content(t, m["etc/berth/modules.fs/ext4"]); !strings.Contains(ext4, "ext4.ko") {
		t.Errorf("modules.fs/ext4 = %q, want the ext4 module", ext4)
	}
	for _, want := range DefaultModules {
		found := false
		for _, p := range mods {
			if n := path.Base(p); strings.TrimSuffix(strings.ReplaceAll(n, "-", "_"), ".ko.xz") == want {
				found = true
			}
		}
		for _, b := range rep.Builtin {
			found = found || b == want
		}
		if !found {
			t.Errorf("%s neither in the archive nor built in", want)
		}
	}
	if rep.Size > 10<<20 {
		t.Errorf("initramfs is %d bytes, more than the 10 MiB target", rep.Size)
	}
	// A kernel without CONFIG_MODULE_DECOMPRESS (here: no config in the
	// image) gets every module uncompressed.
	var raw bytes.Buffer
	rep2, err := Build(&raw, Options{Root: noConfigFS{os.DirFS(trixie)}, KernelVersion: kver, InitBinary: initBin, Modules: []string{"ext4"}})
	if err != nil {
		t.Fatal(err)
	}
	m2 := readArchive(t, raw.Bytes())
	ext4 := m2[dir+"kernel/fs/ext4/ext4.ko"]
	if rep2.KernelDecompresses != "" || rep2.Decompressed != len(rep2.Modules) || !strings.HasPrefix(content(t, ext4), "\x7fELF") ||
		!strings.Contains(content(t, m2["etc/berth/modules.fs/ext4"]), "kernel/fs/ext4/ext4.ko\n") {
		t.Errorf("no kernel config: %+v; ext4.ko %d bytes", rep2, ext4.FileSize)
	}
}

// noConfigFS hides the kernel config of an image root.
type noConfigFS struct{ fs.FS }

func (n noConfigFS) Open(name string) (fs.File, error) {
	if strings.HasPrefix(name, "boot/config-") || strings.HasSuffix(name, "/config") {
		return nil, fs.ErrNotExist
	}
	return n.FS.Open(name)
}
