package main

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
)

const tags = "containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper"

// TestImportGraph keeps berth-init small and free of the container stack:
// it runs in the initramfs, before anything is verified.
func TestImportGraph(t *testing.T) {
	testenv.RequireTool(t, "go", "golang (or /usr/local/go/bin in PATH)")
	out, err := exec.Command("go", "list", "-tags", tags, "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, p := range strings.Fields(string(out)) {
		for _, banned := range []string{"go.podman.io/", "github.com/containers/", "github.com/google/go-containerregistry", "github.com/godbus/", "github.com/spf13/cobra", "net/http"} {
			if strings.HasPrefix(p, banned) {
				t.Errorf("berth-init imports %s", p)
			}
		}
	}
}

// TestStaticAndSmall builds berth-init as shipped (static, stripped) and
// checks the 4 MB budget of DESIGN §2.
func TestStaticAndSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	testenv.RequireTool(t, "go", "golang (or /usr/local/go/bin in PATH)")
	bin := filepath.Join(t.TempDir(), "berth-init")
	c := exec.Command("go", "build", "-tags", tags, "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	c.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	fi, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("berth-init: %d bytes", fi.Size())
	if fi.Size() > 4_000_000 {
		t.Errorf("berth-init is %d bytes stripped, over the 4 MB budget", fi.Size())
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("berth-init is dynamically linked")
		}
	}
}
