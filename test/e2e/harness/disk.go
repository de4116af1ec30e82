package harness

import (
	"bytes"
	"context"
	"debug/pe"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Partition is one GPT entry of a disk image.
type Partition struct {
	Index      int
	Type       string // type GUID, upper case
	UUID       string // partition GUID, upper case
	Name       string
	Start, End int64 // byte offsets; End is exclusive
}

// GPT type GUIDs the lane looks for.
const (
	TypeESP        = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
	TypeRootX86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
	TypeLinuxData  = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
)

func guidString(b []byte) string {
	return strings.ToUpper(fmt.Sprintf("%08x-%04x-%04x-%x-%x",
		binary.LittleEndian.Uint32(b[0:4]), binary.LittleEndian.Uint16(b[4:6]), binary.LittleEndian.Uint16(b[6:8]), b[8:10], b[10:16]))
}

// Partitions reads the primary GPT of a disk image (512-byte sectors). The disk was written
// by the software under test, so every field is bounds-checked.
func Partitions(disk string) ([]Partition, error) {
	f, err := os.Open(disk)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	hdr := make([]byte, 512)
	if _, err := f.ReadAt(hdr, 512); err != nil {
		return nil, fmt.Errorf("read GPT header of %s: %w", disk, err)
	}
	if string(hdr[:8]) != "EFI PART" {
		return nil, fmt.Errorf("%s has no GPT", disk)
	}
	entLBA := int64(binary.LittleEndian.Uint64(hdr[72:80]))
	n := binary.LittleEndian.Uint32(hdr[80:84])
	size := binary.LittleEndian.Uint32(hdr[84:88])
	if n > 1024 || size < 128 || size > 4096 || entLBA*512 >= st.Size() {
		return nil, fmt.Errorf("%s: implausible GPT (%d entries of %d bytes at LBA %d)", disk, n, size, entLBA)
	}
	buf := make([]byte, int(n)*int(size))
	if _, err := f.ReadAt(buf, entLBA*512); err != nil {
		return nil, fmt.Errorf("read GPT entries of %s: %w", disk, err)
	}
	var parts []Partition
	for i := 0; i < int(n); i++ {
		e := buf[i*int(size) : (i+1)*int(size)]
		if bytes.Equal(e[:16], make([]byte, 16)) {
			continue
		}
		first, last := int64(binary.LittleEndian.Uint64(e[32:40])), int64(binary.LittleEndian.Uint64(e[40:48]))
		if first > last || (last+1)*512 > st.Size() {
			return nil, fmt.Errorf("%s: partition %d out of range", disk, i+1)
		}
		var name []rune
		for j := 56; j+1 < 128; j += 2 {
			c := binary.LittleEndian.Uint16(e[j:])
			if c == 0 {
				break
			}
			name = append(name, rune(c))
		}
		parts = append(parts, Partition{Index: i + 1, Type: guidString(e[0:16]), UUID: guidString(e[16:32]),
			Name: string(name), Start: first * 512, End: (last + 1) * 512})
	}
	return parts, nil
}

// InstalledDisk is a disk written by `berth install to-disk`, with the locations the lane
// needs: the ESP, the root partition and the UKI.
type InstalledDisk struct {
	Path string
	ESP  Partition
	Root Partition
}

// OpenInstalledDisk finds the ESP and the root partition of an installed disk.
func OpenInstalledDisk(disk string) (*InstalledDisk, error) {
	parts, err := Partitions(disk)
	if err != nil {
		return nil, err
	}
	d := &InstalledDisk{Path: disk}
	var haveESP, haveRoot bool
	for _, p := range parts {
		switch p.Type {
		case TypeESP:
			d.ESP, haveESP = p, true
		case TypeRootX86_64, TypeLinuxData:
			if !haveRoot {
				d.Root, haveRoot = p, true
			}
		}
	}
	if !haveESP || !haveRoot {
		return nil, fmt.Errorf("%s: want an ESP and a Linux root partition, found %+v", disk, parts)
	}
	return d, nil
}

// mtoolsImage names the ESP for mtools (image@@offset).
func (d *InstalledDisk) mtoolsImage() string { return fmt.Sprintf("%s@@%d", d.Path, d.ESP.Start) }

// ESPList lists the files under dir on the ESP (names only).
func (d *InstalledDisk) ESPList(ctx context.Context, dir string) ([]string, error) {
	out, err := run(ctx, time.Minute, "mdir", "-i", d.mtoolsImage(), "-b", "::"+dir)
	if err != nil {
		return nil, fmt.Errorf("list ESP %s: %w: %s", dir, err, out)
	}
	var names []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		l = strings.TrimSpace(l)
		if l != "" {
			names = append(names, path.Base(strings.TrimPrefix(l, "::")))
		}
	}
	sort.Strings(names)
	return names, nil
}

// ESPCopy copies a file from the ESP to dst.
func (d *InstalledDisk) ESPCopy(ctx context.Context, src, dst string) error {
	if out, err := run(ctx, time.Minute, "mcopy", "-o", "-n", "-i", d.mtoolsImage(), "::"+src, dst); err != nil {
		return fmt.Errorf("copy %s from the ESP: %w: %s", src, err, out)
	}
	return nil
}

// UKI is a unified kernel image taken apart for direct kernel boot.
type UKI struct {
	Path    string // the .efi copied off the ESP
	Kernel  string // extracted .linux
	Initrd  string // extracted .initrd
	Cmdline string // .cmdline contents
	OSRel   string
}

// ExtractUKI copies the (single) UKI from the ESP's EFI/Linux and splits it into kernel,
// initramfs and command line under dir, so a boot can skip the firmware.
func (d *InstalledDisk) ExtractUKI(ctx context.Context, dir string) (*UKI, error) {
	names, err := d.ESPList(ctx, "/EFI/Linux")
	if err != nil {
		return nil, err
	}
	var efis []string
	for _, n := range names {
		if strings.HasSuffix(strings.ToLower(n), ".efi") {
			efis = append(efis, n)
		}
	}
	if len(efis) != 1 {
		return nil, fmt.Errorf("want one UKI in the ESP's /EFI/Linux, found %v", names)
	}
	u := &UKI{Path: filepath.Join(dir, "uki.efi"), Kernel: filepath.Join(dir, "uki-linux"), Initrd: filepath.Join(dir, "uki-initrd")}
	if err := d.ESPCopy(ctx, "/EFI/Linux/"+efis[0], u.Path); err != nil {
		return nil, err
	}
	secs, err := PESections(u.Path)
	if err != nil {
		return nil, err
	}
	for _, s := range []string{".linux", ".initrd", ".cmdline"} {
		if _, ok := secs[s]; !ok {
			return nil, fmt.Errorf("UKI %s has no %s section", efis[0], s)
		}
	}
	if err := os.WriteFile(u.Kernel, secs[".linux"], 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(u.Initrd, secs[".initrd"], 0o644); err != nil {
		return nil, err
	}
	u.Cmdline = strings.TrimRight(string(secs[".cmdline"]), "\x00\n ")
	u.OSRel = string(secs[".osrel"])
	return u, nil
}

// PESections returns the named sections of a PE file, each cut to its virtual size (the
// raw size is padded to the file alignment).
func PESections(file string) (map[string][]byte, error) {
	f, err := pe.Open(file)
	if err != nil {
		return nil, fmt.Errorf("open PE %s: %w", file, err)
	}
	defer f.Close()
	out := map[string][]byte{}
	for _, s := range f.Sections {
		if s.Size > 1<<30 {
			return nil, fmt.Errorf("%s: section %s is %d bytes", file, s.Name, s.Size)
		}
		b, err := io.ReadAll(s.Open())
		if err != nil {
			return nil, fmt.Errorf("%s: read section %s: %w", file, s.Name, err)
		}
		if s.VirtualSize > 0 && int(s.VirtualSize) < len(b) {
			b = b[:s.VirtualSize]
		}
		out[s.Name] = b
	}
	return out, nil
}

// debugfsDevice names the root partition for e2fsprogs (image?offset=N).
func (d *InstalledDisk) debugfsDevice() string {
	return fmt.Sprintf("%s?offset=%d", d.Path, d.Root.Start)
}

// Debugfs runs one read-only debugfs request against the root partition.
func (d *InstalledDisk) Debugfs(ctx context.Context, request string) (string, error) {
	out, err := run(ctx, 2*time.Minute, "debugfs", "-R", request, d.debugfsDevice())
	if err != nil {
		return out, fmt.Errorf("debugfs %q: %w: %s", request, err, out)
	}
	return out, nil
}

// Dump copies a file of the root filesystem to dst (host side, no mount).
func (d *InstalledDisk) Dump(ctx context.Context, file, dst string) error {
	out, err := d.Debugfs(ctx, fmt.Sprintf("dump %s %s", file, dst))
	if err != nil {
		return err
	}
	if _, err := os.Stat(dst); err != nil {
		return fmt.Errorf("debugfs dump %s: %s", file, out)
	}
	return nil
}

// Inode returns the inode number of a file on the root filesystem.
func (d *InstalledDisk) Inode(ctx context.Context, file string) (int64, error) {
	out, err := d.Debugfs(ctx, "stat "+file)
	if err != nil {
		return 0, err
	}
	m := regexp.MustCompile(`Inode: (\d+)`).FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("debugfs stat %s: no inode in %q", file, out)
	}
	return strconv.ParseInt(m[1], 10, 64)
}

// FileByteOffset returns the offset in the disk image of byte off of a file on the root
// filesystem (from its block map), so the host can corrupt the file's data in place
// without going through the filesystem — and without touching its fs-verity Merkle tree.
func (d *InstalledDisk) FileByteOffset(ctx context.Context, file string, off int64) (int64, error) {
	out, err := d.Debugfs(ctx, "stats")
	if err != nil {
		return 0, err
	}
	m := regexp.MustCompile(`Block size:\s+(\d+)`).FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("debugfs stats: no block size")
	}
	bs, _ := strconv.ParseInt(m[1], 10, 64)
	out, err = d.Debugfs(ctx, "blocks "+file)
	if err != nil {
		return 0, err
	}
	var blocks []int64
	for _, f := range strings.Fields(out) {
		if n, err := strconv.ParseInt(f, 10, 64); err == nil {
			blocks = append(blocks, n)
		}
	}
	idx := off / bs
	if idx >= int64(len(blocks)) {
		return 0, fmt.Errorf("%s: byte %d is beyond its %d mapped blocks (inline or sparse file?)", file, off, len(blocks))
	}
	return d.Root.Start + blocks[idx]*bs + off%bs, nil
}

// FlipByte inverts the byte at offset off of the disk image (a host-side tamper).
func FlipByte(disk string, off int64) error {
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		return fmt.Errorf("tamper %s@%d: %w", disk, off, err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		return fmt.Errorf("tamper %s@%d: %w", disk, off, err)
	}
	return f.Sync()
}
