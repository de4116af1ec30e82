package deploy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// putObject stores content in a plain object directory under a made-up
// digest-shaped name; ExtractTree reads objects by Payload only.
func putObject(t *testing.T, objects string, content []byte) (payload string) {
	t.Helper()
	sum := sha256.Sum256(content)
	h := hex.EncodeToString(sum[:])
	payload = h[:2] + "/" + h[2:]
	if err := os.MkdirAll(filepath.Join(objects, h[:2]), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(objects, payload), content, 0o644); err != nil {
		t.Fatal(err)
	}
	return payload
}

func reg(mode uint32, uid, gid uint32, inline []byte) *composefs.Inode {
	return &composefs.Inode{Mode: composefs.SIFREG | mode, UID: uid, GID: gid, Size: uint64(len(inline)), Inline: inline,
		Mtime: composefs.Timespec{Sec: 1600000000, Nsec: 5}}
}

func TestExtractTree(t *testing.T) {
	testenv.RequireRoot(t, "chown, mknod, trusted xattrs")
	tmp := t.TempDir()
	objects := filepath.Join(tmp, "objects")
	big := bytes.Repeat([]byte("berth object content\n"), 1000)
	payload := putObject(t, objects, big)

	root := composefs.NewDir(0o755)
	varDir := composefs.NewDir(0o755)
	varDir.Mtime = composefs.Timespec{Sec: 1500000000}
	root.Children["var"] = varDir
	lib := composefs.NewDir(0o750)
	lib.UID, lib.GID = 101, 102
	varDir.Children["lib"] = lib
	small := reg(0o4755, 0, 0, []byte("#!/bin/sh\necho hi\n"))
	small.SetXattr("user.berth", []byte("v"))
	small.SetXattr("security.capability", []byte{0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	lib.Children["small"] = small
	lib.Children["hard"] = small // hardlink
	ext := &composefs.Inode{Mode: composefs.SIFREG | 0o640, UID: 7, GID: 8, Size: uint64(len(big)), Payload: payload}
	lib.Children["big"] = ext
	lib.Children["empty"] = reg(0o600, 0, 0, nil)
	lib.Children["link"] = &composefs.Inode{Mode: composefs.SIFLNK | 0o777, Target: "../../etc/passwd", UID: 5, GID: 5}
	lib.Children["fifo"] = &composefs.Inode{Mode: composefs.SIFIFO | 0o620}
	lib.Children["null"] = &composefs.Inode{Mode: composefs.SIFCHR | 0o666, Rdev: uint32(unix.Mkdev(1, 3))}

	dst := filepath.Join(tmp, "out")
	if err := ExtractTree(dst, varDir, objects); err != nil {
		t.Fatal(err)
	}
	st := func(p string) *syscall.Stat_t {
		t.Helper()
		var s syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(dst, p), &s); err != nil {
			t.Fatal(err)
		}
		return &s
	}
	if s := st("."); s.Mode != composefs.SIFDIR|0o755 || s.Mtim.Sec != 1500000000 {
		t.Errorf("root: mode %o mtime %d", s.Mode, s.Mtim.Sec)
	}
	if s := st("lib"); s.Mode != composefs.SIFDIR|0o750 || s.Uid != 101 || s.Gid != 102 {
		t.Errorf("lib: mode %o owner %d:%d", s.Mode, s.Uid, s.Gid)
	}
	if s := st("lib/small"); s.Mode != composefs.SIFREG|0o4755 || s.Nlink != 2 || s.Mtim.Sec != 1600000000 || s.Mtim.Nsec != 5 {
		t.Errorf("small: mode %o nlink %d mtime %d.%d", s.Mode, s.Nlink, s.Mtim.Sec, s.Mtim.Nsec)
	}
	if st("lib/small").Ino != st("lib/hard").Ino {
		t.Error("hardlink not kept")
	}
	buf := make([]byte, 64)
	if n, err := unix.Lgetxattr(filepath.Join(dst, "lib/small"), "user.berth", buf); err != nil || string(buf[:n]) != "v" {
		t.Errorf("user.berth xattr: %q %v", buf[:n], err)
	}
	if _, err := unix.Lgetxattr(filepath.Join(dst, "lib/small"), "security.capability", buf); err != nil {
		t.Errorf("security.capability xattr: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(dst, "lib/big")); err != nil || !bytes.Equal(got, big) {
		t.Errorf("big: %d bytes, %v", len(got), err)
	}
	if s := st("lib/big"); s.Uid != 7 || s.Gid != 8 || s.Mode != composefs.SIFREG|0o640 {
		t.Errorf("big: mode %o owner %d:%d", s.Mode, s.Uid, s.Gid)
	}
	if got, _ := os.ReadFile(filepath.Join(dst, "lib/small")); string(got) != "#!/bin/sh\necho hi\n" {
		t.Errorf("small content %q", got)
	}
	if target, err := os.Readlink(filepath.Join(dst, "lib/link")); err != nil || target != "../../etc/passwd" {
		t.Errorf("link: %q %v", target, err)
	}
	if s := st("lib/link"); s.Uid != 5 {
		t.Errorf("link owner %d", s.Uid)
	}
	if s := st("lib/fifo"); s.Mode != composefs.SIFIFO|0o620 {
		t.Errorf("fifo mode %o", s.Mode)
	}
	if s := st("lib/null"); s.Mode != composefs.SIFCHR|0o666 || s.Rdev != unix.Mkdev(1, 3) {
		t.Errorf("null: mode %o rdev %d", s.Mode, s.Rdev)
	}
	if s := st("lib/empty"); s.Size != 0 {
		t.Errorf("empty size %d", s.Size)
	}
}

func TestExtractTreeHostile(t *testing.T) {
	tmp := t.TempDir()
	objects := filepath.Join(tmp, "objects")
	secret := filepath.Join(tmp, "secret")
	if err := os.WriteFile(secret, []byte(strings.Repeat("s", 100)), 0o600); err != nil {
		t.Fatal(err)
	}
	cycle := composefs.NewDir(0o755)
	cycle.Children["again"] = cycle
	cases := map[string]*composefs.Inode{
		"dotdot name":     {Mode: composefs.SIFDIR | 0o755, Children: map[string]*composefs.Inode{"..": reg(0o644, 0, 0, []byte("x"))}},
		"slash name":      {Mode: composefs.SIFDIR | 0o755, Children: map[string]*composefs.Inode{"a/b": reg(0o644, 0, 0, []byte("x"))}},
		"payload escape":  {Mode: composefs.SIFDIR | 0o755, Children: map[string]*composefs.Inode{"f": {Mode: composefs.SIFREG | 0o644, Size: 100, Payload: "../secret"}}},
		"size mismatch":   {Mode: composefs.SIFDIR | 0o755, Children: map[string]*composefs.Inode{"f": {Mode: composefs.SIFREG | 0o644, Size: 5, Payload: putObject(t, objects, []byte(strings.Repeat("o", 100)))}}},
		"missing content": {Mode: composefs.SIFDIR | 0o755, Children: map[string]*composefs.Inode{"f": {Mode: composefs.SIFREG | 0o644, Size: 100}}},
		"directory cycle": cycle,
		"bad type":        {Mode: composefs.SIFDIR | 0o755, Children: map[string]*composefs.Inode{"f": {Mode: 0o170000}}},
	}
	for name, tree := range cases {
		dst := filepath.Join(tmp, strings.ReplaceAll(name, " ", "-"))
		if err := ExtractTree(dst, tree, objects); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if b, _ := os.ReadFile(secret); len(b) != 100 {
		t.Error("secret changed")
	}
}

func TestSeedState(t *testing.T) {
	testenv.RequireRoot(t, "chown")
	l := store.At(t.TempDir())
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	root := composefs.NewDir(0o755)
	v := composefs.NewDir(0o755)
	root.Children["var"] = v
	v.Children["lib"] = composefs.NewDir(0o755)
	v.Children["lib"].Children["state"] = reg(0o644, 0, 0, []byte("from image 1"))
	root.Children["home"] = &composefs.Inode{Mode: composefs.SIFLNK | 0o777, Target: "var/home"}
	r := composefs.NewDir(0o700)
	r.Children[".profile"] = reg(0o644, 0, 0, []byte("PS1=x"))
	root.Children["root"] = r
	// no /srv in the image

	created, err := SeedState(l, root, l.Objects())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(created, ",") != "var,root,srv" {
		t.Fatalf("created %v", created)
	}
	if b, _ := os.ReadFile(filepath.Join(l.State(), "var/lib/state")); string(b) != "from image 1" {
		t.Fatalf("var/lib/state = %q", b)
	}
	if _, err := os.Lstat(filepath.Join(l.State(), "home")); !os.IsNotExist(err) {
		t.Errorf("home seeded although the image has it as a symlink: %v", err)
	}
	for name, want := range map[string]os.FileMode{"root": 0o700, "srv": 0o755} {
		fi, err := os.Stat(filepath.Join(l.State(), name))
		if err != nil || fi.Mode().Perm() != want {
			t.Errorf("state/%s: %v %v", name, fi.Mode(), err)
		}
	}
	// Local changes to state survive a second seeding from a newer image.
	if err := os.WriteFile(filepath.Join(l.State(), "var/lib/state"), []byte("local"), 0o644); err != nil {
		t.Fatal(err)
	}
	v.Children["lib"].Children["state"] = reg(0o644, 0, 0, []byte("from image 2"))
	created, err = SeedState(l, root, l.Objects())
	if err != nil || len(created) != 0 {
		t.Fatalf("second seeding created %v, %v", created, err)
	}
	if b, _ := os.ReadFile(filepath.Join(l.State(), "var/lib/state")); string(b) != "local" {
		t.Fatalf("state overwritten: %q", b)
	}
	ents, _ := os.ReadDir(l.State())
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("leftover %s", e.Name())
		}
	}
}
