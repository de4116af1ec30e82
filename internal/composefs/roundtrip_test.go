package composefs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/testenv"
	"golang.org/x/sys/unix"
)

// Kernel round trips: write an image and an object store, mount them with
// Mount (EROFS + overlayfs), and compare every entry a user of the mount
// sees with the source: type, mode, owner, mtime (ns), size, rdev, symlink
// target, xattrs and file bytes.

// needMount skips unless the test can mount (root).
func needMount(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t, "mounts EROFS and overlayfs")
}

// mountOrSkip mounts and registers the unmount; a kernel without EROFS or
// the needed overlayfs features skips with the reason.
func mountOrSkip(t testing.TB, mnt string, opts MountOptions) {
	t.Helper()
	testenv.RequireFeature(t, Mount(mnt, opts), "composefs mount (EROFS, overlayfs)", ErrNoErofs, ErrNoOverlayFeature)
	t.Cleanup(func() {
		if err := Unmount(mnt); err != nil && !errors.Is(err, unix.EINVAL) {
			t.Errorf("cleanup: %v", err)
		}
	})
}

// expEntry is what a user of the mount should see at one path.
type expEntry struct {
	rel      string // "" for the root
	mode     uint32
	uid, gid uint32
	mtime    Timespec
	size     int64
	rdev     uint64 // dev_t
	target   string
	xattrs   map[string]string
	children []string
	// content: inline bytes, or a file to read them from.
	inline  []byte
	content string
}

// applyOverlayView turns source entries into what the mount shows: a
// whiteout (chardev 0/0) is an empty regular file carrying whiteout
// xattrs, and its directory gets the "has whiteouts" (and, from format
// version 1, opaque "x") markers. Escaped trusted.overlay.* xattrs show
// up unescaped, i.e. as in the source; the private ones composefs adds
// (metacopy, redirect, the root's opaque) are hidden by overlayfs.
func applyOverlayView(ents []*expEntry, version int) {
	parents := map[string]*expEntry{}
	for _, e := range ents {
		if e.mode&SIFMT == SIFDIR {
			parents[e.rel] = e
		}
	}
	for _, e := range ents {
		if e.mode&SIFMT != SIFCHR || e.rdev != 0 {
			continue
		}
		e.mode = SIFREG | e.mode&07777
		e.size, e.inline, e.content = 0, nil, ""
		e.xattrs["trusted.overlay.whiteout"] = ""
		e.xattrs["user.overlay.whiteout"] = ""
		p := parents[parentRel(e.rel)]
		p.xattrs["trusted.overlay.whiteouts"] = ""
		p.xattrs["user.overlay.whiteouts"] = ""
		if version >= 1 {
			p.xattrs["trusted.overlay.opaque"] = "x"
			p.xattrs["user.overlay.opaque"] = "x"
		}
	}
}

func parentRel(rel string) string {
	if i := strings.LastIndexByte(rel, '/'); i >= 0 {
		return rel[:i]
	}
	return ""
}

func llistXattrs(p string) (map[string]string, error) {
	out := map[string]string{}
	size, err := unix.Llistxattr(p, nil)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return out, nil
		}
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	if size == 0 {
		return out, nil
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	// The first call may count names overlayfs then hides: skip empties.
	for _, k := range strings.Split(string(buf[:size]), "\x00") {
		if k == "" {
			continue
		}
		vs, err := unix.Lgetxattr(p, k, nil)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, k, err)
		}
		v := make([]byte, vs)
		vs, err = unix.Lgetxattr(p, k, v)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, k, err)
		}
		out[k] = string(v[:vs])
	}
	return out, nil
}

// statEntry describes the file at p (not following symlinks).
func statEntry(p, rel string) (*expEntry, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return nil, fmt.Errorf("lstat %s: %w", p, err)
	}
	e := &expEntry{rel: rel, mode: st.Mode, uid: st.Uid, gid: st.Gid,
		mtime: Timespec{Sec: st.Mtim.Sec, Nsec: uint32(st.Mtim.Nsec)}}
	var err error
	if e.xattrs, err = llistXattrs(p); err != nil {
		return nil, err
	}
	switch st.Mode & SIFMT {
	case SIFREG:
		e.size = st.Size
		e.content = p
	case SIFLNK:
		e.size = st.Size
		if e.target, err = os.Readlink(p); err != nil {
			return nil, err
		}
	case SIFCHR, SIFBLK:
		e.rdev = st.Rdev
	case SIFDIR:
		des, err := os.ReadDir(p)
		if err != nil {
			return nil, err
		}
		for _, d := range des {
			e.children = append(e.children, d.Name())
		}
	}
	return e, nil
}

// expectFromDir lists a source directory as the mount should show it.
func expectFromDir(t testing.TB, src string) []*expEntry {
	t.Helper()
	var ents []*expEntry
	err := filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if rel == "." {
			rel = ""
		}
		e, err := statEntry(p, rel)
		if err != nil {
			return err
		}
		ents = append(ents, e)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ents
}

// expectFromTree lists an input-model tree as the mount should show it;
// external contents come from the object store.
func expectFromTree(root *Inode, objects string) []*expEntry {
	var ents []*expEntry
	WalkTree(root, func(p string, n *Inode) error {
		rel := strings.TrimPrefix(p, "/")
		e := &expEntry{rel: rel, mode: n.Mode, uid: n.UID, gid: n.GID, mtime: n.Mtime, xattrs: map[string]string{}}
		for _, x := range n.Xattrs {
			e.xattrs[x.Key] = string(x.Value)
		}
		switch n.Type() {
		case SIFREG:
			e.size = int64(n.Size)
			if n.Payload != "" {
				e.content = filepath.Join(objects, n.Payload)
			} else {
				e.inline = n.Inline
			}
		case SIFLNK:
			e.size = int64(len(n.Target))
			e.target = n.Target
		case SIFCHR, SIFBLK:
			e.rdev = unix.Mkdev(n.Rdev>>8&0xfff, n.Rdev&0xff|n.Rdev>>12&0xfff00)
		case SIFDIR:
			e.children = n.SortedNames()
		}
		ents = append(ents, e)
		return nil
	})
	return ents
}

// compareMount checks every expected entry against the mount at mnt and
// returns the number of entries and file bytes compared.
func compareMount(t testing.TB, want []*expEntry, mnt string) (int, int64) {
	t.Helper()
	n, b, diffs := mountDiffs(want, mnt)
	if len(diffs) > 0 {
		t.Fatalf("mount %s differs from the source (first %d differences):\n%s", mnt, len(diffs), strings.Join(diffs, "\n"))
	}
	return n, b
}

// mountDiffs lists up to 30 differences between want and the mount.
func mountDiffs(want []*expEntry, mnt string) (int, int64, []string) {
	var (
		mu    sync.Mutex
		diffs []string
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if len(diffs) < 30 {
			diffs = append(diffs, fmt.Sprintf(format, args...))
		}
	}
	type job struct {
		e   *expEntry
		got string
	}
	jobs := make(chan job, 256)
	var compared atomic.Int64
	var wg sync.WaitGroup
	for range max(2, runtime.GOMAXPROCS(0)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				n, err := compareContent(j.e, j.got)
				if err != nil {
					fail("%s: %v", j.e.rel, err)
				}
				compared.Add(n)
			}
		}()
	}
	for _, w := range want {
		p := filepath.Join(mnt, w.rel)
		g, err := statEntry(p, w.rel)
		if err != nil {
			fail("%s: %v", w.rel, err)
			continue
		}
		if g.mode != w.mode {
			fail("%s: mode %o, want %o", w.rel, g.mode, w.mode)
			continue
		}
		if g.uid != w.uid || g.gid != w.gid {
			fail("%s: owner %d:%d, want %d:%d", w.rel, g.uid, g.gid, w.uid, w.gid)
		}
		if g.mtime != w.mtime {
			fail("%s: mtime %v, want %v", w.rel, g.mtime, w.mtime)
		}
		switch w.mode & SIFMT {
		case SIFREG, SIFLNK:
			if g.size != w.size {
				fail("%s: size %d, want %d", w.rel, g.size, w.size)
			}
		case SIFCHR, SIFBLK:
			if g.rdev != w.rdev {
				fail("%s: rdev %d:%d, want %d:%d", w.rel, unix.Major(g.rdev), unix.Minor(g.rdev), unix.Major(w.rdev), unix.Minor(w.rdev))
			}
		case SIFDIR:
			if strings.Join(g.children, "/") != strings.Join(w.children, "/") {
				fail("%s: entries %v, want %v", w.rel, g.children, w.children)
			}
		}
		if g.target != w.target {
			fail("%s: symlink target %q, want %q", w.rel, g.target, w.target)
		}
		if !equalXattrs(g.xattrs, w.xattrs) {
			fail("%s: xattrs %v, want %v", w.rel, g.xattrs, w.xattrs)
		}
		if w.mode&SIFMT == SIFREG {
			jobs <- job{w, p}
		}
	}
	close(jobs)
	wg.Wait()
	return len(want), compared.Load(), diffs
}

func equalXattrs(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

var cmpBufPool = sync.Pool{New: func() any { b := make([]byte, 2<<20); return &b }}

// compareContent compares the bytes of the mounted file with the expected
// content, in chunks.
func compareContent(e *expEntry, got string) (int64, error) {
	g, err := os.Open(got)
	if err != nil {
		return 0, err
	}
	defer g.Close()
	var w io.Reader = bytes.NewReader(e.inline)
	if e.content != "" {
		f, err := os.Open(e.content)
		if err != nil {
			return 0, err
		}
		defer f.Close()
		w = f
	}
	bp, bq := cmpBufPool.Get().(*[]byte), cmpBufPool.Get().(*[]byte)
	defer cmpBufPool.Put(bp)
	defer cmpBufPool.Put(bq)
	var total int64
	for {
		n, errW := io.ReadFull(w, *bp)
		m, errG := io.ReadFull(g, (*bq)[:n])
		if m != n || !bytes.Equal((*bp)[:n], (*bq)[:m]) {
			return total, fmt.Errorf("content differs within bytes %d..%d (read %d of %d): %v", total, total+int64(n), m, n, errG)
		}
		total += int64(n)
		if errW == io.EOF || errW == io.ErrUnexpectedEOF {
			if k, _ := g.Read((*bq)[:1]); k != 0 {
				return total, fmt.Errorf("mounted file is longer than %d bytes", total)
			}
			return total, nil
		}
		if errW != nil {
			return total, errW
		}
	}
}

// createAndMount scans src into a new store and image with the same code
// path as `berth composefs create --digest-store`, checks the image and
// mounts it. It returns the image's format version.
func createAndMount(t testing.TB, src, work string, opts WriteOptions) (mnt string, version int, s *Store) {
	t.Helper()
	s, err := OpenStore(filepath.Join(work, "objects"), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	b := s.NewBatch()
	root, err := ScanDir(src, ScanOptions{Store: b})
	if err != nil {
		b.Abort()
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(work, "image.cfs")
	if _, err := WriteImageFile(img, root, opts); err != nil {
		t.Fatal(err)
	}
	t.Logf("scanned %s into store and image in %v", src, time.Since(start).Round(time.Millisecond))
	im, err := OpenImage(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := im.Check(); err != nil {
		t.Fatal(err)
	}
	// The reader inverts the writer: Tree() written again is the image.
	tree, err := im.Tree()
	if err != nil {
		t.Fatal(err)
	}
	var again bytes.Buffer
	if err := Write(&again, tree, im.WriteOptions()); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(img); !bytes.Equal(again.Bytes(), data) {
		t.Errorf("Write(Tree()) differs from the image written from %s (%d vs %d bytes)", src, again.Len(), len(data))
	}
	mnt = filepath.Join(work, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	mountOrSkip(t, mnt, MountOptions{Image: img, Objects: s.Dir()})
	return mnt, im.Version(), s
}

// makeExtraTree adds what the reference trees lack: whiteouts, escaped
// overlay xattrs, an ACL, a socket, a sparse file, an empty directory.
func makeExtraTree(t testing.TB, dir string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(dir, "d/empty"), 0o755))
	must(unix.Mknod(filepath.Join(dir, "d/whiteout"), unix.S_IFCHR|0o600, 0))
	must(unix.Mknod(filepath.Join(dir, "root-whiteout"), unix.S_IFCHR|0o644, 0))
	must(unix.Mknod(filepath.Join(dir, "d/sock"), unix.S_IFSOCK|0o755, 0))
	must(os.WriteFile(filepath.Join(dir, "d/f"), bytes.Repeat([]byte("overlay "), 20), 0o644))
	must(unix.Lsetxattr(filepath.Join(dir, "d/f"), "trusted.overlay.custom", []byte("v"), 0))
	must(unix.Lsetxattr(filepath.Join(dir, "d"), "trusted.overlay.opaque", []byte("y"), 0))
	must(unix.Lsetxattr(filepath.Join(dir, "d/f"), "system.posix_acl_access", posixACL(), 0))
	sparse, err := os.Create(filepath.Join(dir, "sparse"))
	must(err)
	must(sparse.Truncate(64 << 20))
	_, err = sparse.WriteAt([]byte("middle"), 32<<20)
	must(err)
	must(sparse.Close())
	must(os.Symlink("../sparse", filepath.Join(dir, "d/up")))
}

// TestRoundTripVectors: the composefs reference trees plus an extra tree
// with whiteouts, through ScanDir, the store, the writer and the kernel.
func TestRoundTripVectors(t *testing.T) {
	needMount(t)
	trees := makeTrees(t, vectorDir(t))
	extra := filepath.Join(t.TempDir(), "extra")
	makeExtraTree(t, extra)
	for _, tc := range []struct {
		name, src string
		opts      WriteOptions
	}{
		{"tree1", filepath.Join(trees, "tree1"), WriteOptions{}},
		{"tree2", filepath.Join(trees, "tree2"), WriteOptions{MinVersion: 1}},
		{"extra", extra, WriteOptions{}},
		{"extra-v0", extra, VersionOptions(0, 0, true, true)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt, version, _ := createAndMount(t, tc.src, t.TempDir(), tc.opts)
			want := expectFromDir(t, tc.src)
			applyOverlayView(want, version)
			n, b := compareMount(t, want, mnt)
			t.Logf("%s (format version %d): %d entries, %d file bytes identical", tc.name, version, n, b)
		})
	}
}

// TestRoundTripSample mounts an image written from an in-memory tree
// (every feature of the model, hardlinks kept) and compares the mount
// with the model.
func TestRoundTripSample(t *testing.T) {
	needMount(t)
	for _, tc := range []struct {
		name string
		opts WriteOptions
	}{{"default", WriteOptions{}}, {"v0only", VersionOptions(0, 0, true, true)}} {
		t.Run(tc.name, func(t *testing.T) {
			root, s := storedSampleTree(t, true)
			work := t.TempDir()
			img := filepath.Join(work, "image.cfs")
			if _, err := WriteImageFile(img, root, tc.opts); err != nil {
				t.Fatal(err)
			}
			im, err := OpenImage(img)
			if err != nil {
				t.Fatal(err)
			}
			mnt := filepath.Join(work, "mnt")
			os.Mkdir(mnt, 0o755)
			mountOrSkip(t, mnt, MountOptions{Image: img, Objects: s.Dir()})
			want := expectFromTree(root, s.Dir())
			applyOverlayView(want, im.Version())
			n, b := compareMount(t, want, mnt)
			t.Logf("%d entries, %d file bytes identical", n, b)
		})
	}
}

// TestRoundTripDetectsDifferences makes sure the comparison is not blind:
// changed bytes in an object, a changed mode and a changed xattr in the
// source are all reported.
func TestRoundTripDetectsDifferences(t *testing.T) {
	needMount(t)
	src := filepath.Join(t.TempDir(), "src")
	makeExtraTree(t, src)
	mnt, version, s := createAndMount(t, src, t.TempDir(), WriteOptions{})
	want := expectFromDir(t, src)
	applyOverlayView(want, version)
	if _, _, diffs := mountDiffs(want, mnt); len(diffs) != 0 {
		t.Fatalf("unchanged tree differs: %v", diffs)
	}
	d, err := fsverity.DigestFile(filepath.Join(src, "d/f"), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	obj := s.Path(d)
	content, _ := os.ReadFile(obj)
	content[3] ^= 1
	if err := os.WriteFile(obj, content, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Join(src, "d/empty"), 0o700)
	unix.Lsetxattr(filepath.Join(src, "d"), "user.new", []byte("1"), 0)
	want = expectFromDir(t, src)
	applyOverlayView(want, version)
	_, _, diffs := mountDiffs(want, mnt)
	joined := strings.Join(diffs, "\n")
	for _, w := range []string{"d/f: content differs", "d/empty: mode", "d: xattrs"} {
		if !strings.Contains(joined, w) {
			t.Errorf("difference %q not reported; got:\n%s", w, joined)
		}
	}
}

// TestRoundTripUsr round-trips a copy of a real tree of ≥ 100,000
// entries (default /usr, or $BERTH_ROUNDTRIP_TREE) through the kernel. It
// takes minutes and needs the tree's size free on disk for the object
// store, so it runs only when BERTH_ROUNDTRIP_USR=1 (make roundtrip-usr).
func TestRoundTripUsr(t *testing.T) {
	if os.Getenv("BERTH_ROUNDTRIP_USR") != "1" {
		t.Skip("large tree round trip: set BERTH_ROUNDTRIP_USR=1 (make roundtrip-usr)")
	}
	needMount(t)
	src := os.Getenv("BERTH_ROUNDTRIP_TREE")
	if src == "" {
		src = "/usr"
	}
	work := t.TempDir()
	cp := filepath.Join(work, "src")
	start := time.Now()
	// A private copy, because the host's tree may change (apt) while the
	// test runs. Hardlinks make it cheap on the same filesystem: package
	// managers replace files by rename, which leaves the linked inodes
	// alone. Across filesystems it is a full copy.
	how := "hardlinked"
	if out, err := exec.Command("cp", "-al", src, cp).CombinedOutput(); err != nil {
		t.Logf("cp -al %s: %v (%s); copying the data instead", src, err, bytes.TrimSpace(out))
		os.RemoveAll(cp)
		how = "copied"
		if out, err := exec.Command("cp", "-a", src, cp).CombinedOutput(); err != nil {
			t.Fatalf("cp -a %s: %v\n%s", src, err, out)
		}
	}
	t.Logf("%s %s in %v", how, src, time.Since(start).Round(time.Second))
	mnt, version, s := createAndMount(t, cp, work, WriteOptions{})
	start = time.Now()
	want := expectFromDir(t, cp)
	if len(want) < 100000 {
		t.Errorf("%s has only %d entries; the round trip wants at least 100,000", src, len(want))
	}
	applyOverlayView(want, version)
	n, b := compareMount(t, want, mnt)
	t.Logf("%d entries, %d file bytes identical (compared in %v)", n, b, time.Since(start).Round(time.Second))
	if err := Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if err := os.RemoveAll(s.Dir()); err != nil {
		t.Fatal(err)
	}
	t.Logf("removed the object store in %v", time.Since(start).Round(time.Second))
}
