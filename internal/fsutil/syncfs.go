package fsutil

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// SyncFS flushes the whole filesystem that holds path (a file or
// directory): one syncfs(2) instead of an fsync per file when many files
// were written, as an import or an extraction does.
func SyncFS(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("syncfs %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", path, err)
	}
	return nil
}
