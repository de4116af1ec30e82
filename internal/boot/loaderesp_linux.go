package boot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/blkdev"
	"github.com/berth-dev/berth/internal/efivar"
)

// LoaderESPDir is where berth mounts the ESP the boot loader ran from
// when nothing else mounted it. A berth root is an overlay, so systemd's
// gpt-auto-generator (which looks for the ESP on the root's disk) does
// not mount one; /run keeps berth out of the image's own /efi and /boot.
const LoaderESPDir = "/run/berth/esp"

// MountedESP returns the ESP (or XBOOTLDR) mounted below sysroot that
// holds systemd-boot's loader directory: efi, boot/efi or boot. "" if none.
func MountedESP(sysroot string) string {
	for _, c := range []string{"efi", "boot/efi", "boot"} {
		d := filepath.Join(sysroot, c)
		if fi, err := os.Stat(filepath.Join(d, "loader")); err == nil && fi.IsDir() {
			return d
		}
	}
	return ""
}

// LoaderESP finds the ESP systemd-boot (or systemd-stub) was started from:
// the partition whose GPT partition UUID the loader put in the
// LoaderDevicePartUUID EFI variable.
type LoaderESP struct {
	EFIVars efivar.Store   // default: efivar.DefaultDir
	Scanner blkdev.Scanner // default: /sys and /dev
}

// PartUUID returns the loader's ESP partition UUID, lowercase.
func (l LoaderESP) PartUUID() (string, error) {
	vars := l.EFIVars
	if vars.Dir == "" {
		vars.Dir = efivar.DefaultDir
	}
	_, b, err := vars.Read("LoaderDevicePartUUID", efivar.LoaderGUID)
	if err != nil {
		return "", fmt.Errorf("find the boot loader's ESP: %w (booted without systemd-boot or systemd-stub?)", err)
	}
	u := strings.ToLower(strings.TrimSpace(efivar.DecodeUTF16(b)))
	if len(u) != 36 || strings.Trim(u, "0123456789abcdef-") != "" {
		return "", fmt.Errorf("find the boot loader's ESP: LoaderDevicePartUUID %q is not a partition UUID", u)
	}
	return u, nil
}

// Device returns the block device of the loader's ESP.
func (l LoaderESP) Device() (blkdev.Device, error) {
	u, err := l.PartUUID()
	if err != nil {
		return blkdev.Device{}, err
	}
	devs, err := l.Scanner.Scan()
	if err != nil {
		return blkdev.Device{}, err
	}
	for _, d := range devs {
		if d.PartUUID == u {
			return d, nil
		}
	}
	return blkdev.Device{}, fmt.Errorf("find the boot loader's ESP: no block device has PARTUUID %s", u)
}

// Mount mounts the loader's ESP at dir (created) unless an ESP with a
// loader/ directory is already there, and returns dir. The mount is
// nosuid, nodev, noexec and only root can read it, like systemd's.
func (l LoaderESP) Mount(dir string) (string, error) {
	if fi, err := os.Stat(filepath.Join(dir, "loader")); err == nil && fi.IsDir() {
		return dir, nil
	}
	d, err := l.Device()
	if err != nil {
		return "", err
	}
	if d.FSType != "" && d.FSType != "vfat" {
		return "", fmt.Errorf("boot loader's ESP %s is %s, not FAT", d.Dev, d.FSType)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("mount ESP %s: %w", d.Dev, err)
	}
	err = unix.Mount(d.Dev, dir, "vfat", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC|unix.MS_RELATIME, "umask=0077")
	if errors.Is(err, unix.EBUSY) {
		// Raced with another berth process mounting it.
		if fi, serr := os.Stat(filepath.Join(dir, "loader")); serr == nil && fi.IsDir() {
			return dir, nil
		}
	}
	if err != nil {
		return "", fmt.Errorf("mount ESP %s at %s: %w", d.Dev, dir, err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "loader")); err != nil || !fi.IsDir() {
		unix.Unmount(dir, 0)
		return "", fmt.Errorf("ESP %s has no loader/ directory (not installed by berth or systemd-boot)", d.Dev)
	}
	return dir, nil
}
