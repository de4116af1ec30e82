package boot

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/qemu"
	"github.com/berth-dev/berth/internal/testenv"
	"github.com/berth-dev/berth/internal/uki"
)

const guestRootfs = "/var/cache/berth-e2e/trixie-rootfs"

var deployArg = regexp.MustCompile(`Command line:.*berth\.deploy=(\S+)`)

// bootESP copies the ESP tree into a fresh FAT image, boots it in QEMU with
// OVMF until the kernel prints its command line, and returns the deployment
// id the kernel was started for and the image (for inspecting the renames
// systemd-boot made).
func bootESP(t *testing.T, espDir string) (string, string) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "esp.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(192 << 20)
	f.Close()
	if out, err := exec.Command("mkfs.vfat", "-F", "32", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.vfat: %v %s", err, out)
	}
	des, _ := os.ReadDir(espDir)
	for _, de := range des {
		if out, err := exec.Command("mcopy", "-s", "-i", img, filepath.Join(espDir, de.Name()), "::/").CombinedOutput(); err != nil {
			t.Fatalf("mcopy: %v %s", err, out)
		}
	}
	vars := filepath.Join(t.TempDir(), "vars.fd")
	b, err := os.ReadFile(qemu.OVMFVars)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(vars, b, 0o644)
	args := []string{"-machine", "q35", "-m", "1024", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-drive", "if=pflash,format=raw,readonly=on,file=" + qemu.OVMFCode,
		"-drive", "if=pflash,format=raw,file=" + vars,
		"-drive", "file=" + img + ",format=raw,if=virtio"}
	id := ""
	res, err := qemu.Run(context.Background(), qemu.RunOptions{Args: args, Timeout: 15 * time.Minute,
		Until: func(line string) bool {
			if m := deployArg.FindStringSubmatch(line); m != nil {
				id = m[1]
			}
			return id != ""
		}})
	t.Logf("qemu under %s (%s)", res.Accel, res.Why)
	if err != nil {
		t.Fatalf("the guest never printed a kernel command line with berth.deploy=: %v\n%s", err, res.Tail(40))
	}
	t.Logf("booted %s after %s", id, res.Took.Round(time.Second))
	return id, img
}

// TestSystemdBootSelection boots berth's entries with the real systemd-boot
// 257 and systemd-stub 257 under OVMF: the newest entry boots and
// systemd-boot counts the try in its file name; an entry out of tries
// falls back to the previous one; a rollback pin wins over the order.
func TestSystemdBootSelection(t *testing.T) {
	if testing.Short() {
		t.Skip("boots QEMU three times (minutes without KVM)")
	}
	// The guest rootfs gives the kernel, initrd, systemd-boot and stub.
	testenv.RequireFile(t, guestRootfs+"/.recipe", testenv.Guest)
	testenv.RequireTool(t, "qemu-system-x86_64", "qemu-system-x86")
	testenv.RequireTool(t, "mkfs.vfat", "dosfstools")
	testenv.RequireTool(t, "mcopy", "mtools")
	testenv.RequireTool(t, "mdir", "mtools")
	testenv.RequireFile(t, qemu.OVMFCode, "ovmf")
	kernels, _ := filepath.Glob(guestRootfs + "/boot/vmlinuz-*")
	initrds, _ := filepath.Glob(guestRootfs + "/boot/initrd.img-*")
	if len(kernels) == 0 || len(initrds) == 0 {
		t.Fatalf("guest rootfs %s has no kernel/initrd in /boot: rebuild it (%s)", guestRootfs, testenv.Guest)
	}
	stub, _, err := uki.FindStub(os.DirFS(guestRootfs))
	if err != nil {
		t.Fatal(err)
	}
	linux, _ := os.ReadFile(kernels[0])
	initrd, _ := os.ReadFile(initrds[0])
	osrel, _ := os.ReadFile(guestRootfs + "/usr/lib/os-release")

	esp := ESP{Dir: t.TempDir()}
	if err := esp.InstallSystemdBoot(os.DirFS(guestRootfs)); err != nil {
		t.Fatal(err)
	}
	if err := esp.SetTimeout(0); err != nil {
		t.Fatal(err)
	}
	src := t.TempDir()
	add := func(id string) {
		p := filepath.Join(src, id+".efi")
		_, err := uki.Build(p, uki.Options{Stub: stub, Linux: linux, Initrds: [][]byte{initrd}, OSRelease: osrel,
			Cmdline: "console=ttyS0 panic=-1 rd.shell=0 berth.deploy=" + id})
		if err != nil {
			t.Fatal(err)
		}
		if err := esp.AddUKI(id, p, DefaultTries); err != nil {
			t.Fatal(err)
		}
	}
	add("1-aaaaaaaaaaaa")
	add("2-bbbbbbbbbbbb")

	id, img := bootESP(t, esp.Dir)
	if id != "2-bbbbbbbbbbbb" {
		t.Errorf("systemd-boot booted %s, want the newest", id)
	}
	if got := strings.Join(mdir(t, img, "EFI/Linux"), " "); !strings.Contains(got, "berth-2-bbbbbbbbbbbb+2-1.efi") || !strings.Contains(got, "berth-1-aaaaaaaaaaaa+3.efi") {
		t.Errorf("systemd-boot's boot counting rename: %s", got)
	}

	// The newest failed three times: systemd-boot must fall back by itself.
	for i := 0; i < 3; i++ {
		esp.RecordTry("2-bbbbbbbbbbbb")
	}
	if id, _ := bootESP(t, esp.Dir); id != "1-aaaaaaaaaaaa" {
		t.Errorf("with the newest out of tries systemd-boot booted %s", id)
	}

	// A newer deployment arrives, then a rollback pins the older one.
	add("3-cccccccccccc")
	if d := mustDefault(t, esp); d != "3-cccccccccccc" {
		t.Fatalf("default %s", d)
	}
	if to, err := esp.Rollback(); err != nil || to != "1-aaaaaaaaaaaa" {
		t.Fatalf("rollback: %s %v", to, err)
	}
	if id, _ := bootESP(t, esp.Dir); id != "1-aaaaaaaaaaaa" {
		t.Errorf("after rollback systemd-boot booted %s", id)
	}
}
