package composefs

import (
	"io/fs"
	"sort"
	"strings"
)

// Timespec is a file time with nanoseconds, as stored in extended EROFS inodes.
type Timespec struct {
	Sec  int64
	Nsec uint32
}

// Before reports whether t is strictly earlier than u.
func (t Timespec) Before(u Timespec) bool {
	return t.Sec < u.Sec || (t.Sec == u.Sec && t.Nsec < u.Nsec)
}

// Xattr is one extended attribute. Keys are full names ("user.foo").
type Xattr struct {
	Key   string
	Value []byte
}

// Inode is the in-memory model of one file in a composefs image. It is
// what every input (directory scan, dump file, OCI layers) produces and
// what the writer consumes. A hardlinked file is one *Inode reached from
// several Dirents; the writer gives it one EROFS inode and nlink = number
// of links.
type Inode struct {
	// Mode holds the Unix type bits and permission bits (st_mode).
	Mode  uint32
	UID   uint32
	GID   uint32
	Mtime Timespec
	// Rdev is the device number of a chr/blk node, new_encode_dev form
	// (low 32 bits of dev_t).
	Rdev uint32
	// Size is the logical size for regular files; ignored for other types
	// (a symlink's size is len(Target), a directory's is computed).
	Size uint64
	// Xattrs as found in the input, before composefs rewrites (trusted.overlay
	// escaping, metacopy, redirect, whiteouts). Order does not matter.
	Xattrs []Xattr

	// Target is the symlink target.
	Target string
	// Inline holds the content of a regular file of 1..64 bytes.
	Inline []byte
	// Digest is the fs-verity digest of an external regular file (> 64
	// bytes); Payload is its object path relative to the object store
	// ("xx/<rest of hex>"). Dump input may carry a Payload without a Digest.
	Digest  []byte
	Payload string

	// Children of a directory. Names are single path components. Use
	// SortedNames for a deterministic order.
	Children map[string]*Inode
}

// Type returns the file type bits of Mode.
func (n *Inode) Type() uint32 { return n.Mode & SIFMT }

// IsDir reports whether n is a directory.
func (n *Inode) IsDir() bool { return n.Type() == SIFDIR }

// SortedNames returns the child names in bytewise order (what composefs uses).
func (n *Inode) SortedNames() []string {
	names := make([]string, 0, len(n.Children))
	for name := range n.Children {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// Lookup walks a slash-separated path relative to n ("" or "/" is n itself).
// It does not follow symlinks. It returns nil when any component is missing.
func (n *Inode) Lookup(p string) *Inode {
	cur := n
	for _, c := range strings.Split(strings.Trim(p, "/"), "/") {
		if c == "" {
			continue
		}
		if cur == nil || !cur.IsDir() {
			return nil
		}
		cur = cur.Children[c]
	}
	return cur
}

// Xattr returns the value of key and whether it is present.
func (n *Inode) Xattr(key string) ([]byte, bool) {
	for _, x := range n.Xattrs {
		if x.Key == key {
			return x.Value, true
		}
	}
	return nil, false
}

// SetXattr sets key to value, replacing an existing value.
func (n *Inode) SetXattr(key string, value []byte) {
	for i := range n.Xattrs {
		if n.Xattrs[i].Key == key {
			n.Xattrs[i].Value = value
			return
		}
	}
	n.Xattrs = append(n.Xattrs, Xattr{Key: key, Value: value})
}

// NewDir returns an empty directory inode.
func NewDir(perm uint32) *Inode {
	return &Inode{Mode: SIFDIR | perm&07777, Children: map[string]*Inode{}}
}

// File type bits of st_mode.
const (
	SIFMT   = 0o170000
	SIFSOCK = 0o140000
	SIFLNK  = 0o120000
	SIFREG  = 0o100000
	SIFBLK  = 0o060000
	SIFDIR  = 0o040000
	SIFCHR  = 0o020000
	SIFIFO  = 0o010000
)

// FileMode converts a Unix st_mode to an fs.FileMode (for display).
func FileMode(mode uint32) fs.FileMode {
	m := fs.FileMode(mode & 0o777)
	if mode&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if mode&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if mode&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	switch mode & SIFMT {
	case SIFDIR:
		m |= fs.ModeDir
	case SIFLNK:
		m |= fs.ModeSymlink
	case SIFCHR:
		m |= fs.ModeDevice | fs.ModeCharDevice
	case SIFBLK:
		m |= fs.ModeDevice
	case SIFIFO:
		m |= fs.ModeNamedPipe
	case SIFSOCK:
		m |= fs.ModeSocket
	}
	return m
}
