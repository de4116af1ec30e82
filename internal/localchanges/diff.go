// Package localchanges reads and resets the persistent local changes of a
// deployment: the overlayfs upper directory deploy/<id>/upper above the
// deployment's composefs image (docs/deployments.md).
//
// The upper directory uses overlayfs's own encoding: a whiteout (a 0/0
// character device, or a file with the trusted.overlay.whiteout xattr)
// deletes the image's entry of the same name; a directory with
// trusted.overlay.opaque=y hides the image's directory of the same path;
// with metacopy=on and redirect_dir=on (berth mounts with both) a file may
// hold only changed metadata (trusted.overlay.metacopy) and a renamed
// directory points at its origin (trusted.overlay.redirect).
//
// This package is linked into berth-init (ApplyPendingReset runs before
// the root overlay is mounted), so it must not import containers/image:
// turning changes into an image layer lives in the commit subpackage.
package localchanges

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/overlay"
	"github.com/berth-dev/berth/internal/store"
)

// Change is one local change of a deployment.
type Change struct {
	Path string `json:"path"`
	Kind string `json:"kind"` // added, modified, deleted, replaced (opaque directory)
	Type string `json:"type"` // file, dir, symlink, other; "" for deleted
}

// Kinds of Change.
const (
	KindAdded    = "added"
	KindModified = "modified"
	KindDeleted  = "deleted"
	KindReplaced = "replaced"
)

// DiffResult is what Diff returns (and berthd's Diff method as JSON).
type DiffResult struct {
	Deployment string   `json:"deployment"`
	Changes    []Change `json:"changes"`
	// PendingReset is the reset recorded for the next boot, if any.
	PendingReset *PendingReset `json:"pending_reset,omitempty"`
}

// UpperDir returns the overlay upper directory of deployment id.
func UpperDir(l store.Layout, id string) string { return filepath.Join(l.Deployment(id), "upper") }

// Diff lists the entries of deploy/<id>/upper: whiteouts are deletions,
// opaque directories replace the image's, other entries are modified
// when the image has the path and added otherwise. Directories that only
// exist to hold changes below them are not listed; an added or replaced
// directory stands for everything below it. Entries below the shared
// directories (/var, /home, ...) are hidden under berth/state at run time
// and not listed; the per-deployment package databases are.
func Diff(l store.Layout, id string) (*DiffResult, error) {
	d, err := deploy.Read(l, id)
	if err != nil {
		return nil, fmt.Errorf("diff: %w", err)
	}
	root, err := imageRoot(l, d)
	if err != nil {
		return nil, fmt.Errorf("diff %s: %w", id, err)
	}
	upper := UpperDir(l, id)
	res := &DiffResult{Deployment: id, Changes: []Change{}}
	err = walkUpper(upper, "", func(rel string, fi os.FileInfo) (bool, error) {
		if SharedState(rel) {
			return true, nil // hidden under berth/state at run time
		}
		c, list, skip := classify(root, filepath.Join(upper, rel), rel, fi)
		if list {
			res.Changes = append(res.Changes, c)
		}
		return skip, nil
	})
	if err != nil {
		return nil, fmt.Errorf("diff %s: %w", id, err)
	}
	sort.Slice(res.Changes, func(i, j int) bool { return res.Changes[i].Path < res.Changes[j].Path })
	if res.PendingReset, err = ReadPendingReset(l, id); err != nil {
		return nil, fmt.Errorf("diff %s: %w", id, err)
	}
	return res, nil
}

func imageRoot(l store.Layout, d *deploy.Deployment) (*composefs.Inode, error) {
	im, err := composefs.OpenImage(l.Image(d.ComposefsDigest))
	if err != nil {
		return nil, err
	}
	return im.Root()
}

// walkUpper calls fn for every entry below upper/rel (not rel itself),
// parents before children; fn returns true to skip a directory's
// children. A missing upper directory has no entries.
func walkUpper(upper, rel string, fn func(rel string, fi os.FileInfo) (bool, error)) error {
	start := filepath.Join(upper, rel)
	return filepath.Walk(start, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			if errors.Is(err, os.ErrNotExist) && p == start {
				return filepath.SkipAll
			}
			return err
		}
		if p == start {
			return nil
		}
		r, _ := filepath.Rel(upper, p)
		skip, err := fn(filepath.ToSlash(r), fi)
		if err != nil {
			return err
		}
		if skip && fi.IsDir() {
			return filepath.SkipDir
		}
		return nil
	})
}

// classify describes the upper entry p (path rel in the deployment).
// list is false for a directory that only holds changes below it; skip
// is true when the entry stands for everything below it.
func classify(root *composefs.Inode, p, rel string, fi os.FileInfo) (c Change, list, skip bool) {
	inImage := root.Lookup(rel)
	c = Change{Path: "/" + rel, Type: typeName(fi.Mode())}
	switch {
	case overlay.IsWhiteout(p, fi):
		c.Kind, c.Type = KindDeleted, ""
	case fi.IsDir() && (overlay.IsOpaque(p) || hasRedirect(p)):
		// An opaque directory hides the image's; a redirected one (renamed
		// in the overlay) takes its content from elsewhere in the image.
		// Either stands for everything below it. (overlayfs makes every
		// new directory opaque, so one the image lacks is "added".)
		c.Kind, skip = KindAdded, true
		if inImage != nil {
			c.Kind = KindReplaced
		}
	case fi.IsDir() && inImage != nil && inImage.IsDir():
		if !dirMetaChanged(p, inImage) {
			return c, false, false
		}
		c.Kind = KindModified
	case inImage != nil:
		c.Kind = KindModified
	default:
		c.Kind = KindAdded
		skip = fi.IsDir()
	}
	return c, true, skip
}

func dirMetaChanged(p string, n *composefs.Inode) bool {
	var st unix.Stat_t
	if unix.Lstat(p, &st) != nil {
		return false
	}
	return st.Mode&0o7777 != n.Mode&0o7777 || st.Uid != n.UID || st.Gid != n.GID
}

func typeName(m os.FileMode) string {
	switch {
	case m.IsRegular():
		return "file"
	case m.IsDir():
		return "dir"
	case m&os.ModeSymlink != 0:
		return "symlink"
	}
	return "other"
}

func hasRedirect(p string) bool {
	_, ok := overlay.Xattr(p, overlay.XattrRedirect)
	return ok
}
