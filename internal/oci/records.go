package oci

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/store"
)

// Layer describes one layer of an imported image.
type Layer struct {
	Digest    string `json:"digest"`  // blob digest as listed in the manifest
	DiffID    string `json:"diff_id"` // digest of the uncompressed tar
	Size      int64  `json:"size"`    // blob size
	MediaType string `json:"media_type,omitempty"`
	Files     int    `json:"files"`
}

// Image is the record of an imported image in repo/oci/images.
type Image struct {
	Ref             string    `json:"ref"`       // as given to Pull, e.g. docker://example.org/os:1
	Transport       string    `json:"transport"` // docker, oci, oci-archive, docker-archive, containers-storage
	ManifestDigest  string    `json:"manifest_digest"`
	ConfigDigest    string    `json:"config_digest"`
	ComposefsDigest string    `json:"composefs_digest"` // hex sha256 fs-verity digest of the composefs image
	Layers          []Layer   `json:"layers"`
	Kernels         []string  `json:"kernels"`
	Size            int64     `json:"size"`  // bytes of regular file content in the final tree
	Files           int       `json:"files"` // entries in the final tree
	Architecture    string    `json:"architecture,omitempty"`
	OS              string    `json:"os,omitempty"`
	Created         time.Time `json:"created"` // image creation time from its config (zero if absent)
	Pulled          time.Time `json:"pulled"`

	// Stats is the work the Pull that returned this record did (not stored).
	Stats *PullStats `json:"-"`
}

// LayerIndex is what repo/oci/layers/<diff_id hex>.json holds: the
// validated entries of one layer with their object digests, so the layer
// never needs to be fetched or hashed again.
type LayerIndex struct {
	Version int     `json:"version"`
	DiffID  string  `json:"diff_id"`
	Entries []Entry `json:"entries"`
}

const layerIndexVersion = 1

func layersDir(sysroot string) string { return filepath.Join(store.At(sysroot).OCI(), "layers") }
func recordsDir(sysroot string) string {
	return filepath.Join(store.At(sysroot).OCI(), "images")
}
func blobsDir(sysroot string) string {
	return filepath.Join(store.At(sysroot).OCI(), "blobs", "sha256")
}

func layerIndexPath(sysroot, diffID string) string {
	return filepath.Join(layersDir(sysroot), strings.TrimPrefix(diffID, "sha256:")+".json")
}

// recordPath names a record by a hash of its ref, so refs with any
// characters map to safe file names.
func recordPath(sysroot, ref string) string {
	h := sha256.Sum256([]byte(ref))
	return filepath.Join(recordsDir(sysroot), hex.EncodeToString(h[:16])+".json")
}

func ensureDirs(sysroot string) error {
	if err := store.At(sysroot).Init(); err != nil {
		return err
	}
	for _, d := range []string{layersDir(sysroot), recordsDir(sysroot), blobsDir(sysroot)} {
		if err := fsutil.MkdirAllSync(d, 0o755); err != nil {
			return err
		}
	}
	return nil
}

// loadLayerIndex returns the index of a layer seen before, or nil when the
// layer is unknown or some of its objects have since been removed.
func loadLayerIndex(sysroot, diffID string, has func([]byte) bool) (*LayerIndex, error) {
	data, err := os.ReadFile(layerIndexPath(sysroot, diffID))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read layer index: %w", err)
	}
	var li LayerIndex
	if err := json.Unmarshal(data, &li); err != nil || li.Version != layerIndexVersion || li.DiffID != diffID {
		return nil, nil // unreadable or old index: import the layer again
	}
	for _, e := range li.Entries {
		if e.Digest == "" {
			continue
		}
		d, err := hex.DecodeString(e.Digest)
		if err != nil || !has(d) {
			return nil, nil
		}
	}
	return &li, nil
}

func saveLayerIndex(sysroot string, li *LayerIndex) error {
	data, err := json.Marshal(li)
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(layerIndexPath(sysroot, li.DiffID), data, 0o644)
}

func saveRecord(sysroot string, img *Image) error {
	data, err := json.MarshalIndent(img, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(recordPath(sysroot, img.Ref), append(data, '\n'), 0o644)
}

// ListImages returns the image records below sysroot, sorted by ref.
func ListImages(sysroot string) ([]*Image, error) {
	ents, err := os.ReadDir(recordsDir(sysroot))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []*Image
	for _, de := range ents {
		if !strings.HasSuffix(de.Name(), ".json") || strings.HasPrefix(de.Name(), ".") {
			continue
		}
		p := filepath.Join(recordsDir(sysroot), de.Name())
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("read image record: %w", err)
		}
		var img Image
		if err := json.Unmarshal(data, &img); err != nil {
			return nil, fmt.Errorf("image record %s: %w", p, err)
		}
		out = append(out, &img)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out, nil
}

// ErrImageNotFound is wrapped when no image record matches.
var ErrImageNotFound = errors.New("image not found")

// LookupImage finds an image by ref (exactly as pulled, or without the
// docker:// prefix), by manifest digest ("sha256:..." or a hex prefix of at
// least 8 characters), or by composefs digest (hex prefix, ≥ 8 characters).
func LookupImage(sysroot, refOrDigest string) (*Image, error) {
	imgs, err := ListImages(sysroot)
	if err != nil {
		return nil, err
	}
	q := refOrDigest
	for _, img := range imgs {
		if img.Ref == q || img.Ref == "docker://"+q {
			return img, nil
		}
	}
	// A short name finds the image it resolved to when pulled.
	for _, c := range localShortNameCandidates(q) {
		for _, img := range imgs {
			if img.Ref == c || img.Ref == "docker://"+c {
				return img, nil
			}
		}
	}
	h := strings.TrimPrefix(q, "sha256:")
	var match []*Image
	if len(h) >= 8 && isHex(h) {
		for _, img := range imgs {
			if strings.HasPrefix(strings.TrimPrefix(img.ManifestDigest, "sha256:"), h) || strings.HasPrefix(img.ComposefsDigest, h) {
				match = append(match, img)
			}
		}
	}
	switch {
	case len(match) == 1:
		return match[0], nil
	case len(match) > 1:
		// The same image under several refs is still one image.
		for _, m := range match[1:] {
			if m.ComposefsDigest != match[0].ComposefsDigest {
				return nil, fmt.Errorf("lookup image %q: ambiguous, %d images match", q, len(match))
			}
		}
		return match[0], nil
	}
	return nil, fmt.Errorf("lookup image %q: %w", q, ErrImageNotFound)
}

// RemoveImage removes the record(s) of an image; its objects and composefs
// image stay until Cleanup finds them unreferenced.
func RemoveImage(sysroot, ref string) error {
	img, err := LookupImage(sysroot, ref)
	if err != nil {
		return err
	}
	imgs, err := ListImages(sysroot)
	if err != nil {
		return err
	}
	// A digest names every record of that image; a ref names one.
	byDigest := img.Ref != ref && img.Ref != "docker://"+ref
	for _, other := range imgs {
		if other.Ref == img.Ref || (byDigest && other.ComposefsDigest == img.ComposefsDigest) {
			if err := os.Remove(recordPath(sysroot, other.Ref)); err != nil {
				return fmt.Errorf("remove image %s: %w", other.Ref, err)
			}
		}
	}
	return fsutil.SyncDir(recordsDir(sysroot))
}

// LoadTree reads the tree of an imported image back from its composefs
// image (for adding files at deploy time). The result is a fresh copy the
// caller may modify.
func LoadTree(sysroot string, img *Image) (*composefs.Inode, error) {
	p := store.At(sysroot).Image(img.ComposefsDigest)
	ci, err := composefs.OpenImage(p)
	if err != nil {
		return nil, fmt.Errorf("load tree of %s: %w", img.Ref, err)
	}
	root, err := ci.Tree()
	if err != nil {
		return nil, fmt.Errorf("load tree of %s: %w", img.Ref, err)
	}
	return root, nil
}

func isHex(s string) bool {
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// recordedWithConfig returns a record of an image with this config whose
// composefs image is present, or nil.
func recordedWithConfig(sysroot, configDigest string) *Image {
	imgs, err := ListImages(sysroot)
	if err != nil {
		return nil
	}
	for _, img := range imgs {
		if img.ConfigDigest != configDigest || len(img.ComposefsDigest) != 64 || !isHex(img.ComposefsDigest) {
			continue
		}
		if fi, err := os.Stat(store.At(sysroot).Image(img.ComposefsDigest)); err == nil && fi.Mode().IsRegular() {
			return img
		}
	}
	return nil
}
