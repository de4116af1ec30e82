package etcmerge

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/berth-dev/berth/internal/cmdline"
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
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("etc merge of %s: bad %s: %w", id, PendingFile, err)
	}
	if p.Version != 1 {
		return nil, fmt.Errorf("etc merge of %s: %s has version %d, this berth reads version 1", id, PendingFile, p.Version)
	}
	if _, _, err := deploy.ParseID(p.From); err != nil {
		return nil, fmt.Errorf("etc merge of %s: %w", id, err)
	}
	return &p, nil
}

// MergeDeployment is Prepare for a deployment booted in persistent
// mode; it returns the /etc merge result when it built one in this call
// (nil, nil when nothing was pending, or when it only finished
// installing a result built before a power cut).
func MergeDeployment(l store.Layout, id string) (*Result, error) {
	return prepare(l, id, cmdline.LocalPersistent)
}
