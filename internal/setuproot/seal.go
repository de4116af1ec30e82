package setuproot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/store"
)

// seal finishes an installation made on a kernel without fs-verity: when
// repo/verity-pending exists, it enables fs-verity on every object and
// image that lacks it, makes that durable, and only then removes the
// marker. Enabling is safe on untrusted content: the kernel computes the
// digest from the data, and it is the digest (the image's against the
// kernel argument, each object's against the image's metacopy xattr) that
// is checked afterwards. A power cut leaves the marker in place and the
// next boot resumes (files already sealed are skipped).
func (s *setup) seal() error {
	marker := filepath.Join(s.l.Repo(), store.VerityPendingFile)
	if _, err := os.Lstat(marker); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return &Error{Reason: "cannot check " + marker, Err: err}
	}
	start := time.Now()
	s.info("sealing the repository with fs-verity (it was installed on a kernel without fs-verity)...")
	// Sealing thousands of objects takes minutes under emulation: a line every 30 s says the
	// boot is alive (and keeps a console watchdog, as the VM lane's, from taking it for hung).
	done, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(30 * time.Second)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				s.info("still sealing (%s)...", time.Since(start).Round(time.Second))
			}
		}
	}()
	res, err := SealRepository(s.l.Repo())
	close(done)
	<-stopped
	if errors.Is(err, fsverity.ErrNotSupported) {
		s.warn("cannot seal the repository: %v; %s stays in place", err, marker)
		return nil
	}
	if err != nil {
		fix := "check the root filesystem (fsck); the next boot retries"
		if errors.Is(err, unix.EINVAL) {
			fix = "the kernel refused fs-verity with 4096-byte Merkle blocks: the root filesystem's block size is probably smaller (ext4 made with -b 1024, the mke2fs default below 512 MiB); reinstall onto a filesystem made with -b 4096 -O verity, or boot with berth.composefs=?<digest> (insecure)"
		}
		return &Error{Reason: "sealing the repository with fs-verity failed", Fix: fix, Err: err}
	}
	s.rec.SealedFiles = res.Enabled
	for _, m := range res.Mismatch {
		s.warn("%s does not match its name after sealing (corrupt object; reading it will fail)", m)
	}
	s.info("sealed %d files (%d already sealed) in %s", res.Enabled, res.Already, time.Since(start).Round(time.Millisecond))
	return nil
}

// SealResult counts what SealRepository did.
type SealResult struct {
	Enabled  int      // files that got fs-verity now
	Already  int      // files that had it
	Mismatch []string // files whose digest differs from their name (at most 20 listed)
}

// SealRepository enables fs-verity on every object and image of repo that
// lacks it, syncs the filesystem, then removes repo/verity-pending
// crash-safely. It wraps fsverity.ErrNotSupported when the kernel or
// filesystem cannot do it (the marker is then kept).
func SealRepository(repo string) (*SealResult, error) {
	var files []string
	objects := filepath.Join(repo, "objects")
	err := filepath.WalkDir(objects, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			if p == objects && errors.Is(err, os.ErrNotExist) {
				return filepath.SkipDir
			}
			return err
		}
		if d.Type().IsRegular() && algForName(strings.TrimPrefix(p, objects+"/")) != 0 {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list objects: %w", err)
	}
	images, err := os.ReadDir(filepath.Join(repo, "images"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("list images: %w", err)
	}
	for _, e := range images {
		if e.Type().IsRegular() && algForName(e.Name()) != 0 {
			files = append(files, filepath.Join(repo, "images", e.Name()))
		}
	}

	res := &SealResult{}
	var enabled, already atomic.Int64
	var mu sync.Mutex
	var firstErr error
	work := make(chan string)
	var wg sync.WaitGroup
	// Enabling reads every byte: a few workers keep the disk busy.
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range work {
				did, mismatch, err := sealOne(p, objects)
				mu.Lock()
				switch {
				case err != nil:
					if firstErr == nil {
						firstErr = err
					}
				case mismatch && len(res.Mismatch) < 20:
					res.Mismatch = append(res.Mismatch, p)
				}
				mu.Unlock()
				if did {
					enabled.Add(1)
				} else if err == nil {
					already.Add(1)
				}
			}
		}()
	}
	for _, p := range files {
		mu.Lock()
		stop := firstErr != nil
		mu.Unlock()
		if stop {
			break
		}
		work <- p
	}
	close(work)
	wg.Wait()
	res.Enabled, res.Already = int(enabled.Load()), int(already.Load())
	if firstErr != nil {
		return res, firstErr
	}
	// The verity metadata must be durable before the marker goes away.
	if err := fsutil.SyncFS(repo); err != nil {
		return res, err
	}
	marker := filepath.Join(repo, store.VerityPendingFile)
	if err := os.Remove(marker); err != nil && !errors.Is(err, os.ErrNotExist) {
		return res, fmt.Errorf("remove %s: %w", marker, err)
	}
	return res, fsutil.SyncDir(repo)
}

// algForName returns the algorithm a digest-named file uses ("xx/<62 hex>"
// objects, "<64 hex>" images; 128 hex for SHA-512), or 0 for other names
// (temporary files).
func algForName(name string) fsverity.Algorithm {
	h := strings.Replace(name, "/", "", 1)
	if len(name) > 2 && name[2] == '/' || !strings.Contains(name, "/") {
		if !isHex(h) {
			return 0
		}
		switch len(h) {
		case 64:
			return fsverity.SHA256
		case 128:
			return fsverity.SHA512
		}
	}
	return 0
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return s != ""
}

func sealOne(p, objects string) (did, mismatch bool, err error) {
	name := filepath.Base(p)
	if strings.HasPrefix(p, objects+"/") {
		name = strings.TrimPrefix(p, objects+"/")
	}
	alg := algForName(name)
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, false, fmt.Errorf("seal %s: %w", p, err)
	}
	defer f.Close()
	_, got, err := fsverity.Measure(f)
	if errors.Is(err, fsverity.ErrNotEnabled) {
		if err := fsverity.Enable(f, alg); err != nil {
			return false, false, err
		}
		did = true
		_, got, err = fsverity.Measure(f)
	}
	if err != nil {
		return did, false, err
	}
	return did, fmt.Sprintf("%x", got) != strings.Replace(name, "/", "", 1), nil
}
