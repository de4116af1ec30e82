package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// extractWithTar builds the reference tree the way a container runtime
// without berth would: for each layer, apply its whiteouts, then GNU
// tar -x the rest.
func extractWithTar(t *testing.T, layers [][]byte, dest string) {
	t.Helper()
	for i, l := range layers {
		tr := tar.NewReader(bytes.NewReader(l))
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			must(t, err)
			name := strings.TrimPrefix(h.Name, "./")
			dir, base := filepath.Split(name)
			switch {
			case base == ".wh..wh..opq":
				ents, _ := os.ReadDir(filepath.Join(dest, dir))
				for _, e := range ents {
					must(t, os.RemoveAll(filepath.Join(dest, dir, e.Name())))
				}
			case strings.HasPrefix(base, ".wh."):
				must(t, os.RemoveAll(filepath.Join(dest, dir, strings.TrimPrefix(base, ".wh."))))
			}
		}
		f := filepath.Join(t.TempDir(), fmt.Sprintf("layer%d.tar", i))
		must(t, os.WriteFile(f, l, 0o644))
		cmd := exec.Command("tar", "-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*",
			"--exclude=.wh.*", "-C", dest, "-f", f)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("tar -x layer %d: %v\n%s", i, err, out)
		}
	}
}

type fileInfo struct {
	mode     uint32
	uid, gid uint32
	size     int64
	mtime    unix.Timespec
	rdev     uint64
	target   string
	content  string
	xattrs   string
	ino      uint64
	isDir    bool
	linkPeer string // first path seen with the same inode
}

func describeTree(t *testing.T, root string) map[string]*fileInfo {
	t.Helper()
	out := map[string]*fileInfo{}
	firstPath := map[uint64]string{}
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		st := fi.Sys().(*syscall.Stat_t)
		info := &fileInfo{
			mode: st.Mode, uid: st.Uid, gid: st.Gid,
			mtime: unix.Timespec{Sec: st.Mtim.Sec, Nsec: st.Mtim.Nsec},
			rdev:  st.Rdev, ino: st.Ino, isDir: fi.IsDir(),
		}
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			info.target, _ = os.Readlink(p)
		case fi.Mode().IsRegular():
			info.size = fi.Size()
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			s := sha256.Sum256(data)
			info.content = hex.EncodeToString(s[:])
			if peer, ok := firstPath[st.Ino]; ok {
				info.linkPeer = peer
			} else {
				firstPath[st.Ino] = rel
				info.linkPeer = rel
			}
		}
		info.xattrs = listXattrs(t, p)
		out[rel] = info
		return nil
	})
	must(t, err)
	return out
}

func listXattrs(t *testing.T, p string) string {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		return "error:" + err.Error()
	}
	var keys []string
	for _, k := range strings.Split(string(buf[:n]), "\x00") {
		if k == "" || k == "security.selinux" {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, k, v)
		if err != nil {
			keys = append(keys, k+"=error:"+err.Error())
			continue
		}
		keys = append(keys, k+"="+hex.EncodeToString(v[:m]))
	}
	sort.Strings(keys)
	return strings.Join(keys, ",")
}

// A mounted imported image equals the tree tar -x of the layers gives,
// entry by entry: type, mode, owner, size, content, mtime, device numbers,
// symlink targets, xattrs and hardlink groups.
func TestMountedImageEqualsTarExtract(t *testing.T) {
	testenv.RequireRoot(t, "mounts the composefs image and extracts tar with owners, devices and security xattrs")
	testenv.RequireTool(t, "tar", "tar")
	layers := standardLayers(t)
	work := t.TempDir()
	(&testImage{layers: layers}).build(t).writeOCILayout(t, work, "v1")
	sysroot := t.TempDir()
	img, err := Pull(context.Background(), "oci:"+work+":v1", testPullOptions(t, sysroot))
	must(t, err)

	ref := t.TempDir()
	extractWithTar(t, layers, ref)

	mnt := t.TempDir()
	l := store.At(sysroot)
	err = composefs.Mount(mnt, composefs.MountOptions{Image: l.Image(img.ComposefsDigest), Objects: l.Objects()})
	testenv.RequireFeature(t, err, "composefs mount (EROFS, overlayfs)", composefs.ErrNoErofs, composefs.ErrNoOverlayFeature)
	defer composefs.Unmount(mnt)

	want := describeTree(t, ref)
	got := describeTree(t, mnt)
	compareTrees(t, want, got)
}

func compareTrees(t *testing.T, want, got map[string]*fileInfo) {
	t.Helper()
	var names []string
	for p := range want {
		names = append(names, p)
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("%s: in the mounted image, not in the tar -x tree", p)
		}
	}
	sort.Strings(names)
	if len(names) < 20 {
		t.Fatalf("reference tree has only %d entries", len(names))
	}
	for _, p := range names {
		w, g := want[p], got[p]
		if g == nil {
			t.Errorf("%s: missing from the mounted image", p)
			continue
		}
		if p == "." {
			continue // the extraction directory's own metadata is not from the layers
		}
		if w.mode != g.mode || w.uid != g.uid || w.gid != g.gid {
			t.Errorf("%s: mode/uid/gid %o/%d/%d, want %o/%d/%d", p, g.mode, g.uid, g.gid, w.mode, w.uid, w.gid)
		}
		if w.size != g.size || w.content != g.content {
			t.Errorf("%s: content differs (size %d, want %d)", p, g.size, w.size)
		}
		if w.target != g.target {
			t.Errorf("%s: symlink target %q, want %q", p, g.target, w.target)
		}
		if w.rdev != g.rdev {
			t.Errorf("%s: rdev %x, want %x", p, g.rdev, w.rdev)
		}
		if w.mtime != g.mtime {
			t.Errorf("%s: mtime %v, want %v", p, g.mtime, w.mtime)
		}
		if w.xattrs != g.xattrs {
			t.Errorf("%s: xattrs %q, want %q", p, g.xattrs, w.xattrs)
		}
		if w.linkPeer != g.linkPeer {
			t.Errorf("%s: hardlinked with %q, want %q", p, g.linkPeer, w.linkPeer)
		}
	}
}
