package composefs

import (
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
)

// WriteImageFile writes the image of root to path crash-safely (temporary
// file in the same directory, fsync, rename, fsync of the directory) and
// returns its SHA-256 fs-verity digest, the composefs= digest.
func WriteImageFile(path string, root *Inode, opts WriteOptions) ([]byte, error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, ".tmp-"+filepath.Base(path)+"-")
	if err != nil {
		return nil, fmt.Errorf("write composefs image %s: %w", path, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	h := fsverity.New(fsverity.SHA256)
	if err := Write(io.MultiWriter(f, h), root, opts); err != nil {
		return nil, fmt.Errorf("write composefs image %s: %w", path, err)
	}
	if err := f.Chmod(0o644); err != nil {
		return nil, fmt.Errorf("write composefs image %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("write composefs image %s: fsync: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("write composefs image %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, fmt.Errorf("write composefs image %s: %w", path, err)
	}
	ok = true
	if err := fsutil.SyncDir(dir); err != nil {
		return nil, fmt.Errorf("write composefs image %s: %w", path, err)
	}
	return h.Sum(), nil
}
