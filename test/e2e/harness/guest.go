package harness

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/berth-dev/berth/internal/fsutil"
)

// Recipe names one guest image of the lane: a package list under test/guest, the Debian
// suite, extra apt sources and a customize hook. All of it is in the recipe hash
// (build-rootfs.sh), so changing any part rebuilds the image.
type Recipe struct {
	Name     string   // cache name: <CacheDir>/<Name>-rootfs, images/<Name>-<hash>.oci.tar
	Packages string   // package list file, relative to test/guest
	Suite    string   // Debian suite; "" = trixie
	Sources  []string // extra apt source lines for the build (e.g. backports)
	Hook     string   // customize hook script in test/guest, run with the rootfs as $1
}

// The guest images of the lane.
var (
	Trixie  = Recipe{Name: "trixie", Packages: "packages.txt"}
	Variant = Recipe{Name: "trixie-variant", Packages: "packages-variant.txt"}
	// Bookworm is Debian 12 (systemd 252) with its stock 6.1 kernel and the 6.12 kernel of
	// bookworm-backports; berth boots the newest.
	Bookworm = Recipe{Name: "bookworm", Packages: "packages-bookworm.txt", Suite: "bookworm",
		Sources: []string{"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main"},
		Hook:    "hook-bookworm.sh"}
	// Bootc is a bootc-style trixie: kernel only in /usr/lib/modules, empty /boot, no
	// initramfs generator, no systemd-boot-efi, no SSH server.
	Bootc = Recipe{Name: "trixie-bootc", Packages: "packages-bootc.txt", Hook: "hook-bootc.sh"}
	// TwoKernel is trixie with two kernel flavours.
	TwoKernel = Recipe{Name: "trixie-twokernel", Packages: "packages-twokernel.txt"}
	// AllRecipes is what `mkguest -recipe all` builds.
	AllRecipes = []Recipe{Trixie, Variant, Bookworm, Bootc, TwoKernel}
)

// suite is the recipe's Debian suite.
func (r Recipe) suite() string {
	if r.Suite == "" {
		return "trixie"
	}
	return r.Suite
}

// env is the build-rootfs.sh environment of the recipe.
func (r Recipe) env() []string {
	env := append(os.Environ(), "SUITE="+r.suite(), "SOURCES="+strings.Join(r.Sources, "\n"), "HOOK="+r.Hook)
	return env
}

// GuestImage is a built guest: its root filesystem directory and its OCI archive.
type GuestImage struct {
	Recipe   Recipe
	Hash     string // recipe hash (build-rootfs.sh)
	Rootfs   string
	Archive  string // oci-archive file
	Packages []string
	Pack     PackResult
}

// Ref is the image reference berth takes for the archive.
func (g *GuestImage) Ref() string { return "oci-archive:" + g.Archive }

// Kernel returns the kernel version directory under the rootfs's /usr/lib/modules.
func (g *GuestImage) Kernel() (string, error) { return KernelVersion(g.Rootfs) }

// KernelVersion returns the one kernel version under rootfs/usr/lib/modules.
func KernelVersion(rootfs string) (string, error) {
	kvers, err := KernelVersions(rootfs)
	if err != nil {
		return "", err
	}
	if len(kvers) != 1 {
		return "", fmt.Errorf("find kernel in %s: want one kernel, found %v", rootfs, kvers)
	}
	return kvers[0], nil
}

// KernelVersions returns the kernel version directories under rootfs/usr/lib/modules, sorted.
func KernelVersions(rootfs string) ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(rootfs, "usr/lib/modules"))
	if err != nil {
		return nil, fmt.Errorf("find kernel in %s: %w", rootfs, err)
	}
	var kvers []string
	for _, e := range ents {
		if e.IsDir() {
			kvers = append(kvers, e.Name())
		}
	}
	return kvers, nil
}

// RepoRoot finds the berth source tree (the directory with go.mod) from the working
// directory upwards; BERTH_SRC overrides.
func RepoRoot() (string, error) {
	if d := os.Getenv("BERTH_SRC"); d != "" {
		return d, nil
	}
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil && strings.Contains(string(b), "module github.com/berth-dev/berth\n") {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", errors.New("berth source tree (go.mod) not found above the working directory; set BERTH_SRC")
		}
		d = parent
	}
}

// CacheDir is where guest root filesystems and images are cached (BERTH_E2E_CACHE,
// default /var/cache/berth-e2e).
func CacheDir() string {
	if d := os.Getenv("BERTH_E2E_CACHE"); d != "" {
		return d
	}
	return "/var/cache/berth-e2e"
}

// ReadPackageList returns the packages of a package list file (comments and blanks dropped).
func ReadPackageList(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("package list: %w", err)
	}
	defer f.Close()
	var pkgs []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.ContainsAny(line, " \t,") {
			return nil, fmt.Errorf("package list %s: one package per line, got %q", path, line)
		}
		pkgs = append(pkgs, line)
	}
	return pkgs, sc.Err()
}

// EnsureRootfs builds (or reuses) the recipe's root filesystem with test/guest/build-rootfs.sh.
func EnsureRootfs(ctx context.Context, r Recipe, log io.Writer) (rootfs, hash string, err error) {
	src, err := RepoRoot()
	if err != nil {
		return "", "", err
	}
	script := filepath.Join(src, "test/guest/build-rootfs.sh")
	pkgs := filepath.Join(src, "test/guest", r.Packages)
	hc := exec.CommandContext(ctx, "bash", script, "--hash", pkgs)
	hc.Env = r.env()
	out, err := hc.Output()
	if err != nil {
		return "", "", fmt.Errorf("recipe hash of %s: %w", r.Name, err)
	}
	hash = strings.TrimSpace(string(out))
	rootfs = filepath.Join(CacheDir(), r.Name+"-rootfs")
	if b, err := os.ReadFile(filepath.Join(rootfs, ".recipe")); err == nil && strings.TrimSpace(string(b)) == hash {
		return rootfs, hash, nil
	}
	if _, err := exec.LookPath("mmdebstrap"); err != nil {
		return "", "", fmt.Errorf("guest %s: rootfs not cached and mmdebstrap is not installed (apt-get install mmdebstrap)", r.Name)
	}
	// mmdebstrap of a trixie rootfs takes ~90 s here; 30 minutes covers a slow mirror.
	cmd := exec.CommandContext(ctx, "timeout", "-k", "10", "1800", "bash", script, rootfs, pkgs)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.Env = r.env()
	if err := cmd.Run(); err != nil {
		return "", "", fmt.Errorf("build guest rootfs %s: %w", r.Name, err)
	}
	return rootfs, hash, nil
}

// EnsureImage builds (or reuses) the recipe's root filesystem and its OCI archive, cached
// by the recipe hash and PackVersion.
func EnsureImage(ctx context.Context, r Recipe, log io.Writer) (*GuestImage, error) {
	rootfs, hash, err := EnsureRootfs(ctx, r, log)
	if err != nil {
		return nil, err
	}
	src, _ := RepoRoot()
	pkgs, err := ReadPackageList(filepath.Join(src, "test/guest", r.Packages))
	if err != nil {
		return nil, err
	}
	g := &GuestImage{Recipe: r, Hash: hash, Rootfs: rootfs, Packages: pkgs}
	dir := filepath.Join(CacheDir(), "images")
	g.Archive = filepath.Join(dir, fmt.Sprintf("%s-%s-%s.oci.tar", r.Name, hash, PackVersion))
	meta := g.Archive + ".json"
	if b, err := os.ReadFile(meta); err == nil {
		if err := json.Unmarshal(b, &g.Pack); err == nil {
			if st, err := os.Stat(g.Archive); err == nil && st.Size() == g.Pack.Size {
				return g, nil
			}
		}
	}
	start := time.Now()
	res, err := PackOCIArchive(rootfs, g.Archive, PackOptions{
		RefName: r.Name,
		Skip:    []string{".recipe"},
		Labels: map[string]string{
			"org.opencontainers.image.title":       "berth e2e guest " + r.Name,
			"org.opencontainers.image.description": "standard Debian " + r.suite() + " (" + strings.Join(pkgs, " ") + ")",
			"dev.berth.e2e.recipe":                 hash,
		},
	})
	if err != nil {
		return nil, err
	}
	g.Pack = *res
	b, _ := json.MarshalIndent(res, "", "  ")
	if err := fsutil.WriteFileAtomic(meta, b, 0o644); err != nil {
		return nil, err
	}
	fmt.Fprintf(log, "guest image %s: packed %s (%d MB, %d layers) in %.1fs\n", r.Name, g.Archive, res.Size>>20, len(res.Layers), time.Since(start).Seconds())
	// Older archives of the same recipe are stale now.
	stale := regexp.MustCompile(`^` + regexp.QuoteMeta(r.Name) + `-[0-9a-f]{16}-`)
	old, _ := filepath.Glob(filepath.Join(dir, "*.oci.tar*"))
	for _, o := range old {
		if o != g.Archive && o != meta && stale.MatchString(filepath.Base(o)) {
			os.Remove(o)
		}
	}
	return g, nil
}
