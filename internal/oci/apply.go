package oci

import (
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/berth-dev/berth/internal/composefs"
)

// NewRoot returns the empty tree layers are applied to.
func NewRoot() *composefs.Inode { return composefs.NewDir(0o755) }

// applyLayer applies one layer's entries to root with OCI layer semantics
// (image-spec layer.md): whiteouts and opaque markers hide entries of lower
// layers only, so they are applied first; then entries are applied in tar
// order, a directory over a directory keeping its children and anything
// else replacing what was there. Nothing is ever resolved through a
// symlink: writing below a symlinked parent is refused.
func applyLayer(root *composefs.Inode, entries []Entry) error {
	for i := range entries {
		e := &entries[i]
		switch e.Kind {
		case KindWhiteout:
			dir, name := splitPath(e.Path)
			if parent := root.Lookup(dir); parent != nil && parent.IsDir() {
				delete(parent.Children, name)
			}
		case KindOpaque:
			if d := root.Lookup(e.Path); d != nil && d.IsDir() {
				d.Children = map[string]*composefs.Inode{}
			}
		}
	}
	for i := range entries {
		e := &entries[i]
		if e.Kind == KindWhiteout || e.Kind == KindOpaque {
			continue
		}
		if err := applyEntry(root, e); err != nil {
			return err
		}
	}
	return nil
}

func applyEntry(root *composefs.Inode, e *Entry) error {
	if e.Path == "" {
		if e.Kind != KindDir {
			return layerErr("/", "the image root must be a directory")
		}
		setMeta(root, e)
		return nil
	}
	dir, name := splitPath(e.Path)
	parent, err := parentDir(root, dir, e.Path)
	if err != nil {
		return err
	}
	old := parent.Children[name]
	switch e.Kind {
	case KindDir:
		if old != nil && old.IsDir() {
			setMeta(old, e)
			return nil
		}
		n := composefs.NewDir(0)
		setMeta(n, e)
		parent.Children[name] = n
		return nil
	case KindHardlink:
		if e.Target == e.Path {
			return layerErr(e.Path, "hardlink to itself")
		}
		t := root.Lookup(e.Target)
		if t == nil {
			return layerErr(e.Path, "hardlink target %q does not exist (in this or a lower layer, without following symlinks)", e.Target)
		}
		if t.IsDir() {
			return layerErr(e.Path, "hardlink to directory %q", e.Target)
		}
		parent.Children[name] = t
		return nil
	}
	n := &composefs.Inode{}
	setMeta(n, e)
	switch e.Kind {
	case KindFile:
		n.Mode |= composefs.SIFREG
		n.Size = e.Size
		switch {
		case e.Digest != "":
			d, err := hex.DecodeString(e.Digest)
			if err != nil {
				return fmt.Errorf("layer index entry %q: bad digest: %w", e.Path, err)
			}
			n.Digest, n.Payload = d, composefs.PayloadPath(d)
		case len(e.Inline) > 0:
			if uint64(len(e.Inline)) != e.Size {
				return fmt.Errorf("layer index entry %q: inline content is %d bytes, size %d", e.Path, len(e.Inline), e.Size)
			}
			n.Inline = e.Inline
		case e.Size != 0:
			return fmt.Errorf("layer index entry %q: %d bytes without content", e.Path, e.Size)
		}
	case KindSymlink:
		n.Mode |= composefs.SIFLNK
		n.Target = e.Target
	case KindChar:
		n.Mode |= composefs.SIFCHR
		n.Rdev = e.Rdev
	case KindBlock:
		n.Mode |= composefs.SIFBLK
		n.Rdev = e.Rdev
	case KindFifo:
		n.Mode |= composefs.SIFIFO
	default:
		return fmt.Errorf("layer index entry %q: unknown kind %q", e.Path, e.Kind)
	}
	parent.Children[name] = n
	return nil
}

// parentDir walks to the directory that will hold path, creating missing
// directories the way tar -x does, and refusing symlinks and non-directories.
func parentDir(root *composefs.Inode, dir, path string) (*composefs.Inode, error) {
	cur := root
	if dir == "" {
		return cur, nil
	}
	walked := ""
	for _, c := range strings.Split(dir, "/") {
		walked = joinPath(walked, c)
		next := cur.Children[c]
		switch {
		case next == nil:
			next = composefs.NewDir(0o755)
			cur.Children[c] = next
		case next.Type() == composefs.SIFLNK:
			return nil, layerErr(path, "written through symlink %q -> %q", walked, next.Target)
		case !next.IsDir():
			return nil, layerErr(path, "parent %q is not a directory", walked)
		}
		cur = next
	}
	return cur, nil
}

func setMeta(n *composefs.Inode, e *Entry) {
	n.Mode = n.Mode&composefs.SIFMT | e.Mode&0o7777
	n.UID, n.GID = e.UID, e.GID
	n.Mtime = composefs.Timespec{Sec: e.Mtime, Nsec: e.Nsec}
	n.Xattrs = nil
	for _, x := range e.Xattrs {
		n.Xattrs = append(n.Xattrs, composefs.Xattr{Key: x.Key, Value: x.Value})
	}
}
