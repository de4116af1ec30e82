package composefs

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testenv"
	"golang.org/x/sys/unix"
)

// erofsSuperblocks lists the mounted EROFS superblocks (/sys/fs/erofs/*);
// detached mounts do not show up in mountinfo, but they do here.
func erofsSuperblocks(t *testing.T) map[string]bool {
	t.Helper()
	des, err := os.ReadDir("/sys/fs/erofs")
	if err != nil {
		testenv.SkipOrFail(t, "required kernel feature EROFS is missing: no /sys/fs/erofs to observe EROFS superblocks: %v", err)
	}
	out := map[string]bool{}
	for _, d := range des {
		if d.Name() != "features" {
			out[d.Name()] = true
		}
	}
	return out
}

// loopsBackedBy lists loop devices whose backing file is image.
func loopsBackedBy(image string) []string {
	var out []string
	matches, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, m := range matches {
		b, err := os.ReadFile(m)
		if err == nil && strings.TrimSpace(string(b)) == image {
			out = append(out, m)
		}
	}
	return out
}

func isMountpoint(t *testing.T, p string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 && f[4] == p {
			return true
		}
	}
	return false
}

// assertNoLeftovers waits briefly for superblocks that appeared since
// before to go away (their release is asynchronous) and fails if one
// stays. Another process mounting EROFS at the same time could make
// this report a false leftover; the tests of this package mount serially.
func assertNoLeftovers(t *testing.T, before map[string]bool, image string) {
	t.Helper()
	var extra []string
	for range 50 {
		extra = extra[:0]
		for n := range erofsSuperblocks(t) {
			if !before[n] {
				extra = append(extra, n)
			}
		}
		if len(extra) == 0 && len(loopsBackedBy(image)) == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("left behind: EROFS superblocks %v, loop devices %v", extra, loopsBackedBy(image))
}

// sampleImage writes the sample tree and its store; it returns the image
// path and the objects directory.
func sampleImage(t *testing.T) (string, string, *Inode) {
	t.Helper()
	root, s := storedSampleTree(t, false)
	img := filepath.Join(t.TempDir(), "image.cfs")
	if _, err := WriteImageFile(img, root, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	return img, s.Dir(), root
}

func TestMountUnmountLeavesNothing(t *testing.T) {
	needMount(t)
	img, objects, root := sampleImage(t)
	mnt := t.TempDir()
	before := erofsSuperblocks(t)
	mountOrSkip(t, mnt, MountOptions{Image: img, Objects: objects})
	if !isMountpoint(t, mnt) {
		t.Fatal("nothing mounted at", mnt)
	}
	if len(erofsSuperblocks(t)) <= len(before) {
		t.Error("no EROFS superblock appeared while mounted")
	}
	got, err := os.ReadFile(filepath.Join(mnt, "big"))
	if err != nil || uint64(len(got)) != root.Children["big"].Size {
		t.Fatalf("read big: %d bytes, %v", len(got), err)
	}
	// Read-only without an upper layer.
	if err := os.WriteFile(filepath.Join(mnt, "new"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write to a read-only composefs mount: %v, want EROFS", err)
	}
	if err := Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	if isMountpoint(t, mnt) {
		t.Fatal("still mounted after Unmount")
	}
	assertNoLeftovers(t, before, img)
	if err := Unmount(mnt); err == nil {
		t.Error("second Unmount succeeded")
	}
}

// TestMountLoopFallback forces the paths that kernels before 6.12 take:
// a loop device instead of a file-backed EROFS mount, and the
// "lowerdir=EROFS::OBJECTS" syntax instead of lowerdir+/datadir+ (6.8).
func TestMountLoopFallback(t *testing.T) {
	needMount(t)
	testenv.RequireFile(t, "/dev/loop-control", "modprobe loop")
	img, objects, root := sampleImage(t)
	mnt := t.TempDir()
	before := erofsSuperblocks(t)
	forceLoop, forceLegacyLowerdir = true, true
	defer func() { forceLoop, forceLegacyLowerdir = false, false }()
	mountOrSkip(t, mnt, MountOptions{Image: img, Objects: objects})
	if loops := loopsBackedBy(img); len(loops) != 1 {
		t.Errorf("loop devices backed by the image: %v, want one", loops)
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); !strings.Contains(string(mi), "lowerdir=/proc/self/fd/") {
		t.Error("overlay not mounted with the legacy lowerdir= option")
	}
	want := expectFromTree(root, objects)
	applyOverlayView(want, 0)
	compareMount(t, want, mnt)
	if err := Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	assertNoLeftovers(t, before, img)
}

func TestMountFailuresLeaveNothing(t *testing.T) {
	needMount(t)
	img, objects, _ := sampleImage(t)
	bad := filepath.Join(t.TempDir(), "bad.cfs")
	data, _ := os.ReadFile(img)
	data[erofsSBOffset] ^= 0xff // EROFS magic
	os.WriteFile(bad, data, 0o644)
	notDir := filepath.Join(t.TempDir(), "file")
	os.WriteFile(notDir, nil, 0o644)
	before := erofsSuperblocks(t)
	for _, tc := range []struct {
		name string
		opts MountOptions
		want string
	}{
		{"missing image", MountOptions{Image: "/nonexistent.cfs", Objects: objects}, "no such file"},
		{"corrupt image", MountOptions{Image: bad, Objects: objects}, "erofs"},
		{"missing objects", MountOptions{Image: img, Objects: "/nonexistent-objects"}, "no such file"},
		{"upper without work", MountOptions{Image: img, Objects: objects, Upper: t.TempDir()}, "work directory"},
		// The overlay fails after the EROFS mount exists: it must go too.
		{"upper is a file", MountOptions{Image: img, Objects: objects, Upper: notDir, Work: t.TempDir()}, "upperdir"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mnt := t.TempDir()
			err := Mount(mnt, tc.opts)
			if err == nil {
				Unmount(mnt)
				t.Fatal("mounted")
			}
			if !strings.Contains(strings.ToLower(err.Error()), tc.want) || !strings.Contains(err.Error(), "mount composefs") {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
			if isMountpoint(t, mnt) {
				t.Error("something is mounted after a failed Mount")
			}
		})
	}
	assertNoLeftovers(t, before, img)
	assertNoLeftovers(t, before, bad)
}

// TestMountVerity: with Verity, either the kernel and filesystem have
// fs-verity (then the store's objects carry it and reads work), or Mount
// refuses up front with ErrNoVerity naming the missing feature. Overlayfs
// alone would accept verity=require on a kernel without CONFIG_FS_VERITY
// and fail every read with EIO.
func TestMountVerity(t *testing.T) {
	needMount(t)
	root, s := storedSampleTree(t, false)
	img := filepath.Join(t.TempDir(), "image.cfs")
	if _, err := WriteImageFile(img, root, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	before := erofsSuperblocks(t)
	err := Mount(mnt, MountOptions{Image: img, Objects: s.Dir(), Verity: true})
	if s.VerityUnsupported() {
		if !errors.Is(err, ErrNoVerity) || !strings.Contains(err.Error(), "CONFIG_FS_VERITY") {
			t.Fatalf("store has no fs-verity, Mount with Verity = %v, want ErrNoVerity naming CONFIG_FS_VERITY", err)
		}
		t.Logf("this host lacks fs-verity; Mount refused: %v", err)
		assertNoLeftovers(t, before, img)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	defer Unmount(mnt)
	b, err := os.ReadFile(filepath.Join(mnt, "big"))
	if err != nil || uint64(len(b)) != root.Children["big"].Size {
		t.Fatalf("read through verity=require: %d bytes, %v", len(b), err)
	}
}

// TestMountUpper: with upper and work directories the mount is writable,
// changes land in the upper directory and survive a remount.
func TestMountUpper(t *testing.T) {
	needMount(t)
	img, objects, root := sampleImage(t)
	state := t.TempDir()
	upper, work := filepath.Join(state, "upper"), filepath.Join(state, "work")
	os.Mkdir(upper, 0o755)
	os.Mkdir(work, 0o755)
	mnt := t.TempDir()
	opts := MountOptions{Image: img, Objects: objects, Upper: upper, Work: work}
	mountOrSkip(t, mnt, opts)
	if err := os.WriteFile(filepath.Join(mnt, "new.txt"), []byte("local change\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Metadata-only change of an external file: a metacopy upper entry.
	if err := os.Chmod(filepath.Join(mnt, "ext65"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(mnt, "block4096"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("appended")
	f.Close()
	if err := os.Remove(filepath.Join(mnt, "small.txt")); err != nil {
		t.Fatal(err)
	}
	if err := Unmount(mnt); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(upper, "new.txt")); err != nil {
		t.Errorf("new file not in the upper directory: %v", err)
	}
	mountOrSkip(t, mnt, opts)
	if b, _ := os.ReadFile(filepath.Join(mnt, "new.txt")); string(b) != "local change\n" {
		t.Errorf("new.txt after remount = %q", b)
	}
	if fi, err := os.Stat(filepath.Join(mnt, "ext65")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("chmod lost: %v %v", fi, err)
	}
	b, _ := os.ReadFile(filepath.Join(mnt, "ext65"))
	if uint64(len(b)) != root.Children["ext65"].Size {
		t.Errorf("metacopied file has %d bytes, want %d", len(b), root.Children["ext65"].Size)
	}
	if b, _ := os.ReadFile(filepath.Join(mnt, "block4096")); len(b) != 4096+len("appended") || !strings.HasSuffix(string(b), "appended") {
		t.Errorf("appended file has %d bytes", len(b))
	}
	if _, err := os.Lstat(filepath.Join(mnt, "small.txt")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("deleted file is back: %v", err)
	}
}
