package setuproot

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// DefaultInits are tried in order when init= is not given.
var DefaultInits = []string{"/sbin/init", "/usr/lib/systemd/systemd", "/lib/systemd/systemd", "/etc/init", "/bin/init"}

// SwitchRoot makes newRoot the root filesystem and execs init in it, the way
// util-linux switch_root does: move /dev /proc /sys /run into newRoot,
// delete the initramfs contents (without crossing into other filesystems,
// and only when / is a ramfs/tmpfs), move newRoot onto /, chroot and exec.
// It returns only on failure.
func SwitchRoot(newRoot, init string, args []string) error {
	for _, m := range []string{"/dev", "/proc", "/sys", "/run"} {
		dst := filepath.Join(newRoot, m)
		if fi, err := os.Lstat(dst); err != nil || !fi.IsDir() {
			// The image has no such directory: do not leave the mount behind.
			unix.Unmount(m, unix.MNT_DETACH)
			continue
		}
		if err := unix.Mount(m, dst, "", unix.MS_MOVE, ""); err != nil {
			unix.Unmount(m, unix.MNT_DETACH)
		}
	}
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("switch root: chdir %s: %w", newRoot, err)
	}
	oldRoot, err := unix.Open("/", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("switch root: open /: %w", err)
	}
	defer unix.Close(oldRoot)
	if err := unix.Mount(newRoot, "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("switch root: move %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("switch root: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("switch root: chdir /: %w", err)
	}
	// Free the initramfs memory. Errors are not fatal: the new root works.
	var st unix.Statfs_t
	if unix.Fstatfs(oldRoot, &st) == nil && (st.Type == unix.RAMFS_MAGIC || st.Type == unix.TMPFS_MAGIC) {
		var rst unix.Stat_t
		if unix.Fstat(oldRoot, &rst) == nil {
			removeContents(oldRoot, rst.Dev)
		}
	}
	candidates := DefaultInits
	if init != "" {
		candidates = []string{init}
	}
	var tried []string
	for _, c := range candidates {
		if err := unix.Access(c, unix.X_OK); err != nil {
			tried = append(tried, c+": "+err.Error())
			continue
		}
		err := unix.Exec(c, append([]string{c}, args...), os.Environ())
		tried = append(tried, c+": "+err.Error())
	}
	return fmt.Errorf("switch root: no init to run in the new root (%v)", tried)
}

// removeContents deletes everything below the directory dirfd that is on
// device dev, like util-linux's recursiveRemove.
func removeContents(dirfd int, dev uint64) {
	// Read through a dup: closing it must not close the caller's dirfd.
	dup, err := unix.Dup(dirfd)
	if err != nil {
		return
	}
	d := os.NewFile(uintptr(dup), "initramfs")
	defer d.Close()
	if _, err := d.Seek(0, 0); err != nil {
		return
	}
	names, err := d.Readdirnames(-1)
	if err != nil {
		return
	}
	for _, n := range names {
		var st unix.Stat_t
		if err := unix.Fstatat(dirfd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Dev != dev {
			continue
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			sub, err := unix.Openat(dirfd, n, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err == nil {
				removeContents(sub, dev)
				unix.Close(sub)
			}
			unix.Unlinkat(dirfd, n, unix.AT_REMOVEDIR) // EBUSY for mount points: fine
			continue
		}
		unix.Unlinkat(dirfd, n, 0)
	}
}
