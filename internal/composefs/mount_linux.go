package composefs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/loopdev"
	"golang.org/x/sys/unix"
)

// Errors wrapped when the running kernel (or the filesystem) lacks a
// feature a composefs mount needs; the message names the feature.
var (
	ErrNoVerity         = errors.New("fs-verity is not available")
	ErrNoErofs          = errors.New("the kernel lacks EROFS")
	ErrNoOverlayFeature = errors.New("the kernel's overlayfs lacks a needed feature")
)

// MountOptions describe a composefs mount.
type MountOptions struct {
	Image   string // composefs EROFS image file
	Objects string // object store directory (data-only lower layer)
	Upper   string // overlay upperdir; "" = read-only mount
	Work    string // overlay workdir
	Verity  bool   // verity=require
}

// forceLoop and forceLegacyLowerdir make Mount take the fallbacks for
// older kernels (no file-backed EROFS; no lowerdir+/datadir+) so tests
// exercise them on new kernels too.
var forceLoop, forceLegacyLowerdir = false, false

// Mount mounts a composefs image at target: the image as a detached EROFS
// mount (file-backed, or on a loop device when the kernel cannot mount
// files), then overlayfs with that mount as its lower layer and the object
// store as a data-only lower layer. The EROFS mount is never attached
// anywhere: the overlay holds the only reference, so unmounting target
// releases everything (a loop device is set to auto-clear). On failure
// nothing is left behind.
func Mount(target string, opts MountOptions) error {
	if err := mount(target, opts); err != nil {
		return fmt.Errorf("mount composefs %s at %s: %w", opts.Image, target, err)
	}
	return nil
}

func mount(target string, opts MountOptions) error {
	if opts.Image == "" || opts.Objects == "" || target == "" {
		return errors.New("image, objects directory and mount point are required")
	}
	if (opts.Upper == "") != (opts.Work == "") {
		return errors.New("an upper directory needs a work directory and vice versa")
	}
	for _, d := range []string{target, opts.Objects} {
		if fi, err := os.Stat(d); err != nil {
			return err
		} else if !fi.IsDir() {
			return fmt.Errorf("%s is not a directory", d)
		}
	}
	if opts.Verity {
		if err := checkVerity(opts.Image, opts.Objects); err != nil {
			return err
		}
	}
	erofsFd, err := mountErofs(opts.Image)
	if err != nil {
		return err
	}
	defer unix.Close(erofsFd)
	// Linux before 6.15 refuses a detached mount as an overlay layer
	// (clone_private_mount: "overlayfs: failed to clone lowerpath", EINVAL):
	// attach the EROFS mount to a private temporary directory first; the
	// overlay keeps its own clone, so it is detached again right after.
	tmp, err := os.MkdirTemp("", "composefs-erofs-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	if err := unix.MoveMount(erofsFd, "", unix.AT_FDCWD, tmp, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("attach erofs at %s: %w", tmp, err)
	}
	defer unix.Unmount(tmp, unix.MNT_DETACH)
	ovlFd, err := createOverlay(erofsFd, opts)
	if err != nil {
		return err
	}
	defer unix.Close(ovlFd)
	if err := unix.MoveMount(ovlFd, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("attach overlay at %s: %w", target, err)
	}
	return nil
}

// checkVerity refuses verity=require where files cannot have fs-verity:
// overlayfs accepts the option even on kernels without CONFIG_FS_VERITY
// and then fails every read of an external file with EIO ("has no
// fs-verity digest"), so the check is made here, up front, on the image
// and on one object.
func checkVerity(image, objects string) error {
	probe := []string{image}
	if obj := anyObject(objects); obj != "" {
		probe = append(probe, obj)
	}
	for _, p := range probe {
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		_, _, err = fsverity.Measure(f)
		f.Close()
		if errors.Is(err, fsverity.ErrNotSupported) {
			return fmt.Errorf("%w: verity=require needs fs-verity, which the kernel (CONFIG_FS_VERITY) or the filesystem of %s (e.g. ext4 without -O verity) lacks", ErrNoVerity, p)
		}
		if errors.Is(err, fsverity.ErrNotEnabled) && p != image {
			return fmt.Errorf("%w: verity=require, but object %s has no fs-verity enabled", ErrNoVerity, p)
		}
		if err != nil && !errors.Is(err, fsverity.ErrNotEnabled) {
			return err
		}
	}
	return nil
}

// anyObject returns the path of some object in the store, or "".
func anyObject(objects string) string {
	d, err := os.Open(objects)
	if err != nil {
		return ""
	}
	defer d.Close()
	for {
		names, err := d.Readdirnames(64)
		for _, n := range names {
			if len(n) != 2 || !isLowerHex(n) {
				continue
			}
			sub, err := os.Open(filepath.Join(objects, n))
			if err != nil {
				continue
			}
			objs, _ := sub.Readdirnames(4)
			sub.Close()
			for _, o := range objs {
				if !strings.HasPrefix(o, ".") {
					return filepath.Join(objects, n, o)
				}
			}
		}
		if err != nil || len(names) == 0 {
			return ""
		}
	}
}

// fsContext is an fsopen() file descriptor; its log holds the kernel's
// messages about a failed configuration.
type fsContext int

func (c fsContext) log() string {
	var msgs []string
	buf := make([]byte, 4096)
	for {
		n, err := unix.Read(int(c), buf)
		if err != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimSpace(string(buf[:n])))
	}
	return strings.Join(msgs, "; ")
}

// wrap adds the kernel's log messages to err.
func (c fsContext) wrap(what string, err error) error {
	if l := c.log(); l != "" {
		return fmt.Errorf("%s: %w (kernel: %s)", what, err, l)
	}
	return fmt.Errorf("%s: %w", what, err)
}

func fsopen(fstype string) (fsContext, error) {
	fd, err := unix.Fsopen(fstype, unix.FSOPEN_CLOEXEC)
	if err != nil {
		return -1, err
	}
	return fsContext(fd), nil
}

// mountErofs returns a detached read-only EROFS mount of image.
func mountErofs(image string) (int, error) {
	if !forceLoop {
		fd, err := mountErofsSource(image)
		if err == nil {
			return fd, nil
		}
		// ENOTBLK: the kernel lacks CONFIG_EROFS_FS_BACKED_BY_FILE (Linux
		// < 6.12), so it wants a block device. Other errors are final.
		if !errors.Is(err, unix.ENOTBLK) {
			return -1, err
		}
	}
	loop, err := loopdev.Attach(image, loopdev.Options{ReadOnly: true})
	if err != nil {
		return -1, fmt.Errorf("EROFS cannot mount the image file directly, and a loop device failed: %w", err)
	}
	fd, err := mountErofsSource(loop.Path)
	// The mount (if any) holds the device now; with auto-clear it goes
	// away when that mount does. On failure, clear it explicitly.
	if err != nil {
		loop.Detach()
		return -1, err
	}
	loop.Release()
	return fd, nil
}

func mountErofsSource(source string) (int, error) {
	ctx, err := fsopen("erofs")
	if err != nil {
		if errors.Is(err, unix.ENODEV) {
			return -1, fmt.Errorf("%w (CONFIG_EROFS_FS; is the erofs module loaded?)", ErrNoErofs)
		}
		if errors.Is(err, unix.ENOSYS) {
			return -1, fmt.Errorf("%w: the kernel lacks the new mount API (fsopen, Linux 5.2+)", ErrNoOverlayFeature)
		}
		return -1, fmt.Errorf("fsopen erofs: %w", err)
	}
	defer unix.Close(int(ctx))
	if err := unix.FsconfigSetString(int(ctx), "source", source); err != nil {
		return -1, ctx.wrap("erofs source "+source, err)
	}
	// A read-only superblock: a block device (the read-only loop) is then
	// opened for reading only.
	if err := unix.FsconfigSetFlag(int(ctx), "ro"); err != nil {
		return -1, ctx.wrap("erofs ro", err)
	}
	if err := unix.FsconfigCreate(int(ctx)); err != nil {
		return -1, ctx.wrap("mount erofs "+source, err)
	}
	fd, err := unix.Fsmount(int(ctx), unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_RDONLY)
	if err != nil {
		return -1, ctx.wrap("fsmount erofs "+source, err)
	}
	return fd, nil
}

// createOverlay returns a detached overlay mount over the EROFS mount.
func createOverlay(erofsFd int, opts MountOptions) (int, error) {
	lower := fmt.Sprintf("/proc/self/fd/%d", erofsFd)
	fd, err := overlayWith(lower, opts, !forceLegacyLowerdir)
	if errors.Is(err, errNoAppendKeys) {
		// Linux 6.5–6.7: no lowerdir+/datadir+, but "A::B" data-only syntax.
		fd, err = overlayWith(lower, opts, false)
	}
	return fd, err
}

var errNoAppendKeys = errors.New("overlayfs has no lowerdir+/datadir+ keys")

func overlayWith(lower string, opts MountOptions, appendKeys bool) (int, error) {
	ctx, err := fsopen("overlay")
	if err != nil {
		if errors.Is(err, unix.ENODEV) {
			return -1, fmt.Errorf("%w: overlayfs itself (CONFIG_OVERLAY_FS; is the overlay module loaded?)", ErrNoOverlayFeature)
		}
		return -1, fmt.Errorf("fsopen overlay: %w", err)
	}
	defer unix.Close(int(ctx))
	set := func(key, value string) error {
		if err := unix.FsconfigSetString(int(ctx), key, value); err != nil {
			return ctx.wrap(fmt.Sprintf("overlay option %s=%s", key, value), err)
		}
		return nil
	}
	if appendKeys {
		if err := unix.FsconfigSetString(int(ctx), "lowerdir+", lower); err != nil {
			if errors.Is(err, unix.EINVAL) {
				ctx.log()
				return -1, errNoAppendKeys
			}
			return -1, ctx.wrap("overlay lowerdir+", err)
		}
		if err := unix.FsconfigSetString(int(ctx), "datadir+", opts.Objects); err != nil {
			if errors.Is(err, unix.EINVAL) {
				ctx.log()
				return -1, errNoAppendKeys
			}
			return -1, ctx.wrap("overlay datadir+ "+opts.Objects, err)
		}
	} else {
		if err := set("lowerdir", escapeOverlayPath(lower)+"::"+escapeOverlayPath(opts.Objects)); err != nil {
			return -1, fmt.Errorf("%w: data-only lower layers (Linux 6.5+): %w", ErrNoOverlayFeature, err)
		}
	}
	if err := set("metacopy", "on"); err != nil {
		return -1, fmt.Errorf("%w: metacopy: %w", ErrNoOverlayFeature, err)
	}
	if err := set("redirect_dir", "on"); err != nil {
		return -1, fmt.Errorf("%w: redirect_dir: %w", ErrNoOverlayFeature, err)
	}
	if opts.Verity {
		if err := set("verity", "require"); err != nil {
			return -1, fmt.Errorf("%w: overlayfs verity= option (Linux 6.6+): %w", ErrNoVerity, err)
		}
	}
	if opts.Upper != "" {
		if err := set("upperdir", opts.Upper); err != nil {
			return -1, err
		}
		if err := set("workdir", opts.Work); err != nil {
			return -1, err
		}
	}
	if err := unix.FsconfigCreate(int(ctx)); err != nil {
		return -1, ctx.wrap("create overlay", err)
	}
	attrs := 0
	if opts.Upper == "" {
		attrs = unix.MOUNT_ATTR_RDONLY
	}
	fd, err := unix.Fsmount(int(ctx), unix.FSMOUNT_CLOEXEC, attrs)
	if err != nil {
		return -1, ctx.wrap("fsmount overlay", err)
	}
	return fd, nil
}

// escapeOverlayPath escapes the characters overlayfs's lowerdir= parser
// treats specially.
func escapeOverlayPath(p string) string {
	r := strings.NewReplacer(`\`, `\\`, `:`, `\:`, `,`, `\,`)
	return r.Replace(p)
}

// Unmount unmounts a composefs mount made by Mount. The detached EROFS
// mount (and any loop device) goes away with it.
func Unmount(target string) error {
	if err := unix.Unmount(target, unix.UMOUNT_NOFOLLOW); err != nil {
		return fmt.Errorf("unmount composefs at %s: %w", target, err)
	}
	return nil
}
