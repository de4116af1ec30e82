package store

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
)

// VerityPendingFile is the marker (below repo/) that says fs-verity could
// not be enabled on some objects or images when they were written (the
// installing kernel lacked it). berth-init enables verity on every object
// and image of the store at the next boot when it finds the marker, before
// it measures anything; that is safe because the digests it then checks
// come from the UKI, not from the files.
const VerityPendingFile = "verity-pending"

// VerityPendingPath returns the marker's path.
func (l Layout) VerityPendingPath() string { return filepath.Join(l.Repo(), VerityPendingFile) }

// MarkVerityPending writes the marker (crash-safe, idempotent).
func (l Layout) MarkVerityPending(reason string) error {
	return fsutil.WriteFileAtomic(l.VerityPendingPath(), []byte(reason+"\n"), 0o644)
}

// AddImage writes the composefs image of root to repo/images/<digest>
// unless it is there already, with fs-verity enabled where the filesystem
// has it; where it does not, it writes the verity-pending marker and
// reports pending. This is the one way an image enters the store. The
// caller holds the repository lock (shared) until something references the
// image.
func (l Layout) AddImage(root *composefs.Inode) (hexDigest string, pending bool, err error) {
	var buf bytes.Buffer
	if err := composefs.Write(&buf, root, composefs.WriteOptions{}); err != nil {
		return "", false, fmt.Errorf("write composefs image: %w", err)
	}
	return l.AddImageData(buf.Bytes())
}

// AddImageData is AddImage for an image already written out (a local copy
// of another store's image): its name is its fs-verity digest.
func (l Layout) AddImageData(data []byte) (hexDigest string, pending bool, err error) {
	digest, err := fsverity.Digest(bytes.NewReader(data), fsverity.SHA256)
	if err != nil {
		return "", false, fmt.Errorf("composefs image digest: %w", err)
	}
	hexDigest = hex.EncodeToString(digest)
	pending, err = l.addImage(data, digest)
	if err != nil {
		return "", false, err
	}
	if pending {
		if err := l.MarkVerityPending("fs-verity could not be enabled on composefs image " + hexDigest); err != nil {
			return "", false, err
		}
	}
	return hexDigest, pending, nil
}

func (l Layout) addImage(data, digest []byte) (pending bool, err error) {
	if err := fsutil.MkdirAllSync(l.Images(), 0o755); err != nil {
		return false, err
	}
	final := l.Image(hex.EncodeToString(digest))
	if fi, err := os.Lstat(final); err == nil && fi.Mode().IsRegular() {
		pending, err = verityMissing(final, digest)
		if err != nil {
			return false, err
		}
		// Without verity the name proves nothing: compare the bytes, and
		// write the image again below if they differ.
		if old, err := os.ReadFile(final); !pending || (err == nil && bytes.Equal(old, data)) {
			return pending, nil
		}
	}
	err = fsutil.WriteAtomic(final, 0o644, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	}, func(tmp string) error {
		pending, err = enableVerity(tmp, digest)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("write composefs image: %w", err)
	}
	return pending, nil
}

// enableVerity turns on fs-verity for a finished file and checks the
// kernel's measurement; pending is true when the filesystem lacks fs-verity.
func enableVerity(path string, digest []byte) (pending bool, err error) {
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("enable fs-verity on %s: %w", path, err)
	}
	defer f.Close()
	if err := fsverity.Enable(f, fsverity.SHA256); err != nil {
		if errors.Is(err, fsverity.ErrNotSupported) {
			return true, nil
		}
		return false, fmt.Errorf("enable fs-verity on %s: %w", path, err)
	}
	_, got, err := fsverity.Measure(f)
	if err != nil {
		return false, fmt.Errorf("measure %s: %w", path, err)
	}
	if !bytes.Equal(got, digest) {
		return false, fmt.Errorf("composefs image %s: kernel measured %x, expected %x", path, got, digest)
	}
	return false, nil
}

// verityMissing checks an existing image: verity enabled with the right
// digest (false), not enabled (tries to enable; true if unsupported), or
// wrong (error).
func verityMissing(path string, digest []byte) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("composefs image %s: %w", path, err)
	}
	_, got, err := fsverity.Measure(f)
	f.Close()
	switch {
	case err == nil && bytes.Equal(got, digest):
		return false, nil
	case err == nil:
		return false, fmt.Errorf("composefs image %s: kernel measured %x, expected %x (corrupt store?)", path, got, digest)
	case errors.Is(err, fsverity.ErrNotEnabled):
		return enableVerity(path, digest)
	case errors.Is(err, fsverity.ErrNotSupported):
		return true, nil
	}
	return false, fmt.Errorf("measure %s: %w", path, err)
}
