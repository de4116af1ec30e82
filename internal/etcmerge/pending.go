package etcmerge

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/store"
)

// Files in a deployment directory.
const (
	// PendingFile says the deployment's /etc still has to be merged with
	// the deployment it was made from (written at upgrade time).
	PendingFile = "etc-merge.json"
	// ConflictsFile lists the merge's conflicts (read by `berth status`).
	ConflictsFile = "conflicts.json"
)

// Pending is the content of etc-merge.json.
type Pending struct {
	Version int `json:"version"`
	// From is the deployment whose /etc (image + local changes) is "ours".
	From string `json:"from_deployment"`
	// BaseImage is From's composefs digest: its image's /etc is the base.
	BaseImage string    `json:"base_image"`
	Created   time.Time `json:"created"`
}

// Conflicts is the content of conflicts.json.
type Conflicts struct {
	Version   int        `json:"version"`
	From      string     `json:"from_deployment"`
	Merged    time.Time  `json:"merged"`
	Conflicts []Conflict `json:"conflicts"` // paths relative to /etc
}

// WritePending records that deployment id's /etc is to be merged from
// deployment from at its first boot.
func WritePending(l store.Layout, id string, from *deploy.Deployment) error {
	b, err := json.MarshalIndent(Pending{Version: 1, From: from.ID, BaseImage: from.ComposefsDigest, Created: time.Now().UTC()}, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(l.Deployment(id), PendingFile), append(b, '\n'), 0o644)
}

// ReadPending returns deployment id's pending merge, or nil when there is none.
func ReadPending(l store.Layout, id string) (*Pending, error) {
	b, err := os.ReadFile(filepath.Join(l.Deployment(id), PendingFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var p Pending
	if err := json.Unmarshal(b, &p); err != nil || p.Version != 1 {
		return nil, fmt.Errorf("etc merge of %s: bad %s: %v", id, PendingFile, err)
	}
	if _, _, err := deploy.ParseID(p.From); err != nil {
		return nil, fmt.Errorf("etc merge of %s: %w", id, err)
	}
	return &p, nil
}

// imageEtc loads the /etc tree of the composefs image with digest hex.
func imageEtc(l store.Layout, hex string) (Tree, *composefs.Inode, error) {
	im, err := composefs.OpenImage(l.Image(hex))
	if err != nil {
		return nil, nil, err
	}
	root, err := im.Tree()
	if err != nil {
		return nil, nil, err
	}
	etc := root.Lookup("etc")
	t, err := FromInode(etc, l.Objects())
	return t, etc, err
}

// MergeDeployment does deployment id's pending /etc merge, if any: base
// is the old image's /etc, ours is that plus the old deployment's local
// changes below upper/etc (persistent mode), theirs is the new image's
// /etc. The result goes to the new deployment's upper/etc, conflicts to
// its conflicts.json; the pending record is removed last. Running it
// again after a crash redoes the same merge (the old deployment's
// files are only read), so it is idempotent. It returns nil, nil when
// nothing is pending.
func MergeDeployment(l store.Layout, id string) (*Result, error) {
	p, err := ReadPending(l, id)
	if err != nil || p == nil {
		return nil, err
	}
	newDep, err := deploy.Read(l, id)
	if err != nil {
		return nil, fmt.Errorf("etc merge of %s: %w", id, err)
	}
	oldDep, err := deploy.Read(l, p.From)
	if err != nil {
		return nil, fmt.Errorf("etc merge of %s: the deployment to merge from: %w", id, err)
	}
	if oldDep.ComposefsDigest != p.BaseImage {
		return nil, fmt.Errorf("etc merge of %s: %s now names image %s, not %s", id, p.From, oldDep.ComposefsDigest, p.BaseImage)
	}
	base, _, err := imageEtc(l, p.BaseImage)
	if err != nil {
		return nil, fmt.Errorf("etc merge of %s: base: %w", id, err)
	}
	ours := base
	if oldDep.LocalMode == "" || oldDep.LocalMode == cmdline.LocalPersistent {
		if ours, err = ApplyUpper(base, filepath.Join(l.Deployment(p.From), "upper", "etc")); err != nil {
			return nil, fmt.Errorf("etc merge of %s: ours: %w", id, err)
		}
	}
	theirs, theirsEtc, err := imageEtc(l, newDep.ComposefsDigest)
	if err != nil {
		return nil, fmt.Errorf("etc merge of %s: theirs: %w", id, err)
	}
	res := Merge(base, ours, theirs)

	upper := filepath.Join(l.Deployment(id), "upper")
	etc := filepath.Join(upper, "etc")
	if _, err := os.Lstat(etc); errors.Is(err, os.ErrNotExist) && theirsEtc != nil {
		root, _ := inodeEntry(theirsEtc, "")
		if err := writeEntry(etc, root); err != nil {
			return nil, fmt.Errorf("etc merge of %s: %w", id, err)
		}
	}
	if err := Apply(res, theirs, etc); err != nil {
		return nil, fmt.Errorf("etc merge of %s: %w", id, err)
	}
	if err := SyncFS(upper); err != nil {
		return nil, fmt.Errorf("etc merge of %s: %w", id, err)
	}
	conf := Conflicts{Version: 1, From: p.From, Merged: time.Now().UTC(), Conflicts: append([]Conflict{}, res.Conflicts...)}
	for i := range conf.Conflicts {
		// Report absolute paths, as `berth status` shows them.
		conf.Conflicts[i].Path = "/etc/" + conf.Conflicts[i].Path
		if conf.Conflicts[i].Theirs != "" {
			conf.Conflicts[i].Theirs = "/etc/" + conf.Conflicts[i].Theirs
		}
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(l.Deployment(id), ConflictsFile), append(b, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("etc merge of %s: %w", id, err)
	}
	if err := os.Remove(filepath.Join(l.Deployment(id), PendingFile)); err != nil {
		return nil, fmt.Errorf("etc merge of %s: %w", id, err)
	}
	if err := fsutil.SyncDir(l.Deployment(id)); err != nil {
		return nil, err
	}
	return res, nil
}
