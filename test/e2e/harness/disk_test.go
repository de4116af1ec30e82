package harness

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
)

func TestPartitions(t *testing.T) {
	testenv.RequireTool(t, "sgdisk", "gdisk")
	disk := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 64<<20); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("sgdisk", "-n", "1:2048:+8M", "-t", "1:ef00", "-c", "1:esp",
		"-u", "1:0E2E0001-0000-4000-8000-000000000001",
		"-n", "2:0:0", "-t", "2:8304", "-c", "2:root", disk).CombinedOutput()
	if err != nil {
		t.Fatalf("sgdisk: %v: %s", err, out)
	}
	d, err := OpenInstalledDisk(disk)
	if err != nil {
		t.Fatal(err)
	}
	if d.ESP.Start != 2048*512 || d.ESP.End != (2048+8*2048)*512 || d.ESP.UUID != "0E2E0001-0000-4000-8000-000000000001" || d.ESP.Name != "esp" {
		t.Errorf("ESP: %+v", d.ESP)
	}
	if d.Root.Type != TypeRootX86_64 || d.Root.Index != 2 || d.Root.Start != d.ESP.End || d.Root.Name != "root" {
		t.Errorf("root: %+v", d.Root)
	}
	// A disk without a GPT is refused.
	plain := filepath.Join(t.TempDir(), "plain.img")
	os.WriteFile(plain, make([]byte, 1<<20), 0o644)
	if _, err := Partitions(plain); err == nil {
		t.Error("a disk without GPT was accepted")
	}
}

func TestPESectionsOfSystemdStub(t *testing.T) {
	stub := filepath.Join(CacheDir(), "trixie-rootfs/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
	testenv.RequireFile(t, stub, testenv.Guest)
	secs, err := PESections(stub)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := secs[".sdmagic"]; !ok {
		t.Errorf("systemd-stub has no .sdmagic section: %v", len(secs))
	}
}
