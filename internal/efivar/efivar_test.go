package efivar

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berth-dev/berth/internal/testenv"
	"github.com/foxboron/go-uefi/efi/device"
	"golang.org/x/sys/unix"
)

// The tests use a plain directory as a stand-in for efivarfs (this host has
// no EFI firmware); the VM lane exercises the real one.

func writeRaw(t *testing.T, dir, name string, attrs uint32, data []byte) {
	t.Helper()
	b := append([]byte{byte(attrs), byte(attrs >> 8), byte(attrs >> 16), byte(attrs >> 24)}, data...)
	if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoaderVariables(t *testing.T) {
	dir := t.TempDir()
	s := Store{Dir: dir}
	writeRaw(t, dir, "LoaderEntrySelected-"+LoaderGUID, 6, EncodeUTF16("berth-7-3fa2c41b09de.efi"))
	writeRaw(t, dir, "LoaderBootCountPath-"+LoaderGUID, 6, EncodeUTF16(`\EFI\Linux\berth-7-3fa2c41b09de+2-1.efi`))
	var list []byte
	for _, e := range []string{"berth-7-3fa2c41b09de.efi", "berth-6-0011aabbccdd.efi", "auto-reboot-to-firmware-setup"} {
		list = append(list, EncodeUTF16(e)...)
	}
	writeRaw(t, dir, "LoaderEntries-"+LoaderGUID, 6, list)

	if v, err := s.LoaderEntrySelected(); err != nil || v != "berth-7-3fa2c41b09de.efi" {
		t.Errorf("LoaderEntrySelected = %q, %v", v, err)
	}
	if v, err := s.LoaderBootCountPath(); err != nil || v != `\EFI\Linux\berth-7-3fa2c41b09de+2-1.efi` {
		t.Errorf("LoaderBootCountPath = %q, %v", v, err)
	}
	if v, err := s.LoaderEntries(); err != nil || len(v) != 3 || v[1] != "berth-6-0011aabbccdd.efi" {
		t.Errorf("LoaderEntries = %q, %v", v, err)
	}
	if _, err := s.LoaderEntryDefault(); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing variable: %v", err)
	}

	if err := s.SetLoaderEntryDefault("berth-6-0011aabbccdd.efi"); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "LoaderEntryDefault-"+LoaderGUID))
	want := append([]byte{7, 0, 0, 0}, 'b', 0, 'e', 0, 'r', 0)
	if !bytes.HasPrefix(raw, want) || !bytes.HasSuffix(raw, []byte{'i', 0, 0, 0}) || len(raw) != 4+2*len("berth-6-0011aabbccdd.efi")+2 {
		t.Errorf("LoaderEntryDefault bytes % x", raw)
	}
	// A shorter value replaces the longer one completely.
	if err := s.SetLoaderEntryDefault("x"); err != nil {
		t.Fatal(err)
	}
	if raw, _ := os.ReadFile(filepath.Join(dir, "LoaderEntryDefault-"+LoaderGUID)); !bytes.Equal(raw, []byte{7, 0, 0, 0, 'x', 0, 0, 0}) {
		t.Errorf("after rewrite: % x", raw)
	}
	if err := s.SetLoaderEntryOneShot("berth-7-3fa2c41b09de.efi"); err != nil {
		t.Fatal(err)
	}
	if v, _ := s.loaderString("LoaderEntryOneShot"); v != "berth-7-3fa2c41b09de.efi" {
		t.Errorf("one-shot %q", v)
	}
	if err := s.SetLoaderEntryOneShot(""); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "LoaderEntryOneShot-"+LoaderGUID)); !os.IsNotExist(err) {
		t.Error("one-shot not deleted")
	}
	if _, _, err := s.Read("../../etc/passwd", LoaderGUID); err == nil {
		t.Error("path traversal in a variable name accepted")
	}
}

// TestImmutableFlag checks that writers clear FS_IMMUTABLE_FL as efivarfs
// requires, on a real filesystem with inode flags (ext4 here).
func TestImmutableFlag(t *testing.T) {
	testenv.RequireRoot(t, "setting the immutable flag needs CAP_LINUX_IMMUTABLE")
	dir := t.TempDir()
	s := Store{Dir: dir}
	if err := s.SetLoaderEntryDefault("a"); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "LoaderEntryDefault-"+LoaderGUID)
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	flags, err := unix.IoctlGetInt(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err != nil {
		f.Close()
		testenv.SkipOrFail(t, "filesystem of %s has no inode flags: %v", dir, err)
	}
	if err := unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, flags|fsImmutableFl); err != nil {
		f.Close()
		testenv.SkipOrFail(t, "cannot set the immutable flag here: %v", err)
	}
	f.Close()
	t.Cleanup(func() { clearImmutable(p) })
	if err := os.WriteFile(p, []byte("x"), 0o644); err == nil {
		t.Fatal("immutable flag did not stick; test would prove nothing")
	}
	if err := s.SetLoaderEntryDefault("bb"); err != nil {
		t.Fatalf("write over an immutable variable: %v", err)
	}
	if v, _ := s.LoaderEntryDefault(); v != "bb" {
		t.Errorf("value %q", v)
	}
	// Set it again and delete.
	f, _ = os.Open(p)
	unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, flags|fsImmutableFl)
	f.Close()
	if err := s.SetLoaderEntryDefault(""); err != nil {
		t.Fatalf("delete an immutable variable: %v", err)
	}
	if _, err := os.Stat(p); !os.IsNotExist(err) {
		t.Error("not deleted")
	}
}

func TestBootEntries(t *testing.T) {
	dir := t.TempDir()
	s := Store{Dir: dir}
	// A firmware entry that exists already.
	other := LoadOption{Attributes: LoadOptionActive, Description: "UEFI Shell", FilePath: []byte{0x7f, 0xff, 4, 0}}
	ob, _ := other.Marshal()
	writeRaw(t, dir, "Boot0000-"+GlobalGUID, DefaultAttrs, ob)
	writeRaw(t, dir, "BootOrder-"+GlobalGUID, DefaultAttrs, []byte{0, 0})

	hd := HardDrive{PartitionNumber: 1, Start: 2048, Size: 1048576, PartitionGUID: "0fc63daf-8483-4772-8e79-3d69d8477de4"}
	n, err := s.EnsureBootEntry("berth", hd, "/EFI/systemd/systemd-bootx64.efi", true)
	if err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Errorf("new entry got number %d, want the first free one (1)", n)
	}
	order, _ := s.BootOrder()
	if len(order) != 2 || order[0] != 1 || order[1] != 0 {
		t.Errorf("BootOrder %v", order)
	}
	// Idempotent: the same entry is found again, nothing duplicated.
	if n2, err := s.EnsureBootEntry("berth", hd, `\EFI\systemd\systemd-bootx64.efi`, true); err != nil || n2 != 1 {
		t.Errorf("second EnsureBootEntry: %d %v", n2, err)
	}
	if es, _ := s.BootEntries(); len(es) != 2 {
		t.Errorf("%d entries", len(es))
	}

	// go-uefi parses what we wrote (an independent EFI_LOAD_OPTION decoder).
	_, raw, err := s.Read("Boot0001", GlobalGUID)
	if err != nil {
		t.Fatal(err)
	}
	var lo device.EFILoadOption
	if err := lo.Unmarshal(bytes.NewBuffer(raw)); err != nil {
		t.Fatal(err)
	}
	if lo.Description != "berth" || len(lo.FilePath) != 2 {
		t.Fatalf("go-uefi parsed %+v", lo)
	}
	// go-uefi formats the GUID without EFI's mixed-endian swap, so only the
	// other fields are compared here; TestGUIDBytesMatchGPT checks the GUID.
	if got := lo.FilePath[0].Format(); !strings.HasPrefix(got, "HD(1,GPT,") || !strings.HasSuffix(got, ",0x800,0x100000)") {
		t.Errorf("HD node: %s", got)
	}
	hdNode := raw[6+len(EncodeUTF16("berth")):]
	if g, _ := guidBytes(hd.PartitionGUID); !bytes.Equal(hdNode[24:40], g) {
		t.Errorf("HD node signature % x", hdNode[24:40])
	}
	if got := lo.FilePath[1].Format(); got != `File(\EFI\systemd\systemd-bootx64.efi)` {
		t.Errorf("file node: %s", got)
	}
	mine, err := ParseLoadOption(raw)
	if err != nil || FilePathOf(mine.FilePath) != `\EFI\systemd\systemd-bootx64.efi` || len(mine.OptionalData) != 0 {
		t.Errorf("ParseLoadOption: %+v %v", mine, err)
	}

	if err := s.SetBootNext(1); err != nil {
		t.Fatal(err)
	}
	if v, ok, err := s.BootNext(); err != nil || !ok || v != 1 {
		t.Errorf("BootNext %d %v %v", v, ok, err)
	}
	if raw, _ := os.ReadFile(filepath.Join(dir, "BootNext-"+GlobalGUID)); !bytes.Equal(raw, []byte{7, 0, 0, 0, 1, 0}) {
		t.Errorf("BootNext bytes % x", raw)
	}
	if err := s.DeleteBootEntry(1); err != nil {
		t.Fatal(err)
	}
	if order, _ := s.BootOrder(); len(order) != 1 || order[0] != 0 {
		t.Errorf("BootOrder after delete %v", order)
	}
}

// TestGUIDBytesMatchGPT compares the GUID encoding with the bytes sgdisk
// writes for a partition's unique GUID in a GPT (the same EFI_GUID layout
// the HD() device path node uses).
func TestGUIDBytesMatchGPT(t *testing.T) {
	testenv.RequireTool(t, "sgdisk", "gdisk")
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, make([]byte, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	const guid = "0fc63daf-8483-4772-8e79-3d69d8477de4"
	if out, err := exec.Command("sgdisk", "-n", "1:2048:4095", "-u", "1:"+guid, img).CombinedOutput(); err != nil {
		t.Fatalf("sgdisk: %v\n%s", err, out)
	}
	f, _ := os.ReadFile(img)
	// LBA 2 holds the partition entries; the unique GUID is at offset 16.
	onDisk := f[2*512+16 : 2*512+32]
	mine, err := guidBytes(guid)
	if err != nil || !bytes.Equal(mine, onDisk) {
		t.Errorf("guidBytes % x, GPT has % x", mine, onDisk)
	}
}

func TestParseLoadOptionHostile(t *testing.T) {
	for _, b := range [][]byte{nil, {1, 0, 0, 0, 0xff, 0xff, 'a', 0, 0, 0}, {1, 0, 0, 0, 0, 0, 'a', 0}} {
		if _, err := ParseLoadOption(b); err == nil {
			t.Errorf("accepted % x", b)
		}
	}
	if FilePathOf([]byte{4, 4, 0xff, 0xff}) != "" || FilePathOf([]byte{4, 4, 1, 0}) != "" {
		t.Error("bad device path lengths not refused")
	}
}
