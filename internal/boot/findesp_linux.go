package boot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/berth-dev/berth/internal/cmdline"
)

// FindESP returns the ESP of the berth installation below sysroot; every
// command that needs the ESP finds it here, so they cannot pick different
// ones. In order:
//
//  1. the ESP (or XBOOTLDR) mounted below sysroot that holds systemd-boot's
//     loader directory: efi, boot/efi or boot (MountedESP);
//  2. on the running system booted by berth (sysroot "/"), the ESP the boot
//     loader ran from, mounted at LoaderESPDir (root only: it mounts it);
//  3. with fresh set, a directory below sysroot (efi, boot/efi, boot) that
//     has EFI/ but no loader/ yet: an ESP before systemd-boot is installed.
//
// It returns "" and an error that says where it looked when none is found.
func FindESP(sysroot string, fresh bool) (string, error) {
	d, _, err := findESP(sysroot, fresh)
	return d, err
}

// findESP also returns why the boot loader's ESP could not be mounted.
func findESP(sysroot string, fresh bool) (string, error, error) {
	if d := MountedESP(sysroot); d != "" {
		return d, nil, nil
	}
	var loaderErr error
	if filepath.Clean(sysroot) == "/" {
		if a, err := cmdline.ReadProc(""); err == nil && a.Berth() {
			if fi, err := os.Stat(filepath.Join(LoaderESPDir, "loader")); err == nil && fi.IsDir() {
				return LoaderESPDir, nil, nil
			}
			if os.Geteuid() == 0 {
				d, err := LoaderESP{}.Mount(LoaderESPDir)
				if err == nil {
					return d, nil, nil
				}
				loaderErr = err
			}
		}
	}
	if fresh {
		for _, c := range []string{"efi", "boot/efi", "boot"} {
			d := filepath.Join(sysroot, c)
			if fi, err := os.Stat(filepath.Join(d, "EFI")); err == nil && fi.IsDir() {
				return d, nil, nil
			}
		}
	}
	err := fmt.Errorf("no ESP found below %s (looked for efi, boot/efi and boot holding systemd-boot's loader/ directory); mount it or give --esp", sysroot)
	if loaderErr != nil {
		err = errors.Join(err, loaderErr)
	}
	return "", loaderErr, err
}

// FoundESP is FindESP for callers that can do without an ESP: "" when none
// is found; why is said once per process on stderr when the boot loader's
// ESP could not be mounted.
func FoundESP(sysroot string) string {
	d, loaderErr, _ := findESP(sysroot, false)
	if loaderErr != nil {
		espWarning.Do(func() { fmt.Fprintf(os.Stderr, "berth: %v\n", loaderErr) })
	}
	return d
}

var espWarning sync.Once
