package deploy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/store"
)

// CreateOptions describe a new deployment.
type CreateOptions struct {
	// Tree is the image's file tree (oci.LoadTree); berth's runtime is
	// added to it, so it is modified.
	Tree *composefs.Inode
	// Store is the object store of the layout (repo/objects); the tree's
	// external files must be in it.
	Store *composefs.Store
	// Runtime is injected into the tree; nil injects nothing (tests, or
	// an image that is sealed).
	Runtime *runtime.Set

	ImageRef       string
	ManifestDigest string
	Kernel         string // kernel version the deployment boots (required)
	Origin         string // "install", "upgrade", ...
	LocalMode      cmdline.LocalMode
	KernelArgs     []string // extra kernel arguments, recorded for upgrades
	// Now returns the creation time (tests); nil means time.Now.
	Now func() time.Time
}

// CreateResult is what Create made.
type CreateResult struct {
	Deployment *Deployment
	ImagePath  string          // repo/images/<digest>
	Runtime    *runtime.Result // nil when nothing was to be injected
	// StateSeeded lists the shared state directories created from the image.
	StateSeeded []string
	// VerityPending is true when fs-verity could not be enabled on the new
	// image or objects (the marker file was written).
	VerityPending bool
}

// Create makes a new deployment: it injects berth's runtime into the tree,
// writes the composefs image (whose digest names the deployment), seeds
// shared state on first install, and assembles deploy/<id> under a
// temporary name, renaming it into place last. A crash before the rename
// leaves only garbage that Cleanup removes (objects and images are shared
// and content-addressed, so an unreferenced one is harmless).
func Create(l store.Layout, opts CreateOptions) (*CreateResult, error) {
	if opts.Tree == nil || !opts.Tree.IsDir() {
		return nil, errors.New("create deployment: no image tree")
	}
	if opts.Store == nil {
		return nil, errors.New("create deployment: no object store")
	}
	if opts.Kernel == "" {
		return nil, errors.New("create deployment: no kernel version given")
	}
	mode := opts.LocalMode
	if mode == "" {
		mode = cmdline.LocalPersistent
	}
	switch mode {
	case cmdline.LocalPersistent, cmdline.LocalTransient, cmdline.LocalReadonly:
	default:
		return nil, fmt.Errorf("create deployment: unknown local mode %q", mode)
	}
	now := time.Now
	if opts.Now != nil {
		now = opts.Now
	}
	if err := l.Init(); err != nil {
		return nil, err
	}
	unlock, err := Lock(l)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Shared repository lock from the first object written until the
	// deployment that references them is renamed into place: a cleanup
	// in between would delete them as unreferenced.
	repoLock, err := l.LockShared()
	if err != nil {
		return nil, fmt.Errorf("create deployment: %w", err)
	}
	defer repoLock.Unlock()
	if _, err := cleanupLocked(l); err != nil {
		return nil, fmt.Errorf("create deployment: %w", err)
	}
	res := &CreateResult{}

	if opts.Runtime != nil {
		batch := opts.Store.NewBatch()
		rr, err := opts.Runtime.Inject(opts.Tree, batch, opts.Store.Dir())
		if err != nil {
			batch.Abort()
			return nil, fmt.Errorf("create deployment: %w", err)
		}
		if err := batch.Commit(); err != nil {
			return nil, fmt.Errorf("create deployment: store runtime files: %w", err)
		}
		if opts.Store.VerityUnsupported() {
			res.VerityPending = true
		}
		res.Runtime = rr
	}

	hexDigest, pending, err := l.AddImage(opts.Tree)
	if err != nil {
		return nil, fmt.Errorf("create deployment: %w", err)
	}
	res.VerityPending = res.VerityPending || pending
	res.ImagePath = l.Image(hexDigest)
	if res.VerityPending {
		if err := l.MarkVerityPending("fs-verity could not be enabled when deployment files were written"); err != nil {
			return nil, fmt.Errorf("create deployment: %w", err)
		}
	}

	seeded, err := SeedState(l, opts.Tree, opts.Store.Dir())
	if err != nil {
		return nil, fmt.Errorf("create deployment: %w", err)
	}
	res.StateSeeded = seeded

	serial, err := nextSerial(l)
	if err != nil {
		return nil, fmt.Errorf("create deployment: %w", err)
	}
	id, err := FormatID(serial, hexDigest)
	if err != nil {
		return nil, fmt.Errorf("create deployment: %w", err)
	}
	d := &Deployment{
		ID:              id,
		ImageRef:        opts.ImageRef,
		ManifestDigest:  opts.ManifestDigest,
		ComposefsDigest: hexDigest,
		Kernel:          opts.Kernel,
		Origin:          opts.Origin,
		State:           StateStaged,
		Created:         now().UTC().Truncate(time.Second),
		LocalMode:       mode,
		KernelArgs:      opts.KernelArgs,
	}
	tmp, err := os.MkdirTemp(l.Deployments(), tmpPrefix+id+"-")
	if err != nil {
		return nil, fmt.Errorf("create deployment %s: %w", id, err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("create deployment %s: %w", id, err)
	}
	// The upper directory's own attributes become the root directory's in
	// the overlay: give it the image root's.
	upper := filepath.Join(tmp, "upper")
	if err := os.Mkdir(upper, 0o755); err != nil {
		return nil, fmt.Errorf("create deployment %s: %w", id, err)
	}
	if err := os.Lchown(upper, int(opts.Tree.UID), int(opts.Tree.GID)); err != nil {
		return nil, fmt.Errorf("create deployment %s: %w", id, err)
	}
	if err := os.Chmod(upper, os.FileMode(opts.Tree.Mode&0o777)|modeBits(opts.Tree.Mode)); err != nil {
		return nil, fmt.Errorf("create deployment %s: %w", id, err)
	}
	if err := os.Mkdir(filepath.Join(tmp, "work"), 0o700); err != nil {
		return nil, fmt.Errorf("create deployment %s: %w", id, err)
	}
	if err := write(tmp, d); err != nil {
		return nil, fmt.Errorf("create deployment %s: %w", id, err)
	}
	if err := fsutil.SyncFS(tmp); err != nil {
		return nil, err
	}
	if err := os.Rename(tmp, l.Deployment(id)); err != nil {
		return nil, fmt.Errorf("create deployment %s: %w", id, err)
	}
	ok = true
	if err := fsutil.SyncDir(l.Deployments()); err != nil {
		return nil, err
	}
	res.Deployment = d
	return res, nil
}

// modeBits converts the set-id and sticky bits of a Unix mode.
func modeBits(mode uint32) os.FileMode {
	var m os.FileMode
	if mode&0o4000 != 0 {
		m |= os.ModeSetuid
	}
	if mode&0o2000 != 0 {
		m |= os.ModeSetgid
	}
	if mode&0o1000 != 0 {
		m |= os.ModeSticky
	}
	return m
}
