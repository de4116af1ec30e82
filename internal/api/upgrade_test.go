package api

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/etcmerge"
	"github.com/berth-dev/berth/internal/fsck"
	"github.com/berth-dev/berth/internal/initrd"
	"github.com/berth-dev/berth/internal/install"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

const hostStub = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"

// testRuntime builds berth and berth-init and collects the runtime from
// this source tree, as a deployment gets it.
func testRuntime(t *testing.T) *runtime.Set {
	t.Helper()
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	bin := t.TempDir()
	cmd := exec.Command("go", "build", "-tags", "containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper",
		"-o", bin+"/", "./cmd/berth", "./cmd/berth-init")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	set, err := runtime.Collect(runtime.Options{BinDir: bin, RepoDir: repo})
	if err != nil {
		t.Fatal(err)
	}
	return set
}

// imageFiles is a small bootable-looking image: a made-up kernel (the UKI
// is built, never booted), a module tree that declares the initramfs'
// modules built in, the host's systemd-stub and systemd-boot, and /etc.
func imageFiles(t *testing.T, etc map[string]string) map[string][]byte {
	t.Helper()
	kver := "6.12.0-test"
	kernel := make([]byte, 64<<10)
	rand.Read(kernel)
	var builtin strings.Builder
	for _, m := range initrd.DefaultModules {
		fmt.Fprintf(&builtin, "kernel/%s.ko\n", m)
	}
	files := map[string][]byte{
		"usr/lib/modules/" + kver + "/vmlinuz":         kernel,
		"usr/lib/modules/" + kver + "/modules.dep":     nil,
		"usr/lib/modules/" + kver + "/modules.builtin": []byte(builtin.String()),
		"etc/os-release": []byte("PRETTY_NAME=\"berth test image\"\nID=debian\n"),
	}
	for name, content := range etc {
		files["etc/"+name] = []byte(content)
	}
	for img, host := range map[string]string{"usr/lib/systemd/boot/efi/linuxx64.efi.stub": hostStub, "usr/lib/systemd/boot/efi/systemd-bootx64.efi": "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"} {
		testenv.RequireFile(t, host, "systemd-boot-efi")
		b, err := os.ReadFile(host)
		if err != nil {
			t.Fatal(err)
		}
		files[img] = b
	}
	return files
}

// ociLayout packs files as a one-layer image into an OCI layout and
// returns its reference.
func ociLayout(t *testing.T, files map[string][]byte) string {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	dirs := map[string]bool{}
	var mkdirs func(string)
	mkdirs = func(p string) {
		if p == "." || dirs[p] {
			return
		}
		mkdirs(filepath.Dir(p))
		dirs[p] = true
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: 0o755, ModTime: time.Unix(1700000000, 0)})
	}
	for _, n := range names {
		mkdirs(filepath.Dir(n))
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o644, Size: int64(len(files[n])), ModTime: time.Unix(1700000000, 0)})
		tw.Write(files[n])
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	data := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "layout")
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "test"})); err != nil {
		t.Fatal(err)
	}
	return "oci:" + dir + ":test"
}

// TestRealUpgradeViaBus runs the real engine through the bus: an
// installed deployment of image v1, then Switch to v2 (pull, deployment,
// initramfs, UKI into the ESP as the boot-counted default, pending /etc
// merge), then Upgrade, which finds nothing new.
func TestRealUpgradeViaBus(t *testing.T) {
	needRoot(t)
	if testing.Short() {
		t.Skip("builds berth and berth-init")
	}
	rt := testRuntime(t)
	sysroot := newSysroot(t)
	esp := filepath.Join(sysroot, "efi")
	policy := filepath.Join(sysroot, "policy.json")
	os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644)
	const root = "PARTUUID=6a1f1e0c-3c4d-4f5e-8a9b-0c1d2e3f4a5b"

	// The installed system: v1, deployed the way `berth install` does.
	v1 := ociLayout(t, imageFiles(t, map[string]string{"hostname": "v1\n", "motd": "welcome to v1\n"}))
	img1, err := oci.Pull(context.Background(), v1, oci.PullOptions{Sysroot: sysroot, PolicyPath: policy})
	if err != nil {
		t.Fatal(err)
	}
	res1, err := install.DeployImage(sysroot, esp, img1, install.DeployOptions{Runtime: rt, Root: root, Origin: "install", KernelArgs: []string{"console=ttyS0,115200"}})
	if err != nil {
		t.Fatal(err)
	}
	first := res1.Deployment

	bus := startBus(t, "")
	startServer(t, bus, &SysrootEngine{Sysroot: sysroot, ESP: esp, PolicyPath: policy, Runtime: rt, Root: root}, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	v2 := ociLayout(t, imageFiles(t, map[string]string{"hostname": "v2\n", "motd": "welcome to v2\n"}))
	job, err := c.Switch(v2, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var phases []string
	res, err := c.Wait(ctx, job, func(p string, d, tot uint64) {
		if len(phases) == 0 || phases[len(phases)-1] != p {
			phases = append(phases, p)
		}
	})
	if err != nil || res.State != StateDone {
		t.Fatalf("switch job: %+v, %v (phases %v)", res, err, phases)
	}
	t.Logf("switch: %s; phases %v", res.Summary, phases)
	if len(phases) < 2 || !strings.HasPrefix(phases[0], "pull") || !strings.HasPrefix(phases[len(phases)-1], "deploy") {
		t.Errorf("progress phases %v", phases)
	}

	l := store.At(sysroot)
	deps, err := deploy.List(l)
	if err != nil || len(deps) != 2 || deps[0].ID != first.ID {
		t.Fatalf("deployments %v, %v", deps, err)
	}
	second := deps[1]
	if second.ImageRef != v2 || second.Origin != "switch" {
		t.Fatalf("new deployment %+v", second)
	}
	if strings.Join(second.KernelArgs, " ") != "console=ttyS0,115200" {
		t.Errorf("the installed system's kernel arguments were not carried to the new deployment: %q", second.KernelArgs)
	}
	def, err := boot.ESP{Dir: esp}.Default()
	if err != nil || def == nil || def.ID != second.ID || def.TriesLeft != install.BootTries {
		t.Fatalf("default entry %+v, %v; want %s with %d tries", def, err, second.ID, install.BootTries)
	}
	if p, err := etcmerge.ReadPending(l, second.ID); err != nil || p == nil || p.From != first.ID {
		t.Fatalf("pending /etc merge: %+v, %v", p, err)
	}
	h, raw, err := c.Status()
	if err != nil {
		t.Fatal(err)
	}
	if err := ValidateStatusJSON(raw); err != nil {
		t.Fatalf("status does not match the schema: %v", err)
	}
	if h.Status.Staged == nil || h.Status.Staged.Berth.ID != second.ID || h.Status.Rollback == nil || h.Status.Rollback.Berth.ID != first.ID {
		t.Fatalf("roles after switch: staged %+v rollback %+v", h.Status.Staged, h.Status.Rollback)
	}

	// --check: nothing new for the tracked image (v2 now).
	job, err = c.Upgrade(map[string]dbus.Variant{"check": dbus.MakeVariant(true)})
	if err != nil {
		t.Fatal(err)
	}
	res, err = c.Wait(ctx, job, nil)
	if err != nil || res.State != StateDone || !strings.HasPrefix(res.Summary, "no update") || !strings.Contains(res.Summary, second.ManifestDigest) {
		t.Fatalf("upgrade --check: %+v, %v", res, err)
	}

	// The tracked image did not change since: no new deployment.
	job, err = c.Upgrade(nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err = c.Wait(ctx, job, nil)
	if err != nil || res.State != StateDone || !strings.Contains(res.Summary, "no update") {
		t.Fatalf("upgrade without a new image: %+v, %v", res, err)
	}
	if deps, _ := deploy.List(l); len(deps) != 2 {
		t.Fatalf("%d deployments after a no-op upgrade", len(deps))
	}
}

// TestRealSwitchCancelledMidImport cancels a real Switch while its layer
// is being imported: the job ends cancelled and the store is as before
// (no deployment, no image record, no temporary files, every composefs
// image intact).
func TestRealSwitchCancelledMidImport(t *testing.T) {
	needRoot(t)
	sysroot := newSysroot(t)
	l := store.At(sysroot)
	policy := filepath.Join(sysroot, "policy.json")
	os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644)
	old, err := createDeployment(l, "old")
	if err != nil {
		t.Fatal(err)
	}
	files := imageFiles(t, map[string]string{"hostname": "big\n"})
	// Enough incompressible content that the import is still running when
	// the cancel arrives.
	for i := 0; i < 16; i++ {
		b := make([]byte, 4<<20)
		rand.Read(b)
		files[fmt.Sprintf("usr/share/blob%02d", i)] = b
	}
	ref := ociLayout(t, files)

	bus := startBus(t, "")
	startServer(t, bus, &SysrootEngine{Sysroot: sysroot, PolicyPath: policy}, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	job, err := c.Switch(ref, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cancelled := false
	res, err := c.Wait(ctx, job, func(phase string, done, total uint64) {
		if !cancelled && strings.HasPrefix(phase, "pull: layer") {
			cancelled = true
			if err := c.Cancel(job); err != nil {
				t.Errorf("Cancel: %v", err)
			}
		}
	})
	if err != nil || res.State != StateCancelled {
		t.Fatalf("job: %+v, %v", res, err)
	}
	if deps, err := deploy.List(l); err != nil || len(deps) != 1 || deps[0].ID != old.ID {
		t.Fatalf("deployments after cancel: %v, %v", deps, err)
	}
	if img, err := oci.LookupImage(sysroot, ref); err == nil {
		t.Fatalf("a cancelled pull left an image record: %+v", img)
	}
	for _, dir := range []string{l.Deployments(), l.Images(), l.Objects()} {
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), ".tmp") || strings.HasPrefix(e.Name(), ".rm-") {
				t.Errorf("leftover %s in %s", e.Name(), dir)
			}
		}
	}
	imgs, _ := os.ReadDir(l.Images())
	for _, e := range imgs {
		if err := composefs.Check(filepath.Join(l.Images(), e.Name())); err != nil {
			t.Errorf("image %s: %v", e.Name(), err)
		}
	}
	assertFsckClean(t, sysroot)
}

// assertFsckClean runs `berth fsck --verify-objects`'s check on sysroot: no
// errors, and no warnings either (nothing for cleanup to do).
func assertFsckClean(t *testing.T, sysroot string) {
	t.Helper()
	rep, err := fsck.Check(fsck.Options{Sysroot: sysroot, VerifyObjects: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range rep.Errors {
		t.Errorf("fsck error: %s", p)
	}
	for _, p := range rep.Warnings {
		t.Errorf("fsck warning: %s", p)
	}
	if rep.Images == 0 || rep.Deployments == 0 {
		t.Errorf("fsck found no images or deployments to check: %+v", rep)
	}
}
