package etcmerge

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
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

type fileSpec struct {
	content string
	mode    uint32
	link    string
}

// imageTree builds a root with etc/ from specs; files over 64 bytes go to
// the object store as external files.
func imageTree(t *testing.T, objs *composefs.Store, etc map[string]fileSpec) *composefs.Inode {
	t.Helper()
	root := composefs.NewDir(0o755)
	batch := objs.NewBatch()
	for p, s := range etc {
		parent := root
		parts := strings.Split("etc/"+p, "/")
		for _, c := range parts[:len(parts)-1] {
			if parent.Children[c] == nil {
				parent.Children[c] = composefs.NewDir(0o755)
			}
			parent = parent.Children[c]
		}
		var n *composefs.Inode
		switch {
		case s.link != "":
			n = &composefs.Inode{Mode: composefs.SIFLNK | 0o777, Target: s.link}
		case len(s.content) <= 64:
			n = &composefs.Inode{Mode: composefs.SIFREG | s.mode, Inline: []byte(s.content), Size: uint64(len(s.content))}
		default:
			d, size, err := batch.AddReader(strings.NewReader(s.content))
			if err != nil {
				t.Fatal(err)
			}
			n = &composefs.Inode{Mode: composefs.SIFREG | s.mode, Digest: d, Payload: composefs.PayloadPath(d), Size: uint64(size)}
		}
		parent.Children[parts[len(parts)-1]] = n
	}
	if err := batch.Commit(); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestMergeDeploymentMounted(t *testing.T) {
	testenv.RequireRoot(t, "writes whiteouts and owners into an overlay upper directory and mounts the result")
	sysroot := t.TempDir()
	l := store.At(sysroot)
	if err := l.Init(); err != nil {
		t.Fatal(err)
	}
	objs, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	bigOld := strings.Repeat("Port 22\n", 40)
	bigNew := strings.Repeat("Port 22\nPermitRootLogin no\n", 40)
	oldTree := imageTree(t, objs, map[string]fileSpec{
		"hostname":        {content: "old-host\n", mode: 0o644},
		"fstab":           {content: "# base fstab\n", mode: 0o644},
		"motd":            {content: "hi\n", mode: 0o644},
		"ssh/sshd_config": {content: bigOld, mode: 0o644},
		"localtime":       {link: "/usr/share/zoneinfo/UTC"},
	})
	oldRes, err := deploy.Create(l, deploy.CreateOptions{Tree: oldTree, Store: objs, Kernel: "6.12.0"})
	if err != nil {
		t.Fatal(err)
	}
	old := oldRes.Deployment
	// Local changes of the old deployment, as overlayfs writes them.
	up := filepath.Join(l.Deployment(old.ID), "upper", "etc")
	must(t, os.MkdirAll(filepath.Join(up, "ssh"), 0o755))
	must(t, os.WriteFile(filepath.Join(up, "hostname"), []byte("my-host\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(up, "fstab"), []byte("# base fstab\n/dev/vdb /data ext4 defaults 0 2\n"), 0o644))
	must(t, unix.Mknod(filepath.Join(up, "motd"), unix.S_IFCHR, 0))
	must(t, os.WriteFile(filepath.Join(up, "added.conf"), []byte("local=1\n"), 0o600))
	// A permission-only change: overlayfs copies the file up (metacopy
	// off here), content unchanged.
	must(t, os.WriteFile(filepath.Join(up, "ssh", "sshd_config"), []byte(bigOld), 0o600))

	newTree := imageTree(t, objs, map[string]fileSpec{
		"hostname":        {content: "new-host\n", mode: 0o644},
		"fstab":           {content: "# base fstab\n", mode: 0o644},
		"motd":            {content: "hi\n", mode: 0o644},
		"ssh/sshd_config": {content: bigNew, mode: 0o644},
		"localtime":       {link: "/usr/share/zoneinfo/UTC"},
		"new-in-image":    {content: "v2\n", mode: 0o644},
	})
	newRes, err := deploy.Create(l, deploy.CreateOptions{Tree: newTree, Store: objs, Kernel: "6.12.0"})
	if err != nil {
		t.Fatal(err)
	}
	nd := newRes.Deployment
	must(t, WritePending(l, nd.ID, old))

	res, err := MergeDeployment(l, nd.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got := conflicts(res); got != "hostname:modify/modify:hostname.berth-new" {
		t.Fatalf("conflicts %q", got)
	}
	var cf Conflicts
	b, err := os.ReadFile(filepath.Join(l.Deployment(nd.ID), ConflictsFile))
	must(t, err)
	must(t, json.Unmarshal(b, &cf))
	if cf.From != old.ID || len(cf.Conflicts) != 1 || cf.Conflicts[0].Path != "/etc/hostname" || cf.Conflicts[0].Theirs != "/etc/hostname.berth-new" {
		t.Fatalf("conflicts.json: %s", b)
	}
	if p, err := ReadPending(l, nd.ID); p != nil || err != nil {
		t.Fatalf("pending after merge: %v %v", p, err)
	}
	if r, err := MergeDeployment(l, nd.ID); r != nil || err != nil {
		t.Fatalf("second MergeDeployment: %v %v", r, err)
	}
	upper := filepath.Join(l.Deployment(nd.ID), "upper")
	first, err := FromDir(upper)
	must(t, err)

	// A power cut before the pending record was removed: the merge runs
	// again over the partly (here: fully) written upper, with the same result.
	must(t, WritePending(l, nd.ID, old))
	if _, err := MergeDeployment(l, nd.ID); err != nil {
		t.Fatal(err)
	}
	second, err := FromDir(upper)
	must(t, err)
	if len(first) != len(second) {
		t.Fatalf("rerun changed the upper: %d vs %d entries", len(first), len(second))
	}
	for p, e := range first {
		if !same(e, second[p]) {
			t.Errorf("rerun changed %s: %s -> %s", p, e, second[p])
		}
	}

	// Mount the new deployment as berth-init would and read /etc.
	mnt := t.TempDir()
	work := filepath.Join(l.Deployment(nd.ID), "work")
	// The merge itself was checked above; this is what the booted system sees.
	testenv.RequireFeature(t, composefs.Mount(mnt, composefs.MountOptions{Image: l.Image(nd.ComposefsDigest), Objects: l.Objects(), Upper: upper, Work: work}),
		"composefs mount (EROFS, overlayfs)", composefs.ErrNoErofs, composefs.ErrNoOverlayFeature)
	defer composefs.Unmount(mnt)
	etc := filepath.Join(mnt, "etc")
	for p, want := range map[string]string{
		"hostname":           "my-host\n",
		"hostname.berth-new": "new-host\n",
		"fstab":              "# base fstab\n/dev/vdb /data ext4 defaults 0 2\n",
		"added.conf":         "local=1\n",
		"new-in-image":       "v2\n",
		"ssh/sshd_config":    bigNew,
	} {
		got, err := os.ReadFile(filepath.Join(etc, p))
		if err != nil || !bytes.Equal(got, []byte(want)) {
			t.Errorf("/etc/%s: %q, %v; want %q", p, got, err, want)
		}
	}
	if _, err := os.Lstat(filepath.Join(etc, "motd")); !os.IsNotExist(err) {
		t.Errorf("/etc/motd deleted locally is back: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(etc, "ssh", "sshd_config")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("/etc/ssh/sshd_config mode: %v, %v; want 0600 (ours) with the image's new content", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Join(etc, "added.conf")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("/etc/added.conf mode: %v, %v", fi, err)
	}
	if target, err := os.Readlink(filepath.Join(etc, "localtime")); err != nil || target != "/usr/share/zoneinfo/UTC" {
		t.Errorf("/etc/localtime -> %q, %v", target, err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
