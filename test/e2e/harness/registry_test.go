package harness

import (
	"archive/tar"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestArchiveImagePushedToRegistryKeepsBaseLayers packs a tree as mkguest does, opens the
// archive with ArchiveImage, pushes it with one more layer, and reads the manifest back from
// the registry: the base's layers come first, the pushed layer last.
func TestArchiveImagePushedToRegistryKeepsBaseLayers(t *testing.T) {
	archive := filepath.Join(t.TempDir(), "img.oci.tar")
	res, err := PackOCIArchive(makeTree(t), archive, PackOptions{Skip: []string{".recipe"}})
	if err != nil {
		t.Fatal(err)
	}
	base, err := ArchiveImage(archive, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := base.Digest(); d.String() != res.ManifestDigest {
		t.Fatalf("ArchiveImage digest %s, packed manifest %s", d, res.ManifestDigest)
	}
	r, err := ServeRegistry("berth/test")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	img, err := r.Push(base, []LayerFile{{Path: "usr/share/x", Mode: 0o755, Dir: true}, {Path: "usr/share/x/v2", Mode: 0o644, Data: []byte("v2\n")}})
	if err != nil {
		t.Fatal(err)
	}
	pushed, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(pushed) != len(res.Layers)+1 {
		t.Fatalf("pushed image has %d layers, want the base's %d plus one", len(pushed), len(res.Layers))
	}
	d, _ := img.Digest()
	req, _ := http.NewRequest(http.MethodHead, fmt.Sprintf("http://127.0.0.1:%d/v2/berth/test/manifests/latest", r.Port), nil)
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got := resp.Header.Get("Docker-Content-Digest"); got != d.String() {
		t.Errorf("registry's :latest is %q, pushed %s", got, d)
	}
	if g := r.GuestRef(); !strings.HasPrefix(g, "docker://10.0.2.2:") || !strings.HasSuffix(g, "/berth/test:latest") {
		t.Errorf("GuestRef %q", g)
	}
}

// TestArchiveImageRefusesLinks: an archive with a symlink entry is not unpacked.
func TestArchiveImageRefusesLinks(t *testing.T) {
	archive := filepath.Join(t.TempDir(), "bad.tar")
	f, err := os.Create(archive)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(f)
	tw.WriteHeader(&tar.Header{Name: "blobs", Typeflag: tar.TypeSymlink, Linkname: "/etc"})
	tw.Close()
	f.Close()
	if _, err := ArchiveImage(archive, t.TempDir()); err == nil || !strings.Contains(err.Error(), "not part of an OCI layout") {
		t.Fatalf("ArchiveImage of an archive with a symlink: %v, want a refusal", err)
	}
}
