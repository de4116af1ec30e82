// berth-demo is `make demo` and `make vm`:
//
//	berth-demo demo   install the standard Debian image with berth to out/demo/disk.img, boot
//	                  it (UEFI + TPM), show the verified root, make a local change, reboot,
//	                  show that it survived, and say how to boot the disk interactively
//	berth-demo vm     boot out/demo/disk.img with its serial console on this terminal
package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/test/e2e/harness"
)

func main() {
	if len(os.Args) != 2 || (os.Args[1] != "demo" && os.Args[1] != "vm") {
		fmt.Fprintln(os.Stderr, "usage: berth-demo demo|vm")
		os.Exit(2)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	var err error
	if os.Args[1] == "demo" {
		err = demo(ctx)
	} else {
		err = vm(ctx)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "berth-demo:", err)
		os.Exit(1)
	}
}

type paths struct{ src, dir, disk string }

func demoPaths() (paths, error) {
	src, err := harness.RepoRoot()
	if err != nil {
		return paths{}, err
	}
	dir := filepath.Join(src, "out", "demo")
	return paths{src: src, dir: dir, disk: filepath.Join(dir, "disk.img")}, os.MkdirAll(dir, 0o755)
}

func say(format string, args ...any) {
	fmt.Printf("==> "+format+"\n", args...)
}

func demo(ctx context.Context) error {
	p, err := demoPaths()
	if err != nil {
		return err
	}
	say("guest image: standard Debian trixie, built from Debian packages (cached)")
	img, err := harness.EnsureImage(ctx, harness.Trixie, os.Stdout)
	if err != nil {
		return err
	}
	say("image %s (%s)", img.Ref(), img.Pack.ManifestDigest)
	key, err := harness.NewSSHKey(ctx, p.dir)
	if err != nil {
		return err
	}
	os.Remove(p.disk)
	berth := filepath.Join(p.src, "bin", "berth")
	args := []string{"install", "to-disk", p.disk, "--image", img.Ref(), "--wipe", "--size", "6G",
		"--root-ssh-authorized-keys", key.Public, "--karg", "console=ttyS0,115200"}
	say("berth %s", strings.Join(args, " "))
	start := time.Now()
	cmd := exec.CommandContext(ctx, "timeout", append([]string{"-k", "10", "1200", berth}, args...)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("berth install to-disk: %w", err)
	}
	say("installed in %.1f s", time.Since(start).Seconds())

	accel, why := harness.DetectAccel(ctx, p.dir)
	say("accelerator: %s (%s)", accel, why)
	m, err := harness.NewMachine(ctx, p.dir, "demo", p.disk, key, accel)
	if err != nil {
		return err
	}
	m.Log = os.Stdout
	boot := func(label string) (*harness.VM, error) {
		v, err := m.Boot(ctx, harness.BootOptions{Label: label, Timeout: 15 * time.Minute})
		if err != nil {
			return nil, err
		}
		at, err := v.WaitSSH(ctx, 10*time.Minute)
		if err != nil {
			v.Kill()
			return nil, fmt.Errorf("%w\n%s", err, v.Logs(30))
		}
		say("%s: logged in over SSH %.1f s after power-on (UEFI → systemd-boot → UKI → berth-init)", label, at.Seconds())
		return v, nil
	}
	show := func(v *harness.VM, title, command string) error {
		out, err := v.SSH(ctx, command)
		say("%s\n$ %s\n%s", title, command, strings.TrimRight(out, "\n"))
		return err
	}
	v, err := boot("boot1")
	if err != nil {
		return err
	}
	defer v.Kill()
	for _, s := range [][2]string{
		{"the root is an overlay with verity=require over the EROFS image", "findmnt -o TARGET,FSTYPE,OPTIONS /"},
		{"the kernel command line carries the image's digest", "cat /proc/cmdline"},
		{"what berth-init set up", "cat /run/berth/boot.json"},
		{"PCR 11 (the UKI, measured by systemd-stub)", "cat /sys/class/tpm/tpm0/pcr-sha256/11"},
		{"a local change", "echo 'changed locally by make demo' > /etc/motd && cat /etc/motd && sync"},
	} {
		if err := show(v, s[0], s[1]); err != nil {
			return err
		}
	}
	if err := v.Poweroff(ctx, 3*time.Minute); err != nil {
		return err
	}
	say("rebooting")
	v, err = boot("boot2")
	if err != nil {
		return err
	}
	defer v.Kill()
	out, err := v.SSH(ctx, "cat /etc/motd")
	if err != nil {
		return err
	}
	if strings.TrimSpace(out) != "changed locally by make demo" {
		return fmt.Errorf("the local change did not survive the reboot: /etc/motd is %q", out)
	}
	say("the local change survived the reboot: /etc/motd = %q", strings.TrimSpace(out))
	if err := v.Poweroff(ctx, 3*time.Minute); err != nil {
		return err
	}
	fmt.Printf(`
Disk image: %s (raw, GPT: ESP + root; logs in %s)
Boot it interactively:  make vm        (serial console here; Ctrl-A X quits qemu)
Log in:                 root on the console (no password), or
                        ssh -i %s -p PORT root@127.0.0.1   (make vm prints PORT)
`, p.disk, p.dir, key.Private)
	return nil
}

func vm(ctx context.Context) error {
	p, err := demoPaths()
	if err != nil {
		return err
	}
	if _, err := os.Stat(p.disk); err != nil {
		return fmt.Errorf("%s does not exist: run `make demo` first", p.disk)
	}
	key := &harness.SSHKey{Private: filepath.Join(p.dir, "id_ed25519"), Public: filepath.Join(p.dir, "id_ed25519.pub")}
	accel, why := harness.DetectAccel(ctx, p.dir)
	m, err := harness.OpenMachine(ctx, p.dir, "demo", p.disk, key, accel)
	if err != nil {
		return err
	}
	port, err := harness.FreePort()
	if err != nil {
		return err
	}
	fmt.Printf("Booting %s (%s: %s) with OVMF and a TPM.\nSerial console below; Ctrl-A X quits qemu.\nSSH: ssh -i %s -p %d -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@127.0.0.1\n\n",
		p.disk, accel, why, key.Private, port)
	_, err = m.Boot(ctx, harness.BootOptions{Label: "vm", Interactive: true, SSHPort: port, Timeout: 24 * time.Hour})
	return err
}
