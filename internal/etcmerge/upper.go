package etcmerge

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/overlay"
)

// MaxUpperEntries bounds what ReadUpper keeps in memory (in the
// initramfs): local changes plus what they hide of the image.
const MaxUpperEntries = 1000000

// Changes is what an overlayfs upper directory does to its lower
// composefs tree, as the mounted overlay shows it.
type Changes struct {
	// Entries maps every path whose view may differ from the lower tree
	// to what the overlay shows there; nil means the path is gone.
	Entries map[string]*Entry
	// Replaced lists paths whose lower subtree is hidden (whiteouts,
	// opaque or renamed directories, non-directories over directories):
	// whatever an image has below them is not visible through the upper.
	Replaced map[string]bool
}

// Ours returns the overlay's view of p given the lower entry.
func (c *Changes) Ours(p string, lower *Entry) *Entry {
	if e, ok := c.Entries[p]; ok {
		return e
	}
	return lower
}

// ReadUpper interprets upper over lower (the composefs tree the overlay
// had below it) the way overlayfs does, including what berth's mount
// options make it write: metacopy files (trusted.overlay.metacopy: only
// the metadata is in the upper, the data is the lower file's, maybe
// renamed: trusted.overlay.redirect), renamed directories
// (trusted.overlay.redirect), opaque directories and whiteouts. skip
// says which top-level paths to leave out (nil: none). Metacopy entries
// get their content from the lower image's objects, so they can be
// written elsewhere as ordinary files.
func ReadUpper(lower *composefs.Inode, objects, upper string, skip func(rel string) bool) (*Changes, error) {
	c := &Changes{Entries: map[string]*Entry{}, Replaced: map[string]bool{}}
	fi, err := os.Lstat(upper)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("upper %s is not a directory", upper)
	}
	r := &upperReader{c: c, root: lower, objects: objects, skip: skip}
	lowerRoot := lower
	if overlay.IsOpaque(upper) {
		r.replace("", lower)
		lowerRoot = nil
	}
	if err := r.dir(upper, "", lowerRoot); err != nil {
		return nil, fmt.Errorf("read upper %s: %w", upper, err)
	}
	return c, nil
}

type upperReader struct {
	c       *Changes
	root    *composefs.Inode
	objects string
	skip    func(string) bool
}

func join(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

// replace hides the lower subtree n at p.
func (r *upperReader) replace(p string, n *composefs.Inode) {
	r.c.Replaced[p] = true
	r.hide(p, n)
}

func (r *upperReader) hide(p string, n *composefs.Inode) {
	if n == nil || !n.IsDir() {
		return
	}
	for name, ch := range n.Children {
		q := join(p, name)
		r.c.Entries[q] = nil
		r.hide(q, ch)
	}
}

// show makes the lower subtree n visible at p (a renamed directory).
func (r *upperReader) show(p string, n *composefs.Inode) error {
	for name, ch := range n.Children {
		q := join(p, name)
		e, err := inodeEntry(ch, r.objects)
		if err != nil {
			return fmt.Errorf("%s: %w", q, err)
		}
		r.c.Entries[q] = e
		if len(r.c.Entries) > MaxUpperEntries {
			return fmt.Errorf("more than %d entries", MaxUpperEntries)
		}
		if ch.IsDir() {
			if err := r.show(q, ch); err != nil {
				return err
			}
		}
	}
	return nil
}

// redirectTarget resolves an overlay redirect: absolute from the lower
// root, relative to the lower directory the entry's parent merges with.
func (r *upperReader) redirectTarget(v string, lowerDir *composefs.Inode) *composefs.Inode {
	if strings.HasPrefix(v, "/") {
		rel := strings.Trim(path.Clean(v), "/")
		if rel == "" {
			return r.root
		}
		return r.root.Lookup(rel)
	}
	if lowerDir == nil || strings.Contains(v, "/") {
		return nil
	}
	return lowerDir.Children[v]
}

// dir reads the upper directory up (at rel) merged over lowerDir (nil:
// nothing below shows through).
func (r *upperReader) dir(up, rel string, lowerDir *composefs.Inode) error {
	ents, err := os.ReadDir(up)
	if err != nil {
		return err
	}
	names := make([]string, 0, len(ents))
	for _, de := range ents {
		names = append(names, de.Name())
	}
	sort.Strings(names)
	for _, name := range names {
		p := join(rel, name)
		if rel == "" && r.skip != nil && r.skip(p) {
			continue
		}
		if len(r.c.Entries) > MaxUpperEntries {
			return fmt.Errorf("more than %d entries", MaxUpperEntries)
		}
		fp := filepath.Join(up, name)
		var lc *composefs.Inode
		if lowerDir != nil {
			lc = lowerDir.Children[name]
		}
		if overlay.IsWhiteout(fp, nil) {
			r.c.Entries[p] = nil
			r.replace(p, lc)
			continue
		}
		e, err := dirEntry(fp)
		if err != nil {
			return err
		}
		redirect, hasRedirect := overlay.Xattr(fp, overlay.XattrRedirect)
		switch e.Type {
		case Dir:
			r.c.Entries[p] = e
			src := lc
			switch {
			case overlay.IsOpaque(fp):
				src = nil
			case hasRedirect:
				src = r.redirectTarget(redirect, lowerDir)
			}
			if src != nil && !src.IsDir() {
				src = nil
			}
			if src != lc {
				r.replace(p, lc)
				if src != nil {
					if err := r.show(p, src); err != nil {
						return err
					}
				}
			}
			if err := r.dir(fp, p, src); err != nil {
				return err
			}
		default:
			if _, meta := overlay.Xattr(fp, overlay.XattrMetacopy); meta && e.Type == File {
				// Only metadata was copied up: the data is the lower file's.
				src := lc
				if hasRedirect {
					src = r.redirectTarget(redirect, lowerDir)
				}
				if src == nil || src.Type() != composefs.SIFREG {
					return fmt.Errorf("%s: metacopy file without a regular lower file to take the data from", p)
				}
				le, err := inodeEntry(src, r.objects)
				if err != nil {
					return fmt.Errorf("%s: %w", p, err)
				}
				e.Content, e.Open = le.Content, le.Open
			}
			r.c.Entries[p] = e
			if lc != nil && lc.IsDir() {
				r.replace(p, lc)
			}
		}
	}
	return nil
}
