package composefs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"time"
)

// TreeFS returns an io/fs view of a tree whose external files live in the
// object store directory objects (their Payload paths are opened below
// it, never outside). Symlinks are followed inside the tree: absolute
// targets resolve against the tree's root, as they would in a chroot.
// The result implements fs.ReadDirFS, fs.StatFS and fs.ReadLinkFS.
func TreeFS(root *Inode, objects string) fs.FS {
	return &treeFS{root: root, objects: objects}
}

type treeFS struct {
	root    *Inode
	objects string
}

// maxSymlinkHops matches the kernel's limit on symlinks in one lookup.
const maxSymlinkHops = 40

// resolve looks name up; followLast says whether a final symlink is
// followed. It returns the inode and its canonical path in the tree.
func (t *treeFS) resolve(op, name string, followLast bool) (*Inode, string, error) {
	if !fs.ValidPath(name) {
		return nil, "", &fs.PathError{Op: op, Path: name, Err: fs.ErrInvalid}
	}
	type frame struct {
		name string
		n    *Inode
	}
	stack := []frame{{"", t.root}}
	var todo []string
	if name != "." {
		todo = strings.Split(name, "/")
	}
	hops := 0
	for len(todo) > 0 {
		c := todo[0]
		todo = todo[1:]
		cur := stack[len(stack)-1].n
		switch c {
		case "", ".":
			continue
		case "..":
			if len(stack) > 1 {
				stack = stack[:len(stack)-1]
			}
			continue
		}
		if !cur.IsDir() {
			return nil, "", &fs.PathError{Op: op, Path: name, Err: errors.New("not a directory")}
		}
		child := cur.Children[c]
		if child == nil {
			return nil, "", &fs.PathError{Op: op, Path: name, Err: fs.ErrNotExist}
		}
		if child.Type() == SIFLNK && (len(todo) > 0 || followLast) {
			hops++
			if hops > maxSymlinkHops {
				return nil, "", &fs.PathError{Op: op, Path: name, Err: errors.New("too many levels of symbolic links")}
			}
			if strings.HasPrefix(child.Target, "/") {
				stack = stack[:1]
			}
			todo = append(strings.Split(child.Target, "/"), todo...)
			continue
		}
		stack = append(stack, frame{c, child})
	}
	parts := make([]string, 0, len(stack)-1)
	for _, f := range stack[1:] {
		parts = append(parts, f.name)
	}
	p := "."
	if len(parts) > 0 {
		p = strings.Join(parts, "/")
	}
	return stack[len(stack)-1].n, p, nil
}

func (t *treeFS) Open(name string) (fs.File, error) {
	n, _, err := t.resolve("open", name, true)
	if err != nil {
		return nil, err
	}
	info := &treeInfo{name: path.Base(name), n: n}
	switch n.Type() {
	case SIFDIR:
		return &treeDir{info: info, names: n.SortedNames()}, nil
	case SIFREG:
		return t.openFile(name, info)
	}
	// Devices, fifos and sockets have no content here.
	return &treeFile{info: info, r: bytes.NewReader(nil)}, nil
}

func (t *treeFS) openFile(name string, info *treeInfo) (fs.File, error) {
	n := info.n
	switch {
	case n.Payload != "":
		if !fs.ValidPath(n.Payload) {
			return nil, &fs.PathError{Op: "open", Path: name, Err: fmt.Errorf("invalid object path %q", n.Payload)}
		}
		f, err := os.OpenInRoot(t.objects, n.Payload)
		if err != nil {
			return nil, &fs.PathError{Op: "open", Path: name, Err: fmt.Errorf("object %s: %w", n.Payload, err)}
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, &fs.PathError{Op: "open", Path: name, Err: err}
		}
		if !fi.Mode().IsRegular() || uint64(fi.Size()) != n.Size {
			f.Close()
			return nil, &fs.PathError{Op: "open", Path: name, Err: fmt.Errorf("object %s has %d bytes (mode %v), want a %d-byte file", n.Payload, fi.Size(), fi.Mode(), n.Size)}
		}
		return &treeFile{info: info, r: f, c: f}, nil
	case uint64(len(n.Inline)) == n.Size:
		return &treeFile{info: info, r: bytes.NewReader(n.Inline)}, nil
	}
	return nil, &fs.PathError{Op: "open", Path: name, Err: fmt.Errorf("content of this %d-byte file is not available (no object and no inline data)", n.Size)}
}

func (t *treeFS) Stat(name string) (fs.FileInfo, error) {
	n, _, err := t.resolve("stat", name, true)
	if err != nil {
		return nil, err
	}
	return &treeInfo{name: path.Base(name), n: n}, nil
}

// Lstat is Stat without following a final symlink (fs.ReadLinkFS).
func (t *treeFS) Lstat(name string) (fs.FileInfo, error) {
	n, _, err := t.resolve("lstat", name, false)
	if err != nil {
		return nil, err
	}
	return &treeInfo{name: path.Base(name), n: n}, nil
}

// ReadLink returns a symlink's target (fs.ReadLinkFS).
func (t *treeFS) ReadLink(name string) (string, error) {
	n, _, err := t.resolve("readlink", name, false)
	if err != nil {
		return "", err
	}
	if n.Type() != SIFLNK {
		return "", &fs.PathError{Op: "readlink", Path: name, Err: fs.ErrInvalid}
	}
	return n.Target, nil
}

// Readlink is ReadLink (the spelling in docs/internal-apis.md).
func (t *treeFS) Readlink(name string) (string, error) { return t.ReadLink(name) }

func (t *treeFS) ReadDir(name string) ([]fs.DirEntry, error) {
	n, _, err := t.resolve("readdir", name, true)
	if err != nil {
		return nil, err
	}
	if !n.IsDir() {
		return nil, &fs.PathError{Op: "readdir", Path: name, Err: errors.New("not a directory")}
	}
	names := n.SortedNames()
	out := make([]fs.DirEntry, len(names))
	for i, c := range names {
		out[i] = fs.FileInfoToDirEntry(&treeInfo{name: c, n: n.Children[c]})
	}
	return out, nil
}

// treeInfo is the fs.FileInfo of an Inode; Sys returns the *Inode.
type treeInfo struct {
	name string
	n    *Inode
}

func (i *treeInfo) Name() string { return i.name }
func (i *treeInfo) Size() int64 {
	switch i.n.Type() {
	case SIFREG:
		return int64(i.n.Size)
	case SIFLNK:
		return int64(len(i.n.Target))
	}
	return 0
}
func (i *treeInfo) Mode() fs.FileMode  { return FileMode(i.n.Mode) }
func (i *treeInfo) ModTime() time.Time { return time.Unix(i.n.Mtime.Sec, int64(i.n.Mtime.Nsec)) }
func (i *treeInfo) IsDir() bool        { return i.n.IsDir() }
func (i *treeInfo) Sys() any           { return i.n }

type treeFile struct {
	info *treeInfo
	r    io.Reader
	c    io.Closer
}

func (f *treeFile) Stat() (fs.FileInfo, error) { return f.info, nil }
func (f *treeFile) Read(p []byte) (int, error) { return f.r.Read(p) }
func (f *treeFile) Close() error {
	if f.c != nil {
		return f.c.Close()
	}
	return nil
}

// ReadAt and Seek work when the underlying reader supports them (both
// objects and inline data do).
func (f *treeFile) ReadAt(p []byte, off int64) (int, error) {
	if ra, ok := f.r.(io.ReaderAt); ok {
		return ra.ReadAt(p, off)
	}
	return 0, errors.ErrUnsupported
}

func (f *treeFile) Seek(off int64, whence int) (int64, error) {
	if s, ok := f.r.(io.Seeker); ok {
		return s.Seek(off, whence)
	}
	return 0, errors.ErrUnsupported
}

type treeDir struct {
	info  *treeInfo
	names []string
	pos   int
}

func (d *treeDir) Stat() (fs.FileInfo, error) { return d.info, nil }
func (d *treeDir) Read([]byte) (int, error) {
	return 0, &fs.PathError{Op: "read", Path: d.info.name, Err: errors.New("is a directory")}
}
func (d *treeDir) Close() error { return nil }

func (d *treeDir) ReadDir(count int) ([]fs.DirEntry, error) {
	rest := d.names[d.pos:]
	if count > 0 && len(rest) == 0 {
		return nil, io.EOF
	}
	if count > 0 && count < len(rest) {
		rest = rest[:count]
	}
	d.pos += len(rest)
	out := make([]fs.DirEntry, len(rest))
	for i, c := range rest {
		out[i] = fs.FileInfoToDirEntry(&treeInfo{name: c, n: d.info.n.Children[c]})
	}
	return out, nil
}
