package deploy_test

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

func mustWrite(t *testing.T, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
}

// testImage builds a small image tree whose external files are in st.
func testImage(t *testing.T, st *composefs.Store, hello []byte) *composefs.Inode {
	t.Helper()
	b := st.NewBatch()
	d, size, err := b.AddReader(bytes.NewReader(hello))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	root := composefs.NewDir(0o755)
	dir := func(parent *composefs.Inode, name string, perm uint32) *composefs.Inode {
		n := composefs.NewDir(perm)
		parent.Children[name] = n
		return n
	}
	usr := dir(root, "usr", 0o755)
	ubin := dir(usr, "bin", 0o755)
	ubin.Children["hello"] = &composefs.Inode{Mode: composefs.SIFREG | 0o755, Size: uint64(size), Digest: d, Payload: composefs.PayloadPath(d)}
	dir(dir(usr, "lib", 0o755), "systemd", 0o755)
	etc := dir(root, "etc", 0o755)
	etc.Children["os-release"] = &composefs.Inode{Mode: composefs.SIFREG | 0o644, Size: 10, Inline: []byte("ID=debian\n")}
	v := dir(root, "var", 0o755)
	dir(dir(v, "lib", 0o755), "dpkg", 0o755).Children["status"] = &composefs.Inode{Mode: composefs.SIFREG | 0o644, Size: 4, Inline: []byte("pkgs")}
	dir(root, "root", 0o700)
	dir(root, "home", 0o755)
	return root
}

func testRuntime(t *testing.T) *runtime.Set {
	repo := t.TempDir()
	for _, name := range []string{"berth", "berth-init"} {
		b := make([]byte, 3000)
		rand.Read(b)
		mustWrite(t, filepath.Join(repo, "bin", name), b, 0o755)
	}
	mustWrite(t, filepath.Join(repo, "units", "berthd.service"), []byte("[Service]\nExecStart=/usr/lib/berth/berthd\n"), 0o644)
	set, err := runtime.Collect(runtime.Options{BinDir: filepath.Join(repo, "bin"), RepoDir: repo})
	if err != nil {
		t.Fatal(err)
	}
	return set
}

func TestCreate(t *testing.T) {
	testenv.RequireRoot(t, "chown while seeding state, erofs and overlay mounts")
	l := store.At(t.TempDir())
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	st, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	hello := bytes.Repeat([]byte("hello from the image\n"), 300)
	rt := testRuntime(t)
	// A creation that crashed before its rename.
	leftover := filepath.Join(l.Deployments(), ".tmp-1-000000000000-x")
	mustWrite(t, filepath.Join(leftover, "deployment.json"), []byte("{}"), 0o644)

	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	res, err := deploy.Create(l, deploy.CreateOptions{
		Tree: testImage(t, st, hello), Store: st, Runtime: rt,
		ImageRef: "oci-archive:/tmp/x.tar", ManifestDigest: "sha256:abc", Kernel: "6.12.0-test",
		Origin: "install", LocalMode: cmdline.LocalTransient, Now: func() time.Time { return created },
	})
	if err != nil {
		t.Fatal(err)
	}
	d := res.Deployment
	if _, err := os.Stat(leftover); !os.IsNotExist(err) {
		t.Error("Create did not clean up the leftover temporary deployment")
	}
	// The id names the serial and the image's real fs-verity digest.
	got, err := fsverity.DigestFile(res.ImagePath, fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if hex.EncodeToString(got) != d.ComposefsDigest || res.ImagePath != l.Image(d.ComposefsDigest) {
		t.Fatalf("image digest %x, deployment says %s", got, d.ComposefsDigest)
	}
	if d.ID != "1-"+d.ComposefsDigest[:12] {
		t.Errorf("id %s", d.ID)
	}
	var onDisk map[string]any
	b, err := os.ReadFile(filepath.Join(l.Deployment(d.ID), "deployment.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &onDisk); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]any{"id": d.ID, "image_ref": "oci-archive:/tmp/x.tar", "manifest_digest": "sha256:abc",
		"composefs_digest": d.ComposefsDigest, "kernel": "6.12.0-test", "origin": "install", "state": "staged",
		"created": "2026-01-02T03:04:05Z", "pinned": false, "local_mode": "transient"} {
		if onDisk[k] != want {
			t.Errorf("deployment.json %s = %v, want %v", k, onDisk[k], want)
		}
	}
	for _, sub := range []string{"upper", "work"} {
		if fi, err := os.Stat(filepath.Join(l.Deployment(d.ID), sub)); err != nil || !fi.IsDir() {
			t.Errorf("%s: %v", sub, err)
		}
	}
	if strings.Join(res.StateSeeded, ",") != "var,home,root,srv" {
		t.Errorf("seeded %v", res.StateSeeded)
	}
	if b, _ := os.ReadFile(filepath.Join(l.State(), "var/lib/dpkg/status")); string(b) != "pkgs" {
		t.Errorf("state/var not seeded from the image: %q", b)
	}
	// This host has no fs-verity: the marker must say so for the first boot.
	if _, err := os.Stat(l.VerityPendingPath()); res.VerityPending != (err == nil) {
		t.Errorf("VerityPending=%v but marker stat: %v", res.VerityPending, err)
	}

	// Mount the image through the kernel and read files back.
	mnt := mountComposefs(t, res.ImagePath, l.Objects())
	for p, want := range map[string][]byte{
		"usr/bin/hello":            hello,
		"etc/os-release":           []byte("ID=debian\n"),
		"usr/lib/berth/berth":      mustRead(t, rt.Source("usr/lib/berth/berth")),
		"usr/lib/berth/berth-init": mustRead(t, rt.InitBinary()),
		"usr/lib/berth/version":    []byte(runtime.Version + "\n"),
	} {
		got, err := os.ReadFile(filepath.Join(mnt, p))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s through the mount: %d bytes, %v", p, len(got), err)
		}
	}
	if target, err := os.Readlink(filepath.Join(mnt, "usr/bin/berth")); err != nil || target != "../lib/berth/berth" {
		t.Errorf("usr/bin/berth: %q %v", target, err)
	}

	// Same image again: new serial, same digest, image reused; state untouched.
	mustWrite(t, filepath.Join(l.State(), "var/lib/dpkg/status"), []byte("local"), 0o644)
	res2, err := deploy.Create(l, deploy.CreateOptions{Tree: testImage(t, st, hello), Store: st, Runtime: rt, Kernel: "6.12.0-test", Origin: "upgrade"})
	if err != nil {
		t.Fatal(err)
	}
	if res2.Deployment.ComposefsDigest != d.ComposefsDigest || res2.Deployment.ID != "2-"+d.ComposefsDigest[:12] {
		t.Errorf("second deployment %+v", res2.Deployment)
	}
	if len(res2.StateSeeded) != 0 {
		t.Errorf("second Create seeded %v", res2.StateSeeded)
	}
	if b, _ := os.ReadFile(filepath.Join(l.State(), "var/lib/dpkg/status")); string(b) != "local" {
		t.Errorf("state overwritten: %q", b)
	}
	if res2.Deployment.LocalMode != cmdline.LocalPersistent {
		t.Errorf("default local mode %q", res2.Deployment.LocalMode)
	}
	ds, err := deploy.List(l)
	if err != nil || len(ds) != 2 {
		t.Fatalf("List = %d, %v", len(ds), err)
	}
}

func TestCreateRefusesBadInput(t *testing.T) {
	l := store.At(t.TempDir())
	st, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	root := composefs.NewDir(0o755)
	if _, err := deploy.Create(l, deploy.CreateOptions{Tree: root, Store: st}); err == nil {
		t.Error("accepted a deployment without a kernel")
	}
	if _, err := deploy.Create(l, deploy.CreateOptions{Tree: root, Store: st, Kernel: "6", LocalMode: "sometimes"}); err == nil {
		t.Error("accepted an unknown local mode")
	}
	if _, err := deploy.Create(l, deploy.CreateOptions{Tree: &composefs.Inode{Mode: composefs.SIFREG}, Store: st, Kernel: "6"}); err == nil {
		t.Error("accepted a non-directory root")
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// mountComposefs mounts image read-only the way berth-init does (EROFS,
// then overlay with the object store as a data-only lower layer), without
// verity=require: this host's kernel has no fs-verity.
func mountComposefs(t *testing.T, image, objects string) string {
	t.Helper()
	dir := t.TempDir()
	meta, mnt := filepath.Join(dir, "meta"), filepath.Join(dir, "mnt")
	os.Mkdir(meta, 0o755)
	os.Mkdir(mnt, 0o755)
	// ENODEV: no EROFS; ENOTBLK: EROFS that cannot mount a file (before Linux 6.12).
	testenv.RequireFeature(t, unix.Mount(image, meta, "erofs", unix.MS_RDONLY, ""),
		"file-backed EROFS mount", unix.ENODEV, unix.ENOTBLK)
	t.Cleanup(func() { unix.Unmount(meta, unix.MNT_DETACH) })
	opts := "ro,lowerdir=" + meta + "::" + objects + ",metacopy=on,redirect_dir=on"
	if err := unix.Mount("overlay", mnt, "overlay", unix.MS_RDONLY, opts); err != nil {
		t.Fatalf("mount overlay %s: %v", opts, err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	return mnt
}
