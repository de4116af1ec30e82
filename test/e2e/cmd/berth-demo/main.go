// berth-demo is `make demo` and `make vm`:
//
//	berth-demo demo   install the standard Debian image with berth to out/demo/disk.img, boot
//	                  it (UEFI + TPM), show the verified root, make a local change, upgrade
//	                  to a second image from a registry on 127.0.0.1, reboot into it and show
//	                  the local change survived and `berth status`, roll back, boot the first
//	                  again (three boots); print the time of each step and say how to boot
//	                  the disk interactively
//	berth-demo vm     boot out/demo/disk.img with its serial console on this terminal
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/internal/api"
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

// indent prefixes every line of s, for command output under a "==>" line.
func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}

// short abbreviates a digest ("sha256:" + 12 hex digits) for the one-line step reports.
func short(d string) string {
	alg, hex, ok := strings.Cut(d, ":")
	if !ok {
		alg, hex = "", d
	} else {
		alg += ":"
	}
	if len(hex) > 12 {
		hex = hex[:12] + "…"
	}
	return alg + hex
}

// The second image of the demo: the first plus one layer, served by a registry on the
// host's 127.0.0.1 (the guest's 10.0.2.2), as the VM update lane does.
const (
	demoRepo  = "berth/demo"
	v2Marker  = "usr/share/berth-demo/v2"
	localMotd = "changed locally by make demo"
	partMark  = "@@berth-demo-part@@" // separates the outputs of runAll's commands
)

var v2Layer = []harness.LayerFile{
	{Path: "usr/share/berth-demo", Mode: 0o755, Dir: true},
	{Path: v2Marker, Mode: 0o644, Data: []byte("image v2 of make demo\n")},
	{Path: "etc/berth-demo-release", Mode: 0o644, Data: []byte("v2\n")},
}

// bootRecord is the part of /run/berth/boot.json (internal/setuproot.BootRecord) the demo shows.
type bootRecord struct {
	Composefs string `json:"composefs"`
	Deploy    string `json:"deploy"`
	Verity    string `json:"verity"`
}

// stepTimes records the wall time of each step for the closing table.
type stepTimes struct {
	names []string
	times []time.Duration
	last  time.Time
}

func (s *stepTimes) done(name string) {
	now := time.Now()
	s.names = append(s.names, name)
	s.times = append(s.times, now.Sub(s.last))
	s.last = now
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}

func demo(ctx context.Context) error {
	p, err := demoPaths()
	if err != nil {
		return err
	}
	begin := time.Now()
	load0 := loadavg()
	st := &stepTimes{last: begin}
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
	reg, err := harness.ServeRegistry(demoRepo)
	if err != nil {
		return err
	}
	defer reg.Close()
	st.done("guest image")

	os.Remove(p.disk)
	berth := filepath.Join(p.src, "bin", "berth")
	// --target-imgref: the installed system tracks the registry's :latest, so that
	// `berth upgrade` in the guest finds v2 there.
	args := []string{"install", "to-disk", p.disk, "--image", img.Ref(), "--target-imgref", reg.GuestRef(),
		"--wipe", "--size", "6G", "--root-ssh-authorized-keys", key.Public, "--karg", "console=ttyS0,115200"}
	say("berth %s", strings.Join(args, " "))
	start := time.Now()
	cmd := exec.CommandContext(ctx, "timeout", append([]string{"-k", "10", "1200", berth}, args...)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("berth install to-disk: %w", err)
	}
	say("installed in %.1f s", time.Since(start).Seconds())
	st.done("install")

	accel, why := harness.DetectAccel(ctx, p.dir)
	say("accelerator: %s (%s)", accel, why)
	m, err := harness.NewMachine(ctx, p.dir, "demo", p.disk, key, accel)
	if err != nil {
		return err
	}
	m.Log = os.Stdout
	var v *harness.VM
	defer func() {
		if v != nil {
			v.Kill()
		}
	}()
	// boot powers the running guest off (qemu runs with -no-reboot, so a reboot is a
	// power-off and a new boot) and boots the disk again through the firmware. A guest
	// kernel panic (a rare TCG flake, harness.ErrKernelPanic) gets one more boot.
	boot := func(label string) error {
		if v != nil {
			err := v.Poweroff(ctx, 3*time.Minute)
			v = nil
			if err != nil {
				return err
			}
		}
		for attempt := 1; ; attempt++ {
			nv, err := m.Boot(ctx, harness.BootOptions{Label: label, Timeout: 15 * time.Minute})
			if err != nil {
				return err
			}
			at, err := nv.WaitSSH(ctx, 10*time.Minute)
			if err == nil {
				v = nv
				say("%s: logged in over SSH %.1f s after power-on (UEFI → systemd-boot → UKI → berth-init)", label, at.Seconds())
				return nil
			}
			nv.Kill()
			if errors.Is(err, harness.ErrKernelPanic) && attempt == 1 {
				say("%s: %v; booting once more", label, err)
				label += "-retry"
				continue
			}
			return fmt.Errorf("%w\n%s", err, nv.Logs(30))
		}
	}
	// runAll runs commands in one SSH session (each login costs seconds under TCG), stops
	// at the first that fails, and returns the output of each.
	runAll := func(commands ...string) ([]string, error) {
		var script strings.Builder
		script.WriteString("set -e\n")
		for _, c := range commands {
			fmt.Fprintf(&script, "echo %s\n%s\n", partMark, c)
		}
		res, err := v.Run(ctx, 15*time.Minute, script.String())
		parts := strings.Split(res.Stdout, partMark+"\n")[1:]
		if err != nil {
			return parts, fmt.Errorf("%w\n%s", err, strings.TrimSpace(res.Stdout))
		}
		if len(parts) != len(commands) {
			return parts, fmt.Errorf("%d outputs from %d commands:\n%s", len(parts), len(commands), res.Stdout)
		}
		return parts, nil
	}
	parseStatus := func(out string) (*api.Host, error) {
		var h api.Host
		if err := json.Unmarshal([]byte(out), &h); err != nil {
			return nil, fmt.Errorf("berth status --json: %w\n%s", err, out)
		}
		return &h, nil
	}
	// booted reads what berth-init booted and `berth status --json`, checks they agree,
	// and runs extra commands in the same session.
	booted := func(extra ...string) (*bootRecord, *api.Host, []string, error) {
		out, err := runAll(append([]string{"cat /run/berth/boot.json", "berth status --json"}, extra...)...)
		if err != nil {
			return nil, nil, out, err
		}
		var br bootRecord
		if err := json.Unmarshal([]byte(out[0]), &br); err != nil {
			return nil, nil, nil, fmt.Errorf("/run/berth/boot.json: %w\n%s", err, out[0])
		}
		h, err := parseStatus(out[1])
		if err != nil {
			return nil, nil, nil, err
		}
		if b := h.Status.Booted; b == nil || b.Berth == nil || b.Berth.ID != br.Deploy {
			return nil, nil, nil, fmt.Errorf("berth status names booted %+v, /run/berth/boot.json deployment %s", h.Status.Booted, br.Deploy)
		}
		return &br, h, out[2:], nil
	}

	if err := boot("boot1"); err != nil {
		return err
	}
	shows := [][2]string{
		{"the root is an overlay with verity=require over the EROFS image", "findmnt -o TARGET,FSTYPE,OPTIONS /"},
		{"the kernel command line carries the image's digest", "cat /proc/cmdline"},
		{"what berth-init set up", "cat /run/berth/boot.json"},
		{"PCR 11 (the UKI, measured by systemd-stub)", "cat /sys/class/tpm/tpm0/pcr-sha256/11"},
		{"a local change", "echo '" + localMotd + "' > /etc/motd && cat /etc/motd && sync"},
	}
	var cmds []string
	for _, s := range shows {
		cmds = append(cmds, s[1])
	}
	v1, h, out, err := booted(cmds...)
	for i, o := range out {
		say("%s\n$ %s\n%s", shows[i][0], shows[i][1], strings.TrimRight(o, "\n"))
	}
	if err != nil {
		return err
	}
	v1Manifest := h.Status.Booted.Berth.ManifestDigest
	st.done("boot v1, show the verified root")

	layoutDir := filepath.Join(p.dir, "v1-layout")
	os.RemoveAll(layoutDir)
	defer os.RemoveAll(layoutDir)
	base, err := harness.ArchiveImage(img.Archive, layoutDir)
	if err != nil {
		return err
	}
	im2, err := reg.Push(base, v2Layer)
	if err != nil {
		return err
	}
	d2, err := im2.Digest()
	if err != nil {
		return err
	}
	say("registry: pushed v2 = v1 + one layer (/%s, /etc/berth-demo-release) as %s (%s)", v2Marker, reg.GuestRef(), short(d2.String()))
	// The registry speaks plain HTTP: a registries.conf.d drop-in lets the guest's berth use it.
	parts, err := runAll(
		fmt.Sprintf("mkdir -p /etc/containers/registries.conf.d && printf %q > /etc/containers/registries.conf.d/50-berth-demo.conf", reg.GuestRegistriesConf()),
		"berth upgrade",
		"berth status --json")
	if err != nil {
		return fmt.Errorf("berth upgrade: %w", err)
	}
	h, err = parseStatus(parts[2])
	if err != nil {
		return err
	}
	staged := h.Status.Staged
	if staged == nil || staged.Berth == nil {
		return fmt.Errorf("berth upgrade staged nothing: %s", strings.TrimSpace(parts[1]))
	}
	if staged.Berth.ManifestDigest != d2.String() {
		return fmt.Errorf("berth upgrade staged %s, the registry serves v2 %s", staged.Berth.ManifestDigest, d2)
	}
	v2ID := staged.Berth.ID
	say("upgrade: `berth upgrade` (through berthd) staged %s (image v2 %s), rebooting", v2ID, short(d2.String()))
	st.done("upgrade to v2 (pull, stage)")

	// One reboot shows both: the local change survives it, and it lands in v2. (A
	// separate plain reboot first costs a whole TCG boot, 65-135 s, and showed nothing
	// this one does not.)
	if err := boot("boot2-v2"); err != nil {
		return err
	}
	// berth-healthcheck.service blesses the new entry (drops its boot counter) once the
	// boot is healthy; without that, three failed boots would fall back to v1 by themselves.
	br, _, parts, err := booted("cat /"+v2Marker+" /etc/motd",
		`for i in $(seq 150); do s=$(systemctl is-active berth-healthcheck.service || true); case $s in active|failed) break;; esac; sleep 2; done; echo "$s"`,
		"berth status")
	if err != nil {
		return err
	}
	if br.Deploy != v2ID || br.Composefs != staged.Berth.ComposefsDigest {
		return fmt.Errorf("booted %s (composefs %s), want v2 %s (composefs %s)", br.Deploy, br.Composefs, v2ID, staged.Berth.ComposefsDigest)
	}
	if !strings.HasSuffix(parts[0], localMotd+"\n") {
		return fmt.Errorf("on v2, /etc/motd lost the local change:\n%s", parts[0])
	}
	say("booted v2 (%s): /%s present, composefs digest %s; the local change survived the reboot and the upgrade: /etc/motd still %q", v2ID, v2Marker, short(br.Composefs), localMotd)
	hs := strings.TrimSpace(parts[1])
	say("health check on v2: %s; berth status:\n%s", hs, indent(parts[2]))
	if hs != "active" {
		return fmt.Errorf("berth-healthcheck.service on v2: %s", hs)
	}
	st.done("reboot into v2, local change kept, status")

	parts, err = runAll("berth rollback")
	if err != nil {
		return fmt.Errorf("berth rollback: %w", err)
	}
	say("rollback: `berth rollback`: %s; rebooting", strings.TrimSpace(parts[0]))
	st.done("rollback")

	if err := boot("boot3-v1"); err != nil {
		return err
	}
	br, h, parts, err = booted("test ! -e /"+v2Marker, "cat /etc/motd")
	if err != nil {
		return fmt.Errorf("v1 after the rollback (is /%s still there?): %w", v2Marker, err)
	}
	if br.Deploy != v1.Deploy || br.Composefs != v1.Composefs || h.Status.Booted.Berth.ManifestDigest != v1Manifest {
		return fmt.Errorf("after the rollback booted %s (composefs %s), want v1 %s (composefs %s)", br.Deploy, br.Composefs, v1.Deploy, v1.Composefs)
	}
	if strings.TrimSpace(parts[1]) != localMotd {
		return fmt.Errorf("v1 after the rollback: /etc/motd is %q", parts[1])
	}
	say("back on v1 (%s): composefs digest %s as installed, no /%s, /etc/motd still %q", v1.Deploy, short(br.Composefs), v2Marker, localMotd)
	err = v.Poweroff(ctx, 3*time.Minute)
	v = nil
	if err != nil {
		return err
	}
	st.done("boot v1 again, power off")

	total := time.Since(begin)
	say("done in %s (load average %s at the start, %s at the end; %s)", total.Round(time.Second), load0, loadavg(), accel)
	for i, n := range st.names {
		fmt.Printf("    %-32s %6.1f s\n", n, st.times[i].Seconds())
	}
	fmt.Printf(`
Disk image: %s (raw, GPT: ESP + root; on v1, v2 is its rollback entry; logs in %s)
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
