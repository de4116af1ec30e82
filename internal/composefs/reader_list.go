package composefs

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"io"
	"strconv"
	"time"
)

// ListEntry is one line of an image listing (`berth composefs ls`).
type ListEntry struct {
	Path    string  `json:"path"`
	Mode    string  `json:"mode"` // ls -l style, e.g. "-rwxr-xr-x"
	UID     uint32  `json:"uid"`
	GID     uint32  `json:"gid"`
	Size    uint64  `json:"size"`
	Mtime   string  `json:"mtime"` // RFC 3339 with nanoseconds, UTC
	Target  string  `json:"target,omitempty"`
	Rdev    *[2]int `json:"rdev,omitempty"` // major, minor
	Digest  string  `json:"digest,omitempty"`
	Payload string  `json:"payload,omitempty"`
	Xattrs  int     `json:"xattrs,omitempty"`
}

// ListTree returns the entries of root in Walk order.
func ListTree(root *Inode) []ListEntry {
	var out []ListEntry
	WalkTree(root, func(p string, n *Inode) error {
		e := ListEntry{
			Path:   p,
			Mode:   lsMode(n.Mode),
			UID:    n.UID,
			GID:    n.GID,
			Mtime:  time.Unix(n.Mtime.Sec, int64(n.Mtime.Nsec)).UTC().Format(time.RFC3339Nano),
			Target: n.Target,
			Xattrs: len(n.Xattrs),
		}
		switch n.Type() {
		case SIFREG:
			e.Size = n.Size
			e.Payload = n.Payload
			if len(n.Digest) > 0 {
				e.Digest = hex.EncodeToString(n.Digest)
			}
		case SIFLNK:
			e.Size = uint64(len(n.Target))
		case SIFCHR, SIFBLK:
			e.Rdev = &[2]int{int(n.Rdev >> 8 & 0xfff), int(n.Rdev&0xff | n.Rdev>>12&0xfff00)}
		}
		out = append(out, e)
		return nil
	})
	return out
}

// WriteListing prints root's paths one per line; long adds mode, owner,
// size (or device numbers), mtime, symlink target and object digest.
func WriteListing(w io.Writer, root *Inode, long bool) error {
	bw := bufio.NewWriter(w)
	for _, e := range ListTree(root) {
		if !long {
			fmt.Fprintln(bw, e.Path)
			continue
		}
		size := strconv.FormatUint(e.Size, 10)
		if e.Rdev != nil {
			size = fmt.Sprintf("%d,%d", e.Rdev[0], e.Rdev[1])
		}
		line := fmt.Sprintf("%s %6d %6d %12s %s %s", e.Mode, e.UID, e.GID, size, e.Mtime, e.Path)
		if e.Target != "" {
			line += " -> " + e.Target
		}
		if e.Payload != "" {
			line += " @" + e.Payload
		}
		fmt.Fprintln(bw, line)
	}
	return bw.Flush()
}

// lsMode formats a mode the way ls -l does ("drwxr-sr-t", "crw-rw-rw-").
func lsMode(mode uint32) string {
	b := []byte("?rwxrwxrwx")
	switch mode & SIFMT {
	case SIFREG:
		b[0] = '-'
	case SIFDIR:
		b[0] = 'd'
	case SIFLNK:
		b[0] = 'l'
	case SIFCHR:
		b[0] = 'c'
	case SIFBLK:
		b[0] = 'b'
	case SIFIFO:
		b[0] = 'p'
	case SIFSOCK:
		b[0] = 's'
	}
	for i := 0; i < 9; i++ {
		if mode&(1<<(8-i)) == 0 {
			b[i+1] = '-'
		}
	}
	special := func(bit uint32, pos int, set, unset byte) {
		if mode&bit != 0 {
			if b[pos] == '-' {
				b[pos] = unset
			} else {
				b[pos] = set
			}
		}
	}
	special(0o4000, 3, 's', 'S')
	special(0o2000, 6, 's', 'S')
	special(0o1000, 9, 't', 'T')
	return string(b)
}
