package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/etcmerge"
	"github.com/berth-dev/berth/internal/health"
	"github.com/berth-dev/berth/internal/store"
)

// The JSON of `berth status --json` and GetStatus keeps the shape of
// bootc's BootcHost (apiVersion/kind/metadata/spec/status with booted,
// staged and rollback entries whose image.image.image is the image ref),
// so tools that read `bootc status --json` can read berth's. berth's own
// facts live under "berth" keys. docs/status.schema.json describes it.
const (
	StatusAPIVersion = "org.containers.bootc/v1"
	StatusKind       = "BootcHost"
)

// Host is the status document.
type Host struct {
	APIVersion string       `json:"apiVersion"`
	Kind       string       `json:"kind"`
	Metadata   HostMetadata `json:"metadata"`
	Spec       HostSpec     `json:"spec"`
	Status     HostStatus   `json:"status"`
}

// HostMetadata is bootc's object metadata.
type HostMetadata struct {
	Name string `json:"name"`
}

// HostSpec is what the host is meant to run.
type HostSpec struct {
	Image     *ImageReference `json:"image"`
	BootOrder string          `json:"bootOrder"` // "default" or "rollback"
}

// ImageReference names an image the way bootc does.
type ImageReference struct {
	Image     string `json:"image"`     // the reference without transport
	Transport string `json:"transport"` // registry, oci, oci-archive, containers-storage, docker-archive
}

// HostStatus holds the deployments the boot loader knows about.
type HostStatus struct {
	Staged         *BootEntry  `json:"staged"`
	Booted         *BootEntry  `json:"booted"`
	Rollback       *BootEntry  `json:"rollback"`
	RollbackQueued bool        `json:"rollbackQueued"`
	Type           string      `json:"type"` // "bootcHost" when booted by berth, else null in bootc; we say "berthHost"
	Berth          BerthStatus `json:"berth"`
}

// BootEntry is one deployment in bootc's shape.
type BootEntry struct {
	Image        *ImageStatus `json:"image"`
	CachedUpdate *ImageStatus `json:"cachedUpdate"`
	Incompatible bool         `json:"incompatible"`
	Pinned       bool         `json:"pinned"`
	Store        string       `json:"store"`
	Berth        *Deployment  `json:"berth"`
}

// ImageStatus is bootc's description of the image of a deployment.
type ImageStatus struct {
	Image       ImageReference `json:"image"`
	Version     string         `json:"version,omitempty"`
	Timestamp   *time.Time     `json:"timestamp"`
	ImageDigest string         `json:"imageDigest"`
}

// Deployment is berth's view of one deployment.
type Deployment struct {
	ID              string         `json:"id"`
	ImageRef        string         `json:"imageRef"`
	ManifestDigest  string         `json:"manifestDigest"`
	ComposefsDigest string         `json:"composefsDigest"`
	Kernel          string         `json:"kernel"`
	Origin          string         `json:"origin"`
	State           string         `json:"state"`
	Created         time.Time      `json:"created"`
	Pinned          bool           `json:"pinned"`
	LocalMode       string         `json:"localMode"`
	BootEntry       *BootEntryInfo `json:"bootEntry"`
	Conflicts       []string       `json:"conflicts"`
	// LocalAside lists local changes outside /etc not carried over at
	// the first boot (the image changed the same path): kept in
	// deploy/<id>/local-aside/.
	LocalAside []string `json:"localAside,omitempty"`
}

// BootEntryInfo is what the ESP says about a deployment's entry.
type BootEntryInfo struct {
	Type      string `json:"type"`  // uki or bls
	State     string `json:"state"` // good, bad, indeterminate
	TriesLeft int    `json:"triesLeft"`
	TriesDone int    `json:"triesDone"`
	Default   bool   `json:"default"`
}

// BerthStatus is what bootc has no field for.
type BerthStatus struct {
	Sysroot     string        `json:"sysroot"`
	ESP         string        `json:"esp"` // "" when no ESP was found
	Deployments []*Deployment `json:"deployments"`
	ActiveJob   *JobInfo      `json:"activeJob"`
	LastJob     *JobRecord    `json:"lastJob"`
	Notes       []string      `json:"notes"`
}

// JobInfo describes a running job.
type JobInfo struct {
	Path  string `json:"path"`
	Kind  string `json:"kind"`
	State string `json:"state"`
	Phase string `json:"phase"`
	Done  uint64 `json:"done"`
	Total uint64 `json:"total"`
}

// StatusOptions say where ReadStatus looks.
type StatusOptions struct {
	Sysroot string // "/" on a running system
	ESP     string // "" = look for it (efi, boot/efi, boot below the sysroot)
}

// ReadStatus reads the status of the berth installation below
// opts.Sysroot straight from the disk (deployments, boot entries, the job
// record), without berthd.
func ReadStatus(opts StatusOptions) (*Host, error) {
	sysroot := opts.Sysroot
	if sysroot == "" {
		sysroot = "/"
	}
	l := store.At(sysroot)
	if fi, err := os.Stat(l.Root); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("status: no berth installation at %s", l.Root)
	}
	deps, err := deploy.List(l)
	if err != nil {
		return nil, fmt.Errorf("status: %w", err)
	}
	h := &Host{
		APIVersion: StatusAPIVersion,
		Kind:       StatusKind,
		Metadata:   HostMetadata{Name: "host"},
		Spec:       HostSpec{BootOrder: "default"},
		Status:     HostStatus{Type: "berthHost", Berth: BerthStatus{Sysroot: sysroot, Deployments: []*Deployment{}, Notes: []string{}}},
	}
	byID := map[string]*Deployment{}
	for _, d := range deps {
		bd := fromDeploy(l, d)
		byID[d.ID] = bd
		h.Status.Berth.Deployments = append(h.Status.Berth.Deployments, bd)
	}

	espDir := opts.ESP
	if espDir == "" {
		espDir = boot.FoundESP(sysroot)
	}
	h.Status.Berth.ESP = espDir
	var entries []boot.Entry
	var def *boot.Entry
	if espDir != "" {
		esp := boot.ESP{Dir: espDir}
		if entries, err = esp.Entries(); err != nil {
			return nil, fmt.Errorf("status: boot entries: %w", err)
		}
		if def, err = esp.Default(); err != nil {
			return nil, fmt.Errorf("status: default boot entry: %w", err)
		}
		for _, en := range entries {
			bd := byID[en.ID]
			if bd == nil {
				h.Status.Berth.Notes = append(h.Status.Berth.Notes, fmt.Sprintf("boot entry %s has no deployment", en.Path))
				continue
			}
			bd.BootEntry = &BootEntryInfo{Type: en.Type, State: en.State, TriesLeft: en.TriesLeft, TriesDone: en.TriesDone, Default: def != nil && def.ID == en.ID}
		}
	}

	booted, staged, rollback := Roles(deploy.BootedID(sysroot), deps, entries, def)
	if r := h.Status.Berth.Deployments; booted != "" && byID[booted] == nil {
		h.Status.Berth.Notes = append(h.Status.Berth.Notes, fmt.Sprintf("booted deployment %s is missing from %s (%d deployments)", booted, l.Deployments(), len(r)))
	}
	h.Status.Booted = bootEntry(byID[booted])
	h.Status.Staged = bootEntry(byID[staged])
	h.Status.Rollback = bootEntry(byID[rollback])
	if def != nil && booted != "" && def.ID != booted && def.ID == rollback {
		h.Status.RollbackQueued = true
		h.Spec.BootOrder = "rollback"
	}
	for _, en := range entries {
		if en.State == "bad" {
			note := fmt.Sprintf("deployment %s failed to boot %d times and was abandoned by the boot loader", en.ID, en.TriesDone)
			if r, err := health.ReadResult(l, en.ID); err == nil && !r.OK {
				note += fmt.Sprintf(" (last health check, %s: %s)", r.Time.Local().Format(time.DateTime), r.Summary)
			}
			h.Status.Berth.Notes = append(h.Status.Berth.Notes, note)
		}
	}
	if cur := firstNonNil(h.Status.Booted, h.Status.Staged); cur != nil && cur.Image != nil {
		ref := cur.Image.Image
		h.Spec.Image = &ref
	}
	if rec, err := ReadLastJob(sysroot); err == nil {
		h.Status.Berth.LastJob = rec
	} else if !errors.Is(err, os.ErrNotExist) {
		h.Status.Berth.Notes = append(h.Status.Berth.Notes, err.Error())
	}
	return h, nil
}

func firstNonNil(es ...*BootEntry) *BootEntry {
	for _, e := range es {
		if e != nil {
			return e
		}
	}
	return nil
}

// Roles decides which deployment is booted, staged (the next boot, when
// it is not the booted one) and the rollback (where `berth rollback`
// goes). With boot entries the boot loader's order decides; without them
// (an ESP that is not mounted) the serials do.
func Roles(booted string, deps []*deploy.Deployment, entries []boot.Entry, def *boot.Entry) (bootedID, staged, rollback string) {
	have := map[string]*deploy.Deployment{}
	for _, d := range deps {
		have[d.ID] = d
	}
	if len(entries) > 0 {
		if def != nil && def.ID != booted && have[def.ID] != nil {
			staged = def.ID
		}
		for _, en := range entries {
			if en.ID == booted || en.ID == staged || en.Name.Bad() || have[en.ID] == nil {
				continue
			}
			rollback = en.ID
			break
		}
		return booted, staged, rollback
	}
	var bootedSerial uint64
	if d := have[booted]; d != nil {
		bootedSerial = d.Serial()
	}
	// deps is sorted oldest first.
	for i := len(deps) - 1; i >= 0; i-- {
		d := deps[i]
		switch {
		case d.ID == booted:
		case staged == "" && d.Serial() > bootedSerial && d.State == deploy.StateStaged:
			staged = d.ID
		case rollback == "" && d.State != deploy.StateFailed && (booted == "" || d.Serial() < bootedSerial):
			if booted == "" && staged == "" {
				// Not running berth: the newest one is the next boot.
				staged = d.ID
				continue
			}
			rollback = d.ID
		}
	}
	return booted, staged, rollback
}

func fromDeploy(l store.Layout, d *deploy.Deployment) *Deployment {
	out := &Deployment{
		ID: d.ID, ImageRef: d.ImageRef, ManifestDigest: d.ManifestDigest, ComposefsDigest: d.ComposefsDigest,
		Kernel: d.Kernel, Origin: d.Origin, State: d.State, Created: d.Created, Pinned: d.Pinned,
		LocalMode: string(d.LocalMode), Conflicts: []string{},
	}
	if c, err := ReadConflicts(filepath.Join(l.Deployment(d.ID), etcmerge.ConflictsFile)); err == nil {
		out.Conflicts = c
	}
	if a, err := etcmerge.AsidePaths(l, d.ID); err == nil {
		out.LocalAside = a
	}
	return out
}

// ReadConflicts reads the paths listed in a conflicts.json: a JSON object
// with a "conflicts" array of objects that have a "path".
func ReadConflicts(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var doc struct {
		Conflicts []struct {
			Path string `json:"path"`
		} `json:"conflicts"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	out := []string{}
	for _, c := range doc.Conflicts {
		out = append(out, c.Path)
	}
	return out, nil
}

func bootEntry(d *Deployment) *BootEntry {
	if d == nil {
		return nil
	}
	e := &BootEntry{Pinned: d.Pinned, Store: "berthComposefs", Berth: d}
	if d.ImageRef != "" {
		ref := SplitRef(d.ImageRef)
		is := &ImageStatus{Image: ref, ImageDigest: d.ManifestDigest}
		if !d.Created.IsZero() {
			t := d.Created
			is.Timestamp = &t
		}
		e.Image = is
	}
	return e
}

// SplitRef turns a berth image ref ("docker://x", "oci-archive:/p", "x")
// into bootc's image + transport pair.
func SplitRef(ref string) ImageReference {
	for _, t := range []struct{ prefix, name string }{
		{"docker://", "registry"},
		{"oci-archive:", "oci-archive"},
		{"oci:", "oci"},
		{"docker-archive:", "docker-archive"},
		{"containers-storage:", "containers-storage"},
	} {
		if strings.HasPrefix(ref, t.prefix) {
			return ImageReference{Image: strings.TrimPrefix(ref, t.prefix), Transport: t.name}
		}
	}
	return ImageReference{Image: ref, Transport: "registry"}
}
