package oci

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
)

// containers-storage: (podman's local store) gives the same composefs
// digest as the OCI layout the image came from. skopeo puts the image
// there, with the vfs driver in a private store.
func TestPullFromContainersStorage(t *testing.T) {
	testenv.RequireRoot(t, "containers-storage with the vfs driver keeps file owners")
	testenv.RequireTool(t, "skopeo", "skopeo") // fills the containers-storage store
	layers := standardLayers(t)
	work := t.TempDir()
	(&testImage{layers: layers}).build(t).writeOCILayout(t, filepath.Join(work, "layout"), "v1")
	opts := testPullOptions(t, t.TempDir())
	want, err := Pull(context.Background(), "oci:"+filepath.Join(work, "layout")+":v1", opts)
	must(t, err)

	storeSpec := "containers-storage:[vfs@" + filepath.Join(work, "graph") + "+" + filepath.Join(work, "run") + "]localhost/berth/test:v1"
	cmd := exec.Command("skopeo", "--policy", opts.PolicyPath, "copy", "oci:"+filepath.Join(work, "layout")+":v1", storeSpec)
	cmd.Env = append(os.Environ(), "CONTAINERS_REGISTRIES_CONF="+opts.SystemContext.SystemRegistriesConfPath)
	if out, err := cmd.CombinedOutput(); err != nil {
		testenv.SkipOrFail(t, "skopeo could not fill a vfs containers-storage here: %v\n%s", err, out)
	}
	got, err := Pull(context.Background(), storeSpec, testPullOptions(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	if got.ComposefsDigest != want.ComposefsDigest {
		t.Errorf("containers-storage digest %s, oci layout %s", got.ComposefsDigest, want.ComposefsDigest)
	}
	if got.Transport != "containers-storage" {
		t.Errorf("transport %q", got.Transport)
	}
}
