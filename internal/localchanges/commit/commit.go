// Package commit turns the local changes of a deployment into an OCI
// image: the deployment's own base image with one more layer that holds
// the changes (berth commit).
//
// berth keeps images as objects plus per-layer indexes, not as the layer
// blobs it pulled, so the base image's blobs are copied again from where
// the deployment was pulled (its image_ref, pinned to the manifest digest
// the deployment records; Options.Base names another place holding the
// same image). Its layers keep their digests, so registries and container
// stores share them with the base image. (Regenerating the layers from
// berth's store would give the same content under other digests, and
// lose that sharing and the link to the original's signatures.)
//
// This package uses containers/image; it is kept apart from
// internal/localchanges, which berth-init links.
package commit

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	imgspec "github.com/opencontainers/image-spec/specs-go"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
	"go.podman.io/image/v5/docker"
	"go.podman.io/image/v5/docker/reference"
	"go.podman.io/image/v5/image"
	"go.podman.io/image/v5/manifest"
	"go.podman.io/image/v5/pkg/blobinfocache/none"
	"go.podman.io/image/v5/signature"
	"go.podman.io/image/v5/types"
	"go.podman.io/storage/pkg/configfile"

	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/store"
)

// Options configure Commit.
type Options struct {
	Sysroot    string // "" = "/"
	Deployment string // deployment id (required)
	// Dest is where the image goes: a containers/image reference
	// (oci-archive:/x.tar[:tag], oci:DIR[:tag], containers-storage:NAME,
	// docker://...); without a transport it is containers-storage:Dest.
	Dest string
	// Base is where to copy the base image from; "" = the deployment's
	// image_ref (a registry reference pinned to its manifest digest).
	Base string
	// PolicyPath is the containers-policy.json the base image is checked
	// against ("" = the default lookup, as oci.Pull).
	PolicyPath string
	// SystemContext configures containers/image (auth, registries.conf,
	// storage); nil = the defaults.
	SystemContext         *types.SystemContext
	InsecureSkipTLSVerify bool
	Message               string // history comment of the new layer
	Now                   func() time.Time
	// Report receives containers/image's copy progress (nil: silent).
	Report io.Writer
	// Warnings receives notices (default os.Stderr).
	Warnings io.Writer
	// TmpDir holds the layer and the assembled image while they are
	// written ("" = os.TempDir()).
	TmpDir string
}

// Result is what Commit made.
type Result struct {
	Deployment     string     `json:"deployment"`
	Base           string     `json:"base"` // where the base image was copied from
	BaseManifest   string     `json:"base_manifest_digest"`
	Dest           string     `json:"dest"`
	ManifestDigest string     `json:"manifest_digest"` // of the image as written to Dest
	Layer          LayerInfo  `json:"layer"`
	Stats          LayerStats `json:"stats"`
}

// LayerInfo describes the new layer.
type LayerInfo struct {
	Digest string `json:"digest"`  // of the gzip blob
	DiffID string `json:"diff_id"` // of the tar
	Size   int64  `json:"size"`
}

// ErrNoChanges is returned when the deployment has no local changes.
var ErrNoChanges = errors.New("the deployment has no local changes to commit")

// Commit writes deployment Options.Deployment's base image plus its local
// changes as one more layer to Options.Dest. It needs root (it mounts the
// deployment to read its changes as the system shows them).
func Commit(ctx context.Context, opts Options) (*Result, error) {
	if opts.Warnings == nil {
		opts.Warnings = os.Stderr
	}
	l := store.At(opts.Sysroot)
	d, err := deploy.Read(l, opts.Deployment)
	if err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	destRef, err := oci.ParseReference(opts.Dest, "containers-storage:")
	if err != nil {
		return nil, fmt.Errorf("commit: destination: %w", err)
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

	work, err := os.MkdirTemp(opts.TmpDir, "berth-commit-")
	if err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	defer os.RemoveAll(work)

	// The layer first: without changes there is nothing to copy.
	res := &Result{Deployment: d.ID}
	layerPath := filepath.Join(work, "layer.tar.gz")
	stats, info, err := writeLayerFile(layerPath, l, d)
	if err != nil {
		return nil, fmt.Errorf("commit %s: write the layer: %w", d.ID, err)
	}
	if stats.Entries == 0 {
		return nil, fmt.Errorf("commit %s: %w (berth diff lists them)", d.ID, ErrNoChanges)
	}
	res.Stats, res.Layer = *stats, *info
	for _, s := range stats.Skipped {
		fmt.Fprintf(opts.Warnings, "berth commit: %s is a socket; a layer cannot hold it, skipped\n", s)
	}

	srcRef, baseName, err := baseRef(d, opts.Base)
	if err != nil {
		return nil, fmt.Errorf("commit %s: %w", d.ID, err)
	}
	res.Base = baseName
	pc, err := policyContext(opts, sys)
	if err != nil {
		return nil, fmt.Errorf("commit %s: %w", d.ID, err)
	}
	defer pc.Destroy()
	base, err := openBase(ctx, srcRef, sys, pc, d)
	if err != nil {
		return nil, fmt.Errorf("commit %s: base image %s: %w", d.ID, baseName, err)
	}
	defer base.src.Close()
	res.BaseManifest = base.digest.String()
	cfg, err := newConfig(base.config, len(base.layers), info, l, d, opts)
	if err != nil {
		return nil, fmt.Errorf("commit %s: %w", d.ID, err)
	}
	dg, err := write(ctx, destRef, sys, base, layerPath, info, cfg)
	if err != nil {
		return nil, fmt.Errorf("commit %s: write %s: %w", d.ID, opts.Dest, err)
	}
	res.Dest = transportName(destRef)
	res.ManifestDigest = dg.String()
	return res, nil
}

func transportName(r types.ImageReference) string {
	// oci-archive:/x.tar without an image name reads "/x.tar:" within
	// its transport.
	return r.Transport().Name() + ":" + strings.TrimSuffix(r.StringWithinTransport(), ":")
}

// baseRef is where the base image is copied from: opts.Base, or the
// deployment's image_ref; a registry reference is pinned to the manifest
// digest the deployment records, so a tag that moved on still gives the
// deployed image.
func baseRef(d *deploy.Deployment, base string) (types.ImageReference, string, error) {
	ref := base
	if ref == "" {
		ref = d.ImageRef
	}
	if ref == "" {
		return nil, "", errors.New("the deployment records no image reference; give the base image with --base")
	}
	r, err := oci.ParseReference(ref, "docker://")
	if err != nil {
		return nil, "", fmt.Errorf("base image %s: %w (if it is not reachable any more, give a copy of the same image with --base)", ref, err)
	}
	if r.Transport().Name() == "docker" && d.ManifestDigest != "" {
		named := r.DockerReference()
		dg, err := digest.Parse(d.ManifestDigest)
		if named != nil && err == nil {
			if c, ok := named.(reference.Canonical); ok && c.Digest() != dg {
				return nil, "", fmt.Errorf("%s names digest %s, but the deployment was made from %s", ref, c.Digest(), dg)
			}
			pinned, err := reference.WithDigest(reference.TrimNamed(named), dg)
			if err != nil {
				return nil, "", err
			}
			if r, err = docker.NewReference(pinned); err != nil {
				return nil, "", err
			}
			return r, "docker://" + pinned.String(), nil
		}
	}
	return r, transportName(r), nil
}

func policyContext(opts Options, sys *types.SystemContext) (*signature.PolicyContext, error) {
	var policy *signature.Policy
	var err error
	if opts.PolicyPath != "" {
		if policy, err = signature.NewPolicyFromFile(opts.PolicyPath); err != nil {
			return nil, fmt.Errorf("signature policy %s: %w", opts.PolicyPath, err)
		}
	} else {
		policy, err = signature.DefaultPolicy(sys)
		if errors.Is(err, configfile.ErrConfigFileNotFound) {
			fmt.Fprintln(opts.Warnings, "berth: no containers-policy.json found; using the containers default: accept any image without signature verification")
			policy = &signature.Policy{Default: signature.PolicyRequirements{signature.NewPRInsecureAcceptAnything()}}
		} else if err != nil {
			return nil, fmt.Errorf("signature policy: %w", err)
		}
	}
	return signature.NewPolicyContext(policy)
}

// writeLayerFile writes the gzip-compressed layer to p, hashing the tar
// (diff_id) and the blob on the way.
func writeLayerFile(p string, l store.Layout, d *deploy.Deployment) (*LayerStats, *LayerInfo, error) {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	blobHash, diffHash := sha256.New(), sha256.New()
	bc := &countWriter{w: io.MultiWriter(f, blobHash)}
	gz := gzip.NewWriter(bc)
	stats, err := WriteLayer(io.MultiWriter(gz, diffHash), l, d)
	if err != nil {
		return nil, nil, err
	}
	if err := gz.Close(); err != nil {
		return nil, nil, err
	}
	if err := f.Close(); err != nil {
		return nil, nil, err
	}
	return stats, &LayerInfo{Digest: sum(blobHash), DiffID: sum(diffHash), Size: bc.n}, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func sum(h hash.Hash) string { return "sha256:" + hex.EncodeToString(h.Sum(nil)) }

// baseImage is the opened base image.
type baseImage struct {
	src    types.ImageSource
	digest digest.Digest
	typ    string
	config []byte
	layers []types.BlobInfo
	// instance is the manifest list entry chosen (nil: not a list).
	instance *digest.Digest
}

// openBase opens the base image, checks it against the signature policy
// and makes sure it is the image the deployment was made from (for this
// platform when it is a list): the same manifest digest.
func openBase(ctx context.Context, ref types.ImageReference, sys *types.SystemContext, pc *signature.PolicyContext, d *deploy.Deployment) (*baseImage, error) {
	src, err := ref.NewImageSource(ctx, sys)
	if err != nil {
		return nil, fmt.Errorf("open: %w (if it is not reachable any more, give a copy of the same image with --base)", err)
	}
	ok := false
	defer func() {
		if !ok {
			src.Close()
		}
	}()
	top := image.UnparsedInstance(src, nil)
	if allowed, err := pc.IsRunningImageAllowed(ctx, top); !allowed || err != nil {
		if err == nil {
			err = errors.New("no reason given")
		}
		return nil, fmt.Errorf("rejected by the signature policy: %w", err)
	}
	blob, typ, err := top.Manifest(ctx)
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	if typ == "" {
		typ = manifest.GuessMIMEType(blob)
	}
	b := &baseImage{src: src}
	if manifest.MIMETypeIsMultiImage(typ) {
		list, err := manifest.ListFromBlob(blob, typ)
		if err != nil {
			return nil, err
		}
		inst, err := list.ChooseInstance(sys)
		if err != nil {
			return nil, err
		}
		b.instance = &inst
		// UnparsedInstance checks the instance against the list's digest.
		if blob, typ, err = image.UnparsedInstance(src, &inst).Manifest(ctx); err != nil {
			return nil, err
		}
		if typ == "" {
			typ = manifest.GuessMIMEType(blob)
		}
	}
	if len(blob) > 4<<20 {
		return nil, fmt.Errorf("manifest of %d bytes", len(blob))
	}
	b.digest, b.typ = digest.FromBytes(blob), typ
	if d.ManifestDigest != "" && b.digest.String() != d.ManifestDigest {
		return nil, fmt.Errorf("it is no longer the image deployment %s was made from (manifest %s, deployed %s); give the original with --base (e.g. docker://NAME@%s)", d.ID, b.digest, d.ManifestDigest, d.ManifestDigest)
	}
	if typ != imgspecv1.MediaTypeImageManifest && typ != manifest.DockerV2Schema2MediaType {
		return nil, fmt.Errorf("manifest type %s: berth commit needs an OCI or Docker schema 2 image", typ)
	}
	m, err := manifest.FromBlob(blob, typ)
	if err != nil {
		return nil, err
	}
	cfgInfo := m.ConfigInfo()
	if cfgInfo.Size > 16<<20 {
		return nil, fmt.Errorf("config of %d bytes", cfgInfo.Size)
	}
	if b.config, err = readBlob(ctx, src, cfgInfo, 16<<20); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	for _, li := range m.LayerInfos() {
		b.layers = append(b.layers, li.BlobInfo)
	}
	ok = true
	return b, nil
}

// readBlob reads a small blob and checks its digest.
func readBlob(ctx context.Context, src types.ImageSource, info types.BlobInfo, limit int64) ([]byte, error) {
	rc, _, err := src.GetBlob(ctx, info, none.NoCache)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("blob %s is larger than %d bytes", info.Digest, limit)
	}
	if err := info.Digest.Validate(); err != nil {
		return nil, err
	}
	if got := info.Digest.Algorithm().FromBytes(data); got != info.Digest {
		return nil, fmt.Errorf("blob %s has digest %s", info.Digest, got)
	}
	return data, nil
}

// newConfig is the base config with the new layer in rootfs and history.
// It is edited as a generic object so that fields this code does not know
// survive.
func newConfig(baseCfg []byte, nLayers int, li *LayerInfo, l store.Layout, d *deploy.Deployment, opts Options) ([]byte, error) {
	var cfg map[string]json.RawMessage
	if err := json.Unmarshal(baseCfg, &cfg); err != nil {
		return nil, fmt.Errorf("base image config: %w", err)
	}
	var rootfs imgspecv1.RootFS
	if err := json.Unmarshal(cfg["rootfs"], &rootfs); err != nil {
		return nil, fmt.Errorf("base image config: rootfs: %w", err)
	}
	if len(rootfs.DiffIDs) != nLayers {
		return nil, fmt.Errorf("base image config: rootfs lists %d diff_ids for %d layers", len(rootfs.DiffIDs), nLayers)
	}
	// The same layers as the deployment's image, when berth still has its
	// record: a content check beside the manifest digest.
	if rec, err := oci.LookupImage(l.Sysroot, d.ManifestDigest); err == nil && len(rec.Layers) > 0 {
		if len(rec.Layers) != len(rootfs.DiffIDs) {
			return nil, fmt.Errorf("the base image has %d layers, deployment %s's image %d", len(rootfs.DiffIDs), d.ID, len(rec.Layers))
		}
		for i, ly := range rec.Layers {
			if ly.DiffID != rootfs.DiffIDs[i].String() {
				return nil, fmt.Errorf("layer %d of the base image is %s, deployment %s's image has %s", i, rootfs.DiffIDs[i], d.ID, ly.DiffID)
			}
		}
	}
	now := time.Now().UTC()
	if opts.Now != nil {
		now = opts.Now().UTC()
	}
	rootfs.DiffIDs = append(rootfs.DiffIDs, digest.Digest(li.DiffID))
	var history []imgspecv1.History
	if h, ok := cfg["history"]; ok {
		if err := json.Unmarshal(h, &history); err != nil {
			return nil, fmt.Errorf("base image config history: %w", err)
		}
	}
	comment := opts.Message
	if comment == "" {
		comment = "local changes of berth deployment " + d.ID
	}
	history = append(history, imgspecv1.History{Created: &now, CreatedBy: "berth commit", Comment: comment})
	set := func(k string, v any) {
		b, _ := json.Marshal(v)
		cfg[k] = b
	}
	set("rootfs", rootfs)
	set("history", history)
	set("created", now)
	return json.Marshal(cfg)
}

// ociLayerType maps a base layer's media type to the OCI one (the blob is
// the same bytes).
func ociLayerType(mt string) (string, error) {
	switch mt {
	case manifest.DockerV2Schema2LayerMediaType, imgspecv1.MediaTypeImageLayerGzip:
		return imgspecv1.MediaTypeImageLayerGzip, nil
	case "application/vnd.docker.image.rootfs.diff.tar", imgspecv1.MediaTypeImageLayer:
		return imgspecv1.MediaTypeImageLayer, nil
	case imgspecv1.MediaTypeImageLayerZstd:
		return mt, nil
	}
	return "", fmt.Errorf("base layer media type %q cannot be carried over", mt)
}

// write puts the base layers, the new layer, the config and an OCI
// manifest to dest and commits it. It returns the manifest digest.
func write(ctx context.Context, ref types.ImageReference, sys *types.SystemContext, base *baseImage, layerPath string, li *LayerInfo, cfg []byte) (digest.Digest, error) {
	dest, err := ref.NewImageDestination(ctx, sys)
	if err != nil {
		return "", err
	}
	defer dest.Close()
	if mts := dest.SupportedManifestMIMETypes(); len(mts) > 0 && !slices.Contains(mts, imgspecv1.MediaTypeImageManifest) {
		return "", fmt.Errorf("the destination does not take OCI images (it takes %v)", mts)
	}
	var descs []imgspecv1.Descriptor
	for i, bl := range base.layers {
		mt, err := ociLayerType(bl.MediaType)
		if err != nil {
			return "", err
		}
		info := types.BlobInfo{Digest: bl.Digest, Size: bl.Size, MediaType: mt}
		if reused, _, err := dest.TryReusingBlob(ctx, info, none.NoCache, false); err != nil {
			return "", fmt.Errorf("base layer %d: %w", i, err)
		} else if !reused {
			if err := copyBlob(ctx, base.src, dest, bl, info); err != nil {
				return "", fmt.Errorf("base layer %d (%s): %w", i, bl.Digest, err)
			}
		}
		descs = append(descs, imgspecv1.Descriptor{MediaType: mt, Digest: bl.Digest, Size: bl.Size})
	}
	f, err := os.Open(layerPath)
	if err != nil {
		return "", err
	}
	defer f.Close()
	newLayer := types.BlobInfo{Digest: digest.Digest(li.Digest), Size: li.Size, MediaType: imgspecv1.MediaTypeImageLayerGzip}
	if _, err := dest.PutBlob(ctx, f, newLayer, none.NoCache, false); err != nil {
		return "", fmt.Errorf("new layer: %w", err)
	}
	descs = append(descs, imgspecv1.Descriptor{MediaType: newLayer.MediaType, Digest: newLayer.Digest, Size: newLayer.Size})
	cfgDesc := imgspecv1.Descriptor{MediaType: imgspecv1.MediaTypeImageConfig, Digest: digest.FromBytes(cfg), Size: int64(len(cfg))}
	if _, err := dest.PutBlob(ctx, bytes.NewReader(cfg), types.BlobInfo{Digest: cfgDesc.Digest, Size: cfgDesc.Size, MediaType: cfgDesc.MediaType}, none.NoCache, true); err != nil {
		return "", fmt.Errorf("config: %w", err)
	}
	man, err := json.Marshal(imgspecv1.Manifest{Versioned: imgspec.Versioned{SchemaVersion: 2}, MediaType: imgspecv1.MediaTypeImageManifest, Config: cfgDesc, Layers: descs})
	if err != nil {
		return "", err
	}
	if err := dest.PutManifest(ctx, man, nil); err != nil {
		return "", fmt.Errorf("manifest: %w", err)
	}
	if err := dest.PutSignatures(ctx, [][]byte{}, nil); err != nil {
		return "", fmt.Errorf("signatures: %w", err)
	}
	if err := dest.Commit(ctx, &written{ref: ref, manifest: man}); err != nil {
		return "", fmt.Errorf("commit: %w", err)
	}
	return digest.FromBytes(man), nil
}

// copyBlob streams a blob from src to dest, checking its digest: a blob
// that does not match fails before the image is committed.
func copyBlob(ctx context.Context, src types.ImageSource, dest types.ImageDestination, from, to types.BlobInfo) error {
	rc, _, err := src.GetBlob(ctx, from, none.NoCache)
	if err != nil {
		return err
	}
	defer rc.Close()
	v := from.Digest.Verifier()
	if _, err := dest.PutBlob(ctx, io.TeeReader(rc, v), to, none.NoCache, false); err != nil {
		return err
	}
	if !v.Verified() {
		return fmt.Errorf("the blob does not match its digest")
	}
	return nil
}

// written is the image being committed, as Commit wants to see it.
type written struct {
	ref      types.ImageReference
	manifest []byte
}

func (w *written) Reference() types.ImageReference { return w.ref }
func (w *written) Manifest(context.Context) ([]byte, string, error) {
	return w.manifest, imgspecv1.MediaTypeImageManifest, nil
}
func (w *written) Signatures(context.Context) ([][]byte, error) { return nil, nil }
