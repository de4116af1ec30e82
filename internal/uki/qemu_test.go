package uki

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/qemu"
	"github.com/berth-dev/berth/internal/testenv"
)

// TestUKIBootsInQEMU boots UKIs built on each real stub (Debian 12's 252 and
// trixie's 257) with trixie's kernel and initrd under OVMF, as the
// firmware's removable-media boot file, and waits for the kernel to report
// the .cmdline and to free the .initrd it was handed.
func TestUKIBootsInQEMU(t *testing.T) {
	if testing.Short() {
		t.Skip("boots QEMU once per stub (a minute or more each without KVM)")
	}
	// The guest rootfs gives a kernel and initrd.
	testenv.RequireFile(t, guestRootfs+"/.recipe", testenv.Guest)
	testenv.RequireTool(t, "qemu-system-x86_64", "qemu-system-x86")
	testenv.RequireTool(t, "mkfs.vfat", "dosfstools")
	testenv.RequireTool(t, "mcopy", "mtools")
	testenv.RequireTool(t, "mmd", "mtools")
	testenv.RequireFile(t, qemu.OVMFCode, "ovmf")
	kernels, _ := filepath.Glob(guestRootfs + "/boot/vmlinuz-*")
	initrds, _ := filepath.Glob(guestRootfs + "/boot/initrd.img-*")
	if len(kernels) == 0 || len(initrds) == 0 {
		t.Fatalf("guest rootfs %s has no kernel/initrd in /boot: rebuild it (%s)", guestRootfs, testenv.Guest)
	}
	linux, _ := os.ReadFile(kernels[0])
	initrd, _ := os.ReadFile(initrds[0])
	for _, sc := range realStubs(t) {
		t.Run(sc.name, func(t *testing.T) {
			dir := t.TempDir()
			stub, _ := os.ReadFile(sc.path)
			cmdline := "console=ttyS0 panic=-1 rd.shell=0 berth.test=" + sc.name
			out := filepath.Join(dir, "uki.efi")
			if _, err := Build(out, Options{Stub: stub, Linux: linux, Initrds: [][]byte{initrd}, Cmdline: cmdline}); err != nil {
				t.Fatal(err)
			}
			img := filepath.Join(dir, "esp.img")
			f, _ := os.Create(img)
			f.Truncate(64 << 20)
			f.Close()
			for _, c := range [][]string{
				{"mkfs.vfat", "-F", "32", img},
				{"mmd", "-i", img, "::/EFI", "::/EFI/BOOT"},
				{"mcopy", "-i", img, out, "::/EFI/BOOT/BOOTX64.EFI"},
			} {
				run(t, c[0], c[1:]...)
			}
			vars := filepath.Join(dir, "vars.fd")
			os.WriteFile(vars, mustRead(t, qemu.OVMFVars), 0o644)
			args := []string{"-machine", "q35", "-m", "1024", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
				"-drive", "if=pflash,format=raw,readonly=on,file=" + qemu.OVMFCode, "-drive", "if=pflash,format=raw,file=" + vars,
				"-drive", "file=" + img + ",format=raw,if=virtio"}
			sawCmdline, sawInitrd := false, false
			res, err := qemu.Run(context.Background(), qemu.RunOptions{Args: args, Timeout: 15 * time.Minute,
				Until: func(line string) bool {
					sawCmdline = sawCmdline || strings.Contains(line, "Command line: "+cmdline)
					sawInitrd = sawInitrd || strings.Contains(line, "Freeing initrd memory")
					return sawCmdline && sawInitrd
				}})
			t.Logf("qemu under %s (%s)", res.Accel, res.Why)
			if err != nil {
				t.Fatalf("kernel command line seen: %v, initrd freed: %v: %v; serial:\n%s", sawCmdline, sawInitrd, err, res.Tail(40))
			}
			t.Logf("kernel started with the UKI's command line and initrd after %s", res.Took.Round(time.Second))
		})
	}
}
