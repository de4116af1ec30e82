package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testenv"
	"github.com/berth-dev/berth/test/e2e/harness"
)

// sideBySide boots the same disk and command line with the image's own dracut initramfs
// (built with berth's dracut module, so it verifies and mounts the same composefs root)
// and with berth's initramfs, alternately, and compares kernel start → switch-root
// (medians of sideBySideBoots() boots per side; TCG timings are noisy) and the sizes.
// The size target (berth's ≥ 3× smaller) is checked; the times are reported.
func (g *guest) sideBySide(t *testing.T) {
	step(t, g.name+"/initramfs-side-by-side", func(t *testing.T) {
		if _, err := os.Stat(filepath.Join(lane.src, "dracut/90berth/module-setup.sh")); err != nil {
			testenv.SkipOrFail(t, "dracut/90berth/module-setup.sh is not there yet: the dracut side of the comparison cannot be built")
		}
		kver, err := g.img.Kernel()
		if err != nil {
			t.Fatal(err)
		}
		initrd, err := buildDracutInitrd(t, g.img.Rootfs, filepath.Join(g.dir, "dracut"), kver)
		if err != nil {
			t.Fatal(err)
		}
		bs, err := os.Stat(g.uki.Initrd)
		if err != nil {
			t.Fatal(err)
		}
		ds, err := os.Stat(initrd)
		if err != nil {
			t.Fatal(err)
		}
		sizeRatio := float64(ds.Size()) / float64(bs.Size())
		t.Logf("size: berth %d bytes, dracut %d bytes (%.2fx)", bs.Size(), ds.Size(), sizeRatio)
		if sizeRatio < 3 {
			t.Errorf("berth's initramfs (%d bytes) is not 3x smaller than dracut's (%d bytes): %.2fx", bs.Size(), ds.Size(), sizeRatio)
		}

		sides := []struct {
			name, initrd string
			samples      []time.Duration
		}{{name: "berth", initrd: g.uki.Initrd}, {name: "dracut", initrd: initrd}}
		n := sideBySideBoots()
		for i := 1; i <= n; i++ {
			for s := range sides {
				side := &sides[s]
				g.stop(t)
				g.vm = g.bootRetry(t, harness.BootOptions{Label: fmt.Sprintf("sbs-%s-%d", side.name, i), Timeout: bootTimeout,
					Direct: &harness.DirectBoot{Kernel: g.uki.Kernel, Initrd: side.initrd, Append: g.directCmdline()}})
				// Both paths must have set up the same verified root.
				var bj bootJSON
				if err := json.Unmarshal([]byte(g.must(t, "cat /run/berth/boot.json")), &bj); err != nil || bj.Composefs != g.boot.Composefs || bj.Verity != "required" {
					t.Fatalf("%s boot %d: boot.json %+v (%v), want composefs %s with verity required", side.name, i, bj, err, g.boot.Composefs)
				}
				if root := g.must(t, "findmnt -no FSTYPE,OPTIONS /"); !strings.Contains(root, "verity=require") {
					t.Fatalf("%s boot %d: root %q is not verity=require", side.name, i, root)
				}
				d, err := switchRootTime(g)
				if err != nil {
					t.Fatalf("%s boot %d: %v", side.name, i, err)
				}
				load, _ := os.ReadFile("/proc/loadavg")
				t.Logf("%s boot %d: kernel start → switch-root %.2fs (host load %s)", side.name, i, d.Seconds(), strings.Join(strings.Fields(string(load))[:3], " "))
				side.samples = append(side.samples, d)
			}
		}
		g.stop(t)
		bm, dm := median(sides[0].samples), median(sides[1].samples)
		for _, side := range sides {
			lane.summary.Add(g.name+"/initramfs-comparison/"+side.name, "INFO", median(side.samples),
				fmt.Sprintf("kernel start → switch-root, median of %d direct boots: %s", len(side.samples), fmtSamples(side.samples)))
		}
		note := fmt.Sprintf("switch-root median berth %.2fs vs dracut %.2fs (%.2fx, %d boots each, interleaved); size berth %d vs dracut %d bytes (%.2fx)",
			bm.Seconds(), dm.Seconds(), dm.Seconds()/bm.Seconds(), n, bs.Size(), ds.Size(), sizeRatio)
		t.Log(note)
		lane.summary.Add(g.name+"/initramfs-comparison", "INFO", 0, note)
	})
}

// sideBySideBoots is the number of boots per side (BERTH_E2E_SIDEBYSIDE_BOOTS). The
// default of 1 is what `make check` needs: the image's dracut initramfs with berth's module
// boots the verified root, and the sizes are compared. The timing comparison wants medians
// of several boots (a TCG boot takes 1–2 minutes): `make bench-initramfs` runs 3 per side.
func sideBySideBoots() int {
	if n, err := strconv.Atoi(os.Getenv("BERTH_E2E_SIDEBYSIDE_BOOTS")); err == nil && n > 0 {
		return n
	}
	return 1
}

// switchRootTime is kernel start → switch-root of the running boot: systemd's
// UserspaceTimestamp in the booted system (when the real root's init started).
func switchRootTime(g *guest) (time.Duration, error) {
	out, err := g.vm.SSH(context.Background(), "systemctl show -p UserspaceTimestampMonotonic --value")
	if err != nil {
		return 0, fmt.Errorf("switch-root time: %w", err)
	}
	usec, err := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
	if err != nil || usec <= 0 {
		return 0, fmt.Errorf("switch-root time: UserspaceTimestampMonotonic %q", out)
	}
	return time.Duration(usec) * time.Microsecond, nil
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func fmtSamples(d []time.Duration) string {
	var parts []string
	for _, x := range d {
		parts = append(parts, fmt.Sprintf("%.2fs", x.Seconds()))
	}
	return strings.Join(parts, " ")
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
