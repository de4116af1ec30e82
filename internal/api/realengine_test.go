package api

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/jsonschema"
	"github.com/berth-dev/berth/internal/store"
	"github.com/berth-dev/berth/internal/testenv"
)

// twoDeployments makes deployments A (older) and B with Type #1 boot
// entries on the sysroot's ESP, as an installed system has them.
func twoDeployments(t *testing.T) (sysroot string, a, b *deploy.Deployment) {
	t.Helper()
	sysroot = newSysroot(t)
	l := store.At(sysroot)
	var err error
	if a, err = createDeployment(l, "A"); err != nil {
		t.Fatal(err)
	}
	if b, err = createDeployment(l, "B"); err != nil {
		t.Fatal(err)
	}
	kernel := filepath.Join(sysroot, "vmlinuz")
	if err := os.WriteFile(kernel, []byte("not really a kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	esp := boot.ESP{Dir: filepath.Join(sysroot, "efi")}
	for _, d := range []*deploy.Deployment{a, b} {
		if err := esp.AddBLS(d.ID, boot.BLSEntry{Title: "berth " + d.ID, Linux: kernel, Options: "berth.deploy=" + d.ID}, 0); err != nil {
			t.Fatal(err)
		}
	}
	return sysroot, a, b
}

func TestReadStatusRoles(t *testing.T) {
	testenv.RequireRoot(t, "deploy.Create gives the deployment root's ownership")
	sysroot, a, b := twoDeployments(t)
	h, err := ReadStatus(StatusOptions{Sysroot: sysroot})
	if err != nil {
		t.Fatal(err)
	}
	// Not booted from this sysroot: the default entry (the newest) is
	// staged, the other one is the rollback.
	if h.Status.Booted != nil || h.Status.Staged == nil || h.Status.Staged.Berth.ID != b.ID || h.Status.Rollback == nil || h.Status.Rollback.Berth.ID != a.ID {
		t.Fatalf("roles: booted %v staged %v rollback %v", h.Status.Booted, h.Status.Staged, h.Status.Rollback)
	}
	if h.Spec.Image == nil || h.Spec.Image.Image != "example.org/os:1" || h.Spec.Image.Transport != "registry" {
		t.Fatalf("spec.image %+v", h.Spec.Image)
	}
	if be := h.Status.Staged.Berth.BootEntry; be == nil || be.Type != "bls" || !be.Default || be.State != "good" {
		t.Fatalf("boot entry of %s: %+v", b.ID, be)
	}
	if len(h.Status.Berth.Deployments) != 2 {
		t.Fatalf("%d deployments", len(h.Status.Berth.Deployments))
	}
}

// TestRealEngineRollback runs a Rollback job through the bus with the real
// engine (internal/boot on a real ESP directory).
func TestRealEngineRollback(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot, a, b := twoDeployments(t)
	startServer(t, bus, &SysrootEngine{Sysroot: sysroot}, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	staged, err := c.conn.Object(BusName, ManagerPath).GetProperty(ManagerInterface + ".Staged")
	if err != nil || staged.Value() != b.ID {
		t.Fatalf("Staged before rollback = %v, %v; want %s", staged, err, b.ID)
	}
	job, err := c.Rollback(nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := c.Wait(ctx, job, nil)
	if err != nil || res.State != StateDone || !strings.Contains(res.Summary, a.ID) {
		t.Fatalf("rollback job: %+v, %v", res, err)
	}
	def, err := boot.ESP{Dir: filepath.Join(sysroot, "efi")}.Default()
	if err != nil || def == nil || def.ID != a.ID {
		t.Fatalf("default entry after rollback: %+v, %v; want %s", def, err, a.ID)
	}
	staged, err = c.conn.Object(BusName, ManagerPath).GetProperty(ManagerInterface + ".Staged")
	if err != nil || staged.Value() != a.ID {
		t.Fatalf("Staged after rollback = %v, %v; want %s", staged, err, a.ID)
	}
	_, raw, err := c.Status()
	if err != nil {
		t.Fatal(err)
	}
	if err := ValidateStatusJSON(raw); err != nil {
		t.Fatalf("GetStatus does not match docs/status.schema.json: %v", err)
	}
	var h Host
	json.Unmarshal(raw, &h)
	if h.Status.Rollback == nil || h.Status.Rollback.Berth.ID != b.ID {
		t.Fatalf("rollback after rollback: %+v", h.Status.Rollback)
	}
}

// TestRealEngineSwitchFailsCleanly: the real engine's Switch to an image
// that does not exist fails with the importer's error and leaves the
// deployments as they were.
func TestRealEngineSwitchFailsCleanly(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
	sysroot, _, _ := twoDeployments(t)
	policy := filepath.Join(sysroot, "policy.json")
	os.WriteFile(policy, []byte(`{"default":[{"type":"insecureAcceptAnything"}]}`), 0o644)
	startServer(t, bus, &SysrootEngine{Sysroot: sysroot, PolicyPath: policy}, sysroot)
	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	job, err := c.Switch("oci:"+filepath.Join(sysroot, "no-such-layout"), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := c.Wait(ctx, job, nil)
	if err != nil || res.State != StateFailed || !strings.Contains(res.Error, "no-such-layout") {
		t.Fatalf("switch job: %+v, %v", res, err)
	}
	if deps, _ := deploy.List(store.At(sysroot)); len(deps) != 2 {
		t.Fatalf("%d deployments after a failed switch", len(deps))
	}
}

// ValidateStatusJSON checks a status document against docs/status.schema.json.
func ValidateStatusJSON(raw []byte) error {
	schema, err := os.ReadFile("../../docs/status.schema.json")
	if err != nil {
		return err
	}
	return jsonschema.Validate(schema, raw)
}

func TestDiffDeployment(t *testing.T) {
	needRoot(t)
	sysroot := newSysroot(t)
	l := store.At(sysroot)
	d, err := createDeployment(l, "host")
	if err != nil {
		t.Fatal(err)
	}
	up := filepath.Join(l.Deployment(d.ID), "upper")
	os.MkdirAll(filepath.Join(up, "etc"), 0o755)
	os.WriteFile(filepath.Join(up, "etc", "hostname"), []byte("changed\n"), 0o644)
	os.WriteFile(filepath.Join(up, "etc", "new.conf"), []byte("x\n"), 0o644)
	os.MkdirAll(filepath.Join(up, "opt", "app"), 0o755)
	os.WriteFile(filepath.Join(up, "opt", "app", "bin"), []byte("x\n"), 0o755)
	if err := unix.Mknod(filepath.Join(up, "etc", "motd"), unix.S_IFCHR, 0); err != nil {
		t.Fatal(err)
	}
	out, err := (&SysrootEngine{Sysroot: sysroot}).Diff(d.ID)
	if err != nil {
		t.Fatal(err)
	}
	var res DiffResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range res.Changes {
		got = append(got, c.Kind+" "+c.Path)
	}
	want := "modified /etc/hostname,deleted /etc/motd,added /etc/new.conf,added /opt"
	if strings.Join(got, ",") != want {
		t.Fatalf("diff: %v\nwant %s", got, want)
	}
}
