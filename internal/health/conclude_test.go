package health

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/deploy"
	"github.com/berth-dev/berth/internal/store"
)

// espWith makes an ESP directory with UKI entry files of the given names
// (their content is not read: Entries tolerates non-PE files).
func espWith(t *testing.T, names ...string) string {
	t.Helper()
	esp := t.TempDir()
	os.MkdirAll(filepath.Join(esp, "loader"), 0o755)
	dir := filepath.Join(esp, filepath.FromSlash(boot.LinuxDir))
	os.MkdirAll(dir, 0o755)
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), []byte("uki"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return esp
}

func entryFiles(t *testing.T, esp string) string {
	t.Helper()
	des, err := os.ReadDir(filepath.Join(esp, filepath.FromSlash(boot.LinuxDir)))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, de := range des {
		names = append(names, de.Name())
	}
	return strings.Join(names, " ")
}

func TestConclude(t *testing.T) {
	const old, booted, abandoned = "1-aaaaaaaaaaaa", "2-bbbbbbbbbbbb", "3-cccccccccccc"
	setup := func(t *testing.T, names ...string) (string, string) {
		sysroot := t.TempDir()
		l := store.At(sysroot)
		writeDeployment(t, l, old, deploy.StateBooted)
		writeDeployment(t, l, booted, deploy.StateStaged)
		writeDeployment(t, l, abandoned, deploy.StateStaged)
		return sysroot, espWith(t, names...)
	}
	unhealthy := &Report{OK: false, Checks: []CheckResult{{Name: "50-app", Error: "exit status 1"}}}

	t.Run("healthy trial is blessed", func(t *testing.T) {
		sysroot, esp := setup(t, "berth-"+old+".efi", "berth-"+booted+"+2-1.efi", "berth-"+abandoned+"+0-3.efi")
		out, err := Conclude(sysroot, esp, booted, &Report{OK: true})
		if err != nil {
			t.Fatal(err)
		}
		if !out.Blessed || out.Reboot || out.Entry != "berth-"+booted+"+2-1.efi" {
			t.Fatalf("outcome %+v", out)
		}
		want := "berth-" + old + ".efi berth-" + booted + ".efi berth-" + abandoned + "+0-3.efi"
		if got := entryFiles(t, esp); got != want {
			t.Fatalf("entries %q, want %q", got, want)
		}
		l := store.At(sysroot)
		if d, _ := deploy.Read(l, booted); d.State != deploy.StateBooted {
			t.Errorf("booted deployment state %s", d.State)
		}
		if d, _ := deploy.Read(l, abandoned); d.State != deploy.StateFailed {
			t.Errorf("abandoned deployment state %s", d.State)
		}
		if r, err := ReadResult(l, booted); err != nil || !r.OK {
			t.Errorf("health.json: %+v %v", r, err)
		}
	})
	t.Run("unhealthy trial reboots", func(t *testing.T) {
		sysroot, esp := setup(t, "berth-"+old+".efi", "berth-"+booted+"+1-2.efi")
		out, err := Conclude(sysroot, esp, booted, unhealthy)
		if err != nil {
			t.Fatal(err)
		}
		if out.Blessed || !out.Reboot {
			t.Fatalf("outcome %+v", out)
		}
		if got := entryFiles(t, esp); !strings.Contains(got, booted+"+1-2.efi") {
			t.Errorf("an unhealthy entry must stay counted: %s", got)
		}
		r, err := ReadResult(store.At(sysroot), booted)
		if err != nil || r.OK || !strings.Contains(r.Summary, "check 50-app: exit status 1") {
			t.Errorf("health.json: %+v %v", r, err)
		}
	})
	t.Run("unhealthy last try reboots to the fallback", func(t *testing.T) {
		sysroot, esp := setup(t, "berth-"+old+".efi", "berth-"+booted+"+0-3.efi")
		out, _ := Conclude(sysroot, esp, booted, unhealthy)
		if !out.Reboot {
			t.Fatalf("outcome %+v", out)
		}
	})
	t.Run("unhealthy blessed entry does not reboot", func(t *testing.T) {
		sysroot, esp := setup(t, "berth-"+old+".efi", "berth-"+booted+".efi")
		out, _ := Conclude(sysroot, esp, booted, unhealthy)
		if out.Reboot || out.Blessed {
			t.Fatalf("outcome %+v", out)
		}
	})
	t.Run("unhealthy trial without a fallback does not reboot", func(t *testing.T) {
		sysroot, esp := setup(t, "berth-"+old+"+0-3.efi", "berth-"+booted+"+1-2.efi")
		out, _ := Conclude(sysroot, esp, booted, unhealthy)
		if out.Reboot {
			t.Fatalf("outcome %+v: no other entry can boot, a reboot would loop", out)
		}
	})
	t.Run("no ESP", func(t *testing.T) {
		sysroot, _ := setup(t)
		out, err := Conclude(sysroot, "", booted, &Report{OK: true})
		if err != nil || out.Blessed || out.Reboot {
			t.Fatalf("outcome %+v %v", out, err)
		}
	})
}

// TestBootCheckRebootsOnlyAnUnhealthyTrial: the boot check reboots when the
// booted entry is on trial, the boot is unhealthy and rebooting is allowed —
// and in no other case.
func TestBootCheckRebootsOnlyAnUnhealthyTrial(t *testing.T) {
	const old, booted = "1-aaaaaaaaaaaa", "2-bbbbbbbbbbbb"
	check := func(t *testing.T, healthy, allowed bool) (rebooted bool, err error) {
		sysroot := t.TempDir()
		l := store.At(sysroot)
		writeDeployment(t, l, old, deploy.StateBooted)
		writeDeployment(t, l, booted, deploy.StateStaged)
		esp := espWith(t, "berth-"+old+".efi", "berth-"+booted+"+1-2.efi")
		dir := t.TempDir()
		script := "#!/bin/sh\nexit 0\n"
		if !healthy {
			script = "#!/bin/sh\necho broken\nexit 1\n"
		}
		if err := os.WriteFile(filepath.Join(dir, "50-app"), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
		_, _, err = BootCheck{
			Options: Options{Dirs: []string{dir}, SkipUnits: true}, Sysroot: sysroot, ESP: esp, Booted: booted,
			RebootOnFailedTrial: allowed,
			Reboot:              func(context.Context) error { rebooted = true; return nil },
		}.Run(context.Background())
		return rebooted, err
	}
	for _, c := range []struct {
		healthy, allowed, reboot bool
	}{{false, true, true}, {false, false, false}, {true, true, false}} {
		rebooted, err := check(t, c.healthy, c.allowed)
		if rebooted != c.reboot {
			t.Errorf("healthy=%v allowed=%v: rebooted=%v, want %v", c.healthy, c.allowed, rebooted, c.reboot)
		}
		if (err == nil) != c.healthy {
			t.Errorf("healthy=%v: err %v", c.healthy, err)
		}
	}
}
