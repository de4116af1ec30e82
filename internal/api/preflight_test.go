package api

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/install"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// recordingJob is a JobContext that remembers the deployments it was told of.
type recordingJob struct{ created []string }

func (j *recordingJob) Progress(string, uint64, uint64) {}
func (j *recordingJob) Created(id string) error         { j.created = append(j.created, id); return nil }

// treeSnapshot lists every entry below dir with its mode and content hash.
func treeSnapshot(t *testing.T, dir string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		line := fmt.Sprintf("%s %v", strings.TrimPrefix(p, dir), fi.Mode())
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			line += fmt.Sprintf(" %x", sha256.Sum256(b))
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// oldKernelImage is imageFiles with a Debian 12 kernel (6.1).
func oldKernelImage(t *testing.T) map[string][]byte {
	files := map[string][]byte{}
	for p, b := range imageFiles(t, map[string]string{"hostname": "bookworm\n"}) {
		files[strings.ReplaceAll(p, "6.12.0-test", "6.1.0-27-amd64")] = b
	}
	files["etc/os-release"] = []byte("PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n")
	return files
}

// TestUpgradeToTooOldKernelLeavesDeploymentsUntouched: the real engine's
// Switch and Upgrade to an image whose kernel is too old for berth are
// refused by the preflight before a deployment is staged: the deployment
// list, the deployments' files and the ESP stay as they were, and no
// deployment is journalled.
func TestUpgradeToTooOldKernelLeavesDeploymentsUntouched(t *testing.T) {
	testenv.RequireRoot(t, "deploy.Create gives the deployment root's ownership")
	if testing.Short() {
		t.Skip("builds berth and berth-init")
	}
	rt := testRuntime(t)
	sysroot := newSysroot(t)
	esp := filepath.Join(sysroot, "efi")
	policy := filepath.Join(sysroot, "policy.json")
	os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644)
	const root = "PARTUUID=6a1f1e0c-3c4d-4f5e-8a9b-0c1d2e3f4a5b"
	v1 := ociLayout(t, imageFiles(t, map[string]string{"hostname": "v1\n"}))
	img1, err := oci.Pull(context.Background(), v1, oci.PullOptions{Sysroot: sysroot, PolicyPath: policy})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := install.DeployImage(sysroot, esp, img1, install.DeployOptions{Runtime: rt, Root: root, Origin: "install"}); err != nil {
		t.Fatal(err)
	}
	l := store.At(sysroot)
	deps, _ := deploy.List(l)
	espBefore, deployBefore := treeSnapshot(t, esp), treeSnapshot(t, l.Deployments())

	e := &SysrootEngine{Sysroot: sysroot, ESP: esp, PolicyPath: policy, Runtime: rt, Root: root}
	check := func(what string, err error, job *recordingJob) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), "6.1.0-27-amd64") || !strings.Contains(err.Error(), "too old") || !strings.Contains(err.Error(), "bookworm-backports") {
			t.Fatalf("%s to a 6.1 kernel: %v", what, err)
		}
		t.Logf("%s refused: %v", what, err)
		if len(job.created) != 0 {
			t.Errorf("%s journalled deployments %v", what, job.created)
		}
		after, _ := deploy.List(l)
		if len(after) != len(deps) || after[0].ID != deps[0].ID {
			t.Errorf("%s: deployments %v, before %v", what, after, deps)
		}
		if treeSnapshot(t, esp) != espBefore {
			t.Errorf("%s changed the ESP", what)
		}
		if treeSnapshot(t, l.Deployments()) != deployBefore {
			t.Errorf("%s changed berth/deploy", what)
		}
	}

	old := ociLayout(t, oldKernelImage(t))
	job := &recordingJob{}
	_, err = e.Switch(context.Background(), job, old, UpgradeOptions{})
	check("switch", err, job)

	// The tracked image itself gets the old kernel: upgrade refuses it too.
	dir := strings.TrimSuffix(strings.TrimPrefix(v1, "oci:"), ":test")
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(strings.TrimSuffix(strings.TrimPrefix(old, "oci:"), ":test"), dir); err != nil {
		t.Fatal(err)
	}
	job = &recordingJob{}
	_, err = e.Upgrade(context.Background(), job, UpgradeOptions{})
	check("upgrade", err, job)
}
