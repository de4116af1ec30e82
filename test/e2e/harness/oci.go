package harness

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/klauspost/compress/gzip"
	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/fsutil"
)

// PackVersion names the layout of the images PackOCIArchive writes; it is part of the
// cache key, so changing the layer split or the tar rules rebuilds cached images.
const PackVersion = "mkguest-1"

// Media types of the OCI image spec.
const (
	mediaIndex    = "application/vnd.oci.image.index.v1+json"
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayerGz  = "application/vnd.oci.image.layer.v1.tar+gzip"
)

// layerSpec is one layer of the guest image: the paths it holds.
type layerSpec struct {
	name  string
	match func(rel string) bool
}

func under(rel, dir string) bool { return rel == dir || strings.HasPrefix(rel, dir+"/") }

// guestLayers splits a root filesystem the way a distribution image is usually layered:
// the kernel (changes with every kernel update), the rest of /usr, everything else.
// The first matching spec wins; the last matches everything.
var guestLayers = []layerSpec{
	{"kernel", func(rel string) bool { return under(rel, "usr/lib/modules") || under(rel, "boot") }},
	{"usr", func(rel string) bool { return under(rel, "usr") }},
	{"rest", func(string) bool { return true }},
}

// PackOptions say what goes into the image besides the tree.
type PackOptions struct {
	RefName string            // org.opencontainers.image.ref.name in index.json, default "latest"
	Labels  map[string]string // image config labels
	// Skip lists top-level names left out of the image (e.g. the cache's ".recipe").
	Skip []string
}

// PackResult describes a written image.
type PackResult struct {
	Path           string
	ManifestDigest string   // sha256:<hex>
	ConfigDigest   string   // sha256:<hex>
	Layers         []string // compressed layer digests, base first
	DiffIDs        []string // uncompressed layer digests, base first
	Size           int64    // archive size in bytes
}

// layerWriter streams one tar layer through gzip into a temporary file while hashing the
// uncompressed (diff_id) and compressed (blob digest) bytes.
type layerWriter struct {
	spec      layerSpec
	file      *os.File
	blobHash  hash.Hash
	diffHash  hash.Hash
	gz        *gzip.Writer
	tw        *tar.Writer
	dirs      map[string]bool   // directories already written to this layer
	links     map[uint64]string // inode -> first path written to this layer (hardlinks)
	size      int64
	blobDigst string
	diffDigst string
}

func newLayerWriter(dir string, spec layerSpec) (*layerWriter, error) {
	f, err := os.CreateTemp(dir, ".layer-"+spec.name+"-")
	if err != nil {
		return nil, fmt.Errorf("layer %s: %w", spec.name, err)
	}
	lw := &layerWriter{spec: spec, file: f, blobHash: sha256.New(), diffHash: sha256.New(),
		dirs: map[string]bool{}, links: map[uint64]string{}}
	lw.gz = gzip.NewWriter(io.MultiWriter(f, lw.blobHash))
	lw.tw = tar.NewWriter(io.MultiWriter(lw.gz, lw.diffHash))
	return lw, nil
}

func (lw *layerWriter) finish() error {
	if err := lw.tw.Close(); err != nil {
		return fmt.Errorf("layer %s: close tar: %w", lw.spec.name, err)
	}
	if err := lw.gz.Close(); err != nil {
		return fmt.Errorf("layer %s: close gzip: %w", lw.spec.name, err)
	}
	st, err := lw.file.Stat()
	if err != nil {
		return fmt.Errorf("layer %s: %w", lw.spec.name, err)
	}
	lw.size = st.Size()
	lw.blobDigst = "sha256:" + hex.EncodeToString(lw.blobHash.Sum(nil))
	lw.diffDigst = "sha256:" + hex.EncodeToString(lw.diffHash.Sum(nil))
	return nil
}

func (lw *layerWriter) discard() {
	lw.file.Close()
	os.Remove(lw.file.Name())
}

// PackOCIArchive packs the root filesystem directory rootfs into a multi-layer OCI image
// written as an oci-archive (a tar of an OCI image layout) at out. The layer tars are
// deterministic: entries in lexical order, modification times as in the tree (whole
// seconds), numeric uid/gid without names, extended attributes as PAX SCHILY.xattr
// records, hardlinks within a layer as link entries. Device nodes under /dev are left out
// (a container image has none; the guest's devtmpfs provides them); any other device node,
// socket or unknown file type is an error.
func PackOCIArchive(rootfs, out string, opts PackOptions) (*PackResult, error) {
	if opts.RefName == "" {
		opts.RefName = "latest"
	}
	skip := map[string]bool{}
	for _, s := range opts.Skip {
		skip[s] = true
	}
	outDir := filepath.Dir(out)
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, fmt.Errorf("pack %s: %w", out, err)
	}
	layers := make([]*layerWriter, len(guestLayers))
	defer func() {
		for _, lw := range layers {
			if lw != nil {
				lw.discard()
			}
		}
	}()
	for i, spec := range guestLayers {
		lw, err := newLayerWriter(outDir, spec)
		if err != nil {
			return nil, err
		}
		layers[i] = lw
	}
	var newest int64
	err := filepath.WalkDir(rootfs, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(rootfs, p)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		rel = filepath.ToSlash(rel)
		if !strings.Contains(rel, "/") && skip[rel] {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("lstat %s: %w", p, err)
		}
		typ := st.Mode & unix.S_IFMT
		if (typ == unix.S_IFCHR || typ == unix.S_IFBLK) && strings.HasPrefix(rel, "dev/") {
			return nil
		}
		if st.Mtim.Sec > newest {
			newest = st.Mtim.Sec
		}
		for _, lw := range layers {
			if lw.spec.match(rel) {
				return lw.add(rootfs, rel, &st)
			}
		}
		return fmt.Errorf("no layer for %s", rel) // unreachable: the last spec matches all
	})
	if err != nil {
		return nil, fmt.Errorf("pack %s: %w", rootfs, err)
	}
	for _, lw := range layers {
		if err := lw.finish(); err != nil {
			return nil, err
		}
	}
	return writeArchive(out, layers, time.Unix(newest, 0).UTC(), opts)
}

// add writes rel (with any ancestor directories this layer lacks) to the layer.
func (lw *layerWriter) add(rootfs, rel string, st *unix.Stat_t) error {
	parts := strings.Split(rel, "/")
	for i := 1; i < len(parts); i++ {
		dir := strings.Join(parts[:i], "/")
		if lw.dirs[dir] {
			continue
		}
		var dst unix.Stat_t
		if err := unix.Lstat(filepath.Join(rootfs, dir), &dst); err != nil {
			return fmt.Errorf("lstat %s: %w", dir, err)
		}
		if err := lw.writeEntry(rootfs, dir, &dst); err != nil {
			return err
		}
	}
	return lw.writeEntry(rootfs, rel, st)
}

func (lw *layerWriter) writeEntry(rootfs, rel string, st *unix.Stat_t) error {
	full := filepath.Join(rootfs, rel)
	hdr := &tar.Header{
		Name:    rel,
		Mode:    int64(st.Mode & 0o7777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: time.Unix(st.Mtim.Sec, 0),
		Format:  tar.FormatPAX,
	}
	var content *os.File
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		if lw.dirs[rel] {
			return nil
		}
		lw.dirs[rel] = true
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
	case unix.S_IFLNK:
		target, err := os.Readlink(full)
		if err != nil {
			return fmt.Errorf("readlink %s: %w", full, err)
		}
		hdr.Typeflag = tar.TypeSymlink
		hdr.Linkname = target
	case unix.S_IFREG:
		key := st.Ino
		if first, ok := lw.links[key]; ok && st.Nlink > 1 {
			hdr.Typeflag = tar.TypeLink
			hdr.Linkname = first
			break
		}
		if st.Nlink > 1 {
			lw.links[key] = rel
		}
		hdr.Typeflag = tar.TypeReg
		hdr.Size = st.Size
		f, err := os.Open(full)
		if err != nil {
			return fmt.Errorf("open %s: %w", full, err)
		}
		defer f.Close()
		content = f
	case unix.S_IFIFO:
		hdr.Typeflag = tar.TypeFifo
	default:
		return fmt.Errorf("%s: unsupported file type %#o in a guest image", rel, st.Mode&unix.S_IFMT)
	}
	xattrs, err := readXattrs(full)
	if err != nil {
		return err
	}
	if len(xattrs) > 0 {
		hdr.PAXRecords = map[string]string{}
		for k, v := range xattrs {
			hdr.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	if err := lw.tw.WriteHeader(hdr); err != nil {
		return fmt.Errorf("tar header %s: %w", rel, err)
	}
	if content != nil {
		n, err := io.Copy(lw.tw, content)
		if err != nil {
			return fmt.Errorf("tar %s: %w", rel, err)
		}
		if n != hdr.Size {
			return fmt.Errorf("tar %s: size changed while packing (%d != %d)", rel, n, hdr.Size)
		}
	}
	return nil
}

// readXattrs returns the extended attributes of path (not following symlinks).
func readXattrs(path string) (map[string]string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(path, buf)
	if errors.Is(err, unix.ERANGE) {
		sz, err2 := unix.Llistxattr(path, nil)
		if err2 != nil {
			return nil, fmt.Errorf("listxattr %s: %w", path, err2)
		}
		buf = make([]byte, sz)
		n, err = unix.Llistxattr(path, buf)
	}
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listxattr %s: %w", path, err)
	}
	out := map[string]string{}
	for _, name := range bytes.Split(buf[:n], []byte{0}) {
		if len(name) == 0 {
			continue
		}
		sz, err := unix.Lgetxattr(path, string(name), nil)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", path, name, err)
		}
		val := make([]byte, sz)
		sz, err = unix.Lgetxattr(path, string(name), val)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", path, name, err)
		}
		out[string(name)] = string(val[:sz])
	}
	return out, nil
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// writeArchive writes config, manifest and index and tars the layout with the layer blobs
// into out (temporary name, fsync, rename).
func writeArchive(out string, layers []*layerWriter, created time.Time, opts PackOptions) (*PackResult, error) {
	res := &PackResult{Path: out}
	type history struct {
		Created   string `json:"created"`
		CreatedBy string `json:"created_by"`
	}
	config := map[string]any{
		"created":      created.Format(time.RFC3339),
		"architecture": "amd64",
		"os":           "linux",
		"config": map[string]any{
			"Env":    []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			"Cmd":    []string{"/bin/bash"},
			"Labels": opts.Labels,
		},
	}
	var layerDescs []descriptor
	var hist []history
	var diffIDs []string
	for _, lw := range layers {
		layerDescs = append(layerDescs, descriptor{MediaType: mediaLayerGz, Digest: lw.blobDigst, Size: lw.size})
		diffIDs = append(diffIDs, lw.diffDigst)
		hist = append(hist, history{Created: created.Format(time.RFC3339), CreatedBy: PackVersion + ": " + lw.spec.name})
		res.Layers = append(res.Layers, lw.blobDigst)
	}
	res.DiffIDs = diffIDs
	config["rootfs"] = map[string]any{"type": "layers", "diff_ids": diffIDs}
	config["history"] = hist
	configJSON, err := json.Marshal(config)
	if err != nil {
		return nil, err
	}
	configDesc := descriptor{MediaType: mediaConfig, Digest: sha256Digest(configJSON), Size: int64(len(configJSON))}
	res.ConfigDigest = configDesc.Digest
	manifestJSON, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaManifest,
		"config":        configDesc,
		"layers":        layerDescs,
	})
	if err != nil {
		return nil, err
	}
	manifestDesc := descriptor{MediaType: mediaManifest, Digest: sha256Digest(manifestJSON), Size: int64(len(manifestJSON)),
		Annotations: map[string]string{"org.opencontainers.image.ref.name": opts.RefName}}
	res.ManifestDigest = manifestDesc.Digest
	indexJSON, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaIndex,
		"manifests":     []descriptor{manifestDesc},
	})
	if err != nil {
		return nil, err
	}

	f, err := os.CreateTemp(filepath.Dir(out), ".tmp-"+filepath.Base(out)+"-")
	if err != nil {
		return nil, fmt.Errorf("write %s: %w", out, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	tw := tar.NewWriter(f)
	epoch := time.Unix(0, 0)
	addDir := func(name string) error {
		return tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX})
	}
	addBytes := func(name string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(b)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	blobs := map[string][]byte{configDesc.Digest: configJSON, manifestDesc.Digest: manifestJSON}
	layerByDigest := map[string]*layerWriter{}
	names := []string{configDesc.Digest, manifestDesc.Digest}
	for _, lw := range layers {
		if _, dup := layerByDigest[lw.blobDigst]; !dup {
			names = append(names, lw.blobDigst)
		}
		layerByDigest[lw.blobDigst] = lw
	}
	sort.Strings(names)
	steps := []func() error{
		func() error { return addBytes("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)) },
		func() error { return addBytes("index.json", indexJSON) },
		func() error { return addDir("blobs/") },
		func() error { return addDir("blobs/sha256/") },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return nil, fmt.Errorf("write %s: %w", tmp, err)
		}
	}
	for _, d := range names {
		name := "blobs/sha256/" + strings.TrimPrefix(d, "sha256:")
		if b, ok := blobs[d]; ok {
			if err := addBytes(name, b); err != nil {
				return nil, fmt.Errorf("write %s: %w", tmp, err)
			}
			continue
		}
		lw := layerByDigest[d]
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: lw.size, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, fmt.Errorf("write %s: %w", tmp, err)
		}
		if _, err := lw.file.Seek(0, io.SeekStart); err != nil {
			return nil, err
		}
		if _, err := io.Copy(tw, lw.file); err != nil {
			return nil, fmt.Errorf("write %s: layer %s: %w", tmp, lw.spec.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := f.Chmod(0o644); err != nil {
		return nil, fmt.Errorf("chmod %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("fsync %s: %w", tmp, err)
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	res.Size = st.Size()
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return nil, fmt.Errorf("rename %s: %w", out, err)
	}
	ok = true
	if err := fsutil.SyncDir(filepath.Dir(out)); err != nil {
		return nil, err
	}
	return res, nil
}

func sha256Digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}
