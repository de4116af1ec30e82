package commit

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/internal/overlay"
	"github.com/berth-dev/berth/internal/store"
)

// mergedView mounts, read-only, what the deployment shows: its composefs
// image with the upper directory as a lower layer on top. overlayfs then
// interprets the upper directory exactly as at run time (metacopy files
// take their data from the image, renamed directories their content), so
// the layer is written from what the system really shows. Only the
// upper directory decides which paths go into the layer.
func mergedView(l store.Layout, d *deploy.Deployment) (string, func(), error) {
	base, err := os.MkdirTemp("", "berth-commit-")
	if err != nil {
		return "", nil, err
	}
	img, merged := filepath.Join(base, "image"), filepath.Join(base, "merged")
	// Only empty directories are removed: never anything below a mount.
	rmdirs := func() {
		os.Remove(merged)
		os.Remove(img)
		os.Remove(base)
	}
	for _, p := range []string{img, merged} {
		if err := os.Mkdir(p, 0o700); err != nil {
			rmdirs()
			return "", nil, err
		}
	}
	if err := composefs.Mount(img, composefs.MountOptions{Image: l.Image(d.ComposefsDigest), Objects: l.Objects()}); err != nil {
		rmdirs()
		return "", nil, err
	}
	upper := localchanges.UpperDir(l, d.ID)
	opts := "lowerdir=" + escapeOverlay(upper) + ":" + escapeOverlay(img) + ",metacopy=on,redirect_dir=on"
	if err := unix.Mount("overlay", merged, "overlay", unix.MS_RDONLY|unix.MS_NODEV|unix.MS_NOSUID, opts); err != nil {
		if composefs.Unmount(img) != nil {
			unix.Unmount(img, unix.MNT_DETACH)
		}
		rmdirs()
		return "", nil, fmt.Errorf("mount the deployment's changes over its image (overlay %s): %w", opts, err)
	}
	return merged, func() {
		// The merged overlay holds the image mount: it goes first, for
		// real (a lazy unmount would leave the image mount busy).
		if unix.Unmount(merged, 0) != nil {
			unix.Unmount(merged, unix.MNT_DETACH)
		}
		if composefs.Unmount(img) != nil {
			unix.Unmount(img, unix.MNT_DETACH)
		}
		rmdirs()
	}, nil
}

// escapeOverlay escapes what overlayfs's lowerdir= parser treats specially.
func escapeOverlay(p string) string {
	return strings.NewReplacer(`\`, `\\`, `:`, `\:`, `,`, `\,`).Replace(p)
}

// LayerStats counts what a layer holds.
type LayerStats struct {
	Entries   int `json:"entries"`
	Whiteouts int `json:"whiteouts"`
	Opaque    int `json:"opaque"`
	// Skipped are entries a tar layer cannot hold (sockets).
	Skipped []string `json:"skipped,omitempty"`
}

type layerWriter struct {
	tw     *tar.Writer
	upper  string
	merged string
	image  *composefs.Inode
	links  map[[2]uint64]string
	stats  LayerStats
}

// WriteLayer writes the local changes of deployment d as an OCI layer
// tar to w: whiteouts become .wh.<name>, opaque (and renamed) directories
// .wh..wh..opq plus their whole content, other changed entries their
// content and metadata (PAX SCHILY.xattr records; overlayfs's own
// trusted.overlay.* xattrs never), hardlinks within the layer as links.
// Entries below the shared state directories are left out (see
// localchanges.SharedState). It needs root: it mounts the deployment.
func WriteLayer(w io.Writer, l store.Layout, d *deploy.Deployment) (*LayerStats, error) {
	im, err := composefs.OpenImage(l.Image(d.ComposefsDigest))
	if err != nil {
		return nil, err
	}
	root, err := im.Root()
	if err != nil {
		return nil, err
	}
	merged, cleanup, err := mergedView(l, d)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	lw := &layerWriter{tw: tar.NewWriter(w), upper: localchanges.UpperDir(l, d.ID), merged: merged, image: root, links: map[[2]uint64]string{}}
	if err := lw.walkUpper(""); err != nil {
		return nil, err
	}
	if err := lw.tw.Close(); err != nil {
		return nil, err
	}
	return &lw.stats, nil
}

func sortedNames(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	sort.Strings(names)
	return names, err
}

// walkUpper writes the changes at and below upper/rel.
func (lw *layerWriter) walkUpper(rel string) error {
	names, err := sortedNames(filepath.Join(lw.upper, rel))
	if errors.Is(err, os.ErrNotExist) && rel == "" {
		return nil
	}
	if err != nil {
		return err
	}
	for _, name := range names {
		crel := path.Join(rel, name)
		if localchanges.SharedState(crel) {
			continue
		}
		up := filepath.Join(lw.upper, crel)
		fi, err := os.Lstat(up)
		if err != nil {
			return err
		}
		if overlay.IsWhiteout(up, fi) {
			if err := lw.marker(path.Join(rel, ".wh."+name)); err != nil {
				return err
			}
			lw.stats.Whiteouts++
			continue
		}
		if err := lw.add(crel); err != nil {
			return err
		}
		if !fi.IsDir() {
			continue
		}
		inImage := lw.image.Lookup(crel)
		_, redirected := overlay.Xattr(up, overlay.XattrRedirect)
		opaque := overlay.IsOpaque(up)
		if isAncestorOfPerDeployment(crel) || (!opaque && !redirected && inImage != nil && inImage.IsDir()) {
			// A directory of the image that holds changes below it.
			if err := lw.walkUpper(crel); err != nil {
				return err
			}
			continue
		}
		// The directory as a whole: new, replacing the image's, or
		// renamed (its content comes from elsewhere in the image).
		if inImage != nil && inImage.IsDir() {
			if err := lw.marker(path.Join(crel, ".wh..wh..opq")); err != nil {
				return err
			}
			lw.stats.Opaque++
		}
		if err := lw.subtree(crel); err != nil {
			return err
		}
	}
	return nil
}

func isAncestorOfPerDeployment(rel string) bool {
	for _, pd := range localchanges.PerDeployment {
		if strings.HasPrefix(pd, rel+"/") {
			return true
		}
	}
	return false
}

// subtree writes everything below rel as the deployment shows it.
func (lw *layerWriter) subtree(rel string) error {
	names, err := sortedNames(filepath.Join(lw.merged, rel))
	if err != nil {
		return err
	}
	for _, name := range names {
		crel := path.Join(rel, name)
		if err := lw.add(crel); err != nil {
			return err
		}
		if fi, err := os.Lstat(filepath.Join(lw.merged, crel)); err == nil && fi.IsDir() {
			if err := lw.subtree(crel); err != nil {
				return err
			}
		}
	}
	return nil
}

func (lw *layerWriter) marker(name string) error {
	lw.stats.Entries++
	return lw.tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Format: tar.FormatPAX, ModTime: time.Unix(0, 0)})
}

// add writes the entry rel as the merged view shows it.
func (lw *layerWriter) add(rel string) error {
	p := filepath.Join(lw.merged, rel)
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return fmt.Errorf("/%s: %w", rel, err)
	}
	hdr := &tar.Header{
		Name:    rel,
		Mode:    int64(st.Mode & 0o7777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
		Format:  tar.FormatPAX,
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		hdr.Typeflag, hdr.Name = tar.TypeDir, rel+"/"
	case unix.S_IFREG:
		hdr.Typeflag, hdr.Size = tar.TypeReg, st.Size
		if st.Nlink > 1 {
			key := [2]uint64{st.Dev, st.Ino}
			if first, ok := lw.links[key]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				lw.links[key] = rel
			}
		}
	case unix.S_IFLNK:
		target, err := os.Readlink(p)
		if err != nil {
			return fmt.Errorf("/%s: %w", rel, err)
		}
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
	case unix.S_IFCHR, unix.S_IFBLK:
		hdr.Typeflag = tar.TypeChar
		if st.Mode&unix.S_IFMT == unix.S_IFBLK {
			hdr.Typeflag = tar.TypeBlock
		}
		hdr.Devmajor, hdr.Devminor = int64(unix.Major(st.Rdev)), int64(unix.Minor(st.Rdev))
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
	default:
		lw.stats.Skipped = append(lw.stats.Skipped, "/"+rel)
		return nil
	}
	if hdr.Typeflag != tar.TypeLink {
		xs, err := xattrs(p)
		if err != nil {
			return fmt.Errorf("/%s: %w", rel, err)
		}
		for k, v := range xs {
			if hdr.PAXRecords == nil {
				hdr.PAXRecords = map[string]string{}
			}
			hdr.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	if err := lw.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("/%s: %w", rel, err)
	}
	lw.stats.Entries++
	if hdr.Typeflag != tar.TypeReg || hdr.Size == 0 {
		return nil
	}
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return fmt.Errorf("/%s: %w", rel, err)
	}
	defer f.Close()
	n, err := io.Copy(lw.tw, io.LimitReader(f, hdr.Size))
	if err != nil {
		return fmt.Errorf("/%s: %w", rel, err)
	}
	if n != hdr.Size {
		return fmt.Errorf("/%s changed while it was committed (read %d of %d bytes); try again", rel, n, hdr.Size)
	}
	return nil
}

// xattrs returns the xattrs of p that belong to the file (not overlayfs's
// own, which the merged view hides anyway).
func xattrs(p string) (map[string]string, error) {
	size, err := unix.Llistxattr(p, nil)
	if err != nil || size == 0 {
		if errors.Is(err, unix.ENOTSUP) {
			err = nil
		}
		return nil, err
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, k := range strings.Split(strings.TrimRight(string(buf[:size]), "\x00"), "\x00") {
		if k == "" || strings.HasPrefix(k, overlay.XattrPrefix) || strings.HasPrefix(k, "user.overlay.") {
			continue
		}
		if v, ok := overlay.Xattr(p, k); ok {
			out[k] = v
		}
	}
	return out, nil
}
