package etcmerge

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsverity"
)

// Limits: /etc is small; anything far beyond is hostile or a mistake.
const (
	MaxEntries = 200000
	maxXattr   = 64 << 10
)

// skipXattr says which xattrs are not part of a file's identity: overlayfs'
// and composefs' own bookkeeping.
func skipXattr(k string) bool {
	return strings.HasPrefix(k, "trusted.overlay.") || strings.HasPrefix(k, "user.overlay.")
}

// FromInode returns the tree below n (e.g. an image's "etc" inode).
// objects is the object store that holds external files' content.
func FromInode(n *composefs.Inode, objects string) (Tree, error) {
	t := Tree{}
	if n == nil {
		return t, nil
	}
	if !n.IsDir() {
		return nil, errors.New("etc in the image is not a directory")
	}
	var walk func(dir *composefs.Inode, prefix string) error
	walk = func(dir *composefs.Inode, prefix string) error {
		for _, name := range dir.SortedNames() {
			if name == "" || name == "." || name == ".." || strings.Contains(name, "/") {
				return fmt.Errorf("bad name %q in %s", name, prefix)
			}
			c := dir.Children[name]
			p := path.Join(prefix, name)
			e, err := inodeEntry(c, objects)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			t[p] = e
			if len(t) > MaxEntries {
				return fmt.Errorf("more than %d entries", MaxEntries)
			}
			if c.IsDir() {
				if err := walk(c, p); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk(n, ""); err != nil {
		return nil, err
	}
	return t, nil
}

func inodeEntry(n *composefs.Inode, objects string) (*Entry, error) {
	e := &Entry{Mode: n.Mode & 0o7777, UID: n.UID, GID: n.GID}
	for _, x := range n.Xattrs {
		if skipXattr(x.Key) {
			continue
		}
		if e.Xattrs == nil {
			e.Xattrs = map[string]string{}
		}
		e.Xattrs[x.Key] = string(x.Value)
	}
	switch n.Type() {
	case composefs.SIFREG:
		e.Type = File
		switch {
		case n.Digest != nil:
			e.Content = hex.EncodeToString(n.Digest)
			obj := filepath.Join(objects, composefs.PayloadPath(n.Digest))
			e.Open = func() (io.ReadCloser, error) { return os.Open(obj) }
		case n.Payload != "":
			return nil, errors.New("external file without a digest")
		default:
			inline := append([]byte(nil), n.Inline...)
			d, err := fsverity.Digest(bytes.NewReader(inline), fsverity.SHA256)
			if err != nil {
				return nil, err
			}
			e.Content = hex.EncodeToString(d)
			e.Open = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(inline)), nil }
		}
	case composefs.SIFDIR:
		e.Type = Dir
	case composefs.SIFLNK:
		e.Type, e.Target = Symlink, n.Target
	case composefs.SIFCHR, composefs.SIFBLK:
		e.Type, e.Rdev, e.DevMode = Device, n.Rdev, n.Mode&composefs.SIFMT
	case composefs.SIFIFO:
		e.Type = Fifo
	case composefs.SIFSOCK:
		e.Type = Socket
	default:
		return nil, fmt.Errorf("unknown file type %o", n.Mode&composefs.SIFMT)
	}
	return e, nil
}

// FromDir returns the tree of a directory (an /etc as it is on disk).
func FromDir(dir string) (Tree, error) {
	t := Tree{}
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return t, nil
	}
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == dir {
			if !de.IsDir() {
				return fmt.Errorf("%s is not a directory", dir)
			}
			return nil
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		e, err := dirEntry(p)
		if err != nil {
			return err
		}
		t[filepath.ToSlash(rel)] = e
		if len(t) > MaxEntries {
			return fmt.Errorf("more than %d entries", MaxEntries)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read tree %s: %w", dir, err)
	}
	return t, nil
}

// dirEntry describes the file at p (not following symlinks).
func dirEntry(p string) (*Entry, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return nil, fmt.Errorf("lstat %s: %w", p, err)
	}
	e := &Entry{Mode: st.Mode & 0o7777, UID: st.Uid, GID: st.Gid}
	xs, err := readXattrs(p)
	if err != nil {
		return nil, err
	}
	e.Xattrs = xs
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		e.Type = File
		d, err := fsverity.DigestFile(p, fsverity.SHA256)
		if err != nil {
			return nil, fmt.Errorf("digest %s: %w", p, err)
		}
		e.Content = hex.EncodeToString(d)
		e.Open = func() (io.ReadCloser, error) { return os.Open(p) }
	case unix.S_IFDIR:
		e.Type = Dir
	case unix.S_IFLNK:
		target, err := os.Readlink(p)
		if err != nil {
			return nil, err
		}
		e.Type, e.Target = Symlink, target
	case unix.S_IFCHR, unix.S_IFBLK:
		e.Type, e.Rdev, e.DevMode = Device, uint32(unix.Mkdev(unix.Major(st.Rdev), unix.Minor(st.Rdev))), st.Mode&unix.S_IFMT
	case unix.S_IFIFO:
		e.Type = Fifo
	case unix.S_IFSOCK:
		e.Type = Socket
	default:
		return nil, fmt.Errorf("%s: unknown file type", p)
	}
	return e, nil
}

func readXattrs(p string) (map[string]string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(p, buf)
	if errors.Is(err, unix.ERANGE) {
		sz, err2 := unix.Llistxattr(p, nil)
		if err2 != nil {
			return nil, fmt.Errorf("list xattrs of %s: %w", p, err2)
		}
		buf = make([]byte, sz)
		n, err = unix.Llistxattr(p, buf)
	}
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list xattrs of %s: %w", p, err)
	}
	var out map[string]string
	for _, k := range strings.Split(string(buf[:n]), "\x00") {
		if k == "" || skipXattr(k) {
			continue
		}
		v := make([]byte, maxXattr)
		m, err := unix.Lgetxattr(p, k, v)
		if err != nil {
			return nil, fmt.Errorf("read xattr %s of %s: %w", k, p, err)
		}
		if out == nil {
			out = map[string]string{}
		}
		out[k] = string(v[:m])
	}
	return out, nil
}
