package e2e

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/test/e2e/harness"
)

// mkosiPackages returns the Packages= list of mkosi.conf's [Content] section.
func mkosiPackages(t *testing.T, path string) []string {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var section string
	var pkgs []string
	inPackages := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "#") {
			continue
		}
		if strings.HasPrefix(trimmed, "[") {
			section, inPackages = trimmed, false
			continue
		}
		if section != "[Content]" {
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			if inPackages {
				pkgs = append(pkgs, strings.Fields(trimmed)...)
			}
			continue
		}
		key, val, _ := strings.Cut(trimmed, "=")
		inPackages = key == "Packages"
		if inPackages {
			pkgs = append(pkgs, strings.Fields(strings.ReplaceAll(val, ",", " "))...)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return pkgs
}

// TestMkosiConfMatchesPackages keeps mkosi.conf's package list equal to the lane's one source
// of truth, test/guest/packages.txt (same packages, same order).
func TestMkosiConfMatchesPackages(t *testing.T) {
	src, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	want, err := harness.ReadPackageList(filepath.Join(src, "test/guest/packages.txt"))
	if err != nil {
		t.Fatal(err)
	}
	got := mkosiPackages(t, filepath.Join(src, "mkosi.conf"))
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("mkosi.conf Packages= differs from test/guest/packages.txt:\n mkosi.conf:   %s\n packages.txt: %s\nupdate mkosi.conf's [Content] Packages= to the list in packages.txt",
			strings.Join(got, " "), strings.Join(want, " "))
	}
	if len(want) == 0 || want[0] != "linux-image-amd64" {
		t.Errorf("packages.txt must start with the kernel (linux-image-amd64), got %v", want)
	}
}
