package composefs

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/testenv"
)

// wtWrite writes root and fails the test on error.
func wtWrite(t testing.TB, root *Inode, opts WriteOptions) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := Write(&buf, root, opts); err != nil {
		t.Fatalf("Write: %v", err)
	}
	return buf.Bytes()
}

// wtMount loop-mounts an image read-only as plain EROFS (no overlay), so
// the composefs xattrs are visible as written. It skips when not root or
// when the kernel cannot mount EROFS.
func wtMount(t testing.TB, img []byte) string {
	t.Helper()
	testenv.RequireRoot(t, "loop-mounts the image")
	dir := t.TempDir()
	file := filepath.Join(dir, "image.cfs")
	if err := os.WriteFile(file, img, 0o644); err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("mount", "-t", "erofs", "-o", "loop,ro", file, mnt).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("unknown filesystem type")) {
			testenv.SkipOrFail(t, "required kernel feature EROFS is missing (%v: %s)", err, bytes.TrimSpace(out))
		}
		t.Fatalf("mount -t erofs -o loop: %v: %s", err, bytes.TrimSpace(out))
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	return mnt
}

func wtGetxattr(t testing.TB, path, key string) ([]byte, bool) {
	t.Helper()
	buf := make([]byte, 65536)
	n, err := unix.Lgetxattr(path, key, buf)
	if errors.Is(err, unix.ENODATA) {
		return nil, false
	}
	if err != nil {
		t.Fatalf("getxattr %s %s: %v", path, key, err)
	}
	return buf[:n], true
}

func wtLstat(t testing.TB, path string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// wtXattrEntry is the on-disk bytes of one xattr entry, to look for in an
// image without a reader.
func wtXattrEntry(key string, value []byte) []byte {
	return wrAppendXattrEntry(nil, &Xattr{Key: key, Value: value})
}

func wtDigest(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func wtFile(size uint64, digest []byte) *Inode {
	n := &Inode{Mode: SIFREG | 0o644, Size: size, Mtime: Timespec{Sec: 1700000000}}
	if digest != nil {
		n.Digest = digest
		n.Payload = PayloadPath(digest)
	}
	return n
}

// wtSampleTree has every input feature the rewrites touch.
func wtSampleTree() *Inode {
	root := NewDir(0o755)
	root.Mtime = Timespec{Sec: 1700000000, Nsec: 5}
	root.Xattrs = []Xattr{{Key: "security.selinux", Value: []byte("system_u:object_r:root_t:s0\x00")}, {Key: "trusted.overlay.opaque", Value: []byte("y")}}
	big := wtFile(100000, wtDigest(0xab, 32))
	big.Xattrs = []Xattr{{Key: "user.a", Value: []byte("1")}, {Key: "trusted.overlay.metacopy", Value: []byte("input")}}
	root.Children["big"] = big
	root.Children["link-to-big"] = big
	root.Children["small"] = &Inode{Mode: SIFREG | 0o600, Size: 5, Inline: []byte("hello"), Mtime: Timespec{Sec: 5}}
	d := NewDir(0o700)
	d.Mtime = Timespec{Sec: 1700000000}
	d.Children["wh"] = &Inode{Mode: SIFCHR | 0o600, Mtime: Timespec{Sec: 1700000000}}
	d.Children["dev"] = &Inode{Mode: SIFBLK | 0o600, Rdev: 7 << 8, Mtime: Timespec{Sec: 1700000000}}
	d.Children["sym"] = &Inode{Mode: SIFLNK | 0o777, Target: "../big", Mtime: Timespec{Sec: 1700000000}}
	root.Children["d"] = d
	root.Children["ab"] = NewDir(0o755)
	return root
}

func wtCloneTree(n *Inode) *Inode {
	c := *n
	c.Xattrs = nil
	for _, x := range n.Xattrs {
		c.Xattrs = append(c.Xattrs, Xattr{Key: x.Key, Value: append([]byte(nil), x.Value...)})
	}
	c.Inline = append([]byte(nil), n.Inline...)
	c.Digest = append([]byte(nil), n.Digest...)
	if n.Children != nil {
		c.Children = map[string]*Inode{}
		for k, v := range n.Children {
			c.Children[k] = wtCloneTree(v)
		}
	}
	return &c
}

func TestWriteDoesNotMutateInput(t *testing.T) {
	root := wtSampleTree()
	before := wtCloneTree(root)
	var dump1, dump2 bytes.Buffer
	if err := WriteDump(&dump1, root); err != nil {
		t.Fatal(err)
	}
	img1 := wtWrite(t, root, WriteOptions{})
	img2 := wtWrite(t, root, WriteOptions{})
	if !bytes.Equal(img1, img2) {
		t.Error("two writes of the same tree differ")
	}
	if err := WriteDump(&dump2, root); err != nil {
		t.Fatal(err)
	}
	if dump1.String() != dump2.String() {
		t.Errorf("Write changed the tree:\nbefore:\n%s\nafter:\n%s", dump1.String(), dump2.String())
	}
	if !reflect.DeepEqual(wtCloneTree(root), before) {
		t.Error("Write changed the tree (deep compare)")
	}
	if root.Children["big"] != root.Children["link-to-big"] {
		t.Error("Write broke the hardlink sharing of the input")
	}
}

func TestImageDigestAndWriteImageFile(t *testing.T) {
	root := wtSampleTree()
	img := wtWrite(t, root, WriteOptions{})
	want, err := fsverity.Digest(bytes.NewReader(img), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ImageDigest(root, WriteOptions{}, fsverity.SHA256)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("ImageDigest = %x, %v; want %x", got, err, want)
	}
	got512, err := ImageDigest(root, WriteOptions{}, fsverity.SHA512)
	want512, _ := fsverity.Digest(bytes.NewReader(img), fsverity.SHA512)
	if err != nil || !bytes.Equal(got512, want512) {
		t.Fatalf("ImageDigest sha512 = %x, %v; want %x", got512, err, want512)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "img.cfs")
	if err := os.WriteFile(path, []byte("old content"), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := WriteImageFile(path, root, WriteOptions{})
	if err != nil || !bytes.Equal(d, want) {
		t.Fatalf("WriteImageFile = %x, %v; want %x", d, err, want)
	}
	onDisk, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(onDisk, img) {
		t.Fatalf("WriteImageFile wrote different bytes (%v)", err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o644 {
		t.Errorf("image mode %v, want 0644", fi.Mode().Perm())
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("temporary files left: %v", ents)
	}
	if fd, err := fsverity.DigestFile(path, fsverity.SHA256); err != nil || !bytes.Equal(fd, want) {
		t.Errorf("fs-verity digest of the file = %x, %v", fd, err)
	}
	// A failing write leaves the old file alone and no temporary.
	if _, err := WriteImageFile(path, &Inode{Mode: SIFREG}, WriteOptions{}); err == nil {
		t.Error("WriteImageFile accepted a non-directory root")
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(after, img) {
		t.Error("a failed WriteImageFile changed the existing image")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("temporary files left after failure: %v", ents)
	}
}

func TestWriteMetacopyVariants(t *testing.T) {
	d256 := wtDigest(0x11, 32)
	d512 := wtDigest(0x22, 64)
	root := NewDir(0o755)
	root.Children["sha256"] = wtFile(1000, d256)
	root.Children["sha512"] = wtFile(2000, d512)
	payloadOnly := wtFile(3000, nil)
	payloadOnly.Payload = "cc/" + strings.Repeat("d", 62)
	root.Children["payload-only"] = payloadOnly
	digestOnly := wtFile(4000, nil)
	digestOnly.Digest = wtDigest(0x33, 32)
	root.Children["digest-only"] = digestOnly
	img := wtWrite(t, root, WriteOptions{})

	meta256 := append([]byte{0, 36, 0, 1}, d256...)
	meta512 := append([]byte{0, 68, 0, 2}, d512...)
	metaDigestOnly := append([]byte{0, 36, 0, 1}, digestOnly.Digest...)
	for _, c := range []struct {
		name string
		key  string
		val  []byte
	}{
		{"sha256", xattrMetacopyKey, meta256},
		{"sha256", xattrRedirectKey, []byte("/" + PayloadPath(d256))},
		{"sha512", xattrMetacopyKey, meta512},
		{"sha512", xattrRedirectKey, []byte("/" + PayloadPath(d512))},
		{"payload-only", xattrRedirectKey, []byte("/" + payloadOnly.Payload)},
		{"digest-only", xattrMetacopyKey, metaDigestOnly},
	} {
		if !bytes.Contains(img, wtXattrEntry(c.key, c.val)) {
			t.Errorf("%s: image lacks %s=%x", c.name, c.key, c.val)
		}
	}
	if bytes.Contains(img, []byte("/"+PayloadPath(digestOnly.Digest))) {
		t.Error("digest-only: a redirect was written without a payload")
	}

	mnt := wtMount(t, img)
	for _, c := range []struct {
		name     string
		meta     []byte
		redirect string
	}{
		{"sha256", meta256, "/" + PayloadPath(d256)},
		{"sha512", meta512, "/" + PayloadPath(d512)},
		{"payload-only", []byte{}, "/" + payloadOnly.Payload},
		{"digest-only", metaDigestOnly, ""},
	} {
		p := filepath.Join(mnt, c.name)
		m, ok := wtGetxattr(t, p, xattrMetacopyKey)
		if !ok || !bytes.Equal(m, c.meta) {
			t.Errorf("%s: metacopy %x (present %v), want %x", c.name, m, ok, c.meta)
		}
		r, ok := wtGetxattr(t, p, xattrRedirectKey)
		if string(r) != c.redirect || ok != (c.redirect != "") {
			t.Errorf("%s: redirect %q (present %v), want %q", c.name, r, ok, c.redirect)
		}
		st := wtLstat(t, p)
		if uint64(st.Size) != root.Children[c.name].Size {
			t.Errorf("%s: size %d, want %d", c.name, st.Size, root.Children[c.name].Size)
		}
	}
}

const (
	xattrMetacopyKey = "trusted.overlay.metacopy"
	xattrRedirectKey = "trusted.overlay.redirect"
)

func wtWhiteoutTree() *Inode {
	root := NewDir(0o755)
	d := NewDir(0o755)
	d.Children["gone"] = &Inode{Mode: SIFCHR | 0o640}
	root.Children["d"] = d
	return root
}

func TestWriteVersionsAndWhiteouts(t *testing.T) {
	opaque := wtXattrEntry("user.overlay.opaque", []byte("x"))
	for _, c := range []struct {
		name    string
		opts    WriteOptions
		version uint32
	}{
		{"default", WriteOptions{}, 1},
		{"min1", VersionOptions(1, 0, true, false), 1},
		{"v0only", VersionOptions(0, 0, true, true), 0},
		{"pinned", WriteOptions{MaxVersion: PinVersion}, 0},
	} {
		img := wtWrite(t, wtWhiteoutTree(), c.opts)
		if v := binary.LittleEndian.Uint32(img[12:]); v != c.version {
			t.Errorf("%s: header version %d, want %d", c.name, v, c.version)
		}
		if got := bytes.Contains(img, opaque); got != (c.version >= 1) {
			t.Errorf("%s: user.overlay.opaque=x present %v, want %v", c.name, got, c.version >= 1)
		}
	}
	// Without a whiteout the default stays at version 0.
	plain := NewDir(0o755)
	if v := binary.LittleEndian.Uint32(wtWrite(t, plain, WriteOptions{})[12:]); v != 0 {
		t.Errorf("tree without whiteouts: version %d, want 0", v)
	}
	if _, err := ImageDigest(plain, WriteOptions{MinVersion: 2}, fsverity.SHA256); err == nil {
		t.Error("version 2 accepted")
	}

	mnt := wtMount(t, wtWrite(t, wtWhiteoutTree(), WriteOptions{}))
	st := wtLstat(t, filepath.Join(mnt, "d/gone"))
	if st.Mode != unix.S_IFREG|0o640 || st.Size != 0 {
		t.Errorf("whiteout stored as mode %o size %d, want regular 0640 empty", st.Mode, st.Size)
	}
	for _, k := range []string{"trusted.overlay.overlay.whiteout", "user.overlay.whiteout"} {
		if _, ok := wtGetxattr(t, filepath.Join(mnt, "d/gone"), k); !ok {
			t.Errorf("whiteout lacks %s", k)
		}
	}
	for k, v := range map[string]string{"trusted.overlay.overlay.whiteouts": "", "user.overlay.whiteouts": "", "trusted.overlay.overlay.opaque": "x", "user.overlay.opaque": "x"} {
		if got, ok := wtGetxattr(t, filepath.Join(mnt, "d"), k); !ok || string(got) != v {
			t.Errorf("parent of whiteout: %s=%q (present %v), want %q", k, got, ok, v)
		}
	}
}

func TestWriteRootWhiteoutsAndEscaping(t *testing.T) {
	root := wtSampleTree()
	img := wtWrite(t, root, WriteOptions{})
	mnt := wtMount(t, img)
	ents, err := os.ReadDir(mnt)
	if err != nil {
		t.Fatal(err)
	}
	whiteouts := 0
	for _, e := range ents {
		if len(e.Name()) == 2 && e.Name() != "ab" {
			st := wtLstat(t, filepath.Join(mnt, e.Name()))
			if st.Mode != unix.S_IFCHR|0o644 || st.Rdev != 0 || st.Mtim.Sec != root.Mtime.Sec || st.Mtim.Nsec != int64(root.Mtime.Nsec) {
				t.Errorf("root whiteout %s: mode %o rdev %d mtime %d.%d", e.Name(), st.Mode, st.Rdev, st.Mtim.Sec, st.Mtim.Nsec)
			}
			if sel, ok := wtGetxattr(t, filepath.Join(mnt, e.Name()), "security.selinux"); !ok || !bytes.Equal(sel, root.Xattrs[0].Value) {
				t.Errorf("root whiteout %s: security.selinux %q", e.Name(), sel)
			}
			whiteouts++
		}
	}
	if whiteouts != 255 {
		t.Errorf("%d root whiteouts, want 255 (256 minus the existing \"ab\")", whiteouts)
	}
	if fi, err := os.Lstat(filepath.Join(mnt, "ab")); err != nil || !fi.IsDir() {
		t.Errorf("existing child ab replaced: %v %v", fi, err)
	}
	if v, _ := wtGetxattr(t, mnt, "trusted.overlay.opaque"); string(v) != "y" {
		t.Errorf("root trusted.overlay.opaque = %q, want y", v)
	}
	if v, _ := wtGetxattr(t, mnt, "trusted.overlay.overlay.opaque"); string(v) != "y" {
		t.Errorf("input trusted.overlay.opaque not escaped: %q", v)
	}
	if v, _ := wtGetxattr(t, filepath.Join(mnt, "big"), "trusted.overlay.overlay.metacopy"); string(v) != "input" {
		t.Errorf("input trusted.overlay.metacopy not escaped: %q", v)
	}
	// Hardlinked input: one inode, nlink 2.
	a, b := wtLstat(t, filepath.Join(mnt, "big")), wtLstat(t, filepath.Join(mnt, "link-to-big"))
	if a.Ino != b.Ino || a.Nlink != 2 {
		t.Errorf("hardlink: inodes %d/%d nlink %d, want one inode with nlink 2", a.Ino, b.Ino, a.Nlink)
	}
	if st := wtLstat(t, filepath.Join(mnt, "d/dev")); st.Rdev != 7<<8 {
		t.Errorf("block device rdev %#x, want %#x", st.Rdev, 7<<8)
	}
	if got, _ := os.Readlink(filepath.Join(mnt, "d/sym")); got != "../big" {
		t.Errorf("symlink target %q", got)
	}
	if got, _ := os.ReadFile(filepath.Join(mnt, "small")); string(got) != "hello" {
		t.Errorf("inline content %q", got)
	}
	if st := wtLstat(t, mnt); st.Nlink != 4 {
		t.Errorf("root nlink %d, want 4 (2 + subdirectories ab, d)", st.Nlink)
	}
}

func TestWriteHasACLFlag(t *testing.T) {
	root := NewDir(0o755)
	if f := binary.LittleEndian.Uint32(wtWrite(t, root, WriteOptions{})[8:]); f != 0 {
		t.Errorf("flags %#x without ACLs", f)
	}
	for _, key := range []string{"system.posix_acl_access", "system.posix_acl_default"} {
		root := NewDir(0o755)
		sub := NewDir(0o755)
		sub.Xattrs = []Xattr{{Key: key, Value: []byte{2, 0, 0, 0}}}
		root.Children["sub"] = sub
		if f := binary.LittleEndian.Uint32(wtWrite(t, root, WriteOptions{})[8:]); f != 1 {
			t.Errorf("%s: flags %#x, want HAS_ACL", key, f)
		}
	}
}

func TestWriteRejectsInvalidTrees(t *testing.T) {
	cyc := NewDir(0o755)
	cyc.Children["self"] = cyc
	dirTwice := NewDir(0o755)
	sub := NewDir(0o755)
	dirTwice.Children["a"] = sub
	dirTwice.Children["b"] = sub
	withChildren := &Inode{Mode: SIFREG, Children: map[string]*Inode{"x": {Mode: SIFREG}}}
	cases := map[string]*Inode{
		"nil root":               nil,
		"file root":              {Mode: SIFREG},
		"cycle":                  cyc,
		"directory hardlink":     dirTwice,
		"bad mode":               {Mode: SIFDIR, Children: map[string]*Inode{"x": {Mode: 0o644}}},
		"empty name":             {Mode: SIFDIR, Children: map[string]*Inode{"": {Mode: SIFREG}}},
		"dot name":               {Mode: SIFDIR, Children: map[string]*Inode{".": {Mode: SIFREG}}},
		"slash in name":          {Mode: SIFDIR, Children: map[string]*Inode{"a/b": {Mode: SIFREG}}},
		"long name":              {Mode: SIFDIR, Children: map[string]*Inode{strings.Repeat("n", 256): {Mode: SIFREG}}},
		"nil child":              {Mode: SIFDIR, Children: map[string]*Inode{"x": nil}},
		"file with children":     {Mode: SIFDIR, Children: map[string]*Inode{"f": withChildren}},
		"empty symlink":          {Mode: SIFDIR, Children: map[string]*Inode{"l": {Mode: SIFLNK}}},
		"long symlink":           {Mode: SIFDIR, Children: map[string]*Inode{"l": {Mode: SIFLNK, Target: strings.Repeat("t", 4096)}}},
		"inline size mismatch":   {Mode: SIFDIR, Children: map[string]*Inode{"f": {Mode: SIFREG, Size: 3, Inline: []byte("ab")}}},
		"inline too big":         {Mode: SIFDIR, Children: map[string]*Inode{"f": {Mode: SIFREG, Size: 5001, Inline: make([]byte, 5001)}}},
		"bad digest length":      {Mode: SIFDIR, Children: map[string]*Inode{"f": {Mode: SIFREG, Size: 100, Digest: []byte{1, 2, 3}}}},
		"too big":                {Mode: SIFDIR, Children: map[string]*Inode{"f": {Mode: SIFREG, Size: 1 << 60}}},
		"empty xattr name":       {Mode: SIFDIR, Xattrs: []Xattr{{Key: "", Value: nil}}},
		"xattr value too long":   {Mode: SIFDIR, Xattrs: []Xattr{{Key: "user.x", Value: make([]byte, 70000)}}},
		"xattrs too large":       {Mode: SIFDIR, Xattrs: []Xattr{{Key: "user.x", Value: make([]byte, 20000)}, {Key: "user.y", Value: make([]byte, 20000)}}},
		"nanoseconds too big":    {Mode: SIFDIR, Mtime: Timespec{Nsec: 1e9}},
		"payload with NUL bytes": {Mode: SIFDIR, Children: map[string]*Inode{"f": {Mode: SIFREG, Size: 100, Payload: "a\x00b"}}},
	}
	for name, root := range cases {
		if err := Write(&bytes.Buffer{}, root, WriteOptions{}); err == nil {
			t.Errorf("%s: accepted", name)
		} else if !strings.Contains(err.Error(), "composefs") {
			t.Errorf("%s: error lacks context: %v", name, err)
		}
	}
}

// TestWriteLayoutEdges exercises block boundaries: inline content that
// needs a data block (dump input allows up to 5000 bytes), symlinks that
// move to a data block, multi-block directories, compact vs extended
// inodes; the kernel must read everything back.
func TestWriteLayoutEdges(t *testing.T) {
	root := NewDir(0o755)
	root.Mtime = Timespec{Sec: 100}
	for _, size := range []int{1, 64, 2048, 2049, 4095, 4096, 4097, 5000} {
		data := bytes.Repeat([]byte{byte(size)}, size)
		root.Children["inline-"+hex.EncodeToString([]byte{byte(size >> 8), byte(size)})] = &Inode{Mode: SIFREG | 0o644, Size: uint64(size), Inline: data, Mtime: Timespec{Sec: 100}}
	}
	for _, l := range []int{1, 2000, 4000, 4050, 4095} {
		root.Children["sym-"+strings.Repeat("x", l%7)+hex.EncodeToString([]byte{byte(l >> 8), byte(l)})] = &Inode{Mode: SIFLNK | 0o777, Target: strings.Repeat("s", l), Mtime: Timespec{Sec: 100}}
	}
	big := NewDir(0o755)
	big.Mtime = Timespec{Sec: 100}
	for i := 0; i < 700; i++ {
		big.Children[strings.Repeat("e", i%40)+hex.EncodeToString([]byte{byte(i >> 8), byte(i)})] = &Inode{Mode: SIFREG | 0o644, Mtime: Timespec{Sec: 100}}
	}
	root.Children["bigdir"] = big
	root.Children["ext"] = &Inode{Mode: SIFREG | 0o644, Size: 1 << 33, UID: 70000, Mtime: Timespec{Sec: 100}, Digest: wtDigest(1, 32), Payload: PayloadPath(wtDigest(1, 32))}
	root.Children["neg-mtime"] = &Inode{Mode: SIFREG | 0o644, Mtime: Timespec{Sec: -5, Nsec: 7}}
	img := wtWrite(t, root, WriteOptions{})
	if len(img)%4096 != 0 {
		t.Fatalf("image size %d not block aligned", len(img))
	}
	mnt := wtMount(t, img)
	for name, n := range root.Children {
		p := filepath.Join(mnt, name)
		st := wtLstat(t, p)
		if st.Mode != n.Mode || st.Uid != n.UID || st.Mtim.Sec != n.Mtime.Sec || st.Mtim.Nsec != int64(n.Mtime.Nsec) {
			t.Errorf("%s: mode %o uid %d mtime %d.%d; want %o %d %d.%d", name, st.Mode, st.Uid, st.Mtim.Sec, st.Mtim.Nsec, n.Mode, n.UID, n.Mtime.Sec, n.Mtime.Nsec)
		}
		switch n.Type() {
		case SIFREG:
			if uint64(st.Size) != n.Size {
				t.Errorf("%s: size %d, want %d", name, st.Size, n.Size)
			}
			if len(n.Inline) > 0 {
				got, err := os.ReadFile(p)
				if err != nil || !bytes.Equal(got, n.Inline) {
					t.Errorf("%s: content differs (%v)", name, err)
				}
			}
		case SIFLNK:
			if got, err := os.Readlink(p); err != nil || got != n.Target {
				t.Errorf("%s: symlink target of %d bytes differs (%v)", name, len(got), err)
			}
		case SIFDIR:
			ents, err := os.ReadDir(p)
			if err != nil || len(ents) != len(n.Children) {
				t.Errorf("%s: %d entries (%v), want %d", name, len(ents), err, len(n.Children))
			}
		}
	}
}
