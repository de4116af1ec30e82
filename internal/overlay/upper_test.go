package overlay

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
	"golang.org/x/sys/unix"
)

// TestMarkers reads whiteouts and opaque directories written the two ways
// overlayfs writes them (needs root: mknod and trusted.* xattrs).
func TestMarkers(t *testing.T) {
	testenv.RequireRoot(t, "whiteouts are device nodes and the markers are trusted.* xattrs")
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	if err := unix.Mknod(p("chr"), unix.S_IFCHR|0o600, 0); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"xwh", "plain"} {
		os.WriteFile(p(n), nil, 0o644)
	}
	os.WriteFile(p("full"), []byte("x"), 0o644)
	for _, n := range []string{"xwh", "full"} {
		if err := unix.Lsetxattr(p(n), XattrWhiteout, nil, 0); err != nil {
			t.Fatal(err)
		}
	}
	os.Mkdir(p("opq"), 0o755)
	unix.Lsetxattr(p("opq"), XattrOpaque, []byte("y"), 0)
	os.Mkdir(p("dir"), 0o755)
	for n, want := range map[string]bool{"chr": true, "xwh": true, "plain": false, "full": false, "opq": false, "missing": false} {
		if got := IsWhiteout(p(n), nil); got != want {
			t.Errorf("IsWhiteout(%s, nil) = %v", n, got)
		}
		if fi, err := os.Lstat(p(n)); err == nil && IsWhiteout(p(n), fi) != want {
			t.Errorf("IsWhiteout(%s, fi) = %v", n, !want)
		}
	}
	if !IsOpaque(p("opq")) || IsOpaque(p("dir")) {
		t.Errorf("IsOpaque: opq %v, dir %v", IsOpaque(p("opq")), IsOpaque(p("dir")))
	}
}
