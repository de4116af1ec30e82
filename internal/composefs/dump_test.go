package composefs

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func wtParseDumpFile(t testing.TB, name string) *Inode {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "dump", name))
	if err != nil {
		t.Fatal(err)
	}
	root, err := ParseDump(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return root
}

func TestParseDumpFields(t *testing.T) {
	root := wtParseDumpFile(t, "basic.dump")
	if root.Mode != SIFDIR|0o755 || root.Mtime != (Timespec{1700000000, 5}) {
		t.Errorf("root: mode %o mtime %v", root.Mode, root.Mtime)
	}
	if v, _ := root.Xattr("security.selinux"); string(v) != "system_u:object_r:root_t:s0\x00" {
		t.Errorf("root selinux %q", v)
	}
	hello := root.Lookup("hello")
	if hello == nil || string(hello.Inline) != "hello\n" || hello.Size != 6 || hello.UID != 1000 || hello.GID != 1000 {
		t.Fatalf("hello: %+v", hello)
	}
	if v, _ := hello.Xattr("user.note"); string(v) != "a b=c" {
		t.Errorf("escaped xattr value %q", v)
	}
	big := root.Lookup("big")
	if big == nil || big.Size != 100000 || len(big.Digest) != 32 || big.Payload != PayloadPath(big.Digest) {
		t.Fatalf("big: %+v", big)
	}
	if root.Lookup("big-link") != big {
		t.Error("hardlink is not the same *Inode")
	}
	if s := root.Lookup("sym"); s.Target != "big" || s.Size != 3 {
		t.Errorf("symlink %+v", s)
	}
	if d := root.Lookup("dev"); d.Type() != SIFCHR || d.Rdev != 259 {
		t.Errorf("dev %+v", d)
	}
	dir := root.Lookup("dir with space")
	if dir == nil || dir.UID != 70000 || dir.Mtime != (Timespec{-5, 999999999}) {
		t.Fatalf("dir with space: %+v", dir)
	}
	if f := root.Lookup("dir with space/-"); f == nil || string(f.Inline) != "-" {
		t.Errorf("lone dash content: %+v", f)
	}
	if root.Lookup("dir with space/tab\there") == nil {
		t.Error("escaped tab in name")
	}

	links := wtParseDumpFile(t, "hardlinks.dump")
	a := links.Lookup("a")
	if links.Lookup("d/b") != a || links.Lookup("c") != a {
		t.Error("hardlink chain /c -> /d/b -> /a not resolved to one inode")
	}
	if x := wtParseDumpFile(t, "no-newline.dump").Lookup("x"); x == nil || string(x.Inline) != "abcde" {
		t.Error("last line without newline lost")
	}
}

// TestDumpRoundTrip: WriteDump then ParseDump gives the same tree (same
// dump, same image), hardlinks included.
func TestDumpRoundTrip(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join("testdata", "dump", "*.dump"))
	trees := map[string]*Inode{"sample": wtSampleTree()}
	for _, f := range files {
		trees[filepath.Base(f)] = wtParseDumpFile(t, filepath.Base(f))
	}
	for name, root := range trees {
		var d1, d2 bytes.Buffer
		if err := WriteDump(&d1, root); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		back, err := ParseDump(bytes.NewReader(d1.Bytes()))
		if err != nil {
			t.Fatalf("%s: reparse: %v\n%s", name, err, d1.String())
		}
		if err := WriteDump(&d2, back); err != nil {
			t.Fatal(err)
		}
		if d1.String() != d2.String() {
			t.Errorf("%s: dump not stable:\n%s\nvs\n%s", name, d1.String(), d2.String())
		}
		if !bytes.Equal(wtWrite(t, root, WriteOptions{}), wtWrite(t, back, WriteOptions{})) {
			t.Errorf("%s: image differs after a dump round trip", name)
		}
	}
	// The hardlink is written once in full and once as an '@' line.
	var d bytes.Buffer
	if err := WriteDump(&d, trees["hardlinks.dump"]); err != nil {
		t.Fatal(err)
	}
	want := "/ 0 40755 3 0 0 0 0.0 - - -\n" +
		"/a 200 100644 3 0 0 0 0.0 - - -\n" +
		"/c 200 @100644 3 0 0 0 0.0 /a - -\n" +
		"/d 0 40755 2 0 0 0 0.0 - - -\n" +
		"/d/b 200 @100644 3 0 0 0 0.0 /a - -\n"
	if strings.ReplaceAll(d.String(), " 4096 40755", " 0 40755") != want {
		t.Errorf("hardlink dump:\n%s\nwant:\n%s", d.String(), want)
	}
}

func TestParseDumpRejects(t *testing.T) {
	const root = "/ 4096 40755 2 0 0 0 0.0 - - -\n"
	cases := map[string]string{
		"empty input":          "",
		"root not first":       "/a 0 100644 1 0 0 0 0.0 - - -\n" + root,
		"root not a dir":       "/ 0 100644 1 0 0 0 0.0 - - -\n",
		"two roots":            root + root,
		"empty line":           root + "\n/a 0 100644 1 0 0 0 0.0 - - -\n",
		"missing parent":       root + "/a/b 0 100644 1 0 0 0 0.0 - - -\n",
		"parent not dir":       root + "/a 0 100644 1 0 0 0 0.0 - - -\n/a/b 0 100644 1 0 0 0 0.0 - - -\n",
		"duplicate":            root + "/a 0 100644 1 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n",
		"dot name":             root + "/. 0 100644 1 0 0 0 0.0 - - -\n",
		"dotdot name":          root + "/.. 0 100644 1 0 0 0 0.0 - - -\n",
		"trailing slash":       root + "/a/ 0 40755 1 0 0 0 0.0 - - -\n",
		"long name":            root + "/" + strings.Repeat("n", 256) + " 0 100644 1 0 0 0 0.0 - - -\n",
		"bad mode":             root + "/a 0 9x 1 0 0 0 0.0 - - -\n",
		"no file type":         root + "/a 0 644 1 0 0 0 0.0 - - -\n",
		"bad size":             root + "/a -1 100644 1 0 0 0 0.0 - - -\n",
		"uid too big":          root + "/a 0 100644 1 4294967296 0 0 0.0 - - -\n",
		"bad mtime":            root + "/a 0 100644 1 0 0 0 12 - - -\n",
		"nsec too big":         root + "/a 0 100644 1 0 0 0 1.1000000000 - - -\n",
		"content size":         root + "/a 3 100644 1 0 0 0 0.0 - ab -\n",
		"content too big":      root + "/a 5001 100644 1 0 0 0 0.0 - " + strings.Repeat("c", 5001) + " -\n",
		"bad digest":           root + "/a 100 100644 1 0 0 0 0.0 - - abc\n",
		"empty symlink":        root + "/a 0 120777 1 0 0 0 0.0 - - -\n",
		"long symlink":         root + "/a 0 120777 1 0 0 0 0.0 " + strings.Repeat("s", 4096) + " - -\n",
		"bad escape":           root + "/a\\q 0 100644 1 0 0 0 0.0 - - -\n",
		"short hex escape":     root + "/a\\x4 0 100644 1 0 0 0 0.0 - - -\n",
		"trailing backslash":   root + "/a\\ 0 100644 1 0 0 0 0.0 - - -\n",
		"NUL byte":             root + "/a\x00 0 100644 1 0 0 0 0.0 - - -\n",
		"escaped NUL in path":  root + "/a\\x00b 0 100644 1 0 0 0 0.0 - - -\n",
		"xattr without =":      root + "/a 0 100644 1 0 0 0 0.0 - - - user.x\n",
		"empty xattr name":     root + "/a 0 100644 1 0 0 0 0.0 - - - =v\n",
		"long xattr name":      root + "/a 0 100644 1 0 0 0 0.0 - - - user." + strings.Repeat("k", 251) + "=v\n",
		"xattrs too large":     root + "/a 0 100644 1 0 0 0 0.0 - - - user.a=" + strings.Repeat("v", 20000) + " user.b=" + strings.Repeat("v", 20000) + "\n",
		"dir hardlink":         root + "/d 0 40755 2 0 0 0 0.0 - - -\n/e 0 @40755 2 0 0 0 0.0 /d - -\n",
		"link to dir":          root + "/d 0 40755 2 0 0 0 0.0 - - -\n/e 0 @100644 2 0 0 0 0.0 /d - -\n",
		"self link":            root + "/e 0 @100644 2 0 0 0 0.0 /e - -\n",
		"link loop":            root + "/e 0 @100644 2 0 0 0 0.0 /f - -\n/f 0 @100644 2 0 0 0 0.0 /e - -\n",
		"link target missing":  root + "/e 0 @100644 2 0 0 0 0.0 /nope - -\n",
		"link without target":  root + "/e 0 @100644 2 0 0 0 0.0 - - -\n",
		"path under hardlink":  root + "/a 0 100644 1 0 0 0 0.0 - - -\n/e 0 @100644 2 0 0 0 0.0 /a - -\n/e/x 0 100644 1 0 0 0 0.0 - - -\n",
		"line over size limit": root + "/a 0 100644 1 0 0 0 0.0 - - - user.a=" + strings.Repeat("v", dumpMaxLine) + "\n",
	}
	for name, in := range cases {
		if _, err := ParseDump(strings.NewReader(in)); err == nil {
			t.Errorf("%s: accepted", name)
		} else if !strings.Contains(err.Error(), "composefs dump") {
			t.Errorf("%s: error lacks context: %v", name, err)
		}
	}
}

// FuzzParseDump: the parser must never panic; what it accepts must write
// (or fail cleanly) and survive a dump round trip unchanged.
func FuzzParseDump(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "dump", "*.dump"))
	for _, name := range files {
		data, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("/ 4096 40755 2 0 0 0 0.0 - - -\n/a\\x2fb 1 @100644 1 0 0 0 0.0 /a - -\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		root, err := ParseDump(bytes.NewReader(data))
		if err != nil {
			return
		}
		var img1 bytes.Buffer
		werr := Write(&img1, root, WriteOptions{})
		var d1, d2 bytes.Buffer
		if err := WriteDump(&d1, root); err != nil {
			t.Fatalf("WriteDump of a parsed tree: %v", err)
		}
		back, err := ParseDump(bytes.NewReader(d1.Bytes()))
		if err != nil {
			t.Fatalf("reparse of WriteDump output: %v\n%q", err, d1.String())
		}
		if err := WriteDump(&d2, back); err != nil {
			t.Fatal(err)
		}
		if d1.String() != d2.String() {
			t.Fatalf("dump not stable:\n%q\n%q", d1.String(), d2.String())
		}
		if werr == nil {
			var img2 bytes.Buffer
			if err := Write(&img2, back, WriteOptions{}); err != nil || !bytes.Equal(img1.Bytes(), img2.Bytes()) {
				t.Fatalf("image differs after dump round trip (%v)", err)
			}
		}
	})
}
