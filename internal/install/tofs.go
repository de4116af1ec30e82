package install

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/blkdev"
)

// rootSpecOf finds the root= value for the filesystem mounted at dir:
// PARTUUID= of its partition when it has one, else UUID= of the filesystem.
func rootSpecOf(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	var st, parent unix.Stat_t
	if err := unix.Stat(abs, &st); err != nil {
		return "", fmt.Errorf("root %s: %w", abs, err)
	}
	if err := unix.Stat(filepath.Join(abs, ".."), &parent); err != nil {
		return "", fmt.Errorf("root %s: %w", abs, err)
	}
	if st.Dev == parent.Dev && abs != "/" {
		return "", fmt.Errorf("root %s is not a mount point; mount the root filesystem there first", abs)
	}
	devs, err := blkdev.Scanner{}.Scan()
	if err != nil {
		return "", err
	}
	want := fmt.Sprintf("%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev))
	for _, d := range devs {
		b, err := os.ReadFile(filepath.Join("/sys/class/block", d.Name, "dev"))
		if err != nil || string(trimNL(b)) != want {
			continue
		}
		switch {
		case d.PartUUID != "":
			return "PARTUUID=" + d.PartUUID, nil
		case d.UUID != "":
			return "UUID=" + d.UUID, nil
		}
		return "", fmt.Errorf("root %s: %s has neither a partition UUID nor a filesystem UUID", abs, d.Dev)
	}
	return "", fmt.Errorf("root %s: its device %s is not a block device berth can name (btrfs subvolumes and network filesystems are not supported)", abs, want)
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

// checkESPDir wants a directory; one that is not on a FAT filesystem
// gets a warning (it may be a staging directory the caller copies to an
// ESP later, the way to-disk does).
func checkESPDir(dir string) (warning string, err error) {
	if dir == "" {
		return "", errors.New("no ESP given (--esp DIR, where the EFI System Partition is mounted)")
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return "", fmt.Errorf("ESP %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("ESP %s is not a directory", dir)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		return "", fmt.Errorf("ESP %s: %w", dir, err)
	}
	const msdosMagic = 0x4d44
	if sfs.Type != msdosMagic {
		return fmt.Sprintf("%s is not a FAT filesystem: firmware reads the EFI System Partition only when it is FAT", dir), nil
	}
	return "", nil
}
