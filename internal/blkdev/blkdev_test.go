package blkdev

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berth-dev/berth/internal/testenv"
)

func need(t *testing.T, tools ...string) {
	for _, tool := range tools {
		testenv.RequireTool(t, tool, map[string]string{"mkfs.ext4": "e2fsprogs", "mkfs.vfat": "dosfstools", "sgdisk": "gdisk"}[tool])
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// TestScanAndWait builds real filesystems and a GPT disk with the standard
// tools, lays them out as a fake sysfs + /dev (regular files stand in for
// device nodes, which needs no root), and checks every root= form.
func TestScanAndWait(t *testing.T) {
	need(t, "mkfs.ext4", "mkfs.vfat", "sgdisk")
	dir := t.TempDir()
	sys, dev := filepath.Join(dir, "sys"), filepath.Join(dir, "dev")
	os.MkdirAll(filepath.Join(sys, "devices", "vda"), 0o755)
	os.MkdirAll(filepath.Join(sys, "class", "block"), 0o755)
	os.MkdirAll(dev, 0o755)

	// Whole disk with a GPT; partition 2 holds ext4.
	disk := filepath.Join(dev, "vda")
	if err := os.WriteFile(disk, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(disk, 8<<20)
	run(t, "sgdisk", "-n", "1:2048:+2M", "-c", "1:esp", "-u", "1:11111111-2222-3333-4444-555555555555",
		"-n", "2:0:0", "-c", "2:root part", "-u", "2:0E2E0002-AAAA-BBBB-CCCC-DDDDEEEEFFFF", disk)
	ext := filepath.Join(dev, "vda2")
	run(t, "mkfs.ext4", "-q", "-F", "-U", "01234567-89ab-cdef-0123-456789abcdef", "-L", "berth-root", ext, "4M")
	vfat := filepath.Join(dev, "vda1")
	os.WriteFile(vfat, nil, 0o644)
	os.Truncate(vfat, 2<<20)
	run(t, "mkfs.vfat", "-i", "1234ABCD", "-n", "ESP", vfat)

	add := func(name, uevent string, parent string) {
		p := filepath.Join(sys, "devices", name)
		if parent != "" {
			p = filepath.Join(sys, "devices", parent, name)
		}
		os.MkdirAll(p, 0o755)
		os.WriteFile(filepath.Join(p, "uevent"), []byte(uevent), 0o644)
		rel, _ := filepath.Rel(filepath.Join(sys, "class", "block"), p)
		if err := os.Symlink(rel, filepath.Join(sys, "class", "block", name)); err != nil {
			t.Fatal(err)
		}
	}
	add("vda", "MAJOR=254\nMINOR=0\nDEVNAME=vda\nDEVTYPE=disk\n", "")
	// Old-kernel uevents without PARTUUID: the GPT is read instead.
	add("vda1", "MAJOR=254\nMINOR=1\nDEVNAME=vda1\nDEVTYPE=partition\nPARTN=1\n", "vda")
	add("vda2", "MAJOR=254\nMINOR=2\nDEVNAME=vda2\nDEVTYPE=partition\nPARTN=2\n", "vda")

	sc := Scanner{Sys: sys, Dev: dev}
	devs, err := sc.Scan()
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 3 {
		t.Fatalf("Scan found %d devices, want 3: %v", len(devs), devs)
	}
	for _, tt := range []struct{ root, want string }{
		{"UUID=01234567-89AB-cdef-0123-456789abcdef", "vda2"},
		{"PARTUUID=0e2e0002-aaaa-bbbb-cccc-ddddeeeeffff", "vda2"},
		{"LABEL=berth-root", "vda2"},
		{"PARTLABEL=root part", "vda2"},
		{"/dev/disk/by-partlabel/root\\x20part", "vda2"},
		{"UUID=1234-abcd", "vda1"},
		{"LABEL=ESP", "vda1"},
		{"PARTUUID=11111111-2222-3333-4444-555555555555", "vda1"},
		{filepath.Join(dev, "vda"), "vda"},
	} {
		spec, err := ParseSpec(tt.root)
		if err != nil && strings.HasPrefix(tt.root, dev) {
			spec, err = Spec{Key: "PATH", Value: tt.root}, nil // temp dir is not under /dev
		}
		if err != nil {
			t.Fatalf("ParseSpec(%q): %v", tt.root, err)
		}
		d, err := sc.Wait(spec, 0, time.Millisecond)
		if err != nil {
			t.Fatalf("root=%s: %v", tt.root, err)
		}
		if d.Name != tt.want {
			t.Errorf("root=%s found %s, want %s", tt.root, d.Name, tt.want)
		}
	}
	if devs[2].FSType != "ext4" || devs[1].FSType != "vfat" {
		t.Errorf("fs types: %v", devs)
	}

	spec, _ := ParseSpec("UUID=deadbeef-0000-0000-0000-000000000000")
	start := time.Now()
	_, err = sc.Wait(spec, 300*time.Millisecond, 50*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "block devices seen") || !strings.Contains(err.Error(), `LABEL="berth-root"`) {
		t.Fatalf("Wait for a missing device: %v", err)
	}
	if time.Since(start) < 300*time.Millisecond {
		t.Fatal("Wait returned before its timeout")
	}
}

func TestParseSpec(t *testing.T) {
	for _, bad := range []string{"", "UUID=", "PARTUUID=abc/PARTNROFF=1", "sda1", "/dev/", "/dev/../etc/passwd", "0x801"} {
		if _, err := ParseSpec(bad); err == nil {
			t.Errorf("ParseSpec(%q) accepted", bad)
		}
	}
	s, err := ParseSpec("/dev/disk/by-uuid/ABCD-1234")
	if err != nil || s.Key != "UUID" || s.Value != "abcd-1234" {
		t.Fatalf("by-uuid link: %+v %v", s, err)
	}
}

func TestProbeShortInput(t *testing.T) {
	// Truncated or garbage input must not panic.
	for n := 0; n < 3000; n += 97 {
		var d Device
		Probe(make([]byte, n), &d)
		if d.FSType != "" {
			t.Fatalf("zeros probed as %s", d.FSType)
		}
	}
}

// FuzzProbe feeds hostile device contents to the superblock and partition
// table parsers: they must not panic or read out of bounds.
func FuzzProbe(f *testing.F) {
	gpt := make([]byte, 4096)
	gpt[510], gpt[511] = 0x55, 0xAA
	copy(gpt[512:], "EFI PART")
	gpt[512+72] = 2   // entries at LBA 2
	gpt[512+80] = 4   // 4 entries
	gpt[512+84] = 128 // of 128 bytes
	f.Add(gpt)
	ext := make([]byte, 2048)
	ext[1024+56], ext[1024+57] = 0x53, 0xEF
	f.Add(ext)
	f.Fuzz(func(t *testing.T, b []byte) {
		var d Device
		Probe(b, &d)
		ParsePartTable(bytes.NewReader(b), 512)
	})
}
