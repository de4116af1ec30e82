package etcmerge

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/overlay"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// rootTree builds an image root from full paths ("usr/bin/x"; a spec
// with mode 0 and no content is a directory).
func rootTree(t *testing.T, objs *composefs.Store, files map[string]fileSpec) *composefs.Inode {
	t.Helper()
	root := composefs.NewDir(0o755)
	batch := objs.NewBatch()
	for p, s := range files {
		parent := root
		parts := strings.Split(p, "/")
		for _, c := range parts[:len(parts)-1] {
			if parent.Children[c] == nil {
				parent.Children[c] = composefs.NewDir(0o755)
			}
			parent = parent.Children[c]
		}
		var n *composefs.Inode
		switch {
		case s.mode == 0 && s.content == "" && s.link == "":
			n = composefs.NewDir(0o755)
		case s.link != "":
			n = &composefs.Inode{Mode: composefs.SIFLNK | 0o777, Target: s.link}
		case len(s.content) <= 64:
			n = &composefs.Inode{Mode: composefs.SIFREG | s.mode, Inline: []byte(s.content), Size: uint64(len(s.content))}
		default:
			d, size, err := batch.AddReader(strings.NewReader(s.content))
			must(t, err)
			n = &composefs.Inode{Mode: composefs.SIFREG | s.mode, Digest: d, Payload: composefs.PayloadPath(d), Size: uint64(size)}
		}
		if old := parent.Children[parts[len(parts)-1]]; old != nil && old.IsDir() && n.IsDir() {
			continue
		}
		parent.Children[parts[len(parts)-1]] = n
	}
	must(t, batch.Commit())
	return root
}

// dumpPrepared renders what Prepare produced for deployment dir: every
// entry of upper/ and local-aside/ with type, mode, owner, content hash,
// link target and xattrs, and the conflict and aside lists.
func dumpPrepared(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	for _, sub := range []string{"upper", LocalAsideDir, "etc/upper"} {
		root := filepath.Join(dir, sub)
		if _, err := os.Lstat(root); errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(&b, "%s: absent\n", sub)
			continue
		}
		must(t, filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(dir, p)
			var st unix.Stat_t
			must(t, unix.Lstat(p, &st))
			fmt.Fprintf(&b, "%s %o %d:%d rdev=%d", rel, st.Mode, st.Uid, st.Gid, st.Rdev)
			switch st.Mode & unix.S_IFMT {
			case unix.S_IFREG:
				data, err := os.ReadFile(p)
				must(t, err)
				fmt.Fprintf(&b, " %x", sha256.Sum256(data))
			case unix.S_IFLNK:
				l, _ := os.Readlink(p)
				fmt.Fprintf(&b, " -> %s", l)
			}
			xs, err := readXattrs(p)
			must(t, err)
			keys := make([]string, 0, len(xs))
			for k := range xs {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				fmt.Fprintf(&b, " %s=%q", k, xs[k])
			}
			b.WriteString("\n")
			return nil
		}))
	}
	var cf Conflicts
	var la LocalAside
	readJSON(t, filepath.Join(dir, ConflictsFile), &cf)
	readJSON(t, filepath.Join(dir, LocalAsideFile), &la)
	fmt.Fprintf(&b, "conflicts %+v\naside %+v carried %d premerge %v\n", cf.Conflicts, la.Aside, la.Carried, la.PreMerge)
	return b.String()
}

func readJSON(t *testing.T, p string, v any) {
	t.Helper()
	b, err := os.ReadFile(p)
	must(t, err)
	must(t, json.Unmarshal(b, v))
}

func TestPrepareMergeAndCarry(t *testing.T) {
	testenv.RequireRoot(t, "mounts the composefs images and writes whiteouts and owners into upper directories")
	sysroot := t.TempDir()
	l := store.At(sysroot)
	must(t, l.Init())
	objs, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
	must(t, err)
	tool := strings.Repeat("#!/bin/sh\necho tool\n", 20)
	oldFiles := map[string]fileSpec{
		"etc/hostname":      {content: "old-host\n", mode: 0o644},
		"etc/fstab":         {content: "# base fstab\n", mode: 0o644},
		"etc/motd":          {content: "hi\n", mode: 0o644},
		"usr/bin/tool":      {content: tool, mode: 0o755},
		"usr/lib/changed":   {content: "lib v1\n", mode: 0o644},
		"usr/lib/keepdel":   {content: "delete me\n", mode: 0o644},
		"usr/local/bin":     {},
		"usr/share/doc/x":   {content: "doc\n", mode: 0o644},
		"opt/app/a":         {content: "a\n", mode: 0o644},
		"opt/app/b":         {content: "b\n", mode: 0o644},
		"usr/lib/link":      {link: "changed"},
		"usr/lib/unchanged": {content: "same\n", mode: 0o644},
		"usr/share/icons/a": {content: "icon a\n", mode: 0o644},
		"usr/share/icons/b": {content: "icon b\n", mode: 0o644},
	}
	newFiles := map[string]fileSpec{}
	for k, v := range oldFiles {
		newFiles[k] = v
	}
	newFiles["etc/hostname"] = fileSpec{content: "new-host\n", mode: 0o644}
	newFiles["etc/new-in-image"] = fileSpec{content: "v2\n", mode: 0o644}
	newFiles["usr/lib/changed"] = fileSpec{content: "lib v2\n", mode: 0o644}
	newFiles["opt/app/c"] = fileSpec{content: "c from the image\n", mode: 0o644}
	newFiles["opt/new"] = fileSpec{content: "the image's opt/new\n", mode: 0o644}

	oldRes, err := deploy.Create(l, deploy.CreateOptions{Tree: rootTree(t, objs, oldFiles), Store: objs, Kernel: "6.12.0"})
	must(t, err)
	old := oldRes.Deployment

	// Make A's local changes through its mounted overlay, so the upper
	// holds what overlayfs really writes (metacopy, redirects, whiteouts).
	mnt := t.TempDir()
	testenv.RequireFeature(t, composefs.Mount(mnt, composefs.MountOptions{Image: l.Image(old.ComposefsDigest), Objects: l.Objects(),
		Upper: filepath.Join(l.Deployment(old.ID), "upper"), Work: filepath.Join(l.Deployment(old.ID), "work")}),
		"composefs mount (EROFS, overlayfs)", composefs.ErrNoErofs, composefs.ErrNoOverlayFeature)
	m := func(p string) string { return filepath.Join(mnt, p) }
	must(t, os.WriteFile(m("etc/hostname"), []byte("my-host\n"), 0o644))
	must(t, os.WriteFile(m("etc/fstab"), []byte("# base fstab\n/dev/vdb /data ext4 defaults 0 2\n"), 0o644))
	must(t, os.WriteFile(m("etc/added.conf"), []byte("local=1\n"), 0o600))
	must(t, os.Remove(m("etc/motd")))
	must(t, os.WriteFile(m("usr/local/bin/hello"), []byte("#!/bin/sh\necho hello\n"), 0o755))
	must(t, os.Lchown(m("usr/local/bin/hello"), 1000, 1000))
	must(t, os.WriteFile(m("usr/lib/changed"), []byte("lib local\n"), 0o644))
	must(t, os.Chmod(m("usr/lib/changed"), 0o600))
	must(t, unix.Lsetxattr(m("usr/lib/changed"), "user.note", []byte("mine"), 0))
	must(t, os.Chmod(m("usr/bin/tool"), 0o700)) // metacopy: data stays in the image
	must(t, os.Remove(m("usr/lib/keepdel")))
	must(t, os.RemoveAll(m("opt/app"))) // the image adds opt/app/c
	must(t, os.Rename(m("usr/share/doc"), m("usr/share/doc2")))
	must(t, os.RemoveAll(m("usr/share/icons"))) // then recreated: an opaque directory
	must(t, os.Mkdir(m("usr/share/icons"), 0o755))
	must(t, os.WriteFile(m("usr/share/icons/mine"), []byte("my icon\n"), 0o644))
	must(t, os.Mkdir(m("opt/new"), 0o750)) // the image adds a file there
	must(t, os.WriteFile(m("opt/new/file"), []byte("in my dir\n"), 0o644))
	must(t, composefs.Unmount(mnt))
	for p, x := range map[string]string{"usr/bin/tool": "trusted.overlay.metacopy", "usr/share/doc2": "trusted.overlay.redirect", "usr/share/icons": "trusted.overlay.opaque"} {
		if _, ok := overlay.Xattr(filepath.Join(l.Deployment(old.ID), "upper", p), x); !ok {
			t.Logf("note: the upper's %s has no %s here; that case is not exercised", p, x)
		}
	}

	newRes, err := deploy.Create(l, deploy.CreateOptions{Tree: rootTree(t, objs, newFiles), Store: objs, Kernel: "6.12.0"})
	must(t, err)
	nd := newRes.Deployment
	dir := l.Deployment(nd.ID)
	stage := func() {
		// B as upgrade leaves it: an empty upper and the pending record.
		for _, p := range []string{"upper", "etc", LocalAsideDir, ConflictsFile, LocalAsideFile, prepTmp, prepDone} {
			must(t, os.RemoveAll(filepath.Join(dir, p)))
		}
		must(t, os.Mkdir(filepath.Join(dir, "upper"), 0o755))
		must(t, WritePending(l, nd.ID, old))
	}
	stage()
	must(t, Prepare(l, nd.ID, cmdline.LocalPersistent))
	want := dumpPrepared(t, dir)
	t.Logf("prepared:\n%s", want)
	if p, err := ReadPending(l, nd.ID); p != nil || err != nil {
		t.Fatalf("pending after prepare: %v %v", p, err)
	}
	for _, p := range []string{prepTmp, prepDone, prepOld + "upper", "upper" + PreMergeSuffix} {
		if exists(filepath.Join(dir, p)) {
			t.Errorf("%s left behind", p)
		}
	}

	var cf Conflicts
	readJSON(t, filepath.Join(dir, ConflictsFile), &cf)
	if len(cf.Conflicts) != 1 || cf.Conflicts[0] != (Conflict{Path: "/etc/hostname", Kind: "modify/modify", Theirs: "/etc/hostname.berth-new"}) {
		t.Errorf("conflicts.json: %+v", cf.Conflicts)
	}
	var la LocalAside
	readJSON(t, filepath.Join(dir, LocalAsideFile), &la)
	wantAside := []Aside{
		{Path: "/opt/app", Kind: "delete/modify"},
		{Path: "/opt/new", Kind: "add/add", Kept: "local-aside/opt/new"},
		{Path: "/opt/new/file", Kind: "parent-changed", Kept: "local-aside/opt/new/file"},
		{Path: "/usr/lib/changed", Kind: "modify/modify", Kept: "local-aside/usr/lib/changed"},
	}
	if fmt.Sprint(la.Aside) != fmt.Sprint(wantAside) || la.From != old.ID {
		t.Errorf("local-aside.json: %+v, want %+v", la, wantAside)
	}
	kept := filepath.Join(dir, "local-aside/usr/lib/changed")
	if got, err := os.ReadFile(kept); err != nil || string(got) != "lib local\n" {
		t.Errorf("kept local /usr/lib/changed: %q %v", got, err)
	}
	if fi, err := os.Lstat(kept); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("kept local /usr/lib/changed mode: %v %v", fi, err)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "local-aside/opt/new/file")); err != nil || string(got) != "in my dir\n" {
		t.Errorf("kept local /opt/new/file: %q %v", got, err)
	}
	if fi, err := os.Lstat(filepath.Join(dir, "local-aside/opt/new")); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o750 {
		t.Errorf("kept local /opt/new: %v %v", fi, err)
	}
	if v, ok := overlay.Xattr(kept, "user.note"); !ok || v != "mine" {
		t.Errorf("kept local /usr/lib/changed lost its xattr: %q %v", v, ok)
	}

	// Running it again with nothing pending changes nothing.
	must(t, Prepare(l, nd.ID, cmdline.LocalPersistent))
	if got := dumpPrepared(t, dir); got != want {
		t.Fatalf("second Prepare changed the result:\n%s\nwant\n%s", got, want)
	}

	// A power cut after every step: the rerun at the next boot ends
	// with the same result, and nothing is lost or left behind.
	var steps []string
	cutHook = func(step string) error { steps = append(steps, step); return nil }
	stage()
	must(t, Prepare(l, nd.ID, cmdline.LocalPersistent))
	cutHook = nil
	if len(steps) < 8 {
		t.Fatalf("only %d cut points: %v", len(steps), steps)
	}
	for _, at := range steps {
		stage()
		cutHook = func(step string) error {
			if step == at {
				return errors.New("power cut")
			}
			return nil
		}
		err := Prepare(l, nd.ID, cmdline.LocalPersistent)
		cutHook = nil
		if err == nil || !strings.Contains(err.Error(), "power cut") {
			t.Fatalf("cut at %s: %v", at, err)
		}
		must(t, Prepare(l, nd.ID, cmdline.LocalPersistent))
		if got := dumpPrepared(t, dir); got != want {
			t.Fatalf("after a cut at %s:\n%s\nwant\n%s", at, got, want)
		}
		for _, p := range []string{prepTmp, prepDone, prepOld + "upper", "upper" + PreMergeSuffix, PendingFile} {
			if exists(filepath.Join(dir, p)) {
				t.Errorf("cut at %s: %s left behind", at, p)
			}
		}
	}
	t.Logf("cut points checked: %v", steps)

	// Mount B with its prepared upper, as berth-init does next.
	must(t, composefs.Mount(mnt, composefs.MountOptions{Image: l.Image(nd.ComposefsDigest), Objects: l.Objects(),
		Upper: filepath.Join(dir, "upper"), Work: filepath.Join(dir, "work")}))
	defer composefs.Unmount(mnt)
	for p, w := range map[string]string{
		"etc/hostname":           "my-host\n",
		"etc/hostname.berth-new": "new-host\n",
		"etc/fstab":              "# base fstab\n/dev/vdb /data ext4 defaults 0 2\n",
		"etc/added.conf":         "local=1\n",
		"etc/new-in-image":       "v2\n",
		"usr/local/bin/hello":    "#!/bin/sh\necho hello\n",
		"usr/bin/tool":           tool,
		"usr/lib/changed":        "lib v2\n",
		"usr/lib/unchanged":      "same\n",
		"usr/share/doc2/x":       "doc\n",
		"opt/app/c":              "c from the image\n",
		"usr/share/icons/mine":   "my icon\n",
		"opt/new":                "the image's opt/new\n",
	} {
		if got, err := os.ReadFile(m(p)); err != nil || string(got) != w {
			t.Errorf("/%s: %q, %v; want %q", p, got, err, w)
		}
	}
	for _, p := range []string{"etc/motd", "usr/lib/keepdel", "usr/share/doc", "opt/app/a", "opt/app/b", "usr/share/icons/a", "usr/share/icons/b"} {
		if _, err := os.Lstat(m(p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("/%s deleted locally is there: %v", p, err)
		}
	}
	if fi, err := os.Stat(m("usr/bin/tool")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("/usr/bin/tool: %v %v, want the local mode 0700", fi, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(m("usr/local/bin/hello"), &st); err != nil || st.Uid != 1000 || st.Mode&0o777 != 0o755 {
		t.Errorf("/usr/local/bin/hello: %+v %v", st, err)
	}
	if got, err := os.ReadFile(m("usr/lib/changed")); err == nil && string(got) == "lib local\n" {
		t.Error("the local /usr/lib/changed won over the image's")
	}
	if got, _ := os.Readlink(m("usr/lib/link")); got != "changed" {
		t.Errorf("/usr/lib/link -> %q", got)
	}
	must(t, composefs.Unmount(mnt))

	// readonly boots: the merged /etc also goes to etc/upper.
	stage()
	must(t, Prepare(l, nd.ID, cmdline.LocalReadonly))
	if got, err := os.ReadFile(filepath.Join(dir, "etc/upper/hostname")); err != nil || string(got) != "my-host\n" {
		t.Errorf("readonly: etc/upper/hostname %q %v", got, err)
	}

	// A layer the deployment already had is kept, not overwritten.
	stage()
	must(t, os.WriteFile(filepath.Join(dir, "upper", "own"), []byte("own change\n"), 0o644))
	must(t, Prepare(l, nd.ID, cmdline.LocalPersistent))
	if got, err := os.ReadFile(filepath.Join(dir, "upper"+PreMergeSuffix, "own")); err != nil || string(got) != "own change\n" {
		t.Errorf("own change of the new deployment: %q %v", got, err)
	}
	readJSON(t, filepath.Join(dir, LocalAsideFile), &la)
	if fmt.Sprint(la.PreMerge) != "[upper.pre-merge]" {
		t.Errorf("pre_merge %v", la.PreMerge)
	}

	// The old deployment was removed before the new one booted: the new
	// one boots from its image, and says why nothing was merged.
	stage()
	gone := &deploy.Deployment{ID: "99-0123456789ab", ComposefsDigest: old.ComposefsDigest}
	must(t, WritePending(l, nd.ID, gone))
	must(t, Prepare(l, nd.ID, cmdline.LocalPersistent))
	readJSON(t, filepath.Join(dir, LocalAsideFile), &la)
	if !strings.Contains(la.Note, "removed") || len(la.Aside) != 0 || !emptyDir(filepath.Join(dir, "upper")) || exists(filepath.Join(dir, PendingFile)) {
		t.Errorf("merge from a removed deployment: %+v", la)
	}
}
