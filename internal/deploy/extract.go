package deploy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/composefs"
)

// payloadRe is the only object path shape accepted from a tree: it keeps a
// hostile Payload ("../../etc/shadow") inside the object store.
var payloadRe = regexp.MustCompile(`^[0-9a-f]{2}/[0-9a-f]{62}([0-9a-f]{64})?$`)

// ExtractTree writes the tree n to the new directory dst (which must not
// exist), taking external file contents from the object store objects.
// Ownership, modes, times, xattrs, hardlinks, symlinks, device nodes and
// fifos are kept. Entry names are checked to be single path components and
// nothing already on disk is followed, so a hostile tree cannot write
// outside dst. The caller makes the result durable (syncfs) and visible
// (rename).
func ExtractTree(dst string, n *composefs.Inode, objects string) error {
	if n == nil || !n.IsDir() {
		return fmt.Errorf("extract to %s: source is not a directory", dst)
	}
	x := &extractor{objects: objects, links: map[*composefs.Inode]string{}, dirs: map[*composefs.Inode]bool{}}
	return x.dir(dst, n)
}

type extractor struct {
	objects string
	links   map[*composefs.Inode]string // first path of every non-directory inode
	dirs    map[*composefs.Inode]bool   // directories seen: a directory reached twice is a cycle
}

func validName(name string) bool {
	return name != "" && name != "." && name != ".." && !strings.ContainsAny(name, "/\x00") && len(name) <= 255
}

func (x *extractor) dir(path string, n *composefs.Inode) error {
	if x.dirs[n] {
		return fmt.Errorf("extract %s: directory appears twice in the tree", path)
	}
	x.dirs[n] = true
	if err := os.Mkdir(path, 0o700); err != nil {
		return fmt.Errorf("extract: %w", err)
	}
	for _, name := range n.SortedNames() {
		if !validName(name) {
			return fmt.Errorf("extract %s: invalid entry name %q", path, name)
		}
		if err := x.entry(filepath.Join(path, name), n.Children[name]); err != nil {
			return err
		}
	}
	// Metadata last: the mode may forbid writing, and adding entries
	// changes the mtime.
	return x.meta(path, n)
}

func (x *extractor) entry(path string, n *composefs.Inode) error {
	if n == nil {
		return fmt.Errorf("extract %s: nil inode", path)
	}
	if !n.IsDir() {
		if first, ok := x.links[n]; ok {
			if err := os.Link(first, path); err != nil {
				return fmt.Errorf("extract: hardlink %s: %w", path, err)
			}
			return nil
		}
		x.links[n] = path
	}
	switch n.Type() {
	case composefs.SIFDIR:
		return x.dir(path, n)
	case composefs.SIFREG:
		if err := x.file(path, n); err != nil {
			return err
		}
	case composefs.SIFLNK:
		if n.Target == "" || len(n.Target) > 4095 {
			return fmt.Errorf("extract %s: invalid symlink target length %d", path, len(n.Target))
		}
		if err := os.Symlink(n.Target, path); err != nil {
			return fmt.Errorf("extract: %w", err)
		}
	case composefs.SIFCHR, composefs.SIFBLK, composefs.SIFIFO, composefs.SIFSOCK:
		if err := unix.Mknod(path, n.Type()|0o600, int(n.Rdev)); err != nil {
			return fmt.Errorf("extract: mknod %s: %w", path, err)
		}
	default:
		return fmt.Errorf("extract %s: unknown file type %#o", path, n.Type())
	}
	return x.meta(path, n)
}

func (x *extractor) file(path string, n *composefs.Inode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("extract: %w", err)
	}
	defer f.Close()
	var src io.Reader
	switch {
	case n.Payload != "":
		if !payloadRe.MatchString(n.Payload) {
			return fmt.Errorf("extract %s: invalid object path %q", path, n.Payload)
		}
		obj, err := os.Open(filepath.Join(x.objects, n.Payload))
		if err != nil {
			return fmt.Errorf("extract %s: object: %w", path, err)
		}
		defer obj.Close()
		fi, err := obj.Stat()
		if err != nil {
			return fmt.Errorf("extract %s: object: %w", path, err)
		}
		if uint64(fi.Size()) != n.Size {
			return fmt.Errorf("extract %s: object %s has %d bytes, the tree says %d", path, n.Payload, fi.Size(), n.Size)
		}
		src = obj
	case len(n.Inline) > 0:
		if uint64(len(n.Inline)) != n.Size {
			return fmt.Errorf("extract %s: inline data has %d bytes, the tree says %d", path, len(n.Inline), n.Size)
		}
		src = bytes.NewReader(n.Inline)
	default:
		if n.Size != 0 {
			return fmt.Errorf("extract %s: %d-byte file has no content in the tree", path, n.Size)
		}
		return nil
	}
	// *os.File.ReadFrom uses copy_file_range, so same-filesystem copies
	// can share extents.
	if _, err := io.Copy(f, src); err != nil {
		return fmt.Errorf("extract %s: %w", path, err)
	}
	return f.Close()
}

// meta applies ownership, xattrs, mode and times (in that order: chown
// clears set-id bits, and every change touches ctime only).
func (x *extractor) meta(path string, n *composefs.Inode) error {
	if err := os.Lchown(path, int(n.UID), int(n.GID)); err != nil {
		return fmt.Errorf("extract: %w", err)
	}
	for _, xa := range n.Xattrs {
		if err := unix.Lsetxattr(path, xa.Key, xa.Value, 0); err != nil {
			if n.Type() == composefs.SIFLNK && errors.Is(err, unix.EPERM) && strings.HasPrefix(xa.Key, "user.") {
				continue // user.* is not allowed on symlinks by the kernel
			}
			return fmt.Errorf("extract: set xattr %s on %s: %w", xa.Key, path, err)
		}
	}
	if n.Type() != composefs.SIFLNK {
		if err := unix.Fchmodat(unix.AT_FDCWD, path, n.Mode&0o7777, 0); err != nil {
			return fmt.Errorf("extract: chmod %s: %w", path, err)
		}
	}
	ts := []unix.Timespec{
		{Sec: n.Mtime.Sec, Nsec: int64(n.Mtime.Nsec)},
		{Sec: n.Mtime.Sec, Nsec: int64(n.Mtime.Nsec)},
	}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("extract: set times on %s: %w", path, err)
	}
	return nil
}
