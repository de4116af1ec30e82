package api

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/godbus/dbus/v5"

	"github.com/berth-dev/berth/internal/localchanges"
	"github.com/berth-dev/berth/internal/store"
)

// TestResetThroughBus resets a deployment's local changes through berthd
// (real engine, real upper directory) and checks the argument checks.
func TestResetThroughBus(t *testing.T) {
	needRoot(t)
	bus := startBus(t, "")
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
	startServer(t, bus, &SysrootEngine{Sysroot: sysroot}, sysroot)

	diff, via, err := DiffAuto(sysroot, false, bus.addr, d.ID)
	if err != nil || via != ViaDaemon || len(diff.Changes) != 2 {
		t.Fatalf("diff via %s: %+v, %v", via, diff, err)
	}

	c, err := Connect(bus.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dep := map[string]dbus.Variant{"deployment": dbus.MakeVariant(d.ID)}
	for name, call := range map[string]struct {
		paths []string
		opts  map[string]dbus.Variant
		want  string
	}{
		"neither paths nor all": {nil, dep, ErrInvalidArgs},
		"paths and all":         {[]string{"/etc/x"}, map[string]dbus.Variant{"deployment": dbus.MakeVariant(d.ID), "all": dbus.MakeVariant(true)}, ErrInvalidArgs},
		"unknown option":        {[]string{"/etc/x"}, map[string]dbus.Variant{"force": dbus.MakeVariant(true)}, ErrInvalidArgs},
		"none booted":           {[]string{"/etc/x"}, nil, ErrInvalidArgs},
		"shared state":          {[]string{"/var/log"}, dep, ErrInvalidArgs},
		"relative path":         {[]string{"etc/hostname"}, dep, ErrInvalidArgs},
		"no such deployment":    {[]string{"/etc/x"}, map[string]dbus.Variant{"deployment": dbus.MakeVariant("99-0123456789ab")}, ErrNotFound},
	} {
		if _, err := c.Reset(call.paths, call.opts); dbusErrName(err) != call.want {
			t.Errorf("%s: %v, want %s", name, err, call.want)
		}
	}

	s, err := c.Reset([]string{"/etc/hostname"}, dep)
	if err != nil {
		t.Fatal(err)
	}
	var res localchanges.ResetResult
	if err := json.Unmarshal([]byte(s), &res); err != nil || res.Pending || len(res.Changes) != 1 || res.Changes[0].Path != "/etc/hostname" {
		t.Fatalf("reset: %s, %v", s, err)
	}
	if _, err := os.Lstat(filepath.Join(up, "etc", "hostname")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("upper etc/hostname after reset: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(up, "etc", "new.conf")); err != nil {
		t.Fatalf("upper etc/new.conf after a reset of another path: %v", err)
	}

	r2, via, err := ResetAuto(ResetRequest{Sysroot: sysroot, Address: bus.addr, Deployment: d.ID, All: true})
	if err != nil || via != ViaDaemon || r2.Pending || len(r2.Changes) != 1 {
		t.Fatalf("reset all via %s: %+v, %v", via, r2, err)
	}
	diff, via, err = DiffAuto(sysroot, true, "", "")
	if err != nil || via != ViaDirect || diff.Deployment != d.ID || len(diff.Changes) != 0 {
		t.Fatalf("direct diff via %s after reset all: %+v, %v", via, diff, err)
	}
}
