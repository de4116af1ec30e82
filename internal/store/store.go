// Package store knows the on-disk layout of berth's repository (DESIGN §3):
//
//	<sysroot>/berth/repo/objects/XX/<rest>   file contents by fs-verity digest
//	<sysroot>/berth/repo/images/<digest>     composefs images
//	<sysroot>/berth/repo/oci/                manifests, configs, layer indexes
//	<sysroot>/berth/deploy/<id>/             deployments
//	<sysroot>/berth/state/                   shared state (var, home, ...)
//	<sysroot>/berth/boot/                    cached initramfs images
package store

import (
	"fmt"
	"path/filepath"

	"github.com/berth-dev/berth/internal/fsutil"
)

// LayoutVersion is the version of this layout (docs/on-disk-format.md).
// It is not recorded on disk yet: the first incompatible change records
// it, and a berth that finds no record knows it is layout 1.
const LayoutVersion = 1

// Layout holds the paths of one berth installation below a sysroot.
type Layout struct {
	Sysroot string // "/" on a running system
	Root    string // <sysroot>/berth
}

// At returns the layout below sysroot. It touches no disk.
func At(sysroot string) Layout {
	if sysroot == "" {
		sysroot = "/"
	}
	return Layout{Sysroot: sysroot, Root: filepath.Join(sysroot, "berth")}
}

func (l Layout) Repo() string        { return filepath.Join(l.Root, "repo") }
func (l Layout) Objects() string     { return filepath.Join(l.Root, "repo", "objects") }
func (l Layout) Images() string      { return filepath.Join(l.Root, "repo", "images") }
func (l Layout) OCI() string         { return filepath.Join(l.Root, "repo", "oci") }
func (l Layout) Deployments() string { return filepath.Join(l.Root, "deploy") }
func (l Layout) State() string       { return filepath.Join(l.Root, "state") }
func (l Layout) Boot() string        { return filepath.Join(l.Root, "boot") }

// Image returns the path of the composefs image with the given hex digest.
func (l Layout) Image(hexDigest string) string { return filepath.Join(l.Images(), hexDigest) }

// Deployment returns the directory of deployment id.
func (l Layout) Deployment(id string) string { return filepath.Join(l.Deployments(), id) }

// Init creates the repository directories (idempotent, crash-safe).
func (l Layout) Init() error {
	for _, d := range []string{l.Objects(), l.Images(), l.OCI(), l.Deployments(), l.State(), l.Boot()} {
		if err := fsutil.MkdirAllSync(d, 0o755); err != nil {
			return fmt.Errorf("init berth repository at %s: %w", l.Root, err)
		}
	}
	return nil
}
