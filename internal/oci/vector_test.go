package oci

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
)

// An image whose tree equals composefs reference tree2 (no hardlinks, so
// mkcomposefs and berth agree on the inode structure) gives the digest
// mkcomposefs 1.0.8 gave for that tree.
func TestImageOfVectorTreeGivesVectorDigest(t *testing.T) {
	testenv.RequireRoot(t, "make-trees.sh sets owners and security.* xattrs")
	dir := "/work/shared/testdata/composefs"
	if wd, err := os.Getwd(); err == nil {
		if c := filepath.Join(wd, "..", "..", "..", "shared", "testdata", "composefs"); fileExists(filepath.Join(c, "make-trees.sh")) {
			dir = c
		}
	}
	if !fileExists(filepath.Join(dir, "make-trees.sh")) {
		// The reference vectors are not part of this repository: without them there is
		// nothing to compare with, also under CI.
		t.Skipf("composefs reference vectors not found in %s", dir)
	}
	for tool, pkg := range map[string]string{"tar": "tar", "setfattr": "attr", "setfacl": "acl"} {
		testenv.RequireTool(t, tool, pkg) // builds the vector trees
	}
	want := expectedDigest(t, filepath.Join(dir, "EXPECTED-DIGESTS.txt"), "tree2", "default")
	trees := t.TempDir()
	if out, err := exec.Command("bash", filepath.Join(dir, "make-trees.sh"), trees).CombinedOutput(); err != nil {
		testenv.SkipOrFail(t, "make-trees.sh failed here (filesystem without the needed xattr support?): %v\n%s", err, out)
	}
	layer, err := exec.Command("tar", "-C", filepath.Join(trees, "tree2"), "--numeric-owner", "--xattrs", "--xattrs-include=*",
		"--format=pax", "--sort=name", "-cf", "-", ".").Output()
	if err != nil {
		t.Fatalf("tar: %v", err)
	}
	work := t.TempDir()
	(&testImage{layers: [][]byte{layer}}).build(t).writeOCILayout(t, work, "tree2")
	img, err := Pull(context.Background(), "oci:"+work+":tree2", testPullOptions(t, t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	if img.ComposefsDigest != want {
		t.Errorf("composefs digest %s, mkcomposefs gave %s for the same tree", img.ComposefsDigest, want)
	}
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func expectedDigest(t *testing.T, path, tree, variant string) string {
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 3 && fs[0] == tree && fs[1] == variant {
			return fs[2]
		}
	}
	t.Fatalf("%s %s not in %s", tree, variant, path)
	return ""
}
