package install

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/store"
)

// fileDigest hashes a file's size and every data extent with its offset
// (SEEK_DATA/SEEK_HOLE), so a sparse multi-GiB disk image is hashed in
// milliseconds. It is stricter than hashing the content: a write of zeros
// into a hole changes it too.
func fileDigest(t *testing.T, p string) string {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	h := sha256.New()
	fmt.Fprintf(h, "size %d\n", fi.Size())
	var off int64
	for off < fi.Size() {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(h, "extent %d %d\n", data, hole-data)
		if _, err := io.Copy(h, io.NewSectionReader(f, data, hole-data)); err != nil {
			t.Fatal(err)
		}
		off = hole
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// dataDisk is a sparse disk image of size holding data at its start and
// end, as a used disk does.
func dataDisk(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	junk := make([]byte, 1<<20)
	rand.Read(junk)
	copy(junk[510:], []byte{0x55, 0xaa}) // an MBR signature: the disk "has a partition table"
	f.WriteAt(junk, 0)
	f.WriteAt(junk, size-int64(len(junk)))
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

// sigstorePolicy requires a sigstore signature by a fresh key for every image.
func sigstorePolicy(t *testing.T) string {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	pub := filepath.Join(dir, "cosign.pub")
	os.WriteFile(pub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
	pol, _ := json.Marshal(map[string]any{"default": []any{map[string]any{
		"type": "sigstoreSigned", "keyPath": pub, "signedIdentity": map[string]any{"type": "matchRepoDigestOrExact"},
	}}})
	p := filepath.Join(dir, "policy.json")
	os.WriteFile(p, pol, 0o644)
	return p
}

const goodKver = "6.12.57+deb13-amd64"

// TestInstallRefusalsLeaveTargetUntouched: every refusal of the image or
// of this machine comes before the first write to the target disk, which
// keeps every byte (the refusals of issue 11: a typo must never cost a
// disk), the error names the problem, nothing stays attached or mounted,
// and the staging store is gone.
func TestInstallRefusalsLeaveTargetUntouched(t *testing.T) {
	needRoot(t)
	debian := func(files map[string][]byte, release string) map[string][]byte {
		files["etc/os-release"] = []byte(release)
		return files
	}
	withoutBoot := func(files map[string][]byte, stub, sdboot bool) map[string][]byte {
		for p := range files {
			if stub && strings.HasSuffix(p, ".efi.stub") || sdboot && strings.Contains(p, "systemd-boot") {
				delete(files, p)
			}
		}
		return files
	}
	bookworm := "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n"
	ubuntu := "PRETTY_NAME=\"Ubuntu 24.04 LTS\"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID=\"24.04\"\n"
	noVerityConfig := func(files map[string][]byte) map[string][]byte {
		files["boot/config-"+goodKver] = []byte("CONFIG_EROFS_FS=m\nCONFIG_OVERLAY_FS=m\n# CONFIG_FS_VERITY is not set\nCONFIG_EXT4_FS=y\n")
		return files
	}
	cases := []struct {
		name     string
		ref      func(t *testing.T) string // "" image: a good one
		disk     int64                     // target size (default 4 GiB)
		opts     func(o *Options)
		want     []string
		errCheck func(error) bool
	}{
		{name: "missing image", ref: func(*testing.T) string { return "oci:/no/such/layout:v1" },
			want: []string{"/no/such/layout"}},
		{name: "unsigned image, policy requires signatures",
			opts: func(o *Options) { o.PolicyPath = sigstorePolicy(t) },
			want: []string{"rejected by the signature policy"}},
		{name: "image without a kernel",
			ref:      func(t *testing.T) string { return writeOCILayout(t, fakeImageFiles(t, goodKver, false)) },
			want:     []string{"no kernel", "RUN apt-get update && apt-get install -y linux-image-amd64"},
			errCheck: func(err error) bool { var nk *oci.NoKernelError; return errors.As(err, &nk) }},
		{name: "ubuntu image without a kernel",
			ref: func(t *testing.T) string {
				return writeOCILayout(t, debian(fakeImageFiles(t, goodKver, false), ubuntu))
			},
			want: []string{"no kernel", "linux-image-generic"}},
		{name: "kernel too old (bookworm 6.1)",
			ref: func(t *testing.T) string {
				return writeOCILayout(t, debian(fakeImageFiles(t, "6.1.0-27-amd64", true), bookworm))
			},
			want: []string{"6.1.0-27-amd64", "Linux 6.1", "overlayfs data-only lower layers (Linux 6.5)", "overlayfs verity= (Linux 6.6)", "Linux 6.6 or newer",
				"-t bookworm-backports linux-image-amd64", "deb http://deb.debian.org/debian bookworm-backports main"},
			errCheck: func(err error) bool { var ke *KernelError; return errors.As(err, &ke) }},
		{name: "kernel without CONFIG_FS_VERITY",
			ref:  func(t *testing.T) string { return writeOCILayout(t, noVerityConfig(fakeImageFiles(t, goodKver, true))) },
			want: []string{"CONFIG_FS_VERITY", "boot/config-" + goodKver}},
		{name: "no such --kver",
			opts: func(o *Options) { o.Kernel = "6.99.0-1-amd64" },
			want: []string{"no kernel 6.99.0-1-amd64", goodKver}},
		{name: "no systemd-stub in the image or on the host",
			ref: func(t *testing.T) string {
				return writeOCILayout(t, withoutBoot(fakeImageFiles(t, goodKver, true), true, true))
			},
			opts: func(o *Options) { o.HostRoot = t.TempDir() },
			want: []string{"neither the image nor this machine has systemd-stub"}},
		{name: "no systemd-boot in the image or on the host",
			ref: func(t *testing.T) string {
				return writeOCILayout(t, withoutBoot(fakeImageFiles(t, goodKver, true), false, true))
			},
			opts: func(o *Options) { o.HostRoot = t.TempDir() },
			want: []string{"neither the image nor this machine has systemd-boot", "systemd-boot-efi"}},
		{name: "target too small", disk: 1 << 30,
			want: []string{"is 1024 MiB; this image needs at least", "--size"}},
	}
	good := writeOCILayout(t, fakeImageFiles(t, goodKver, true))
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ref := good
			if tc.ref != nil {
				ref = tc.ref(t)
			}
			size := tc.disk
			if size == 0 {
				size = 4 << 30
			}
			disk := dataDisk(t, size)
			before := fileDigest(t, disk)
			opts := testOptions(t, ref)
			opts.Wipe = true
			opts.StagingDir = t.TempDir()
			if tc.opts != nil {
				tc.opts(&opts)
			}
			_, err := ToDisk(context.Background(), disk, opts)
			if err == nil {
				t.Fatal("installed; want a refusal")
			}
			t.Logf("refused: %v", err)
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("the error does not say %q", w)
				}
			}
			if tc.errCheck != nil && !tc.errCheck(err) {
				t.Errorf("error type %T", err)
			}
			if after := fileDigest(t, disk); after != before {
				t.Errorf("the refused install changed the target")
			}
			assertReleased(t, disk)
			if ents, _ := os.ReadDir(opts.StagingDir); len(ents) != 0 {
				t.Errorf("staging directory left: %v", ents)
			}
		})
	}

	// A refused install to a disk image that does not exist creates none.
	missing := filepath.Join(t.TempDir(), "new.img")
	opts := testOptions(t, "oci:/no/such/layout:v1")
	opts.StagingDir = t.TempDir()
	if _, err := ToDisk(context.Background(), missing, opts); err == nil {
		t.Fatal("installed a missing image")
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused install created %s: %v", missing, err)
	}
}

// TestToFilesystemRefusalLeavesTargetUntouched: to-filesystem checks the
// image in the staging store too; the mounted root gets no berth/ at all.
func TestToFilesystemRefusalLeavesTargetUntouched(t *testing.T) {
	needRoot(t)
	ref := writeOCILayout(t, debian12(fakeImageFiles(t, "6.1.0-27-amd64", true)))
	root := t.TempDir()
	img := filepath.Join(t.TempDir(), "root.img")
	os.WriteFile(img, nil, 0o644)
	os.Truncate(img, 256<<20)
	if out, err := runCmd("mkfs.ext4", "-q", "-F", "-b", "4096", img); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	if out, err := runCmd("mount", "-o", "loop", img, root); err != nil {
		t.Fatalf("mount: %v\n%s", err, out)
	}
	defer unix.Unmount(root, unix.MNT_DETACH)
	esp := t.TempDir()
	opts := testOptions(t, ref)
	opts.StagingDir = t.TempDir()
	_, err := ToFilesystem(context.Background(), root, esp, opts)
	if err == nil || !strings.Contains(err.Error(), "too old") {
		t.Fatalf("to-filesystem with a 6.1 kernel: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, "berth")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused install wrote %s/berth", root)
	}
	if ents, _ := os.ReadDir(esp); len(ents) != 0 {
		t.Errorf("the refused install wrote to the ESP: %v", ents)
	}
	// A staging directory on the target filesystem would be written
	// before the checks: refused.
	opts.StagingDir = root
	if _, err := ToFilesystem(context.Background(), root, esp, opts); err == nil || !strings.Contains(err.Error(), "on the target filesystem") {
		t.Errorf("staging on the target: %v", err)
	}
}

func debian12(files map[string][]byte) map[string][]byte {
	files["etc/os-release"] = []byte("ID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n")
	return files
}

// TestPreflightPicksKernel: with two kernels the newest is checked and
// booted, --kver picks the other; both are checked for their version.
func TestPreflightPicksKernel(t *testing.T) {
	files := fakeImageFiles(t, "6.12.57+deb13-amd64", true)
	for p, b := range fakeImageFiles(t, "6.6.15-amd64", true) {
		files[p] = b
	}
	for p, b := range fakeImageFiles(t, "6.1.0-27-amd64", true) {
		files[p] = b
	}
	ref := writeOCILayout(t, files)
	sysroot := t.TempDir()
	opts := testOptions(t, ref)
	img, err := oci.Pull(context.Background(), ref, oci.PullOptions{Sysroot: sysroot, PolicyPath: opts.PolicyPath})
	if err != nil {
		t.Fatal(err)
	}
	l := store.At(sysroot)
	for _, tc := range []struct{ kver, want, err string }{
		{"", "6.12.57+deb13-amd64", ""},
		{"6.6.15-amd64", "6.6.15-amd64", ""},
		{"6.1.0-27-amd64", "", "too old"},
	} {
		c, err := checkImage(l, img, checkOpts{Kernel: tc.kver, Runtime: opts.Runtime})
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("--kver %q: %v, want %q", tc.kver, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("--kver %q: %v", tc.kver, err)
		case tc.err == "" && c.kver != tc.want:
			t.Errorf("--kver %q picked %s, want %s", tc.kver, c.kver, tc.want)
		case tc.err == "" && len(c.linux) == 0:
			t.Errorf("--kver %q: no kernel image read", tc.kver)
		}
	}
	// --skip-kernel-check lets the old one through (the config check stays).
	if c, err := checkImage(l, img, checkOpts{Kernel: "6.1.0-27-amd64", SkipKernelCheck: true, Runtime: opts.Runtime}); err != nil || c.kver != "6.1.0-27-amd64" {
		t.Errorf("--skip-kernel-check: %v", err)
	}
	// --insecure-no-verity needs only the data-only layers (6.5).
	files = fakeImageFiles(t, "6.5.0-1", true)
	ref = writeOCILayout(t, files)
	img, err = oci.Pull(context.Background(), ref, oci.PullOptions{Sysroot: sysroot, PolicyPath: opts.PolicyPath})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := checkImage(l, img, checkOpts{Runtime: opts.Runtime}); err == nil || !strings.Contains(err.Error(), "verity=") || strings.Contains(err.Error(), "data-only") {
		t.Errorf("6.5 with verity: %v", err)
	}
	if _, err := checkImage(l, img, checkOpts{InsecureNoVerity: true, Runtime: opts.Runtime}); err != nil {
		t.Errorf("6.5 without verity: %v", err)
	}
}

func TestParseKernelVersion(t *testing.T) {
	for _, tc := range []struct {
		in           string
		major, minor int
	}{
		{"6.1.0-27-amd64", 6, 1}, {"6.12.57+deb13-amd64", 6, 12}, {"6.11.4-301.fc41.x86_64", 6, 11},
		{"6.8.0-45-generic", 6, 8}, {"6.10.10-arch1-1", 6, 10}, {"5.14.0-427.el9.x86_64", 5, 14}, {"6.6", 6, 6},
		{"6.12-rc1", 6, 12}, {"6.12.0", 6, 12}, {"10.0.1", 10, 0},
	} {
		v, err := parseKernelVersion(tc.in)
		if err != nil || v.major != tc.major || v.minor != tc.minor {
			t.Errorf("%q: %+v %v", tc.in, v, err)
		}
	}
	for _, bad := range []string{"", "linux", "6", "6.", ".6.1", "6.x", "1.2.3", "99999.1", "6.1234", "../../etc", "6.1\x00", "v6.1",
		strings.Repeat("6.1", 1000), "\xff\xfe"} {
		if v, err := parseKernelVersion(bad); err == nil {
			t.Errorf("%q parsed as %+v", bad, v)
		}
	}
	// The refusal quotes a hostile string instead of printing it raw.
	err := checkKernelVersion("evil\n\x1b[2Jversion", osRelease{}, "amd64", true)
	if err == nil || strings.ContainsAny(err.Error(), "\n\x1b") {
		t.Errorf("hostile version: %q", err)
	}
}

func TestKernelHintsByDistribution(t *testing.T) {
	for _, tc := range []struct {
		osrel, arch, want string
	}{
		{"ID=debian\n", "amd64", "RUN apt-get update && apt-get install -y linux-image-amd64"},
		{"ID=debian\n", "arm64", "RUN apt-get update && apt-get install -y linux-image-arm64"},
		{"ID=raspbian\nID_LIKE=debian\n", "arm64", "linux-image-arm64"},
		{"ID=ubuntu\nID_LIKE=debian\n", "amd64", "RUN apt-get update && apt-get install -y linux-image-generic"},
		{"ID=fedora\n", "amd64", "RUN dnf install -y kernel"},
		{"ID=\"rhel\"\nID_LIKE=\"fedora\"\n", "amd64", "RUN dnf install -y kernel"},
		{"ID=\"centos\"\nID_LIKE=\"rhel fedora\"\n", "arm64", "RUN dnf install -y kernel"},
		{"ID=arch\n", "amd64", "RUN pacman -Syu --noconfirm linux"},
		{"ID=alpine\n", "amd64", "install the distribution's kernel package"},
		{"", "amd64", "install the distribution's kernel package"},
	} {
		err := noKernelError(parseOSRelease([]byte(tc.osrel)), tc.arch, &oci.NoKernelError{})
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q %s: %v; want %q", tc.osrel, tc.arch, err, tc.want)
		}
	}
	for _, tc := range []struct{ osrel, kver, want string }{
		{"ID=debian\nVERSION_CODENAME=bookworm\n", "6.1.0-27-arm64", "-t bookworm-backports linux-image-arm64"},
		{"ID=ubuntu\nVERSION_ID=22.04\n", "5.15.0-1-generic", "linux-image-generic-hwe-22.04"},
		{"ID=centos\nID_LIKE=\"rhel fedora\"\n", "5.14.0-427.el9.x86_64", "--skip-kernel-check"},
		{"ID=fedora\n", "6.2.9-300.fc38.x86_64", "dnf upgrade -y kernel"},
	} {
		arch := "amd64"
		if strings.Contains(tc.kver, "arm64") {
			arch = "arm64"
		}
		err := checkKernelVersion(tc.kver, parseOSRelease([]byte(tc.osrel)), arch, true)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v; want %q", tc.kver, err, tc.want)
		}
	}
	if err := checkKernelVersion("6.6.0", osRelease{}, "amd64", true); err != nil {
		t.Errorf("6.6: %v", err)
	}
}

func runCmd(name string, args ...string) ([]byte, error) {
	return exec.Command(name, args...).CombinedOutput()
}

// TestStagingOutOfSpaceLeavesTargetUntouched: a staging directory with
// too little room is refused before the pull, and one that fills up
// during the pull gives an error that says what to do; the target keeps
// every byte either way.
func TestStagingOutOfSpaceLeavesTargetUntouched(t *testing.T) {
	needRoot(t)
	files := fakeImageFiles(t, goodKver, true)
	big := make([]byte, 24<<20)
	rand.Read(big)
	files["usr/share/big"] = big
	ref := writeOCILayout(t, files)
	small := t.TempDir()
	if err := unix.Mount("tmpfs", small, "tmpfs", 0, "size=16m"); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(small, unix.MNT_DETACH)
	disk := dataDisk(t, 4<<30)
	before := fileDigest(t, disk)
	opts := testOptions(t, ref)
	opts.Wipe, opts.StagingDir = true, small

	_, err := ToDisk(context.Background(), disk, opts)
	if err == nil || !strings.Contains(err.Error(), "staging directory "+small+" has 16 MiB free") || !strings.Contains(err.Error(), "--staging-dir") {
		t.Errorf("16 MiB staging directory: %v", err)
	}
	defer func(v int64) { minStagingFree = v }(minStagingFree)
	minStagingFree = 1 << 20
	_, err = ToDisk(context.Background(), disk, opts)
	if err == nil || !strings.Contains(err.Error(), "ran out of space") || !strings.Contains(err.Error(), "nothing was written to the target") {
		t.Errorf("staging directory filling up: %v", err)
	}
	t.Logf("refused: %v", err)
	if fileDigest(t, disk) != before {
		t.Error("the refused install changed the target")
	}
	if ents, _ := os.ReadDir(small); len(ents) != 0 {
		t.Errorf("staging directory left: %v", ents)
	}
	assertReleased(t, disk)
}
