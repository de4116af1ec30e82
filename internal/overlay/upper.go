// Package overlay reads the markers overlayfs writes into an upper
// directory: whiteouts (a 0/0 character device, or an empty file with the
// whiteout xattr), opaque directories, redirects of renamed directories
// and metacopy files that hold only changed metadata. The /etc merge at
// boot, `berth diff`, `berth reset` and `berth commit` all read them.
package overlay

import (
	"io/fs"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Xattrs overlayfs sets on upper entries.
const (
	XattrPrefix   = "trusted.overlay."
	XattrOpaque   = "trusted.overlay.opaque"
	XattrWhiteout = "trusted.overlay.whiteout"
	XattrRedirect = "trusted.overlay.redirect"
	XattrMetacopy = "trusted.overlay.metacopy"
)

// Xattr returns the value of p's xattr key, without following a symlink.
func Xattr(p, key string) (string, bool) {
	n, err := unix.Lgetxattr(p, key, nil)
	if err != nil {
		return "", false
	}
	buf := make([]byte, n)
	n, err = unix.Lgetxattr(p, key, buf)
	if err != nil {
		return "", false
	}
	return string(buf[:n]), true
}

// IsWhiteout reports whether the upper entry p is a whiteout. fi is p's
// Lstat result, or nil to stat p here.
func IsWhiteout(p string, fi fs.FileInfo) bool {
	if fi == nil {
		var err error
		if fi, err = os.Lstat(p); err != nil {
			return false
		}
	}
	switch {
	case fi.Mode()&fs.ModeCharDevice != 0:
		st, ok := fi.Sys().(*syscall.Stat_t)
		return ok && st.Rdev == 0
	case fi.Mode().IsRegular() && fi.Size() == 0:
		_, ok := Xattr(p, XattrWhiteout)
		return ok
	}
	return false
}

// IsOpaque reports whether the upper directory p hides the lower one.
func IsOpaque(p string) bool {
	v, ok := Xattr(p, XattrOpaque)
	return ok && v == "y"
}
