package install

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/initrd"
	"github.com/berth-dev/berth/internal/loopdev"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/progress"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/uki"
)

const hostStub = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
const hostBoot = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (loop devices, mkfs, mount)")
	}
	for _, tool := range []string{"sgdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "fsck.fat", "mtype"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (%s)", tool, packageOf(tool))
		}
	}
}

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

// testRuntime builds the real berth and berth-init binaries once and
// collects the runtime from this source tree.
func testRuntime(t *testing.T) *runtime.Set {
	t.Helper()
	repo, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "berth-install-test-bin-")
		if binErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-tags", "containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper",
			"-o", binDir+"/", "./cmd/berth", "./cmd/berth-init")
		cmd.Dir = repo
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	set, err := runtime.Collect(runtime.Options{BinDir: binDir, RepoDir: repo})
	if err != nil {
		t.Fatal(err)
	}
	return set
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// fakeImageFiles is a tiny image: a made-up kernel (the UKI is only
// inspected, never booted), a module tree that declares every module
// built in, the host's real systemd-stub and systemd-boot, and state.
func fakeImageFiles(t *testing.T, kver string, withKernel bool) map[string][]byte {
	t.Helper()
	kernel := make([]byte, 200<<10)
	rand.Read(kernel)
	var builtin strings.Builder
	for _, m := range initrd.DefaultModules {
		fmt.Fprintf(&builtin, "kernel/%s.ko\n", m)
	}
	files := map[string][]byte{
		"usr/lib/modules/" + kver + "/modules.dep":     nil,
		"usr/lib/modules/" + kver + "/modules.builtin": []byte(builtin.String()),
		"etc/os-release":    []byte("PRETTY_NAME=\"berth test image\"\nID=debian\nVERSION_ID=13\n"),
		"var/lib/app/state": bytes.Repeat([]byte("state "), 100),
		"root/.profile":     []byte("PS1='# '\n"),
		"home/":             nil,
		"usr/bin/hello":     bytes.Repeat([]byte("hello world\n"), 50),
	}
	if withKernel {
		files["usr/lib/modules/"+kver+"/vmlinuz"] = kernel
	}
	for img, host := range map[string]string{"usr/lib/systemd/boot/efi/linuxx64.efi.stub": hostStub, "usr/lib/systemd/boot/efi/systemd-bootx64.efi": hostBoot} {
		b, err := os.ReadFile(host)
		if err != nil {
			t.Skipf("host has no %s (Debian package systemd-boot-efi): %v", host, err)
		}
		files[img] = b
	}
	return files
}

// writeOCILayout packs files as a one-layer image in an OCI layout and
// returns its reference ("oci:DIR:test").
func writeOCILayout(t *testing.T, files map[string][]byte) string {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	var mkdirs func(p string)
	mkdirs = func(p string) {
		if p == "." || p == "" || dirs[p] {
			return
		}
		mkdirs(filepath.Dir(p))
		dirs[p] = true
		mode := int64(0o755)
		if p == "root" {
			mode = 0o700
		}
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: mode, ModTime: time.Unix(1700000000, 0)})
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sortStrings(names)
	for _, n := range names {
		if strings.HasSuffix(n, "/") {
			mkdirs(strings.TrimSuffix(n, "/"))
			continue
		}
		mkdirs(filepath.Dir(n))
		mode := int64(0o644)
		if strings.HasPrefix(n, "usr/bin/") {
			mode = 0o755
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: mode, Size: int64(len(files[n])), ModTime: time.Unix(1700000000, 0)}); err != nil {
			t.Fatal(err)
		}
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

func sortStrings(s []string) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

type tlog struct{ t *testing.T }

func (w tlog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testOptions(t *testing.T, ref string) Options {
	pol := filepath.Join(t.TempDir(), "policy.json")
	os.WriteFile(pol, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644)
	return Options{Image: ref, Runtime: testRuntime(t), PolicyPath: pol,
		Progress: progress.New(tlog{t}, progress.Options{Mode: progress.Plain})}
}

// assertReleased checks that nothing of an install is left attached.
func assertReleased(t *testing.T, disk string) {
	t.Helper()
	if devs := loopDevicesBacking(disk); len(devs) > 0 {
		t.Errorf("%s is still attached to %v", disk, devs)
	}
	b, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(b), "berth-install-") {
		t.Errorf("an install mount is left:\n%s", b)
	}
}

func TestToDiskLayout(t *testing.T) {
	needRoot(t)
	const kver = "6.12.0-berth-test"
	ref := writeOCILayout(t, fakeImageFiles(t, kver, true))
	tmp := t.TempDir()
	disk := filepath.Join(tmp, "disk.img")
	keys := filepath.Join(tmp, "keys.pub")
	const key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx4c2V0dGVzdGtleXRoYXRpc25vdHJlYWwx test@berth"
	os.WriteFile(keys, []byte(key), 0o644)

	opts := testOptions(t, ref)
	opts.Size = 3 << 30
	opts.SSHAuthorizedKeys = keys
	opts.KernelArgs = []string{"quiet", "systemd.show_status=1"}
	res, err := ToDisk(context.Background(), disk, opts)
	if err != nil {
		t.Fatal(err)
	}
	assertReleased(t, disk)
	for _, s := range res.Steps {
		t.Logf("step %-50s %s", s.Name, s.Duration.Round(time.Millisecond))
	}
	dep := res.Deployment
	if fi, err := os.Stat(disk); err != nil || fi.Size() != 3<<30 {
		t.Fatalf("disk image: %v %v", fi, err)
	}

	// Partition table.
	out, err := exec.Command("sgdisk", "-p", disk).CombinedOutput()
	if err != nil {
		t.Fatalf("sgdisk -p: %v\n%s", err, out)
	}
	t.Logf("sgdisk -p:\n%s", out)
	if !regexp.MustCompile(`(?m)^\s+1\s+2048\s+1050623\s+512\.0 MiB\s+EF00\s+ESP$`).Match(out) ||
		!regexp.MustCompile(`(?m)^\s+2\s+1050624\s+\d+\s+[\d.]+ GiB\s+8304\s+berth-root$`).Match(out) {
		t.Errorf("unexpected partition table")
	}
	espStart, espLast, espGUID, err := partitionInfo(context.Background(), disk, 1)
	if err != nil {
		t.Fatal(err)
	}
	rootStart, rootLast, rootGUID, err := partitionInfo(context.Background(), disk, 2)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.EqualFold(rootGUID, strings.TrimPrefix(res.Root, "PARTUUID=")) || !strings.EqualFold(espGUID, res.ESPPartUUID) {
		t.Errorf("GUIDs on disk %s/%s, result %s/%s", espGUID, rootGUID, res.ESPPartUUID, res.Root)
	}

	// The ESP: a clean FAT, systemd-boot, the UKI with +3 tries.
	esp, err := loopdev.Attach(disk, loopdev.Options{Offset: espStart * 512, SizeLimit: (espLast - espStart + 1) * 512, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer esp.Detach()
	if out, err := exec.Command("fsck.fat", "-n", esp.Path).CombinedOutput(); err != nil {
		t.Errorf("fsck.fat -n: %v\n%s", err, out)
	}
	entry := "EFI/Linux/berth-" + dep.ID + "+3.efi"
	if res.Entry != entry {
		t.Errorf("entry %q, want %q", res.Entry, entry)
	}
	mdir := func(p string) string {
		out, err := exec.Command("mdir", "-b", "-i", esp.Path, "::/"+p).CombinedOutput()
		if err != nil {
			t.Errorf("mdir %s: %v\n%s", p, err, out)
		}
		return string(out)
	}
	if l := mdir("EFI/Linux"); !strings.Contains(l, "berth-"+dep.ID+"+3.efi") {
		t.Errorf("EFI/Linux:\n%s", l)
	}
	if l := mdir("EFI/BOOT"); !strings.Contains(strings.ToUpper(l), "BOOTX64.EFI") {
		t.Errorf("EFI/BOOT:\n%s", l)
	}
	ukiFile := filepath.Join(tmp, "uki.efi")
	if out, err := exec.Command("mcopy", "-n", "-i", esp.Path, "::/"+entry, ukiFile).CombinedOutput(); err != nil {
		t.Fatalf("mcopy: %v\n%s", err, out)
	}
	out, err = exec.Command("objdump", "-h", ukiFile).CombinedOutput()
	if err != nil {
		t.Fatalf("objdump -h: %v\n%s", err, out)
	}
	for _, sec := range []string{".linux", ".initrd", ".cmdline", ".osrel", ".uname"} {
		if !strings.Contains(string(out), sec) {
			t.Errorf("UKI lacks section %s:\n%s", sec, out)
		}
	}
	secs, err := uki.ReadSectionsFile(ukiFile)
	if err != nil {
		t.Fatal(err)
	}
	cmdline := strings.TrimRight(string(secs[".cmdline"]), "\x00")
	want := fmt.Sprintf("root=PARTUUID=%s rw berth.composefs=%s berth.deploy=%s quiet systemd.show_status=1",
		strings.ToLower(rootGUID), dep.ComposefsDigest, dep.ID)
	if cmdline != want || res.Cmdline != want {
		t.Errorf(".cmdline = %q\nwant       %q", cmdline, want)
	}
	if string(secs[".uname"]) != kver && strings.TrimRight(string(secs[".uname"]), "\x00") != kver {
		t.Errorf(".uname = %q", secs[".uname"])
	}
	if out, err := exec.Command("mtype", "-i", esp.Path, "::/loader/loader.conf").CombinedOutput(); err != nil || !strings.Contains(string(out), "default") {
		t.Errorf("loader.conf: %v\n%s", err, out)
	}
	esp.Detach()

	// The root filesystem.
	rootDev, err := loopdev.Attach(disk, loopdev.Options{Offset: rootStart * 512, SizeLimit: (rootLast - rootStart + 1) * 512})
	if err != nil {
		t.Fatal(err)
	}
	defer rootDev.Detach()
	if out, err := exec.Command("dumpe2fs", "-h", rootDev.Path).CombinedOutput(); err != nil || !strings.Contains(string(out), "verity") {
		t.Errorf("root ext4 lacks the verity feature: %v\n%s", err, out)
	}
	mnt := filepath.Join(tmp, "root")
	os.Mkdir(mnt, 0o755)
	if err := unix.Mount(rootDev.Path, mnt, "ext4", unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(mnt, 0)
	l := store.At(mnt)
	ds, err := deploy.List(l)
	if err != nil || len(ds) != 1 || ds[0].ID != dep.ID {
		t.Fatalf("deployments on disk: %v %v", ds, err)
	}
	if !regexp.MustCompile(`^1-[0-9a-f]{12}$`).MatchString(dep.ID) || ds[0].Kernel != kver || ds[0].Origin != "install" || ds[0].ImageRef != ref || !strings.HasPrefix(ds[0].ManifestDigest, "sha256:") {
		t.Errorf("deployment.json: %+v", ds[0])
	}
	digest, err := fsverity.DigestFile(l.Image(dep.ComposefsDigest), fsverity.SHA256)
	if err != nil || hex.EncodeToString(digest) != dep.ComposefsDigest {
		t.Errorf("image digest %x (%v), deployment %s", digest, err, dep.ComposefsDigest)
	}
	for _, p := range []string{"berth/repo/objects", "berth/repo/oci", "berth/deploy/" + dep.ID + "/upper", "berth/deploy/" + dep.ID + "/work", "berth/state/var/lib/app", "berth/state/home", "berth/state/srv"} {
		if fi, err := os.Stat(filepath.Join(mnt, p)); err != nil || !fi.IsDir() {
			t.Errorf("%s: %v", p, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "berth/state/var/lib/app/state")); err != nil || !bytes.Equal(b, bytes.Repeat([]byte("state "), 100)) {
		t.Errorf("seeded state: %v", err)
	}
	for p, mode := range map[string]os.FileMode{"berth/state/root": 0o700, "berth/state/root/.ssh": 0o700, "berth/state/root/.ssh/authorized_keys": 0o600} {
		var st unix.Stat_t
		if err := unix.Stat(filepath.Join(mnt, p), &st); err != nil || os.FileMode(st.Mode&0o777) != mode || st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s: mode %o uid %d (%v)", p, st.Mode&0o777, st.Uid, err)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(mnt, "berth/state/root/.ssh/authorized_keys")); string(b) != key+"\n" {
		t.Errorf("authorized_keys = %q", b)
	}
	// This host cannot enable fs-verity: the marker must be there for berth-init.
	if _, err := os.Stat(filepath.Join(mnt, "berth/repo/verity-pending")); (err == nil) != res.VerityPending {
		t.Errorf("verity-pending marker %v, result says %v", err, res.VerityPending)
	}
	inits, _ := filepath.Glob(filepath.Join(mnt, "berth/boot/initrd-"+kver+"-*.img"))
	if len(inits) != 1 {
		t.Errorf("cached initramfs: %v", inits)
	} else if b, _ := os.ReadFile(inits[0]); !bytes.Contains(secs[".initrd"], b[:min(len(b), 4096)]) {
		t.Errorf("the UKI's .initrd is not the cached initramfs")
	}
	if ents, _ := os.ReadDir(filepath.Join(mnt, "berth/deploy")); len(ents) != 3 { // id, .serial, .lock
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("berth/deploy holds %v", names)
	}

	// The deployment's image, mounted by the kernel, has the image's files
	// and berth's runtime.
	meta, merged := filepath.Join(tmp, "meta"), filepath.Join(tmp, "merged")
	os.Mkdir(meta, 0o755)
	os.Mkdir(merged, 0o755)
	if err := unix.Mount(l.Image(dep.ComposefsDigest), meta, "erofs", unix.MS_RDONLY, ""); err != nil {
		t.Fatalf("mount erofs: %v", err)
	}
	defer unix.Unmount(meta, 0)
	if err := unix.Mount("overlay", merged, "overlay", unix.MS_RDONLY, "ro,lowerdir="+meta+"::"+l.Objects()+",metacopy=on,redirect_dir=on"); err != nil {
		t.Fatalf("mount overlay: %v", err)
	}
	defer unix.Unmount(merged, 0)
	for p, src := range map[string]string{"usr/lib/berth/berth": filepath.Join(binDir, "berth"), "usr/lib/berth/berth-init": filepath.Join(binDir, "berth-init")} {
		a, err1 := os.ReadFile(filepath.Join(merged, p))
		b, err2 := os.ReadFile(src)
		if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
			t.Errorf("%s in the deployment differs from %s (%v %v)", p, src, err1, err2)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(merged, "usr/bin/hello")); !bytes.Equal(b, bytes.Repeat([]byte("hello world\n"), 50)) {
		t.Error("usr/bin/hello differs")
	}
	unix.Unmount(merged, 0)
	unix.Unmount(meta, 0)
	unix.Unmount(mnt, 0)
	rootDev.Detach()

	// The disk now has partitions: a second install needs --wipe, and the
	// refusal leaves the disk alone.
	before, _ := exec.Command("sgdisk", "-p", disk).CombinedOutput()
	if _, err := ToDisk(context.Background(), disk, testOptions(t, ref)); err == nil || !strings.Contains(err.Error(), "--wipe") {
		t.Errorf("reinstall without --wipe: %v", err)
	}
	after, _ := exec.Command("sgdisk", "-p", disk).CombinedOutput()
	if !bytes.Equal(before, after) {
		t.Error("a refused install changed the partition table")
	}
	assertReleased(t, disk)
}

func TestToDiskRefusals(t *testing.T) {
	needRoot(t)
	tmp := t.TempDir()

	// An image without a kernel: the oci package's message, nothing left attached.
	ref := writeOCILayout(t, fakeImageFiles(t, "6.12.0-x", false))
	disk := filepath.Join(tmp, "nokernel.img")
	opts := testOptions(t, ref)
	opts.Size = 2 << 30
	_, err := ToDisk(context.Background(), disk, opts)
	var nk *oci.NoKernelError
	if !errors.As(err, &nk) || !strings.Contains(err.Error(), "linux-image-amd64") {
		t.Errorf("image without a kernel: %v", err)
	}
	assertReleased(t, disk)

	// A disk image that is attached to a loop device is in use.
	busy := filepath.Join(tmp, "busy.img")
	os.WriteFile(busy, nil, 0o644)
	os.Truncate(busy, 2<<30)
	dev, err := loopdev.Attach(busy, loopdev.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	_, err = ToDisk(context.Background(), busy, testOptions(t, ref))
	dev.Detach()
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("attached disk image: %v", err)
	}

	// Too small, and bad options.
	ref = writeOCILayout(t, fakeImageFiles(t, "6.12.0-x", true))
	small := filepath.Join(tmp, "small.img")
	opts = testOptions(t, ref)
	opts.Size = 600 << 20
	if _, err := ToDisk(context.Background(), small, opts); err == nil || !strings.Contains(err.Error(), "at least") {
		t.Errorf("small disk: %v", err)
	}
	assertReleased(t, small)
	for _, karg := range []string{"root=/dev/sda1", "berth.composefs=abc", "berth.local=transient", "a\nb"} {
		opts := testOptions(t, ref)
		opts.KernelArgs = []string{karg}
		if _, err := ToDisk(context.Background(), filepath.Join(tmp, "x.img"), opts); err == nil {
			t.Errorf("kernel argument %q accepted", karg)
		}
	}
	if _, err := os.Stat(filepath.Join(tmp, "x.img")); !errors.Is(err, fs.ErrNotExist) {
		t.Error("bad options still created the disk image")
	}
}

func TestHasContentAndSizes(t *testing.T) {
	tmp := t.TempDir()
	p := filepath.Join(tmp, "d")
	os.WriteFile(p, make([]byte, 2<<20), 0o644)
	if used, _, err := hasContent(p); err != nil || used {
		t.Errorf("zeroed disk: %v %v", used, err)
	}
	f, _ := os.OpenFile(p, os.O_RDWR, 0)
	f.WriteAt([]byte("EFI PART"), 512)
	f.Close()
	if used, what, _ := hasContent(p); !used || !strings.Contains(what, "GPT") {
		t.Errorf("GPT disk: %v %q", used, what)
	}
	for _, tc := range []struct{ a, b string }{{"6.12.9", "6.12.10"}, {"6.1.0-13-amd64", "6.12.0-1-amd64"}, {"5.10", "5.10.1"}} {
		if !versionLess(tc.a, tc.b) || versionLess(tc.b, tc.a) {
			t.Errorf("versionLess(%s, %s)", tc.a, tc.b)
		}
	}
	if k, _ := pickKernel([]string{"6.12.10", "6.12.9", "6.1.0"}, ""); k != "6.12.10" {
		t.Errorf("pickKernel = %s", k)
	}
	if _, err := pickKernel([]string{"6.1.0"}, "7.0"); err == nil {
		t.Error("pickKernel accepted a missing version")
	}
	if err := checkAuthorizedKeys([]byte("# c\nssh-rsa AAAA x\n")); err != nil {
		t.Error(err)
	}
	for _, bad := range []string{"", "# only a comment\n", "hello\n", "\x00\x01binary"} {
		if err := checkAuthorizedKeys([]byte(bad)); err == nil {
			t.Errorf("authorized_keys %q accepted", bad)
		}
	}
	b, _ := json.Marshal(Result{})
	if !strings.Contains(string(b), `"cmdline"`) {
		t.Error("Result JSON")
	}
}

func TestToFilesystemAndDeployImage(t *testing.T) {
	needRoot(t)
	const kver = "6.12.0-berth-test"
	ref := writeOCILayout(t, fakeImageFiles(t, kver, true))
	tmp := t.TempDir()
	// A root filesystem without a partition table: root= falls back to UUID=.
	img := filepath.Join(tmp, "root.img")
	os.WriteFile(img, nil, 0o644)
	os.Truncate(img, 1536<<20)
	const fsUUID = "0e2e0002-1111-4222-8333-444455556666"
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "verity", "-U", fsUUID, img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	dev, err := loopdev.Attach(img, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Detach()
	root, esp := filepath.Join(tmp, "root"), filepath.Join(tmp, "esp")
	os.Mkdir(root, 0o755)
	os.Mkdir(esp, 0o755)
	if _, err := ToFilesystem(context.Background(), esp, esp, testOptions(t, ref)); err == nil || !strings.Contains(err.Error(), "not a mount point") {
		t.Errorf("to-filesystem on a plain directory: %v", err)
	}
	if err := unix.Mount(dev.Path, root, "ext4", 0, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(root, 0)

	res, err := ToFilesystem(context.Background(), root, esp, testOptions(t, ref))
	if err != nil {
		t.Fatal(err)
	}
	if res.Root != "UUID="+fsUUID || !strings.HasPrefix(res.Cmdline, "root=UUID="+fsUUID+" rw ") {
		t.Errorf("root %q, cmdline %q", res.Root, res.Cmdline)
	}
	first := res.Deployment
	if _, err := os.Stat(filepath.Join(esp, "EFI/Linux/berth-"+first.ID+"+3.efi")); err != nil {
		t.Error(err)
	}

	// A second deployment of the same image from the store (what berthd
	// does on upgrade): new serial, same digest, cached initramfs, and it
	// becomes the default entry.
	oimg, err := oci.LookupImage(root, ref)
	if err != nil {
		t.Fatal(err)
	}
	opts := testOptions(t, ref)
	res2, err := DeployImage(root, esp, oimg, DeployOptions{Root: res.Root, Runtime: opts.Runtime, Progress: opts.Progress, LocalMode: "transient", Origin: "upgrade"})
	if err != nil {
		t.Fatal(err)
	}
	second := res2.Deployment
	if second.ID != "2-"+first.ComposefsDigest[:12] || second.ComposefsDigest != first.ComposefsDigest || second.Origin != "upgrade" {
		t.Errorf("second deployment %+v (first %+v)", second, first)
	}
	if !res2.InitrdCached || res2.InitrdPath != res.InitrdPath {
		t.Errorf("initramfs not reused from the cache: %+v", res2)
	}
	if !strings.HasSuffix(res2.Cmdline, " berth.local=transient") && !strings.Contains(res2.Cmdline, " berth.local=transient ") {
		t.Errorf("cmdline %q", res2.Cmdline)
	}
	e, err := bootESP(esp).Default()
	if err != nil || e == nil || e.ID != second.ID {
		t.Fatalf("default entry %+v, %v", e, err)
	}
	l := store.At(root)
	if err := deploy.Remove(l, second.ID, deploy.RemoveOptions{Default: e.ID}); err == nil {
		t.Error("removed the default deployment")
	}
	if err := deploy.Remove(l, first.ID, deploy.RemoveOptions{Default: e.ID}); err != nil {
		t.Error(err)
	}
	if ds, _ := deploy.List(l); len(ds) != 1 || ds[0].ID != second.ID {
		t.Errorf("after remove: %v", ds)
	}
}

func bootESP(dir string) boot.ESP { return boot.ESP{Dir: dir} }

func TestToDiskBtrfs(t *testing.T) {
	needRoot(t)
	if _, err := exec.LookPath("mkfs.btrfs"); err != nil {
		t.Skip("mkfs.btrfs not installed (btrfs-progs)")
	}
	const kver = "6.12.0-berth-test"
	ref := writeOCILayout(t, fakeImageFiles(t, kver, true))
	disk := filepath.Join(t.TempDir(), "disk.img")
	opts := testOptions(t, ref)
	opts.Filesystem = "btrfs"
	opts.Size = 2 << 30
	res, err := ToDisk(context.Background(), disk, opts)
	if err != nil {
		t.Fatal(err)
	}
	assertReleased(t, disk)
	start, last, _, err := partitionInfo(context.Background(), disk, 2)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := loopdev.Attach(disk, loopdev.Options{Offset: start * 512, SizeLimit: (last - start + 1) * 512, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Detach()
	mnt := t.TempDir()
	if err := unix.Mount(dev.Path, mnt, "btrfs", unix.MS_RDONLY, ""); err != nil {
		t.Fatalf("mount the root as btrfs: %v", err)
	}
	defer unix.Unmount(mnt, 0)
	d, err := deploy.Read(store.At(mnt), res.Deployment.ID)
	if err != nil {
		t.Fatal(err)
	}
	digest, err := fsverity.DigestFile(store.At(mnt).Image(d.ComposefsDigest), fsverity.SHA256)
	if err != nil || hex.EncodeToString(digest) != d.ComposefsDigest {
		t.Errorf("image digest %x (%v), deployment %s", digest, err, d.ComposefsDigest)
	}
}

func TestToDiskBlockDevice(t *testing.T) {
	needRoot(t)
	const kver = "6.12.0-berth-test"
	ref := writeOCILayout(t, fakeImageFiles(t, kver, true))
	tmp := t.TempDir()
	backing := filepath.Join(tmp, "disk.img")
	os.WriteFile(backing, nil, 0o644)
	os.Truncate(backing, 2<<30)
	dev, err := loopdev.Attach(backing, loopdev.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Detach()

	// A mounted block device is refused.
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", dev.Path).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	mnt := filepath.Join(tmp, "mnt")
	os.Mkdir(mnt, 0o755)
	if err := unix.Mount(dev.Path, mnt, "ext4", 0, ""); err != nil {
		t.Fatal(err)
	}
	opts := testOptions(t, ref)
	opts.Wipe = true
	_, err = ToDisk(context.Background(), dev.Path, opts)
	unix.Unmount(mnt, 0)
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("mounted block device: %v", err)
	}
	// The filesystem is data: --wipe is needed.
	if _, err := ToDisk(context.Background(), dev.Path, testOptions(t, ref)); err == nil || !strings.Contains(err.Error(), "--wipe") {
		t.Fatalf("block device with a filesystem, no --wipe: %v", err)
	}
	res, err := ToDisk(context.Background(), dev.Path, opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Target != dev.Path {
		t.Errorf("target %s", res.Target)
	}
	// The partition table went to the device (and so to its backing file).
	out, err := exec.Command("sgdisk", "-p", backing).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "berth-root") {
		t.Errorf("sgdisk -p %s: %v\n%s", backing, err, out)
	}
	if devs := loopDevicesBacking(dev.Path); len(devs) > 0 {
		t.Errorf("partition loop devices left on %s: %v", dev.Path, devs)
	}
}
