package etcmerge

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/store"
)

// Files of the first-boot preparation in a deployment directory.
const (
	// LocalAsideFile lists the local changes outside /etc that were not
	// carried over because the new image changed the same path.
	LocalAsideFile = "local-aside.json"
	// LocalAsideDir keeps those changes (with owner, mode and xattrs).
	LocalAsideDir = "local-aside"
	// PreMergeSuffix names a writable layer the deployment already had
	// when it was prepared (booted before by a berth-init that did not
	// merge): it is kept as <layer>.pre-merge, never deleted.
	PreMergeSuffix = ".pre-merge"

	prepTmp  = ".prepare-tmp"  // being built
	prepDone = ".prepare-done" // built and durable: being installed
	prepOld  = ".prepare-old-" // what an installed item replaced
)

// cutHook lets tests stop prepare after a step, as a power cut would.
var cutHook func(step string) error

func cut(step string) error {
	if cutHook != nil {
		return cutHook(step)
	}
	return nil
}

// Aside is one local change kept aside.
type Aside struct {
	Path string `json:"path"` // in the deployment, absolute ("/usr/bin/tool")
	// Kind: "modify/modify", "add/add", "modify/delete" (the image
	// removed it), "delete/modify" (we deleted it, the image changed it;
	// nothing to keep), "parent-changed" (the image removed or replaced
	// the directory it was in).
	Kind string `json:"kind"`
	// Kept is where the local version is, relative to the deployment
	// directory ("local-aside/usr/bin/tool"); "" for a local deletion.
	Kept string `json:"kept,omitempty"`
}

// LocalAside is the content of local-aside.json.
type LocalAside struct {
	Version  int       `json:"version"`
	From     string    `json:"from_deployment"`
	Prepared time.Time `json:"prepared"`
	// Carried counts the local changes outside /etc carried over.
	Carried int     `json:"carried"`
	Aside   []Aside `json:"aside"`
	// PreMerge lists layers kept as <layer>.pre-merge (relative to the
	// deployment directory).
	PreMerge []string `json:"pre_merge,omitempty"`
	// Note says why nothing was merged (the old deployment was removed).
	Note string `json:"note,omitempty"`
}

// Prepare does the first-boot work of deployment id, before its overlay
// is mounted (overlayfs must not see its upper layer change under it):
// when deploy/<id>/etc-merge.json is pending, the /etc 3-way merge with
// the deployment it was made from, and the carry-over of that
// deployment's other local changes. mode is how the deployment boots:
// the result always goes to its persistent layer (upper), and with
// readonly also to the /etc layer that mode uses (etc/upper).
//
// The result is built in deploy/<id>/.prepare-tmp, made durable and
// renamed to .prepare-done (the commit point), then moved into place
// item by item; the pending record is removed last. Running Prepare
// again after a power cut at any point finishes the same result:
// before the commit it is rebuilt from the old deployment (which is
// only read), after it the durable result is installed. Nothing
// pending: no-op.
func Prepare(l store.Layout, id string, mode cmdline.LocalMode) error {
	_, err := prepare(l, id, mode)
	return err
}

// prepare returns the /etc merge result when it built one in this run.
func prepare(l store.Layout, id string, mode cmdline.LocalMode) (*Result, error) {
	if _, _, err := deploy.ParseID(id); err != nil {
		// Not a name berth gives deployments, so no upgrade staged it.
		return nil, nil
	}
	dir := l.Deployment(id)
	p, err := ReadPending(l, id)
	if err != nil {
		return nil, err
	}
	if p == nil {
		// Done (or never pending): drop what an interrupted clean-up left.
		return nil, removeAll(filepath.Join(dir, prepTmp), filepath.Join(dir, prepDone))
	}
	done := filepath.Join(dir, prepDone)
	var res *Result
	if _, err := os.Lstat(done); errors.Is(err, os.ErrNotExist) {
		tmp := filepath.Join(dir, prepTmp)
		if err := os.RemoveAll(tmp); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", id, err)
		}
		if res, err = build(l, id, p, mode, tmp); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", id, err)
		}
		if err := fsutil.SyncFS(tmp); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", id, err)
		}
		if err := os.Rename(tmp, done); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", id, err)
		}
		if err := fsutil.SyncDir(dir); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", id, err)
		}
		if err := cut("built"); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, fmt.Errorf("prepare %s: %w", id, err)
	}
	if err := install(dir, done); err != nil {
		return nil, fmt.Errorf("prepare %s: install the result: %w", id, err)
	}
	if err := os.Remove(filepath.Join(dir, PendingFile)); err != nil {
		return nil, fmt.Errorf("prepare %s: %w", id, err)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return nil, fmt.Errorf("prepare %s: %w", id, err)
	}
	if err := cut("unpended"); err != nil {
		return nil, err
	}
	return res, removeAll(done)
}

func removeAll(paths ...string) error {
	for _, p := range paths {
		if err := os.RemoveAll(p); err != nil {
			return err
		}
	}
	return nil
}

// An item of the built result and where it goes in the deployment.
type item struct {
	src, dst string
	keepOld  bool // a writable layer: keep what it replaces unless empty
}

var items = []item{
	{LocalAsideDir, LocalAsideDir, false},
	{"etc-upper", "etc/upper", true},
	{"upper", "upper", true},
	{LocalAsideFile, LocalAsideFile, false},
	{ConflictsFile, ConflictsFile, false},
}

// install moves the built result's items into place. Each step is a
// rename checked against what is already there, so a rerun after a cut
// continues where the last run stopped.
func install(dir, done string) error {
	for _, it := range items {
		src, dst := filepath.Join(done, it.src), filepath.Join(dir, filepath.FromSlash(it.dst))
		old := filepath.Join(dir, prepOld+strings.ReplaceAll(it.src, "/", "-"))
		if exists(src) {
			if exists(dst) {
				if exists(old) {
					return fmt.Errorf("%s and %s both exist; move one away by hand", dst, old)
				}
				if err := os.Rename(dst, old); err != nil {
					return err
				}
				if err := cut("old:" + it.src); err != nil {
					return err
				}
			} else if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			if err := os.Rename(src, dst); err != nil {
				return err
			}
			if err := fsutil.SyncDir(filepath.Dir(dst)); err != nil {
				return err
			}
			if err := fsutil.SyncDir(dir); err != nil {
				return err
			}
			if err := cut("in:" + it.src); err != nil {
				return err
			}
		}
		if !exists(old) {
			continue
		}
		if it.keepOld && !emptyDir(old) {
			if err := os.Rename(old, freeName(dst+PreMergeSuffix)); err != nil {
				return err
			}
		} else if err := os.RemoveAll(old); err != nil {
			return err
		}
		if err := fsutil.SyncDir(dir); err != nil {
			return err
		}
		if err := cut("disposed:" + it.src); err != nil {
			return err
		}
	}
	return nil
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func emptyDir(p string) bool {
	f, err := os.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	return err != nil && len(names) == 0
}

// freeName returns p, or p.2, p.3 … : the first that does not exist.
func freeName(p string) string {
	for i := 2; exists(p); i++ {
		p = strings.TrimSuffix(p, fmt.Sprint(".", i-1)) + fmt.Sprint(".", i)
	}
	return p
}

// build writes the prepared deployment into tmp: upper/ (the new
// persistent layer), etc-upper/ (readonly mode's /etc layer),
// local-aside/, conflicts.json, local-aside.json.
func build(l store.Layout, id string, p *Pending, mode cmdline.LocalMode, tmp string) (*Result, error) {
	newDep, err := deploy.Read(l, id)
	if err != nil {
		return nil, err
	}
	aside := LocalAside{Version: 1, From: p.From, Prepared: time.Now().UTC(), Aside: []Aside{}}
	oldDep, err := deploy.Read(l, p.From)
	if err != nil && !exists(l.Deployment(p.From)) {
		// Removed before this deployment first booted: its local changes
		// are gone, so the new deployment starts from its image. Booting
		// must not depend on it.
		aside.Note = fmt.Sprintf("deployment %s was removed before this one first booted: no local changes were merged or carried", p.From)
		return &Result{Tree: Tree{}, From: map[string]Side{}}, writeReports(tmp, p.From, nil, aside)
	}
	if err != nil {
		return nil, fmt.Errorf("the deployment to merge from: %w", err)
	}
	if oldDep.ComposefsDigest != p.BaseImage {
		return nil, fmt.Errorf("%s now names image %s, not %s", p.From, oldDep.ComposefsDigest, p.BaseImage)
	}
	oldRoot, err := imageRoot(l, p.BaseImage)
	if err != nil {
		return nil, fmt.Errorf("old image: %w", err)
	}
	newRoot, err := imageRoot(l, newDep.ComposefsDigest)
	if err != nil {
		return nil, fmt.Errorf("new image: %w", err)
	}
	objects := l.Objects()
	fromDir := l.Deployment(p.From)

	// The old deployment's local changes, as its overlay showed them.
	ch := &Changes{Entries: map[string]*Entry{}, Replaced: map[string]bool{}}
	switch oldDep.LocalMode {
	case "", cmdline.LocalPersistent:
		if ch, err = ReadUpper(oldRoot, objects, filepath.Join(fromDir, "upper"), nil); err != nil {
			return nil, err
		}
	case cmdline.LocalReadonly:
		// Only /etc was writable, with its own layer.
		if etc := oldRoot.Lookup("etc"); etc != nil && etc.IsDir() {
			ec, err := ReadUpper(etc, objects, filepath.Join(fromDir, "etc", "upper"), nil)
			if err != nil {
				return nil, err
			}
			for k, e := range ec.Entries {
				ch.Entries["etc/"+k] = e
			}
			for k := range ec.Replaced {
				ch.Replaced[path.Join("etc", k)] = true
			}
		}
	case cmdline.LocalTransient:
		// Its changes died with each boot: nothing to carry.
	}

	upper := filepath.Join(tmp, "upper")
	if err := os.MkdirAll(upper, 0o755); err != nil {
		return nil, err
	}
	res, err := mergeEtc(oldRoot, newRoot, objects, ch, upper)
	if err != nil {
		return nil, err
	}
	if mode == cmdline.LocalReadonly {
		theirs, err := FromInode(etcDir(newRoot), objects)
		if err != nil {
			return nil, err
		}
		if err := Apply(res, theirs, filepath.Join(tmp, "etc-upper")); err != nil {
			return nil, err
		}
	}
	if err := carry(oldRoot, newRoot, objects, ch, upper, filepath.Join(tmp, LocalAsideDir), &aside); err != nil {
		return nil, err
	}
	dir := l.Deployment(id)
	for _, it := range items {
		if it.keepOld && exists(filepath.Join(tmp, it.src)) {
			if dst := filepath.Join(dir, filepath.FromSlash(it.dst)); exists(dst) && !emptyDir(dst) {
				rel, _ := filepath.Rel(dir, freeName(dst+PreMergeSuffix))
				aside.PreMerge = append(aside.PreMerge, filepath.ToSlash(rel))
			}
		}
	}

	return res, writeReports(tmp, p.From, res.Conflicts, aside)
}

// writeReports writes conflicts.json and local-aside.json into tmp.
func writeReports(tmp, from string, conflicts []Conflict, aside LocalAside) error {
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	conf := Conflicts{Version: 1, From: from, Merged: aside.Prepared, Conflicts: append([]Conflict{}, conflicts...)}
	for i := range conf.Conflicts {
		// Absolute paths, as `berth status` shows them.
		conf.Conflicts[i].Path = "/etc/" + conf.Conflicts[i].Path
		if conf.Conflicts[i].Theirs != "" {
			conf.Conflicts[i].Theirs = "/etc/" + conf.Conflicts[i].Theirs
		}
	}
	for name, v := range map[string]any{ConflictsFile: conf, LocalAsideFile: aside} {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(tmp, name), append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func imageRoot(l store.Layout, hex string) (*composefs.Inode, error) {
	im, err := composefs.OpenImage(l.Image(hex))
	if err != nil {
		return nil, err
	}
	return im.Tree()
}

func etcDir(root *composefs.Inode) *composefs.Inode {
	if n := root.Lookup("etc"); n != nil && n.IsDir() {
		return n
	}
	return nil
}

// mergeEtc does the /etc 3-way merge into upper/etc.
func mergeEtc(oldRoot, newRoot *composefs.Inode, objects string, ch *Changes, upper string) (*Result, error) {
	base, err := FromInode(etcDir(oldRoot), objects)
	if err != nil {
		return nil, fmt.Errorf("old /etc: %w", err)
	}
	theirsEtc := etcDir(newRoot)
	theirs, err := FromInode(theirsEtc, objects)
	if err != nil {
		return nil, fmt.Errorf("new /etc: %w", err)
	}
	ours := make(Tree, len(base))
	if e, ok := ch.Entries["etc"]; !ok || (e != nil && e.Type == Dir) {
		for p, e := range base {
			ours[p] = e
		}
	}
	for p, e := range ch.Entries {
		rel, ok := strings.CutPrefix(p, "etc/")
		if !ok {
			continue
		}
		if e == nil {
			delete(ours, rel)
		} else {
			ours[rel] = e
		}
	}
	res := Merge(base, ours, theirs)
	if theirsEtc == nil && len(res.Tree) == 0 {
		return res, nil // no /etc on either side
	}
	etc := filepath.Join(upper, "etc")
	if theirsEtc != nil {
		root, err := inodeEntry(theirsEtc, "")
		if err != nil {
			return nil, err
		}
		if err := writeEntry(etc, root); err != nil {
			return nil, err
		}
	}
	if err := Apply(res, theirs, etc); err != nil {
		return nil, err
	}
	return res, nil
}

// carry decides, for every path outside /etc that the old deployment's
// upper changed, whether the change goes into the new upper (the image
// did not change that path between the two images, or made the same
// change) or is kept aside (the image changed it too: the new image's
// version wins in place, the local one is kept under aside and listed).
func carry(oldRoot, newRoot *composefs.Inode, objects string, ch *Changes, upper, asideDir string, out *LocalAside) error {
	inEtc := func(p string) bool { return p == "etc" || strings.HasPrefix(p, "etc/") }
	touched := map[string]bool{}
	for p := range ch.Entries {
		if !inEtc(p) {
			touched[p] = true
		}
	}
	// Below a replaced path, what the new image has there matters too:
	// a deletion is carried only if the image changed nothing below it.
	for p := range ch.Replaced {
		if inEtc(p) {
			continue
		}
		if n := newRoot.Lookup(p); n != nil && n.IsDir() {
			composefs.WalkTree(n, func(q string, _ *composefs.Inode) error {
				if q != "/" {
					touched[strings.TrimPrefix(p+q, "/")] = true
				}
				return nil
			})
		}
	}
	for p := range touched {
		for d := path.Dir(p); d != "."; d = path.Dir(d) {
			touched[d] = true
		}
	}
	paths := make([]string, 0, len(touched))
	for p := range touched {
		if !validRel(p) {
			return fmt.Errorf("invalid path %q in the old upper", p)
		}
		paths = append(paths, p)
	}
	sort.Strings(paths)

	entry := func(root *composefs.Inode, p string) (*Entry, error) {
		n := root.Lookup(p)
		if n == nil {
			return nil, nil
		}
		return inodeEntry(n, objects)
	}
	const (
		fromImage = iota
		carried
		conflict
	)
	type decision struct {
		o, t *Entry
		how  int
		kind string
	}
	dec := make(map[string]*decision, len(paths))
	R, theirs := Tree{}, Tree{}
	for _, p := range paths {
		b, err := entry(oldRoot, p)
		if err != nil {
			return fmt.Errorf("/%s in the old image: %w", p, err)
		}
		t, err := entry(newRoot, p)
		if err != nil {
			return fmt.Errorf("/%s in the new image: %w", p, err)
		}
		o := ch.Ours(p, b)
		d := &decision{o: o, t: t}
		switch {
		case same(o, b) || same(o, t):
			d.how = fromImage
		case same(b, t):
			d.how = carried
		default:
			d.how = conflict
			switch {
			case b == nil:
				d.kind = "add/add"
			case o == nil:
				d.kind = "delete/modify"
			case t == nil:
				d.kind = "modify/delete"
			default:
				d.kind = "modify/modify"
			}
		}
		dec[p] = d
		if t != nil {
			theirs[p] = t
		}
		if d.how == carried {
			setTree(R, p, o)
		} else {
			setTree(R, p, t)
		}
	}
	// Every entry of the result needs its parents as directories.
	var ensure func(p string)
	ensure = func(p string) {
		a := path.Dir(p)
		if a == "." {
			return
		}
		if e := R[a]; e != nil && e.Type == Dir {
			return
		}
		d := dec[p]
		if d.how == carried {
			// The image removed or replaced the directory it was in.
			d.how, d.kind = conflict, "parent-changed"
			setTree(R, p, d.t)
			return
		}
		// The image has something below a directory we deleted or
		// replaced: keep the image's directory, our own version aside.
		// Our deletions of what the image left unchanged stay carried.
		da := dec[a]
		da.how, da.kind = conflict, "delete/modify"
		if da.o != nil {
			da.kind = "modify/modify"
		}
		setTree(R, a, da.t)
		ensure(a)
	}
	for _, p := range paths {
		if R[p] != nil {
			ensure(p)
		}
	}
	if err := Apply(&Result{Tree: R}, theirs, upper); err != nil {
		return err
	}
	for _, p := range paths {
		d := dec[p]
		switch d.how {
		case carried:
			out.Carried++
		case conflict:
			a := Aside{Path: "/" + p, Kind: d.kind}
			if d.o != nil {
				a.Kept = LocalAsideDir + "/" + p
				if err := keepAside(asideDir, p, d.o); err != nil {
					return fmt.Errorf("keep /%s aside: %w", p, err)
				}
			}
			out.Aside = append(out.Aside, a)
		}
	}
	return nil
}

func setTree(t Tree, p string, e *Entry) {
	if e == nil {
		delete(t, p)
	} else {
		t[p] = e
	}
}

// keepAside writes e at dir/p, creating missing parents as plain
// directories (an aside parent written earlier keeps its metadata).
func keepAside(dir, p string, e *Entry) error {
	dst := filepath.Join(dir, filepath.FromSlash(p))
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	return writeEntry(dst, e)
}

// AsidePaths lists the local changes of deployment id kept aside at its
// first boot (paths in the deployment; nil when there are none).
func AsidePaths(l store.Layout, id string) ([]string, error) {
	b, err := os.ReadFile(filepath.Join(l.Deployment(id), LocalAsideFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var la LocalAside
	if err := json.Unmarshal(b, &la); err != nil {
		return nil, fmt.Errorf("parse %s of %s: %w", LocalAsideFile, id, err)
	}
	var out []string
	for _, a := range la.Aside {
		out = append(out, a.Path)
	}
	return out, nil
}
