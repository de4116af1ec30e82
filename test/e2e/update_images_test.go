package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	ggtypes "github.com/google/go-containerregistry/pkg/v1/types"
	"go.podman.io/image/v5/types"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/test/e2e/harness"
)

// TestUpdateImages checks, without a VM, that the update lane's images are what its
// scenarios expect: pushed to the in-process registry and pulled back with berth, v2 has
// v2's files on top of its base, and v3's health check is an executable in
// /usr/lib/berth/health.d.
func TestUpdateImages(t *testing.T) {
	// An OCI base like the lane's archive: two layers of ordinary files.
	base := mutate.ConfigMediaType(mutate.MediaType(empty.Image, ggtypes.OCIManifestSchema1), ggtypes.OCIConfigJSON)
	for _, files := range [][]harness.LayerFile{
		{{Path: "etc", Mode: 0o755, Dir: true}, {Path: "etc/issue", Mode: 0o644, Data: []byte("Debian\n")}},
		{{Path: "usr", Mode: 0o755, Dir: true}, {Path: "usr/share", Mode: 0o755, Dir: true}, {Path: "usr/share/base-files", Mode: 0o755, Dir: true},
			{Path: asidePath, Mode: 0o644, Data: []byte("# base\n")}},
	} {
		l, err := harness.LayerOf(files)
		if err != nil {
			t.Fatal(err)
		}
		if base, err = mutate.AppendLayers(base, l); err != nil {
			t.Fatal(err)
		}
	}
	r := &updateRegistry{Registry: serveRegistry(t), base: base}
	dir := t.TempDir()
	policy := filepath.Join(dir, "policy.json")
	os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644)
	regConf := filepath.Join(dir, "registries.conf")
	os.WriteFile(regConf, []byte("unqualified-search-registries = []\n"), 0o644)
	pull := func(sysroot string) *composefs.Inode {
		t.Helper()
		img, err := oci.Pull(context.Background(), r.HostRef(), oci.PullOptions{
			Sysroot: sysroot, PolicyPath: policy, InsecureSkipTLSVerify: true,
			SystemContext: &types.SystemContext{SystemRegistriesConfPath: regConf, SystemRegistriesConfDirPath: filepath.Join(dir, "d"),
				AuthFilePath: filepath.Join(dir, "auth.json"), RegistriesDirPath: filepath.Join(dir, "d")},
		})
		if err != nil {
			t.Fatal(err)
		}
		root, err := oci.LoadTree(sysroot, img)
		if err != nil {
			t.Fatal(err)
		}
		return root
	}
	v2 := r.push(t, base, v2Files)
	root := pull(t.TempDir())
	for _, f := range v2Files {
		n := root.Lookup(f.Path)
		if n == nil {
			t.Fatalf("v2 lacks %s", f.Path)
		}
		if !f.Dir && n.Size != uint64(len(f.Data)) || f.Dir && n.Type() != composefs.SIFDIR {
			t.Errorf("v2 %s: %d bytes, want %d", f.Path, n.Size, len(f.Data))
		}
	}
	r.push(t, v2, v3Files)
	root = pull(t.TempDir())
	n := root.Lookup("usr/lib/berth/health.d/50-e2e-fail")
	if n == nil || n.Mode&0o111 == 0 {
		t.Fatalf("v3's failing health check is missing or not executable: %+v", n)
	}
	if root.Lookup("usr/share/berth-e2e/v2") == nil {
		t.Error("v3 is not built on v2")
	}
}
