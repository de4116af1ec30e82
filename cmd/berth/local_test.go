package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// TestDiffResetCLI runs berth diff and berth reset on a --sysroot
// deployment whose upper directory holds a change and a whiteout.
func TestDiffResetCLI(t *testing.T) {
	testenv.RequireRoot(t, "deploy.Create makes root-owned deployments and whiteouts are device nodes")
	sysroot := t.TempDir()
	l := store.At(sysroot)
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	st, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	root := composefs.NewDir(0o755)
	etc := composefs.NewDir(0o755)
	root.Children["etc"] = etc
	etc.Children["hostname"] = &composefs.Inode{Mode: composefs.SIFREG | 0o644, Inline: []byte("img\n"), Size: 4}
	etc.Children["motd"] = &composefs.Inode{Mode: composefs.SIFREG | 0o644, Inline: []byte("hi\n"), Size: 3}
	res, err := deploy.Create(l, deploy.CreateOptions{Tree: root, Store: st, Kernel: "6.12.0-test", ImageRef: "oci-archive:/nonexistent/base.tar", ManifestDigest: "sha256:" + strings.Repeat("ab", 32), Origin: "install"})
	if err != nil {
		t.Fatal(err)
	}
	id := res.Deployment.ID
	up := localchanges.UpperDir(l, id)
	os.MkdirAll(filepath.Join(up, "etc"), 0o755)
	os.WriteFile(filepath.Join(up, "etc/hostname"), []byte("local\n"), 0o644)
	if err := unix.Mknod(filepath.Join(up, "etc/motd"), unix.S_IFCHR, 0); err != nil {
		t.Fatal(err)
	}

	if got, want := runCLI(t, "diff", "--sysroot", sysroot), "deployment "+id+": 2 local changes\nM /etc/hostname\nD /etc/motd\n"; got != want {
		t.Fatalf("berth diff:\n%s\nwant:\n%s", got, want)
	}
	if got, want := runCLI(t, "reset", "--sysroot", sysroot, "/etc/hostname"), "deployment "+id+": reset 1 path, 1 changes removed\nM /etc/hostname\n"; got != want {
		t.Fatalf("berth reset:\n%s\nwant:\n%s", got, want)
	}
	var dr localchanges.DiffResult
	if err := json.Unmarshal([]byte(runCLI(t, "diff", "--sysroot", sysroot, "--json", id)), &dr); err != nil || dr.Deployment != id || len(dr.Changes) != 1 || dr.Changes[0].Kind != "deleted" {
		t.Fatalf("berth diff --json: %+v, %v", dr, err)
	}
	global = globalFlags{}
	root2 := newRootCmd()
	root2.SetOut(&bytes.Buffer{})
	root2.SetArgs([]string{"reset", "--sysroot", sysroot, "/var/log"})
	if err := root2.Execute(); err == nil || !strings.Contains(err.Error(), "shared state") {
		t.Fatalf("berth reset /var/log: %v", err)
	}
	// The base image is gone: commit says what to do.
	global = globalFlags{}
	root3 := newRootCmd()
	root3.SetOut(&bytes.Buffer{})
	root3.SetArgs([]string{"commit", "--sysroot", sysroot, "--tag", "oci-archive:" + filepath.Join(t.TempDir(), "c.tar")})
	if err := root3.Execute(); err == nil || !strings.Contains(err.Error(), "--base") {
		t.Fatalf("berth commit with the base image gone: %v", err)
	}
	if got := runCLI(t, "reset", "--sysroot", sysroot); !strings.Contains(got, "reset all local changes, 1 changes removed") {
		t.Fatalf("berth reset (all): %s", got)
	}
	if got := runCLI(t, "diff", "--sysroot", sysroot); got != "deployment "+id+": 0 local changes\n" {
		t.Fatalf("berth diff after reset: %q", got)
	}
}
