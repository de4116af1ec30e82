// Package install puts berth onto a machine: `berth install to-disk`
// partitions a disk (or disk image file), makes the filesystems, imports
// the image, creates the first deployment, its initramfs and UKI, and
// installs systemd-boot with a boot-counted entry; `to-filesystem` does
// the same on a root filesystem and ESP the caller mounted.
package install

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/progress"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/uki"
)

// DefaultSize is the size of a disk image file that does not exist yet.
const DefaultSize = 8 << 30

// BootTries is the boot counter of a new entry: a deployment that does not
// reach boot-complete.target in that many boots is abandoned.
const BootTries = 3

// Options configure an installation.
type Options struct {
	Image string // image reference with transport ("oci-archive:/x.tar", "docker://…")
	// TargetImageRef is the reference the installed system tracks for
	// `berth upgrade` ("" = Image). Like bootc's --target-imgref: install
	// from a local copy, update from the registry.
	TargetImageRef string
	// Wipe allows overwriting a disk that has partitions or data.
	Wipe bool
	// Filesystem of the root partition: "ext4" (default) or "btrfs".
	Filesystem string
	// Size of a disk image file target: a new file is created sparse with
	// this size (0: DefaultSize), an existing smaller one is extended (0:
	// kept as it is). Block devices keep their size.
	Size int64
	// SSHAuthorizedKeys is a file whose keys go to root's authorized_keys.
	SSHAuthorizedKeys string
	// KernelArgs are appended to the kernel command line.
	KernelArgs []string
	// LocalMode of the first deployment ("" = persistent).
	LocalMode cmdline.LocalMode
	// InsecureNoVerity writes berth.composefs=?<digest>: the root is
	// mounted even where fs-verity is unavailable.
	InsecureNoVerity bool
	// Kernel picks the kernel version when the image has several ("" = newest).
	Kernel string
	// SkipKernelCheck installs a kernel whose version number looks too
	// old for berth (a distribution kernel with the features backported).
	SkipKernelCheck bool
	// Runtime is berth's runtime to inject; nil locates the running berth's.
	Runtime *runtime.Set
	// PolicyPath, InsecureSkipTLSVerify: see oci.PullOptions.
	PolicyPath            string
	InsecureSkipTLSVerify bool
	// StagingDir is where the image is pulled and checked before the
	// target is touched ("" = $BERTH_STAGING, else /var/tmp); a private
	// directory below it is removed when the installation ends.
	StagingDir string
	// HostRoot is this machine's root, where systemd-stub and systemd-boot
	// are taken from when the image lacks them ("" = "/").
	HostRoot string
	// Progress receives the per-step lines and the pull's progress.
	Progress *progress.Reporter
}

// Step is one timed step of an installation.
type Step struct {
	Name     string        `json:"name"`
	Duration time.Duration `json:"duration"`
}

// Result describes a finished installation.
type Result struct {
	Target        string             `json:"target,omitempty"`
	Deployment    *deploy.Deployment `json:"deployment"`
	Cmdline       string             `json:"cmdline"`
	Root          string             `json:"root"` // root= value
	ESPPartUUID   string             `json:"esp_partuuid,omitempty"`
	Entry         string             `json:"entry"`                 // path of the boot entry on the ESP
	Stub          string             `json:"stub"`                  // where systemd-stub came from
	BootLoader    string             `json:"boot_loader,omitempty"` // where systemd-boot came from
	InitrdPath    string             `json:"initrd_path"`
	InitrdSize    int64              `json:"initrd_size"`
	InitrdCached  bool               `json:"initrd_cached"`
	UKISize       int64              `json:"uki_size"`
	StoreBytes    int64              `json:"store_bytes"` // disk space used by repo/ (objects, images, oci)
	VerityPending bool               `json:"verity_pending"`
	RuntimeNote   string             `json:"runtime_note,omitempty"`
	Steps         []Step             `json:"steps"`
	Total         time.Duration      `json:"total"`
}

// stepper prints one line per step with its duration and records it.
type stepper struct {
	rep    *progress.Reporter
	res    *Result
	start  time.Time
	origin string // deployment origin ("install" when empty)
}

func (s *stepper) do(name string, fn func() (string, error)) error {
	t0 := time.Now()
	task := s.rep.Start(name, 0)
	msg, err := fn()
	d := time.Since(t0)
	s.res.Steps = append(s.res.Steps, Step{Name: name, Duration: d})
	if msg != "" {
		msg += ", "
	}
	task.Done(err, fmt.Sprintf("%sdone in %s", msg, d.Round(10*time.Millisecond)))
	return err
}

// cleanups run in reverse order; every one runs even when another fails.
type cleanups []func() error

func (c *cleanups) add(f func() error) { *c = append(*c, f) }

func (c *cleanups) run() error {
	var errs []error
	for i := len(*c) - 1; i >= 0; i-- {
		if err := (*c)[i](); err != nil {
			errs = append(errs, err)
		}
	}
	*c = nil
	return errors.Join(errs...)
}

// ToDisk installs berth and the image to a whole disk or a disk image
// file: GPT, ESP (FAT32) and root filesystem, then everything ToFilesystem
// does. Everything mounted and attached is released on success and on
// failure.
func ToDisk(ctx context.Context, targetPath string, opts Options) (res *Result, err error) {
	if err := checkOptions(&opts); err != nil {
		return nil, err
	}
	res = &Result{}
	st := &stepper{rep: opts.Progress, res: res, start: time.Now()}
	var cl cleanups
	var t *target
	var sg *staged
	defer func() {
		if cerr := cl.run(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("cleanup: %w", cerr))
		}
		if err != nil && t != nil && t.Created {
			os.Remove(t.Path) // a disk image this failed install created is garbage
		}
		if sg != nil {
			err = errors.Join(err, sg.remove())
		}
		if res != nil {
			res.Total = time.Since(st.start)
		}
	}()

	// Everything that can fail on the target, the image or this machine
	// is checked before the first write to the target.
	if err := st.do("check target "+targetPath, func() (string, error) {
		var err error
		t, err = inspectTarget(targetPath, opts.Size, opts.Wipe)
		if err != nil {
			return "", err
		}
		if t.missing {
			return fmt.Sprintf("to be created (%d MiB, sparse)", t.Size>>20), nil
		}
		return fmt.Sprintf("%d MiB", t.Size>>20), nil
	}); err != nil {
		return nil, err
	}
	res.Target = t.Path
	sg, err = stageImage(ctx, st, opts)
	if err != nil {
		return nil, err
	}
	if err := st.do("check space", func() (string, error) {
		root := rootNeeds(sg.storeBytes, sg.c)
		need := diskNeeds(root)
		if t.Size < need {
			how := "use a bigger disk"
			if !t.IsBlock {
				how = fmt.Sprintf("pass --size %dM or more", (need+(1<<20)-1)>>20)
			}
			return "", fmt.Errorf("target %s is %d MiB; this image needs at least %d MiB (ESP %d MiB + root %d MiB for a store of %d MiB with headroom): %s",
				t.Path, t.Size>>20, need>>20, ESPSize>>20, max(root, minRootSize)>>20, sg.storeBytes>>20, how)
		}
		if e := espNeeds(sg.c); e > ESPSize {
			return "", fmt.Errorf("the boot entry needs %d MiB, more than the %d MiB ESP", e>>20, ESPSize>>20)
		}
		return fmt.Sprintf("needs %d MiB of %d MiB", need>>20, t.Size>>20), nil
	}); err != nil {
		return nil, err
	}

	var d *diskLayout
	if err := st.do("partition (GPT: ESP + root)", func() (string, error) {
		if err := t.prepare(); err != nil {
			return "", err
		}
		var err error
		d, err = partitionDisk(ctx, t)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("root PARTUUID %s, %d MiB", d.Root.UUID, d.Root.Size>>20), nil
	}); err != nil {
		return nil, err
	}
	res.ESPPartUUID = d.ESP.UUID

	work, err := os.MkdirTemp("", "berth-install-")
	if err != nil {
		return nil, fmt.Errorf("install: %w", err)
	}
	cl.add(func() error { return os.RemoveAll(work) })
	rootMnt, espStage := filepath.Join(work, "root"), filepath.Join(work, "esp")
	for _, dir := range []string{rootMnt, espStage} {
		if err := os.Mkdir(dir, 0o755); err != nil {
			return nil, fmt.Errorf("install: %w", err)
		}
	}

	if err := st.do("format ESP (FAT32) and root ("+opts.Filesystem+")", func() (string, error) {
		for _, p := range []*partition{&d.ESP, &d.Root} {
			if err := p.attach(t); err != nil {
				return "", err
			}
			cl.add(p.detach)
		}
		if err := formatESP(ctx, d.ESP.Dev); err != nil {
			return "", err
		}
		if _, err := formatRoot(ctx, d.Root.Dev, opts.Filesystem, "berth-root"); err != nil {
			return "", err
		}
		if err := unix.Mount(d.Root.Dev, rootMnt, opts.Filesystem, 0, ""); err != nil {
			return "", fmt.Errorf("mount root %s on %s: %w", d.Root.Dev, rootMnt, err)
		}
		cl.add(func() error { return unmount(rootMnt) })
		return "", nil
	}); err != nil {
		return nil, err
	}

	if err := populate(ctx, st, rootMnt, espStage, "PARTUUID="+d.Root.UUID, sg, opts); err != nil {
		return res, err
	}

	if err := st.do("write ESP", func() (string, error) {
		if err := copyToFAT(ctx, d.ESP.Dev, espStage); err != nil {
			return "", err
		}
		return "", syncDevice(d.ESP.Dev)
	}); err != nil {
		return res, err
	}
	if err := st.do("unmount and detach", func() (string, error) {
		return "", cl.run()
	}); err != nil {
		return res, err
	}
	if t.IsBlock {
		// Let the running kernel see the new partitions (best effort: a
		// kernel without GPT support, or a busy disk, keeps the old view).
		if f, err := os.Open(t.Path); err == nil {
			unix.IoctlSetInt(int(f.Fd()), unix.BLKRRPART, 0)
			f.Close()
		}
	} else if err := syncDevice(t.Path); err != nil {
		return res, err
	}
	if err := st.do("remove staging store", func() (string, error) { return "", sg.remove() }); err != nil {
		return res, err
	}
	return res, nil
}

// ToFilesystem installs into a mounted root filesystem (rootDir) and a
// mounted ESP (espDir): the store under rootDir/berth, the first
// deployment, and the boot entry on the ESP.
func ToFilesystem(ctx context.Context, rootDir, espDir string, opts Options) (res *Result, err error) {
	if err := checkOptions(&opts); err != nil {
		return nil, err
	}
	res = &Result{}
	st := &stepper{rep: opts.Progress, res: res, start: time.Now()}
	var sg *staged
	defer func() {
		if sg != nil {
			err = errors.Join(err, sg.remove())
		}
		if res != nil {
			res.Total = time.Since(st.start)
		}
	}()
	var rootSpec string
	if err := st.do("check "+rootDir+" and ESP "+espDir, func() (string, error) {
		var err error
		rootSpec, err = rootSpecOf(rootDir)
		if err != nil {
			return "", err
		}
		warning, err := checkESPDir(espDir)
		if err != nil {
			return "", err
		}
		if warning != "" {
			opts.Progress.Message("warning: %s", warning)
		}
		if err := checkStagingOutside(stagingBase(opts.StagingDir), rootDir); err != nil {
			return "", err
		}
		return "root=" + rootSpec, nil
	}); err != nil {
		return nil, err
	}
	if sg, err = stageImage(ctx, st, opts); err != nil {
		return nil, err
	}
	if err := st.do("check space", func() (string, error) {
		root := rootNeeds(sg.storeBytes, sg.c)
		free, err := freeBytes(rootDir)
		if err != nil {
			return "", err
		}
		if free < root {
			return "", fmt.Errorf("the root filesystem %s has %d MiB free; this image needs about %d MiB (a store of %d MiB, its deployment and initramfs, with headroom)", rootDir, free>>20, root>>20, sg.storeBytes>>20)
		}
		esp := espNeeds(sg.c)
		if free, err := freeBytes(espDir); err == nil && free < esp {
			return "", fmt.Errorf("the ESP %s has %d MiB free; the boot entry and systemd-boot need %d MiB", espDir, free>>20, esp>>20)
		}
		return fmt.Sprintf("root needs %d MiB of %d MiB free", root>>20, free>>20), nil
	}); err != nil {
		return nil, err
	}
	if err := populate(ctx, st, rootDir, espDir, rootSpec, sg, opts); err != nil {
		return res, err
	}
	if err := st.do("remove staging store", func() (string, error) { return "", sg.remove() }); err != nil {
		return res, err
	}
	return res, nil
}

func checkOptions(o *Options) error {
	if o.Image == "" {
		return errors.New("install: no image given (--image)")
	}
	if o.TargetImageRef != "" && (strings.TrimSpace(o.TargetImageRef) != o.TargetImageRef || strings.ContainsAny(o.TargetImageRef, "\x00\n")) {
		return fmt.Errorf("install: bad --target-imgref %q", o.TargetImageRef)
	}
	if o.Filesystem == "" {
		o.Filesystem = "ext4"
	}
	if o.Filesystem != "ext4" && o.Filesystem != "btrfs" {
		return fmt.Errorf("install: unsupported filesystem %q (ext4 or btrfs)", o.Filesystem)
	}
	if o.LocalMode == "" {
		o.LocalMode = cmdline.LocalPersistent
	}
	switch o.LocalMode {
	case cmdline.LocalPersistent, cmdline.LocalTransient, cmdline.LocalReadonly:
	default:
		return fmt.Errorf("install: unknown local mode %q (persistent, transient or readonly)", o.LocalMode)
	}
	if o.Size < 0 {
		return errors.New("install: negative size")
	}
	for _, a := range o.KernelArgs {
		if err := checkKernelArg(a); err != nil {
			return err
		}
	}
	if o.Progress == nil {
		o.Progress = progress.Discard()
	}
	return nil
}

// checkKernelArg refuses extra kernel arguments that would override what
// berth sets itself (the root, the verified digest, the deployment).
func checkKernelArg(a string) error {
	if a == "" || strings.ContainsAny(a, "\n\r\x00") {
		return fmt.Errorf("install: invalid kernel argument %q", a)
	}
	key, _, _ := strings.Cut(a, "=")
	switch key {
	case "root", "berth.composefs", "berth.deploy", "init":
		return fmt.Errorf("install: kernel argument %q is set by berth itself", a)
	case "berth.local":
		return fmt.Errorf("install: use --local instead of the kernel argument %q", a)
	}
	return nil
}

// populate does the part of an installation that is the same for a disk
// and a pre-mounted filesystem: the store, the image copied into it from
// the staging store, the first deployment and its boot entry.
func populate(ctx context.Context, st *stepper, sysroot, espDir, rootSpec string, sg *staged, opts Options) error {
	res := st.res
	l := store.At(sysroot)
	if err := l.Init(); err != nil {
		return err
	}
	objects, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	if err != nil {
		return err
	}
	if perr := objects.ProbeVerity(); perr != nil {
		if !errors.Is(perr, fsverity.ErrNotSupported) {
			return perr
		}
		res.VerityPending = true
		if err := l.MarkVerityPending("the installing kernel could not enable fs-verity; berth-init enables it at first boot"); err != nil {
			return err
		}
		opts.Progress.Message("fs-verity is not available on this machine's kernel: berth-init enables it at first boot (marker berth/repo/%s)", store.VerityPendingFile)
	}

	var img *oci.Image
	if err := st.do("copy image into the target store", func() (string, error) {
		var stats *oci.CopyStats
		var err error
		img, stats, err = oci.CopyImage(ctx, sg.dir, sysroot, sg.img, opts.Progress)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%d objects, %d MiB", stats.Objects, stats.Bytes>>20), nil
	}); err != nil {
		return err
	}
	sg.startRemove()

	if err := deployImage(st, l, objects, espDir, rootSpec, img, sg.c, opts); err != nil {
		return err
	}

	if err := st.do("sync", func() (string, error) {
		if err := syncFS(sysroot); err != nil {
			return "", err
		}
		res.StoreBytes, _ = diskUsage(l.Repo())
		return fmt.Sprintf("store %d MiB", res.StoreBytes>>20), nil
	}); err != nil {
		return err
	}
	return nil
}

// DeployOptions configure DeployImage.
type DeployOptions struct {
	// Root is the root= value ("PARTUUID=…"); "" finds it for the sysroot
	// (the running system's own root= when the sysroot is "/" and it was
	// booted by berth).
	Root             string
	KernelArgs       []string
	LocalMode        cmdline.LocalMode
	InsecureNoVerity bool
	Kernel           string
	SkipKernelCheck  bool
	Runtime          *runtime.Set
	Origin           string // recorded in deployment.json ("deploy" when empty)
	Progress         *progress.Reporter
	// HostRoot: see Options.HostRoot.
	HostRoot string
}

// DeployImage makes a new deployment of an image already in the store of
// sysroot, with its initramfs and UKI, installs the UKI on the ESP as a
// boot-counted entry and makes it the default. The preflight (kernel,
// systemd-stub, systemd-boot, initramfs) runs first: an image that fails
// it leaves the deployments and the ESP as they were.
func DeployImage(sysroot, espDir string, img *oci.Image, o DeployOptions) (*Result, error) {
	opts := Options{Image: img.Ref, KernelArgs: o.KernelArgs, LocalMode: o.LocalMode, InsecureNoVerity: o.InsecureNoVerity,
		Kernel: o.Kernel, SkipKernelCheck: o.SkipKernelCheck, Runtime: o.Runtime, Progress: o.Progress, HostRoot: o.HostRoot}
	if err := checkOptions(&opts); err != nil {
		return nil, err
	}
	res := &Result{}
	st := &stepper{rep: opts.Progress, res: res, start: time.Now()}
	defer func() {
		if res != nil {
			res.Total = time.Since(st.start)
		}
	}()
	if _, err := os.Stat(espDir); err != nil {
		return nil, fmt.Errorf("ESP %s: %w", espDir, err)
	}
	rootSpec := o.Root
	if rootSpec == "" {
		var err error
		if rootSpec, err = runningRootSpec(sysroot); err != nil {
			return nil, err
		}
	}
	l := store.At(sysroot)
	objects, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	if err != nil {
		return nil, err
	}
	if o.Origin == "" {
		o.Origin = "deploy"
	}
	st.origin = o.Origin
	var c *checked
	if err := st.do("check image (kernel, systemd-stub, systemd-boot, initramfs)", func() (string, error) {
		var err error
		c, err = checkImage(l, img, checkOpts{
			Kernel: opts.Kernel, InsecureNoVerity: opts.InsecureNoVerity, SkipKernelCheck: opts.SkipKernelCheck,
			HostRoot: opts.HostRoot, Runtime: opts.Runtime, ESP: espDir,
		})
		if err != nil {
			return "", err
		}
		return c.summary(), nil
	}); err != nil {
		return nil, err
	}
	if err := deployImage(st, l, objects, espDir, rootSpec, img, c, opts); err != nil {
		return res, err
	}
	return res, nil
}

// runningRootSpec is the root= of the running berth system when sysroot
// is "/", else the one found for the filesystem mounted at sysroot.
func runningRootSpec(sysroot string) (string, error) {
	if filepath.Clean(sysroot) == "/" {
		if a, err := cmdline.ReadProc(""); err == nil && a.Berth() && a.Root != "" {
			return a.Root, nil
		}
	}
	return rootSpecOf(sysroot)
}

// deployImage: deployment, SSH keys, initramfs, UKI, boot entry, made
// with what the preflight c found.
func deployImage(st *stepper, l store.Layout, objects *composefs.Store, espDir, rootSpec string, img *oci.Image, c *checked, opts Options) error {
	res := st.res
	origin := st.origin
	if origin == "" {
		origin = "install"
	}
	tree, kver, rt := c.tree, c.kver, c.rt
	res.Stub = c.stubFrom
	// Keep the stub this deployment's UKI is built on, for images and machines without one
	// later (bootfiles.go).
	if err := keepStub(keptStubPath(l), c.stub); err != nil {
		return err
	}

	var cr *deploy.CreateResult
	if err := st.do("create deployment", func() (string, error) {
		var err error
		cr, err = deploy.Create(l, deploy.CreateOptions{
			Tree: tree, Store: objects, Runtime: rt,
			ImageRef: trackedRef(img, opts), ManifestDigest: img.ManifestDigest, Kernel: kver,
			Origin: origin, LocalMode: opts.LocalMode, KernelArgs: opts.KernelArgs,
		})
		if err != nil {
			return "", err
		}
		if cr.Runtime != nil && !cr.Runtime.Injected {
			res.RuntimeNote = cr.Runtime.Reason
		}
		return cr.Deployment.ID, nil
	}); err != nil {
		return err
	}
	dep := cr.Deployment
	res.Deployment = dep
	res.VerityPending = res.VerityPending || cr.VerityPending

	if opts.SSHAuthorizedKeys != "" {
		if err := st.do("root's SSH keys", func() (string, error) {
			return "", installSSHKeys(l, opts.SSHAuthorizedKeys)
		}); err != nil {
			return err
		}
	}

	treeFS := composefs.TreeFS(tree, l.Objects())
	initrdData := c.initrd
	if err := st.do("initramfs", func() (string, error) {
		var err error
		if res.InitrdPath, err = storeInitrd(l, c); err != nil {
			return "", err
		}
		res.InitrdSize, res.InitrdCached = int64(len(initrdData)), c.initrdCached
		note := "built"
		if c.initrdCached {
			note = "cached"
		}
		return fmt.Sprintf("%s %s, %d KiB", note, filepath.Base(res.InitrdPath), len(initrdData)>>10), nil
	}); err != nil {
		return err
	}

	digest := dep.ComposefsDigest
	if opts.InsecureNoVerity {
		digest = "?" + digest
	}
	args := []string{"root=" + rootSpec, "rw", "berth.composefs=" + digest, "berth.deploy=" + dep.ID}
	if dep.LocalMode != cmdline.LocalPersistent {
		args = append(args, "berth.local="+string(dep.LocalMode))
	}
	// No console= by default: the kernel's default (tty0) suits a physical
	// machine, and the last console= becomes /dev/console, where berth-init
	// prints why it refuses to boot — a serial-only machine or a VM adds
	// --karg console=ttyS0,115200 so those messages reach it.
	args = append(args, opts.KernelArgs...)
	res.Cmdline = strings.Join(args, " ")
	res.Root = rootSpec
	if err := checkCmdline(res.Cmdline, dep); err != nil {
		return err
	}

	ukiPath := filepath.Join(l.Boot(), ".tmp-uki-"+dep.ID+".efi")
	defer os.Remove(ukiPath)
	defer os.Remove(ukiPath + ".pcr11.json")
	if err := st.do("UKI", func() (string, error) {
		ur, err := uki.Build(ukiPath, uki.Options{
			Stub: c.stub, Linux: c.linux, Initrds: [][]byte{initrdData},
			Cmdline: res.Cmdline, OSRelease: c.osrel, Uname: kver,
		})
		if err != nil {
			return "", err
		}
		res.UKISize = ur.Size
		return fmt.Sprintf("%d KiB", ur.Size>>10), nil
	}); err != nil {
		return err
	}

	if err := st.do("boot loader (systemd-boot, entry with "+fmt.Sprint(BootTries)+" tries)", func() (string, error) {
		esp := boot.ESP{Dir: espDir}
		from, err := installBootLoader(esp, treeFS, hostFS(opts.HostRoot))
		if err != nil {
			return "", err
		}
		res.BootLoader = from
		if err := esp.AddUKI(dep.ID, ukiPath, BootTries); err != nil {
			return "", err
		}
		if err := esp.SetDefault(dep.ID); err != nil {
			return "", err
		}
		entries, err := esp.Entries()
		if err != nil {
			return "", err
		}
		for _, e := range entries {
			if e.ID == dep.ID {
				res.Entry = e.Path
			}
		}
		if res.Entry == "" {
			return "", fmt.Errorf("boot entry for %s not found on the ESP after adding it", dep.ID)
		}
		return res.Entry + ", systemd-boot from " + res.BootLoader, nil
	}); err != nil {
		return err
	}

	return nil
}

// checkCmdline parses the command line the way berth-init will.
func checkCmdline(line string, dep *deploy.Deployment) error {
	a, err := cmdline.Parse(line)
	if err != nil {
		return fmt.Errorf("kernel command line %q: %w", line, err)
	}
	if !a.Berth() || a.Composefs.Hex != dep.ComposefsDigest || a.Deploy != dep.ID {
		return fmt.Errorf("kernel command line %q does not select deployment %s", line, dep.ID)
	}
	return nil
}

// pickKernel chooses want, or the newest version (by version ordering).
func pickKernel(kernels []string, want string) (string, error) {
	if want != "" {
		for _, k := range kernels {
			if k == want {
				return k, nil
			}
		}
		return "", fmt.Errorf("the image has no kernel %s (it has %s)", want, strings.Join(kernels, ", "))
	}
	best := kernels[0]
	for _, k := range kernels[1:] {
		if versionLess(best, k) {
			best = k
		}
	}
	return best, nil
}

// versionLess compares kernel versions number by number ("6.12.10" > "6.12.9").
func versionLess(a, b string) bool {
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' || r == '+' || r == '_' })
	}
	pa, pb := split(a), split(b)
	for i := 0; i < len(pa) && i < len(pb); i++ {
		if pa[i] == pb[i] {
			continue
		}
		na, ea := atoi(pa[i])
		nb, eb := atoi(pb[i])
		if ea && eb {
			return na < nb
		}
		return pa[i] < pb[i]
	}
	return len(pa) < len(pb)
}

func atoi(s string) (int, bool) {
	n := 0
	if s == "" || len(s) > 9 {
		return 0, false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

// readKernel reads the kernel image of kver from the image tree.
func readKernel(fsys fs.FS, kver string) ([]byte, error) {
	for _, p := range []string{"usr/lib/modules/" + kver + "/vmlinuz", "lib/modules/" + kver + "/vmlinuz", "boot/vmlinuz-" + kver} {
		b, err := fsutil.ReadFileFS(fsys, p, 512<<20)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("kernel %s: %w", p, err)
		}
		return b, nil
	}
	return nil, fmt.Errorf("kernel %s: no vmlinuz in the image", kver)
}

// installSSHKeys writes root's authorized_keys into the shared /root
// (state/root), which is bound over /root at boot.
func installSSHKeys(l store.Layout, keysFile string) error {
	keys, err := os.ReadFile(keysFile)
	if err != nil {
		return fmt.Errorf("SSH keys: %w", err)
	}
	if err := checkAuthorizedKeys(keys); err != nil {
		return fmt.Errorf("SSH keys %s: %w", keysFile, err)
	}
	home := filepath.Join(l.State(), "root")
	fi, err := os.Lstat(home)
	if err != nil || !fi.IsDir() {
		return fmt.Errorf("SSH keys: %s is not a directory (does the image have /root as a symlink?)", home)
	}
	ssh := filepath.Join(home, ".ssh")
	if fi, err := os.Lstat(ssh); err == nil && !fi.IsDir() {
		return fmt.Errorf("SSH keys: %s exists and is not a directory", ssh)
	}
	if err := fsutil.MkdirAllSync(ssh, 0o700); err != nil {
		return err
	}
	if err := os.Chmod(ssh, 0o700); err != nil {
		return fmt.Errorf("SSH keys: %w", err)
	}
	if err := os.Lchown(ssh, 0, 0); err != nil {
		return fmt.Errorf("SSH keys: %w", err)
	}
	if !strings.HasSuffix(string(keys), "\n") {
		keys = append(keys, '\n')
	}
	ak := filepath.Join(ssh, "authorized_keys")
	if err := fsutil.WriteFileAtomic(ak, keys, 0o600); err != nil {
		return err
	}
	return os.Lchown(ak, 0, 0)
}

// checkAuthorizedKeys accepts text of at most 1 MiB whose non-comment
// lines each name a public key type.
func checkAuthorizedKeys(b []byte) error {
	if len(b) > 1<<20 {
		return errors.New("larger than 1 MiB")
	}
	n := 0
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if strings.ContainsRune(line, 0) || !strings.Contains(line, "ssh-") && !strings.Contains(line, "ecdsa-sha2-") && !strings.Contains(line, "sk-") {
			return fmt.Errorf("line %d is not an SSH public key", i+1)
		}
		n++
	}
	if n == 0 {
		return errors.New("no keys in it")
	}
	return nil
}

func unmount(dir string) error {
	var err error
	for try := 0; try < 20; try++ {
		if err = unix.Unmount(dir, 0); err == nil || !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	return nil
}

func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// syncDevice flushes a block device or file.
func syncDevice(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}

// diskUsage sums the allocated bytes below dir (hardlinks once).
func diskUsage(dir string) (int64, error) {
	var total int64
	seen := map[[2]uint64]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		k := [2]uint64{st.Dev, st.Ino}
		if !seen[k] {
			seen[k] = true
			total += st.Blocks * 512
		}
		return nil
	})
	return total, err
}

// trackedRef is the image reference a new deployment records for upgrades.
func trackedRef(img *oci.Image, opts Options) string {
	if opts.TargetImageRef != "" {
		return opts.TargetImageRef
	}
	return img.Ref
}
