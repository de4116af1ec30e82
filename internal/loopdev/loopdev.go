// Package loopdev attaches files to loop block devices with partition
// scanning, so that a disk image's partitions appear as /dev/loopNpM.
package loopdev

import (
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Device is an attached loop device.
type Device struct {
	Path string // /dev/loopN
	f    *os.File
}

// Options of Attach.
type Options struct {
	ReadOnly bool
	// PartScan asks the kernel to scan the partition table. Kernels built
	// without the partition format (CONFIG_EFI_PARTITION for GPT) show no
	// partitions; attach a window of the file instead (Offset, SizeLimit).
	PartScan bool
	// Offset and SizeLimit make the device a window of the file (bytes; a
	// zero SizeLimit runs to the end of the file).
	Offset, SizeLimit int64
}

// Attach binds the file (or block device) at path to a free loop device,
// configured in one LOOP_CONFIGURE call, so there is no window without the
// requested partitions or offsets. The device has autoclear set: if this
// process dies, the kernel detaches it once nothing (no mount) uses it.
func Attach(path string, opts Options) (*Device, error) {
	readOnly := opts.ReadOnly
	if opts.Offset < 0 || opts.SizeLimit < 0 {
		return nil, fmt.Errorf("loop attach %s: negative offset or size", path)
	}
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	backing, err := os.OpenFile(path, flag|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("loop attach %s: %w", path, err)
	}
	defer backing.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("loop attach %s: %w", path, err)
	}
	defer ctl.Close()
	for try := 0; try < 20; try++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("loop attach %s: get free loop device: %w", path, err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		f, err := openDev(dev, flag)
		if err != nil {
			return nil, fmt.Errorf("loop attach %s: %w", path, err)
		}
		cfg := unix.LoopConfig{Fd: uint32(backing.Fd())}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
		if opts.PartScan {
			cfg.Info.Flags |= unix.LO_FLAGS_PARTSCAN
		}
		cfg.Info.Offset = uint64(opts.Offset)
		cfg.Info.Sizelimit = uint64(opts.SizeLimit)
		if readOnly {
			cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
		}
		copy(cfg.Info.File_name[:], path)
		err = unix.IoctlLoopConfigure(int(f.Fd()), &cfg)
		if err == nil {
			return &Device{Path: dev, f: f}, nil
		}
		f.Close()
		if errors.Is(err, unix.EBUSY) {
			continue // another process took it between GET_FREE and CONFIGURE
		}
		return nil, fmt.Errorf("loop attach %s to %s: %w", path, dev, err)
	}
	return nil, fmt.Errorf("loop attach %s: no free loop device after 20 tries", path)
}

// openDev opens a loop device node, waiting briefly for devtmpfs to create it.
func openDev(dev string, flag int) (*os.File, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, err := os.OpenFile(dev, flag|unix.O_CLOEXEC, 0)
		if err == nil || !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return f, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Partition returns the device node of partition n (1-based), waiting up
// to timeout for the kernel to create it.
func (d *Device) Partition(n int, timeout time.Duration) (string, error) {
	p := fmt.Sprintf("%sp%d", d.Path, n)
	deadline := time.Now().Add(timeout)
	for {
		fi, err := os.Stat(p)
		if err == nil && fi.Mode()&os.ModeDevice != 0 {
			return p, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("partition %d of %s did not appear within %s", n, d.Path, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Rescan asks the kernel to re-read the partition table (after it changed).
func (d *Device) Rescan() error {
	var err error
	for try := 0; try < 50; try++ {
		if err = unix.IoctlSetInt(int(d.f.Fd()), unix.BLKRRPART, 0); err == nil || !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("re-read partition table of %s: %w", d.Path, err)
	}
	return nil
}

// Detach releases the device. Call it after every partition is unmounted.
func (d *Device) Detach() error {
	if d.f == nil {
		return nil
	}
	var err error
	for try := 0; try < 50; try++ {
		// EBUSY right after umount: the partition's last reference goes away asynchronously.
		if err = unix.IoctlSetInt(int(d.f.Fd()), unix.LOOP_CLR_FD, 0); err == nil || !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	cerr := d.f.Close()
	d.f = nil
	if err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("detach %s: %w", d.Path, err)
	}
	if cerr != nil {
		return fmt.Errorf("detach %s: %w", d.Path, cerr)
	}
	return nil
}

// Release closes berth's handle on the device without detaching it: with
// autoclear set, the kernel detaches it when its last user (a mount made
// from it) goes away.
func (d *Device) Release() error {
	if d.f == nil {
		return nil
	}
	err := d.f.Close()
	d.f = nil
	if err != nil {
		return fmt.Errorf("release %s: %w", d.Path, err)
	}
	return nil
}

// BackingFile returns the file a loop device is attached to ("" if none),
// from sysfs.
func BackingFile(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// KernelReadsGPT reports whether the running kernel parses GPT partition
// tables itself (CONFIG_EFI_PARTITION). Without /proc/config.gz it assumes
// yes (every distribution kernel does).
func KernelReadsGPT() bool {
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return true
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		return true
	}
	sc := bufio.NewScanner(zr)
	for sc.Scan() {
		switch sc.Text() {
		case "CONFIG_EFI_PARTITION=y":
			return true
		case "# CONFIG_EFI_PARTITION is not set":
			return false
		}
	}
	return true
}
