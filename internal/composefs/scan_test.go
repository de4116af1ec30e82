package composefs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/testenv"
)

// wtScanTree creates files of the sizes around the inline limit, a
// hardlink pair, a symlink, a fifo, a nested directory and user xattrs
// (no root needed).
func wtScanTree(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	mk := func(name string, size int) {
		data := make([]byte, size)
		for i := range data {
			data[i] = byte(i*7 + size)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []int{0, 1, 64, 65, 4096, 300000} {
		mk(fmt.Sprintf("f%06d", s), s)
	}
	if err := os.MkdirAll(filepath.Join(dir, "sub/deeper"), 0o750); err != nil {
		t.Fatal(err)
	}
	mk("sub/deeper/file", 100)
	if err := os.Link(filepath.Join(dir, "f004096"), filepath.Join(dir, "sub/hardlink")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../f000065", filepath.Join(dir, "sub/symlink")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(dir, "fifo"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(filepath.Join(dir, "f000001"), "user.test", []byte("value"), 0); err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			testenv.SkipOrFail(t, "the temporary directory's filesystem (%s) has no user xattrs", dir)
		}
		t.Fatal(err)
	}
	// A sparse file takes the SEEK_DATA path.
	f, err := os.Create(filepath.Join(dir, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("tail"), 5<<20)
	f.Close()
	return dir
}

// wtWalk calls fn for every node of the tree (each name of a hardlink).
func wtWalk(n *Inode, p string, fn func(p string, n *Inode)) {
	fn(p, n)
	for _, name := range n.SortedNames() {
		wtWalk(n.Children[name], p+"/"+name, fn)
	}
}

func TestScanDirMatchesLstat(t *testing.T) {
	dir := wtScanTree(t)
	root, err := ScanDir(dir, ScanOptions{Workers: 3})
	if err != nil {
		t.Fatal(err)
	}
	count := 0
	err = filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		count++
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			rel = ""
		}
		n := root.Lookup(rel)
		if n == nil {
			t.Errorf("%s missing from the scan", rel)
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		if n.Mode != st.Mode || n.UID != st.Uid || n.GID != st.Gid || n.Mtime != (Timespec{st.Mtim.Sec, uint32(st.Mtim.Nsec)}) {
			t.Errorf("%s: %+v does not match lstat %+v", rel, n, st)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if n.Size != uint64(len(data)) {
				t.Errorf("%s: size %d, want %d", rel, n.Size, len(data))
			}
			switch {
			case len(data) == 0:
				if n.Inline != nil || n.Digest != nil {
					t.Errorf("%s: empty file has content or digest", rel)
				}
			case len(data) <= 64:
				if !bytes.Equal(n.Inline, data) || n.Digest != nil {
					t.Errorf("%s: inline %q, want %q", rel, n.Inline, data)
				}
			default:
				want, err := fsverity.Digest(bytes.NewReader(data), fsverity.SHA256)
				if err != nil {
					return err
				}
				if !bytes.Equal(n.Digest, want) || n.Payload != PayloadPath(want) || n.Inline != nil {
					t.Errorf("%s: digest %x payload %q, want %x", rel, n.Digest, n.Payload, want)
				}
			}
		case unix.S_IFLNK:
			target, _ := os.Readlink(p)
			if n.Target != target || n.Size != uint64(len(target)) {
				t.Errorf("%s: target %q, want %q", rel, n.Target, target)
			}
		case unix.S_IFDIR:
			ents, _ := os.ReadDir(p)
			if len(ents) != len(n.Children) {
				t.Errorf("%s: %d children, want %d", rel, len(n.Children), len(ents))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := root.Lookup("f000001").Xattr("user.test"); string(v) != "value" {
		t.Errorf("user.test xattr = %q", v)
	}
	// mkcomposefs ignores st_nlink: a hardlink becomes a separate inode.
	if a, b := root.Lookup("f004096"), root.Lookup("sub/hardlink"); a == b || !bytes.Equal(a.Digest, b.Digest) {
		t.Error("hardlinked files should be separate inodes with equal digests")
	}
	if count < 12 {
		t.Errorf("walked only %d entries", count)
	}
}

func TestScanDirOptions(t *testing.T) {
	dir := wtScanTree(t)
	one, err := ScanDir(dir, ScanOptions{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	many, err := ScanDir(dir, ScanOptions{Workers: 8})
	if err != nil {
		t.Fatal(err)
	}
	var d1, d2 bytes.Buffer
	WriteDump(&d1, one)
	WriteDump(&d2, many)
	if d1.String() != d2.String() {
		t.Error("the scan depends on the number of workers")
	}

	epoch, err := ScanDir(dir, ScanOptions{UseEpoch: true, SkipXattrs: true})
	if err != nil {
		t.Fatal(err)
	}
	wtWalk(epoch, "", func(p string, n *Inode) {
		if n.Mtime != (Timespec{}) || len(n.Xattrs) != 0 {
			t.Errorf("%s: mtime %v xattrs %v with UseEpoch+SkipXattrs", p, n.Mtime, n.Xattrs)
		}
	})

	s512, err := ScanDir(dir, ScanOptions{Alg: fsverity.SHA512})
	if err != nil {
		t.Fatal(err)
	}
	want, _ := fsverity.DigestFile(filepath.Join(dir, "f300000"), fsverity.SHA512)
	if n := s512.Lookup("f300000"); !bytes.Equal(n.Digest, want) || n.Payload != PayloadPath(want) {
		t.Errorf("sha512 digest %x, want %x", n.Digest, want)
	}
	// A SHA-512 tree writes and its image mounts (metacopy algorithm 2).
	if err := Write(&bytes.Buffer{}, s512, WriteOptions{}); err != nil {
		t.Fatal(err)
	}

	if _, err := ScanDir(dir, ScanOptions{SkipXattrs: true, UserXattrs: true}); err == nil {
		t.Error("SkipXattrs with UserXattrs accepted")
	}
	if _, err := ScanDir(filepath.Join(dir, "f000001"), ScanOptions{}); err == nil {
		t.Error("scanning a file accepted")
	}
	if _, err := ScanDir(filepath.Join(dir, "nope"), ScanOptions{}); err == nil {
		t.Error("scanning a missing directory accepted")
	}
}

// TestScanDirRootOnly covers what needs root: device nodes, foreign
// owners, trusted.* xattrs, and the object store filled during the scan.
func TestScanDirRootOnly(t *testing.T) {
	testenv.RequireRoot(t, "mknod, chown and trusted.* xattrs")
	dir := wtScanTree(t)
	if err := unix.Mknod(filepath.Join(dir, "chr"), unix.S_IFCHR|0o600, int(unix.Mkdev(300, 70000))); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(dir, "whiteout"), unix.S_IFCHR|0o600, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Lchown(filepath.Join(dir, "f000065"), 70000, 80000); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(filepath.Join(dir, "f000065"), "trusted.overlay.x", []byte("t"), 0); err != nil {
		t.Fatal(err)
	}
	root, err := ScanDir(dir, ScanOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// new_encode_dev(300, 70000): minor low byte, major, minor high bits.
	if got, want := root.Lookup("chr").Rdev, uint32(70000&0xff|300<<8|(70000&^0xff)<<12); got != want {
		t.Errorf("rdev %#x, want %#x", got, want)
	}
	if n := root.Lookup("f000065"); n.UID != 70000 || n.GID != 80000 {
		t.Errorf("owner %d:%d", n.UID, n.GID)
	}
	if v, ok := root.Lookup("f000065").Xattr("trusted.overlay.x"); !ok || string(v) != "t" {
		t.Error("trusted xattr not scanned")
	}
	user, err := ScanDir(dir, ScanOptions{UserXattrs: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := user.Lookup("f000065").Xattr("trusted.overlay.x"); ok {
		t.Error("UserXattrs kept a trusted xattr")
	}
	if v, _ := user.Lookup("f000001").Xattr("user.test"); string(v) != "value" {
		t.Error("UserXattrs dropped a user xattr")
	}
	nodev, err := ScanDir(dir, ScanOptions{SkipDevices: true})
	if err != nil {
		t.Fatal(err)
	}
	if nodev.Lookup("chr") != nil || nodev.Lookup("whiteout") != nil || nodev.Lookup("fifo") == nil {
		t.Error("SkipDevices should drop chr/blk (whiteouts too) and keep fifos")
	}
	// The whiteout raises the default version to 1.
	img := wtWrite(t, root, WriteOptions{})
	if img[12] != 1 {
		t.Errorf("version %d with a whiteout, want 1", img[12])
	}

	st, err := OpenStore(filepath.Join(t.TempDir(), "objects"), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	b := st.NewBatch()
	stored, err := ScanDir(dir, ScanOptions{Store: b})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	objects := 0
	wtWalk(stored, "", func(p string, n *Inode) {
		if n.Digest == nil {
			return
		}
		objects++
		data, err := os.ReadFile(st.Path(n.Digest))
		if err != nil {
			t.Errorf("%s: object missing: %v", p, err)
			return
		}
		if d, _ := fsverity.Digest(bytes.NewReader(data), fsverity.SHA256); !bytes.Equal(d, n.Digest) {
			t.Errorf("%s: object content digest %x, want %x", p, d, n.Digest)
		}
	})
	if objects < 5 {
		t.Errorf("only %d external files", objects)
	}
}
