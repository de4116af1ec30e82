package install

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"regexp"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/oci"
)

// The kernel features berth's composefs root needs, with the mainline
// Linux release that brought each (Documentation/filesystems/overlayfs.rst
// documents both; distributions may backport them):
//
//   - overlayfs data-only lower layers ("lowerdir=meta::objects", later
//     also "datadir+"): Linux 6.5, "ovl: introduce data-only lower layers"
//     (commit 37ebf056d6cf, overlayfs.rst "Data-only lower layers");
//   - overlayfs verity= (fs-verity digests in trusted.overlay.metacopy,
//     checked when a file is opened): Linux 6.6, the overlayfs merge
//     63580f669d7f (overlayfs.rst "Verity support"; composefs/composefs#147
//     tracks both; CentOS Stream 9's backport, MR 3013, cites "data-only
//     lower layers (landed in 6.5)" and "fs-verity validated metacopy
//     (landed in 6.6rc1)").
//
// EROFS (Linux 5.4) and the chunked files composefs images use (5.15) are
// older, and internal/composefs falls back to a loop device before 6.12
// (file-backed EROFS) and to "::" before lowerdir+/datadir+.
type kernelFeature struct {
	name         string
	major, minor int
	verity       bool // only needed when the root is verified (not --insecure-no-verity)
}

var kernelFeatures = []kernelFeature{
	{name: "overlayfs data-only lower layers", major: 6, minor: 5},
	{name: "overlayfs verity=", major: 6, minor: 6, verity: true},
}

// kernelVersion is the upstream version at the start of a kernel release
// string (uname -r): "6.1.0-27-amd64", "6.12.57+deb13-amd64",
// "6.11.4-301.fc41.x86_64".
type kernelVersion struct{ major, minor, patch int }

func (v kernelVersion) String() string { return fmt.Sprintf("%d.%d", v.major, v.minor) }

func (v kernelVersion) less(major, minor int) bool {
	return v.major < major || v.major == major && v.minor < minor
}

var kernelVersionRE = regexp.MustCompile(`^([0-9]{1,3})\.([0-9]{1,3})(?:\.([0-9]{1,6}))?(?:$|[-+_.~a-zA-Z])`)

// parseKernelVersion reads the version at the start of a kernel release
// string; anything else is an error that quotes it.
func parseKernelVersion(s string) (kernelVersion, error) {
	if len(s) > 200 {
		return kernelVersion{}, fmt.Errorf("kernel version %.40q… is %d bytes long", s, len(s))
	}
	m := kernelVersionRE.FindStringSubmatch(s)
	if m == nil {
		return kernelVersion{}, fmt.Errorf("cannot read a Linux version (MAJOR.MINOR…) from the kernel version %q", s)
	}
	var v kernelVersion
	v.major, _ = strconv.Atoi(m[1])
	v.minor, _ = strconv.Atoi(m[2])
	if m[3] != "" {
		v.patch, _ = strconv.Atoi(m[3])
	}
	if v.major < 2 {
		return kernelVersion{}, fmt.Errorf("kernel version %q does not look like Linux", s)
	}
	return v, nil
}

// KernelError refuses the image's kernel: there is none, berth cannot
// boot it, or its configuration lacks what berth needs. Fix says what to
// change in the image.
type KernelError struct {
	Problem string
	Fix     string
	err     error // *oci.NoKernelError when there is no kernel
}

func (e *KernelError) Error() string {
	if e.Fix == "" {
		return e.Problem
	}
	return e.Problem + "; " + e.Fix
}

func (e *KernelError) Unwrap() error { return e.err }

// osRelease is what berth reads from the image's os-release.
type osRelease struct {
	id, versionID, codename, pretty string
	idLike                          []string
}

func parseOSRelease(b []byte) osRelease {
	var o osRelease
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), "=")
		if !ok || strings.HasPrefix(k, "#") {
			continue
		}
		if uq, err := strconv.Unquote(v); err == nil {
			v = uq
		} else {
			v = strings.Trim(v, `"'`)
		}
		switch k {
		case "ID":
			o.id = strings.ToLower(v)
		case "ID_LIKE":
			o.idLike = strings.Fields(strings.ToLower(v))
		case "VERSION_ID":
			o.versionID = v
		case "VERSION_CODENAME":
			o.codename = strings.ToLower(v)
		case "PRETTY_NAME":
			o.pretty = v
		}
	}
	return o
}

// family is the distribution family that decides how a kernel is
// installed: "debian", "ubuntu", "fedora" (Fedora, RHEL and relatives),
// "arch", or "".
func (o osRelease) family() string {
	ids := append([]string{o.id}, o.idLike...)
	for _, id := range ids {
		switch id {
		case "ubuntu":
			return "ubuntu"
		case "debian":
			return "debian"
		case "fedora", "rhel", "centos", "rocky", "almalinux":
			return "fedora"
		case "arch", "archlinux":
			return "arch"
		}
	}
	return ""
}

func (o osRelease) name() string {
	if o.pretty != "" {
		return o.pretty
	}
	if o.id != "" {
		return o.id + " " + o.versionID
	}
	return "the image"
}

// debianArch maps an OCI architecture to Debian's kernel flavour.
func debianArch(arch string) string {
	switch arch {
	case "", "amd64":
		return "amd64"
	case "arm64":
		return "arm64"
	}
	return "$(dpkg --print-architecture)"
}

// installKernelLine is the Containerfile line that adds the distribution's kernel.
func installKernelLine(o osRelease, arch string) string {
	switch o.family() {
	case "debian":
		return "RUN apt-get update && apt-get install -y linux-image-" + debianArch(arch)
	case "ubuntu":
		return "RUN apt-get update && apt-get install -y linux-image-generic"
	case "fedora":
		return "RUN dnf install -y kernel"
	case "arch":
		return "RUN pacman -Syu --noconfirm linux"
	}
	return ""
}

func noKernelError(o osRelease, arch string, nk *oci.NoKernelError) error {
	e := &KernelError{
		Problem: "the image contains no kernel (berth looks for /usr/lib/modules/$kver/vmlinuz and /boot/vmlinuz-$kver)",
		err:     nk,
	}
	if line := installKernelLine(o, arch); line != "" {
		e.Fix = fmt.Sprintf("add one to the image (%s): `%s`", o.name(), line)
	} else {
		e.Fix = "install the distribution's kernel package in the image, e.g. Debian: `RUN apt-get update && apt-get install -y linux-image-" + debianArch(arch) +
			"`, Ubuntu: linux-image-generic, Fedora: `RUN dnf install -y kernel`, Arch: `RUN pacman -Syu --noconfirm linux`"
	}
	return e
}

// newerKernelHint says how to get a kernel that is new enough.
func newerKernelHint(o osRelease, arch, kver string) string {
	switch o.family() {
	case "debian":
		if o.codename == "bookworm" || o.versionID == "12" {
			return "Debian 12 (bookworm) has a newer kernel in bookworm-backports: " +
				"`RUN echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/backports.list && apt-get update && apt-get install -y -t bookworm-backports linux-image-" + debianArch(arch) +
				"` (berth boots the newest kernel of the image), or build on Debian 13 (trixie)"
		}
		return "install a newer kernel (Debian 13 trixie has 6.12: `RUN apt-get update && apt-get install -y linux-image-" + debianArch(arch) + "`)"
	case "ubuntu":
		return "use Ubuntu 24.04 or newer (6.8), or the HWE kernel of 22.04: `RUN apt-get update && apt-get install -y linux-image-generic-hwe-22.04`"
	case "fedora":
		if strings.Contains(kver, ".el") {
			return "a RHEL/CentOS kernel may carry these features as backports that its version number does not show (RHEL 9.6 does); if this one does, pass --skip-kernel-check, otherwise install a newer kernel"
		}
		return "update the kernel: `RUN dnf upgrade -y kernel` (Fedora 39 and newer ship 6.6 or later)"
	case "arch":
		return "update the kernel: `RUN pacman -Syu --noconfirm linux`"
	}
	return "install a newer kernel in the image"
}

// checkKernelVersion refuses a kernel older than the features need.
func checkKernelVersion(kver string, o osRelease, arch string, verity bool) error {
	v, err := parseKernelVersion(kver)
	if err != nil {
		return &KernelError{Problem: err.Error(), Fix: "pass --skip-kernel-check if this kernel is known to have overlayfs data-only lower layers and verity= (Linux 6.6)"}
	}
	var missing []string
	minMajor, minMinor := 0, 0
	for _, f := range kernelFeatures {
		if f.verity && !verity {
			continue
		}
		if f.major > minMajor || f.major == minMajor && f.minor > minMinor {
			minMajor, minMinor = f.major, f.minor
		}
		if v.less(f.major, f.minor) {
			missing = append(missing, fmt.Sprintf("%s (Linux %d.%d)", f.name, f.major, f.minor))
		}
	}
	if len(missing) == 0 {
		return nil
	}
	return &KernelError{
		Problem: fmt.Sprintf("the image's kernel %s (Linux %s) is too old for berth's composefs root: it lacks %s; berth needs Linux %d.%d or newer",
			kver, v, strings.Join(missing, " and "), minMajor, minMinor),
		Fix: newerKernelHint(o, arch, kver),
	}
}

// kernelConfigPaths are where images ship the kernel's build configuration.
func kernelConfigPaths(kver string) []string {
	return []string{"boot/config-" + kver, "usr/lib/modules/" + kver + "/config", "lib/modules/" + kver + "/config"}
}

// checkKernelConfig refuses a kernel whose configuration (when the image
// ships it) lacks an option berth needs, built in or as a module. rootFS
// is the root filesystem type ("" when not known).
func checkKernelConfig(fsys fs.FS, kver string, verity bool, rootFS string) error {
	var cfg []byte
	var from string
	for _, p := range kernelConfigPaths(kver) {
		b, err := fsutil.ReadFileFS(fsys, p, 4<<20)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("kernel configuration %s: %w", p, err)
		}
		cfg, from = b, p
		break
	}
	if cfg == nil {
		return nil // not shipped: the version check is all there is
	}
	set := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(cfg))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && strings.HasPrefix(k, "CONFIG_") {
			set[k] = v
		}
	}
	want := []string{"CONFIG_EROFS_FS", "CONFIG_OVERLAY_FS"}
	if verity {
		want = append(want, "CONFIG_FS_VERITY")
	}
	switch rootFS {
	case "ext4":
		want = append(want, "CONFIG_EXT4_FS")
	case "btrfs":
		want = append(want, "CONFIG_BTRFS_FS")
	}
	var missing []string
	for _, k := range want {
		if v := set[k]; v != "y" && v != "m" {
			missing = append(missing, k)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	return &KernelError{
		Problem: fmt.Sprintf("the image's kernel %s is built without %s (/%s): berth's root needs each built in or as a module",
			kver, strings.Join(missing, ", "), from),
		Fix: "use the distribution's standard kernel package, or enable them (=y or =m) in a custom kernel",
	}
}
