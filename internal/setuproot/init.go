package setuproot

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/blkdev"
	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/initrd/layout"
	"github.com/berth-dev/berth/internal/kmod"
)

const storageFallback = 5 * time.Second

// InitConfig configures the PID 1 flow of berth's initramfs.
type InitConfig struct {
	Console     io.Writer     // default os.Stdout (the kernel's /dev/console)
	RootTimeout time.Duration // wait for root=; default 90s
	FailTimeout time.Duration // show the error this long before rebooting; default 30s
	Sysroot     string        // default "/sysroot"
	Prepare     PrepareFunc   // see Options.Prepare
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
		mods := kmod.StartInitramfs(con, "/"+layout.ModulesLoadList, "/"+layout.StorageModulesList, "/"+layout.FilesystemModulesDir)
		spec, err := blkdev.ParseSpec(args.Root)
		if err != nil {
			return &Error{Reason: "root= is missing or not understood", Fix: "add root=UUID=…, PARTUUID=…, LABEL=… or /dev/… to the boot entry", Err: err}
		}
		fmt.Fprintf(con, "berth: waiting up to %s for root=%s\n", cfg.RootTimeout, spec)
		// The drivers of the present devices load in the background; if the
		// root device is not there after storageFallback, load them all.
		first := min(storageFallback, cfg.RootTimeout)
		dev, err := blkdev.Scanner{}.Wait(spec, first, 20*time.Millisecond)
		if err != nil {
			mods.LoadStorage()
			dev, err = blkdev.Scanner{}.Wait(spec, cfg.RootTimeout-first, 100*time.Millisecond)
		}
		if err != nil {
			return &Error{Reason: "the root device did not appear", Fix: "check root= against the devices listed; a missing storage driver means the initramfs lacks its module (berth initramfs build)", Err: err}
		}
		fmt.Fprintf(con, "berth: root device %s\n", dev)
		fstype := args.RootFSType
		if fstype == "" {
			fstype = dev.FSType
		}
		mods.LoadFilesystem(fstype)
		if err := MountRoot(dev, args, cfg.Sysroot); err != nil {
			return &Error{Reason: "cannot mount the root filesystem " + dev.Dev, Fix: "check rootfstype= and rootflags=, or run fsck on it from a rescue system", Err: err}
		}
		mods.Finish() // composefs modules in, uevent listener stopped
		if args.Berth() {
			rec, err := Setup(Options{Sysroot: cfg.Sysroot, Args: args, Console: con, RootDevice: dev.Dev, Prepare: cfg.Prepare})
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
