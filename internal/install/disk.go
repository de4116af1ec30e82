package install

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	goruntime "runtime"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/internal/loopdev"
)

// Partition type GUIDs (UEFI spec; Discoverable Partitions Specification).
const espTypeGUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"

// rootTypeGUID is the "root partition" type of the Discoverable
// Partitions Specification for the architecture berth runs on.
func rootTypeGUID() string {
	switch goruntime.GOARCH {
	case "arm64":
		return "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"
	case "riscv64":
		return "72EC70A6-CF74-40E6-BD49-4BDA08E8F224"
	case "386":
		return "44479540-F297-41B2-9AF7-D131D5F0458A"
	default:
		return "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" // x86-64
	}
}

const (
	// ESPSize is the size of the EFI System Partition (FAT32).
	ESPSize = 512 << 20
	// minRootSize is the smallest root partition berth accepts.
	minRootSize = 1 << 30
	alignment   = 1 << 20
)

// partition is one partition berth created.
type partition struct {
	Number      int
	Start, Size int64 // bytes
	UUID        string
	Label       string
	Dev         string // device node while attached
	loop        *loopdev.Device
}

// diskLayout is the partitioned disk.
type diskLayout struct {
	DiskGUID  string
	ESP, Root partition
}

// newUUID returns a random (version 4) UUID in lowercase.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand never fails on Linux ≥ 3.17
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// run runs a tool and returns its output; a failure carries the output.
func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C", "MTOOLS_SKIP_CHECK=1", "MTOOLSRC=/dev/null")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		if errorsIsNotFound(err) {
			return nil, fmt.Errorf("%s is not installed (%s): %w", name, packageOf(name), err)
		}
		return out.Bytes(), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.Bytes(), nil
}

func errorsIsNotFound(err error) bool {
	e, ok := err.(*exec.Error)
	return ok && e.Err == exec.ErrNotFound
}

// packageOf names the Debian package that provides a tool.
func packageOf(tool string) string {
	switch tool {
	case "sgdisk":
		return "Debian package gdisk"
	case "mkfs.vfat", "fsck.fat":
		return "Debian package dosfstools"
	case "mcopy", "mmd":
		return "Debian package mtools"
	case "mkfs.ext4":
		return "Debian package e2fsprogs"
	case "mkfs.btrfs":
		return "Debian package btrfs-progs"
	}
	return "see the README's dependency list"
}

// partitionDisk writes a new GPT to the target: an ESP of ESPSize at 1 MiB
// and a root partition over the rest of the disk.
func partitionDisk(ctx context.Context, t *target) (*diskLayout, error) {
	if t.Size < alignment+ESPSize+minRootSize+alignment {
		return nil, fmt.Errorf("target %s is %d MiB; berth needs at least %d MiB", t.Path, t.Size>>20, (alignment+ESPSize+minRootSize+alignment)>>20)
	}
	d := &diskLayout{DiskGUID: newUUID()}
	d.ESP = partition{Number: 1, UUID: newUUID(), Label: "ESP"}
	d.Root = partition{Number: 2, UUID: newUUID(), Label: "berth-root"}
	if _, err := run(ctx, "sgdisk", "--zap-all", t.Path); err != nil {
		return nil, fmt.Errorf("partition %s: %w", t.Path, err)
	}
	args := []string{
		"--clear", "--set-alignment=2048", "--disk-guid=" + d.DiskGUID,
		fmt.Sprintf("--new=1:%dK:+%dK", alignment>>10, ESPSize>>10), "--typecode=1:" + espTypeGUID,
		"--change-name=1:" + d.ESP.Label, "--partition-guid=1:" + d.ESP.UUID,
		"--new=2:0:0", "--typecode=2:" + rootTypeGUID(),
		"--change-name=2:" + d.Root.Label, "--partition-guid=2:" + d.Root.UUID,
		t.Path,
	}
	if _, err := run(ctx, "sgdisk", args...); err != nil {
		return nil, fmt.Errorf("partition %s: %w", t.Path, err)
	}
	sector, err := sectorSize(ctx, t.Path)
	if err != nil {
		return nil, err
	}
	for _, p := range []*partition{&d.ESP, &d.Root} {
		first, last, guid, err := partitionInfo(ctx, t.Path, p.Number)
		if err != nil {
			return nil, err
		}
		if !strings.EqualFold(guid, p.UUID) {
			return nil, fmt.Errorf("partition %d of %s has GUID %s, expected %s", p.Number, t.Path, guid, p.UUID)
		}
		p.Start, p.Size = first*sector, (last-first+1)*sector
	}
	if d.ESP.Size != ESPSize || d.Root.Size < minRootSize {
		return nil, fmt.Errorf("partition %s: unexpected layout (ESP %d bytes, root %d bytes)", t.Path, d.ESP.Size, d.Root.Size)
	}
	return d, nil
}

// sectorSize reads the logical sector size sgdisk used.
func sectorSize(ctx context.Context, path string) (int64, error) {
	out, err := run(ctx, "sgdisk", "--print", path)
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Sector size (logical): "); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.Fields(v)[0], "/"), 10, 64)
			if err == nil && (n == 512 || n == 4096) {
				return n, nil
			}
		}
		if v, ok := strings.CutPrefix(sc.Text(), "Sector size (logical/physical): "); ok {
			n, err := strconv.ParseInt(strings.Split(v, "/")[0], 10, 64)
			if err == nil && (n == 512 || n == 4096) {
				return n, nil
			}
		}
	}
	return 0, fmt.Errorf("sgdisk --print %s: no sector size in its output", path)
}

// partitionInfo reads first/last sector and GUID of partition n.
func partitionInfo(ctx context.Context, path string, n int) (first, last int64, guid string, err error) {
	out, err := run(ctx, "sgdisk", fmt.Sprintf("--info=%d", n), path)
	if err != nil {
		return 0, 0, "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, "First sector: "); ok {
			first, _ = strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
		if v, ok := strings.CutPrefix(line, "Last sector: "); ok {
			last, _ = strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		}
		if v, ok := strings.CutPrefix(line, "Partition unique GUID: "); ok {
			guid = strings.TrimSpace(v)
		}
	}
	if first <= 0 || last < first || guid == "" {
		return 0, 0, "", fmt.Errorf("sgdisk --info=%d %s: cannot read the partition's extent", n, path)
	}
	return first, last, guid, nil
}

// attach makes a partition available as a block device: a loop device
// over its byte range of the target. That works the same for disk image
// files and block devices, needs neither udev nor the kernel's partition
// table parser, and the device goes away by itself (autoclear) if berth dies.
func (p *partition) attach(t *target) error {
	dev, err := loopdev.Attach(t.Path, loopdev.Options{Offset: p.Start, SizeLimit: p.Size})
	if err != nil {
		return fmt.Errorf("partition %d: %w", p.Number, err)
	}
	p.loop, p.Dev = dev, dev.Path
	return nil
}

func (p *partition) detach() error {
	if p.loop == nil {
		return nil
	}
	err := p.loop.Detach()
	p.loop, p.Dev = nil, ""
	return err
}

// formatESP makes the FAT32 filesystem of the ESP.
func formatESP(ctx context.Context, dev string) error {
	volID := newUUID()[:8]
	if _, err := run(ctx, "mkfs.vfat", "-F", "32", "-n", "ESP", "-i", volID, dev); err != nil {
		return fmt.Errorf("format ESP: %w", err)
	}
	return nil
}

// formatRoot makes the root filesystem: ext4 with fs-verity (4 KiB blocks,
// which fs-verity needs on 4 KiB-page machines) or btrfs.
func formatRoot(ctx context.Context, dev, fstype, label string) (uuid string, err error) {
	uuid = newUUID()
	switch fstype {
	case "ext4":
		_, err = run(ctx, "mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "verity", "-L", label, "-U", uuid, dev)
	case "btrfs":
		_, err = run(ctx, "mkfs.btrfs", "-q", "-f", "-L", label, "-U", uuid, dev)
	default:
		return "", fmt.Errorf("unsupported root filesystem %q (ext4 or btrfs)", fstype)
	}
	if err != nil {
		return "", fmt.Errorf("format root: %w", err)
	}
	return uuid, nil
}

// copyToFAT copies the contents of dir into the root of the FAT
// filesystem on dev with mtools. berth prepares the ESP in a directory
// and writes it in one go, so no vfat driver is needed on the installing
// machine (and a half-written ESP is never mounted).
func copyToFAT(ctx context.Context, dev, dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("write ESP: %w", err)
	}
	if len(ents) == 0 {
		return nil
	}
	args := []string{"-i", dev, "-s", "-p", "-m", "-Q", "-o"}
	for _, e := range ents {
		args = append(args, filepath.Join(dir, e.Name()))
	}
	args = append(args, "::/")
	if _, err := run(ctx, "mcopy", args...); err != nil {
		return fmt.Errorf("write ESP: %w", err)
	}
	return nil
}
