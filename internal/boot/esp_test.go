package boot

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
	"github.com/berth-dev/berth/internal/uki"
)

const hostStub = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"

// fatESP provides an ESP directory backed by FAT and returns the mount
// point, the image path and a function that unmounts it and runs
// fsck.fat -n on the image. When the kernel can mount vfat, the code under
// test writes to a mounted FAT image (FAT's rename and case rules for real).
// Kernels without vfat (this build host) get a plain directory whose tree
// is copied into a fresh FAT image with mtools at the end, so names and
// layout are still checked on FAT; the VM lane covers a mounted ESP.
func fatESP(t *testing.T) (dir, img string, unmountAndCheck func() string) {
	t.Helper()
	for tool, pkg := range map[string]string{"mkfs.vfat": "dosfstools", "fsck.fat": "dosfstools", "mdir": "mtools", "mcopy": "mtools"} {
		testenv.RequireTool(t, tool, pkg)
	}
	tmp := t.TempDir()
	img = filepath.Join(tmp, "esp.img")
	dir = filepath.Join(tmp, "esp")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(64 << 20)
	f.Close()
	if out, err := exec.Command("mkfs.vfat", "-F", "32", "-n", "ESP", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.vfat: %v\n%s", err, out)
	}
	mounted := false
	if os.Geteuid() == 0 {
		if out, err := exec.Command("mount", "-t", "vfat", "-o", "loop", img, dir).CombinedOutput(); err == nil {
			mounted = true
		} else {
			t.Logf("kernel cannot mount vfat (%s): writing to a plain directory, copied into the FAT image with mtools afterwards", strings.TrimSpace(string(out)))
		}
	} else {
		t.Log("not root: writing to a plain directory, copied into the FAT image with mtools afterwards")
	}
	t.Cleanup(func() {
		if mounted {
			exec.Command("umount", dir).Run()
		}
	})
	return dir, img, func() string {
		t.Helper()
		if mounted {
			if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
				t.Fatalf("umount: %v %s", err, out)
			}
			mounted = false
		} else {
			des, _ := os.ReadDir(dir)
			for _, de := range des {
				if out, err := exec.Command("mcopy", "-s", "-i", img, filepath.Join(dir, de.Name()), "::/").CombinedOutput(); err != nil {
					t.Fatalf("mcopy %s: %v\n%s", de.Name(), err, out)
				}
			}
		}
		out, err := exec.Command("fsck.fat", "-n", img).CombinedOutput()
		if err != nil {
			t.Errorf("fsck.fat -n: %v\n%s", err, out)
		}
		return string(out)
	}
}

// mdir lists a directory of the image with mtools (bare names).
func mdir(t *testing.T, img, dir string) []string {
	out, err := exec.Command("mdir", "-i", img, "-b", "::/"+dir).CombinedOutput()
	if err != nil {
		t.Fatalf("mdir %s: %v\n%s", dir, err, out)
	}
	var names []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			names = append(names, filepath.Base(l))
		}
	}
	return names
}

// testUKI assembles a small real UKI from the host's stub.
func testUKI(t *testing.T, dir, name, osrel string) string {
	testenv.RequireFile(t, hostStub, "systemd-boot-efi")
	stub, err := os.ReadFile(hostStub)
	if err != nil {
		t.Fatal(err)
	}
	img, _, err := uki.Assemble(uki.Options{Stub: stub, Linux: bytes.Repeat([]byte(name), 1000), Cmdline: "quiet", OSRelease: []byte(osrel)})
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name+".efi")
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func ids(es []Entry) string {
	var s []string
	for _, e := range es {
		s = append(s, e.ID+":"+e.State)
	}
	return strings.Join(s, " ")
}

func mustDefault(t *testing.T, esp ESP) string {
	t.Helper()
	d, err := esp.Default()
	if err != nil || d == nil {
		t.Fatalf("Default: %v %v", d, err)
	}
	return d.ID
}

func TestESPLifecycleOnFAT(t *testing.T) {
	dir, img, check := fatESP(t)
	esp := ESP{Dir: dir}
	testenv.RequireFile(t, "/usr/lib/systemd/boot/efi/systemd-bootx64.efi", "systemd-boot-efi")
	if err := esp.InstallSystemdBoot(os.DirFS("/")); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
	for _, p := range []string{"EFI/systemd/systemd-bootx64.efi", "EFI/BOOT/BOOTX64.EFI"} {
		if got, err := os.ReadFile(filepath.Join(dir, p)); err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: not systemd-boot (%v)", p, err)
		}
	}
	conf, _ := os.ReadFile(filepath.Join(dir, LoaderConf))
	if string(conf) != "timeout 3\ndefault berth-*\neditor no\n" {
		t.Errorf("loader.conf:\n%s", conf)
	}
	// Another OS's loader at the removable path is left alone.
	os.WriteFile(filepath.Join(dir, "EFI/BOOT/BOOTX64.EFI"), []byte("shim of the stock OS"), 0o644)
	if err := esp.InstallSystemdBoot(os.DirFS("/")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "EFI/BOOT/BOOTX64.EFI")); string(b) != "shim of the stock OS" {
		t.Error("another boot loader at EFI/BOOT was overwritten")
	}
	os.Remove(filepath.Join(dir, "EFI/BOOT/BOOTX64.EFI"))
	// Installing again keeps a user's loader.conf edits.
	os.WriteFile(filepath.Join(dir, LoaderConf), []byte("timeout 5\ndefault berth-*\nconsole-mode max\n"), 0o644)
	if err := esp.InstallSystemdBoot(os.DirFS("/")); err != nil {
		t.Fatal(err)
	}
	if conf, _ := os.ReadFile(filepath.Join(dir, LoaderConf)); !strings.Contains(string(conf), "console-mode max") {
		t.Errorf("reinstall lost loader.conf settings:\n%s", conf)
	}

	src := t.TempDir()
	osrel := "ID=debian\nVERSION_ID=13\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n"
	for _, id := range []string{"1-aaaaaaaaaaaa", "2-bbbbbbbbbbbb", "10-cccccccccccc"} {
		if err := esp.AddUKI(id, testUKI(t, src, id, osrel), DefaultTries); err != nil {
			t.Fatal(err)
		}
	}
	es, err := esp.Entries()
	if err != nil {
		t.Fatal(err)
	}
	if got := ids(es); got != "10-cccccccccccc:indeterminate 2-bbbbbbbbbbbb:indeterminate 1-aaaaaaaaaaaa:indeterminate" {
		t.Errorf("order: %s", got)
	}
	if es[0].SortKey != "debian" || es[0].Version != "13" || es[0].Title != "Debian GNU/Linux 13 (trixie)" {
		t.Errorf("osrel fields: %+v", es[0])
	}
	if d := mustDefault(t, esp); d != "10-cccccccccccc" {
		t.Errorf("default %s, want the newest", d)
	}

	// Three failed boots of the newest: it goes bad and sorts last, so the
	// unpinned default falls back to the previous deployment by itself.
	for i := 0; i < 3; i++ {
		if err := esp.RecordTry("10-cccccccccccc"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "EFI/Linux/berth-10-cccccccccccc+0-3.efi")); err != nil {
		t.Errorf("after three tries: %v", err)
	}
	es, _ = esp.Entries()
	if got := ids(es); got != "2-bbbbbbbbbbbb:indeterminate 1-aaaaaaaaaaaa:indeterminate 10-cccccccccccc:bad" {
		t.Errorf("order after failures: %s", got)
	}
	if d := mustDefault(t, esp); d != "2-bbbbbbbbbbbb" {
		t.Errorf("automatic fallback picked %s", d)
	}
	if err := esp.SetDefault("10-cccccccccccc"); err == nil {
		t.Error("a bad entry became the default")
	}
	if err := esp.Bless("2-bbbbbbbbbbbb"); err != nil {
		t.Fatal(err)
	}

	// Rollback pins the previous entry; a second rollback swaps back and
	// unpins.
	to, err := esp.Rollback()
	if err != nil || to != "1-aaaaaaaaaaaa" {
		t.Fatalf("rollback to %s: %v", to, err)
	}
	cfg, _ := esp.ReadLoaderConf()
	if cfg.Get("default") != "berth-1-aaaaaaaaaaaa[.+]*" || mustDefault(t, esp) != "1-aaaaaaaaaaaa" {
		t.Errorf("after rollback: default %q -> %s", cfg.Get("default"), mustDefault(t, esp))
	}
	if to, err := esp.Rollback(); err != nil || to != "2-bbbbbbbbbbbb" {
		t.Fatalf("second rollback to %s: %v", to, err)
	}
	cfg, _ = esp.ReadLoaderConf()
	if cfg.Get("default") != DefaultPattern || mustDefault(t, esp) != "2-bbbbbbbbbbbb" {
		t.Errorf("after swapping back: default %q", cfg.Get("default"))
	}

	// Re-adding an id replaces its entry (new counter, old file gone).
	if err := esp.AddUKI("2-bbbbbbbbbbbb", testUKI(t, src, "2-bbbbbbbbbbbb", osrel), 2); err != nil {
		t.Fatal(err)
	}
	if files, _ := esp.filesOf(LinuxDir, "2-bbbbbbbbbbbb"); len(files) != 1 || files[0] != "berth-2-bbbbbbbbbbbb+2.efi" {
		t.Errorf("after re-add: %v", files)
	}

	// Type #1 entry.
	kernel := filepath.Join(src, "vmlinuz")
	initrd := filepath.Join(src, "initrd")
	os.WriteFile(kernel, []byte("kernel image"), 0o644)
	os.WriteFile(initrd, []byte("initrd image"), 0o644)
	bls := BLSEntry{Title: "Debian 13 (berth 11)", Version: "6.12.117", SortKey: "debian", Options: "root=PARTUUID=x berth.deploy=11-dddddddddddd", Linux: kernel, Initrds: []string{initrd}}
	if err := esp.AddBLS("11-dddddddddddd", bls, DefaultTries); err != nil {
		t.Fatal(err)
	}
	entry, _ := os.ReadFile(filepath.Join(dir, "loader/entries/berth-11-dddddddddddd+3.conf"))
	wantEntry := "title Debian 13 (berth 11)\nversion 6.12.117\nsort-key debian\nlinux /berth/11-dddddddddddd/linux\ninitrd /berth/11-dddddddddddd/initrd-0\noptions root=PARTUUID=x berth.deploy=11-dddddddddddd\n"
	if string(entry) != wantEntry {
		t.Errorf("BLS entry:\n%s", entry)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "berth/11-dddddddddddd/initrd-0")); string(b) != "initrd image" {
		t.Errorf("initrd copy %q", b)
	}
	if err := esp.AddBLS("12-eeeeeeeeeeee", BLSEntry{Title: "x\ninjected", Linux: kernel}, 3); err == nil {
		t.Error("line break in a BLS field accepted")
	}

	// Removal: entries of removed deployments disappear.
	if err := esp.Remove("10-cccccccccccc"); err != nil {
		t.Fatal(err)
	}
	if err := esp.Prune([]string{"2-bbbbbbbbbbbb", "11-dddddddddddd"}); err != nil {
		t.Fatal(err)
	}
	es, _ = esp.Entries()
	// Same sort key: the higher version sorts first ("13" from the UKI's
	// .osrel beats the BLS entry's "6.12.117"), before ids are compared.
	if got := ids(es); got != "2-bbbbbbbbbbbb:indeterminate 11-dddddddddddd:indeterminate" {
		t.Errorf("after prune: %s", got)
	}
	if err := esp.Remove("11-dddddddddddd"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "berth/11-dddddddddddd")); !os.IsNotExist(err) {
		t.Error("BLS kernel directory left behind")
	}

	fsck := check()
	if !strings.Contains(fsck, "files") {
		t.Logf("fsck.fat: %s", fsck)
	}
	if got := mdir(t, img, "EFI/Linux"); strings.Join(got, " ") != "berth-2-bbbbbbbbbbbb+2.efi" {
		t.Errorf("mdir EFI/Linux: %v", got)
	}
	if got := mdir(t, img, "EFI/BOOT"); strings.Join(got, " ") != "BOOTX64.EFI" {
		t.Errorf("mdir EFI/BOOT: %v", got)
	}
	if got := mdir(t, img, "loader"); !strings.Contains(strings.Join(got, " "), "loader.conf") {
		t.Errorf("mdir loader: %v", got)
	}
}

// TestInterruptedWrites checks the readers' recovery from each crash point
// of a replacement on FAT.
func TestInterruptedWrites(t *testing.T) {
	dir, _, check := fatESP(t)
	esp := ESP{Dir: dir}
	os.MkdirAll(filepath.Join(dir, "loader"), 0o755)
	conf := filepath.Join(dir, LoaderConf)

	// Crash after the new file was written, before the old was removed:
	// readers take the old one.
	os.WriteFile(conf, []byte("default berth-*\n"), 0o644)
	os.WriteFile(conf+newSuffix, []byte("default berth-1-a"), 0o644)
	c, err := esp.ReadLoaderConf()
	if err != nil || c.Get("default") != "berth-*" {
		t.Errorf("both present: %q %v", c.Get("default"), err)
	}
	// Crash after the old file was removed: the new one is complete.
	os.Remove(conf)
	os.WriteFile(conf+newSuffix, []byte("default berth-2-b[.+]*\n"), 0o644)
	c, err = esp.ReadLoaderConf()
	if err != nil || c.Get("default") != "berth-2-b[.+]*" {
		t.Errorf("only new present: %q %v", c.Get("default"), err)
	}
	// The next write puts a complete loader.conf in place and no leftover.
	if err := esp.SetTimeout(4); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(conf); string(b) != "default berth-2-b[.+]*\ntimeout 4\n" {
		t.Errorf("after the next write: %q", b)
	}
	if _, err := os.Stat(conf + newSuffix); !os.IsNotExist(err) {
		t.Error("leftover new file after a write")
	}
	// An entry write that never got renamed is no entry; Prune removes it.
	os.MkdirAll(filepath.Join(dir, LinuxDir), 0o755)
	os.WriteFile(filepath.Join(dir, LinuxDir, "berth-3-cccccccccccc+3.efi"+newSuffix), []byte("partial"), 0o644)
	es, err := esp.Entries()
	if err != nil || len(es) != 0 {
		t.Errorf("entries %v %v", es, err)
	}
	if err := esp.Prune(nil); err != nil {
		t.Fatal(err)
	}
	if m, _ := filepath.Glob(filepath.Join(dir, LinuxDir, "*")); len(m) != 0 {
		t.Errorf("leftovers %v", m)
	}
	check()
}
