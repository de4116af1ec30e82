package generator

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
	"golang.org/x/sys/unix"
)

const trixie = "/var/cache/berth-e2e/trixie-rootfs"

// TestDracutModule builds a dracut initrd with dracut/90berth inside the
// trixie rootfs (through a throw-away overlay, so the rootfs stays
// untouched) and checks with lsinitrd that berth-init, the generator, the
// unit and the erofs/overlay modules are in it.
func TestDracutModule(t *testing.T) {
	testenv.RequireRoot(t, "overlay mount and chroot into the trixie rootfs")
	testenv.RequireFile(t, filepath.Join(trixie, ".recipe"), testenv.Guest)
	// test/guest/packages.txt installs dracut.
	testenv.RequireFile(t, filepath.Join(trixie, "usr/bin/dracut"), "rebuild the guest rootfs: "+testenv.Guest)
	if testing.Short() {
		t.Skip("runs dracut (about a minute)")
	}
	dir := os.Getenv("BERTH_DRACUT_TEST_DIR")
	if dir == "" {
		dir = t.TempDir()
		build := func(out, pkg string) {
			c := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(dir, out), pkg)
			c.Env = append(os.Environ(), "CGO_ENABLED=0")
			if o, err := c.CombinedOutput(); err != nil {
				t.Fatalf("build %s: %v\n%s", pkg, err, o)
			}
		}
		build("berth-init", "github.com/berth-dev/berth/cmd/berth-init")
		build("berth-generator", "github.com/berth-dev/berth/generators/berth-generator")
		cmd := exec.Command(os.Args[0], "-test.run=^TestDracutModule$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), "BERTH_DRACUT_TEST_DIR="+dir)
		cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
		out, err := cmd.CombinedOutput()
		t.Logf("child in a private mount namespace:\n%s", out)
		if err != nil || !bytes.Contains(out, []byte("--- PASS: TestDracutModule")) {
			t.Fatalf("child failed: %v", err)
		}
		return
	}
	_, file, _, _ := runtime.Caller(0)
	repo := filepath.Join(filepath.Dir(file), "../../..")
	upper, work, m := filepath.Join(dir, "upper"), filepath.Join(dir, "work"), filepath.Join(dir, "root")
	for _, d := range []string{upper, work, m} {
		os.MkdirAll(d, 0o755)
	}
	if err := unix.Mount("overlay", m, "overlay", 0, "lowerdir="+trixie+",upperdir="+upper+",workdir="+work); err != nil {
		t.Fatalf("overlay over the trixie rootfs: %v", err)
	}
	install := func(src, dst string, mode os.FileMode) {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Dir(filepath.Join(m, dst)), 0o755)
		if err := os.WriteFile(filepath.Join(m, dst), b, mode); err != nil {
			t.Fatal(err)
		}
	}
	install(filepath.Join(dir, "berth-init"), "usr/lib/berth/berth-init", 0o755)
	install(filepath.Join(dir, "berth-generator"), "usr/lib/systemd/system-generators/berth-generator", 0o755)
	install(filepath.Join(repo, "units", Unit), "usr/lib/systemd/system/"+Unit, 0o644)
	install(filepath.Join(repo, "dracut/90berth/module-setup.sh"), "usr/lib/dracut/modules.d/90berth/module-setup.sh", 0o755)
	for _, d := range []string{"proc", "sys", "dev"} {
		if err := unix.Mount("/"+d, filepath.Join(m, d), "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			t.Fatal(err)
		}
	}
	mods, _ := os.ReadDir(filepath.Join(m, "usr/lib/modules"))
	if len(mods) == 0 {
		t.Fatal("no kernel in the rootfs")
	}
	kver := mods[0].Name()
	dracut := exec.Command("chroot", m, "dracut", "--force", "--no-hostonly", "--quiet", "--kver", kver, "--modules", "berth", "/tmp/berth-test-initrd.img")
	if out, err := dracut.CombinedOutput(); err != nil {
		t.Fatalf("dracut: %v\n%s", err, out)
	}
	out, err := exec.Command("chroot", m, "lsinitrd", "/tmp/berth-test-initrd.img").CombinedOutput()
	if err != nil {
		t.Fatalf("lsinitrd: %v\n%s", err, out)
	}
	list := string(out)
	for _, want := range []string{"usr/lib/berth/berth-init", "usr/lib/systemd/system-generators/berth-generator", "usr/lib/systemd/system/" + Unit, "erofs.ko", "overlay.ko", "loop.ko"} {
		if !strings.Contains(list, want) {
			t.Errorf("dracut initrd lacks %s", want)
		}
	}
	fi, _ := os.Stat(filepath.Join(m, "tmp/berth-test-initrd.img"))
	t.Logf("dracut initrd with the berth module: %d bytes", fi.Size())
}
