package runtime_test

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/testenv"
)

func writeFile(t *testing.T, p string, data []byte, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, data, mode); err != nil {
		t.Fatal(err)
	}
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// fakeBuildTree lays out bin/ and the source tree files the way a berth
// checkout after `make build` has them.
func fakeBuildTree(t *testing.T) (bin, repo string, content map[string][]byte) {
	repo = t.TempDir()
	bin = filepath.Join(repo, "bin")
	content = map[string][]byte{}
	for _, name := range []string{"berth", "berth-init", "berthd", "berth-generator"} {
		content[name] = randBytes(5000)
		writeFile(t, filepath.Join(bin, name), content[name], 0o755)
	}
	writeFile(t, filepath.Join(repo, "units", "berthd.service"), []byte("[Unit]\nDescription=berth\n[Service]\nType=dbus\nBusName=org.berth1\nExecStart=/usr/lib/berth/berthd\n"), 0o644)
	writeFile(t, filepath.Join(repo, "units", "berth-check.service"), []byte("[Service]\nExecStart=/bin/true\n\n[Install]\nWantedBy=multi-user.target\nRequiredBy=boot-complete.target\n"), 0o644)
	writeFile(t, filepath.Join(repo, "units", "README"), []byte("not a unit"), 0o644)
	writeFile(t, filepath.Join(repo, "dracut", "90berth", "module-setup.sh"), []byte("#!/bin/bash\ncheck() { return 0; }\n"), 0o755)
	writeFile(t, filepath.Join(repo, "data", "org.berth1.conf"), []byte("<busconfig/>\n"), 0o644)
	return bin, repo, content
}

func TestCollectAndInject(t *testing.T) {
	bin, repo, content := fakeBuildTree(t)
	set, err := runtime.Collect(runtime.Options{BinDir: bin, RepoDir: repo})
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, f := range set.Files {
		paths = append(paths, f.Path)
	}
	want := []string{
		"usr/bin/berth",
		"usr/lib/berth/berth", "usr/lib/berth/berth-init", "usr/lib/berth/berthd",
		"usr/lib/dracut/modules.d/90berth/module-setup.sh",
		"usr/lib/systemd/system-generators/berth-generator",
		"usr/lib/systemd/system/berth-check.service",
		"usr/lib/systemd/system/berthd.service",
		"usr/lib/systemd/system/boot-complete.target.requires/berth-check.service",
		"usr/lib/systemd/system/multi-user.target.wants/berth-check.service",
		"usr/share/dbus-1/system.d/org.berth1.conf",
	}
	if strings.Join(paths, "\n") != strings.Join(want, "\n") {
		t.Fatalf("collected:\n%s\nwant:\n%s", strings.Join(paths, "\n"), strings.Join(want, "\n"))
	}
	if got := set.InitBinary(); got != filepath.Join(bin, "berth-init") {
		t.Errorf("InitBinary = %q", got)
	}

	st, err := composefs.OpenStore(filepath.Join(t.TempDir(), "objects"), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	root := composefs.NewDir(0o755)
	usr := composefs.NewDir(0o755)
	root.Children["usr"] = usr
	usr.Children["bin"] = composefs.NewDir(0o755)
	usr.Children["bin"].Children["berth"] = &composefs.Inode{Mode: composefs.SIFREG | 0o755, Size: 3, Inline: []byte("old")}
	b := st.NewBatch()
	res, err := set.Inject(root, b, st.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if !res.Injected || len(res.Paths) != len(want)+2 {
		t.Fatalf("Inject result %+v", res)
	}
	// Binaries are external objects whose content and digest match.
	for _, name := range []string{"berth", "berth-init", "berthd"} {
		n := root.Lookup("usr/lib/berth/" + name)
		if n == nil || n.Type() != composefs.SIFREG || n.Mode&0o7777 != 0o755 || n.Size != 5000 {
			t.Fatalf("%s: %+v", name, n)
		}
		got, err := os.ReadFile(st.Path(n.Digest))
		if err != nil || !bytes.Equal(got, content[name]) {
			t.Fatalf("%s object: %v", name, err)
		}
		d, _ := fsverity.Digest(bytes.NewReader(content[name]), fsverity.SHA256)
		if !bytes.Equal(d, n.Digest) || n.Payload != composefs.PayloadPath(d) {
			t.Errorf("%s digest/payload mismatch", name)
		}
	}
	if n := root.Lookup("usr/bin/berth"); n == nil || n.Type() != composefs.SIFLNK || n.Target != "../lib/berth/berth" {
		t.Errorf("usr/bin/berth = %+v (the image's old file must be replaced by the link)", n)
	}
	if n := root.Lookup("usr/lib/systemd/system/multi-user.target.wants/berth-check.service"); n == nil || n.Target != "../berth-check.service" {
		t.Errorf("enablement link = %+v", n)
	}
	if n := root.Lookup("usr/lib/berth/version"); n == nil || string(n.Inline) != runtime.Version+"\n" {
		t.Errorf("version file = %+v", n)
	}
	if n := root.Lookup("usr/lib/systemd/system/berthd.service"); n == nil || n.Mode&0o7777 != 0o644 || len(n.Inline) > 0 && n.Size != uint64(len(n.Inline)) {
		t.Errorf("unit = %+v", n)
	}
	if n := root.Lookup("usr/lib/systemd"); n == nil || !n.IsDir() || n.Mode&0o7777 != 0o755 || n.UID != 0 {
		t.Errorf("created parent = %+v", n)
	}

	// The injected tree written to disk has berth's runtime list, and a
	// runtime collected from that installed system is the same set.
	sys := filepath.Join(t.TempDir(), "sys")
	if err := deploy.ExtractTree(sys, root, st.Dir()); err != nil {
		testenv.RequireRoot(t, "the rest chowns while extracting")
		t.Fatal(err)
	}
	again, err := runtime.Collect(runtime.Options{BinDir: filepath.Join(sys, "usr/lib/berth"), SysRoot: sys})
	if err != nil {
		t.Fatal(err)
	}
	var againPaths []string
	for _, f := range again.Files {
		againPaths = append(againPaths, f.Path)
	}
	sort.Strings(againPaths)
	if strings.Join(againPaths, "\n") != strings.Join(want, "\n") {
		t.Errorf("collected from the installed system:\n%s", strings.Join(againPaths, "\n"))
	}
}

func TestInjectVersionPolicy(t *testing.T) {
	bin, repo, _ := fakeBuildTree(t)
	set, err := runtime.Collect(runtime.Options{BinDir: bin, RepoDir: repo})
	if err != nil {
		t.Fatal(err)
	}
	set.Version = "1.5.0"
	st, err := composefs.OpenStore(filepath.Join(t.TempDir(), "objects"), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	imageWithBerth := func(version string) *composefs.Inode {
		root := composefs.NewDir(0o755)
		lib := composefs.NewDir(0o755)
		root.Children["usr"] = composefs.NewDir(0o755)
		root.Children["usr"].Children["lib"] = composefs.NewDir(0o755)
		root.Children["usr"].Children["lib"].Children["berth"] = lib
		lib.Children["berth"] = &composefs.Inode{Mode: composefs.SIFREG | 0o755, Size: 4, Inline: []byte("mine")}
		if version != "" {
			lib.Children["version"] = &composefs.Inode{Mode: composefs.SIFREG | 0o644, Size: uint64(len(version)), Inline: []byte(version)}
		}
		return root
	}
	for _, tc := range []struct {
		version string
		inject  bool
	}{{"2.0.0\n", false}, {"1.5.0", false}, {"", false}, {"garbage", false}, {"1.4.9\n", true}, {"v0.9", true}} {
		root := imageWithBerth(tc.version)
		b := st.NewBatch()
		res, err := set.Inject(root, b, st.Dir())
		b.Abort()
		if err != nil {
			t.Fatal(err)
		}
		kept := string(root.Lookup("usr/lib/berth/berth").Inline) == "mine"
		if res.Injected != tc.inject || kept == tc.inject {
			t.Errorf("image version %q: injected=%v kept=%v (%s)", tc.version, res.Injected, kept, res.Reason)
		}
	}

	// A file where a directory must go is an error, not a silent replace.
	root := composefs.NewDir(0o755)
	root.Children["usr"] = &composefs.Inode{Mode: composefs.SIFLNK | 0o777, Target: "/elsewhere"}
	b := st.NewBatch()
	defer b.Abort()
	if _, err := set.Inject(root, b, st.Dir()); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("symlinked /usr: %v", err)
	}
}

func TestCollectRequiresBinaries(t *testing.T) {
	bin, repo, _ := fakeBuildTree(t)
	os.Remove(filepath.Join(bin, "berth-init"))
	if _, err := runtime.Collect(runtime.Options{BinDir: bin, RepoDir: repo}); err == nil || !strings.Contains(err.Error(), "berth-init") {
		t.Errorf("missing berth-init: %v", err)
	}
	bin2, repo2, _ := fakeBuildTree(t)
	writeFile(t, filepath.Join(repo2, "units", "bad.service"), []byte("[Install]\nWantedBy=../../etc/x.target\n"), 0o644)
	if _, err := runtime.Collect(runtime.Options{BinDir: bin2, RepoDir: repo2}); err == nil {
		t.Error("accepted a unit with a path in WantedBy=")
	}
}
