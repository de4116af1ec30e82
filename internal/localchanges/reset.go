package localchanges

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

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/overlay"
	"github.com/berth-dev/berth/internal/store"
)

// ResetFile is the pending reset of a deployment, deploy/<id>/reset.json:
// the upper directory of the booted deployment must not change under its
// mounted overlay (overlayfs: undefined behaviour), so its reset is
// recorded and applied by berth-init at the next boot, before the overlay
// is mounted.
const ResetFile = "reset.json"

// trashDir receives the removed entries by rename before they are deleted,
// so a crash leaves every entry either in the upper directory or here.
const trashDir = ".reset-trash"

const resetVersion = 1

// sharedNames are the directories bound from berth/state over the image
// (store.SharedDirs): the upper directory's entries below them are hidden
// at run time, and reset leaves them alone.
func sharedNames() []string { return store.SharedNames() }

// PerDeployment are the paths below shared directories that stay with the
// deployment (store.PerDeployment).
var PerDeployment = store.PerDeployment

// SharedState reports whether rel (a path in the deployment without the
// leading "/") is below a shared directory and not kept per deployment:
// the upper directory's entries there are hidden under berth/state at run
// time, so they are no local change of the image. Ancestors of the
// per-deployment paths (var, var/lib) are not shared state themselves.
func SharedState(rel string) bool {
	for _, pd := range PerDeployment {
		if covers(pd, rel) || strings.HasPrefix(pd, rel+"/") {
			return false
		}
	}
	for _, s := range sharedNames() {
		if covers(s, rel) {
			return true
		}
	}
	return false
}

// PendingReset is the content of reset.json.
type PendingReset struct {
	Version   int       `json:"version"`
	All       bool      `json:"all"`             // every local change (except shared state)
	Paths     []string  `json:"paths,omitempty"` // absolute paths in the deployment
	Requested time.Time `json:"requested"`
}

// ResetOptions say what Reset resets.
type ResetOptions struct {
	// Paths are absolute paths in the deployment ("/etc/hostname"); each
	// loses its upper entry and everything below it. Exclusive with All.
	Paths []string
	// All resets every local change except those below the shared
	// directories (/var, /home, /root, /srv: they live in berth/state);
	// package databases that stay per deployment (/var/lib/dpkg, ...) are
	// reset too, so they keep matching the image's /usr.
	All bool
	// Booted is the id of the running deployment ("" when none, e.g. on a
	// --sysroot): its reset is only recorded, for the next boot.
	Booted string
	// Now is the clock for Requested (tests); nil means time.Now.
	Now func() time.Time
}

// ResetResult is what Reset did or recorded.
type ResetResult struct {
	Deployment string   `json:"deployment"`
	Pending    bool     `json:"pending"` // recorded in reset.json; applied at the next boot
	All        bool     `json:"all"`
	Paths      []string `json:"paths"` // the requested paths (all of them for a pending reset merged with an earlier one)
	// Changes are the local changes this request removes (for a pending
	// one: as they are now; changes made until the reboot are reset too).
	Changes []Change `json:"changes"`
	// Cancelled is set by a request that dropped a pending reset.
	Cancelled bool `json:"cancelled,omitempty"`
}

// Refusal is a reset request that is refused as asked (a path reset must
// not or cannot touch); the message says what to do instead.
type Refusal struct{ msg string }

func (r *Refusal) Error() string { return r.msg }

func refuse(format string, args ...any) error { return &Refusal{fmt.Sprintf(format, args...)} }

// IsRefusal reports whether err is (or wraps) a Refusal.
func IsRefusal(err error) bool {
	var r *Refusal
	var rc *redirectConflict
	return errors.As(err, &r) || errors.As(err, &rc)
}

// ErrMounted is wrapped when a deployment's overlay is mounted (other
// than as the booted root), so its upper directory cannot be changed.
var ErrMounted = errors.New("the deployment's overlay is mounted")

// NormalizePath cleans an absolute path in a deployment and refuses what
// reset must not touch. It returns the path without its leading "/".
func NormalizePath(p string) (string, error) {
	if p == "" || len(p) > 4096 || strings.ContainsRune(p, 0) {
		return "", refuse("invalid path %q", p)
	}
	if !strings.HasPrefix(p, "/") {
		return "", refuse("path %q is not absolute: give the path as the deployment sees it, e.g. /etc/hostname", p)
	}
	rel := strings.TrimPrefix(path.Clean(p), "/")
	if rel == "" {
		return "", refuse("path / is the whole deployment: reset without paths resets all local changes")
	}
	for _, s := range sharedNames() {
		if rel != s && !strings.HasPrefix(rel, s+"/") {
			continue
		}
		for _, pd := range PerDeployment {
			if rel == pd || strings.HasPrefix(rel, pd+"/") {
				return rel, nil
			}
		}
		return "", refuse("/%s is shared state (berth/state/%s, the same in every deployment), not a local change of the image; berth reset leaves it alone", rel, s)
	}
	return rel, nil
}

// Reset removes local changes of deployment id so that the image's
// version shows again. For the booted deployment it only records them in
// reset.json (merged with a reset recorded earlier): ApplyPendingReset
// does the work at the next boot.
func Reset(l store.Layout, id string, opts ResetOptions) (*ResetResult, error) {
	if opts.All == (len(opts.Paths) > 0) {
		return nil, refuse("reset: give paths, or all, not both or neither")
	}
	var rels []string
	for _, p := range opts.Paths {
		rel, err := NormalizePath(p)
		if err != nil {
			return nil, fmt.Errorf("reset: %w", err)
		}
		rels = append(rels, rel)
	}
	rels = dedupe(rels)
	d, err := deploy.Read(l, id)
	if err != nil {
		return nil, fmt.Errorf("reset: %w", err)
	}
	unlock, err := deploy.Lock(l)
	if err != nil {
		return nil, fmt.Errorf("reset %s: %w", id, err)
	}
	defer unlock()
	res := &ResetResult{Deployment: id, All: opts.All, Paths: absPaths(rels), Changes: []Change{}}
	root, err := imageRoot(l, d)
	if err != nil {
		return nil, fmt.Errorf("reset %s: %w", id, err)
	}
	upper := UpperDir(l, id)
	if id == opts.Booted {
		prev, err := ReadPendingReset(l, id)
		if err != nil {
			return nil, fmt.Errorf("reset %s: %w", id, err)
		}
		// Check the paths now, so a path that cannot be reset is refused
		// now and not at boot.
		targets, err := resetTargets(root, upper, opts.All, rels)
		if err != nil {
			return nil, fmt.Errorf("reset %s: %w", id, err)
		}
		pr := &PendingReset{Version: resetVersion, All: opts.All, Paths: res.Paths, Requested: now(opts.Now)}
		if prev != nil {
			pr.All = pr.All || prev.All
			pr.Paths = dedupe(append(prev.Paths, pr.Paths...))
		}
		if pr.All {
			pr.Paths = nil
		}
		b, _ := json.MarshalIndent(pr, "", "  ")
		if err := fsutil.WriteFileAtomic(filepath.Join(l.Deployment(id), ResetFile), append(b, '\n'), 0o644); err != nil {
			return nil, fmt.Errorf("reset %s: record the reset for the next boot: %w", id, err)
		}
		res.Pending, res.All, res.Paths = true, pr.All, pr.Paths
		if res.Paths == nil {
			res.Paths = []string{}
		}
		res.Changes = describe(root, upper, targets)
		return res, nil
	}
	if m := mountedAt(upper); m != "" {
		return nil, fmt.Errorf("reset %s: %w at %s (its upper directory must not change under it); unmount it first", id, ErrMounted, m)
	}
	targets, err := resetTargets(root, upper, opts.All, rels)
	if err != nil {
		return nil, fmt.Errorf("reset %s: %w", id, err)
	}
	res.Changes = describe(root, upper, targets)
	if err := removeTargets(l.Deployment(id), upper, targets); err != nil {
		return nil, fmt.Errorf("reset %s: %w", id, err)
	}
	return res, nil
}

// ApplyPendingReset applies the reset recorded for deployment id (nothing
// when there is none). berth-init calls it before it mounts the root
// overlay. It is idempotent and crash safe: reset.json is removed only
// after the entries left the upper directory, so an interrupted reset runs
// again at the next boot. A path that cannot be reset any more (a parent
// was deleted or replaced since the reset was recorded) is skipped; the
// others are reset, reset.json is removed, and the error names the
// skipped paths: the caller should warn and go on booting.
func ApplyPendingReset(l store.Layout, id string) error {
	pr, err := ReadPendingReset(l, id)
	if err != nil || pr == nil {
		return err
	}
	unlock, err := deploy.Lock(l)
	if err != nil {
		return fmt.Errorf("apply pending reset of %s: %w", id, err)
	}
	defer unlock()
	d, err := deploy.Read(l, id)
	if err != nil {
		return fmt.Errorf("apply pending reset: %w", err)
	}
	root, err := imageRoot(l, d)
	if err != nil {
		return fmt.Errorf("apply pending reset of %s: %w", id, err)
	}
	upper := UpperDir(l, id)
	var targets []string
	var skipped []string
	if pr.All {
		if targets, err = resetTargets(root, upper, true, nil); err != nil {
			return fmt.Errorf("apply pending reset of %s: %w", id, err)
		}
	} else {
		var rels []string
		for _, p := range pr.Paths {
			rel, err := NormalizePath(p)
			if err == nil {
				_, err = target(root, upper, rel)
			}
			if err != nil {
				skipped = append(skipped, err.Error())
				continue
			}
			rels = append(rels, rel)
		}
		// Together, as recorded (a renamed directory and its origin go
		// together); a path whose rename partner is not reset with it is
		// dropped and the rest tried again.
		for {
			targets, err = resetTargets(root, upper, false, rels)
			var rc *redirectConflict
			if !errors.As(err, &rc) {
				break
			}
			skipped = append(skipped, err.Error())
			var keep []string
			for _, r := range rels {
				if !covers(r, rc.from) {
					keep = append(keep, r)
				}
			}
			rels = keep
		}
		if err != nil {
			return fmt.Errorf("apply pending reset of %s: %w", id, err)
		}
	}
	if err := removeTargets(l.Deployment(id), upper, targets); err != nil {
		return fmt.Errorf("apply pending reset of %s: %w", id, err)
	}
	if err := removeFileSync(filepath.Join(l.Deployment(id), ResetFile)); err != nil {
		return fmt.Errorf("apply pending reset of %s: %w", id, err)
	}
	if len(skipped) > 0 {
		return fmt.Errorf("pending reset of %s: reset %d entries, skipped: %s", id, len(targets), strings.Join(skipped, "; "))
	}
	return nil
}

// ReadPendingReset returns the reset recorded for deployment id, or nil.
func ReadPendingReset(l store.Layout, id string) (*PendingReset, error) {
	p := filepath.Join(l.Deployment(id), ResetFile)
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pr PendingReset
	if err := json.Unmarshal(b, &pr); err != nil || pr.Version != resetVersion || (!pr.All && len(pr.Paths) == 0) {
		return nil, fmt.Errorf("%s is not a valid pending reset (remove it with berth reset --cancel)", p)
	}
	return &pr, nil
}

// CancelPendingReset drops the reset recorded for deployment id. It
// reports whether there was one.
func CancelPendingReset(l store.Layout, id string) (bool, error) {
	if _, _, err := deploy.ParseID(id); err != nil {
		return false, err
	}
	unlock, err := deploy.Lock(l)
	if err != nil {
		return false, err
	}
	defer unlock()
	p := filepath.Join(l.Deployment(id), ResetFile)
	if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return true, removeFileSync(p)
}

// resetTargets returns the upper entries (paths relative to upper) that
// resetting rels (or all) removes. A path whose parent in the upper
// directory is a whiteout, not a directory, opaque or redirected cannot be
// reset on its own: removing its entry would not bring the image's
// version back, so it is refused with the parent to reset instead.
func resetTargets(root *composefs.Inode, upper string, all bool, rels []string) ([]string, error) {
	if all {
		ents, err := os.ReadDir(upper)
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		var out []string
		for _, e := range ents {
			if !isShared(e.Name()) {
				out = append(out, e.Name())
			}
		}
		for _, pd := range PerDeployment {
			t, err := resetTargets(root, upper, false, []string{pd})
			if err != nil {
				continue // hidden below a changed parent: nothing of the image to bring back
			}
			out = append(out, t...)
		}
		return out, nil
	}
	var out []string
	for _, rel := range rels {
		t, err := target(root, upper, rel)
		if err != nil {
			return nil, err
		}
		if t != "" {
			out = append(out, t)
		}
	}
	// A path below another target goes with it.
	sort.Strings(out)
	var kept []string
	for _, t := range out {
		if len(kept) > 0 && covers(kept[len(kept)-1], t) {
			continue
		}
		kept = append(kept, t)
	}
	// An entry renamed in the overlay (redirect) takes its content from
	// the image path it came from, which the rename whited out. Bringing
	// that path back while the renamed entry stays would show one image
	// directory at two places, which overlayfs refuses (ESTALE).
	if len(kept) > 0 {
		reds, err := redirects(upper)
		if err != nil {
			return nil, err
		}
		for _, r := range reds {
			if coveredBy(kept, r.from) && !coveredBy(kept, r.at) {
				return nil, &redirectConflict{Refusal{fmt.Sprintf("/%s was renamed locally to /%s, which still takes its content from it; reset both (or /%s alone)", r.from, r.at, r.at)}, r.from}
			}
		}
	}
	return kept, nil
}

func covers(t, p string) bool { return p == t || strings.HasPrefix(p, t+"/") }

func coveredBy(ts []string, p string) bool {
	for _, t := range ts {
		if covers(t, p) {
			return true
		}
	}
	return false
}

type redirect struct{ at, from string }

// redirectConflict refuses to bring back the origin (from) of a renamed
// entry that stays.
type redirectConflict struct {
	Refusal
	from string
}

// redirects lists the upper entries that overlayfs redirected to another
// path of the image (renamed directories; with metacopy also files).
func redirects(upper string) ([]redirect, error) {
	var out []redirect
	err := walkUpper(upper, "", func(rel string, fi os.FileInfo) (bool, error) {
		v, _ := overlay.Xattr(filepath.Join(upper, rel), overlay.XattrRedirect)
		if v == "" {
			return false, nil
		}
		from := v
		if strings.HasPrefix(v, "/") {
			from = strings.TrimPrefix(path.Clean(v), "/")
		} else {
			// Relative: a name in the same parent directory.
			from = path.Join(path.Dir(rel), v)
		}
		out = append(out, redirect{at: rel, from: from})
		return false, nil
	})
	return out, err
}

func target(root *composefs.Inode, upper, rel string) (string, error) {
	inImage := root.Lookup(rel) != nil
	parts := strings.Split(rel, "/")
	for i := 1; i < len(parts); i++ {
		anc := strings.Join(parts[:i], "/")
		p := filepath.Join(upper, anc)
		fi, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			return "", nil // nothing changed at or below anc
		}
		if err != nil {
			return "", err
		}
		// Below these the image's entry cannot show again by removing
		// an upper entry (where the image has none, there is nothing to
		// bring back, and removing the entry is the reset).
		switch {
		case overlay.IsWhiteout(p, fi):
			if inImage {
				return "", refuse("/%s is deleted locally, and /%s with it; reset /%s instead", anc, rel, anc)
			}
			return "", nil
		case !fi.IsDir():
			if inImage {
				return "", refuse("/%s was replaced locally by a non-directory; reset /%s instead", anc, anc)
			}
			return "", nil
		case hasRedirect(p):
			// Its content below comes from another image path.
			return "", refuse("/%s was renamed or moved locally; reset /%s instead", anc, anc)
		case overlay.IsOpaque(p) && inImage:
			return "", refuse("/%s replaces the image's directory as a whole (opaque); reset /%s instead", anc, anc)
		}
	}
	if _, err := os.Lstat(filepath.Join(upper, rel)); errors.Is(err, os.ErrNotExist) {
		return "", nil
	} else if err != nil {
		return "", err
	}
	return rel, nil
}

func isShared(name string) bool {
	for _, s := range sharedNames() {
		if name == s {
			return true
		}
	}
	return false
}

// describe lists the changes the targets stand for.
func describe(root *composefs.Inode, upper string, targets []string) []Change {
	out := []Change{}
	add := func(rel string, fi os.FileInfo) (bool, error) {
		c, list, skip := classify(root, filepath.Join(upper, rel), rel, fi)
		if list {
			out = append(out, c)
		}
		return skip, nil
	}
	for _, t := range targets {
		fi, err := os.Lstat(filepath.Join(upper, t))
		if err != nil {
			continue
		}
		if skip, _ := add(t, fi); fi.IsDir() && !skip {
			walkUpper(upper, t, add)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}

// removeTargets moves the targets out of the upper directory into
// deployDir/.reset-trash (one rename each, so every entry is either still
// in place or gone as a whole), makes that durable, then deletes the trash.
func removeTargets(deployDir, upper string, targets []string) error {
	trash := filepath.Join(deployDir, trashDir)
	// A trash left by an interrupted reset holds only removed entries.
	if err := os.RemoveAll(trash); err != nil {
		return fmt.Errorf("remove the leftover %s: %w", trash, err)
	}
	if len(targets) == 0 {
		return fsutil.SyncDir(deployDir)
	}
	if err := os.Mkdir(trash, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", trash, err)
	}
	parents := map[string]bool{}
	for i, t := range targets {
		src := filepath.Join(upper, t)
		if err := os.Rename(src, filepath.Join(trash, fmt.Sprint(i))); err != nil {
			return fmt.Errorf("move %s out of the upper directory: %w", src, err)
		}
		parents[filepath.Dir(src)] = true
	}
	for p := range parents {
		if err := fsutil.SyncDir(p); err != nil {
			return err
		}
	}
	if err := fsutil.SyncDir(trash); err != nil {
		return err
	}
	if err := fsutil.SyncDir(deployDir); err != nil {
		return err
	}
	if err := os.RemoveAll(trash); err != nil {
		return fmt.Errorf("delete %s: %w", trash, err)
	}
	return fsutil.SyncDir(deployDir)
}

func removeFileSync(p string) error {
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return fsutil.SyncDir(filepath.Dir(p))
}

// mountedAt returns where an overlay with upperdir upper is mounted ("" =
// nowhere).
func mountedAt(upper string) string {
	ms, err := fsutil.Mounts()
	if err != nil {
		return ""
	}
	want := filepath.Clean(upper)
	if r, err := filepath.EvalSymlinks(want); err == nil {
		want = r
	}
	for _, m := range ms {
		if m.FSType != "overlay" {
			continue
		}
		for _, o := range strings.Split(m.SuperOptions, ",") {
			if v, ok := strings.CutPrefix(o, "upperdir="); ok && filepath.Clean(fsutil.UnescapeMountinfo(v)) == want {
				return m.Point
			}
		}
	}
	return ""
}

func dedupe(s []string) []string {
	sort.Strings(s)
	var out []string
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

func absPaths(rels []string) []string {
	out := []string{}
	for _, r := range rels {
		out = append(out, "/"+r)
	}
	return out
}

func now(f func() time.Time) time.Time {
	if f != nil {
		return f().UTC()
	}
	return time.Now().UTC()
}
