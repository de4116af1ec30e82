package uki

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestUKIBootsInQEMU boots UKIs built on each real stub (Debian 12's 252 and
// trixie's 257) with trixie's kernel and initrd under OVMF, as the
// firmware's removable-media boot file, and waits for the kernel to report
// the .cmdline and to free the .initrd it was handed.
func TestUKIBootsInQEMU(t *testing.T) {
	if testing.Short() {
		t.Skip("boots QEMU once per stub (a minute or more each without KVM)")
	}
	if !guestReady() {
		t.Skip("needs the trixie guest rootfs (test/guest/build-rootfs.sh) for a kernel and initrd")
	}
	for _, tool := range []string{"qemu-system-x86_64", "mkfs.vfat", "mcopy", "mmd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
	const code, varsTmpl = "/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"
	if _, err := os.Stat(code); err != nil {
		t.Skip("OVMF not installed")
	}
	kernels, _ := filepath.Glob(guestRootfs + "/boot/vmlinuz-*")
	initrds, _ := filepath.Glob(guestRootfs + "/boot/initrd.img-*")
	if len(kernels) == 0 || len(initrds) == 0 {
		t.Skip("guest rootfs has no kernel/initrd in /boot")
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
			os.WriteFile(vars, mustRead(t, varsTmpl), 0o644)
			args := []string{"-machine", "q35", "-m", "1024", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
				"-drive", "if=pflash,format=raw,readonly=on,file=" + code, "-drive", "if=pflash,format=raw,file=" + vars,
				"-drive", "file=" + img + ",format=raw,if=virtio"}
			if _, err := os.Stat("/dev/kvm"); err == nil {
				args = append(args, "-enable-kvm", "-cpu", "host")
			}
			cmd := exec.Command("qemu-system-x86_64", args...)
			pipe, _ := cmd.StdoutPipe()
			cmd.Stderr = cmd.Stdout
			start := time.Now()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			timer := time.AfterFunc(8*time.Minute, func() { cmd.Process.Kill() })
			defer timer.Stop()
			var log strings.Builder
			sawCmdline, sawInitrd := false, false
			s := bufio.NewScanner(pipe)
			for s.Scan() {
				line := s.Text()
				log.WriteString(line + "\n")
				if strings.Contains(line, "Command line: "+cmdline) {
					sawCmdline = true
				}
				if strings.Contains(line, "Freeing initrd memory") {
					sawInitrd = true
				}
				if sawCmdline && sawInitrd {
					break
				}
			}
			cmd.Process.Kill()
			io.Copy(io.Discard, pipe)
			cmd.Wait()
			if !sawCmdline || !sawInitrd {
				l := log.String()
				if len(l) > 3000 {
					l = l[len(l)-3000:]
				}
				t.Fatalf("kernel command line seen: %v, initrd freed: %v; serial:\n%s", sawCmdline, sawInitrd, l)
			}
			t.Logf("kernel started with the UKI's command line and initrd after %s", time.Since(start).Round(time.Second))
		})
	}
}
