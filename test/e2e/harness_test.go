package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/test/e2e/harness"
)

// TestHarness boots the plain guest root filesystem — no berth — from an ext4 image with the
// image's own dracut initramfs, once by direct kernel boot and once through OVMF with the
// TPM, to prove the harness (qemu, swtpm, serial capture, SSH) independently of berth.
func TestHarness(t *testing.T) {
	setup(t)
	ctx := context.Background()
	dir := filepath.Join(lane.dir, "harness")
	os.MkdirAll(dir, 0o755)
	var disk, kernel, initrd string
	ok := step(t, "harness/rootfs-disk", func(t *testing.T) {
		rootfs, _, err := harness.EnsureRootfs(ctx, harness.Trixie, logWriter{t})
		if err != nil {
			t.Fatal(err)
		}
		kver, err := harness.KernelVersion(rootfs)
		if err != nil {
			t.Fatal(err)
		}
		// A copy with the run's key: the cached rootfs stays untouched.
		cp := filepath.Join(dir, "rootfs")
		os.RemoveAll(cp)
		if out, err := exec.Command("cp", "-a", rootfs, cp).CombinedOutput(); err != nil {
			t.Fatalf("copy rootfs: %v: %s", err, out)
		}
		defer os.RemoveAll(cp)
		pub, err := os.ReadFile(lane.key.Public)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(cp, "root/.ssh"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(cp, "root/.ssh/authorized_keys"), pub, 0o600); err != nil {
			t.Fatal(err)
		}
		kernel = filepath.Join(dir, "vmlinuz")
		initrd = filepath.Join(dir, "initrd.img")
		for src, dst := range map[string]string{"boot/vmlinuz-" + kver: kernel, "boot/initrd.img-" + kver: initrd} {
			if out, err := exec.Command("cp", filepath.Join(cp, src), dst).CombinedOutput(); err != nil {
				t.Fatalf("copy %s: %v: %s", src, err, out)
			}
		}
		disk = filepath.Join(dir, "root.img")
		if out, err := exec.Command("timeout", "-k", "5", "300", "mkfs.ext4", "-q", "-F", "-L", "e2e-root", "-O", "verity",
			"-d", cp, disk, "1536M").CombinedOutput(); err != nil {
			t.Fatalf("mkfs.ext4 -d: %v: %s", err, out)
		}
	})
	if !ok {
		return
	}
	m, err := harness.NewMachine(ctx, dir, "plain", disk, lane.key, lane.accel)
	if err != nil {
		t.Fatal(err)
	}
	m.Log = logWriter{t}
	cmdline := "root=/dev/vda rw console=ttyS0,115200 panic=-1 quiet systemd.show_status=1"
	boot := func(t *testing.T, label string, uefi bool, checks func(t *testing.T, vm *harness.VM)) {
		vm, err := m.Boot(ctx, harness.BootOptions{Label: label,
			Direct: &harness.DirectBoot{Kernel: kernel, Initrd: initrd, Append: cmdline, UEFI: uefi}})
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Kill()
		at, err := vm.WaitSSH(ctx, 12*time.Minute)
		if err != nil {
			failWithLogs(t, vm, "%v", err)
		}
		t.Logf("%s: boot to SSH %.1f s", label, at.Seconds())
		lane.summary.Add("harness/"+label+"/boot-to-ssh", "INFO", at, "qemu start → first SSH login")
		out, err := vm.SSH(ctx, "findmnt -no FSTYPE /; uname -r; systemd-analyze || true")
		if err != nil {
			failWithLogs(t, vm, "%v", err)
		}
		t.Logf("guest:\n%s", out)
		if fs := strings.SplitN(out, "\n", 2)[0]; fs != "ext4" {
			t.Errorf("root fs type %q, want ext4", fs)
		}
		if checks != nil {
			checks(t, vm)
		}
		if err := vm.Poweroff(ctx, 3*time.Minute); err != nil {
			failWithLogs(t, vm, "%v", err)
		}
	}
	step(t, "harness/direct-boot-ssh", func(t *testing.T) { boot(t, "direct", false, nil) })
	step(t, "harness/ovmf-tpm-ssh", func(t *testing.T) {
		boot(t, "ovmf", true, func(t *testing.T, vm *harness.VM) {
			out, err := vm.SSH(ctx, "test -d /sys/firmware/efi && echo efi; cat /sys/class/tpm/tpm0/pcr-sha256/0")
			if err != nil {
				failWithLogs(t, vm, "%v", err)
			}
			lines := strings.Fields(out)
			if len(lines) != 2 || lines[0] != "efi" || len(lines[1]) != 64 || strings.Trim(lines[1], "0") == "" {
				t.Errorf("want EFI and a non-zero PCR 0 in the guest, got %q", out)
			}
		})
	})
}
