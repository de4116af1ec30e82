// Package etcmerge is the 3-way merge of /etc done when a new deployment
// first boots (DESIGN §5 step 6): base is the old image's /etc, ours is
// /etc as the booted deployment had it (old image plus its local changes),
// theirs is the new image's /etc. A path changed on one side only takes
// that side; a path changed on both sides in different ways is a
// conflict, which keeps ours and puts theirs beside it as
// "<path>.berth-new", so nothing is lost.
//
// Merge is a pure function over Trees; Apply writes a result as an
// overlayfs upper directory above the new image; ReadUpper reads what an
// upper directory changes; Prepare does the whole first-boot step for a
// deployment (the /etc merge and the carry-over of other local changes)
// before its overlay is mounted, and is idempotent (a power cut in the
// middle is repaired by running it again).
package etcmerge

import (
	"fmt"
	"io"
	"path"
	"sort"
)

// Type is the kind of an entry.
type Type uint8

const (
	File Type = iota + 1
	Dir
	Symlink
	Device // character or block device
	Fifo
	Socket
)

func (t Type) String() string {
	switch t {
	case File:
		return "file"
	case Dir:
		return "dir"
	case Symlink:
		return "symlink"
	case Device:
		return "device"
	case Fifo:
		return "fifo"
	case Socket:
		return "socket"
	}
	return "unknown"
}

// Entry is one path of an /etc tree: what is compared, and where the
// content comes from when it has to be written.
type Entry struct {
	Type     Type
	Mode     uint32 // permission bits with setuid/setgid/sticky (07777)
	UID, GID uint32
	Rdev     uint32 // device number for Device (with Mode's type bits in DevMode)
	DevMode  uint32 // S_IFCHR or S_IFBLK for Device
	Target   string // symlink target
	// Content identifies a File's bytes: the hex SHA-256 fs-verity digest,
	// the same identity for every source, so trees from a composefs image
	// and from a directory compare.
	Content string
	Xattrs  map[string]string // user.*, security.* ... (never trusted.overlay.*)
	// Open returns the file's content (File only).
	Open func() (io.ReadCloser, error) `json:"-"`
}

// Tree maps clean relative paths ("passwd", "ssh/sshd_config") to entries.
// The root itself is not in it.
type Tree map[string]*Entry

// sameData says whether a and b have the same type and content.
func sameData(a, b *Entry) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Type == b.Type && a.Content == b.Content && a.Target == b.Target && a.Rdev == b.Rdev && a.DevMode == b.DevMode
}

// sameMeta says whether a and b have the same owner, mode and xattrs.
func sameMeta(a, b *Entry) bool {
	if a.Mode != b.Mode || a.UID != b.UID || a.GID != b.GID || len(a.Xattrs) != len(b.Xattrs) {
		return false
	}
	for k, v := range a.Xattrs {
		if w, ok := b.Xattrs[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func same(a, b *Entry) bool {
	if a == nil || b == nil {
		return a == b
	}
	return sameData(a, b) && sameMeta(a, b)
}

// Side says where a result entry comes from.
type Side string

const (
	Ours   Side = "ours"
	Theirs Side = "theirs"
)

// ConflictSuffix is appended to a conflicting path for the new image's version.
const ConflictSuffix = ".berth-new"

// Conflict is a path both sides changed differently.
type Conflict struct {
	Path string `json:"path"`
	// Kind: "modify/modify", "add/add", "delete/modify" (we deleted, the
	// image changed it), "modify/delete" (we changed, the image deleted).
	Kind string `json:"kind"`
	// Theirs is where the new image's version is kept ("" when the image
	// deleted the path, so there is nothing to keep).
	Theirs string `json:"theirs,omitempty"`
}

// Result is a merged /etc.
type Result struct {
	Tree      Tree            // the merged tree
	From      map[string]Side // which side each entry of Tree was taken from
	Conflicts []Conflict
}

// Merge merges base, ours and theirs. Content (type and bytes) and
// metadata (owner, mode, xattrs) merge separately, so a permission change
// on our side and a content change in the image combine; only a change of
// the same aspect on both sides is a conflict. The inputs are not changed.
func Merge(base, ours, theirs Tree) *Result {
	res := &Result{Tree: Tree{}, From: map[string]Side{}}
	paths := map[string]bool{}
	for _, t := range []Tree{base, ours, theirs} {
		for p := range t {
			paths[p] = true
		}
	}
	sorted := make([]string, 0, len(paths))
	for p := range paths {
		sorted = append(sorted, p)
	}
	sort.Strings(sorted)

	take := func(p string, e *Entry, s Side) {
		if e != nil {
			res.Tree[p] = e
			res.From[p] = s
		}
	}
	for _, p := range sorted {
		b, o, t := base[p], ours[p], theirs[p]
		switch {
		case same(o, t):
			take(p, t, Theirs)
		case same(o, b):
			take(p, t, Theirs) // only the image changed it
		case same(t, b):
			take(p, o, Ours) // only we changed it (or deleted it)
		case o != nil && t != nil && b != nil && sameData(o, b) && sameMeta(t, b):
			// We changed metadata only, the image changed content only.
			e := *t
			e.Mode, e.UID, e.GID, e.Xattrs = o.Mode, o.UID, o.GID, o.Xattrs
			take(p, &e, Theirs)
		case o != nil && t != nil && b != nil && sameMeta(o, b) && sameData(t, b):
			// We changed content only, the image changed metadata only.
			e := *o
			e.Mode, e.UID, e.GID, e.Xattrs = t.Mode, t.UID, t.GID, t.Xattrs
			take(p, &e, Ours)
		case o != nil && t != nil && o.Type == Dir && t.Type == Dir:
			// Both changed a directory's metadata: children merge on their
			// own; ours wins for the directory itself.
			take(p, o, Ours)
			res.Conflicts = append(res.Conflicts, Conflict{Path: p, Kind: "modify/modify"})
		default:
			c := Conflict{Path: p}
			switch {
			case b == nil:
				c.Kind = "add/add"
			case o == nil:
				c.Kind = "delete/modify"
			case t == nil:
				c.Kind = "modify/delete"
			default:
				c.Kind = "modify/modify"
			}
			take(p, o, Ours)
			if t != nil && t.Type != Dir {
				c.Theirs = p + ConflictSuffix
				take(c.Theirs, t, Theirs)
			}
			res.Conflicts = append(res.Conflicts, c)
		}
	}
	// An entry needs its parent directories. Ours may have deleted (or
	// replaced with a non-directory) a directory in which the image
	// changed something; keep the image's directory then, so the kept
	// version has a place.
	for _, p := range sorted {
		if _, ok := res.Tree[p]; !ok {
			continue
		}
		fixParents(res, p, theirs, ours)
	}
	for _, c := range res.Conflicts {
		if c.Theirs != "" {
			fixParents(res, c.Theirs, theirs, ours)
		}
	}
	// Whatever lies below a path that is not a directory in the result
	// (we replaced a directory by a file or symlink) cannot exist; what
	// the image changed there is reported.
	for _, p := range sorted {
		if _, ok := res.Tree[p]; !ok {
			continue
		}
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if e := res.Tree[d]; e != nil && e.Type != Dir {
				if res.From[p] == Theirs && !same(theirs[p], base[p]) {
					res.Conflicts = append(res.Conflicts, Conflict{Path: p, Kind: "delete/modify"})
				}
				delete(res.Tree, p)
				delete(res.From, p)
				break
			}
		}
	}
	sort.Slice(res.Conflicts, func(i, j int) bool { return res.Conflicts[i].Path < res.Conflicts[j].Path })
	return res
}

func fixParents(res *Result, p string, theirs, ours Tree) {
	for d := path.Dir(p); d != "."; d = path.Dir(d) {
		if e := res.Tree[d]; e != nil {
			if e.Type != Dir {
				return // ours replaced the directory: never drop ours
			}
			continue
		}
		if t := theirs[d]; t != nil && t.Type == Dir {
			res.Tree[d], res.From[d] = t, Theirs
		} else if o := ours[d]; o != nil && o.Type == Dir {
			res.Tree[d], res.From[d] = o, Ours
		} else {
			res.Tree[d], res.From[d] = &Entry{Type: Dir, Mode: 0o755}, Theirs
		}
	}
}

// String renders an entry for messages and tests.
func (e *Entry) String() string {
	if e == nil {
		return "<absent>"
	}
	s := fmt.Sprintf("%s %04o %d:%d", e.Type, e.Mode, e.UID, e.GID)
	switch e.Type {
	case File:
		s += " " + e.Content
	case Symlink:
		s += " -> " + e.Target
	}
	return s
}
