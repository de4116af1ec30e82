package install

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/store"
)

// StagingEnv names the staging directory when Options.StagingDir is "".
const StagingEnv = "BERTH_STAGING"

// DefaultStagingDir is where the staging store goes by default: /var/tmp
// is meant for large temporary files and is on disk, not in memory.
const DefaultStagingDir = "/var/tmp"

// minStagingFree is the least free space berth asks of the staging
// directory before the pull; running out later is reported the same way.
// A variable for tests.
var minStagingFree int64 = 512 << 20

// staged is an image pulled into a private berth store on the installing
// machine and checked there, before the target is touched (as bootc pulls
// into containers-storage first).
type staged struct {
	dir        string // the staging sysroot: dir/berth/repo is its store
	img        *oci.Image
	c          *checked
	storeBytes int64 // disk space its store takes

	removing chan error // set once removal started
}

// startRemove removes the staging store in the background: once the
// image is in the target's store, nothing reads it any more, and deleting
// thousands of files then overlaps with the deployment's work.
func (s *staged) startRemove() {
	if s.removing != nil {
		return
	}
	ch := make(chan error, 1)
	s.removing = ch
	go func() { ch <- os.RemoveAll(s.dir) }()
}

// remove removes the staging store (waiting for a removal in progress).
func (s *staged) remove() error {
	s.startRemove()
	err := <-s.removing
	s.removing <- err // a second call gets the same result
	if err != nil {
		return fmt.Errorf("remove staging directory %s: %w", s.dir, err)
	}
	return nil
}

func (s *staged) layout() store.Layout { return store.At(s.dir) }

// stagingBase picks the directory the staging store is made in.
func stagingBase(flag string) string {
	if flag != "" {
		return flag
	}
	if env := os.Getenv(StagingEnv); env != "" {
		return env
	}
	return DefaultStagingDir
}

// newStagingDir makes a private directory for the staging store below
// base, after checking that base has some room. Its caller removes it.
func newStagingDir(base string) (string, error) {
	fi, err := os.Stat(base)
	if err != nil {
		return "", fmt.Errorf("staging directory: %w (give --staging-dir DIR or set %s)", err, StagingEnv)
	}
	if !fi.IsDir() {
		return "", fmt.Errorf("staging directory %s is not a directory", base)
	}
	if free, err := freeBytes(base); err == nil && free < minStagingFree {
		return "", fmt.Errorf("staging directory %s has %d MiB free; berth pulls and checks the image there before it touches the target and needs at least %d MiB (more for a big image): give --staging-dir DIR on a filesystem with more room, or set %s",
			base, free>>20, minStagingFree>>20, StagingEnv)
	}
	dir, err := os.MkdirTemp(base, "berth-staging-")
	if err != nil {
		return "", fmt.Errorf("staging directory: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		os.RemoveAll(dir)
		return "", fmt.Errorf("staging directory: %w", err)
	}
	return dir, nil
}

// freeBytes is the space an unprivileged writer could still use below dir.
func freeBytes(dir string) (int64, error) {
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(s.Bavail) * s.Bsize, nil
}

// explainNoSpace turns running out of room in the staging directory into
// an error that says what to do.
func explainNoSpace(err error, base string) error {
	if err == nil || !(errors.Is(err, unix.ENOSPC) || strings.Contains(err.Error(), "no space left on device")) {
		return err
	}
	free, _ := freeBytes(base)
	return fmt.Errorf("the staging directory %s ran out of space (%d MiB free now) while berth pulled the image into it; nothing was written to the target: give --staging-dir DIR on a filesystem with room for the image, or set %s: %w",
		base, free>>20, StagingEnv, err)
}

// stageImage pulls opts.Image into a new staging store and runs the
// preflight on it. The caller removes s.dir (also on failure: it is
// returned with the error when it was made).
func stageImage(ctx context.Context, st *stepper, opts Options) (s *staged, err error) {
	base := stagingBase(opts.StagingDir)
	dir, err := newStagingDir(base)
	if err != nil {
		return nil, err
	}
	s = &staged{dir: dir}
	if err := st.do("pull "+opts.Image+" (staging in "+base+")", func() (string, error) {
		img, err := oci.Pull(ctx, opts.Image, oci.PullOptions{
			Sysroot: dir, Progress: opts.Progress, PolicyPath: opts.PolicyPath,
			InsecureSkipTLSVerify: opts.InsecureSkipTLSVerify,
		})
		if err != nil {
			return "", explainNoSpace(err, base)
		}
		s.img = img
		return fmt.Sprintf("%s, %d files, %d MiB", img.ManifestDigest, img.Files, img.Size>>20), nil
	}); err != nil {
		return s, err
	}
	if err := st.do("check image (kernel, systemd-stub, systemd-boot, initramfs)", func() (string, error) {
		c, err := checkImage(s.layout(), s.img, checkOpts{
			Kernel: opts.Kernel, InsecureNoVerity: opts.InsecureNoVerity, SkipKernelCheck: opts.SkipKernelCheck,
			Filesystem: opts.Filesystem, HostRoot: opts.HostRoot, Runtime: opts.Runtime,
		})
		if err != nil {
			return "", err
		}
		s.c = c
		if s.storeBytes, err = diskUsage(s.layout().Repo()); err != nil {
			return "", fmt.Errorf("staging store: %w", err)
		}
		return c.summary(), nil
	}); err != nil {
		return s, err
	}
	return s, nil
}

func (c *checked) summary() string {
	note := "built"
	if c.initrdCached {
		note = "cached"
	}
	return fmt.Sprintf("kernel %s, stub %s, systemd-boot %s, initramfs %s %d KiB", c.kver, c.stubFrom, c.bootFrom, note, len(c.initrd)>>10)
}

// sameFilesystem reports whether a and b are on one filesystem.
func sameFilesystem(a, b string) bool {
	var sa, sb unix.Stat_t
	if unix.Stat(a, &sa) != nil || unix.Stat(b, &sb) != nil {
		return false
	}
	return sa.Dev == sb.Dev
}

// checkStagingOutside refuses a staging directory on the target
// filesystem (it would be written before the checks), except for an
// installation into the running root itself.
func checkStagingOutside(base, rootDir string) error {
	abs, err := filepath.Abs(rootDir)
	if err != nil {
		return err
	}
	if abs != "/" && sameFilesystem(base, abs) {
		return fmt.Errorf("the staging directory %s is on the target filesystem %s, which must stay untouched until the image is checked: give --staging-dir DIR elsewhere, or set %s", base, abs, StagingEnv)
	}
	return nil
}
