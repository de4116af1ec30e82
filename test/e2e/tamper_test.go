package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/test/e2e/harness"
)

// tamperFile is a file of the image that nothing reads at boot and that is larger than
// composefs inlines, so its content lives in an object file of the store.
const tamperFile = "/usr/share/common-licenses/GPL-3"

// scenarioTamperObject is scenario 3a: a byte of one object file flipped on the disk from the
// host (its fs-verity Merkle tree untouched). Reading the file in the guest must fail with
// EIO and the kernel must name the file's inode. The byte is flipped back afterwards.
func (g *guest) scenarioTamperObject(t *testing.T) bool {
	return step(t, g.name+"/3-tamper-object", func(t *testing.T) {
		ctx := context.Background()
		g.stop(t)
		// The object's name is the fs-verity digest of the file's content.
		out, err := exec.Command("fsverity", "digest", "--hash-alg=sha256", "--block-size=4096", filepath.Join(g.img.Rootfs, tamperFile)).CombinedOutput()
		if err != nil {
			t.Fatalf("fsverity digest: %v: %s", err, out)
		}
		hex := strings.TrimPrefix(strings.Fields(string(out))[0], "sha256:")
		object := fmt.Sprintf("/berth/repo/objects/%s/%s", hex[:2], hex[2:])
		inode, err := g.disk.Inode(ctx, object)
		if err != nil {
			t.Fatalf("object of %s: %v", tamperFile, err)
		}
		off, err := g.disk.FileByteOffset(ctx, object, 100)
		if err != nil {
			t.Fatal(err)
		}
		if err := harness.FlipByte(g.disk.Path, off); err != nil {
			t.Fatal(err)
		}
		defer func() {
			g.stop(t)
			if err := harness.FlipByte(g.disk.Path, off); err != nil {
				t.Errorf("restore: %v", err)
			}
		}()
		t.Logf("flipped byte 100 of %s (inode %d, disk offset %d)", object, inode, off)
		g.bootDirect(t, "4-tampered-object")
		res, err := g.vm.Run(ctx, time.Minute, "cat "+tamperFile+" >/dev/null")
		if err == nil || !strings.Contains(res.Stderr, "Input/output error") {
			t.Errorf("reading the tampered %s: err %v, stderr %q; want an Input/output error", tamperFile, err, res.Stderr)
		}
		kmsg := g.must(t, "dmesg | grep -i -E 'verity|corrupt|overlayfs' | tail -5")
		t.Logf("kernel: %s", kmsg)
		if !regexp.MustCompile(fmt.Sprintf(`inode %d\b`, inode)).MatchString(kmsg) {
			t.Errorf("the kernel log does not name inode %d of %s:\n%s", inode, object, kmsg)
		}
		// Everything else still reads: the damage is confined to that object.
		g.must(t, "cat /usr/share/common-licenses/GPL-2 >/dev/null")
	})
}

// scenarioTamperImage is scenario 3b: a byte flipped in the first block of the composefs
// EROFS image. berth-init must refuse to boot and say why on the serial console.
func (g *guest) scenarioTamperImage(t *testing.T) bool {
	return step(t, g.name+"/3-tamper-image", func(t *testing.T) {
		ctx := context.Background()
		g.stop(t)
		if g.boot.Composefs == "" {
			t.Fatal("no composefs digest from scenario 1")
		}
		image := "/berth/repo/images/" + g.boot.Composefs
		off, err := g.disk.FileByteOffset(ctx, image, 1024+8) // inside the EROFS superblock
		if err != nil {
			t.Fatal(err)
		}
		if err := harness.FlipByte(g.disk.Path, off); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := harness.FlipByte(g.disk.Path, off); err != nil {
				t.Errorf("restore: %v", err)
			}
		}()
		vm, err := g.m.Boot(ctx, harness.BootOptions{Label: "5-tampered-image", Timeout: bootTimeout,
			Direct: &harness.DirectBoot{Kernel: g.uki.Kernel, Initrd: g.uki.Initrd, Append: g.directCmdline()}})
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Kill()
		if _, err := vm.WaitSerial(regexp.MustCompile(`berth: cannot boot`), 6*time.Minute); err != nil {
			failWithLogs(t, vm, "berth-init did not refuse the tampered image: %v", err)
		}
		line, err := vm.WaitSerial(regexp.MustCompile(`^Problem:`), 30*time.Second)
		if err != nil {
			failWithLogs(t, vm, "%v", err)
		}
		t.Logf("console: %s", line.Text)
		if !strings.Contains(line.Text, "composefs") {
			t.Errorf("berth-init's problem line does not name the composefs image: %q", line.Text)
		}
		// It must not have switched root: no SSH, qemu ends after berth-init's reboot (-no-reboot).
		if _, err := vm.Run(ctx, 20*time.Second, "true"); err == nil {
			t.Error("the guest answered SSH although its image is tampered")
		}
		vm.Wait(2 * time.Minute)
	})
}

// TestTrixie runs scenarios 1–3 on the standard Debian trixie image.
func TestTrixie(t *testing.T) {
	setup(t)
	g := installGuest(t, "trixie", harness.Trixie)
	if g == nil {
		return
	}
	defer g.stop(t)
	// Scenario 2 needs the guest scenario 1 left running, even if some check of 1 failed.
	if !g.scenarioBoot(t) && g.vm == nil {
		return
	}
	g.scenarioPersistence(t)
	g.sideBySide(t)
	g.scenarioTamperObject(t)
	g.scenarioTamperImage(t)
	lane.summary.Add("trixie/install-time", "INFO", g.install, "berth install to-disk wall time")
}

// TestVariant is scenario 4: scenarios 1–2 on a second, differently composed Debian image.
func TestVariant(t *testing.T) {
	setup(t)
	g := installGuest(t, "variant", harness.Variant)
	if g == nil {
		return
	}
	defer g.stop(t)
	if !g.scenarioBoot(t) && g.vm == nil {
		return
	}
	g.scenarioPersistence(t)
	// The variant's own tools are there: it really is the other image.
	step(t, "variant/own-packages", func(t *testing.T) {
		if g.vm == nil {
			t.Fatal("no running guest")
		}
		g.must(t, "command -v less && command -v vi && dpkg -s initramfs-tools >/dev/null && ! dpkg -s dracut >/dev/null 2>&1")
	})
}
