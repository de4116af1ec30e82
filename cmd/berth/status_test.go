package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/api"
	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/jsonschema"
	"github.com/berth-dev/berth/internal/store"
)

// runCLI runs the berth CLI in-process and returns what it printed.
func runCLI(t *testing.T, args ...string) string {
	t.Helper()
	global = globalFlags{}
	var out bytes.Buffer
	root := newRootCmd()
	root.SetOut(&out)
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		t.Fatalf("berth %v: %v", args, err)
	}
	return out.String()
}

// writeDeployment writes a deployment.json as internal/deploy does.
func writeDeployment(t *testing.T, l store.Layout, serial int, digest string) *deploy.Deployment {
	t.Helper()
	d := &deploy.Deployment{ID: fmt.Sprintf("%d-%s", serial, digest[:12]), ImageRef: "docker://example.org/os:" + fmt.Sprint(serial),
		ManifestDigest: "sha256:" + strings.Repeat("cd", 32), ComposefsDigest: digest, Kernel: "6.12.0", Origin: "upgrade",
		State: deploy.StateStaged, Created: time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC), LocalMode: "persistent"}
	dir := l.Deployment(d.ID)
	if err := os.MkdirAll(filepath.Join(dir, "upper"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(d)
	if err := os.WriteFile(filepath.Join(dir, deploy.MetadataFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestStatusJSONMatchesSchema(t *testing.T) {
	sysroot := t.TempDir()
	l := store.At(sysroot)
	if err := os.MkdirAll(l.Deployments(), 0o755); err != nil {
		t.Fatal(err)
	}
	a := writeDeployment(t, l, 1, strings.Repeat("a1", 32))
	b := writeDeployment(t, l, 2, strings.Repeat("b2", 32))
	os.WriteFile(filepath.Join(l.Deployment(b.ID), "conflicts.json"), []byte(`{"version":1,"conflicts":[{"path":"/etc/hostname","kind":"modify/modify","theirs":"/etc/hostname.berth-new"}]}`), 0o644)
	kernel := filepath.Join(sysroot, "vmlinuz")
	os.WriteFile(kernel, []byte("kernel"), 0o644)
	esp := boot.ESP{Dir: filepath.Join(sysroot, "efi")}
	if err := esp.AddBLS(a.ID, boot.BLSEntry{Linux: kernel, Options: "berth.deploy=" + a.ID}, 0); err != nil {
		t.Fatal(err)
	}
	if err := esp.AddBLS(b.ID, boot.BLSEntry{Linux: kernel, Options: "berth.deploy=" + b.ID}, 3); err != nil {
		t.Fatal(err)
	}

	out := runCLI(t, "status", "--json", "--sysroot", sysroot)
	schema, err := os.ReadFile("../../docs/status.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := jsonschema.Validate(schema, []byte(out)); err != nil {
		t.Fatalf("berth status --json does not match docs/status.schema.json: %v\n%s", err, out)
	}
	var h api.Host
	if err := json.Unmarshal([]byte(out), &h); err != nil {
		t.Fatal(err)
	}
	if h.Status.Staged == nil || h.Status.Staged.Berth.ID != b.ID || h.Status.Rollback == nil || h.Status.Rollback.Berth.ID != a.ID {
		t.Fatalf("roles: %s", out)
	}
	if h.Status.Staged.Image.Image.Image != "example.org/os:2" || h.Status.Staged.Image.ImageDigest != b.ManifestDigest {
		t.Fatalf("bootc image fields: %+v", h.Status.Staged.Image)
	}
	if be := h.Status.Staged.Berth.BootEntry; be == nil || be.TriesLeft != 3 || be.State != "indeterminate" {
		t.Fatalf("boot counting not shown: %+v", be)
	}
	if c := h.Status.Staged.Berth.Conflicts; len(c) != 1 || c[0] != "/etc/hostname" {
		t.Fatalf("conflicts: %v", c)
	}

	text := runCLI(t, "status", "--sysroot", sysroot)
	for _, want := range []string{"Staged:   " + b.ID, "Rollback: " + a.ID, "/etc/hostname", "3 tries left"} {
		if !strings.Contains(text, want) {
			t.Errorf("text status lacks %q:\n%s", want, text)
		}
	}
}
