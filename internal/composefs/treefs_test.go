package composefs

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/berth-dev/berth/internal/fsverity"
)

// storedSampleTree is sampleTree with its external files in a new store.
func storedSampleTree(t testing.TB, whiteouts bool) (*Inode, *Store) {
	t.Helper()
	s, err := OpenStore(filepath.Join(t.TempDir(), "objects"), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	b := s.NewBatch()
	root := sampleTree(t, func(c []byte) ([]byte, error) {
		d, _, err := b.AddReader(bytes.NewReader(c))
		return d, err
	}, whiteouts)
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	return root, s
}

func TestTreeFS(t *testing.T) {
	root, s := storedSampleTree(t, false)
	// Symlinks that resolve inside the tree.
	root.Children["a"].Children["up"] = &Inode{Mode: SIFLNK | 0o777, Target: "../big"}
	root.Children["abs-to-deep"] = &Inode{Mode: SIFLNK | 0o777, Target: "/a/b/c/d/e/deep.txt"}
	root.Children["loop1"] = &Inode{Mode: SIFLNK | 0o777, Target: "loop2"}
	root.Children["loop2"] = &Inode{Mode: SIFLNK | 0o777, Target: "loop1"}
	fsys := TreeFS(root, s.Dir())

	var expected []string
	WalkTree(root, func(p string, n *Inode) error {
		if p != "/" {
			expected = append(expected, strings.TrimPrefix(p, "/"))
		}
		return nil
	})
	// TestFS opens every file and checks ReadDir, Stat, Lstat, ReadLink,
	// Read/Seek/ReadAt consistency.
	sub := *root
	sub.Children = map[string]*Inode{}
	for k, v := range root.Children {
		switch k {
		case "loop1", "loop2", "dangling", "sym", "longsym", "many", "big-hardlink", "dup-of-big":
			// Unopenable links are checked below; big files and
			// directories only make TestFS slow.
		default:
			sub.Children[k] = v
		}
	}
	var want []string
	WalkTree(&sub, func(p string, n *Inode) error {
		if p != "/" && n.Type() != SIFLNK {
			want = append(want, strings.TrimPrefix(p, "/"))
		}
		return nil
	})
	if err := fstest.TestFS(TreeFS(&sub, s.Dir()), want...); err != nil {
		t.Fatal(err)
	}

	read := func(name string) []byte {
		t.Helper()
		b, err := fs.ReadFile(fsys, name)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if got := read("small.txt"); string(got) != "hello world\n" {
		t.Errorf("small.txt = %q", got)
	}
	big := read("big")
	if len(big) != 300000 || !bytes.Equal(read("sym"), big) || !bytes.Equal(read("a/up"), big) {
		t.Errorf("big: %d bytes; via symlinks differ", len(big))
	}
	if got := read("abs-to-deep"); string(got) != "deep\n" {
		t.Errorf("absolute symlink resolved to %q", got)
	}
	if target, err := fs.ReadLink(fsys, "sym"); err != nil || target != "big" {
		t.Errorf("ReadLink(sym) = %q, %v", target, err)
	}
	if fi, err := fs.Lstat(fsys, "sym"); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		t.Errorf("Lstat(sym) = %v, %v", fi, err)
	}
	if fi, err := fs.Stat(fsys, "sym"); err != nil || !fi.Mode().IsRegular() || fi.Size() != 300000 {
		t.Errorf("Stat(sym) = %v, %v", fi, err)
	}
	if fi, err := fs.Stat(fsys, "setuid"); err != nil || fi.Mode()&fs.ModeSetuid == 0 || fi.Sys().(*Inode) != root.Children["setuid"] {
		t.Errorf("Stat(setuid) = %v, %v", fi, err)
	}
	if _, err := fsys.Open("loop1"); err == nil || !strings.Contains(err.Error(), "symbolic links") {
		t.Errorf("symlink loop: %v", err)
	}
	if _, err := fsys.Open("dangling"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("dangling symlink: %v", err)
	}
	if _, err := fsys.Open("../etc/passwd"); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("../etc/passwd: %v", err)
	}
	if _, err := fsys.Open("small.txt/x"); err == nil {
		t.Error("opened a path through a file")
	}

	// An object that is missing, the wrong size, or a payload that tries
	// to leave the store fails clearly.
	os.Remove(s.Path(root.Children["ext65"].Digest))
	if _, err := fsys.Open("ext65"); err == nil {
		t.Error("missing object opened")
	}
	os.WriteFile(s.Path(root.Children["block4096"].Digest), []byte("short"), 0o644)
	if _, err := fsys.Open("block4096"); err == nil || !strings.Contains(err.Error(), "want a 4096-byte file") {
		t.Errorf("short object: %v", err)
	}
	evil := &Inode{Mode: SIFREG | 0o644, Size: 10, Payload: "../../../../etc/hostname"}
	root.Children["evil"] = evil
	if f, err := fsys.Open("evil"); err == nil {
		b, _ := io.ReadAll(f)
		t.Errorf("payload outside the store opened: %q", b)
	}
	evil.Payload = "/etc/hostname"
	if _, err := fsys.Open("evil"); err == nil {
		t.Error("absolute payload opened")
	}
	noData := &Inode{Mode: SIFREG | 0o644, Size: 100}
	root.Children["nodata"] = noData
	if _, err := fsys.Open("nodata"); err == nil || !strings.Contains(err.Error(), "not available") {
		t.Errorf("file without content: %v", err)
	}
}
