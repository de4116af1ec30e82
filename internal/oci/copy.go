package oci

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/progress"
	"github.com/berth-dev/berth/internal/store"
)

// CopyStats counts what CopyImage did.
type CopyStats struct {
	Objects        int   // objects copied
	ObjectsPresent int   // objects the destination had already
	Bytes          int64 // content bytes of the copied objects
	LayerIndexes   int
}

// CopyImage copies an image recorded in the store below src, with
// everything it references, into the store below dst and records it
// there: the objects its composefs image and its layer indexes name, the
// layer indexes, the composefs image, the manifest and config blobs, and
// the record last. Nothing is fetched, decompressed or parsed again: the
// files were verified by digest when src pulled them, so this is a plain
// local copy (a reflink or copy_file_range where the filesystems allow).
//
// The order is Pull's: objects are committed in one batch (which enables
// fs-verity on each where dst's filesystem has it, checking the digest),
// then layer indexes, the composefs image (its fs-verity digest checked
// against its name), blobs, and the record. A crash leaves at most
// unreferenced files that Cleanup removes; the record never names
// anything missing.
func CopyImage(ctx context.Context, src, dst string, img *Image, rep *progress.Reporter) (*Image, *CopyStats, error) {
	if rep == nil {
		rep = progress.Discard()
	}
	if len(img.ComposefsDigest) != 64 || !isHex(img.ComposefsDigest) {
		return nil, nil, fmt.Errorf("copy image %s: bad composefs digest %q", img.Ref, img.ComposefsDigest)
	}
	fail := func(err error) (*Image, *CopyStats, error) {
		return nil, nil, fmt.Errorf("copy image %s to %s: %w", img.Ref, dst, err)
	}
	srcLock, err := lockRepo(src, false)
	if err != nil {
		return fail(err)
	}
	defer srcLock.Unlock()
	if err := ensureDirs(dst); err != nil {
		return fail(err)
	}
	dstLock, err := lockRepo(dst, false)
	if err != nil {
		return fail(err)
	}
	defer dstLock.Unlock()

	srcL, dstL := store.At(src), store.At(dst)
	srcObjects, err := composefs.OpenStore(srcL.Objects(), fsverity.SHA256)
	if err != nil {
		return fail(err)
	}
	dstObjects, err := composefs.OpenStore(dstL.Objects(), fsverity.SHA256)
	if err != nil {
		return fail(err)
	}

	// What the image names: the composefs image's external files, and
	// the objects of its layer indexes (a later layer may hide files of
	// an earlier one, and an index is only valid with all its objects).
	imageData, err := os.ReadFile(srcL.Image(img.ComposefsDigest))
	if err != nil {
		return fail(err)
	}
	if d, err := fsverity.Digest(bytes.NewReader(imageData), fsverity.SHA256); err != nil {
		return fail(err)
	} else if hex.EncodeToString(d) != img.ComposefsDigest {
		return fail(fmt.Errorf("composefs image %s in %s has digest %x", img.ComposefsDigest, src, d))
	}
	ci, err := composefs.ParseImage(imageData)
	if err != nil {
		return fail(err)
	}
	tree, err := ci.Tree()
	if err != nil {
		return fail(err)
	}
	want := map[string][]byte{}
	var order []string
	addObject := func(d []byte) {
		h := hex.EncodeToString(d)
		if _, ok := want[h]; !ok {
			want[h] = d
			order = append(order, h)
		}
	}
	if err := composefs.WalkTree(tree, func(p string, n *composefs.Inode) error {
		if n.Type() != composefs.SIFREG || n.Inline != nil || n.Size <= 64 && n.Digest == nil {
			return nil
		}
		if len(n.Digest) != fsverity.SHA256.Size() {
			return fmt.Errorf("%s has no object digest in the composefs image", p)
		}
		addObject(n.Digest)
		return nil
	}); err != nil {
		return fail(err)
	}
	var indexes []*LayerIndex
	seenDiff := map[string]bool{}
	for _, layer := range img.Layers {
		if seenDiff[layer.DiffID] {
			continue
		}
		seenDiff[layer.DiffID] = true
		if _, err := digest.Parse(layer.DiffID); err != nil {
			return fail(fmt.Errorf("layer diff_id %q: %w", layer.DiffID, err))
		}
		li, err := loadLayerIndex(src, layer.DiffID, srcObjects.Has)
		if err != nil {
			return fail(err)
		}
		if li == nil {
			continue // not indexed (or incomplete) in src: the next pull fetches it again
		}
		for _, e := range li.Entries {
			if e.Digest == "" {
				continue
			}
			d, err := hex.DecodeString(e.Digest)
			if err != nil || len(d) != fsverity.SHA256.Size() {
				return fail(fmt.Errorf("layer index %s: bad digest %q", layer.DiffID, e.Digest))
			}
			addObject(d)
		}
		indexes = append(indexes, li)
	}

	stats := &CopyStats{}
	var total int64
	var toCopy []string
	for _, h := range order {
		d := want[h]
		if dstObjects.Has(d) {
			stats.ObjectsPresent++
			continue
		}
		fi, err := os.Lstat(srcObjects.Path(d))
		if err != nil || !fi.Mode().IsRegular() {
			return fail(fmt.Errorf("object %s is missing from %s", h, srcL.Objects()))
		}
		total += fi.Size()
		toCopy = append(toCopy, h)
	}
	task := rep.Start(fmt.Sprintf("copy %d objects", len(toCopy)), total)
	batch := dstObjects.NewBatch()
	committed := false
	defer func() {
		if !committed {
			batch.Abort()
		}
	}()
	for i, h := range toCopy {
		if i%256 == 0 {
			if err := ctx.Err(); err != nil {
				task.Done(err, "")
				return fail(err)
			}
		}
		p := srcObjects.Path(want[h])
		fi, err := os.Lstat(p)
		if err != nil {
			task.Done(err, "")
			return fail(err)
		}
		if err := batch.AddFile(p, want[h]); err != nil {
			task.Done(err, "")
			return fail(err)
		}
		stats.Objects++
		stats.Bytes += fi.Size()
		task.Add(fi.Size())
	}
	if err := batch.Commit(); err != nil {
		task.Done(err, "")
		return fail(err)
	}
	committed = true
	task.Done(nil, fmt.Sprintf("%s, %d already there", humanBytes(stats.Bytes), stats.ObjectsPresent))

	// Indexes, image, blobs and record name only committed objects.
	for _, li := range indexes {
		if err := saveLayerIndex(dst, li); err != nil {
			return fail(err)
		}
		stats.LayerIndexes++
	}
	if fi, err := os.Stat(dstL.Image(img.ComposefsDigest)); err != nil || !fi.Mode().IsRegular() {
		if err := fsutil.WriteFileAtomic(dstL.Image(img.ComposefsDigest), imageData, 0o644); err != nil {
			return fail(err)
		}
	}
	for _, ds := range []string{img.ManifestDigest, img.ConfigDigest} {
		d, err := digest.Parse(ds)
		if err != nil {
			return fail(fmt.Errorf("blob digest %q: %w", ds, err))
		}
		data, err := os.ReadFile(filepath.Join(blobsDir(src), d.Encoded()))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fail(err)
		}
		if d.Algorithm().FromBytes(data) != d {
			return fail(fmt.Errorf("blob %s in %s does not match its digest", d, src))
		}
		if err := saveBlob(dst, d, data); err != nil {
			return fail(err)
		}
	}
	out := *img
	out.Stats = nil
	out.Layers = append([]Layer(nil), img.Layers...)
	out.Kernels = append([]string(nil), img.Kernels...)
	if strings.TrimSpace(out.Ref) == "" {
		return fail(errors.New("the image record has no reference"))
	}
	if err := saveRecord(dst, &out); err != nil {
		return fail(err)
	}
	return &out, stats, nil
}
