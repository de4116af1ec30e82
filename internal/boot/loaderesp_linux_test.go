package boot

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/blkdev"
	"github.com/berth-dev/berth/internal/efivar"
	"github.com/berth-dev/berth/internal/testenv"
)

// TestLoaderESPDevice finds the ESP by LoaderDevicePartUUID in a fake
// efivarfs and a fake sysfs whose partitions are FAT images made by
// mkfs.vfat (the host kernel has no vfat driver, so the mount itself is
// exercised in the VM lane's upgrade scenarios).
func TestLoaderESPDevice(t *testing.T) {
	testenv.RequireTool(t, "mkfs.vfat", "dosfstools")
	root := t.TempDir()
	vars, sys, dev := filepath.Join(root, "efivars"), filepath.Join(root, "sys"), filepath.Join(root, "dev")
	for _, d := range []string{vars, dev} {
		os.MkdirAll(d, 0o755)
	}
	const espUUID = "1B2C3D4E-0000-4000-8000-00000000abcd"
	parts := map[string]string{"vda1": strings.ToLower(espUUID), "vda2": "99999999-0000-4000-8000-000000000002"}
	for name, pu := range parts {
		os.MkdirAll(filepath.Join(sys, "class", "block", name), 0o755)
		ue := "DEVNAME=" + name + "\nDEVTYPE=partition\nPARTN=" + name[3:] + "\nPARTUUID=" + pu + "\n"
		os.WriteFile(filepath.Join(sys, "class", "block", name, "uevent"), []byte(ue), 0o644)
		img := filepath.Join(dev, name)
		if err := os.WriteFile(img, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, 40<<20); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("mkfs.vfat", "-F", "32", img).CombinedOutput(); err != nil {
			t.Fatalf("mkfs.vfat: %v: %s", err, out)
		}
	}
	l := LoaderESP{EFIVars: efivar.Store{Dir: vars}, Scanner: blkdev.Scanner{Sys: sys, Dev: dev}}
	if _, err := l.Device(); err == nil || !strings.Contains(err.Error(), "systemd-boot") {
		t.Fatalf("without LoaderDevicePartUUID: %v, want an error that names the boot loader", err)
	}
	writeVar := func(s string) {
		b := binary.LittleEndian.AppendUint32(nil, efivar.BootServiceAccess|efivar.RuntimeAccess)
		b = append(b, efivar.EncodeUTF16(s)...)
		if err := os.WriteFile(filepath.Join(vars, "LoaderDevicePartUUID-"+efivar.LoaderGUID), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeVar(espUUID)
	d, err := l.Device()
	if err != nil {
		t.Fatal(err)
	}
	if d.Name != "vda1" || d.FSType != "vfat" {
		t.Fatalf("found %s, want vda1 with vfat", d)
	}
	writeVar("../../etc/passwd")
	if _, err := l.Device(); err == nil || !strings.Contains(err.Error(), "not a partition UUID") {
		t.Fatalf("hostile LoaderDevicePartUUID: %v", err)
	}
	writeVar("00000000-0000-4000-8000-000000000000")
	if _, err := l.Device(); err == nil || !strings.Contains(err.Error(), "no block device") {
		t.Fatalf("unknown partition: %v", err)
	}
}
