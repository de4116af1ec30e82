package oci

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/store"
)

// CleanupReport says what Cleanup removed and kept.
type CleanupReport struct {
	ImagesKept          int   `json:"images_kept"`
	ImagesRemoved       int   `json:"images_removed"`
	ObjectsKept         int   `json:"objects_kept"`
	ObjectsRemoved      int   `json:"objects_removed"`
	LayerIndexesRemoved int   `json:"layer_indexes_removed"`
	BlobsRemoved        int   `json:"blobs_removed"`
	TempRemoved         int   `json:"temp_removed"`
	BytesFreed          int64 `json:"bytes_freed"`
}

// Cleanup removes what nothing references. A composefs image is live when
// an image record or a deployment (<sysroot>/berth/deploy/*/deployment.json,
// field "composefs_digest") names it; an object is live when a live image
// or the index of a layer of a recorded image references it (so a layer
// cache entry stays usable). Leftovers of interrupted writes (.tmp*) go
// too. It holds the repository lock exclusively, so it never runs while an
// import is adding objects.
func Cleanup(sysroot string) (*CleanupReport, error) {
	l := store.At(sysroot)
	if _, err := os.Stat(l.Repo()); errors.Is(err, os.ErrNotExist) {
		return &CleanupReport{}, nil
	}
	lock, err := l.LockExclusive()
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()
	rep := &CleanupReport{}

	records, err := ListImages(sysroot)
	if err != nil {
		return nil, err
	}
	liveImages := map[string]bool{}
	liveLayers := map[string]bool{}
	liveBlobs := map[string]bool{}
	for _, r := range records {
		liveImages[r.ComposefsDigest] = true
		for _, ly := range r.Layers {
			liveLayers[strings.TrimPrefix(ly.DiffID, "sha256:")] = true
		}
		liveBlobs[strings.TrimPrefix(r.ManifestDigest, "sha256:")] = true
		liveBlobs[strings.TrimPrefix(r.ConfigDigest, "sha256:")] = true
	}
	deployed, err := deployedImages(sysroot)
	if err != nil {
		return nil, err
	}
	for d := range deployed {
		liveImages[d] = true
	}

	liveObjects := map[string]bool{}
	// Composefs images.
	ents, err := os.ReadDir(l.Images())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cleanup: %w", err)
	}
	for _, de := range ents {
		name := de.Name()
		p := filepath.Join(l.Images(), name)
		switch {
		case strings.HasPrefix(name, ".tmp"):
			rep.TempRemoved++
			rep.BytesFreed += removeCounting(p)
			continue
		case !liveImages[name]:
			rep.ImagesRemoved++
			rep.BytesFreed += removeCounting(p)
			continue
		}
		rep.ImagesKept++
		im, err := composefs.OpenImage(p)
		if err != nil {
			return nil, fmt.Errorf("cleanup: read live image %s: %w", p, err)
		}
		err = im.Walk(func(_ string, n *composefs.Inode) error {
			if n.Payload != "" {
				liveObjects[n.Payload] = true
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("cleanup: read live image %s: %w", p, err)
		}
	}
	// Layer indexes of recorded images keep their objects.
	if ents, err = os.ReadDir(layersDir(sysroot)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cleanup: %w", err)
	}
	for _, de := range ents {
		name := de.Name()
		p := filepath.Join(layersDir(sysroot), name)
		if strings.HasPrefix(name, ".tmp") {
			rep.TempRemoved++
			rep.BytesFreed += removeCounting(p)
			continue
		}
		if !liveLayers[strings.TrimSuffix(name, ".json")] {
			rep.LayerIndexesRemoved++
			rep.BytesFreed += removeCounting(p)
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("cleanup: %w", err)
		}
		var li LayerIndex
		if err := json.Unmarshal(data, &li); err != nil {
			// An unreadable index is never used (Pull re-imports the
			// layer), so it protects nothing.
			rep.LayerIndexesRemoved++
			rep.BytesFreed += removeCounting(p)
			continue
		}
		for _, e := range li.Entries {
			if b, err := hex.DecodeString(e.Digest); err == nil && len(b) >= 2 {
				liveObjects[composefs.PayloadPath(b)] = true
			}
		}
	}
	// Manifests and configs.
	if ents, err = os.ReadDir(blobsDir(sysroot)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cleanup: %w", err)
	}
	for _, de := range ents {
		if !liveBlobs[de.Name()] {
			rep.BlobsRemoved++
			rep.BytesFreed += removeCounting(filepath.Join(blobsDir(sysroot), de.Name()))
		}
	}
	for _, d := range []string{recordsDir(sysroot)} {
		if ents, err := os.ReadDir(d); err == nil {
			for _, de := range ents {
				if strings.HasPrefix(de.Name(), ".tmp") {
					rep.TempRemoved++
					rep.BytesFreed += removeCounting(filepath.Join(d, de.Name()))
				}
			}
		}
	}
	// Objects.
	if _, err := os.Stat(l.Objects()); err == nil {
		objs, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
		if err != nil {
			return nil, err
		}
		n, err := objs.CleanupTemps(0) // no batch runs: we hold the lock exclusively
		rep.TempRemoved += n
		if err != nil {
			return nil, err
		}
		fans, err := os.ReadDir(l.Objects())
		if err != nil {
			return nil, fmt.Errorf("cleanup: %w", err)
		}
		for _, fan := range fans {
			if !fan.IsDir() || len(fan.Name()) != 2 {
				continue
			}
			dir := filepath.Join(l.Objects(), fan.Name())
			files, err := os.ReadDir(dir)
			if err != nil {
				return nil, fmt.Errorf("cleanup: %w", err)
			}
			removed := false
			for _, f := range files {
				rel := fan.Name() + "/" + f.Name()
				switch {
				case strings.HasPrefix(f.Name(), ".tmp"):
					rep.TempRemoved++
				case liveObjects[rel]:
					rep.ObjectsKept++
					continue
				default:
					rep.ObjectsRemoved++
				}
				rep.BytesFreed += removeCounting(filepath.Join(dir, f.Name()))
				removed = true
			}
			if removed {
				if err := fsutil.SyncDir(dir); err != nil {
					return nil, err
				}
			}
		}
	}
	for _, d := range []string{l.Images(), layersDir(sysroot), blobsDir(sysroot)} {
		if _, err := os.Stat(d); err == nil {
			if err := fsutil.SyncDir(d); err != nil {
				return nil, err
			}
		}
	}
	return rep, nil
}

// deployedImages reads the composefs digests named by deployments. A
// deployment file that cannot be read stops the cleanup: guessing wrong
// would delete a bootable system.
func deployedImages(sysroot string) (map[string]bool, error) {
	out := map[string]bool{}
	matches, err := filepath.Glob(filepath.Join(store.At(sysroot).Deployments(), "*", "deployment.json"))
	if err != nil {
		return nil, err
	}
	for _, p := range matches {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("cleanup: read deployment %s: %w", p, err)
		}
		var d struct {
			ComposefsDigest string `json:"composefs_digest"`
		}
		if err := json.Unmarshal(data, &d); err != nil {
			return nil, fmt.Errorf("cleanup: deployment %s is not valid JSON (fix or remove it first): %w", p, err)
		}
		if d.ComposefsDigest != "" {
			out[strings.TrimPrefix(d.ComposefsDigest, "?")] = true
		}
	}
	return out, nil
}

func removeCounting(p string) int64 {
	var n int64
	filepath.Walk(p, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	if err := os.RemoveAll(p); err != nil {
		return 0
	}
	return n
}
