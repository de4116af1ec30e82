package localchanges

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

var helloBytes = bytes.Repeat([]byte("hello, world\n"), 200) // external: > inline limit

// testDeployment makes a deployment whose image has /etc, /usr (with an
// external file), /opt and a per-deployment /var/lib/dpkg.
func testDeployment(t *testing.T) (store.Layout, *deploy.Deployment) {
	t.Helper()
	testenv.RequireRoot(t, "deployments are root-owned and the tests mount overlays")
	l := store.At(t.TempDir())
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	st, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	b := st.NewBatch()
	d, size, err := b.AddReader(bytes.NewReader(helloBytes))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	file := func(s string) *composefs.Inode {
		return &composefs.Inode{Mode: composefs.SIFREG | 0o644, Size: uint64(len(s)), Inline: []byte(s)}
	}
	dir := func(parent *composefs.Inode, name string) *composefs.Inode {
		n := composefs.NewDir(0o755)
		parent.Children[name] = n
		return n
	}
	root := composefs.NewDir(0o755)
	etc := dir(root, "etc")
	etc.Children["hostname"] = file("image\n")
	etc.Children["motd"] = file("hi\n")
	app := dir(etc, "app")
	app.Children["a.conf"] = file("a\n")
	app.Children["b.conf"] = file("b\n")
	usr := dir(root, "usr")
	dir(usr, "bin").Children["hello"] = &composefs.Inode{Mode: composefs.SIFREG | 0o755, Size: uint64(size), Digest: d, Payload: composefs.PayloadPath(d)}
	doc := dir(dir(usr, "share"), "doc")
	doc.Children["README"] = file("readme\n")
	dir(root, "opt")
	v := dir(root, "var")
	dir(dir(v, "lib"), "dpkg").Children["status"] = file("pkgs\n")
	dir(v, "log")
	res, err := deploy.Create(l, deploy.CreateOptions{Tree: root, Store: st, Kernel: "6.12.0-test", ImageRef: "oci-archive:/nonexistent.tar", ManifestDigest: "sha256:" + strings.Repeat("ab", 32), Origin: "install"})
	if err != nil {
		t.Fatal(err)
	}
	return l, res.Deployment
}

// mountDeployment mounts the deployment's composefs image with its upper
// directory, as berth-init does (without verity: test hosts may lack it).
func mountDeployment(t *testing.T, l store.Layout, d *deploy.Deployment) (string, func()) {
	t.Helper()
	mnt := t.TempDir()
	dd := l.Deployment(d.ID)
	testenv.RequireFeature(t, composefs.Mount(mnt, composefs.MountOptions{Image: l.Image(d.ComposefsDigest), Objects: l.Objects(), Upper: filepath.Join(dd, "upper"), Work: filepath.Join(dd, "work")}),
		"composefs mount (EROFS, overlayfs)", composefs.ErrNoErofs, composefs.ErrNoOverlayFeature)
	done := false
	umount := func() {
		if !done {
			done = true
			if err := composefs.Unmount(mnt); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Cleanup(umount)
	return mnt, umount
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// makeChanges changes the mounted deployment the way a user would.
func makeChanges(t *testing.T, mnt string) {
	t.Helper()
	must(t, os.WriteFile(filepath.Join(mnt, "etc/hostname"), []byte("local\n"), 0o644))
	must(t, os.Remove(filepath.Join(mnt, "etc/motd")))
	must(t, os.WriteFile(filepath.Join(mnt, "etc/new.conf"), []byte("new\n"), 0o600))
	// Replace a directory: the overlay makes the new one opaque.
	must(t, os.RemoveAll(filepath.Join(mnt, "etc/app")))
	must(t, os.Mkdir(filepath.Join(mnt, "etc/app"), 0o755))
	must(t, os.WriteFile(filepath.Join(mnt, "etc/app/c.conf"), []byte("c\n"), 0o644))
	// Metadata only: metacopy=on copies up no data.
	must(t, os.Chmod(filepath.Join(mnt, "usr/bin/hello"), 0o700))
	// A renamed image directory: redirect_dir=on.
	must(t, os.Rename(filepath.Join(mnt, "usr/share/doc"), filepath.Join(mnt, "usr/share/doc2")))
	must(t, os.MkdirAll(filepath.Join(mnt, "opt/tool/bin"), 0o755))
	must(t, os.WriteFile(filepath.Join(mnt, "opt/tool/bin/run"), []byte("#!/bin/sh\n"), 0o755))
	must(t, os.WriteFile(filepath.Join(mnt, "var/lib/dpkg/status"), []byte("pkgs+local\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(mnt, "var/log/boot.log"), []byte("log\n"), 0o644))
}

func changeList(cs []Change) string {
	var s []string
	for _, c := range cs {
		s = append(s, c.Kind+" "+c.Path)
	}
	return strings.Join(s, "\n")
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestDiffAndResetPaths(t *testing.T) {
	l, d := testDeployment(t)
	mnt, umount := mountDeployment(t, l, d)
	makeChanges(t, mnt)

	// While mounted (and not booted), the upper directory is refused.
	if _, err := Reset(l, d.ID, ResetOptions{Paths: []string{"/etc/hostname"}}); !errors.Is(err, ErrMounted) {
		t.Fatalf("reset of a mounted deployment: %v, want ErrMounted", err)
	}
	umount()

	res, err := Diff(l, d.ID)
	must(t, err)
	want := strings.Join([]string{
		"replaced /etc/app",
		"modified /etc/hostname",
		"deleted /etc/motd",
		"added /etc/new.conf",
		"added /opt/tool",
		"modified /usr/bin/hello",
		"deleted /usr/share/doc",
		"added /usr/share/doc2",
		"modified /var/lib/dpkg/status",
	}, "\n")
	if got := changeList(res.Changes); got != want {
		t.Fatalf("diff:\n%s\nwant:\n%s", got, want)
	}

	// Paths that cannot be reset on their own, or are not the image's.
	for p, msg := range map[string]string{
		"/etc/app/a.conf":       "reset /etc/app instead",
		"/usr/share/doc2/x":     "reset /usr/share/doc2 instead",
		"/usr/share/doc/README": "reset /usr/share/doc instead",
		"/usr/share/doc":        "reset both",
		"/var/log/boot.log":     "shared state",
		"/home/u":               "shared state",
		"etc/hostname":          "not absolute",
		"/":                     "whole deployment",
	} {
		if _, err := Reset(l, d.ID, ResetOptions{Paths: []string{p}}); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("reset %s: %v, want an error with %q", p, err, msg)
		}
	}

	rr, err := Reset(l, d.ID, ResetOptions{Paths: []string{"/etc/hostname", "/usr/bin/hello", "/etc/motd", "/opt/tool/bin/run", "/usr/share/doc", "/usr/share/doc2", "/etc/../etc/hostname", "/etc/nothing-here", "/etc/motd/x"}})
	must(t, err)
	if rr.Pending {
		t.Fatal("reset of a deployment that is not booted was only recorded")
	}
	wantReset := "modified /etc/hostname\ndeleted /etc/motd\nadded /opt/tool/bin/run\nmodified /usr/bin/hello\ndeleted /usr/share/doc\nadded /usr/share/doc2"
	if got := changeList(rr.Changes); got != wantReset {
		t.Fatalf("reset changes:\n%s\nwant:\n%s", got, wantReset)
	}
	if _, err := os.Lstat(filepath.Join(l.Deployment(d.ID), trashDir)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("trash left behind: %v", err)
	}
	// Idempotent: the same reset again changes nothing.
	rr, err = Reset(l, d.ID, ResetOptions{Paths: []string{"/etc/hostname", "/usr/bin/hello"}})
	must(t, err)
	if len(rr.Changes) != 0 {
		t.Fatalf("second reset: %v", rr.Changes)
	}

	mnt, umount = mountDeployment(t, l, d)
	if got := readFile(t, filepath.Join(mnt, "etc/hostname")); got != "image\n" {
		t.Errorf("/etc/hostname after reset: %q", got)
	}
	if got := readFile(t, filepath.Join(mnt, "etc/motd")); got != "hi\n" {
		t.Errorf("/etc/motd after reset: %q", got)
	}
	if fi, err := os.Stat(filepath.Join(mnt, "usr/bin/hello")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("/usr/bin/hello after reset: %v %v", fi, err)
	} else if got := readFile(t, filepath.Join(mnt, "usr/bin/hello")); got != string(helloBytes) {
		t.Errorf("/usr/bin/hello content after reset differs")
	}
	if got := readFile(t, filepath.Join(mnt, "usr/share/doc/README")); got != "readme\n" {
		t.Errorf("/usr/share/doc/README after reset: %q", got)
	}
	if _, err := os.Lstat(filepath.Join(mnt, "opt/tool/bin/run")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/opt/tool/bin/run after reset: %v", err)
	}
	// Untouched changes stay.
	if got := readFile(t, filepath.Join(mnt, "etc/new.conf")); got != "new\n" {
		t.Errorf("/etc/new.conf: %q", got)
	}
	if _, err := os.Lstat(filepath.Join(mnt, "usr/share/doc2")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/usr/share/doc2 after reset: %v", err)
	}
	if got := readFile(t, filepath.Join(mnt, "etc/app/c.conf")); got != "c\n" {
		t.Errorf("/etc/app/c.conf: %q", got)
	}
	umount()
}

func TestPendingResetAll(t *testing.T) {
	l, d := testDeployment(t)
	mnt, umount := mountDeployment(t, l, d)
	makeChanges(t, mnt)
	umount()
	before, err := Diff(l, d.ID)
	must(t, err)

	// Booted: recorded, nothing changes yet.
	rr, err := Reset(l, d.ID, ResetOptions{Paths: []string{"/etc/hostname"}, Booted: d.ID})
	must(t, err)
	if !rr.Pending || changeList(rr.Changes) != "modified /etc/hostname" {
		t.Fatalf("pending reset: %+v", rr)
	}
	rr, err = Reset(l, d.ID, ResetOptions{All: true, Booted: d.ID})
	must(t, err)
	if !rr.Pending || !rr.All || len(rr.Changes) != len(before.Changes) {
		t.Fatalf("pending reset all: %+v", rr)
	}
	after, err := Diff(l, d.ID)
	must(t, err)
	if !reflect.DeepEqual(after.Changes, before.Changes) || after.PendingReset == nil || !after.PendingReset.All {
		t.Fatalf("a pending reset changed the upper directory or is not shown: %+v", after)
	}

	// An interrupted earlier attempt left a trash directory.
	trash := filepath.Join(l.Deployment(d.ID), trashDir)
	must(t, os.MkdirAll(filepath.Join(trash, "0", "x"), 0o755))

	must(t, ApplyPendingReset(l, d.ID))
	if _, err := os.Lstat(filepath.Join(l.Deployment(d.ID), ResetFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("reset.json after apply: %v", err)
	}
	if _, err := os.Lstat(trash); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("trash after apply: %v", err)
	}
	res, err := Diff(l, d.ID)
	must(t, err)
	if len(res.Changes) != 0 {
		t.Fatalf("diff after reset all: %s", changeList(res.Changes))
	}
	// Shared state in the upper directory (hidden at run time) is kept.
	if _, err := os.Lstat(filepath.Join(UpperDir(l, d.ID), "var/log/boot.log")); err != nil {
		t.Fatalf("reset all removed shared state: %v", err)
	}
	// Nothing pending: a no-op.
	must(t, ApplyPendingReset(l, d.ID))

	mnt, umount = mountDeployment(t, l, d)
	for p, want := range map[string]string{"etc/hostname": "image\n", "etc/motd": "hi\n", "etc/app/a.conf": "a\n", "var/lib/dpkg/status": "pkgs\n", "usr/share/doc/README": "readme\n"} {
		if got := readFile(t, filepath.Join(mnt, p)); got != want {
			t.Errorf("/%s after reset all: %q, want %q", p, got, want)
		}
	}
	for _, p := range []string{"etc/new.conf", "etc/app/c.conf", "opt/tool", "usr/share/doc2"} {
		if _, err := os.Lstat(filepath.Join(mnt, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("/%s after reset all: %v", p, err)
		}
	}
	umount()
}

// A pending reset whose path became unresettable after it was recorded
// resets the rest and reports the path.
func TestPendingResetSkipsChangedParent(t *testing.T) {
	l, d := testDeployment(t)
	mnt, umount := mountDeployment(t, l, d)
	must(t, os.WriteFile(filepath.Join(mnt, "etc/app/a.conf"), []byte("local\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(mnt, "etc/hostname"), []byte("local\n"), 0o644))
	umount()
	_, err := Reset(l, d.ID, ResetOptions{Paths: []string{"/etc/app/a.conf", "/etc/hostname"}, Booted: d.ID})
	must(t, err)
	mnt, umount = mountDeployment(t, l, d)
	must(t, os.RemoveAll(filepath.Join(mnt, "etc/app")))
	umount()
	err = ApplyPendingReset(l, d.ID)
	if err == nil || !strings.Contains(err.Error(), "reset /etc/app instead") {
		t.Fatalf("apply: %v", err)
	}
	res, err := Diff(l, d.ID)
	must(t, err)
	if got := changeList(res.Changes); got != "deleted /etc/app" || res.PendingReset != nil {
		t.Fatalf("after apply: %s (pending %+v)", got, res.PendingReset)
	}
}

func TestCancelPendingReset(t *testing.T) {
	l, d := testDeployment(t)
	had, err := CancelPendingReset(l, d.ID)
	must(t, err)
	if had {
		t.Fatal("cancel without a pending reset reported one")
	}
	_, err = Reset(l, d.ID, ResetOptions{All: true, Booted: d.ID})
	must(t, err)
	had, err = CancelPendingReset(l, d.ID)
	if err != nil || !had {
		t.Fatalf("cancel: %v %v", had, err)
	}
	if pr, err := ReadPendingReset(l, d.ID); pr != nil || err != nil {
		t.Fatalf("pending after cancel: %+v %v", pr, err)
	}
}

func TestReadPendingResetRejectsGarbage(t *testing.T) {
	l, d := testDeployment(t)
	for _, s := range []string{"", "{", `{"version":2,"all":true}`, `{"version":1}`, `{"version":1,"paths":[]}`} {
		must(t, os.WriteFile(filepath.Join(l.Deployment(d.ID), ResetFile), []byte(s), 0o644))
		if _, err := ReadPendingReset(l, d.ID); err == nil {
			t.Errorf("reset.json %q accepted", s)
		}
		if err := ApplyPendingReset(l, d.ID); err == nil {
			t.Errorf("apply of reset.json %q succeeded", s)
		}
	}
	// A hostile path in reset.json is refused, not followed.
	must(t, os.WriteFile(filepath.Join(l.Deployment(d.ID), ResetFile), []byte(`{"version":1,"paths":["../../deployment.json","/var/log"]}`), 0o644))
	err := ApplyPendingReset(l, d.ID)
	if err == nil || !strings.Contains(err.Error(), "not absolute") || !strings.Contains(err.Error(), "shared state") {
		t.Fatalf("hostile reset.json: %v", err)
	}
	if _, err := deploy.Read(l, d.ID); err != nil {
		t.Fatalf("deployment damaged: %v", err)
	}
}

// A recorded reset of a renamed directory and its origin is applied
// together; one of them alone is skipped at boot when the other stays.
func TestPendingResetRenamedDir(t *testing.T) {
	l, d := testDeployment(t)
	mnt, umount := mountDeployment(t, l, d)
	must(t, os.Rename(filepath.Join(mnt, "usr/share/doc"), filepath.Join(mnt, "usr/share/doc2")))
	must(t, os.WriteFile(filepath.Join(mnt, "etc/hostname"), []byte("local\n"), 0o644))
	umount()
	_, err := Reset(l, d.ID, ResetOptions{Paths: []string{"/usr/share/doc"}, Booted: d.ID})
	if !IsRefusal(err) || !strings.Contains(err.Error(), "reset both") {
		t.Fatalf("pending reset of a rename origin alone: %v", err)
	}
	_, err = Reset(l, d.ID, ResetOptions{Paths: []string{"/usr/share/doc", "/usr/share/doc2"}, Booted: d.ID})
	must(t, err)
	must(t, ApplyPendingReset(l, d.ID))
	res, err := Diff(l, d.ID)
	must(t, err)
	if got := changeList(res.Changes); got != "modified /etc/hostname" {
		t.Fatalf("after applying: %s", got)
	}
	mnt, umount = mountDeployment(t, l, d)
	if got := readFile(t, filepath.Join(mnt, "usr/share/doc/README")); got != "readme\n" {
		t.Errorf("/usr/share/doc/README: %q", got)
	}
	umount()

	// Recorded as a pair, but at boot the origin comes with a hostname
	// reset only: the origin is skipped, the hostname reset.
	mnt, umount = mountDeployment(t, l, d)
	must(t, os.Rename(filepath.Join(mnt, "usr/share/doc"), filepath.Join(mnt, "usr/share/doc3")))
	umount()
	must(t, os.WriteFile(filepath.Join(l.Deployment(d.ID), ResetFile), []byte(`{"version":1,"paths":["/usr/share/doc","/etc/hostname"]}`), 0o644))
	err = ApplyPendingReset(l, d.ID)
	if err == nil || !strings.Contains(err.Error(), "reset both") {
		t.Fatalf("apply with a rename partner left: %v", err)
	}
	res, err = Diff(l, d.ID)
	must(t, err)
	if got := changeList(res.Changes); got != "deleted /usr/share/doc\nadded /usr/share/doc3" {
		t.Fatalf("after applying: %s", got)
	}
}
