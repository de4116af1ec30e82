package commit

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"go.podman.io/image/v5/types"
	"go.podman.io/storage/pkg/reexec"
	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/overlay"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// TestMain lets containers/storage run its helpers (it re-executes the
// test binary to apply layers in a chroot).
func TestMain(m *testing.M) {
	if reexec.Init() {
		return
	}
	os.Exit(m.Run())
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func sha(b []byte) string { s := sha256.Sum256(b); return "sha256:" + hex.EncodeToString(s[:]) }

var helloBytes = bytes.Repeat([]byte("hello, world\n"), 300)

type ent struct {
	name, body, link string
	typ              byte
	mode             int64
	xattrs           map[string]string
}

func makeTar(t *testing.T, ents []ent) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Size: int64(len(e.body)), Linkname: e.link, ModTime: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Format: tar.FormatPAX}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		must(t, tw.WriteHeader(h))
		if h.Size > 0 {
			tw.Write([]byte(e.body))
		}
	}
	must(t, tw.Close())
	return buf.Bytes()
}

// writeArchive writes an oci-archive with the given layers (gzip) and
// returns its path.
func writeArchive(t *testing.T, dir string, layers ...[]byte) string {
	layout := filepath.Join(dir, "layout")
	must(t, os.MkdirAll(filepath.Join(layout, "blobs", "sha256"), 0o755))
	put := func(b []byte) string {
		d := sha(b)
		must(t, os.WriteFile(filepath.Join(layout, "blobs", "sha256", d[7:]), b, 0o644))
		return d
	}
	var diffIDs []string
	var descs []map[string]any
	for _, l := range layers {
		var gz bytes.Buffer
		w := gzip.NewWriter(&gz)
		w.Write(l)
		w.Close()
		descs = append(descs, map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz.Bytes()), "size": gz.Len()})
		diffIDs = append(diffIDs, sha(l))
	}
	cfg, _ := json.Marshal(map[string]any{"created": "2026-01-02T03:04:05Z", "architecture": "amd64", "os": "linux",
		"config": map[string]any{"Env": []string{"PATH=/usr/bin"}}, "rootfs": map[string]any{"type": "layers", "diff_ids": diffIDs},
		"history": []map[string]any{{"created_by": "layer 1"}, {"created_by": "layer 2"}}})
	man, _ := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(cfg), "size": len(cfg)}, "layers": descs})
	md := put(man)
	idx, _ := json.Marshal(map[string]any{"schemaVersion": 2, "manifests": []map[string]any{{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": len(man)}}})
	must(t, os.WriteFile(filepath.Join(layout, "index.json"), idx, 0o644))
	must(t, os.WriteFile(filepath.Join(layout, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644))
	archive := filepath.Join(dir, "base.tar")
	cmd := exec.Command("tar", "-C", layout, "-cf", archive, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tar: %v %s", err, out)
	}
	return archive
}

func pullOptions(t *testing.T, sysroot string) oci.PullOptions {
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.json")
	must(t, os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644))
	regConf := filepath.Join(dir, "registries.conf")
	must(t, os.WriteFile(regConf, []byte("unqualified-search-registries = []\n"), 0o644))
	return oci.PullOptions{Sysroot: sysroot, PolicyPath: policy, Warnings: io.Discard, SystemContext: &types.SystemContext{
		SystemRegistriesConfPath: regConf, SystemRegistriesConfDirPath: filepath.Join(dir, "registries.d"),
		AuthFilePath: filepath.Join(dir, "auth.json"), RegistriesDirPath: filepath.Join(dir, "registries.d"),
	}}
}

// baseDeployment pulls a two-layer test image from an oci-archive and
// deploys it.
func baseDeployment(t *testing.T) (store.Layout, *deploy.Deployment, *oci.Image, oci.PullOptions) {
	testenv.RequireRoot(t, "deployments are root-owned and commit mounts overlays")
	l1 := makeTar(t, []ent{
		{name: "etc/", typ: tar.TypeDir, mode: 0o755},
		{name: "etc/hostname", typ: tar.TypeReg, mode: 0o644, body: "image\n"},
		{name: "etc/motd", typ: tar.TypeReg, mode: 0o644, body: "hi\n"},
		{name: "etc/app/", typ: tar.TypeDir, mode: 0o755},
		{name: "etc/app/a.conf", typ: tar.TypeReg, mode: 0o644, body: "a\n"},
		{name: "etc/app/b.conf", typ: tar.TypeReg, mode: 0o600, body: "b\n"},
		{name: "usr/", typ: tar.TypeDir, mode: 0o755},
		{name: "usr/bin/", typ: tar.TypeDir, mode: 0o755},
		{name: "usr/bin/hello", typ: tar.TypeReg, mode: 0o755, body: string(helloBytes), xattrs: map[string]string{"user.origin": "image"}},
		{name: "usr/share/", typ: tar.TypeDir, mode: 0o755},
		{name: "usr/share/doc/", typ: tar.TypeDir, mode: 0o755},
		{name: "usr/share/doc/README", typ: tar.TypeReg, mode: 0o644, body: "readme\n"},
		{name: "opt/", typ: tar.TypeDir, mode: 0o755},
		{name: "var/", typ: tar.TypeDir, mode: 0o755},
		{name: "var/lib/", typ: tar.TypeDir, mode: 0o755},
		{name: "var/lib/dpkg/", typ: tar.TypeDir, mode: 0o755},
		{name: "var/lib/dpkg/status", typ: tar.TypeReg, mode: 0o644, body: "pkgs\n"},
		{name: "var/log/", typ: tar.TypeDir, mode: 0o755},
	})
	l2 := makeTar(t, []ent{
		{name: "etc/issue", typ: tar.TypeReg, mode: 0o644, body: "Test OS\n"},
		{name: "usr/bin/hi", typ: tar.TypeSymlink, link: "hello", mode: 0o777},
	})
	dir := t.TempDir()
	archive := writeArchive(t, dir, l1, l2)
	sysroot := filepath.Join(dir, "sysroot")
	l := store.At(sysroot)
	must(t, l.Init())
	opts := pullOptions(t, sysroot)
	img, err := oci.Pull(context.Background(), "oci-archive:"+archive, opts)
	must(t, err)
	tree, err := oci.LoadTree(sysroot, img)
	must(t, err)
	st, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	must(t, err)
	res, err := deploy.Create(l, deploy.CreateOptions{Tree: tree, Store: st, Kernel: "6.12.0-test", ImageRef: img.Ref, ManifestDigest: img.ManifestDigest, Origin: "install"})
	must(t, err)
	return l, res.Deployment, img, opts
}

func mountDeployment(t *testing.T, l store.Layout, d *deploy.Deployment) (string, func()) {
	mnt := t.TempDir()
	dd := l.Deployment(d.ID)
	testenv.RequireFeature(t, composefs.Mount(mnt, composefs.MountOptions{Image: l.Image(d.ComposefsDigest), Objects: l.Objects(), Upper: filepath.Join(dd, "upper"), Work: filepath.Join(dd, "work")}),
		"composefs mount (EROFS, overlayfs)", composefs.ErrNoErofs, composefs.ErrNoOverlayFeature)
	done := false
	f := func() {
		if !done {
			done = true
			must(t, composefs.Unmount(mnt))
		}
	}
	t.Cleanup(f)
	return mnt, f
}

// snapshot describes every entry below root (type, mode, owner, size,
// content hash, link target, file xattrs, mtime of non-directories).
func snapshot(t *testing.T, root string, skip func(rel string) bool) map[string]string {
	out := map[string]string{}
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		if skip != nil && skip(rel) {
			if fi.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		var st unix.Stat_t
		must(t, unix.Lstat(p, &st))
		s := fmt.Sprintf("mode=%o uid=%d gid=%d", st.Mode, st.Uid, st.Gid)
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			must(t, err)
			s += fmt.Sprintf(" size=%d %s mtime=%d", len(b), sha(b), st.Mtim.Sec)
		case fi.Mode()&os.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			s += " -> " + target
		}
		xs, err := xattrs(p)
		must(t, err)
		var keys []string
		for k, v := range xs {
			if strings.HasPrefix(k, "user.") {
				keys = append(keys, k+"="+v)
			}
		}
		sort.Strings(keys)
		out[rel] = s + " " + strings.Join(keys, ",")
		return nil
	})
	must(t, err)
	return out
}

func diffSnapshots(want, got map[string]string) []string {
	var d []string
	for k, v := range want {
		if got[k] != v {
			d = append(d, fmt.Sprintf("%s: want %q, got %q", k, v, got[k]))
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			d = append(d, fmt.Sprintf("%s: unexpected %q", k, v))
		}
	}
	sort.Strings(d)
	return d
}

func sharedSkip(rel string) bool { return localchanges.SharedState(filepath.ToSlash(rel)) }

// TestCommitPullRoundTrip changes a deployment through its mounted
// overlay, commits the changes, pulls the committed image into a fresh
// sysroot and compares what its composefs mount shows with what the
// deployment showed.
func TestCommitPullRoundTrip(t *testing.T) {
	l, d, base, popts := baseDeployment(t)
	mnt, umount := mountDeployment(t, l, d)
	must(t, os.WriteFile(filepath.Join(mnt, "etc/hostname"), []byte("local\n"), 0o644))
	must(t, os.Remove(filepath.Join(mnt, "etc/motd")))
	must(t, os.WriteFile(filepath.Join(mnt, "etc/new.conf"), []byte("new bytes\n"), 0o640))
	must(t, unix.Lsetxattr(filepath.Join(mnt, "etc/new.conf"), "user.note", []byte("kept"), 0))
	must(t, os.Link(filepath.Join(mnt, "etc/new.conf"), filepath.Join(mnt, "etc/new-link.conf")))
	must(t, os.Symlink("new.conf", filepath.Join(mnt, "etc/new.sym")))
	must(t, os.RemoveAll(filepath.Join(mnt, "etc/app")))
	must(t, os.Mkdir(filepath.Join(mnt, "etc/app"), 0o750))
	must(t, os.WriteFile(filepath.Join(mnt, "etc/app/c.conf"), []byte("c\n"), 0o644))
	must(t, os.Chmod(filepath.Join(mnt, "usr/bin/hello"), 0o700)) // metacopy: no data in the upper
	must(t, os.Chown(filepath.Join(mnt, "etc/hostname"), 12, 34))
	must(t, os.Rename(filepath.Join(mnt, "usr/share/doc"), filepath.Join(mnt, "usr/share/doc2"))) // redirect
	must(t, os.WriteFile(filepath.Join(mnt, "usr/share/doc2/NEWS"), []byte("news\n"), 0o644))
	must(t, os.MkdirAll(filepath.Join(mnt, "opt/tool/bin"), 0o755))
	must(t, os.WriteFile(filepath.Join(mnt, "opt/tool/bin/run"), []byte("#!/bin/sh\n"), 0o755))
	must(t, unix.Mkfifo(filepath.Join(mnt, "opt/tool/fifo"), 0o600))
	must(t, os.WriteFile(filepath.Join(mnt, "var/lib/dpkg/status"), []byte("pkgs+local\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(mnt, "var/log/boot.log"), []byte("shared state\n"), 0o644))
	if fi, err := os.Stat(filepath.Join(localchanges.UpperDir(l, d.ID), "usr/bin/hello")); err != nil || fi.Size() != int64(len(helloBytes)) {
		t.Fatalf("upper usr/bin/hello: %v %v", fi, err)
	}
	if _, ok := overlay.Xattr(filepath.Join(localchanges.UpperDir(l, d.ID), "usr/bin/hello"), overlay.XattrMetacopy); !ok {
		t.Fatal("chmod did not make a metacopy upper file; the test does not cover metacopy")
	}
	want := snapshot(t, mnt, sharedSkip)
	// Committing while the deployment is mounted works too (the booted case).
	dest := filepath.Join(t.TempDir(), "committed.tar")
	res, err := Commit(context.Background(), Options{Sysroot: l.Sysroot, Deployment: d.ID, Dest: "oci-archive:" + dest, PolicyPath: popts.PolicyPath, SystemContext: popts.SystemContext, Message: "test", Warnings: io.Discard})
	must(t, err)
	umount()
	if mi, err := os.ReadFile("/proc/self/mountinfo"); err != nil || strings.Contains(string(mi), "berth-commit-") {
		t.Errorf("commit left mounts behind (%v):\n%s", err, mi)
	}
	if res.BaseManifest != base.ManifestDigest || res.Stats.Whiteouts != 2 || res.Stats.Opaque != 1 {
		t.Errorf("result %+v", res)
	}

	sys2 := filepath.Join(t.TempDir(), "sysroot")
	l2 := store.At(sys2)
	must(t, l2.Init())
	img, err := oci.Pull(context.Background(), "oci-archive:"+dest, pullOptions(t, sys2))
	must(t, err)
	if len(img.Layers) != 3 || img.Layers[0].Digest != base.Layers[0].Digest || img.Layers[1].Digest != base.Layers[1].Digest || img.Layers[2].DiffID != res.Layer.DiffID {
		t.Fatalf("committed layers %+v, base %+v, new %+v", img.Layers, base.Layers, res.Layer)
	}
	if img.ManifestDigest != res.ManifestDigest {
		t.Errorf("pulled manifest %s, committed %s", img.ManifestDigest, res.ManifestDigest)
	}
	got := mountImage(t, l2, img)
	gs := snapshot(t, got, sharedSkip)
	for _, d := range diffSnapshots(want, gs) {
		t.Error(d)
	}
	// Spelled out, so a snapshot that sees nothing cannot pass.
	for _, p := range []string{"etc/motd", "etc/app/a.conf", "usr/share/doc", "var/log/boot.log"} {
		if _, err := os.Lstat(filepath.Join(got, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("/%s in the committed image: %v", p, err)
		}
	}
	for p, body := range map[string]string{"etc/new.conf": "new bytes\n", "etc/hostname": "local\n", "etc/app/c.conf": "c\n", "usr/share/doc2/README": "readme\n", "usr/bin/hello": string(helloBytes), "var/lib/dpkg/status": "pkgs+local\n", "etc/issue": "Test OS\n"} {
		if b, err := os.ReadFile(filepath.Join(got, p)); err != nil || string(b) != body {
			t.Errorf("/%s in the committed image: %q, %v", p, b, err)
		}
	}
	var a, b unix.Stat_t
	must(t, unix.Lstat(filepath.Join(got, "etc/new.conf"), &a))
	must(t, unix.Lstat(filepath.Join(got, "etc/new-link.conf"), &b))
	if a.Ino != b.Ino || a.Nlink != 2 {
		t.Errorf("hardlink lost: inodes %d %d, nlink %d", a.Ino, b.Ino, a.Nlink)
	}
	if fi, err := os.Lstat(filepath.Join(got, "usr/bin/hello")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("/usr/bin/hello: %v %v", fi, err)
	}
	if v, ok := overlay.Xattr(filepath.Join(got, "usr/bin/hello"), "user.origin"); !ok || v != "image" {
		t.Errorf("/usr/bin/hello xattr: %q %v", v, ok)
	}

	// The same image through containers-storage.
	t.Run("containers-storage", func(t *testing.T) {
		work := t.TempDir()
		spec := "containers-storage:[vfs@" + filepath.Join(work, "graph") + "+" + filepath.Join(work, "run") + "]localhost/berth/committed:v1"
		if _, err := Commit(context.Background(), Options{Sysroot: l.Sysroot, Deployment: d.ID, Dest: spec, PolicyPath: popts.PolicyPath, SystemContext: popts.SystemContext, Warnings: io.Discard, Now: func() time.Time { return time.Unix(0, 0) }}); err != nil {
			t.Fatalf("commit to containers-storage: %v", err)
		}
		sys3 := filepath.Join(t.TempDir(), "sysroot")
		must(t, store.At(sys3).Init())
		img3, err := oci.Pull(context.Background(), spec, pullOptions(t, sys3))
		must(t, err)
		if img3.ComposefsDigest != img.ComposefsDigest {
			t.Errorf("containers-storage commit gives composefs %s, oci-archive %s", img3.ComposefsDigest, img.ComposefsDigest)
		}
	})
}

func mountImage(t *testing.T, l store.Layout, img *oci.Image) string {
	mnt := t.TempDir()
	must(t, composefs.Mount(mnt, composefs.MountOptions{Image: l.Image(img.ComposefsDigest), Objects: l.Objects()}))
	t.Cleanup(func() { composefs.Unmount(mnt) })
	return mnt
}

func TestCommitRefusals(t *testing.T) {
	l, d, _, popts := baseDeployment(t)
	opts := Options{Sysroot: l.Sysroot, Deployment: d.ID, Dest: "oci-archive:" + filepath.Join(t.TempDir(), "x.tar"), PolicyPath: popts.PolicyPath, SystemContext: popts.SystemContext, Warnings: io.Discard}
	if _, err := Commit(context.Background(), opts); !errors.Is(err, ErrNoChanges) {
		t.Fatalf("commit without changes: %v", err)
	}
	mnt, umount := mountDeployment(t, l, d)
	must(t, os.WriteFile(filepath.Join(mnt, "etc/x"), []byte("x"), 0o644))
	umount()
	// A base that is another image is refused.
	other := writeArchive(t, t.TempDir(), makeTar(t, []ent{{name: "etc/", typ: tar.TypeDir, mode: 0o755}}))
	o := opts
	o.Base = "oci-archive:" + other
	if _, err := Commit(context.Background(), o); err == nil || !strings.Contains(err.Error(), "no longer the image") {
		t.Fatalf("commit on another base: %v", err)
	}
	o = opts
	o.Base = "oci-archive:" + filepath.Join(t.TempDir(), "gone.tar")
	if _, err := Commit(context.Background(), o); err == nil || !strings.Contains(err.Error(), "--base") {
		t.Fatalf("commit with an unreachable base: %v", err)
	}
	if _, err := os.Stat(opts.Dest[len("oci-archive:"):]); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused commit wrote %s: %v", opts.Dest, err)
	}
}
