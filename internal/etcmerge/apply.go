package etcmerge

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// Apply writes res into upper, an overlayfs upper directory whose lower
// layer shows theirs: every path where the result differs from theirs is
// written (directories with their metadata, files with content from
// their source, whiteouts for deletions). Each entry is put in place by
// rename, and a second run over a partly written upper gives the same
// result, so a crash in the middle is repaired by running Apply again.
// The caller makes the result durable (SyncFS) before recording it done.
func Apply(res *Result, theirs Tree, upper string) error {
	if err := os.MkdirAll(upper, 0o755); err != nil {
		return fmt.Errorf("apply merge: %w", err)
	}
	paths := map[string]bool{}
	for p := range res.Tree {
		paths[p] = true
	}
	for p := range theirs {
		paths[p] = true
	}
	sorted := make([]string, 0, len(paths))
	for p := range paths {
		if !validRel(p) {
			return fmt.Errorf("apply merge: invalid path %q", p)
		}
		sorted = append(sorted, p)
	}
	sort.Strings(sorted)
	covered := func(p string) bool {
		// Below a deleted path or a path that is not a directory in the
		// result, the lower layer is hidden already.
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			if e := res.Tree[d]; e == nil || e.Type != Dir {
				return true
			}
		}
		return false
	}
	for _, p := range sorted {
		r, t := res.Tree[p], theirs[p]
		if covered(p) || same(r, t) {
			continue
		}
		if err := ensureParents(res, upper, p); err != nil {
			return err
		}
		dst := filepath.Join(upper, filepath.FromSlash(p))
		var err error
		if r == nil {
			err = whiteout(dst)
		} else {
			err = writeEntry(dst, r)
		}
		if err != nil {
			return fmt.Errorf("apply merge: /%s: %w", p, err)
		}
	}
	return nil
}

func validRel(p string) bool {
	return p != "" && !strings.HasPrefix(p, "/") && path.Clean(p) == p && p != ".." && !strings.HasPrefix(p, "../")
}

// ensureParents creates the directories above p in upper with the
// result's metadata (what overlayfs' copy-up would do).
func ensureParents(res *Result, upper, p string) error {
	var dirs []string
	for d := path.Dir(p); d != "."; d = path.Dir(d) {
		dirs = append(dirs, d)
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		dst := filepath.Join(upper, filepath.FromSlash(dirs[i]))
		if fi, err := os.Lstat(dst); err == nil && fi.IsDir() {
			continue
		}
		e := res.Tree[dirs[i]]
		if e == nil || e.Type != Dir {
			return fmt.Errorf("apply merge: parent /%s of /%s is not a directory in the result", dirs[i], p)
		}
		if err := writeEntry(dst, e); err != nil {
			return fmt.Errorf("apply merge: /%s: %w", dirs[i], err)
		}
	}
	return nil
}

// writeEntry puts e at dst, replacing what is there.
func writeEntry(dst string, e *Entry) error {
	if e.Type == Dir {
		fi, err := os.Lstat(dst)
		if err == nil && !fi.IsDir() {
			if err := os.Remove(dst); err != nil {
				return err
			}
		}
		if err != nil || !fi.IsDir() {
			if err := os.Mkdir(dst, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
				return err
			}
		}
		return setMeta(dst, e)
	}
	tmp := filepath.Join(filepath.Dir(dst), ".berth-merge-"+filepath.Base(dst))
	os.RemoveAll(tmp)
	var err error
	switch e.Type {
	case File:
		err = writeFile(tmp, e)
	case Symlink:
		err = os.Symlink(e.Target, tmp)
	case Device:
		err = unix.Mknod(tmp, e.DevMode|0o600, int(e.Rdev))
	case Fifo:
		err = unix.Mkfifo(tmp, 0o600)
	case Socket:
		err = unix.Mknod(tmp, unix.S_IFSOCK|0o600, 0)
	default:
		err = fmt.Errorf("unknown entry type %d", e.Type)
	}
	if err == nil {
		err = setMeta(tmp, e)
	}
	if err == nil {
		if fi, lerr := os.Lstat(dst); lerr == nil && fi.IsDir() {
			err = os.RemoveAll(dst)
		}
	}
	if err == nil {
		err = os.Rename(tmp, dst)
	}
	if err != nil {
		os.RemoveAll(tmp)
	}
	return err
}

func writeFile(tmp string, e *Entry) error {
	if e.Open == nil {
		return errors.New("no content source")
	}
	src, err := e.Open()
	if err != nil {
		return err
	}
	defer src.Close()
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, src); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// setMeta sets owner, mode and xattrs (not following symlinks; a
// symlink's mode is not settable on Linux).
func setMeta(p string, e *Entry) error {
	if err := os.Lchown(p, int(e.UID), int(e.GID)); err != nil {
		return err
	}
	if e.Type != Symlink {
		// After chown: chown clears setuid/setgid bits.
		if err := unix.Fchmodat(unix.AT_FDCWD, p, e.Mode, 0); err != nil {
			return err
		}
	}
	for k, v := range e.Xattrs {
		if err := unix.Lsetxattr(p, k, []byte(v), 0); err != nil {
			return fmt.Errorf("set xattr %s: %w", k, err)
		}
	}
	return nil
}

// whiteout makes dst an overlayfs whiteout (a 0/0 character device).
func whiteout(dst string) error {
	var st unix.Stat_t
	if unix.Lstat(dst, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == 0 {
		return nil
	}
	tmp := filepath.Join(filepath.Dir(dst), ".berth-merge-"+filepath.Base(dst))
	os.RemoveAll(tmp)
	if err := unix.Mknod(tmp, unix.S_IFCHR, 0); err != nil {
		return fmt.Errorf("whiteout: %w", err)
	}
	if fi, err := os.Lstat(dst); err == nil && fi.IsDir() {
		if err := os.RemoveAll(dst); err != nil {
			os.Remove(tmp)
			return err
		}
	}
	return os.Rename(tmp, dst)
}
