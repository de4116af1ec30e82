package setuproot

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/blkdev"
	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/kmod"
)

// ModulesLoadList is where berth's initramfs lists the modules to load, in
// dependency order, as paths relative to /usr/lib/modules/<kver>.
const ModulesLoadList = "etc/berth/modules.load"

// FilesystemModulesDir holds a load list per root filesystem type, loaded
// once the root device is found (keep in sync with initrd.FilesystemModulesDir).
const FilesystemModulesDir = "etc/berth/modules.fs"

// InitConfig configures the PID 1 flow of berth's initramfs.
type InitConfig struct {
	Console     io.Writer     // default os.Stdout (the kernel's /dev/console)
	RootTimeout time.Duration // wait for root=; default 90s
	FailTimeout time.Duration // show the error this long before rebooting; default 30s
	Sysroot     string        // default "/sysroot"
}

// Init is berth-init as PID 1: prepare the initramfs, load modules, find
// and mount the root device, set up the berth root when berth.composefs=
// is given, and switch to it. It does not return: on failure it explains
// on the console, then reboots (or opens a shell with berth.debug=shell).
func Init(cfg InitConfig) {
	if cfg.RootTimeout == 0 {
		cfg.RootTimeout = 90 * time.Second
	}
	if cfg.FailTimeout == 0 {
		cfg.FailTimeout = 30 * time.Second
	}
	if cfg.Sysroot == "" {
		cfg.Sysroot = "/sysroot"
	}
	debugShell := false
	err := func() error {
		if err := earlyMounts(); err != nil {
			return &Error{Reason: "cannot mount the kernel filesystems", Fix: "the kernel lacks proc, sysfs, devtmpfs or tmpfs; use a standard distribution kernel", Err: err}
		}
		if cfg.Console == nil {
			cfg.Console = reopenConsole()
		}
		con := cfg.Console
		raw, _ := os.ReadFile("/proc/cmdline")
		debugShell = strings.Contains(string(raw), "berth.debug=shell")
		args, err := cmdline.Parse(string(raw))
		if err != nil {
			return &Error{Reason: "the kernel command line is invalid", Fix: "fix the berth.* arguments of the boot entry (DESIGN §4 lists them), or boot another entry", Err: err}
		}
		debugShell = args.DebugShell
		loadModules(con)
		spec, err := blkdev.ParseSpec(args.Root)
		if err != nil {
			return &Error{Reason: "root= is missing or not understood", Fix: "add root=UUID=…, PARTUUID=…, LABEL=… or /dev/… to the boot entry", Err: err}
		}
		fmt.Fprintf(con, "berth: waiting up to %s for root=%s\n", cfg.RootTimeout, spec)
		dev, err := blkdev.Scanner{}.Wait(spec, cfg.RootTimeout, 100*time.Millisecond)
		if err != nil {
			return &Error{Reason: "the root device did not appear", Fix: "check root= against the devices listed; a missing storage driver means the initramfs lacks its module (berth initramfs build)", Err: err}
		}
		fmt.Fprintf(con, "berth: root device %s\n", dev)
		fstype := args.RootFSType
		if fstype == "" {
			fstype = dev.FSType
		}
		loadModuleList(con, filepath.Join("/", FilesystemModulesDir, filepath.Base(fstype)), "root filesystem "+fstype, true)
		if err := MountRoot(dev, args, cfg.Sysroot); err != nil {
			return &Error{Reason: "cannot mount the root filesystem " + dev.Dev, Fix: "check rootfstype= and rootflags=, or run fsck on it from a rescue system", Err: err}
		}
		if args.Berth() {
			rec, err := Setup(Options{Sysroot: cfg.Sysroot, Args: args, Console: con, RootDevice: dev.Dev})
			if err != nil {
				return err
			}
			fmt.Fprintf(con, "berth: deployment %s (%s, verity %s) is ready; switching root\n", rec.Deploy, rec.Local, rec.Verity)
		}
		return SwitchRoot(cfg.Sysroot, args.Init, os.Args[1:])
	}()
	Fail(cfg.Console, err, debugShell, cfg.FailTimeout)
}

func earlyMounts() error {
	for _, m := range []struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}{
		{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
		{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.dst, err)
		}
	}
	return nil
}

// reopenConsole points stdio at /dev/console (in case the initramfs had no
// console node when the kernel started init).
func reopenConsole() io.Writer {
	f, err := os.OpenFile("/dev/console", os.O_RDWR, 0)
	if err != nil {
		return os.Stdout
	}
	for fd := 0; fd <= 2; fd++ {
		unix.Dup2(int(f.Fd()), fd)
	}
	return os.Stdout
}

// loadModules loads the initramfs's module list; failures are reported,
// not fatal (a driver for absent hardware may refuse to load).
func loadModules(con io.Writer) {
	loadModuleList(con, "/"+ModulesLoadList, "storage and composefs", false)
}

// loadModuleList loads the modules listed in file. optional: a missing list
// is normal (an older initramfs, or a filesystem built into the kernel).
func loadModuleList(con io.Writer, file, what string, optional bool) {
	var uts unix.Utsname
	unix.Uname(&uts)
	kver := unix.ByteSliceToString(uts.Release[:])
	dir := filepath.Join("/usr/lib/modules", kver)
	f, err := os.Open(file)
	if err != nil {
		if !optional {
			fmt.Fprintf(con, "berth: no module list (%v); relying on built-in drivers\n", err)
		}
		return
	}
	defer f.Close()
	if _, err := os.Stat(dir); err != nil {
		fmt.Fprintf(con, "berth: WARNING: this initramfs has no modules for the running kernel %s (%v)\n", kver, err)
		return
	}
	start := time.Now()
	counts := map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rel := strings.TrimSpace(sc.Text())
		if rel == "" || strings.HasPrefix(rel, "#") {
			continue
		}
		r := kmod.Load(filepath.Join(dir, rel))
		if errors.Is(r.Err, unix.ENODEV) {
			// The module's hardware or CPU feature is absent (crc32c-intel
			// without SSE4.2, ...): expected, not a failure.
			counts["no-device"]++
			continue
		}
		if r.Err != nil {
			counts["failed"]++
			fmt.Fprintf(con, "berth: %v\n", r.Err)
			continue
		}
		counts[r.How]++
	}
	fmt.Fprintf(con, "berth: %s modules for %s loaded in %s: %d by the kernel from compressed files, %d uncompressed, %d decompressed by berth-init, %d already loaded, %d not for this hardware, %d failed\n",
		what, kver, time.Since(start).Round(time.Millisecond), counts["finit-compressed"], counts["finit"], counts["init-decompressed"], counts["already-loaded"], counts["no-device"], counts["failed"])
}

// MountRoot mounts the physical root at target. A berth root is mounted
// read-write: it carries the writable layer and the shared state. A plain
// root follows ro/rw like the kernel (read-only unless rw).
func MountRoot(dev blkdev.Device, args *cmdline.Args, target string) error {
	fstype := args.RootFSType
	if fstype == "" {
		fstype = dev.FSType
	}
	if fstype == "" {
		return fmt.Errorf("unknown filesystem on %s; add rootfstype=", dev.Dev)
	}
	var flags uintptr
	var data []string
	for _, o := range strings.Split(args.RootFlags, ",") {
		switch o {
		case "":
		case "noatime":
			flags |= unix.MS_NOATIME
		case "nodiratime":
			flags |= unix.MS_NODIRATIME
		case "relatime":
			flags |= unix.MS_RELATIME
		case "nosuid":
			flags |= unix.MS_NOSUID
		case "nodev":
			flags |= unix.MS_NODEV
		default:
			data = append(data, o)
		}
	}
	if !args.Berth() && (args.ReadOnly || !args.RootModeSet) {
		flags |= unix.MS_RDONLY
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(dev.Dev, target, fstype, flags, strings.Join(data, ",")); err != nil {
		return fmt.Errorf("mount %s (%s) on %s: %w", dev.Dev, fstype, target, err)
	}
	return nil
}

// Fail shows err on the console (reason and fix on one screen), then opens
// a shell if asked and one exists, else waits timeout and reboots so that
// boot counting can fall back to the previous entry.
func Fail(con io.Writer, err error, debugShell bool, timeout time.Duration) {
	if con == nil {
		con = os.Stdout
	}
	fmt.Fprint(con, FormatError(err))
	if debugShell {
		for _, sh := range []string{"/bin/sh", "/usr/bin/sh", "/bin/busybox"} {
			if _, err := os.Stat(sh); err == nil {
				fmt.Fprintf(con, "berth: berth.debug=shell: starting %s; exit it to reboot\n", sh)
				c := exec.Command(sh)
				c.Stdin, c.Stdout, c.Stderr = os.Stdin, os.Stdout, os.Stderr
				c.Run()
				reboot(con)
			}
		}
		fmt.Fprintln(con, "berth: berth.debug=shell: this initramfs has no shell")
	}
	fmt.Fprintf(con, "berth: rebooting in %s\n", timeout)
	time.Sleep(timeout)
	reboot(con)
}

func reboot(con io.Writer) {
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	fmt.Fprintf(con, "berth: reboot failed: %v\n", err)
	for {
		time.Sleep(time.Hour) // PID 1 must not exit (kernel panic)
	}
}

// FormatError renders a boot failure for the console.
func FormatError(err error) string {
	var b strings.Builder
	b.WriteString("\n===================== berth: cannot boot =====================\n")
	var be *Error
	if errors.As(err, &be) {
		fmt.Fprintf(&b, "Problem: %s\n", be.Reason)
		if be.Err != nil {
			fmt.Fprintf(&b, "Details: %v\n", be.Err)
		}
		if be.Fix != "" {
			fmt.Fprintf(&b, "Fix:     %s\n", be.Fix)
		}
	} else if err != nil {
		fmt.Fprintf(&b, "Problem: %v\n", err)
	}
	b.WriteString("==============================================================\n")
	return b.String()
}
