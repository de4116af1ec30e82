// Package setuproot turns a mounted physical root filesystem into the
// verified composefs root of one berth deployment (DESIGN §5 steps 3-7).
//
// It is shared by berth-init as PID 1 of berth's own initramfs and by
// "berth-init setup-root /sysroot" in a systemd (dracut) initrd. In both,
// the physical root is already mounted at Sysroot; Setup verifies the
// image, mounts it with the deployment's writable layer and the shared
// state, and leaves the result mounted at Sysroot with the physical root
// below it at /sysroot (the ostree-prepare-root arrangement, which works
// with systemd's own sysroot.mount).
package setuproot

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/store"
)

// Error is a boot failure explained for the console: what is wrong and
// what the user can do about it.
type Error struct {
	Reason string
	Fix    string
	Err    error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Reason + ": " + e.Err.Error()
	}
	return e.Reason
}

func (e *Error) Unwrap() error { return e.Err }

// PrepareFunc does a deployment's first-boot work on the physical root
// (mounted read-write at physRoot) before its overlay is mounted: the
// pending /etc 3-way merge and carry-over of local changes write the
// deployment's upper layer, which overlayfs must not see change under a
// mount. local is the mode the deployment boots in. It must be
// idempotent (a power cut reruns it at the next boot). berth-init wires
// it to etcmerge.Prepare; nil skips the step.
type PrepareFunc func(physRoot, deployID string, local cmdline.LocalMode) error

// Measurer extends the berth PCR with the deployment and appends to the
// event log (DESIGN §5 step 7; the trust-chain work implements it). It
// runs after the root is in place, before switch_root. nil skips it.
type Measurer interface {
	MeasureDeployment(rec *BootRecord) error
}

// Options configures Setup.
type Options struct {
	// Sysroot is where the physical root filesystem is mounted
	// ("/sysroot"); it must be a mount point.
	Sysroot string
	Args    *cmdline.Args
	// Console receives progress and warnings (os.Stderr when nil).
	Console io.Writer
	// RunDir holds berth's runtime state and staging mounts ("/run/berth").
	RunDir string
	// RootDevice is recorded in boot.json (berth-init knows it; the
	// systemd path leaves it empty).
	RootDevice string
	// Shared lists the state directories bound over the root (DESIGN §5);
	// nil means store.SharedNames().
	Shared []string
	// PerDeployment lists paths below shared directories that stay with
	// the deployment (package databases); nil means store.PerDeployment.
	PerDeployment []string

	Prepare  PrepareFunc
	Measurer Measurer
}

// BootRecord is what Setup did; it is written to <RunDir>/boot.json.
type BootRecord struct {
	Version       int      `json:"version"`
	Composefs     string   `json:"composefs"` // lowercase hex
	Algorithm     string   `json:"algorithm"`
	Verity        string   `json:"verity"` // "required" or "off" (berth.composefs=?…)
	ImageVerity   bool     `json:"image_verity"`
	Deploy        string   `json:"deploy"`
	Local         string   `json:"local"`
	Image         string   `json:"image"`           // path below the physical root
	Upper         string   `json:"upper,omitempty"` // overlay upperdir as seen from the initrd
	RootDevice    string   `json:"root_device,omitempty"`
	PhysicalRoot  string   `json:"physical_root,omitempty"` // where the physical root is visible in the new root
	Shared        []string `json:"shared"`
	PerDeployment []string `json:"per_deployment"`
	SealedFiles   int      `json:"sealed_files,omitempty"`
	Warnings      []string `json:"warnings,omitempty"`
}

type setup struct {
	o     Options
	l     store.Layout
	con   io.Writer
	rec   *BootRecord
	stage string
}

func (s *setup) warn(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	s.rec.Warnings = append(s.rec.Warnings, msg)
	fmt.Fprintln(s.con, "berth: WARNING:", msg)
}

func (s *setup) info(format string, v ...any) {
	fmt.Fprintf(s.con, "berth: "+format+"\n", v...)
}

// Setup verifies and mounts the deployment's root at o.Sysroot.
func Setup(o Options) (*BootRecord, error) {
	a := o.Args
	if a == nil || !a.Berth() {
		return nil, &Error{Reason: "no berth.composefs= on the kernel command line", Fix: "boot a berth entry, or remove berth-setup-root from this initrd"}
	}
	if o.Console == nil {
		o.Console = os.Stderr
	}
	if o.RunDir == "" {
		o.RunDir = "/run/berth"
	}
	if o.Shared == nil {
		o.Shared = store.SharedNames()
	}
	if o.PerDeployment == nil {
		o.PerDeployment = store.PerDeployment
	}
	s := &setup{o: o, l: store.At(o.Sysroot), con: o.Console}
	s.rec = &BootRecord{Version: 1, Composefs: a.Composefs.Hex, Algorithm: a.Composefs.AlgorithmName(),
		Verity: "required", Deploy: a.Deploy, Local: string(a.Local), RootDevice: o.RootDevice,
		Image: "/" + filepath.Join("berth", "repo", "images", a.Composefs.Hex), Shared: []string{}, PerDeployment: []string{}}
	if a.Composefs.Optional {
		s.rec.Verity = "off"
	}
	if err := s.run(); err != nil {
		return s.rec, err
	}
	return s.rec, nil
}

func (s *setup) run() error {
	a := s.o.Args
	for _, p := range []string{s.o.Sysroot, s.o.RunDir} {
		if strings.ContainsAny(p, ",:\\") {
			return &Error{Reason: fmt.Sprintf("path %q contains , : or \\, which overlayfs options cannot carry", p), Fix: "use another mount point"}
		}
	}
	if err := checkMountPoint(s.o.Sysroot); err != nil {
		return &Error{Reason: "the physical root is not mounted at " + s.o.Sysroot, Fix: "check root= and that the root filesystem mounted", Err: err}
	}
	if err := ensureWritable(s.o.Sysroot); err != nil {
		return &Error{Reason: "cannot make the physical root writable", Fix: "berth keeps the writable layer and shared state on the root filesystem; check it with fsck from a rescue system", Err: err}
	}
	deployDir := s.l.Deployment(a.Deploy)
	if fi, err := os.Lstat(deployDir); err != nil || !fi.IsDir() {
		return &Error{Reason: fmt.Sprintf("deployment %s does not exist (%s)", a.Deploy, deployDir),
			Fix: "choose another boot entry in the boot menu; `berth status` lists the deployments", Err: err}
	}

	if err := s.seal(); err != nil {
		return err
	}
	imageVerity, err := s.verifyImage()
	if err != nil {
		return err
	}
	s.rec.ImageVerity = imageVerity

	// Before the overlay exists: this writes the deployment's upper layer.
	if s.o.Prepare != nil {
		if err := s.o.Prepare(s.o.Sysroot, a.Deploy, a.Local); err != nil {
			return &Error{Reason: "preparing deployment " + a.Deploy + " (first-boot /etc merge and carry-over of local changes) failed",
				Fix: "boot the previous entry (it is unchanged); this is retried at every boot of this entry. To boot it without the merge (its local changes are then not carried), delete /berth/deploy/" + a.Deploy + "/etc-merge.json from the previous entry", Err: err}
		}
	}

	if err := os.MkdirAll(s.o.RunDir, 0o755); err != nil {
		return &Error{Reason: "cannot create " + s.o.RunDir, Err: err}
	}
	// MS_MOVE refuses mounts below a shared parent; systemd makes / shared.
	// ostree-prepare-root does the same; systemd re-shares / after switch-root.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return &Error{Reason: "cannot make / a private mount", Err: err}
	}
	s.stage = filepath.Join(s.o.RunDir, "root")
	if err := os.MkdirAll(s.stage, 0o755); err != nil {
		return &Error{Reason: "cannot create " + s.stage, Err: err}
	}

	mo := composefs.MountOptions{Image: s.l.Image(a.Composefs.Hex), Objects: s.l.Objects(), Verity: !a.Composefs.Optional}
	switch a.Local {
	case cmdline.LocalPersistent:
		mo.Upper, mo.Work = filepath.Join(deployDir, "upper"), filepath.Join(deployDir, "work")
	case cmdline.LocalTransient:
		t := filepath.Join(s.o.RunDir, "transient")
		if err := os.MkdirAll(t, 0o755); err != nil {
			return &Error{Reason: "cannot create " + t, Err: err}
		}
		if err := unix.Mount("tmpfs", t, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755"); err != nil {
			return &Error{Reason: "cannot mount the tmpfs for berth.local=transient", Err: err}
		}
		mo.Upper, mo.Work = filepath.Join(t, "upper"), filepath.Join(t, "work")
	case cmdline.LocalReadonly:
	}
	for _, d := range []string{mo.Upper, mo.Work} {
		if d == "" {
			continue
		}
		var err error
		if a.Local == cmdline.LocalTransient {
			err = os.MkdirAll(d, 0o755) // on berth's own tmpfs
		} else {
			err = mkdirNoSymlinks(s.o.Sysroot, d)
		}
		if err != nil {
			return &Error{Reason: "cannot create the writable layer " + d, Fix: "check the root filesystem (full? read-only?)", Err: err}
		}
	}
	s.rec.Upper = mo.Upper
	if err := composefs.Mount(s.stage, mo); err != nil {
		fix := "boot the previous entry; if this persists, redeploy the image"
		if errors.Is(err, composefs.ErrNoVerity) {
			fix = "this kernel's overlayfs lacks verity=require (Linux >= 6.6 with CONFIG_FS_VERITY); use a newer kernel, or berth.composefs=?<digest> to boot unverified"
		} else if errors.Is(err, composefs.ErrNoErofs) || errors.Is(err, composefs.ErrNoOverlayFeature) {
			fix = "the kernel lacks EROFS or an overlayfs feature berth needs (metacopy, redirect_dir, data-only lower layers: Linux >= 6.6); load the erofs and overlay modules or use a newer kernel"
		}
		return &Error{Reason: "cannot mount the composefs root " + a.Composefs.Hex, Fix: fix, Err: err}
	}

	if a.Local == cmdline.LocalReadonly {
		if err := s.readonlyEtc(deployDir); err != nil {
			return err
		}
	}
	if err := s.bindShared(); err != nil {
		return err
	}
	if err := s.placeRoot(); err != nil {
		return err
	}
	if err := s.writeRecord(); err != nil {
		return err
	}
	if s.o.Measurer != nil {
		if err := s.o.Measurer.MeasureDeployment(s.rec); err != nil {
			return &Error{Reason: "measuring deployment " + a.Deploy + " into the TPM failed", Fix: "check the TPM (firmware settings); boot the previous entry", Err: err}
		}
	}
	return nil
}

// verifyImage compares the image's fs-verity digest with the kernel
// argument. It returns whether the image has fs-verity.
func (s *setup) verifyImage() (bool, error) {
	d := s.o.Args.Composefs
	path := s.l.Image(d.Hex)
	want := d.Bytes()
	wantAlg := fsverity.SHA256
	if len(want) == 64 {
		wantAlg = fsverity.SHA512
	}
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, &Error{Reason: "composefs image " + s.rec.Image + " cannot be opened",
			Fix: "the deployment's image is missing: choose another boot entry, or redeploy (`berth upgrade`/`berth switch`)", Err: err}
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		return false, &Error{Reason: "composefs image " + s.rec.Image + " is not a regular file", Fix: "the repository is damaged; redeploy the image"}
	}
	alg, got, err := fsverity.Measure(f)
	switch {
	case err == nil:
		if alg != wantAlg || !bytes.Equal(got, want) {
			return true, &Error{Reason: fmt.Sprintf("composefs image digest mismatch: the kernel command line wants %s:%s but %s has fs-verity digest %s:%s",
				wantAlg, d.Hex, s.rec.Image, alg, hex.EncodeToString(got)),
				Fix: "the image was modified or replaced; do not trust this disk's root. Boot the previous entry or reinstall the deployment"}
		}
		return true, nil
	case errors.Is(err, fsverity.ErrNotEnabled) || errors.Is(err, fsverity.ErrNotSupported):
		if !d.Optional {
			return false, &Error{Reason: "fs-verity is not available for the composefs image " + s.rec.Image,
				Fix: "berth needs fs-verity (kernel CONFIG_FS_VERITY, root filesystem ext4 with -O verity or btrfs) to verify the root; " +
					"to boot unverified anyway, edit the entry to berth.composefs=?" + d.Hex + " (insecure)",
				Err: err}
		}
		// Without fs-verity still check the content once in userspace: the
		// image is small, and booting the wrong image must not happen.
		sum, derr := fsverity.DigestFile(path, wantAlg)
		if derr != nil {
			return false, &Error{Reason: "cannot read the composefs image " + s.rec.Image, Err: derr}
		}
		if !bytes.Equal(sum, want) {
			return false, &Error{Reason: fmt.Sprintf("composefs image digest mismatch: the kernel command line wants %s:%s but the content of %s hashes to %s:%s",
				wantAlg, d.Hex, s.rec.Image, wantAlg, hex.EncodeToString(sum)),
				Fix: "the image was modified or replaced; boot the previous entry or reinstall the deployment"}
		}
		s.warn("booting WITHOUT fs-verity (berth.composefs=?…): file contents are not verified on read (%v)", err)
		return false, nil
	default:
		return false, &Error{Reason: "cannot measure the fs-verity digest of " + s.rec.Image, Err: err}
	}
}

// readonlyEtc makes /etc writable in readonly mode with an overlay whose
// upper layer is the deployment's own etc layer.
func (s *setup) readonlyEtc(deployDir string) error {
	etc := filepath.Join(s.stage, "etc")
	if fi, err := os.Lstat(etc); err != nil || !fi.IsDir() {
		s.warn("the image has no /etc directory; berth.local=readonly leaves it read-only")
		return nil
	}
	upper, work := filepath.Join(deployDir, "etc", "upper"), filepath.Join(deployDir, "etc", "work")
	for _, d := range []string{upper, work} {
		if err := mkdirNoSymlinks(s.o.Sysroot, d); err != nil {
			return &Error{Reason: "cannot create " + d, Err: err}
		}
	}
	opts := "lowerdir=" + etc + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", etc, "overlay", 0, opts); err != nil {
		return &Error{Reason: "cannot mount the writable /etc of berth.local=readonly", Err: fmt.Errorf("mount overlay %s: %w", opts, err)}
	}
	return nil
}

// bindShared binds state/<name> over /<name>, keeping the per-deployment
// paths (package databases) from the deployment itself.
func (s *setup) bindShared() error {
	writable := s.o.Args.Local != cmdline.LocalReadonly
	keepDir := filepath.Join(s.o.RunDir, "keep")
	for _, name := range s.o.Shared {
		if !validRel(name) {
			return &Error{Reason: fmt.Sprintf("shared state name %q is not a clean relative path", name)}
		}
		src := filepath.Join(s.l.State(), name)
		if fi, err := os.Lstat(src); err != nil || !fi.IsDir() {
			s.warn("shared state %s is missing; /%s comes from the deployment", src, name)
			continue
		}
		target := filepath.Join(s.stage, name)
		fi, err := os.Lstat(target)
		switch {
		case err == nil && fi.Mode()&os.ModeSymlink != 0:
			// e.g. Fedora's /home -> var/home: the link target is shared already.
			continue
		case err == nil && !fi.IsDir():
			s.warn("/%s in the image is not a directory; shared state not bound", name)
			continue
		case errors.Is(err, os.ErrNotExist) && writable:
			if err := os.Mkdir(target, 0o755); err != nil {
				return &Error{Reason: "cannot create /" + name + " for the shared state", Err: err}
			}
		case err != nil:
			s.warn("/%s is missing in the image (read-only root); shared state not bound", name)
			continue
		}
		// Keep per-deployment paths: bind them aside before /name is covered.
		type kept struct{ rel, aside string }
		var keeps []kept
		for i, p := range s.o.PerDeployment {
			if !validRel(p) || !strings.HasPrefix(p, name+"/") {
				continue
			}
			if !realDir(s.stage, p) {
				continue
			}
			aside := filepath.Join(keepDir, fmt.Sprint(i))
			if err := os.MkdirAll(aside, 0o755); err != nil {
				return &Error{Reason: "cannot create " + aside, Err: err}
			}
			if err := unix.Mount(filepath.Join(s.stage, p), aside, "", unix.MS_BIND, ""); err != nil {
				return &Error{Reason: "cannot keep /" + p + " per deployment", Err: fmt.Errorf("bind %s: %w", p, err)}
			}
			keeps = append(keeps, kept{p, aside})
		}
		if err := unix.Mount(src, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return &Error{Reason: "cannot bind the shared state /" + name, Err: fmt.Errorf("bind %s on %s: %w", src, target, err)}
		}
		s.rec.Shared = append(s.rec.Shared, name)
		for _, k := range keeps {
			// The mount point lives in the shared state (an empty directory).
			if err := mkdirNoSymlinks(s.l.State(), filepath.Join(s.l.State(), k.rel)); err != nil {
				return &Error{Reason: "cannot create the mount point /" + k.rel + " in the shared state", Err: err}
			}
			if err := unix.Mount(k.aside, filepath.Join(s.stage, k.rel), "", unix.MS_MOVE, ""); err != nil {
				return &Error{Reason: "cannot keep /" + k.rel + " per deployment", Err: fmt.Errorf("move %s: %w", k.rel, err)}
			}
			s.rec.PerDeployment = append(s.rec.PerDeployment, k.rel)
		}
	}
	return nil
}

// placeRoot moves the physical root below the new root (at /sysroot, with
// /berth bound from it so berth finds its repository at /berth), then
// moves the new root to Sysroot.
func (s *setup) placeRoot() error {
	phys := filepath.Join(s.stage, "sysroot")
	if err := ensureDir(phys, s.o.Args.Local != cmdline.LocalReadonly); err != nil {
		s.warn("the image has no /sysroot and the root is read-only: the physical root stays hidden (%v)", err)
	} else {
		if err := unix.Mount(s.o.Sysroot, phys, "", unix.MS_MOVE, ""); err != nil {
			return &Error{Reason: "cannot move the physical root below the new root", Err: fmt.Errorf("move %s to %s: %w", s.o.Sysroot, phys, err)}
		}
		s.rec.PhysicalRoot = "/sysroot"
		berth := filepath.Join(s.stage, "berth")
		if err := ensureDir(berth, s.o.Args.Local != cmdline.LocalReadonly); err != nil {
			s.warn("the image has no /berth and the root is read-only: the repository is only at /sysroot/berth")
		} else if err := unix.Mount(filepath.Join(phys, "berth"), berth, "", unix.MS_BIND, ""); err != nil {
			return &Error{Reason: "cannot bind /berth", Err: err}
		}
	}
	if err := unix.Mount(s.stage, s.o.Sysroot, "", unix.MS_MOVE, ""); err != nil {
		return &Error{Reason: "cannot move the new root to " + s.o.Sysroot, Err: fmt.Errorf("move %s: %w", s.stage, err)}
	}
	return nil
}

func (s *setup) writeRecord() error {
	b, err := json.MarshalIndent(s.rec, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(s.o.RunDir, "boot.json"), append(b, '\n'), 0o644); err != nil {
		return &Error{Reason: "cannot write " + s.o.RunDir + "/boot.json", Err: err}
	}
	return nil
}

func validRel(p string) bool {
	return p != "" && !filepath.IsAbs(p) && filepath.Clean(p) == p && p != "." && !strings.HasPrefix(p, "../") && p != ".."
}

// realDir reports whether rel below root is a directory reached without
// symlinks (a hostile image could point a link out of the new root).
func realDir(root, rel string) bool {
	p := root
	for _, c := range strings.Split(rel, "/") {
		p = filepath.Join(p, c)
		fi, err := os.Lstat(p)
		if err != nil || !fi.IsDir() {
			return false
		}
	}
	return true
}

// mkdirNoSymlinks creates dir (below base) and missing parents, refusing
// to pass through symlinks below base.
func mkdirNoSymlinks(base, dir string) error {
	rel, err := filepath.Rel(base, dir)
	if err != nil || !validRel(rel) {
		return fmt.Errorf("%s is not below %s", dir, base)
	}
	p := base
	for _, c := range strings.Split(rel, "/") {
		p = filepath.Join(p, c)
		fi, err := os.Lstat(p)
		switch {
		case err == nil && fi.IsDir():
		case err == nil:
			return fmt.Errorf("%s exists and is not a directory", p)
		case errors.Is(err, os.ErrNotExist):
			if err := os.Mkdir(p, 0o755); err != nil {
				return err
			}
			if err := fsutil.SyncDir(filepath.Dir(p)); err != nil {
				return err
			}
		default:
			return err
		}
	}
	return nil
}

func ensureDir(p string, create bool) error {
	fi, err := os.Lstat(p)
	if err == nil {
		if fi.IsDir() {
			return nil
		}
		return fmt.Errorf("%s is not a directory", p)
	}
	if !create || !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return os.Mkdir(p, 0o755)
}

func checkMountPoint(p string) error {
	var st, parent unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return err
	}
	if err := unix.Stat(filepath.Join(p, ".."), &parent); err != nil {
		return err
	}
	if st.Dev != parent.Dev || st.Ino == parent.Ino {
		return nil
	}
	// Same device: a bind mount of a directory of the parent filesystem
	// is still a mount point; /proc/self/mountinfo decides.
	ms, err := fsutil.Mounts()
	if err != nil {
		return fmt.Errorf("%s is not a mount point (%w)", p, err)
	}
	for _, m := range ms {
		if m.Point == p {
			return nil
		}
	}
	return fmt.Errorf("%s is not a mount point", p)
}

func ensureWritable(p string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		return err
	}
	if st.Flags&unix.ST_RDONLY == 0 {
		return nil
	}
	if err := unix.Mount("", p, "", unix.MS_REMOUNT, ""); err != nil {
		return fmt.Errorf("remount %s read-write: %w", p, err)
	}
	return nil
}
