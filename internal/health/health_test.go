package health

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/store"
)

func script(t *testing.T, dir, name, body string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
}

func noFailedUnits(context.Context) ([]string, error) { return nil, nil }

func TestRunOverridesAndResults(t *testing.T) {
	root := t.TempDir()
	img, local := filepath.Join(root, "usr"), filepath.Join(root, "etc")
	script(t, img, "10-ok", "exit 0")
	script(t, img, "20-fails-in-image", "echo broken; exit 3")
	script(t, img, "30-disabled-locally", "exit 1")
	script(t, local, "20-fails-in-image", "exit 0") // the local file replaces the image's
	if err := os.Symlink("/dev/null", filepath.Join(local, "30-disabled-locally")); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(img, "README"), []byte("not executable"), 0o644)
	rep, err := Run(context.Background(), Options{Dirs: []string{img, local}, FailedUnits: noFailedUnits})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK || len(rep.Checks) != 2 || rep.Checks[0].Name != "10-ok" || rep.Checks[1].Path != filepath.Join(local, "20-fails-in-image") {
		t.Fatalf("report %+v", rep)
	}

	script(t, local, "40-bad", "echo something is wrong >&2; exit 2")
	rep, err = Run(context.Background(), Options{Dirs: []string{img, local}, FailedUnits: noFailedUnits})
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK || !strings.Contains(rep.Checks[2].Output, "something is wrong") || !strings.Contains(rep.Summary(), "40-bad") {
		t.Fatalf("failing check not reported: %+v", rep)
	}
}

func TestRunTimeoutAndUnits(t *testing.T) {
	dir := t.TempDir()
	script(t, dir, "slow", "sleep 30")
	start := time.Now()
	rep, err := Run(context.Background(), Options{Dirs: []string{dir}, Timeout: 200 * time.Millisecond, FailedUnits: noFailedUnits})
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK || !strings.Contains(rep.Checks[0].Error, "timed out") || time.Since(start) > 20*time.Second {
		t.Fatalf("timeout: %+v", rep)
	}

	units := func(context.Context) ([]string, error) {
		return []string{"berth-healthcheck.service", "nginx.service"}, nil
	}
	rep, err = Run(context.Background(), Options{Dirs: []string{t.TempDir()}, FailedUnits: units, IgnoreUnits: []string{"berth-healthcheck.service"}})
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK || len(rep.FailedUnits) != 1 || rep.FailedUnits[0] != "nginx.service" {
		t.Fatalf("failed units: %+v", rep)
	}
	broken := func(context.Context) ([]string, error) { return nil, errors.New("no bus") }
	if rep, _ := Run(context.Background(), Options{Dirs: []string{}, FailedUnits: broken}); rep.OK {
		t.Fatal("a unit listing error must not pass as healthy")
	}
}

func writeDeployment(t *testing.T, l store.Layout, id, state string) {
	t.Helper()
	digest := strings.Split(id, "-")[1] + strings.Repeat("0", 52)
	d := deploy.Deployment{ID: id, ComposefsDigest: digest, State: state}
	b, _ := json.Marshal(d)
	os.MkdirAll(l.Deployment(id), 0o755)
	if err := os.WriteFile(filepath.Join(l.Deployment(id), deploy.MetadataFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestRecord(t *testing.T) {
	sysroot := t.TempDir()
	l := store.At(sysroot)
	booted, abandoned := "2-bbbbbbbbbbbb", "3-cccccccccccc"
	writeDeployment(t, l, "1-aaaaaaaaaaaa", deploy.StateBooted)
	writeDeployment(t, l, booted, deploy.StateStaged)
	writeDeployment(t, l, abandoned, deploy.StateStaged)

	// Unhealthy: the booted one stays staged (not proven good).
	if err := Record(sysroot, booted, &Report{OK: false}, []string{abandoned}); err != nil {
		t.Fatal(err)
	}
	state := func(id string) string {
		d, err := deploy.Read(l, id)
		if err != nil {
			t.Fatal(err)
		}
		return d.State
	}
	if state(booted) != deploy.StateStaged || state(abandoned) != deploy.StateFailed {
		t.Fatalf("after unhealthy boot: %s %s", state(booted), state(abandoned))
	}
	if err := Record(sysroot, booted, &Report{OK: true}, []string{abandoned, "9-999999999999"}); err != nil {
		t.Fatal(err)
	}
	if state(booted) != deploy.StateBooted || state("1-aaaaaaaaaaaa") != deploy.StateBooted {
		t.Fatalf("after healthy boot: %s", state(booted))
	}
}
