package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/berth-dev/berth/test/e2e/harness"
)

// More standard images (issue 11), each built from Debian's archive with nothing of berth
// inside: bookworm (systemd 252) with the 6.12 kernel of bookworm-backports, a bootc-style
// trixie, images whose kernel is missing or too old for composefs, and one with two kernels.
// Second images are the first plus a layer, never a second mmdebstrap.

const (
	upgradeTimeout = 20 * time.Minute // `berth upgrade` in the guest under TCG
	releaseStdV2   = "standard-v2\n"
)

// v2Layer is the second image of a recipe: a release file and a directory.
var v2Layer = []harness.LayerFile{
	{Path: "etc/berth-e2e-release", Mode: 0o644, Data: []byte(releaseStdV2)},
	{Path: "usr/share/berth-e2e", Mode: 0o755, Dir: true},
	{Path: "usr/share/berth-e2e/v2", Mode: 0o644, Data: []byte("v2\n")},
}

// kernelWhiteouts is a layer deleting kernels kvers (modules, vmlinuz, /boot files) from
// an image: how the lane makes an image without a kernel, or with only an older one, out
// of a built one.
func kernelWhiteouts(t *testing.T, rootfs string, kvers ...string) []harness.LayerFile {
	t.Helper()
	var files []harness.LayerFile
	for _, k := range kvers {
		files = append(files, harness.LayerFile{Path: "usr/lib/modules/.wh." + k, Mode: 0o644})
		bootFiles, _ := filepath.Glob(filepath.Join(rootfs, "boot", "*-"+k))
		for _, b := range bootFiles {
			files = append(files, harness.LayerFile{Path: "boot/.wh." + filepath.Base(b), Mode: 0o644})
		}
	}
	return files
}

// withLayers is base plus one layer per file list.
func withLayers(t *testing.T, base v1.Image, layers ...[]harness.LayerFile) v1.Image {
	t.Helper()
	img, err := harness.AppendLayers(base, layers...)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// layoutRef writes img to an OCI layout under the run directory and returns berth's
// reference to it, for host-side installs of derived images.
func layoutRef(t *testing.T, img v1.Image, name string) string {
	t.Helper()
	dir := filepath.Join(lane.dir, "layouts", name)
	os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": name})); err != nil {
		t.Fatalf("write OCI layout %s: %v", dir, err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return "oci:" + dir + ":" + name
}

// pushTag makes img the registry's :tag and returns how the guest names it.
func (r *updateRegistry) pushTag(t *testing.T, tag string, img v1.Image) string {
	t.Helper()
	if err := harness.PushImage(fmt.Sprintf("http://127.0.0.1:%d", r.Port), r.Repo, tag, img); err != nil {
		t.Fatalf("push :%s: %v", tag, err)
	}
	return fmt.Sprintf("docker://%s:%d/%s:%s", harness.GuestHostAddr, r.Port, r.Repo, tag)
}

// trustRegistry lets the guest pull from the lane's plain-HTTP registry.
func (g *guest) trustRegistry(t *testing.T, r *updateRegistry) {
	t.Helper()
	g.must(t, fmt.Sprintf("set -e; mkdir -p /etc/containers/registries.conf.d; printf '%%s' '%s' > /etc/containers/registries.conf.d/50-berth-e2e.conf; sync", r.GuestRegistriesConf()))
}

// mustLong is must with a longer bound (an upgrade under TCG).
func (g *guest) mustLong(t *testing.T, cmd string, timeout time.Duration) string {
	t.Helper()
	res, err := g.run(cmd, timeout)
	if err != nil {
		failWithLogs(t, g.vm, "guest %s: %v\n%s", g.name, err, res.Stdout+res.Stderr)
	}
	return res.Stdout
}

// upgradeAndBoot runs `berth upgrade` in the guest, checks that want (v2) is staged,
// reboots through the firmware and checks that v2 is booted; it returns v1's and v2's
// deployment IDs.
func (g *guest) upgradeAndBoot(t *testing.T, want v1.Image, label string) (v1ID, v2ID string) {
	t.Helper()
	h := g.status(t)
	v1ID = bootedID(h)
	if v1ID == "" {
		t.Fatal("berth status names no booted deployment")
	}
	out := g.mustLong(t, "berth upgrade", upgradeTimeout)
	t.Logf("berth upgrade: %s", out)
	h = g.status(t)
	if h.Status.Staged == nil || h.Status.Staged.Berth == nil {
		t.Fatalf("no staged deployment after berth upgrade")
	}
	v2ID = h.Status.Staged.Berth.ID
	d, _ := want.Digest()
	if h.Status.Staged.Berth.ManifestDigest != d.String() {
		t.Errorf("staged manifest %s, want v2 %s", h.Status.Staged.Berth.ManifestDigest, d)
	}
	g.bootUEFI(t, label)
	if id := bootedID(g.status(t)); id != v2ID {
		t.Fatalf("booted %q after the upgrade, want v2 %s", id, v2ID)
	}
	if got := g.check(t, "v2 content", "cat /etc/berth-e2e-release /usr/share/berth-e2e/v2"); got != releaseStdV2+"v2\n" {
		t.Errorf("on v2: %q", got)
	}
	return v1ID, v2ID
}

// newestKernel orders kernel versions as `sort -V` does (an implementation other than
// berth's own) and returns the last.
func newestKernel(t *testing.T, kvers []string) string {
	t.Helper()
	cmd := exec.Command("sort", "-V")
	cmd.Stdin = strings.NewReader(strings.Join(kvers, "\n") + "\n")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("sort -V: %v", err)
	}
	lines := strings.Fields(string(out))
	return lines[len(lines)-1]
}

const (
	localMotd  = "local motd on bookworm\n"
	localHello = "#!/bin/sh\necho local\n"
)

// TestBookworm: Debian 12 (systemd 252) with the 6.12 kernel of bookworm-backports
// installs, boots verified, keeps a local change across reboots, upgrades to v2 (v1 + a
// layer, from the registry) and rolls back; on the rolled-back system `berth switch` to an
// image with only bookworm's stock 6.1 kernel is refused before staging (scenario 3).
func TestBookworm(t *testing.T) {
	setup(t)
	img := guestImage(t, harness.Bookworm)
	kvers, err := harness.KernelVersions(img.Rootfs)
	if err != nil || len(kvers) != 2 {
		t.Fatalf("bookworm image kernels %v (%v), want the stock and the backports one", kvers, err)
	}
	newest := newestKernel(t, kvers)
	var old string
	for _, k := range kvers {
		if k != newest {
			old = k
		}
	}
	reg := startRegistry(t, img.Archive)
	g := installGuest(t, "bookworm", harness.Bookworm, "--target-imgref", reg.GuestRef())
	if g == nil {
		return
	}
	defer g.stop(t)
	if !g.scenarioBoot(t) {
		return
	}
	ok := step(t, "bookworm/kernel-and-systemd", func(t *testing.T) {
		if got := strings.TrimSpace(g.check(t, "kernel", "cat /proc/sys/kernel/osrelease")); got != newest {
			t.Errorf("booted kernel %q, want the backports kernel %s (the newest of %v)", got, newest, kvers)
		}
		// Backports kernels keep the stable ABI name (6.12.x+deb12-amd64); the package
		// version says where it came from.
		if v := g.check(t, "kernel package", "dpkg-query -W -f '${Version}' linux-image-"+newest); !strings.Contains(v, "bpo12") {
			t.Errorf("kernel %s is package version %q, want bookworm-backports' (~bpo12)", newest, v)
		}
		v := g.check(t, "systemd version", "systemctl --version | head -1")
		if !strings.Contains(v, "systemd 252") {
			t.Errorf("systemd: %q, want bookworm's 252", v)
		}
		if osr := g.check(t, "os-release", ". /etc/os-release; echo $VERSION_CODENAME"); strings.TrimSpace(osr) != "bookworm" {
			t.Errorf("VERSION_CODENAME %q", osr)
		}
	})
	if !ok || g.vm == nil {
		return
	}
	var v1ID string
	ok = step(t, "bookworm/upgrade-keeps-local-change", func(t *testing.T) {
		g.must(t, fmt.Sprintf(`set -e; printf %q > /etc/motd; mkdir -p /usr/local/bin; printf %q > /usr/local/bin/hello; chmod 755 /usr/local/bin/hello; echo kept > /var/lib/berth-e2e-x; sync`, localMotd, localHello))
		g.trustRegistry(t, reg)
		v2 := reg.push(t, reg.base, v2Layer)
		v1ID, _ = g.upgradeAndBoot(t, v2, "bookworm-v2")
		if got := g.check(t, "local changes after the reboot", "cat /etc/motd /usr/local/bin/hello /var/lib/berth-e2e-x"); got != localMotd+localHello+"kept\n" {
			t.Errorf("local changes after reboot into v2: %q", got)
		}
	})
	if !ok || g.vm == nil {
		return
	}
	ok = step(t, "bookworm/rollback", func(t *testing.T) {
		t.Logf("berth rollback: %s", g.must(t, "berth rollback"))
		g.bootUEFI(t, "bookworm-rollback")
		if id := bootedID(g.status(t)); id != v1ID {
			t.Fatalf("booted %q after rollback, want v1 %s", id, v1ID)
		}
		got := g.check(t, "v1 with its local changes", "cat /etc/motd /usr/local/bin/hello; test ! -e /usr/share/berth-e2e/v2 && echo no-v2")
		if want := localMotd + localHello + "no-v2\n"; got != want {
			t.Errorf("after rollback:\n%s\nwant:\n%s", got, want)
		}
	})
	if !ok || g.vm == nil {
		return
	}
	step(t, "bookworm/3-switch-to-6.1-refused", func(t *testing.T) {
		oldRef := reg.pushTag(t, "kernel-6.1", withLayers(t, reg.base, kernelWhiteouts(t, img.Rootfs, newest)))
		before := g.status(t)
		res, err := g.run("berth switch "+oldRef, upgradeTimeout)
		out := res.Stdout + res.Stderr
		t.Logf("berth switch %s: %v\n%s", oldRef, err, out)
		if err == nil {
			t.Fatalf("berth switch to an image with only kernel %s succeeded, want a refusal", old)
		}
		checkTooOldMessage(t, out, old)
		after := g.status(t)
		// Everything but the job record (which now records the refused switch) is as before.
		same := func(what string, a, b any) {
			ja, _ := json.Marshal(a)
			jb, _ := json.Marshal(b)
			if !bytes.Equal(ja, jb) {
				t.Errorf("%s changed by the refused switch:\nbefore: %s\nafter:  %s", what, ja, jb)
			}
		}
		same("spec (tracked image)", before.Spec, after.Spec)
		same("booted", before.Status.Booted, after.Status.Booted)
		same("staged", before.Status.Staged, after.Status.Staged)
		same("rollback", before.Status.Rollback, after.Status.Rollback)
		same("deployments", before.Status.Berth.Deployments, after.Status.Berth.Deployments)
		if j := after.Status.Berth.LastJob; j == nil || j.State != "failed" || !strings.Contains(j.Error, old) {
			t.Errorf("last job %+v, want the switch failed naming kernel %s", j, old)
		}
		h := g.status(t)
		if h.Status.Staged != nil && h.Status.Staged.Berth != nil {
			t.Errorf("something was staged by the refused switch: %s", h.Status.Staged.Berth.ID)
		}
		if id := bootedID(h); id != v1ID {
			t.Errorf("booted deployment %q, want %s", id, v1ID)
		}
	})
}

// checkTooOldMessage: the refusal names the kernel version, a minimum version and how to
// get a newer kernel (backports).
func checkTooOldMessage(t *testing.T, out, kver string) {
	t.Helper()
	if !strings.Contains(out, kver) {
		t.Errorf("refusal does not name the kernel %s:\n%s", kver, out)
	}
	if !regexp.MustCompile(`\b6\.\d+\b`).MatchString(strings.ReplaceAll(out, kver, "")) {
		t.Errorf("refusal names no minimum kernel version:\n%s", out)
	}
	if !strings.Contains(out, "overlayfs") {
		t.Errorf("refusal does not name the missing kernel features (overlayfs …):\n%s", out)
	}
	if !strings.Contains(strings.ToLower(out), "backports") {
		t.Errorf("refusal does not say how to get a newer kernel (backports):\n%s", out)
	}
}

// TestBootc: a bootc-style image (kernel only in /usr/lib/modules, empty /boot, no
// initramfs generator, no systemd-boot-efi, no SSH server) installs with the host's
// systemd-stub and systemd-boot, boots verified, and upgrades from inside the guest to v2
// (v1 + a layer): berth carries the stub and systemd-boot forward itself. The lane reaches
// the guest over its serial console.
func TestBootc(t *testing.T) {
	setup(t)
	img := guestImage(t, harness.Bootc)
	if err := checkBootcLayout(img.Rootfs); err != nil {
		t.Fatalf("bootc image: %v", err)
	}
	reg := startRegistry(t, img.Archive)
	g := installGuest(t, "bootc", harness.Bootc, "--target-imgref", reg.GuestRef())
	if g == nil {
		return
	}
	g.console = true
	defer g.stop(t)
	step(t, "bootc/install-used-host-boot-files", func(t *testing.T) {
		log, _ := os.ReadFile(filepath.Join(g.dir, "install.log"))
		if !bytes.Contains(log, []byte("stub host:/")) {
			t.Errorf("install did not take systemd-stub from the host:\n%s", tailString(string(log), 30))
		}
	})
	if !g.scenarioBoot(t) {
		return
	}
	step(t, "bootc/upgrade-in-guest", func(t *testing.T) {
		g.check(t, "layout in the guest", "test -z \"$(ls -A /boot)\" && ! command -v sshd && ! command -v update-initramfs && ! command -v dracut && test ! -e /usr/lib/systemd/boot/efi && echo ok")
		host, err := os.ReadFile("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
		if err != nil {
			t.Fatal(err)
		}
		kept := g.check(t, "kept stub", "sha256sum /berth/boot/linuxx64.efi.stub")
		if want := fmt.Sprintf("%x", sha256.Sum256(host)); !strings.HasPrefix(kept, want) {
			t.Errorf("kept stub %q, want the host's %s", kept, want)
		}
		g.trustRegistry(t, reg)
		v2 := reg.push(t, reg.base, v2Layer)
		g.upgradeAndBoot(t, v2, "bootc-v2")
		out := g.check(t, "EFI variables on v2", `for v in LoaderInfo StubInfo; do f=$(ls /sys/firmware/efi/efivars/$v-* 2>/dev/null | head -1); printf '%s=' $v; [ -n "$f" ] && cat "$f" | tail -c +5 | tr -d '\000'; echo; done`)
		if !strings.Contains(out, "LoaderInfo=systemd-boot") || !strings.Contains(out, "StubInfo=systemd-stub") {
			t.Errorf("v2 did not boot through systemd-boot and systemd-stub: %q", out)
		}
		if root := g.check(t, "root", "findmnt -no FSTYPE,OPTIONS /"); !strings.Contains(root, "verity=require") {
			t.Errorf("v2 root: %q", root)
		}
	})
}

// checkBootcLayout checks the built image is what the scenario claims.
func checkBootcLayout(rootfs string) error {
	if ents, _ := os.ReadDir(filepath.Join(rootfs, "boot")); len(ents) != 0 {
		return fmt.Errorf("/boot is not empty: %v", ents)
	}
	kv, err := harness.KernelVersion(rootfs)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(rootfs, "usr/lib/modules", kv, "vmlinuz")); err != nil {
		return err
	}
	for _, p := range []string{"usr/lib/systemd/boot/efi", "usr/sbin/sshd", "usr/sbin/update-initramfs", "usr/bin/dracut"} {
		if _, err := os.Lstat(filepath.Join(rootfs, p)); err == nil {
			return fmt.Errorf("/%s is in the image", p)
		}
	}
	return nil
}

// refusedInstall runs `berth install to-disk` of ref onto a disk image with random first
// and last MiB, expects it to fail, checks the disk is byte-identical where a partition
// table, a file system or a boot loader would land first, and returns the output.
func refusedInstall(t *testing.T, name, ref string, extra ...string) string {
	t.Helper()
	berth := berthBinary(t)
	dir := filepath.Join(lane.dir, name)
	os.MkdirAll(dir, 0o755)
	disk := filepath.Join(dir, "disk.img")
	const size, mib = 6 << 30, 1 << 20
	f, err := os.Create(disk)
	if err != nil {
		t.Fatal(err)
	}
	head, tail := make([]byte, mib), make([]byte, mib)
	for i := range head {
		head[i], tail[i] = byte(i*7+3), byte(i*13+5)
	}
	f.WriteAt(head, 0)
	f.WriteAt(tail, size-mib)
	f.Close()
	args := append([]string{"-k", "10", "600", berth, "install", "to-disk", disk, "--image", ref, "--wipe",
		"--root-ssh-authorized-keys", lane.key.Public}, extra...)
	out, err := exec.Command("timeout", args...).CombinedOutput()
	os.WriteFile(filepath.Join(dir, "install.log"), out, 0o644)
	t.Logf("berth install: %v\n%s", err, tailString(string(out), 20))
	if err == nil {
		t.Errorf("berth install of %s succeeded, want a refusal", ref)
	}
	f, err = os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	defer os.Remove(disk)
	gotHead, gotTail := make([]byte, mib), make([]byte, mib)
	f.ReadAt(gotHead, 0)
	f.ReadAt(gotTail, size-mib)
	if st, _ := f.Stat(); st.Size() != size {
		t.Errorf("disk image size changed: %d, was %d", st.Size(), size)
	}
	if !bytes.Equal(gotHead, head) || !bytes.Equal(gotTail, tail) {
		t.Errorf("the refused install wrote to the target (first or last MiB changed)")
	}
	return string(out)
}

// TestKernelRefusals: host-side refusals without a VM boot. An image without a kernel is
// refused with the Dockerfile line that adds one; an image whose only kernel is bookworm's
// stock 6.1 (too old for composefs) is refused naming the version, the missing features,
// the minimum and how to get a newer kernel. Neither writes to the target disk.
func TestKernelRefusals(t *testing.T) {
	setup(t)
	step(t, "refusal/no-kernel", func(t *testing.T) {
		img := guestImage(t, harness.Bootc)
		kv, err := harness.KernelVersion(img.Rootfs)
		if err != nil {
			t.Fatal(err)
		}
		base, err := harness.ArchiveImage(img.Archive, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		ref := layoutRef(t, withLayers(t, base, kernelWhiteouts(t, img.Rootfs, kv)), "no-kernel")
		out := refusedInstall(t, "refusal-no-kernel", ref)
		if !regexp.MustCompile("RUN apt-get [^\n`]*install -y linux-image-amd64").MatchString(out) {
			t.Errorf("refusal lacks the `RUN apt-get … install -y linux-image-amd64` line:\n%s", out)
		}
	})
	step(t, "refusal/too-old-kernel", func(t *testing.T) {
		img := guestImage(t, harness.Bookworm)
		kvers, err := harness.KernelVersions(img.Rootfs)
		if err != nil || len(kvers) != 2 {
			t.Fatalf("bookworm kernels %v %v", kvers, err)
		}
		newest := newestKernel(t, kvers)
		old := kvers[0]
		if old == newest {
			old = kvers[1]
		}
		base, err := harness.ArchiveImage(img.Archive, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		ref := layoutRef(t, withLayers(t, base, kernelWhiteouts(t, img.Rootfs, newest)), "kernel-6.1")
		out := refusedInstall(t, "refusal-too-old", ref)
		checkTooOldMessage(t, out, old)
	})
}

// TestTwoKernels: trixie with two kernel flavours installs the newest by default, and
// --kver picks the other, which is the one the guest runs.
func TestTwoKernels(t *testing.T) {
	setup(t)
	img := guestImage(t, harness.TwoKernel)
	kvers, err := harness.KernelVersions(img.Rootfs)
	if err != nil || len(kvers) != 2 {
		t.Fatalf("two-kernel image kernels %v (%v)", kvers, err)
	}
	sort.Strings(kvers)
	newest := newestKernel(t, kvers)
	other := kvers[0]
	if other == newest {
		other = kvers[1]
	}
	g := installGuest(t, "twokernel", harness.TwoKernel)
	if g == nil {
		return
	}
	step(t, "twokernel/default-is-newest", func(t *testing.T) {
		log, _ := os.ReadFile(filepath.Join(g.dir, "install.log"))
		if !bytes.Contains(log, []byte("kernel "+newest+",")) {
			t.Errorf("install did not pick the newest kernel %s of %v:\n%s", newest, kvers, tailString(string(log), 30))
		}
	})
	g2 := installGuest(t, "twokernel-kver", harness.TwoKernel, "--kver", other)
	if g2 == nil {
		return
	}
	defer g2.stop(t)
	step(t, "twokernel/kver-boots-the-other", func(t *testing.T) {
		g2.vm = g2.bootRetry(t, harness.BootOptions{Label: "kver", Timeout: bootTimeout})
		got := strings.TrimSpace(g2.check(t, "kernel", "cat /proc/sys/kernel/osrelease"))
		t.Logf("guest kernel %s (--kver %s; default %s)", got, other, newest)
		if got != other {
			t.Errorf("guest runs kernel %q, want --kver %s", got, other)
		}
		if root := g2.check(t, "root", "findmnt -no FSTYPE,OPTIONS /"); !strings.Contains(root, "verity=require") {
			t.Errorf("root: %q", root)
		}
	})
}
