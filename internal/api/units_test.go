package api

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
	"golang.org/x/sys/unix"
)

// guestRootfs is the Debian trixie tree test/guest/build-rootfs.sh builds;
// it has systemd 257's systemd-analyze, which this host lacks.
const guestRootfs = "/var/cache/berth-e2e/trixie-rootfs"

var berthUnits = []string{"berthd.service", "berth-healthcheck.service", "berth-upgrade.service", "berth-upgrade.timer"}

// verifyUnits runs `systemd-analyze verify` on unit files inside an
// overlay of the guest rootfs (chroot), with executables at the paths the
// units' ExecStart= name.
func verifyUnits(t *testing.T, units map[string][]byte) (string, error) {
	t.Helper()
	w := t.TempDir()
	for _, d := range []string{"upper", "work", "root"} {
		if err := os.Mkdir(filepath.Join(w, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	root := filepath.Join(w, "root")
	testenv.RequireFeature(t, unix.Mount("overlay", root, "overlay", 0, "lowerdir="+guestRootfs+",upperdir="+filepath.Join(w, "upper")+",workdir="+filepath.Join(w, "work")),
		"overlayfs (an overlay of the guest rootfs)", unix.ENODEV)
	defer unix.Unmount(root, unix.MNT_DETACH)
	// The units are verified, not berth's binaries: any executable will
	// do at the ExecStart= paths.
	exe, err := os.ReadFile("/bin/true")
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(root, "usr/lib/berth"), 0o755)
	for _, b := range []string{"berthd", "berth"} {
		if err := os.WriteFile(filepath.Join(root, "usr/lib/berth", b), exe, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var paths []string
	for name, data := range units {
		p := "/usr/lib/systemd/system/" + name
		if err := os.WriteFile(filepath.Join(root, p), data, 0o644); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	cmd := exec.Command("chroot", append([]string{root, "systemd-analyze", "verify"}, paths...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestUnitsVerify(t *testing.T) {
	testenv.RequireRoot(t, "chroots into an overlay of the guest rootfs to run its systemd-analyze")
	testenv.RequireFile(t, filepath.Join(guestRootfs, ".recipe"), testenv.Guest)
	units := map[string][]byte{}
	for _, u := range berthUnits {
		b, err := os.ReadFile(filepath.Join("../../units", u))
		if err != nil {
			t.Fatal(err)
		}
		units[u] = b
	}
	if out, err := verifyUnits(t, units); err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	// The check can fail: a broken unit is reported.
	broken := map[string][]byte{"berthd.service": []byte("[Service]\nType=dbus\nExecStart=/usr/lib/berth/berthd\n")}
	if out, err := verifyUnits(t, broken); err == nil && strings.TrimSpace(out) == "" {
		t.Fatal("systemd-analyze verify accepted a Type=dbus service without BusName=")
	}
}
