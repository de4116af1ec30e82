package install

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/loopdev"
)

// target is the disk berth installs to: a block device or a disk image file.
type target struct {
	Path    string
	IsBlock bool
	Size    int64 // bytes (for a file: the size it has once prepared)
	Created bool  // the image file was created by this install

	missing bool  // a file target that does not exist yet
	extend  int64 // a file target to extend to this size (0: keep)
}

// inspectTarget checks that path may be installed to, without changing
// it: it refuses a target that is mounted or in use, and one with a
// partition table or other data unless wipe is set. A file target that
// does not exist is planned with size (0: DefaultSize), an existing
// smaller one is planned to be extended to size; prepare does that.
func inspectTarget(path string, size int64, wipe bool) (*target, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("target %s: %w", path, err)
	}
	t := &target{Path: abs}
	fi, err := os.Stat(abs)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if size <= 0 {
			size = DefaultSize
		}
		if _, err := os.Stat(filepath.Dir(abs)); err != nil {
			return nil, fmt.Errorf("create disk image %s: %w", abs, err)
		}
		t.Size, t.missing = size, true
		return t, nil
	case err != nil:
		return nil, fmt.Errorf("target %s: %w", abs, err)
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		t.IsBlock = true
	case fi.Mode().IsRegular():
	default:
		return nil, fmt.Errorf("target %s is neither a block device nor a regular file", abs)
	}

	if err := checkNotInUse(t); err != nil {
		return nil, err
	}
	used, what, err := hasContent(abs)
	if err != nil {
		return nil, err
	}
	if used && !wipe {
		return nil, fmt.Errorf("target %s has %s; pass --wipe to overwrite it (everything on it is lost)", abs, what)
	}
	if t.IsBlock {
		t.Size, err = blockSize(abs)
		if err != nil {
			return nil, err
		}
	} else {
		t.Size = fi.Size()
		if size > t.Size {
			t.Size, t.extend = size, size
		}
	}
	return t, nil
}

// prepare is the first write to the target: it checks again that the
// target is not in use (time has passed since inspectTarget), then creates
// a new file target sparse, or extends a smaller one.
func (t *target) prepare() error {
	if t.missing {
		f, err := os.OpenFile(t.Path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return fmt.Errorf("create disk image %s: %w", t.Path, err)
		}
		t.Created, t.missing = true, false
		err = f.Truncate(t.Size)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("create disk image %s: %w", t.Path, err)
		}
		return nil
	}
	if err := checkNotInUse(t); err != nil {
		return err
	}
	if t.extend > 0 {
		if err := os.Truncate(t.Path, t.extend); err != nil {
			return fmt.Errorf("extend disk image %s to %d bytes: %w", t.Path, t.extend, err)
		}
	}
	return nil
}

func blockSize(dev string) (int64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, fmt.Errorf("target %s: %w", dev, err)
	}
	defer f.Close()
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, fmt.Errorf("target %s: size: %w", dev, err)
	}
	return n, nil
}

// checkNotInUse refuses a target that is mounted, used as swap, held by
// another device (device-mapper, md, loop), or (for a file) backing a
// loop device.
func checkNotInUse(t *target) error {
	if !t.IsBlock {
		for _, dev := range loopDevicesBacking(t.Path) {
			return fmt.Errorf("target %s is in use: it backs %s (detach it with `losetup -d %s`)", t.Path, dev, dev)
		}
		return checkFileLocks(t.Path)
	}
	var st unix.Stat_t
	if err := unix.Stat(t.Path, &st); err != nil {
		return fmt.Errorf("target %s: %w", t.Path, err)
	}
	sysDir := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	real, err := filepath.EvalSymlinks(sysDir)
	if err != nil {
		return fmt.Errorf("target %s: %w", t.Path, err)
	}
	if _, err := os.Stat(filepath.Join(real, "partition")); err == nil {
		return fmt.Errorf("target %s is a partition; give the whole disk", t.Path)
	}
	name := filepath.Base(real)
	devs := map[string]string{fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev)): name}
	if err := checkHolders(real, name); err != nil {
		return fmt.Errorf("target %s is in use: %w", t.Path, err)
	}
	ents, _ := os.ReadDir(real)
	for _, e := range ents {
		sub := filepath.Join(real, e.Name())
		if _, err := os.Stat(filepath.Join(sub, "partition")); err != nil {
			continue
		}
		if b, err := os.ReadFile(filepath.Join(sub, "dev")); err == nil {
			devs[strings.TrimSpace(string(b))] = e.Name()
		}
		if err := checkHolders(sub, e.Name()); err != nil {
			return fmt.Errorf("target %s is in use: %w", t.Path, err)
		}
	}
	if m, err := mountedDevices(); err != nil {
		return err
	} else {
		for majmin, name := range devs {
			if mp, ok := m[majmin]; ok {
				return fmt.Errorf("target %s is in use: /dev/%s is mounted on %s", t.Path, name, mp)
			}
		}
	}
	if b, err := os.ReadFile("/proc/swaps"); err == nil {
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) == 0 {
				continue
			}
			for _, name := range devs {
				if f[0] == "/dev/"+name {
					return fmt.Errorf("target %s is in use: /dev/%s is active swap", t.Path, name)
				}
			}
		}
	}
	// Last word from the kernel: O_EXCL on a block device fails with EBUSY
	// while anything (a mount, dm, md, swap) claims it.
	fd, err := unix.Open(t.Path, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("target %s is in use (the kernel reports it busy)", t.Path)
		}
		return fmt.Errorf("target %s: %w", t.Path, err)
	}
	unix.Close(fd)
	return nil
}

func checkHolders(sysDir, name string) error {
	ents, err := os.ReadDir(filepath.Join(sysDir, "holders"))
	if err != nil {
		return nil
	}
	for _, e := range ents {
		return fmt.Errorf("/dev/%s is held by /dev/%s", name, e.Name())
	}
	return nil
}

// mountedDevices maps "major:minor" of every mounted filesystem's device
// to its mount point, from /proc/self/mountinfo.
func mountedDevices() (map[string]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	m := map[string]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 5 {
			continue
		}
		if _, ok := m[fs[2]]; !ok {
			m[fs[2]] = unescapeMount(fs[4])
		}
	}
	return m, sc.Err()
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// loopDevicesBacking lists the loop devices whose backing file is path.
func loopDevicesBacking(path string) []string {
	var out []string
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), "loop") {
			continue
		}
		bf := loopdev.BackingFile("/dev/" + e.Name())
		if bf == "" {
			continue
		}
		bf = strings.TrimSuffix(bf, " (deleted)")
		if bf == path {
			out = append(out, "/dev/"+e.Name())
		}
	}
	return out
}

// hasContent reports whether the first MiB of a disk holds a partition
// table or any other data (a fresh or zeroed disk holds none).
func hasContent(path string) (bool, string, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, "", fmt.Errorf("target %s: %w", path, err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return false, "", fmt.Errorf("target %s: read: %w", path, err)
	}
	buf = buf[:n]
	for _, off := range []int{512, 4096} {
		if len(buf) >= off+8 && string(buf[off:off+8]) == "EFI PART" {
			return true, "a GPT partition table", nil
		}
	}
	if len(buf) >= 512 && buf[510] == 0x55 && buf[511] == 0xaa {
		return true, "an MBR partition table or boot sector", nil
	}
	if len(bytes.Trim(buf, "\x00")) > 0 {
		return true, "data in its first MiB", nil
	}
	return false, "", nil
}

// checkFileLocks refuses a disk image another program has locked: qemu
// holds open-file-description locks on the images it runs.
func checkFileLocks(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("target %s: %w", path, err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: 0, Len: 0}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return nil // no OFD locks on this filesystem: nothing to learn
	}
	if lk.Type != unix.F_UNLCK {
		return fmt.Errorf("target %s is in use: another program holds a lock on it (a running VM?)", path)
	}
	return nil
}
