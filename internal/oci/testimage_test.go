package oci

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// tarEntry describes one entry of a test layer.
type tarEntry struct {
	name     string
	typ      byte
	mode     int64
	uid, gid int
	body     []byte
	link     string
	size     int64 // header size override (hostile headers)
	xattrs   map[string]string
	major    int64
	minor    int64
	mtime    time.Time
}

var testTime = time.Unix(1700000000, 123456789)

func file(name, body string, mode int64) tarEntry {
	return tarEntry{name: name, typ: tar.TypeReg, mode: mode, body: []byte(body)}
}
func dir(name string, mode int64) tarEntry { return tarEntry{name: name, typ: tar.TypeDir, mode: mode} }
func symlink(name, target string) tarEntry {
	return tarEntry{name: name, typ: tar.TypeSymlink, mode: 0o777, link: target}
}
func hardlink(name, target string) tarEntry {
	return tarEntry{name: name, typ: tar.TypeLink, mode: 0o644, link: target}
}

// makeTar writes entries as a PAX tar (what buildah/docker produce).
func makeTar(t testing.TB, entries ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		mt := e.mtime
		if mt.IsZero() {
			mt = testTime
		}
		h := &tar.Header{
			Name: e.name, Typeflag: e.typ, Mode: e.mode, Uid: e.uid, Gid: e.gid,
			Linkname: e.link, ModTime: mt, Format: tar.FormatPAX,
			Devmajor: e.major, Devminor: e.minor,
		}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
			if e.size != 0 {
				h.Size = e.size
			}
		}
		if len(e.xattrs) > 0 {
			h.PAXRecords = map[string]string{}
			for k, v := range e.xattrs {
				h.PAXRecords["SCHILY.xattr."+k] = v
			}
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("tar header %s: %v", e.name, err)
		}
		if len(e.body) > 0 {
			if _, err := tw.Write(e.body); err != nil {
				t.Fatalf("tar body %s: %v", e.name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatalf("tar close: %v", err)
	}
	return buf.Bytes()
}

func compressBlob(t testing.TB, data []byte, how string) []byte {
	t.Helper()
	var buf bytes.Buffer
	switch how {
	case "gzip":
		zw := gzip.NewWriter(&buf)
		zw.Write(data)
		zw.Close()
	case "zstd":
		zw, err := zstd.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		zw.Write(data)
		zw.Close()
	case "none", "":
		return data
	default:
		t.Fatalf("unknown compression %s", how)
	}
	return buf.Bytes()
}

func sha(data []byte) string {
	s := sha256.Sum256(data)
	return "sha256:" + hex.EncodeToString(s[:])
}

// testImage is an OCI image assembled in memory; tests tweak its parts to
// make hostile variants before writing it out.
type testImage struct {
	layers      [][]byte // uncompressed tars
	compression []string // per layer: gzip, zstd, none
	// overrides for hostile images
	manifestRaw   []byte
	configRaw     []byte
	diffIDs       []string
	layerDigests  []string       // manifest digests to claim instead of the real ones
	blobOverrides map[int][]byte // content served under the original digest
	honestBlobs   map[int][]byte // content served under its own digest
}

type builtImage struct {
	manifest []byte
	config   []byte
	blobs    map[string][]byte // digest -> content
	layers   []string          // blob digests, in order
}

func (ti *testImage) build(t testing.TB) *builtImage {
	t.Helper()
	b := &builtImage{blobs: map[string][]byte{}}
	var diffIDs []string
	type desc struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
		Size      int64  `json:"size"`
	}
	var layerDescs []desc
	for i, l := range ti.layers {
		how := "gzip"
		if i < len(ti.compression) && ti.compression[i] != "" {
			how = ti.compression[i]
		}
		blob := compressBlob(t, l, how)
		if ti.honestBlobs != nil && ti.honestBlobs[i] != nil {
			blob = ti.honestBlobs[i]
		}
		d := sha(blob)
		if ti.blobOverrides != nil && ti.blobOverrides[i] != nil {
			blob = ti.blobOverrides[i]
		}
		if ti.layerDigests != nil {
			d = ti.layerDigests[i]
		}
		b.blobs[d] = blob
		b.layers = append(b.layers, d)
		diffIDs = append(diffIDs, sha(l))
		mt := "application/vnd.oci.image.layer.v1.tar+gzip"
		switch how {
		case "zstd":
			mt = "application/vnd.oci.image.layer.v1.tar+zstd"
		case "none":
			mt = "application/vnd.oci.image.layer.v1.tar"
		}
		layerDescs = append(layerDescs, desc{mt, d, int64(len(blob))})
	}
	if ti.diffIDs != nil {
		diffIDs = ti.diffIDs
	}
	cfg := ti.configRaw
	if cfg == nil {
		var err error
		cfg, err = json.Marshal(map[string]any{
			"created":      "2026-01-02T03:04:05Z",
			"architecture": "amd64",
			"os":           "linux",
			"config":       map[string]any{},
			"rootfs":       map[string]any{"type": "layers", "diff_ids": diffIDs},
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	b.config = cfg
	b.blobs[sha(cfg)] = cfg
	man := ti.manifestRaw
	if man == nil {
		var err error
		man, err = json.Marshal(map[string]any{
			"schemaVersion": 2,
			"mediaType":     "application/vnd.oci.image.manifest.v1+json",
			"config":        desc{"application/vnd.oci.image.config.v1+json", sha(cfg), int64(len(cfg))},
			"layers":        layerDescs,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	b.manifest = man
	b.blobs[sha(man)] = man
	return b
}

// writeOCILayout writes the image as an OCI image layout with tag.
func (b *builtImage) writeOCILayout(t testing.TB, dir, tag string) {
	t.Helper()
	must(t, os.MkdirAll(filepath.Join(dir, "blobs", "sha256"), 0o755))
	for d, data := range b.blobs {
		must(t, os.WriteFile(filepath.Join(dir, "blobs", "sha256", d[len("sha256:"):]), data, 0o644))
	}
	must(t, os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644))
	idx, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"manifests": []map[string]any{{
			"mediaType":   "application/vnd.oci.image.manifest.v1+json",
			"digest":      sha(b.manifest),
			"size":        len(b.manifest),
			"annotations": map[string]string{"org.opencontainers.image.ref.name": tag},
		}},
	})
	must(t, os.WriteFile(filepath.Join(dir, "index.json"), idx, 0o644))
}

// writeDockerArchive writes the image in `docker save` format with
// uncompressed layers (what docker-archive: reads).
func (b *builtImage) writeDockerArchive(t testing.TB, path, repoTag string, rawLayers [][]byte) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, data []byte) {
		must(t, tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg, ModTime: testTime}))
		_, err := tw.Write(data)
		must(t, err)
	}
	cfgName := sha(b.config)[7:] + ".json"
	add(cfgName, b.config)
	var names []string
	for i, l := range rawLayers {
		n := fmt.Sprintf("%d/layer.tar", i)
		add(n, l)
		names = append(names, n)
	}
	man, _ := json.Marshal([]map[string]any{{"Config": cfgName, "RepoTags": []string{repoTag}, "Layers": names}})
	add("manifest.json", man)
	must(t, tw.Close())
	must(t, os.WriteFile(path, buf.Bytes(), 0o644))
}

// tarDir packs a directory tree as a tar file (oci-archive:).
func tarDir(t testing.TB, dir, out string) {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			return nil
		}
		h, err := tar.FileInfoHeader(fi, "")
		if err != nil {
			return err
		}
		h.Name = rel
		if fi.IsDir() {
			h.Name += "/"
		}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		if fi.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = io.Copy(tw, f)
			return err
		}
		return nil
	})
	must(t, err)
	must(t, tw.Close())
	must(t, os.WriteFile(out, buf.Bytes(), 0o644))
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
