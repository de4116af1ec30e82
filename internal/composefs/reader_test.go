package composefs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// encodeDev is the kernel's new_encode_dev (what Inode.Rdev holds).
func encodeDev(major, minor uint32) uint32 {
	return minor&0xff | major<<8 | (minor&^0xff)<<12
}

// posixACL encodes a POSIX ACL xattr value: u:rwx, u:1000:r-x, g::r-x,
// m::r-x, o::r--.
func posixACL() []byte {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range []struct {
		tag, perm uint16
		id        uint32
	}{{1, 7, 0xffffffff}, {2, 5, 1000}, {4, 5, 0xffffffff}, {0x10, 5, 0xffffffff}, {0x20, 4, 0xffffffff}} {
		b = binary.LittleEndian.AppendUint16(b, e.tag)
		b = binary.LittleEndian.AppendUint16(b, e.perm)
		b = binary.LittleEndian.AppendUint32(b, e.id)
	}
	return b
}

// sampleTree builds a tree with every file type and feature the writer
// supports. External file contents go through add (nil: digest/payload
// made up, contents not kept). whiteouts adds chardev 0/0 nodes.
func sampleTree(t testing.TB, add func([]byte) ([]byte, error), whiteouts bool) *Inode {
	t.Helper()
	t0 := Timespec{Sec: 1700000000, Nsec: 0}
	ext := func(mode uint32, content []byte) *Inode {
		n := &Inode{Mode: SIFREG | mode, Mtime: t0, Size: uint64(len(content))}
		switch {
		case len(content) == 0:
		case len(content) <= 64:
			n.Inline = content
		default:
			var d []byte
			var err error
			if add != nil {
				d, err = add(content)
				if err != nil {
					t.Fatal(err)
				}
			} else {
				d = make([]byte, 32)
				copy(d, content)
			}
			n.Digest, n.Payload = d, PayloadPath(d)
		}
		return n
	}
	gen := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte('a' + (i*31+n)%26)
		}
		return b
	}
	root := NewDir(0o755)
	root.Mtime = t0
	root.Xattrs = []Xattr{{"security.selinux", []byte("system_u:object_r:root_t:s0")}}
	c := root.Children
	c["empty"] = ext(0o644, nil)
	c["small.txt"] = ext(0o644, []byte("hello world\n"))
	c["inline64"] = ext(0o600, gen(64))
	c["ext65"] = ext(0o644, gen(65))
	c["block4096"] = ext(0o644, gen(4096))
	big := ext(0o644, gen(300000))
	c["big"] = big
	c["big-hardlink"] = big
	c["dup-of-big"] = ext(0o644, gen(300000))
	c["setuid"] = ext(0o4755, gen(100))
	c["setgid"] = ext(0o2750, gen(100))
	c["noperm"] = ext(0, gen(100))
	c["sym"] = &Inode{Mode: SIFLNK | 0o777, Mtime: t0, Target: "big", UID: 1234, GID: 4321}
	c["dangling"] = &Inode{Mode: SIFLNK | 0o777, Mtime: t0, Target: "/nonexistent/abs"}
	c["longsym"] = &Inode{Mode: SIFLNK | 0o777, Mtime: t0, Target: strings.Repeat("y", 4000)}
	c["fifo"] = &Inode{Mode: SIFIFO | 0o640, Mtime: t0}
	c["chr-1-3"] = &Inode{Mode: SIFCHR | 0o666, Mtime: t0, Rdev: encodeDev(1, 3)}
	c["blk-7-0"] = &Inode{Mode: SIFBLK | 0o660, Mtime: t0, Rdev: encodeDev(7, 0)}
	c["chr-big"] = &Inode{Mode: SIFCHR | 0o600, Mtime: t0, Rdev: encodeDev(300, 70000)}
	owned := ext(0o644, gen(70))
	owned.UID, owned.GID = 70000, 70001
	c["owned-70000"] = owned
	nsec := ext(0o644, gen(10))
	nsec.Mtime = Timespec{Sec: 1686832496, Nsec: 123456789}
	c["mtime-nsec"] = nsec
	old := ext(0o644, gen(20))
	old.Mtime = Timespec{Sec: -86400, Nsec: 5}
	c["before-1970"] = old
	xf := ext(0o644, gen(300))
	xf.Xattrs = []Xattr{
		{"user.comment", []byte("hello xattr")},
		{"user.empty", []byte{}},
		{"security.test", []byte("security-value")},
		{"trusted.foo", []byte{0, 0xff, 0x10}},
		{"trusted.overlay.custom", []byte("escaped")},
		{"system.posix_acl_access", posixACL()},
	}
	c["xattr-file"] = xf
	d := NewDir(0o1777)
	d.Mtime = Timespec{Sec: 1893456000, Nsec: 500000000}
	d.Xattrs = []Xattr{{"trusted.overlay.opaque", []byte("y")}, {"user.overlay.x", []byte("1")}}
	c["sticky-dir"] = d
	deep := root
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		n := NewDir(0o755)
		n.Mtime = t0
		deep.Children[name] = n
		deep = n
	}
	deep.Children["deep.txt"] = ext(0o644, []byte("deep\n"))
	deep.Children["mid.bin"] = ext(0o644, gen(5000))
	many := NewDir(0o755)
	many.Mtime = t0
	for i := range 600 {
		f := ext(0o644, []byte(fmt.Sprint(i)))
		if i%100 == 0 {
			f.Xattrs = []Xattr{{"user.shared", []byte("same-value")}}
		}
		many.Children[fmt.Sprintf("f%04d", i)] = f
	}
	c["many"] = many
	long := NewDir(0o755)
	long.Mtime = t0
	for i := range 20 {
		long.Children[fmt.Sprintf("n%02d_%s", i, strings.Repeat("L", 250))] = ext(0o644, []byte(fmt.Sprint(i)))
	}
	c["longnames"] = long
	if whiteouts {
		wd := NewDir(0o755)
		wd.Mtime = t0
		wd.Children["gone"] = &Inode{Mode: SIFCHR | 0o600, Mtime: t0}
		wd.Children["kept"] = ext(0o644, []byte("kept\n"))
		c["with-whiteout"] = wd
		c["ab"] = &Inode{Mode: SIFCHR | 0o644, Mtime: t0}
	}
	return root
}

// compareTrees reports differences between the input model want and got
// (from the reader), including hardlink identity.
func compareTrees(t testing.TB, want, got *Inode) {
	t.Helper()
	seenW := map[*Inode]string{}
	seenG := map[*Inode]string{}
	var errs []string
	var cmp func(p string, w, g *Inode)
	cmp = func(p string, w, g *Inode) {
		if len(errs) > 20 {
			return
		}
		if g == nil {
			errs = append(errs, p+": missing")
			return
		}
		if a, b := seenW[w], seenG[g]; a != b {
			errs = append(errs, fmt.Sprintf("%s: hardlink structure differs (first seen as %q vs %q)", p, a, b))
		}
		if _, ok := seenW[w]; ok {
			return
		}
		seenW[w], seenG[g] = p, p
		bad := func(what string, a, b any) { errs = append(errs, fmt.Sprintf("%s: %s %v, want %v", p, what, b, a)) }
		if w.Mode != g.Mode {
			bad("mode", fmt.Sprintf("%o", w.Mode), fmt.Sprintf("%o", g.Mode))
		}
		if w.UID != g.UID || w.GID != g.GID {
			bad("owner", [2]uint32{w.UID, w.GID}, [2]uint32{g.UID, g.GID})
		}
		if w.Mtime != g.Mtime {
			bad("mtime", w.Mtime, g.Mtime)
		}
		if w.Type() == SIFCHR || w.Type() == SIFBLK {
			if w.Rdev != g.Rdev {
				bad("rdev", w.Rdev, g.Rdev)
			}
		}
		if w.Type() == SIFREG {
			if w.Size != g.Size || !bytes.Equal(w.Inline, g.Inline) || !bytes.Equal(w.Digest, g.Digest) || w.Payload != g.Payload {
				bad("content", fmt.Sprintf("size %d inline %q digest %x payload %s", w.Size, w.Inline, w.Digest, w.Payload),
					fmt.Sprintf("size %d inline %q digest %x payload %s", g.Size, g.Inline, g.Digest, g.Payload))
			}
		}
		if w.Target != g.Target {
			bad("target", w.Target, g.Target)
		}
		if !reflect.DeepEqual(sortedXattrs(w.Xattrs), sortedXattrs(g.Xattrs)) {
			bad("xattrs", sortedXattrs(w.Xattrs), sortedXattrs(g.Xattrs))
		}
		if w.IsDir() {
			if !reflect.DeepEqual(w.SortedNames(), g.SortedNames()) {
				bad("entries", w.SortedNames(), g.SortedNames())
				return
			}
			for _, name := range w.SortedNames() {
				cmp(p+"/"+name, w.Children[name], g.Children[name])
			}
		}
	}
	cmp("", want, got)
	if len(errs) > 0 {
		t.Errorf("trees differ:\n%s", strings.Join(errs, "\n"))
	}
}

func sortedXattrs(xs []Xattr) []string {
	var out []string
	for _, x := range xs {
		out = append(out, fmt.Sprintf("%s=%q", x.Key, x.Value))
	}
	sort.Strings(out)
	return out
}

func writeImage(t testing.TB, root *Inode, opts WriteOptions) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := Write(&buf, root, opts); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestReaderTreeRoundTrip writes sample trees with the writer, reads them
// back, checks them, and rewrites Tree() to the same bytes.
func TestReaderTreeRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name      string
		whiteouts bool
		opts      WriteOptions
		version   int
	}{
		{"v0-default", false, WriteOptions{}, 0},
		{"v1", false, WriteOptions{MinVersion: 1}, 1},
		{"whiteouts-default", true, WriteOptions{}, 1},
		{"whiteouts-v0only", true, VersionOptions(0, 0, true, true), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := sampleTree(t, nil, tc.whiteouts)
			img := writeImage(t, src, tc.opts)
			im, err := ParseImage(img)
			if err != nil {
				t.Fatal(err)
			}
			if im.Version() != tc.version {
				t.Errorf("version %d, want %d", im.Version(), tc.version)
			}
			if err := im.Check(); err != nil {
				t.Fatal(err)
			}
			tree, err := im.Tree()
			if err != nil {
				t.Fatal(err)
			}
			compareTrees(t, src, tree)
			again := writeImage(t, tree, im.WriteOptions())
			if !bytes.Equal(again, img) {
				t.Errorf("Write(Tree()) differs from the image (%d vs %d bytes)", len(again), len(img))
			}

			// Root shows the image as written: composefs's xattrs and the
			// generated root whiteouts.
			raw, err := im.Root()
			if err != nil {
				t.Fatal(err)
			}
			if v, _ := raw.Xattr("trusted.overlay.opaque"); string(v) != "y" {
				t.Errorf("root trusted.overlay.opaque = %q, want y", v)
			}
			if w := raw.Children["00"]; w == nil || w.Type() != SIFCHR || w.Rdev != 0 {
				t.Errorf("root whiteout 00 missing: %+v", w)
			}
			f := raw.Children["xattr-file"]
			if v, _ := f.Xattr("trusted.overlay.overlay.custom"); string(v) != "escaped" {
				t.Errorf("escaped xattr missing in Root(): %v", sortedXattrs(f.Xattrs))
			}
			if v, _ := f.Xattr("trusted.overlay.redirect"); string(v) != "/"+src.Children["xattr-file"].Payload {
				t.Errorf("redirect = %q", v)
			}
			if tc.whiteouts {
				g := raw.Children["with-whiteout"].Children["gone"]
				if g.Type() != SIFREG {
					t.Errorf("whiteout as written has mode %o, want a regular file", g.Mode)
				}
			}
			n := 0
			if err := im.Walk(func(p string, n2 *Inode) error {
				if n == 0 && p != "/" {
					t.Errorf("walk starts at %q", p)
				}
				n++
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if want := countEntries(raw); n != want {
				t.Errorf("walk visited %d entries, want %d", n, want)
			}
		})
	}
}

func countEntries(n *Inode) int {
	c := 1
	for _, ch := range n.Children {
		c += countEntries(ch)
	}
	return c
}

// TestReaderDumpHardlinks: trees with hardlinks (as from dump input) keep
// one inode with nlink = links, and the reader returns one *Inode.
func TestReaderHardlinks(t *testing.T) {
	src := sampleTree(t, nil, false)
	img := writeImage(t, src, WriteOptions{})
	im, err := ParseImage(img)
	if err != nil {
		t.Fatal(err)
	}
	tree, err := im.Tree()
	if err != nil {
		t.Fatal(err)
	}
	if tree.Children["big"] != tree.Children["big-hardlink"] {
		t.Error("hardlinked file is not one *Inode")
	}
	if tree.Children["big"] == tree.Children["dup-of-big"] {
		t.Error("separate file with the same content became one *Inode")
	}
}

func TestReaderRejects(t *testing.T) {
	img := writeImage(t, sampleTree(t, nil, false), WriteOptions{})
	mutate := func(f func(b []byte) []byte) []byte {
		return f(append([]byte(nil), img...))
	}
	sb := erofsSBOffset
	rootOff := 1152 // nid 36
	cases := map[string][]byte{
		"empty":          nil,
		"short":          img[:1100],
		"bad magic":      mutate(func(b []byte) []byte { b[sb] ^= 1; return b }),
		"cfs version":    mutate(func(b []byte) []byte { b[4] = 7; return b }),
		"block size":     mutate(func(b []byte) []byte { b[sb+12] = 30; return b }),
		"incompat":       mutate(func(b []byte) []byte { b[sb+80] = 0x80; return b }),
		"root nid":       mutate(func(b []byte) []byte { binary.LittleEndian.PutUint16(b[sb+14:], 0xffff); return b }),
		"root layout":    mutate(func(b []byte) []byte { b[rootOff] = 3 << 1; return b }),
		"root mode":      mutate(func(b []byte) []byte { binary.LittleEndian.PutUint16(b[rootOff+4:], 0o170755); return b }),
		"root size huge": mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[rootOff+8:], 0xffffff00); return b }),
		"xattr count":    mutate(func(b []byte) []byte { binary.LittleEndian.PutUint16(b[rootOff+2:], 0xffff); return b }),
		"truncated":      img[:len(img)-4096],
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			im, err := ParseImage(b)
			if err == nil {
				_, err = im.Root()
				if err == nil {
					err = im.Check()
				}
			}
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("error does not wrap ErrCorrupt: %v", err)
			}
		})
	}
}

// TestCheckCatchesInconsistencies: damage that Root() tolerates but Check
// reports.
func TestCheckCatchesInconsistencies(t *testing.T) {
	img := writeImage(t, sampleTree(t, nil, false), WriteOptions{})
	im, _ := ParseImage(img)
	if err := im.Check(); err != nil {
		t.Fatal(err)
	}
	b := append([]byte(nil), img...)
	binary.LittleEndian.PutUint64(b[erofsSBOffset+16:], im.inos+1)
	im2, _ := ParseImage(b)
	if _, err := im2.Root(); err != nil {
		t.Fatal(err)
	}
	if err := im2.Check(); err == nil || !strings.Contains(err.Error(), "inodes") {
		t.Errorf("wrong inode count: Check = %v", err)
	}
	// Root directory nlink off by one.
	b = append([]byte(nil), img...)
	ri, err := im.inode(im.rootNid)
	if err != nil {
		t.Fatal(err)
	}
	if ri.extended {
		binary.LittleEndian.PutUint32(b[ri.off+44:], ri.nlink+1)
	} else {
		binary.LittleEndian.PutUint16(b[ri.off+6:], uint16(ri.nlink+1))
	}
	im3, _ := ParseImage(b)
	if err := im3.Check(); err == nil || !strings.Contains(err.Error(), "nlink") {
		t.Errorf("wrong nlink: Check = %v", err)
	}
}

func FuzzReader(f *testing.F) {
	small := NewDir(0o755)
	small.Children["f"] = &Inode{Mode: SIFREG | 0o644, Size: 3, Inline: []byte("abc")}
	small.Children["l"] = &Inode{Mode: SIFLNK | 0o777, Target: "f"}
	small.Children["x"] = &Inode{Mode: SIFREG | 0o644, Size: 100, Digest: make([]byte, 32), Payload: PayloadPath(make([]byte, 32)),
		Xattrs: []Xattr{{"user.a", []byte("b")}}}
	sub := NewDir(0o700)
	sub.Children["w"] = &Inode{Mode: SIFCHR}
	sub.Children["h"] = small.Children["f"]
	small.Children["d"] = sub
	f.Add(writeImage(f, small, WriteOptions{}))
	f.Add(writeImage(f, NewDir(0o755), WriteOptions{MinVersion: 1}))
	// Hand-made: a superblock only, and a header with a bad root.
	b := make([]byte, 4096)
	binary.LittleEndian.PutUint32(b[erofsSBOffset:], erofsMagic)
	b[erofsSBOffset+12] = 12
	f.Add(b)
	b2 := append([]byte(nil), b...)
	binary.LittleEndian.PutUint16(b2[erofsSBOffset+14:], 2)
	binary.LittleEndian.PutUint16(b2[1024+64+4:], SIFDIR|0o755)
	f.Add(b2)
	f.Fuzz(func(t *testing.T, data []byte) {
		im, err := ParseImage(data)
		if err != nil {
			return
		}
		im.Check()
		if _, err := im.Root(); err != nil {
			return
		}
		tree, err := im.Tree()
		if err != nil {
			t.Fatalf("Root succeeded but Tree failed: %v", err)
		}
		WalkTree(tree, func(string, *Inode) error { return nil })
	})
}

func TestListing(t *testing.T) {
	root := sampleTree(t, nil, false)
	var buf bytes.Buffer
	if err := WriteListing(&buf, root, true); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{
		"drwxr-xr-x      0      0            0 2023-11-14T22:13:20Z /\n",
		"-rwsr-xr-x      0      0          100 2023-11-14T22:13:20Z /setuid @",
		"crw-------      0      0    300,70000 2023-11-14T22:13:20Z /chr-big\n",
		"drwxrwxrwt ",
		"lrwxrwxrwx   1234   4321            3 2023-11-14T22:13:20Z /sym -> big\n",
		"-rw-r--r--  70000  70001           70 ",
		"2023-06-15T12:34:56.123456789Z /mtime-nsec\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("listing lacks %q", want)
		}
	}
	if n := strings.Count(out, "\n"); n != countEntries(root) {
		t.Errorf("%d lines, want %d", n, countEntries(root))
	}
}
