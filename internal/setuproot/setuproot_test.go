package setuproot

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

const childEnv = "BERTH_SETUPROOT_TEST_DIR"

// inMountNamespace re-runs the calling test in a child process with its own
// mount namespace (Go makes / recursively private there), so the mounts a
// test makes vanish with the child. It returns the work directory in the
// child, and "" in the parent (which has then waited for the child).
func inMountNamespace(t *testing.T) string {
	t.Helper()
	testenv.RequireRoot(t, "mounts EROFS, overlayfs and binds in a private mount namespace")
	if d := os.Getenv(childEnv); d != "" {
		return d
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	t.Logf("child in a private mount namespace:\n%s", out)
	if err != nil {
		t.Fatalf("child test failed: %v", err)
	}
	if !bytes.Contains(out, []byte("--- PASS: "+t.Name())) {
		t.Fatalf("child did not report a pass for %s", t.Name())
	}
	return ""
}

// fixture is a physical root laid out like DESIGN §3 with one image made
// by the composefs writer.
type fixture struct {
	backing, sysroot, run string
	digest                string
	l                     store.Layout
}

func newFixture(t *testing.T, base string) *fixture {
	f := &fixture{backing: filepath.Join(base, "physical"), sysroot: filepath.Join(base, "sysroot"), run: filepath.Join(base, "run")}
	for _, d := range []string{f.backing, f.sysroot, f.run} {
		must(t, os.MkdirAll(d, 0o755))
	}
	f.l = store.At(f.backing)
	must(t, f.l.Init())

	src := filepath.Join(base, "src")
	big := bytes.Repeat([]byte("berth external file content\n"), 100)
	files := map[string][]byte{
		"usr/bin/hello":        big,
		"etc/hostname":         []byte("image\n"),
		"var/lib/dpkg/status":  []byte("Package: from-the-image\n"),
		"var/log/image.log":    []byte("image log\n"),
		"usr/share/doc/readme": append([]byte("readme "), big...),
	}
	for p, data := range files {
		must(t, os.MkdirAll(filepath.Join(src, filepath.Dir(p)), 0o755))
		must(t, os.WriteFile(filepath.Join(src, p), data, 0o644))
	}
	for _, d := range []string{"sysroot", "berth", "home", "root", "opt"} {
		must(t, os.MkdirAll(filepath.Join(src, d), 0o755))
	}
	st, err := composefs.OpenStore(f.l.Objects(), fsverity.SHA256)
	must(t, err)
	b := st.NewBatch()
	root, err := composefs.ScanDir(src, composefs.ScanOptions{Store: b})
	must(t, err)
	must(t, b.Commit())
	tmp := filepath.Join(f.l.Images(), "tmp-image")
	dg, err := composefs.WriteImageFile(tmp, root, composefs.WriteOptions{})
	must(t, err)
	f.digest = hex.EncodeToString(dg)
	must(t, os.Rename(tmp, f.l.Image(f.digest)))
	must(t, os.MkdirAll(f.l.Deployment(f.deployID()), 0o755))
	// Shared state, as deploy.SeedState would have made it.
	must(t, os.MkdirAll(filepath.Join(f.l.State(), "var", "log"), 0o755))
	must(t, os.WriteFile(filepath.Join(f.l.State(), "var", "log", "shared.log"), []byte("shared\n"), 0o644))
	must(t, os.MkdirAll(filepath.Join(f.l.State(), "home", "user"), 0o755))
	return f
}

func (f *fixture) deployID() string { return "1-" + f.digest[:12] }

func (f *fixture) args(t *testing.T, extra string) *cmdline.Args {
	a, err := cmdline.Parse("root=LABEL=x berth.composefs=?" + f.digest + " berth.deploy=" + f.deployID() + " " + extra)
	must(t, err)
	return a
}

// boot mounts the physical root (a bind of the backing directory, so its
// content survives "reboots") and runs Setup.
func (f *fixture) boot(t *testing.T, a *cmdline.Args) (*BootRecord, error) {
	must(t, unix.Mount(f.backing, f.sysroot, "", unix.MS_BIND, ""))
	var con bytes.Buffer
	rec, err := Setup(Options{Sysroot: f.sysroot, Args: a, RunDir: f.run, Console: &con})
	t.Logf("console:\n%s", con.String())
	return rec, err
}

// shutdown detaches everything below the sysroot and the run directory.
func (f *fixture) shutdown(t *testing.T) {
	must(t, unix.Unmount(f.sysroot, unix.MNT_DETACH))
	unix.Unmount(filepath.Join(f.run, "transient"), unix.MNT_DETACH)
	os.RemoveAll(filepath.Join(f.run, "keep"))
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	return string(b)
}

func TestSetupRootPersistent(t *testing.T) {
	base := inMountNamespace(t)
	if base == "" {
		return
	}
	f := newFixture(t, base)
	rec, err := f.boot(t, f.args(t, ""))
	if err != nil {
		t.Fatalf("setup-root: %v", err)
	}
	r := f.sysroot
	// The image content comes up through the overlay (external file from the object store).
	if got := read(t, filepath.Join(r, "usr/bin/hello")); got != strings.Repeat("berth external file content\n", 100) {
		t.Fatalf("usr/bin/hello has wrong content (%d bytes)", len(got))
	}
	if read(t, filepath.Join(r, "etc/hostname")) != "image\n" {
		t.Fatal("etc/hostname wrong")
	}
	var st unix.Statfs_t
	must(t, unix.Statfs(r, &st))
	if st.Type != unix.OVERLAYFS_SUPER_MAGIC {
		t.Fatalf("root is not overlayfs (type %#x)", st.Type)
	}
	// Shared /var from state, package database from the deployment.
	if read(t, filepath.Join(r, "var/log/shared.log")) != "shared\n" {
		t.Fatal("shared /var not bound")
	}
	if _, err := os.Stat(filepath.Join(r, "var/log/image.log")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("/var/log/image.log of the image is visible through the shared /var: %v", err)
	}
	if read(t, filepath.Join(r, "var/lib/dpkg/status")) != "Package: from-the-image\n" {
		t.Fatal("/var/lib/dpkg is not the deployment's")
	}
	if _, err := os.Stat(filepath.Join(r, "home/user")); err != nil {
		t.Fatalf("shared /home not bound: %v", err)
	}
	// The physical root and the repository are visible below the new root.
	if _, err := os.Stat(filepath.Join(r, "sysroot/berth/repo/images", f.digest)); err != nil {
		t.Fatalf("physical root not at /sysroot: %v", err)
	}
	if _, err := os.Stat(filepath.Join(r, "berth/repo/images", f.digest)); err != nil {
		t.Fatalf("/berth not bound: %v", err)
	}
	var disk BootRecord
	must(t, json.Unmarshal([]byte(read(t, filepath.Join(f.run, "boot.json"))), &disk))
	if disk.Composefs != f.digest || disk.Deploy != f.deployID() || disk.Local != "persistent" || disk.Verity != "off" ||
		strings.Join(disk.Shared, ",") != "var,home" || strings.Join(disk.PerDeployment, ",") != "var/lib/dpkg" || rec.PhysicalRoot != "/sysroot" {
		t.Fatalf("boot.json = %+v", disk)
	}
	// A local change survives a second setup-root ("reboot").
	must(t, os.WriteFile(filepath.Join(r, "usr/local-change"), []byte("kept\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(r, "var/lib/dpkg/status"), []byte("Package: changed\n"), 0o644))
	f.shutdown(t)
	if _, err := f.boot(t, f.args(t, "")); err != nil {
		t.Fatalf("second setup-root: %v", err)
	}
	if read(t, filepath.Join(r, "usr/local-change")) != "kept\n" {
		t.Fatal("persistent change lost")
	}
	if read(t, filepath.Join(r, "var/lib/dpkg/status")) != "Package: changed\n" {
		t.Fatal("per-deployment /var/lib/dpkg change lost")
	}
	if _, err := os.Stat(filepath.Join(f.l.Deployment(f.deployID()), "upper", "usr", "local-change")); err != nil {
		t.Fatalf("change not in deploy/<id>/upper: %v", err)
	}
}

func TestSetupRootTransientAndReadonly(t *testing.T) {
	base := inMountNamespace(t)
	if base == "" {
		return
	}
	f := newFixture(t, base)
	r := f.sysroot
	if _, err := f.boot(t, f.args(t, "berth.local=transient")); err != nil {
		t.Fatalf("transient setup-root: %v", err)
	}
	must(t, os.WriteFile(filepath.Join(r, "usr/transient-change"), []byte("gone\n"), 0o644))
	f.shutdown(t)
	if _, err := f.boot(t, f.args(t, "berth.local=transient")); err != nil {
		t.Fatalf("second transient setup-root: %v", err)
	}
	if _, err := os.Stat(filepath.Join(r, "usr/transient-change")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("transient change survived: %v", err)
	}
	f.shutdown(t)

	if _, err := f.boot(t, f.args(t, "berth.local=readonly")); err != nil {
		t.Fatalf("readonly setup-root: %v", err)
	}
	for _, p := range []string{"usr/x", "opt/x", "x"} {
		err := os.WriteFile(filepath.Join(r, p), []byte("no"), 0o644)
		if !errors.Is(err, unix.EROFS) {
			t.Errorf("readonly: write to /%s: %v, want EROFS", p, err)
		}
	}
	must(t, os.WriteFile(filepath.Join(r, "etc/local.conf"), []byte("etc is writable\n"), 0o644))
	if read(t, filepath.Join(r, "etc/hostname")) != "image\n" {
		t.Fatal("readonly /etc lost the image content")
	}
	if _, err := os.Stat(filepath.Join(f.l.Deployment(f.deployID()), "etc", "upper", "local.conf")); err != nil {
		t.Fatalf("readonly /etc change not in deploy/<id>/etc/upper: %v", err)
	}
}

func TestSetupRootRefusals(t *testing.T) {
	base := inMountNamespace(t)
	if base == "" {
		return
	}
	f := newFixture(t, base)
	// Another valid image name whose content is not what the name says.
	other := strings.Repeat("ab", 32)
	data, err := os.ReadFile(f.l.Image(f.digest))
	must(t, err)
	must(t, os.WriteFile(f.l.Image(other), data, 0o644))
	must(t, os.MkdirAll(f.l.Deployment("other"), 0o755))
	a, err := cmdline.Parse("berth.composefs=?" + other + " berth.deploy=other")
	must(t, err)
	_, err = f.boot(t, a)
	var be *Error
	if err == nil || !errors.As(err, &be) || !strings.Contains(err.Error(), "composefs image digest mismatch") || !strings.Contains(err.Error(), f.digest) {
		t.Fatalf("mismatched image: %v", err)
	}
	f.shutdown(t)

	// Without '?', this kernel (no fs-verity) must refuse, naming fs-verity.
	a, err = cmdline.Parse("berth.composefs=" + f.digest + " berth.deploy=" + f.deployID())
	must(t, err)
	_, err = f.boot(t, a)
	if err == nil {
		// By design, also under CI: this path exists only without fs-verity.
		t.Skip("this kernel and filesystem have fs-verity; the refusal path is covered by the VM lane")
	}
	if !errors.As(err, &be) || !strings.Contains(be.Reason, "fs-verity is not available") || !strings.Contains(be.Fix, "berth.composefs=?") {
		t.Fatalf("non-? boot without fs-verity: %v", err)
	}
	t.Logf("refusal as shown on the console:%s", FormatError(err))
	f.shutdown(t)

	// A missing deployment is refused before anything is mounted.
	a, _ = cmdline.Parse("berth.composefs=?" + f.digest + " berth.deploy=9-" + f.digest[:12])
	if _, err := f.boot(t, a); err == nil || !strings.Contains(err.Error(), "deployment 9-") {
		t.Fatalf("missing deployment: %v", err)
	}
	f.shutdown(t)
}

// TestSealPendingWithoutVerity checks that a verity-pending marker stays when
// the kernel cannot seal (this host), and that the boot goes on with '?'.
// The sealing itself runs in the QEMU smoke test (test/boot-smoke.sh) on the
// trixie kernel, which has fs-verity.
func TestSealPendingWithoutVerity(t *testing.T) {
	base := inMountNamespace(t)
	if base == "" {
		return
	}
	f := newFixture(t, base)
	marker := filepath.Join(f.l.Repo(), store.VerityPendingFile)
	must(t, os.WriteFile(marker, nil, 0o644))
	rec, err := f.boot(t, f.args(t, ""))
	if err != nil {
		t.Fatal(err)
	}
	probe, _ := os.Open(f.l.Image(f.digest))
	_, _, merr := fsverity.Measure(probe)
	probe.Close()
	if merr == nil {
		// By design, also under CI: this path exists only without fs-verity.
		t.Skip("this host has fs-verity; sealing is covered by the QEMU smoke test")
	}
	if !errors.Is(merr, fsverity.ErrNotSupported) {
		t.Fatalf("measuring the image: %v; want fs-verity sealed or not supported", merr)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("marker removed although nothing could be sealed: %v", err)
	}
	if len(rec.Warnings) == 0 || !strings.Contains(strings.Join(rec.Warnings, "\n"), "cannot seal") {
		t.Fatalf("no warning about sealing: %v", rec.Warnings)
	}
}

// TestSetupRootPrepare checks that the prepare hook runs on the mounted
// physical root before the overlay exists, and that its writes to the
// upper layer show in the mounted root; a failing hook stops the boot.
func TestSetupRootPrepare(t *testing.T) {
	base := inMountNamespace(t)
	if base == "" {
		return
	}
	f := newFixture(t, base)
	calls := 0
	prep := func(phys, id string, local cmdline.LocalMode) error {
		calls++
		if phys != f.sysroot || id != f.deployID() || local != cmdline.LocalPersistent {
			return fmt.Errorf("prepare(%q, %q, %q)", phys, id, local)
		}
		if err := checkMountPoint(filepath.Join(f.run, "root")); err == nil {
			return errors.New("the overlay is already mounted")
		}
		upper := filepath.Join(phys, "berth/deploy", id, "upper")
		if err := os.MkdirAll(filepath.Join(upper, "usr"), 0o755); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(upper, "usr", "prepared"), []byte("before mount\n"), 0o644)
	}
	must(t, unix.Mount(f.backing, f.sysroot, "", unix.MS_BIND, ""))
	var con bytes.Buffer
	_, err := Setup(Options{Sysroot: f.sysroot, Args: f.args(t, ""), RunDir: f.run, Console: &con, Prepare: prep})
	if err != nil || calls != 1 {
		t.Fatalf("setup-root: %v (prepare called %d times)\n%s", err, calls, con.String())
	}
	if read(t, filepath.Join(f.sysroot, "usr/prepared")) != "before mount\n" {
		t.Fatal("the hook's upper layer change is not in the mounted root")
	}
	f.shutdown(t)

	must(t, unix.Mount(f.backing, f.sysroot, "", unix.MS_BIND, ""))
	_, err = Setup(Options{Sysroot: f.sysroot, Args: f.args(t, ""), RunDir: f.run, Console: &con,
		Prepare: func(string, string, cmdline.LocalMode) error { return errors.New("merge failed") }})
	var be *Error
	if !errors.As(err, &be) || !strings.Contains(err.Error(), "merge failed") || be.Fix == "" {
		t.Fatalf("failing prepare: %v", err)
	}
	var st unix.Statfs_t
	must(t, unix.Statfs(filepath.Join(f.run, "root"), &st))
	if st.Type == unix.OVERLAYFS_SUPER_MAGIC {
		t.Fatal("the overlay was mounted although prepare failed")
	}
	must(t, unix.Unmount(f.sysroot, unix.MNT_DETACH))
}
