package composefs

import (
	"fmt"
	"io"

	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
)

// WriteImageFile writes the image of root to path crash-safely (temporary
// file in the same directory, fsync, rename, fsync of the directory) and
// returns its SHA-256 fs-verity digest, the composefs= digest.
func WriteImageFile(path string, root *Inode, opts WriteOptions) ([]byte, error) {
	h := fsverity.New(fsverity.SHA256)
	err := fsutil.WriteAtomic(path, 0o644, func(w io.Writer) error {
		return Write(io.MultiWriter(w, h), root, opts)
	}, nil)
	if err != nil {
		return nil, fmt.Errorf("write composefs image %s: %w", path, err)
	}
	return h.Sum(), nil
}
