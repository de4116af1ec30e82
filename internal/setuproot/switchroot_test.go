package setuproot

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestRemoveContents checks the initramfs cleanup of SwitchRoot: it deletes
// everything on the old root's filesystem and nothing on filesystems
// mounted below it (the new root is one of them at that point).
func TestRemoveContents(t *testing.T) {
	base := inMountNamespace(t)
	if base == "" {
		return
	}
	old := filepath.Join(base, "oldroot")
	must(t, os.MkdirAll(old, 0o755))
	must(t, unix.Mount("tmpfs", old, "tmpfs", 0, "mode=0755"))
	for _, p := range []string{"init", "etc/berth/modules.load", "usr/lib/modules/k/a.ko.xz"} {
		must(t, os.MkdirAll(filepath.Join(old, filepath.Dir(p)), 0o755))
		must(t, os.WriteFile(filepath.Join(old, p), []byte("x"), 0o644))
	}
	must(t, os.Symlink("usr/lib", filepath.Join(old, "lib")))
	other := filepath.Join(old, "sysroot")
	must(t, os.MkdirAll(other, 0o755))
	must(t, unix.Mount("tmpfs", other, "tmpfs", 0, "mode=0755"))
	must(t, os.WriteFile(filepath.Join(other, "keep"), []byte("new root"), 0o644))

	fd, err := unix.Open(old, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	must(t, err)
	defer unix.Close(fd)
	var st unix.Stat_t
	must(t, unix.Fstat(fd, &st))
	removeContents(fd, st.Dev)

	ents, _ := os.ReadDir(old)
	if len(ents) != 1 || ents[0].Name() != "sysroot" {
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("old root still has %v, want only the mount point sysroot", names)
	}
	if b, err := os.ReadFile(filepath.Join(other, "keep")); err != nil || string(b) != "new root" {
		t.Fatalf("file on the other filesystem was touched: %q %v", b, err)
	}
}
