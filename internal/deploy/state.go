package deploy

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/store"
)

// SeedState creates the shared state directories that do not exist yet,
// each a copy of the image's directory of the same name (ownership, modes,
// xattrs kept), or an empty root-owned directory when the image has none.
// Existing state is never touched: state is seeded on first install only.
// A name that the image has as a symlink (e.g. Fedora's /home -> var/home)
// is skipped: the link lives in the image and its target is shared anyway.
// It returns the names it created. Call with the lock held.
func SeedState(l store.Layout, root *composefs.Inode, objects string) ([]string, error) {
	if err := fsutil.MkdirAllSync(l.State(), 0o755); err != nil {
		return nil, err
	}
	var created []string
	for _, sd := range store.SharedDirs {
		dst := filepath.Join(l.State(), sd.Name)
		if _, err := os.Lstat(dst); err == nil {
			continue
		} else if !errors.Is(err, os.ErrNotExist) {
			return created, fmt.Errorf("seed state %s: %w", dst, err)
		}
		src := root.Lookup(sd.Name)
		if src != nil && !src.IsDir() {
			if src.Type() == composefs.SIFLNK {
				continue
			}
			return created, fmt.Errorf("seed state: /%s in the image is not a directory", sd.Name)
		}
		if src == nil {
			src = composefs.NewDir(sd.Perm)
		}
		tmp, err := os.MkdirTemp(l.State(), tmpPrefix+sd.Name+"-")
		if err != nil {
			return created, fmt.Errorf("seed state: %w", err)
		}
		// MkdirTemp made the directory; ExtractTree wants to create it.
		if err := os.Remove(tmp); err != nil {
			return created, fmt.Errorf("seed state: %w", err)
		}
		if err := ExtractTree(tmp, src, objects); err != nil {
			os.RemoveAll(tmp)
			return created, fmt.Errorf("seed state /%s: %w", sd.Name, err)
		}
		if err := fsutil.SyncFS(tmp); err != nil {
			os.RemoveAll(tmp)
			return created, err
		}
		if err := os.Rename(tmp, dst); err != nil {
			os.RemoveAll(tmp)
			return created, fmt.Errorf("seed state: %w", err)
		}
		if err := fsutil.SyncDir(l.State()); err != nil {
			return created, err
		}
		created = append(created, sd.Name)
	}
	return created, nil
}
