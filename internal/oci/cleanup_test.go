package oci

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/store"
)

func allPayloads(t *testing.T, sysroot, hexDigest string) []string {
	t.Helper()
	im, err := composefs.OpenImage(store.At(sysroot).Image(hexDigest))
	must(t, err)
	var out []string
	must(t, im.Walk(func(_ string, n *composefs.Inode) error {
		if n.Payload != "" {
			out = append(out, n.Payload)
		}
		return nil
	}))
	return out
}

func TestCleanup(t *testing.T) {
	big := strings.Repeat("shared content ", 10)
	work := t.TempDir()
	a := (&testImage{layers: [][]byte{makeTar(t, file("shared", big, 0o644), file("only-a", big+"a", 0o644))}}).build(t)
	a.writeOCILayout(t, filepath.Join(work, "a"), "a")
	b := (&testImage{layers: [][]byte{makeTar(t, file("shared", big, 0o644), file("only-b", big+"b", 0o644))}}).build(t)
	b.writeOCILayout(t, filepath.Join(work, "b"), "b")
	sysroot := t.TempDir()
	l := store.At(sysroot)
	imgA, err := Pull(context.Background(), "oci:"+filepath.Join(work, "a")+":a", testPullOptions(t, sysroot))
	must(t, err)
	imgB, err := Pull(context.Background(), "oci:"+filepath.Join(work, "b")+":b", testPullOptions(t, sysroot))
	must(t, err)
	payloadsA := allPayloads(t, sysroot, imgA.ComposefsDigest)
	payloadsB := allPayloads(t, sysroot, imgB.ComposefsDigest)
	if len(payloadsA) != 2 || len(payloadsB) != 2 {
		t.Fatalf("payloads %v %v", payloadsA, payloadsB)
	}
	// Leftovers of an interrupted import.
	must(t, os.WriteFile(filepath.Join(l.Images(), ".tmp-import-1-2"), []byte("partial"), 0o644))
	must(t, os.MkdirAll(filepath.Join(l.Objects(), ".tmp-batch-x"), 0o755))
	must(t, os.WriteFile(filepath.Join(l.Objects(), ".tmp-batch-x", "obj"), []byte("partial"), 0o644))

	// Nothing unreferenced yet: only the leftovers go.
	rep, err := Cleanup(sysroot)
	must(t, err)
	if rep.ImagesRemoved != 0 || rep.ObjectsRemoved != 0 || rep.TempRemoved != 2 || rep.ImagesKept != 2 || rep.ObjectsKept != 3 {
		t.Fatalf("first cleanup: %+v", rep)
	}

	// B removed: its own object and image go, the shared object stays.
	must(t, RemoveImage(sysroot, imgB.Ref))
	rep, err = Cleanup(sysroot)
	must(t, err)
	if rep.ImagesRemoved != 1 || rep.ObjectsRemoved != 1 || rep.LayerIndexesRemoved != 1 || rep.ImagesKept != 1 {
		t.Fatalf("cleanup after rm b: %+v", rep)
	}
	for _, p := range payloadsA {
		if _, err := os.Stat(filepath.Join(l.Objects(), p)); err != nil {
			t.Errorf("object of a live image removed: %v", err)
		}
	}
	if _, err := os.Stat(l.Image(imgB.ComposefsDigest)); !os.IsNotExist(err) {
		t.Error("image b not removed")
	}

	// A deployment keeps A alive after its record is gone.
	dep := filepath.Join(l.Deployment("1-"+imgA.ComposefsDigest[:12]), "deployment.json")
	must(t, os.MkdirAll(filepath.Dir(dep), 0o755))
	must(t, os.WriteFile(dep, []byte(`{"id":"1","composefs_digest":"`+imgA.ComposefsDigest+`"}`), 0o644))
	must(t, RemoveImage(sysroot, imgA.Ref))
	rep, err = Cleanup(sysroot)
	must(t, err)
	if rep.ImagesRemoved != 0 || rep.ObjectsRemoved != 0 || rep.ImagesKept != 1 {
		t.Fatalf("cleanup with a deployment: %+v", rep)
	}
	// A broken deployment file stops cleanup rather than guessing.
	must(t, os.WriteFile(dep, []byte(`{not json`), 0o644))
	if _, err := Cleanup(sysroot); err == nil {
		t.Fatal("cleanup ignored an unreadable deployment")
	}
	must(t, os.RemoveAll(filepath.Dir(dep)))
	rep, err = Cleanup(sysroot)
	must(t, err)
	if rep.ImagesRemoved != 1 || rep.ObjectsRemoved != 2 {
		t.Fatalf("final cleanup: %+v", rep)
	}
	if n, names := countFiles(t, l.Objects()); n != 0 {
		t.Errorf("objects left: %v", names)
	}
	// The layer cache was dropped with its objects: a new pull imports again.
	img, err := Pull(context.Background(), "oci:"+filepath.Join(work, "a")+":a", testPullOptions(t, sysroot))
	must(t, err)
	if img.Stats.LayersFetched != 1 || img.ComposefsDigest != imgA.ComposefsDigest {
		t.Errorf("pull after cleanup: %+v", img.Stats)
	}
}

// Cleanup waits for a running import (which holds the lock shared).
func TestCleanupWaitsForImport(t *testing.T) {
	sysroot := t.TempDir()
	must(t, store.At(sysroot).Init())
	lock, err := store.At(sysroot).LockShared()
	must(t, err)
	done := make(chan error, 1)
	go func() { _, err := Cleanup(sysroot); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("cleanup ran while an import held the lock: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	lock.Unlock()
	select {
	case err := <-done:
		must(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("cleanup did not run after the import finished")
	}
}
