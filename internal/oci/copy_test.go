package oci

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/store"
)

// TestCopyImageGivesAStoreAsGoodAsAPull: an image copied from one store
// to another is there as if it had been pulled: the same record and
// composefs image, every object its image and layer indexes name, and
// indexes a later pull reuses instead of fetching the layers again.
func TestCopyImageGivesAStoreAsGoodAsAPull(t *testing.T) {
	work := t.TempDir()
	b := (&testImage{layers: standardLayers(t)}).build(t)
	b.writeOCILayout(t, filepath.Join(work, "v1"), "v1")
	ref := "oci:" + filepath.Join(work, "v1") + ":v1"
	src, dst := t.TempDir(), t.TempDir()
	img, err := Pull(context.Background(), ref, testPullOptions(t, src))
	if err != nil {
		t.Fatal(err)
	}
	got, stats, err := CopyImage(context.Background(), src, dst, img, nil)
	if err != nil {
		t.Fatal(err)
	}
	nSrc, names := countFiles(t, store.At(src).Objects())
	if stats.Objects != nSrc || stats.ObjectsPresent != 0 || stats.LayerIndexes != 3 {
		t.Errorf("copied %+v; the source store has %d objects", stats, nSrc)
	}
	// Every object of the source (layer 1's whited-out files included:
	// the indexes name them) is in the destination, byte for byte.
	for _, p := range names {
		rel, _ := filepath.Rel(store.At(src).Objects(), p)
		a, _ := os.ReadFile(p)
		c, err := os.ReadFile(filepath.Join(store.At(dst).Objects(), rel))
		if err != nil || !bytes.Equal(a, c) {
			t.Errorf("object %s: %v", rel, err)
		}
	}
	rec, err := LookupImage(dst, ref)
	if err != nil || rec.ComposefsDigest != img.ComposefsDigest || rec.ManifestDigest != img.ManifestDigest || got.ComposefsDigest != img.ComposefsDigest {
		t.Fatalf("record in the destination: %+v, %v", rec, err)
	}
	a, _ := os.ReadFile(store.At(src).Image(img.ComposefsDigest))
	c, _ := os.ReadFile(store.At(dst).Image(img.ComposefsDigest))
	if !bytes.Equal(a, c) {
		t.Error("composefs image differs")
	}
	checkStandardTree(t, dst, rec)

	// A pull into the destination finds the image by its config, and a
	// changed image reuses the copied layers.
	again, err := Pull(context.Background(), ref, testPullOptions(t, dst))
	if err != nil || again.Stats.LayersFetched != 0 {
		t.Errorf("pull after copy: %+v, %v", again.Stats, err)
	}
	layers := standardLayers(t)
	layers = append(layers, makeTar(t, dir("new/", 0o755), file("new/file", strings.Repeat("new\n", 40), 0o644)))
	b2 := (&testImage{layers: layers}).build(t)
	b2.writeOCILayout(t, filepath.Join(work, "v2"), "v2")
	v2, err := Pull(context.Background(), "oci:"+filepath.Join(work, "v2")+":v2", testPullOptions(t, dst))
	if err != nil || v2.Stats.LayersFetched != 1 || v2.Stats.LayersReused != 3 {
		t.Errorf("pull of a changed image after copy: %+v, %v", v2.Stats, err)
	}

	// Copying again copies nothing.
	if _, stats, err := CopyImage(context.Background(), src, dst, img, nil); err != nil || stats.Objects != 0 || stats.ObjectsPresent != nSrc {
		t.Errorf("second copy: %+v, %v", stats, err)
	}

	// A source missing an object the image names: refused, and the
	// destination gets no record.
	tree, err := LoadTree(src, img)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(store.At(src).Objects(), tree.Lookup("bin/ping").Payload)); err != nil {
		t.Fatal(err)
	}
	dst2 := t.TempDir()
	if _, _, err := CopyImage(context.Background(), src, dst2, img, nil); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("copy with a missing object: %v", err)
	}
	if imgs, _ := ListImages(dst2); len(imgs) != 0 {
		t.Errorf("a failed copy recorded %v", imgs)
	}
}
