package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/test/e2e/harness"
)

// sideBySide boots the same disk and command line with the image's own dracut initramfs
// (built with berth's dracut module, so it verifies and mounts the same composefs root)
// and compares kernel start → switch-root and the size with berth's initramfs.
func (g *guest) sideBySide(t *testing.T) {
	step(t, g.name+"/initramfs-side-by-side", func(t *testing.T) {
		if _, err := os.Stat(filepath.Join(lane.src, "dracut/90berth/module-setup.sh")); err != nil {
			t.Skip("dracut/90berth/module-setup.sh is not there yet: the dracut side of the comparison cannot be built")
		}
		if g.berthSwitchRoot == 0 {
			t.Fatal("no switch-root time of berth's initramfs from scenario 2")
		}
		kver, err := g.img.Kernel()
		if err != nil {
			t.Fatal(err)
		}
		initrd, err := buildDracutInitrd(t, g.img.Rootfs, filepath.Join(g.dir, "dracut"), kver)
		if err != nil {
			t.Fatal(err)
		}
		g.stop(t)
		g.vm = g.bootRetry(t, harness.BootOptions{Label: "dracut", Timeout: bootTimeout,
			Direct: &harness.DirectBoot{Kernel: g.uki.Kernel, Initrd: initrd, Append: g.directCmdline()}})
		// The dracut path must have set up the same verified root.
		var bj bootJSON
		if err := json.Unmarshal([]byte(g.must(t, "cat /run/berth/boot.json")), &bj); err != nil || bj.Composefs != g.boot.Composefs || bj.Verity != "required" {
			t.Fatalf("dracut boot: boot.json %+v (%v), want composefs %s with verity required", bj, err, g.boot.Composefs)
		}
		if root := g.must(t, "findmnt -no FSTYPE,OPTIONS /"); !strings.Contains(root, "verity=require") {
			t.Fatalf("dracut boot: root %q is not verity=require", root)
		}
		dracutTime := g.measureSwitchRoot(t, "dracut initramfs")
		bs, _ := os.Stat(g.uki.Initrd)
		ds, _ := os.Stat(initrd)
		note := fmt.Sprintf("switch-root berth %.1fs vs dracut %.1fs (%.1fx); size berth %.1f MiB vs dracut %.1f MiB (%.1fx)",
			g.berthSwitchRoot.Seconds(), dracutTime.Seconds(), dracutTime.Seconds()/g.berthSwitchRoot.Seconds(),
			float64(bs.Size())/(1<<20), float64(ds.Size())/(1<<20), float64(ds.Size())/float64(bs.Size()))
		t.Log(note)
		lane.summary.Add(g.name+"/initramfs-comparison", "INFO", 0, note)
	})
}

// buildDracutInitrd builds the image's own dracut initramfs with berth's dracut module and
// runtime installed into a copy of the guest root filesystem (make install DESTDIR=).
func buildDracutInitrd(t *testing.T, rootfs, dir, kver string) (string, error) {
	os.RemoveAll(dir)
	os.MkdirAll(dir, 0o755)
	root := filepath.Join(dir, "root")
	defer os.RemoveAll(root)
	steps := [][]string{
		{"cp", "-a", rootfs, root},
		// -o build: install the binaries the lane already uses instead of rebuilding them.
		{"make", "-C", lane.src, "-o", "build", "install", "DESTDIR=" + root},
		// dracut needs /proc and /dev in the chroot; a private mount namespace keeps them from leaking.
		{"unshare", "--mount", "--propagation", "private", "sh", "-c",
			`set -e; mount -t proc proc "$1/proc"; mount --rbind /dev "$1/dev"; mount -t sysfs sys "$1/sys"
			 chroot "$1" dracut --force --no-hostonly --add berth --kver "$2" /tmp/initrd-berth-dracut.img`, "sh", root, kver},
	}
	for _, s := range steps {
		out, err := exec.Command("timeout", append([]string{"-k", "5", fmt.Sprint(int((10 * time.Minute).Seconds()))}, s...)...).CombinedOutput()
		os.WriteFile(filepath.Join(dir, "build.log"), out, 0o644)
		if err != nil {
			return "", fmt.Errorf("%s: %v\n%s", strings.Join(s, " "), err, tailString(string(out), 30))
		}
	}
	dst := filepath.Join(dir, "initrd-dracut.img")
	if err := os.Rename(filepath.Join(root, "tmp/initrd-berth-dracut.img"), dst); err != nil {
		return "", err
	}
	return dst, nil
}
