package deploy

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/store"
)

// VerityPendingFile is the marker (below repo/) that says fs-verity could
// not be enabled on some objects or images when they were written (the
// installing kernel lacked it). berth-init enables verity on every object
// and image of the store at the next boot when it finds the marker, before
// it measures anything; that is safe because the digests it then checks
// come from the UKI, not from the files.
const VerityPendingFile = "verity-pending"

// VerityPendingPath returns the marker's path.
func VerityPendingPath(l store.Layout) string { return filepath.Join(l.Repo(), VerityPendingFile) }

// MarkVerityPending writes the marker (crash-safe, idempotent).
func MarkVerityPending(l store.Layout, reason string) error {
	return fsutil.WriteFileAtomic(VerityPendingPath(l), []byte(reason+"\n"), 0o644)
}

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

	digest, pending, err := writeImage(l, opts.Tree)
	if err != nil {
		return nil, fmt.Errorf("create deployment: %w", err)
	}
	res.VerityPending = res.VerityPending || pending
	hexDigest := hex.EncodeToString(digest)
	res.ImagePath = l.Image(hexDigest)
	if res.VerityPending {
		if err := MarkVerityPending(l, "fs-verity could not be enabled when deployment files were written"); err != nil {
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
	if err := syncFS(tmp); err != nil {
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

// writeImage writes the composefs image of root to repo/images/<digest>
// (unless it is already there), with fs-verity enabled when the
// filesystem can. pending is true when it could not.
func writeImage(l store.Layout, root *composefs.Inode) (digest []byte, pending bool, err error) {
	var buf bytes.Buffer
	if err := composefs.Write(&buf, root, composefs.WriteOptions{}); err != nil {
		return nil, false, fmt.Errorf("write composefs image: %w", err)
	}
	digest, err = fsverity.Digest(bytes.NewReader(buf.Bytes()), fsverity.SHA256)
	if err != nil {
		return nil, false, fmt.Errorf("composefs image digest: %w", err)
	}
	final := l.Image(hex.EncodeToString(digest))
	if fi, err := os.Stat(final); err == nil && fi.Mode().IsRegular() {
		pending, err = verityMissing(final, digest)
		if err != nil {
			return nil, false, err
		}
		// Without verity the name proves nothing: compare the bytes, and
		// write the image again below if they differ.
		if old, err := os.ReadFile(final); !pending || (err == nil && bytes.Equal(old, buf.Bytes())) {
			return digest, pending, nil
		}
	}
	f, err := os.CreateTemp(l.Images(), ".tmp-image-")
	if err != nil {
		return nil, false, fmt.Errorf("write composefs image: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	_, werr := f.Write(buf.Bytes())
	if werr == nil {
		werr = f.Chmod(0o644)
	}
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return nil, false, fmt.Errorf("write composefs image %s: %w", tmp, werr)
	}
	pending, err = enableVerity(tmp, digest)
	if err != nil {
		return nil, false, err
	}
	if err := os.Rename(tmp, final); err != nil {
		return nil, false, fmt.Errorf("write composefs image: %w", err)
	}
	if err := fsutil.SyncDir(l.Images()); err != nil {
		return nil, false, err
	}
	return digest, pending, nil
}

// enableVerity turns on fs-verity for a finished file and checks the
// kernel's measurement; pending is true when the filesystem lacks fs-verity.
func enableVerity(path string, digest []byte) (pending bool, err error) {
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("enable fs-verity on %s: %w", path, err)
	}
	defer f.Close()
	if err := fsverity.Enable(f, fsverity.SHA256); err != nil {
		if errors.Is(err, fsverity.ErrNotSupported) {
			return true, nil
		}
		return false, fmt.Errorf("enable fs-verity on %s: %w", path, err)
	}
	_, got, err := fsverity.Measure(f)
	if err != nil {
		return false, fmt.Errorf("measure %s: %w", path, err)
	}
	if !bytes.Equal(got, digest) {
		return false, fmt.Errorf("composefs image %s: kernel measured %x, expected %x", path, got, digest)
	}
	return false, nil
}

// verityMissing checks an existing image: verity enabled with the right
// digest (false), not enabled (tries to enable; true if unsupported), or
// wrong (error).
func verityMissing(path string, digest []byte) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("composefs image %s: %w", path, err)
	}
	_, got, err := fsverity.Measure(f)
	f.Close()
	switch {
	case err == nil && bytes.Equal(got, digest):
		return false, nil
	case err == nil:
		return false, fmt.Errorf("composefs image %s: kernel measured %x, expected %x (corrupt store?)", path, got, digest)
	case errors.Is(err, fsverity.ErrNotEnabled):
		return enableVerity(path, digest)
	case errors.Is(err, fsverity.ErrNotSupported):
		return true, nil
	}
	return false, fmt.Errorf("measure %s: %w", path, err)
}
