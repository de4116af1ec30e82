// Package blkdev finds block devices by the names root= uses (UUID=,
// PARTUUID=, LABEL=, PARTLABEL=, /dev/…) without udev: it lists
// /sys/class/block and reads filesystem superblocks and partition tables
// itself, because berth's initramfs has no udev and no /dev/disk links.
package blkdev

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
	"unicode/utf16"
)

// Device is one block device as seen in sysfs, with what was probed on it.
type Device struct {
	Name      string // kernel name, "vda2"
	Dev       string // device node, "/dev/vda2"
	Partition int    // partition number, 0 for whole disks
	Parent    string // kernel name of the whole disk for partitions
	FSType    string // "ext4", "btrfs", "xfs", "vfat", "erofs", "" when unknown
	UUID      string // filesystem UUID, lowercase
	Label     string
	PartUUID  string // lowercase
	PartLabel string
}

func (d Device) String() string {
	var b strings.Builder
	b.WriteString(d.Dev)
	for _, kv := range [][2]string{{"TYPE", d.FSType}, {"UUID", d.UUID}, {"LABEL", d.Label}, {"PARTUUID", d.PartUUID}, {"PARTLABEL", d.PartLabel}} {
		if kv[1] != "" {
			fmt.Fprintf(&b, " %s=%q", kv[0], kv[1])
		}
	}
	return b.String()
}

// Spec is a parsed root= value.
type Spec struct {
	Key   string // "UUID", "PARTUUID", "LABEL", "PARTLABEL" or "PATH"
	Value string
}

// ParseSpec parses root= values: UUID=, PARTUUID=, LABEL=, PARTLABEL=,
// /dev/<name> and the udev links /dev/disk/by-{uuid,partuuid,label,partlabel}/X.
func ParseSpec(s string) (Spec, error) {
	if s == "" {
		return Spec{}, errors.New("no root= on the kernel command line")
	}
	for _, k := range []string{"UUID", "PARTUUID", "LABEL", "PARTLABEL"} {
		if v, ok := strings.CutPrefix(s, k+"="); ok {
			if v == "" {
				return Spec{}, fmt.Errorf("root=%s: empty %s", s, k)
			}
			if k == "PARTUUID" && strings.Contains(v, "/") {
				return Spec{}, fmt.Errorf("root=%s: PARTUUID=…/PARTNROFF= is not supported by berth-init", s)
			}
			if k == "UUID" || k == "PARTUUID" {
				v = strings.ToLower(v)
			}
			return Spec{Key: k, Value: v}, nil
		}
	}
	for dir, k := range map[string]string{"/dev/disk/by-uuid/": "UUID", "/dev/disk/by-partuuid/": "PARTUUID", "/dev/disk/by-label/": "LABEL", "/dev/disk/by-partlabel/": "PARTLABEL"} {
		if v, ok := strings.CutPrefix(s, dir); ok && v != "" && !strings.Contains(v, "/") {
			if k == "UUID" || k == "PARTUUID" {
				v = strings.ToLower(v)
			}
			return ParseSpec(k + "=" + unescapeUdev(v))
		}
	}
	if strings.HasPrefix(s, "/dev/") && !strings.Contains(s[5:], "..") && len(s) > 5 {
		return Spec{Key: "PATH", Value: s}, nil
	}
	return Spec{}, fmt.Errorf("root=%s: expected UUID=, PARTUUID=, LABEL=, PARTLABEL= or /dev/…", s)
}

// unescapeUdev undoes udev's \x2f escaping in by-label links.
func unescapeUdev(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && s[i+1] == 'x' {
			var c byte
			if _, err := fmt.Sscanf(s[i+2:i+4], "%02x", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (s Spec) String() string {
	if s.Key == "PATH" {
		return s.Value
	}
	return s.Key + "=" + s.Value
}

// Match reports whether d is the device s names.
func (s Spec) Match(d Device) bool {
	switch s.Key {
	case "UUID":
		return d.UUID != "" && d.UUID == s.Value
	case "PARTUUID":
		return d.PartUUID != "" && d.PartUUID == s.Value
	case "LABEL":
		return d.Label != "" && d.Label == s.Value
	case "PARTLABEL":
		return d.PartLabel != "" && d.PartLabel == s.Value
	case "PATH":
		return d.Dev == s.Value
	}
	return false
}

// Scanner lists block devices. The zero value uses /sys and /dev.
type Scanner struct {
	Sys string // default "/sys"
	Dev string // default "/dev"
}

// Scan lists and probes every block device in sysfs. Devices that cannot
// be read are still listed (without filesystem details).
func (sc Scanner) Scan() ([]Device, error) {
	sys, dev := sc.Sys, sc.Dev
	if sys == "" {
		sys = "/sys"
	}
	if dev == "" {
		dev = "/dev"
	}
	ents, err := os.ReadDir(filepath.Join(sys, "class", "block"))
	if err != nil {
		return nil, fmt.Errorf("list block devices: %w", err)
	}
	var out []Device
	disks := map[string]map[int]Partition{}
	for _, e := range ents {
		ue := readUevent(filepath.Join(sys, "class", "block", e.Name(), "uevent"))
		name := ue["DEVNAME"]
		if name == "" {
			name = e.Name()
		}
		d := Device{Name: e.Name(), Dev: filepath.Join(dev, name), PartLabel: ue["PARTNAME"], PartUUID: strings.ToLower(ue["PARTUUID"])}
		if ue["DEVTYPE"] == "partition" {
			fmt.Sscanf(ue["PARTN"], "%d", &d.Partition)
			// sysfs: /sys/class/block/vda2 -> ../../devices/.../vda/vda2
			if p, err := filepath.EvalSymlinks(filepath.Join(sys, "class", "block", e.Name())); err == nil {
				d.Parent = filepath.Base(filepath.Dir(p))
			}
		}
		if d.Partition > 0 && d.Parent != "" && (d.PartUUID == "" || d.PartLabel == "") {
			// Kernels before 6.x do not put PARTUUID in the uevent: read
			// the parent's partition table ourselves.
			pt, ok := disks[d.Parent]
			if !ok {
				pt = readPartTable(filepath.Join(dev, d.Parent), sys, d.Parent)
				disks[d.Parent] = pt
			}
			if e, ok := pt[d.Partition]; ok {
				if d.PartUUID == "" {
					d.PartUUID = e.UUID
				}
				if d.PartLabel == "" {
					d.PartLabel = e.Label
				}
			}
		}
		probeFS(&d)
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// ErrNotFound is wrapped when Wait times out.
var ErrNotFound = errors.New("root device not found")

// Wait rescans until a device matches spec or timeout passes. The error
// lists every block device that was seen, so the console shows what the
// kernel did find (wrong UUID, missing driver, …).
func (sc Scanner) Wait(spec Spec, timeout time.Duration, interval time.Duration) (Device, error) {
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	deadline := time.Now().Add(timeout)
	var seen []Device
	for {
		devs, err := sc.Scan()
		if err == nil {
			seen = devs
			for _, d := range devs {
				if spec.Match(d) {
					return d, nil
				}
			}
		}
		if time.Now().After(deadline) {
			var b strings.Builder
			fmt.Fprintf(&b, "%v: no block device matches root=%s after %s", ErrNotFound, spec, timeout)
			if err != nil {
				fmt.Fprintf(&b, " (%v)", err)
			}
			if len(seen) == 0 {
				b.WriteString("; the kernel found no block devices at all (storage driver missing from the initramfs?)")
			} else {
				b.WriteString("; block devices seen:")
				for _, d := range seen {
					b.WriteString("\n  " + d.String())
				}
			}
			return Device{}, errors.New(b.String())
		}
		time.Sleep(interval)
	}
}

func readUevent(p string) map[string]string {
	m := map[string]string{}
	b, err := os.ReadFile(p)
	if err != nil {
		return m
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			m[k] = v
		}
	}
	return m
}

// probeFS reads the first 68 KiB of the device and recognises the
// filesystems root= may name.
func probeFS(d *Device) {
	f, err := os.Open(d.Dev)
	if err != nil {
		return
	}
	defer f.Close()
	buf := make([]byte, 0x10000+0x1000)
	n, _ := io.ReadFull(f, buf)
	Probe(buf[:n], d)
}

// Probe recognises a filesystem from the start of a device (at least 68 KiB
// for btrfs) and fills FSType, UUID and Label.
func Probe(b []byte, d *Device) {
	le16 := func(o int) uint16 { return binary.LittleEndian.Uint16(b[o:]) }
	le32 := func(o int) uint32 { return binary.LittleEndian.Uint32(b[o:]) }
	switch {
	case len(b) >= 0x10000+0x200 && string(b[0x10040:0x10048]) == "_BHRfS_M":
		d.FSType = "btrfs"
		d.UUID = uuidString(b[0x10020:0x10030])
		d.Label = cstr(b[0x1012b : 0x1012b+256])
	case len(b) >= 2048 && le16(1024+56) == 0xEF53:
		d.FSType = "ext4" // ext2/3 mount through the ext4 driver
		d.UUID = uuidString(b[1024+104 : 1024+120])
		d.Label = cstr(b[1024+120 : 1024+136])
	case len(b) >= 2048 && le32(1024) == 0xE0F5E1E2:
		d.FSType = "erofs"
		d.UUID = uuidString(b[1024+48 : 1024+64])
		d.Label = cstr(b[1024+64 : 1024+80])
	case len(b) >= 512 && string(b[0:4]) == "XFSB":
		d.FSType = "xfs"
		d.UUID = uuidString(b[32:48])
		d.Label = cstr(b[108:120])
	case len(b) >= 512 && b[510] == 0x55 && b[511] == 0xAA && (string(b[0x52:0x5a]) == "FAT32   " || string(b[0x36:0x3b]) == "FAT16" || string(b[0x36:0x3b]) == "FAT12"):
		d.FSType = "vfat"
		idOff, labelOff := 0x27, 0x2b
		if string(b[0x52:0x5a]) == "FAT32   " {
			idOff, labelOff = 0x43, 0x47
		}
		d.UUID = fmt.Sprintf("%04x-%04x", le16(idOff+2), le16(idOff))
		if l := strings.TrimRight(string(b[labelOff:labelOff+11]), " \x00"); l != "NO NAME" {
			d.Label = l
		}
	}
	if d.UUID == "00000000-0000-0000-0000-000000000000" {
		d.UUID = ""
	}
}

func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func uuidString(u []byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// guidString formats a GPT GUID (first three fields little-endian).
func guidString(g []byte) string {
	return fmt.Sprintf("%08x-%04x-%04x-%x-%x", binary.LittleEndian.Uint32(g[0:4]), binary.LittleEndian.Uint16(g[4:6]),
		binary.LittleEndian.Uint16(g[6:8]), g[8:10], g[10:16])
}

// Partition is one entry of a partition table.
type Partition struct {
	UUID  string // GPT unique partition GUID, or "<MBR signature>-<NN>", lowercase
	Label string // GPT partition name
}

// readPartTable reads a GPT (or, failing that, an MBR) partition table.
func readPartTable(devPath, sys, disk string) map[int]Partition {
	f, err := os.Open(devPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	sector := 512
	if b, err := os.ReadFile(filepath.Join(sys, "class", "block", disk, "queue", "logical_block_size")); err == nil {
		fmt.Sscanf(strings.TrimSpace(string(b)), "%d", &sector)
	}
	if sector < 512 || sector > 65536 {
		sector = 512
	}
	return ParsePartTable(f, sector)
}

// ParsePartTable parses a GPT (protective MBR + header at LBA 1) or an MBR
// and returns its partitions by number (nil when there is no table).
// Hostile tables are bounded: at most 256 GPT entries of at most 4 KiB.
func ParsePartTable(r io.ReaderAt, sector int) map[int]Partition {
	mbr := make([]byte, 512)
	if _, err := r.ReadAt(mbr, 0); err != nil || mbr[510] != 0x55 || mbr[511] != 0xAA {
		return nil
	}
	pt := map[int]Partition{}
	hdr := make([]byte, 92)
	if _, err := r.ReadAt(hdr, int64(sector)); err == nil && string(hdr[0:8]) == "EFI PART" {
		lba := binary.LittleEndian.Uint64(hdr[72:])
		count := binary.LittleEndian.Uint32(hdr[80:])
		size := binary.LittleEndian.Uint32(hdr[84:])
		if count > 256 {
			count = 256
		}
		if size < 128 || size > 4096 || lba > 1<<40 {
			return pt
		}
		ent := make([]byte, size)
		for i := uint32(0); i < count; i++ {
			if _, err := r.ReadAt(ent, int64(lba)*int64(sector)+int64(i)*int64(size)); err != nil {
				break
			}
			if bytes.Equal(ent[0:16], make([]byte, 16)) {
				continue // unused entry
			}
			pt[int(i)+1] = Partition{UUID: guidString(ent[16:32]), Label: utf16Name(ent[56:128])}
		}
		return pt
	}
	sig := binary.LittleEndian.Uint32(mbr[440:])
	for i := 0; i < 4; i++ {
		if mbr[446+16*i+4] != 0 {
			pt[i+1] = Partition{UUID: fmt.Sprintf("%08x-%02x", sig, i+1)}
		}
	}
	return pt
}

func utf16Name(b []byte) string {
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}
