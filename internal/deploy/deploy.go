// Package deploy manages berth's deployments (DESIGN §3):
//
//	<sysroot>/berth/deploy/<id>/deployment.json   what the deployment is
//	<sysroot>/berth/deploy/<id>/upper, work        its persistent local layer
//	<sysroot>/berth/state/{var,home,root,srv}      state shared by all deployments
//
// A deployment id is "<serial>-<first 12 hex of the composefs digest>"; the
// serial only grows (the highest one handed out is kept in deploy/.serial).
//
// Crash safety: a deployment directory is assembled under a temporary name
// (deploy/.tmp-*) and renamed into place as the last step, and removal
// renames it away (deploy/.rm-*) before deleting. So after a crash every
// deploy/<id> is complete; anything starting with "." is garbage that List
// ignores and Cleanup deletes.
package deploy

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/berth-dev/berth/internal/cmdline"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/store"
)

// State values of a deployment.
const (
	// StateStaged: created, never booted yet.
	StateStaged = "staged"
	// StateBooted: has been booted at least once.
	StateBooted = "booted"
	// StateFailed: abandoned (did not reach boot-complete within its tries).
	StateFailed = "failed"
)

// Deployment is the content of deploy/<id>/deployment.json. Other packages
// (setuproot, boot, api) read these field names.
type Deployment struct {
	ID              string            `json:"id"`
	ImageRef        string            `json:"image_ref"`
	ManifestDigest  string            `json:"manifest_digest"`
	ComposefsDigest string            `json:"composefs_digest"` // lowercase hex
	Kernel          string            `json:"kernel"`           // kernel version (uname -r)
	Origin          string            `json:"origin"`           // how it was made: "install", "upgrade", "switch", "deploy"
	State           string            `json:"state"`
	Created         time.Time         `json:"created"`
	Pinned          bool              `json:"pinned"`
	LocalMode       cmdline.LocalMode `json:"local_mode"`
	// KernelArgs are the extra kernel arguments given at install
	// (--karg); upgrades carry them to the next deployment.
	KernelArgs []string `json:"kernel_args,omitempty"`
}

// Serial returns the serial part of the id (0 when the id is malformed).
func (d *Deployment) Serial() uint64 {
	s, _, _ := ParseID(d.ID)
	return s
}

// MetadataFile is the name of the metadata file in a deployment directory.
const MetadataFile = "deployment.json"

// Names inside deploy/ that are not deployments.
const (
	serialFile = ".serial"
	lockFile   = ".lock"
	tmpPrefix  = ".tmp-"
	rmPrefix   = ".rm-"
)

var idRe = regexp.MustCompile(`^([0-9]{1,19})-([0-9a-f]{12})$`)

// ParseID splits a deployment id into its serial and digest prefix.
func ParseID(id string) (serial uint64, digestPrefix string, err error) {
	m := idRe.FindStringSubmatch(id)
	if m == nil {
		return 0, "", fmt.Errorf("invalid deployment id %q (want <serial>-<12 hex digits>)", id)
	}
	serial, err = strconv.ParseUint(m[1], 10, 64)
	if err != nil {
		return 0, "", fmt.Errorf("invalid deployment id %q: %w", id, err)
	}
	return serial, m[2], nil
}

// FormatID builds the id of a deployment from its serial and composefs digest (hex).
func FormatID(serial uint64, digestHex string) (string, error) {
	if len(digestHex) < 12 {
		return "", fmt.Errorf("composefs digest %q too short for a deployment id", digestHex)
	}
	id := fmt.Sprintf("%d-%s", serial, strings.ToLower(digestHex[:12]))
	if _, _, err := ParseID(id); err != nil {
		return "", err
	}
	return id, nil
}

// ErrNotFound is wrapped when a deployment does not exist.
var ErrNotFound = errors.New("deployment not found")

// ErrBusy is wrapped when another process holds the deployment lock.
var ErrBusy = errors.New("another berth operation is changing deployments")

// Lock takes the exclusive lock on l's deployments (deploy/.lock, flock).
// It fails at once with ErrBusy when someone else holds it.
func Lock(l store.Layout) (unlock func(), err error) {
	if err := fsutil.MkdirAllSync(l.Deployments(), 0o755); err != nil {
		return nil, err
	}
	path := filepath.Join(l.Deployments(), lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open lock %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w (lock %s is held)", ErrBusy, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// Read reads deploy/<id>/deployment.json.
func Read(l store.Layout, id string) (*Deployment, error) {
	if _, _, err := ParseID(id); err != nil {
		return nil, err
	}
	path := filepath.Join(l.Deployment(id), MetadataFile)
	b, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
		}
		return nil, fmt.Errorf("read deployment %s: %w", id, err)
	}
	return parseMetadata(b, id, path)
}

// parseMetadata decodes and checks deployment.json; the id inside must
// match the directory name.
func parseMetadata(b []byte, id, path string) (*Deployment, error) {
	if len(b) > 1<<20 {
		return nil, fmt.Errorf("read deployment %s: %s is larger than 1 MiB", id, path)
	}
	var d Deployment
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("read deployment %s: parse %s: %w", id, path, err)
	}
	if d.ID != id {
		return nil, fmt.Errorf("read deployment %s: %s names id %q", id, path, d.ID)
	}
	if !hexRe.MatchString(d.ComposefsDigest) {
		return nil, fmt.Errorf("read deployment %s: composefs_digest %q is not a sha256/sha512 hex digest", id, d.ComposefsDigest)
	}
	if _, p, _ := ParseID(id); !strings.HasPrefix(d.ComposefsDigest, p) {
		return nil, fmt.Errorf("read deployment %s: composefs_digest %s does not match the id", id, d.ComposefsDigest)
	}
	return &d, nil
}

var hexRe = regexp.MustCompile(`^([0-9a-f]{64}|[0-9a-f]{128})$`)

// write stores d as deployment.json in dir (crash-safe).
func write(dir string, d *Deployment) error {
	b, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return fmt.Errorf("encode deployment %s: %w", d.ID, err)
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, MetadataFile), append(b, '\n'), 0o644)
}

// List returns the complete deployments below l, oldest (lowest serial)
// first. Temporary and half-removed directories are skipped; a directory
// with a valid id but unreadable metadata is an error (it should not exist).
func List(l store.Layout) ([]*Deployment, error) {
	ents, err := os.ReadDir(l.Deployments())
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("list deployments: %w", err)
	}
	var out []*Deployment
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, ".") || !e.IsDir() {
			continue
		}
		if _, _, err := ParseID(name); err != nil {
			continue // not ours
		}
		d, err := Read(l, name)
		if err != nil {
			return nil, fmt.Errorf("list deployments: %w", err)
		}
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Serial() < out[j].Serial() })
	return out, nil
}

// Update changes deployment id's metadata through fn under the lock.
func Update(l store.Layout, id string, fn func(d *Deployment) error) (*Deployment, error) {
	unlock, err := Lock(l)
	if err != nil {
		return nil, err
	}
	defer unlock()
	d, err := Read(l, id)
	if err != nil {
		return nil, err
	}
	if err := fn(d); err != nil {
		return nil, err
	}
	d.ID = id // fn must not rename
	if err := write(l.Deployment(id), d); err != nil {
		return nil, err
	}
	return d, nil
}

// SetPinned pins (or unpins) a deployment: a pinned deployment is never
// removed by Remove or by automatic cleanup.
func SetPinned(l store.Layout, id string, pinned bool) (*Deployment, error) {
	return Update(l, id, func(d *Deployment) error { d.Pinned = pinned; return nil })
}

// SetState records a new state (StateStaged, StateBooted, StateFailed).
func SetState(l store.Layout, id, state string) (*Deployment, error) {
	switch state {
	case StateStaged, StateBooted, StateFailed:
	default:
		return nil, fmt.Errorf("set state of %s: unknown state %q", id, state)
	}
	return Update(l, id, func(d *Deployment) error { d.State = state; return nil })
}

// RemoveOptions name the deployments Remove must refuse to delete.
type RemoveOptions struct {
	Booted  string // the running deployment ("" when not running from this sysroot)
	Default string // the one the boot loader starts by default
	Force   bool   // also remove a pinned deployment (never the booted or default one)
}

// Remove deletes deployment id. It refuses the booted and the default
// deployment, and a pinned one unless opts.Force. The directory is first
// renamed to deploy/.rm-<id> (one atomic step), then deleted.
func Remove(l store.Layout, id string, opts RemoveOptions) error {
	if _, _, err := ParseID(id); err != nil {
		return err
	}
	if id == opts.Booted {
		return fmt.Errorf("remove deployment %s: it is the booted deployment", id)
	}
	if id == opts.Default {
		return fmt.Errorf("remove deployment %s: it is the default boot entry; make another deployment the default first", id)
	}
	unlock, err := Lock(l)
	if err != nil {
		return err
	}
	defer unlock()
	d, err := Read(l, id)
	if err != nil {
		return fmt.Errorf("remove deployment: %w", err)
	}
	if d.Pinned && !opts.Force {
		return fmt.Errorf("remove deployment %s: it is pinned (unpin it first)", id)
	}
	gone := filepath.Join(l.Deployments(), rmPrefix+id)
	if err := os.Rename(l.Deployment(id), gone); err != nil {
		return fmt.Errorf("remove deployment %s: %w", id, err)
	}
	if err := fsutil.SyncDir(l.Deployments()); err != nil {
		return err
	}
	if err := removeTree(gone); err != nil {
		return fmt.Errorf("remove deployment %s: %w", id, err)
	}
	return nil
}

// Cleanup deletes leftovers of interrupted creations and removals
// (deploy/.tmp-*, deploy/.rm-*, state/.tmp-*). It returns what it removed.
func Cleanup(l store.Layout) ([]string, error) {
	unlock, err := Lock(l)
	if err != nil {
		return nil, err
	}
	defer unlock()
	return cleanupLocked(l)
}

func cleanupLocked(l store.Layout) ([]string, error) {
	var removed []string
	for _, dir := range []string{l.Deployments(), l.State()} {
		ents, err := os.ReadDir(dir)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return removed, fmt.Errorf("cleanup %s: %w", dir, err)
		}
		for _, e := range ents {
			n := e.Name()
			if !strings.HasPrefix(n, tmpPrefix) && !strings.HasPrefix(n, rmPrefix) {
				continue
			}
			p := filepath.Join(dir, n)
			if err := removeTree(p); err != nil {
				return removed, fmt.Errorf("cleanup: %w", err)
			}
			removed = append(removed, p)
		}
	}
	return removed, nil
}

// removeTree deletes p; it never follows symlinks (os.RemoveAll does not).
func removeTree(p string) error {
	if err := os.RemoveAll(p); err != nil {
		return fmt.Errorf("delete %s: %w", p, err)
	}
	return fsutil.SyncDir(filepath.Dir(p))
}

// nextSerial hands out the next serial: one more than both the recorded
// high-water mark and every existing id, recorded before it is used so
// that a crash can skip a serial but never reuse one. Call with the lock held.
func nextSerial(l store.Layout) (uint64, error) {
	var high uint64
	path := filepath.Join(l.Deployments(), serialFile)
	if b, err := os.ReadFile(path); err == nil {
		v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("read %s: %w", path, err)
		}
		high = v
	} else if !errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("read %s: %w", path, err)
	}
	ents, err := os.ReadDir(l.Deployments())
	if err != nil {
		return 0, fmt.Errorf("list deployments: %w", err)
	}
	for _, e := range ents {
		name := strings.TrimPrefix(e.Name(), rmPrefix)
		if s, _, err := ParseID(name); err == nil && s > high {
			high = s
		}
	}
	next := high + 1
	if err := fsutil.WriteFileAtomic(path, []byte(strconv.FormatUint(next, 10)+"\n"), 0o644); err != nil {
		return 0, err
	}
	return next, nil
}

// BootedID returns the deployment the running system booted (berth.deploy=
// on /proc/cmdline), or "" when it was not booted by berth or sysroot is
// not "/".
func BootedID(sysroot string) string {
	if sysroot != "" && filepath.Clean(sysroot) != "/" {
		return ""
	}
	a, err := cmdline.ReadProc("")
	if err != nil || !a.Berth() {
		return ""
	}
	return a.Deploy
}
