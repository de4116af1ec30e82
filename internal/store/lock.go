package store

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/fsutil"
)

// The repository lock is an flock on repo/.lock. Every writer that adds
// objects or composefs images (imports, deployments with berth's runtime
// files, commits) holds it shared from its first write until the record
// or deployment that references what it wrote is on disk; cleanup holds it
// exclusively. So cleanup never sees an object or image that is written
// but not yet referenced, and no writer waits for another writer.
const lockFile = ".lock"

// RepoLock is a held repository lock.
type RepoLock struct{ f *os.File }

// LockShared takes the repository lock for a writer that adds to the store
// (or a reader that must not see a cleanup half done). It waits.
func (l Layout) LockShared() (*RepoLock, error) { return l.lockRepo(unix.LOCK_SH) }

// LockExclusive takes the repository lock for cleanup. It waits.
func (l Layout) LockExclusive() (*RepoLock, error) { return l.lockRepo(unix.LOCK_EX) }

func (l Layout) lockRepo(how int) (*RepoLock, error) {
	p := filepath.Join(l.Repo(), lockFile)
	if err := fsutil.MkdirAllSync(l.Repo(), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open repository lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock repository %s: %w", p, err)
	}
	return &RepoLock{f: f}, nil
}

// Unlock releases the lock.
func (r *RepoLock) Unlock() { r.f.Close() }
