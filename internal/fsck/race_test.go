package fsck

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/fsverity"
	"github.com/berth-dev/berth/internal/oci"
	"github.com/berth-dev/berth/internal/runtime"
	"github.com/berth-dev/berth/internal/store"
)

// The roles of TestConcurrentCleanupKeepsWhatDeploymentsAndPullsReference's
// child processes: each is a separate process, as two berth commands run
// with --sysroot would be, so only the on-disk locks keep them apart.
const (
	raceRoleEnv    = "BERTH_FSCK_RACE_ROLE"
	raceSysrootEnv = "BERTH_FSCK_RACE_SYSROOT"
	raceWorkEnv    = "BERTH_FSCK_RACE_WORK"
	raceRounds     = 12
)

// TestMain runs a child's role when the test binary is re-executed as one.
func TestMain(m *testing.M) {
	if role := os.Getenv(raceRoleEnv); role != "" {
		if err := raceChild(role, os.Getenv(raceSysrootEnv), os.Getenv(raceWorkEnv)); err != nil {
			fmt.Fprintf(os.Stderr, "race child %s: %v\n", role, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestConcurrentCleanupKeepsWhatDeploymentsAndPullsReference runs cleanup in
// a loop while other processes create deployments (which add berth's
// runtime files and a composefs image to the store) and pull images; at the
// end every object and image a record or deployment references exists and
// verifies.
func TestConcurrentCleanupKeepsWhatDeploymentsAndPullsReference(t *testing.T) {
	f := newStore(t)
	stop := filepath.Join(f.work, "stop")
	start := func(role string) *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), raceRoleEnv+"="+role, raceSysrootEnv+"="+f.sysroot, raceWorkEnv+"="+f.work)
		out, err := os.Create(filepath.Join(f.work, role+".log"))
		must(t, err)
		cmd.Stdout, cmd.Stderr = out, out
		must(t, cmd.Start())
		return cmd
	}
	cleaner := start("cleanup")
	deployer := start("deploy")
	puller := start("pull")
	var failed []string
	for _, c := range []struct {
		name string
		cmd  *exec.Cmd
	}{{"deploy", deployer}, {"pull", puller}} {
		if err := c.cmd.Wait(); err != nil {
			failed = append(failed, c.name)
		}
	}
	must(t, os.WriteFile(stop, nil, 0o644))
	if err := cleaner.Wait(); err != nil {
		failed = append(failed, "cleanup")
	}
	for _, role := range []string{"cleanup", "deploy", "pull"} {
		b, _ := os.ReadFile(filepath.Join(f.work, role+".log"))
		t.Logf("%s child:\n%s", role, b)
	}
	if len(failed) > 0 {
		t.Errorf("children failed: %v", failed)
	}
	rep := f.check(t, true)
	if len(rep.Errors) > 0 {
		t.Fatalf("fsck --verify-objects after concurrent cleanup, deploy and pull: %d errors:\n%s", len(rep.Errors), list(rep.Errors))
	}
	ds, err := deploy.List(f.l)
	must(t, err)
	if len(ds) != raceRounds+1 {
		t.Errorf("%d deployments, want %d", len(ds), raceRounds+1)
	}
}

func raceChild(role, sysroot, work string) error {
	l := store.At(sysroot)
	switch role {
	case "cleanup":
		n := 0
		for {
			if _, err := os.Stat(filepath.Join(work, "stop")); err == nil {
				fmt.Printf("%d cleanups\n", n)
				return nil
			}
			rep, err := oci.Cleanup(sysroot)
			if err != nil {
				return err
			}
			if rep.ObjectsRemoved+rep.ImagesRemoved > 0 {
				fmt.Printf("cleanup %d removed %d objects, %d images\n", n, rep.ObjectsRemoved, rep.ImagesRemoved)
			}
			n++
		}
	case "deploy":
		imgs, err := oci.ListImages(sysroot)
		if err != nil || len(imgs) == 0 {
			return fmt.Errorf("no image to deploy: %v", err)
		}
		img := imgs[0]
		objs, err := composefs.OpenStore(l.Objects(), fsverity.SHA256)
		if err != nil {
			return err
		}
		for i := 0; i < raceRounds; i++ {
			rt, err := randomRuntime(filepath.Join(work, "rt-"+strconv.Itoa(i)))
			if err != nil {
				return err
			}
			tree, err := oci.LoadTree(sysroot, img)
			if err != nil {
				return err
			}
			res, err := deploy.Create(l, deploy.CreateOptions{Tree: tree, Store: objs, Runtime: rt, Kernel: "6.12.0-fsck",
				ImageRef: img.Ref, ManifestDigest: img.ManifestDigest, Origin: "race"})
			if err != nil {
				return err
			}
			fmt.Printf("deployment %s\n", res.Deployment.ID)
		}
		return nil
	case "pull":
		f := &fixture{work: work, sysroot: sysroot, l: l}
		for i := 0; i < raceRounds; i++ {
			layout := filepath.Join(work, "layout-"+strconv.Itoa(i))
			if err := writeLayoutErr(layout, strings.Repeat(fmt.Sprintf("pull %d at %d\n", i, time.Now().UnixNano()), 50)); err != nil {
				return err
			}
			img, err := f.pull(context.Background(), layout)
			if err != nil {
				return err
			}
			fmt.Printf("pulled %s\n", img.ComposefsDigest)
		}
		return nil
	}
	return fmt.Errorf("unknown role %q", role)
}

// randomRuntime is a runtime set whose binaries are new content, so that
// every deployment adds objects nothing else references yet.
func randomRuntime(dir string) (*runtime.Set, error) {
	bin := filepath.Join(dir, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return nil, err
	}
	for _, name := range []string{"berth", "berth-init"} {
		b := make([]byte, 64<<10)
		rand.Read(b)
		if err := os.WriteFile(filepath.Join(bin, name), b, 0o755); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "units"), 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "units", "berthd.service"), []byte("[Service]\nExecStart=/usr/lib/berth/berthd\n"), 0o644); err != nil {
		return nil, err
	}
	return runtime.Collect(runtime.Options{BinDir: bin, RepoDir: dir})
}
