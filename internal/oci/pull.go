// Package oci imports OCI container images into berth's repository: it
// pulls them with containers/image from any transport (registry, oci:,
// oci-archive:, docker-archive:, containers-storage:), verifies them by
// policy and by digest, streams each layer's files straight into the
// composefs object store, applies the layers into one tree and writes the
// composefs image.
package oci

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	"go.podman.io/image/v5/image"
	"go.podman.io/image/v5/manifest"
	"go.podman.io/image/v5/pkg/blobinfocache/none"
	"go.podman.io/image/v5/pkg/compression"
	"go.podman.io/image/v5/signature"
	"go.podman.io/image/v5/transports/alltransports"
	"go.podman.io/image/v5/types"
	"go.podman.io/storage/pkg/configfile"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/progress"
	"github.com/berth-dev/berth/internal/store"
)

// Limits on image metadata.
const (
	DefaultMaxLayers = 256     // Docker stops at 127; overlayfs at 500 lowerdirs
	maxManifestSize  = 4 << 20 // what containers/image allows too
	maxConfigSize    = 16 << 20
)

// PullOptions configure Pull.
type PullOptions struct {
	Sysroot string // the store is Sysroot/berth/repo; "" means "/"
	// PolicyPath is the containers-policy.json to verify against; "" looks
	// it up as podman and skopeo do ($CONTAINERS_POLICY_JSON,
	// ~/.config/containers/policy.json, /etc/containers/policy.json).
	PolicyPath string
	Progress   *progress.Reporter // nil: silent
	// SystemContext, when set, is the base containers/image configuration
	// (auth file, registries.conf path, certificates, platform, ...).
	SystemContext *types.SystemContext
	// InsecureSkipTLSVerify allows plain HTTP and unverified TLS to
	// registries (for tests against 127.0.0.1 and for lab registries).
	InsecureSkipTLSVerify bool
	MaxFileSize           int64 // per regular file; default DefaultMaxFileSize
	MaxLayers             int   // default DefaultMaxLayers
	Jobs                  int   // layers imported in parallel; default 2
	Warnings              io.Writer
}

// PullStats counts the work a Pull did (the layer cache is doing its job
// when a re-pull fetches nothing).
type PullStats struct {
	LayersFetched int   // layer blobs downloaded and parsed
	LayersReused  int   // layers taken from their index without fetching
	BytesFetched  int64 // layer blob bytes read
	FilesHashed   int   // regular files > 64 bytes streamed into the store
	ContentBytes  int64 // uncompressed file content bytes read from layers
}

var defaultPolicyNotice sync.Once

// Pull fetches ref, verifies it against the signature policy, imports its
// layers into the object store and writes its composefs image. A ref
// without a transport prefix is a registry reference (docker://); without
// a registry either, it is a short name resolved as podman does
// (resolveShortName).
func Pull(ctx context.Context, ref string, opts PullOptions) (*Image, error) {
	if opts.Jobs <= 0 {
		opts.Jobs = 2
	}
	if opts.MaxLayers <= 0 {
		opts.MaxLayers = DefaultMaxLayers
	}
	if opts.Warnings == nil {
		opts.Warnings = os.Stderr
	}
	sysroot := opts.Sysroot
	if sysroot == "" {
		sysroot = "/"
	}
	sys := &types.SystemContext{}
	if opts.SystemContext != nil {
		c := *opts.SystemContext
		sys = &c
	}
	if opts.InsecureSkipTLSVerify {
		sys.DockerInsecureSkipTLSVerify = types.OptionalBoolTrue
		sys.OCIInsecureSkipTLSVerify = true
	}
	// A short name ("debian:trixie") resolves through registries.conf.
	cands, err := pullCandidates(sys, ref, opts.Warnings)
	if err != nil {
		return nil, err
	}
	pc, err := policyContext(opts, sys)
	if err != nil {
		return nil, err
	}
	defer pc.Destroy()

	if err := ensureDirs(sysroot); err != nil {
		return nil, err
	}
	lock, err := store.At(sysroot).LockShared()
	if err != nil {
		return nil, err
	}
	defer lock.Unlock()

	src, cand, err := openFirst(ctx, sys, ref, cands)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	iref := cand.ref
	ref = cand.name // a short name is recorded as what it resolved to

	top := image.UnparsedInstance(src, nil)
	allowed, err := pc.IsRunningImageAllowed(ctx, top)
	if !allowed || err != nil {
		if err == nil {
			err = errors.New("no reason given")
		}
		return nil, fmt.Errorf("%s is rejected by the signature policy: %w", ref, err)
	}
	manBlob, manType, err := top.Manifest(ctx)
	if err != nil {
		return nil, fmt.Errorf("read manifest of %s: %w", ref, err)
	}
	if err := checkManifestBlob(manBlob); err != nil {
		return nil, fmt.Errorf("manifest of %s: %w", ref, err)
	}
	var instance *digest.Digest
	if manType == "" {
		manType = manifest.GuessMIMEType(manBlob)
	}
	if manifest.MIMETypeIsMultiImage(manType) {
		list, err := manifest.ListFromBlob(manBlob, manType)
		if err != nil {
			return nil, fmt.Errorf("parse manifest list of %s: %w", ref, err)
		}
		d, err := list.ChooseInstance(sys)
		if err != nil {
			return nil, fmt.Errorf("choose image for this platform from %s: %w", ref, err)
		}
		instance = &d
		// The list was checked by policy; UnparsedInstance verifies that
		// the instance manifest matches the digest the list names.
		manBlob, manType, err = image.UnparsedInstance(src, instance).Manifest(ctx)
		if err != nil {
			return nil, fmt.Errorf("read manifest %s of %s: %w", d, ref, err)
		}
		if err := checkManifestBlob(manBlob); err != nil {
			return nil, fmt.Errorf("manifest %s of %s: %w", d, ref, err)
		}
		if manType == "" {
			manType = manifest.GuessMIMEType(manBlob)
		}
	}
	img, err := importImage(ctx, src, instance, manBlob, manType, sysroot, opts)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	img.Ref = ref
	img.Transport = iref.Transport().Name()
	if err := saveRecord(sysroot, img); err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, err)
	}
	return img, nil
}

// ParseReference parses a containers/image reference ("docker://…",
// "oci-archive:…", …). One without a transport is parsed as def+ref (def is
// "docker://" for pulls, "containers-storage:" for berth commit's output).
// This is the one parser of image references in berth.
func ParseReference(ref, def string) (types.ImageReference, error) {
	if strings.TrimSpace(ref) == "" {
		return nil, errors.New("no image reference given")
	}
	r, err := alltransports.ParseImageName(ref)
	if err == nil {
		return r, nil
	}
	if alltransports.TransportFromImageName(ref) == nil && !strings.Contains(ref, "://") {
		if r2, err2 := alltransports.ParseImageName(def + ref); err2 == nil {
			return r2, nil
		}
	}
	return nil, fmt.Errorf("parse image reference %q: %w", ref, err)
}

func parseRef(ref string) (types.ImageReference, error) { return ParseReference(ref, "docker://") }

func policyContext(opts PullOptions, sys *types.SystemContext) (*signature.PolicyContext, error) {
	var policy *signature.Policy
	var err error
	if opts.PolicyPath != "" {
		policy, err = signature.NewPolicyFromFile(opts.PolicyPath)
		if err != nil {
			return nil, fmt.Errorf("signature policy %s: %w", opts.PolicyPath, err)
		}
	} else {
		policy, err = signature.DefaultPolicy(sys)
		// Only "no policy file anywhere" falls back; a path named by
		// $CONTAINERS_POLICY_JSON that does not exist is an error, as in podman.
		if errors.Is(err, configfile.ErrConfigFileNotFound) {
			defaultPolicyNotice.Do(func() {
				fmt.Fprintln(opts.Warnings, "berth: no containers-policy.json found (looked in $CONTAINERS_POLICY_JSON, ~/.config/containers/policy.json, /etc/containers/policy.json); using the containers default: accept any image without signature verification")
			})
			policy = &signature.Policy{Default: signature.PolicyRequirements{signature.NewPRInsecureAcceptAnything()}}
		} else if err != nil {
			return nil, fmt.Errorf("signature policy: %w", err)
		}
	}
	pc, err := signature.NewPolicyContext(policy)
	if err != nil {
		return nil, fmt.Errorf("signature policy: %w", err)
	}
	return pc, nil
}

// checkManifestBlob refuses a manifest that is not a JSON object before
// containers/image interprets it.
func checkManifestBlob(b []byte) error {
	if len(b) > maxManifestSize {
		return fmt.Errorf("manifest is %d bytes, more than %d", len(b), maxManifestSize)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(b, &obj); err != nil {
		return fmt.Errorf("manifest is not a JSON object: %w", err)
	}
	return nil
}

type imageConfig struct {
	Created      *time.Time `json:"created"`
	Architecture string     `json:"architecture"`
	OS           string     `json:"os"`
	RootFS       *struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

// layerJob is one distinct layer of the image (an image may list the same
// layer twice; it is imported once).
type layerJob struct {
	info    types.BlobInfo
	diffID  digest.Digest
	entries []Entry
	fetched bool
}

func importImage(ctx context.Context, src types.ImageSource, instance *digest.Digest, manBlob []byte, manType, sysroot string, opts PullOptions) (*Image, error) {
	var shape struct {
		SchemaVersion int               `json:"schemaVersion"`
		Layers        []json.RawMessage `json:"layers"`
		FSLayers      []json.RawMessage `json:"fsLayers"`
	}
	if err := json.Unmarshal(manBlob, &shape); err != nil {
		return nil, fmt.Errorf("parse manifest: %w", err)
	}
	if shape.SchemaVersion == 1 || len(shape.FSLayers) > 0 {
		return nil, errors.New("docker schema 1 manifests are not supported; push the image again with a current tool")
	}
	if n := len(shape.Layers); n > opts.MaxLayers {
		return nil, fmt.Errorf("manifest lists %d layers, more than the limit of %d", n, opts.MaxLayers)
	}
	if len(shape.Layers) == 0 {
		return nil, errors.New("manifest lists no layers")
	}
	m, err := manifest.FromBlob(manBlob, manType)
	if err != nil {
		return nil, fmt.Errorf("parse manifest: %w", err)
	}
	var md digest.Digest
	if instance != nil {
		md = *instance
	} else if md, err = manifest.Digest(manBlob); err != nil {
		return nil, fmt.Errorf("manifest digest: %w", err)
	}

	cfgInfo := m.ConfigInfo()
	cfgBlob, err := fetchSmallBlob(ctx, src, cfgInfo, maxConfigSize)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var cfg imageConfig
	if err := json.Unmarshal(cfgBlob, &cfg); err != nil {
		return nil, fmt.Errorf("parse config %s: %w", cfgInfo.Digest, err)
	}
	layerInfos := m.LayerInfos()
	fetchInfos := make([]types.BlobInfo, len(layerInfos))
	for i, li := range layerInfos {
		fetchInfos[i] = li.BlobInfo
	}
	// containers-storage hands out uncompressed layers under other digests.
	if updated, err := src.LayerInfosForCopy(ctx, instance); err != nil {
		return nil, fmt.Errorf("layer infos: %w", err)
	} else if updated != nil {
		if len(updated) != len(layerInfos) {
			return nil, fmt.Errorf("source reports %d layers, manifest %d", len(updated), len(layerInfos))
		}
		fetchInfos = updated
	}
	if cfg.RootFS == nil {
		return nil, fmt.Errorf("config %s has no rootfs section", cfgInfo.Digest)
	}
	if cfg.RootFS.Type != "layers" {
		return nil, fmt.Errorf("config %s: rootfs.type is %q, not \"layers\"", cfgInfo.Digest, cfg.RootFS.Type)
	}
	if len(cfg.RootFS.DiffIDs) != len(layerInfos) {
		return nil, fmt.Errorf("config %s lists %d rootfs.diff_ids for %d manifest layers", cfgInfo.Digest, len(cfg.RootFS.DiffIDs), len(layerInfos))
	}

	// The config (verified above) fixes the layers' diff_ids and so the
	// whole tree: an image recorded with the same config has exactly this
	// composefs image, and a recorded image's objects are kept by Cleanup.
	if known := recordedWithConfig(sysroot, cfgInfo.Digest.String()); known != nil {
		img := *known
		img.ManifestDigest = md.String()
		img.Pulled = time.Now().UTC()
		img.Stats = &PullStats{LayersReused: len(layerInfos)}
		for i := range img.Layers {
			if i < len(layerInfos) {
				img.Layers[i].Digest = layerInfos[i].Digest.String()
				img.Layers[i].Size = layerInfos[i].Size
				img.Layers[i].MediaType = layerInfos[i].MediaType
			}
		}
		if err := saveBlob(sysroot, md, manBlob); err != nil {
			return nil, err
		}
		return &img, nil
	}

	objects, err := composefs.OpenStore(store.At(sysroot).Objects(), fsverity.SHA256)
	if err != nil {
		return nil, err
	}
	jobs := map[digest.Digest]*layerJob{}
	order := make([]*layerJob, len(layerInfos))
	var distinct []*layerJob
	for i, info := range fetchInfos {
		d, err := digest.Parse(cfg.RootFS.DiffIDs[i])
		if err != nil {
			return nil, fmt.Errorf("config rootfs.diff_ids[%d] %q: %w", i, cfg.RootFS.DiffIDs[i], err)
		}
		if err := info.Digest.Validate(); err != nil {
			return nil, fmt.Errorf("manifest layer %d digest %q: %w", i, info.Digest, err)
		}
		if strings.Contains(info.MediaType, "encrypted") {
			return nil, fmt.Errorf("layer %s is encrypted (%s); encrypted images are not supported", info.Digest, info.MediaType)
		}
		j := jobs[d]
		if j == nil {
			j = &layerJob{info: info, diffID: d}
			jobs[d] = j
			distinct = append(distinct, j)
		}
		order[i] = j
	}

	stats := &PullStats{}
	// Decide from the config's diff_ids, before any layer blob is fetched,
	// which layers are already known.
	var toFetch []*layerJob
	for _, j := range distinct {
		li, err := loadLayerIndex(sysroot, j.diffID.String(), objects.Has)
		if err != nil {
			return nil, err
		}
		if li != nil {
			j.entries = li.Entries
			stats.LayersReused++
			continue
		}
		toFetch = append(toFetch, j)
	}

	batch := objects.NewBatch()
	committed := false
	defer func() {
		if !committed {
			batch.Abort()
		}
	}()
	if err := fetchLayers(ctx, src, toFetch, batch, opts, stats); err != nil {
		return nil, err
	}
	// The tree is built before anything is committed, so an image whose
	// layers do not fit together leaves no trace in the store.
	root := NewRoot()
	for i, j := range order {
		if err := applyLayer(root, j.entries); err != nil {
			return nil, fmt.Errorf("layer %d (%s): %w", i, j.info.Digest, err)
		}
	}
	if err := batch.Commit(); err != nil {
		return nil, fmt.Errorf("commit objects: %w", err)
	}
	committed = true
	// Indexes name only committed objects, so they are written after Commit.
	for _, j := range toFetch {
		if err := saveLayerIndex(sysroot, &LayerIndex{Version: layerIndexVersion, DiffID: j.diffID.String(), Entries: j.entries}); err != nil {
			return nil, fmt.Errorf("save index of layer %s: %w", j.diffID, err)
		}
	}
	kernels, err := FindKernels(root)
	var nk *NoKernelError
	if err != nil && !errors.As(err, &nk) {
		return nil, err
	}
	cfsHex, _, err := store.At(sysroot).AddImage(root)
	if err != nil {
		return nil, err
	}
	for _, b := range []struct {
		d    digest.Digest
		data []byte
	}{{md, manBlob}, {cfgInfo.Digest, cfgBlob}} {
		if err := saveBlob(sysroot, b.d, b.data); err != nil {
			return nil, err
		}
	}
	files, size := treeStats(root)
	img := &Image{
		ManifestDigest:  md.String(),
		ConfigDigest:    cfgInfo.Digest.String(),
		ComposefsDigest: cfsHex,
		Kernels:         kernels,
		Size:            size,
		Files:           files,
		Architecture:    cfg.Architecture,
		OS:              cfg.OS,
		Pulled:          time.Now().UTC(),
		Stats:           stats,
	}
	if img.Kernels == nil {
		img.Kernels = []string{}
	}
	if cfg.Created != nil {
		img.Created = cfg.Created.UTC()
	}
	for i, j := range order {
		img.Layers = append(img.Layers, Layer{
			Digest:    layerInfos[i].Digest.String(),
			DiffID:    j.diffID.String(),
			Size:      layerInfos[i].Size,
			MediaType: layerInfos[i].MediaType,
			Files:     len(j.entries),
		})
	}
	return img, nil
}

func fetchLayers(ctx context.Context, src types.ImageSource, jobs []*layerJob, batch *composefs.Batch, opts PullOptions, stats *PullStats) error {
	if len(jobs) == 0 {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	parallel := opts.Jobs
	if !src.HasThreadSafeGetBlob() {
		parallel = 1
	}
	var (
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
		sem      = make(chan struct{}, parallel)
	)
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			defer func() { <-sem }()
			if ctx.Err() != nil {
				return
			}
			ls, err := fetchLayer(ctx, src, j, batch, opts)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
					cancel()
				}
				return
			}
			stats.LayersFetched++
			stats.BytesFetched += ls.blobBytes
			stats.FilesHashed += ls.hashed
			stats.ContentBytes += ls.content
		}()
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return firstErr
}

type layerStats struct {
	blobBytes int64
	hashed    int
	content   int64
}

// countingSink counts the files a layer streams into the store.
type countingSink struct {
	b *composefs.Batch
	n atomic.Int64
}

func (c *countingSink) AddReader(r io.Reader) ([]byte, int64, error) {
	c.n.Add(1)
	return c.b.AddReader(r)
}

func (c *countingSink) AddBytes(data []byte) ([]byte, error) {
	c.n.Add(1)
	return c.b.AddBytes(data)
}

// fetchLayer streams one layer blob: the blob digest is checked on the
// compressed bytes, the diff_id on the uncompressed tar, and the files go
// to the store while the tar is read. Nothing of the layer lands on disk
// except the objects.
func fetchLayer(ctx context.Context, src types.ImageSource, j *layerJob, batch *composefs.Batch, opts PullOptions) (layerStats, error) {
	var ls layerStats
	short := j.info.Digest.Encoded()
	if len(short) > 12 {
		short = short[:12]
	}
	task := opts.Progress.Start("layer "+short, j.info.Size)
	rc, _, err := src.GetBlob(ctx, j.info, none.NoCache)
	if err != nil {
		err = fmt.Errorf("fetch layer %s: %w", j.info.Digest, err)
		task.Done(err, "")
		return ls, err
	}
	defer rc.Close()
	entries, ls, err := readLayerBlob(rc, j.info, j.diffID, batch, opts, task)
	if err != nil {
		err = fmt.Errorf("layer %s: %w", j.info.Digest, err)
		task.Done(err, "")
		return ls, err
	}
	j.entries, j.fetched = entries, true
	task.Done(nil, fmt.Sprintf("%d entries, %s", len(entries), humanBytes(ls.content)))
	return ls, nil
}

func readLayerBlob(blob io.Reader, info types.BlobInfo, diffID digest.Digest, batch *composefs.Batch, opts PullOptions, task *progress.Task) ([]Entry, layerStats, error) {
	var ls layerStats
	if !info.Digest.Algorithm().Available() || !diffID.Algorithm().Available() {
		return nil, ls, fmt.Errorf("unsupported digest algorithm in %s / %s", info.Digest, diffID)
	}
	blobHash := info.Digest.Algorithm().Hash()
	counter := &countWriter{}
	limited := blob
	if info.Size > 0 {
		limited = io.LimitReader(blob, info.Size+1)
	}
	var sinks io.Writer = io.MultiWriter(blobHash, counter, task)
	br := bufio.NewReaderSize(io.TeeReader(limited, sinks), 1<<20)
	dec, compressed, err := compression.AutoDecompress(br)
	if err != nil {
		return nil, ls, err
	}
	defer dec.Close()
	// An uncompressed blob is its own tar stream: the blob hash is the
	// diff_id hash when the algorithms agree, so hash it once.
	diffHash := diffID.Algorithm().Hash()
	var tarStream io.Reader = io.TeeReader(dec, diffHash)
	if !compressed && diffID.Algorithm() == info.Digest.Algorithm() {
		diffHash, tarStream = blobHash, dec
	}
	sink := &countingSink{b: batch}
	var content int64
	entries, err := readLayer(tarStream, sink, readLimits{maxFileSize: opts.MaxFileSize}, func(n int64) { content += n })
	ls.hashed, ls.content = int(sink.n.Load()), content
	if err != nil {
		return nil, ls, err
	}
	// The digests cover the whole stream, including what follows the tar
	// end-of-archive marker.
	if _, err := io.Copy(io.Discard, tarStream); err != nil {
		return nil, ls, fmt.Errorf("read layer after end of archive: truncated layer: %w", err)
	}
	if _, err := io.Copy(io.Discard, br); err != nil {
		return nil, ls, fmt.Errorf("read layer blob: %w", err)
	}
	ls.blobBytes = counter.n
	if info.Size > 0 && counter.n != info.Size {
		return nil, ls, fmt.Errorf("layer blob is %d bytes, manifest says %d", counter.n, info.Size)
	}
	if got := digest.NewDigest(info.Digest.Algorithm(), blobHash); got != info.Digest {
		return nil, ls, fmt.Errorf("layer blob digest mismatch: manifest says %s, content is %s", info.Digest, got)
	}
	if got := digest.NewDigest(diffID.Algorithm(), diffHash); got != diffID {
		return nil, ls, fmt.Errorf("uncompressed layer digest mismatch: config rootfs.diff_ids says %s, content is %s", diffID, got)
	}
	return entries, ls, nil
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

func fetchSmallBlob(ctx context.Context, src types.ImageSource, info types.BlobInfo, limit int64) ([]byte, error) {
	if err := info.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("digest %q: %w", info.Digest, err)
	}
	if info.Size > limit {
		return nil, fmt.Errorf("blob %s is %d bytes, more than %d", info.Digest, info.Size, limit)
	}
	rc, _, err := src.GetBlob(ctx, info, none.NoCache)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", info.Digest, err)
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, limit+1))
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", info.Digest, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("blob %s is more than %d bytes", info.Digest, limit)
	}
	if got := info.Digest.Algorithm().FromBytes(data); got != info.Digest {
		return nil, fmt.Errorf("blob digest mismatch: manifest says %s, content is %s", info.Digest, got)
	}
	return data, nil
}

func saveBlob(sysroot string, d digest.Digest, data []byte) error {
	p := filepath.Join(blobsDir(sysroot), d.Encoded())
	if _, err := os.Stat(p); err == nil {
		return nil
	}
	return fsutil.WriteFileAtomic(p, data, 0o644)
}

// treeStats counts the entries of a tree and the content bytes of its
// distinct regular files.
func treeStats(root *composefs.Inode) (files int, size int64) {
	seen := map[*composefs.Inode]bool{}
	var walk func(n *composefs.Inode)
	walk = func(n *composefs.Inode) {
		for _, c := range n.Children {
			files++
			if c.IsDir() {
				walk(c)
			} else if c.Type() == composefs.SIFREG && !seen[c] {
				seen[c] = true
				size += int64(c.Size)
			}
		}
	}
	walk(root)
	return files, size
}
