// Package efivar reads and writes UEFI variables through efivarfs
// (/sys/firmware/efi/efivars): systemd-boot's Loader* variables and the
// firmware's Boot####, BootOrder and BootNext.
//
// An efivarfs file "Name-GUID" holds a 4-byte little-endian attribute word
// followed by the variable's data, and must be written with one write().
// The kernel marks most variable files immutable (FS_IMMUTABLE_FL) to stop
// accidental deletion, so writers clear that flag first.
//
// Store.Dir is a parameter so that tests run against a plain directory.
package efivar

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"unicode/utf16"

	"golang.org/x/sys/unix"
)

// DefaultDir is where efivarfs is mounted.
const DefaultDir = "/sys/firmware/efi/efivars"

// Vendor GUIDs.
const (
	LoaderGUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f" // systemd-boot
	GlobalGUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c" // EFI_GLOBAL_VARIABLE
)

// Variable attributes.
const (
	NonVolatile       uint32 = 0x1
	BootServiceAccess uint32 = 0x2
	RuntimeAccess     uint32 = 0x4
	// DefaultAttrs is what boot loader and boot manager variables use.
	DefaultAttrs = NonVolatile | BootServiceAccess | RuntimeAccess
)

const (
	fsImmutableFl = 0x00000010
	efivarfsMagic = 0xde5e81e4
	maxVarSize    = 1 << 20
)

// ErrNotFound is wrapped when a variable does not exist.
var ErrNotFound = errors.New("EFI variable not found")

// Store is a directory of EFI variables (efivarfs, or a fake for tests).
type Store struct {
	Dir string
}

var guidRe = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
var nameRe = regexp.MustCompile(`^[A-Za-z0-9_]{1,64}$`)

func (s Store) file(name, guid string) (string, error) {
	if !nameRe.MatchString(name) || !guidRe.MatchString(guid) {
		return "", fmt.Errorf("invalid EFI variable name %q-%q", name, guid)
	}
	dir := s.Dir
	if dir == "" {
		dir = DefaultDir
	}
	return filepath.Join(dir, name+"-"+guid), nil
}

// Read returns a variable's attributes and data.
func (s Store) Read(name, guid string) (uint32, []byte, error) {
	p, err := s.file(name, guid)
	if err != nil {
		return 0, nil, err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil, fmt.Errorf("read %s-%s: %w", name, guid, ErrNotFound)
	}
	if err != nil {
		return 0, nil, fmt.Errorf("read EFI variable %s: %w", name, err)
	}
	if len(b) < 4 {
		return 0, nil, fmt.Errorf("EFI variable %s: %d bytes, no attribute word", name, len(b))
	}
	if len(b) > maxVarSize {
		return 0, nil, fmt.Errorf("EFI variable %s: %d bytes, too large", name, len(b))
	}
	return binary.LittleEndian.Uint32(b), b[4:], nil
}

// Write creates or replaces a variable with one write() of the attribute
// word and data, clearing the immutable flag of an existing file first.
func (s Store) Write(name, guid string, attrs uint32, data []byte) error {
	p, err := s.file(name, guid)
	if err != nil {
		return err
	}
	if err := clearImmutable(p); err != nil {
		return fmt.Errorf("write EFI variable %s: %w", name, err)
	}
	buf := make([]byte, 4+len(data))
	binary.LittleEndian.PutUint32(buf, attrs)
	copy(buf[4:], data)
	flags := os.O_WRONLY | os.O_CREATE
	// efivarfs replaces the variable on write and rejects truncation; a
	// plain directory needs O_TRUNC to behave the same.
	if !isEfivarfs(filepath.Dir(p)) {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(p, flags, 0o644)
	if err != nil {
		return fmt.Errorf("write EFI variable %s: %w", name, err)
	}
	n, err := f.Write(buf)
	cerr := f.Close()
	if err == nil && n != len(buf) {
		err = fmt.Errorf("short write (%d of %d bytes)", n, len(buf))
	}
	if err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write EFI variable %s: %w", name, err)
	}
	return nil
}

// Delete removes a variable; a missing one is not an error.
func (s Store) Delete(name, guid string) error {
	p, err := s.file(name, guid)
	if err != nil {
		return err
	}
	if err := clearImmutable(p); err != nil {
		return fmt.Errorf("delete EFI variable %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete EFI variable %s: %w", name, err)
	}
	return nil
}

func isEfivarfs(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && uint32(st.Type) == efivarfsMagic
}

// clearImmutable clears FS_IMMUTABLE_FL on an existing file. Filesystems
// without inode flags (ENOTTY, EOPNOTSUPP) have nothing to clear.
func clearImmutable(p string) error {
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	fd := int(f.Fd())
	flags, err := unix.IoctlGetInt(fd, unix.FS_IOC_GETFLAGS)
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("get inode flags of %s: %w", p, err)
	}
	if flags&fsImmutableFl == 0 {
		return nil
	}
	if err := unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, flags&^fsImmutableFl); err != nil {
		return fmt.Errorf("clear immutable flag of %s: %w", p, err)
	}
	return nil
}

// EncodeUTF16 encodes s as NUL-terminated UTF-16LE, the string format of
// systemd-boot's variables.
func EncodeUTF16(s string) []byte {
	u := utf16.Encode([]rune(s))
	b := make([]byte, 2*len(u)+2)
	for i, c := range u {
		binary.LittleEndian.PutUint16(b[2*i:], c)
	}
	return b
}

// DecodeUTF16 decodes UTF-16LE up to the first NUL (or the end).
func DecodeUTF16(b []byte) string {
	var u []uint16
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}

// decodeUTF16List splits NUL-separated UTF-16LE strings (LoaderEntries).
func decodeUTF16List(b []byte) []string {
	var out []string
	var u []uint16
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			if len(u) > 0 {
				out = append(out, string(utf16.Decode(u)))
			}
			u = u[:0]
			continue
		}
		u = append(u, c)
	}
	if len(u) > 0 {
		out = append(out, string(utf16.Decode(u)))
	}
	return out
}

func (s Store) loaderString(name string) (string, error) {
	_, b, err := s.Read(name, LoaderGUID)
	if err != nil {
		return "", err
	}
	return DecodeUTF16(b), nil
}

// LoaderEntrySelected is the id of the entry systemd-boot booted.
func (s Store) LoaderEntrySelected() (string, error) { return s.loaderString("LoaderEntrySelected") }

// LoaderBootCountPath is the ESP path of the booted entry with its boot
// counter (set by systemd-boot when the entry is counted), e.g.
// \EFI\Linux\berth-7-3fa2c41b09de+2-1.efi.
func (s Store) LoaderBootCountPath() (string, error) { return s.loaderString("LoaderBootCountPath") }

// LoaderEntryDefault is the default entry set through EFI (bootctl set-default).
func (s Store) LoaderEntryDefault() (string, error) { return s.loaderString("LoaderEntryDefault") }

// LoaderEntries lists the ids of all entries systemd-boot found.
func (s Store) LoaderEntries() ([]string, error) {
	_, b, err := s.Read("LoaderEntries", LoaderGUID)
	if err != nil {
		return nil, err
	}
	return decodeUTF16List(b), nil
}

// SetLoaderEntryDefault sets the default entry (it overrides loader.conf's
// "default"); "" deletes the variable so loader.conf decides again.
func (s Store) SetLoaderEntryDefault(id string) error {
	if id == "" {
		return s.Delete("LoaderEntryDefault", LoaderGUID)
	}
	return s.Write("LoaderEntryDefault", LoaderGUID, DefaultAttrs, EncodeUTF16(id))
}

// SetLoaderEntryOneShot makes systemd-boot boot id once, on the next boot;
// "" deletes the variable.
func (s Store) SetLoaderEntryOneShot(id string) error {
	if id == "" {
		return s.Delete("LoaderEntryOneShot", LoaderGUID)
	}
	return s.Write("LoaderEntryOneShot", LoaderGUID, DefaultAttrs, EncodeUTF16(id))
}

// HardDrive identifies a GPT partition for a device path.
type HardDrive struct {
	PartitionNumber uint32
	Start           uint64 // first LBA
	Size            uint64 // in LBAs
	PartitionGUID   string // PARTUUID, e.g. "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
}

// LoadOption is an EFI_LOAD_OPTION (the content of a Boot#### variable).
type LoadOption struct {
	Attributes   uint32
	Description  string
	FilePath     []byte // device path list
	OptionalData []byte
}

// LoadOptionActive marks a boot entry active.
const LoadOptionActive uint32 = 0x1

// guidBytes encodes a GUID in EFI's mixed-endian byte order.
func guidBytes(s string) ([]byte, error) {
	s = strings.ToLower(s)
	if !guidRe.MatchString(s) {
		return nil, fmt.Errorf("invalid GUID %q", s)
	}
	var raw [16]byte
	hex := strings.ReplaceAll(s, "-", "")
	for i := range raw {
		var v byte
		fmt.Sscanf(hex[2*i:2*i+2], "%02x", &v)
		raw[i] = v
	}
	out := make([]byte, 16)
	out[0], out[1], out[2], out[3] = raw[3], raw[2], raw[1], raw[0]
	out[4], out[5] = raw[5], raw[4]
	out[6], out[7] = raw[7], raw[6]
	copy(out[8:], raw[8:])
	return out, nil
}

// DevicePath builds HD(partition)/File(path)/End, the device path of a
// file on a GPT partition. path uses '\' or '/' separators.
func DevicePath(hd HardDrive, path string) ([]byte, error) {
	g, err := guidBytes(hd.PartitionGUID)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	// Media device path (type 4), hard drive (subtype 1), 42 bytes.
	b.Write([]byte{4, 1, 42, 0})
	binary.Write(&b, binary.LittleEndian, hd.PartitionNumber)
	binary.Write(&b, binary.LittleEndian, hd.Start)
	binary.Write(&b, binary.LittleEndian, hd.Size)
	b.Write(g)
	b.Write([]byte{2, 2}) // GPT partition table, GUID signature
	path = strings.ReplaceAll(path, "/", `\`)
	if !strings.HasPrefix(path, `\`) {
		path = `\` + path
	}
	name := EncodeUTF16(path)
	if 4+len(name) > 0xffff {
		return nil, fmt.Errorf("file path %q too long for a device path", path)
	}
	// Media device path, file path (subtype 4).
	b.Write([]byte{4, 4})
	binary.Write(&b, binary.LittleEndian, uint16(4+len(name)))
	b.Write(name)
	b.Write([]byte{0x7f, 0xff, 4, 0}) // end of entire device path
	return b.Bytes(), nil
}

// Marshal encodes the load option.
func (lo LoadOption) Marshal() ([]byte, error) {
	if len(lo.FilePath) > 0xffff {
		return nil, errors.New("device path too long")
	}
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, lo.Attributes)
	binary.Write(&b, binary.LittleEndian, uint16(len(lo.FilePath)))
	b.Write(EncodeUTF16(lo.Description))
	b.Write(lo.FilePath)
	b.Write(lo.OptionalData)
	return b.Bytes(), nil
}

// ParseLoadOption decodes an EFI_LOAD_OPTION.
func ParseLoadOption(b []byte) (LoadOption, error) {
	var lo LoadOption
	if len(b) < 6 {
		return lo, errors.New("load option too short")
	}
	lo.Attributes = binary.LittleEndian.Uint32(b)
	fpl := int(binary.LittleEndian.Uint16(b[4:]))
	rest := b[6:]
	end := -1
	for i := 0; i+1 < len(rest); i += 2 {
		if rest[i] == 0 && rest[i+1] == 0 {
			end = i
			break
		}
	}
	if end < 0 {
		return lo, errors.New("load option description is not NUL-terminated")
	}
	lo.Description = DecodeUTF16(rest[:end])
	rest = rest[end+2:]
	if fpl > len(rest) {
		return lo, fmt.Errorf("load option device path (%d bytes) runs past its end", fpl)
	}
	lo.FilePath = append([]byte(nil), rest[:fpl]...)
	lo.OptionalData = append([]byte(nil), rest[fpl:]...)
	return lo, nil
}

// FilePathOf returns the file path node's path of a device path ("" if none).
func FilePathOf(dp []byte) string {
	for len(dp) >= 4 {
		typ, sub := dp[0], dp[1]
		n := int(binary.LittleEndian.Uint16(dp[2:]))
		if n < 4 || n > len(dp) {
			return ""
		}
		if typ == 4 && sub == 4 {
			return DecodeUTF16(dp[4:n])
		}
		if typ == 0x7f && sub == 0xff {
			return ""
		}
		dp = dp[n:]
	}
	return ""
}

func bootName(n uint16) string { return fmt.Sprintf("Boot%04X", n) }

var bootVarRe = regexp.MustCompile(`^Boot([0-9A-F]{4})-` + GlobalGUID + `$`)

// BootEntries returns the firmware's Boot#### load options by number.
func (s Store) BootEntries() (map[uint16]LoadOption, error) {
	dir := s.Dir
	if dir == "" {
		dir = DefaultDir
	}
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list EFI variables: %w", err)
	}
	out := map[uint16]LoadOption{}
	for _, de := range des {
		m := bootVarRe.FindStringSubmatch(de.Name())
		if m == nil {
			continue
		}
		var n uint16
		fmt.Sscanf(m[1], "%04X", &n)
		_, b, err := s.Read(bootName(n), GlobalGUID)
		if err != nil {
			return nil, err
		}
		lo, err := ParseLoadOption(b)
		if err != nil {
			continue // firmware-owned garbage is not ours to judge
		}
		out[n] = lo
	}
	return out, nil
}

func (s Store) readU16List(name string) ([]uint16, error) {
	_, b, err := s.Read(name, GlobalGUID)
	if errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	out := make([]uint16, len(b)/2)
	for i := range out {
		out[i] = binary.LittleEndian.Uint16(b[2*i:])
	}
	return out, nil
}

func u16Bytes(v []uint16) []byte {
	b := make([]byte, 2*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint16(b[2*i:], x)
	}
	return b
}

// BootOrder returns the firmware boot order.
func (s Store) BootOrder() ([]uint16, error) { return s.readU16List("BootOrder") }

// SetBootOrder replaces the firmware boot order.
func (s Store) SetBootOrder(order []uint16) error {
	return s.Write("BootOrder", GlobalGUID, DefaultAttrs, u16Bytes(order))
}

// BootNext returns the entry the firmware boots once next (ok false if unset).
func (s Store) BootNext() (uint16, bool, error) {
	v, err := s.readU16List("BootNext")
	if err != nil || len(v) == 0 {
		return 0, false, err
	}
	return v[0], true, nil
}

// SetBootNext makes the firmware boot Boot#### n once, on the next boot.
func (s Store) SetBootNext(n uint16) error {
	return s.Write("BootNext", GlobalGUID, DefaultAttrs, u16Bytes([]uint16{n}))
}

// EnsureBootEntry makes sure an active Boot#### entry for file on the
// partition exists (reusing one with the same device path) and returns its
// number. With first set it is moved to the front of BootOrder, otherwise
// appended to BootOrder if missing.
func (s Store) EnsureBootEntry(description string, hd HardDrive, file string, first bool) (uint16, error) {
	dp, err := DevicePath(hd, file)
	if err != nil {
		return 0, err
	}
	entries, err := s.BootEntries()
	if err != nil {
		return 0, err
	}
	num, found := uint16(0), false
	nums := make([]int, 0, len(entries))
	for n := range entries {
		nums = append(nums, int(n))
	}
	sort.Ints(nums)
	for _, n := range nums {
		lo := entries[uint16(n)]
		if bytes.Equal(lo.FilePath, dp) {
			num, found = uint16(n), true
			break
		}
	}
	lo := LoadOption{Attributes: LoadOptionActive, Description: description, FilePath: dp}
	if found && (entries[num].Description != description || entries[num].Attributes&LoadOptionActive == 0) {
		found = false // rewrite it in place below
	} else if !found {
		for num = 0; ; num++ {
			if _, used := entries[num]; !used {
				break
			}
			if num == 0xffff {
				return 0, errors.New("no free Boot#### number")
			}
		}
	}
	if !found {
		b, err := lo.Marshal()
		if err != nil {
			return 0, err
		}
		if err := s.Write(bootName(num), GlobalGUID, DefaultAttrs, b); err != nil {
			return 0, err
		}
	}
	order, err := s.BootOrder()
	if err != nil {
		return 0, err
	}
	newOrder := make([]uint16, 0, len(order)+1)
	if first {
		newOrder = append(newOrder, num)
	}
	present := false
	for _, o := range order {
		if o == num {
			present = true
			if first {
				continue
			}
		}
		newOrder = append(newOrder, o)
	}
	if !first && !present {
		newOrder = append(newOrder, num)
	}
	if !equalU16(order, newOrder) {
		if err := s.SetBootOrder(newOrder); err != nil {
			return 0, err
		}
	}
	return num, nil
}

func equalU16(a, b []uint16) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// DeleteBootEntry removes Boot#### n and its BootOrder position.
func (s Store) DeleteBootEntry(n uint16) error {
	order, err := s.BootOrder()
	if err != nil {
		return err
	}
	var kept []uint16
	for _, o := range order {
		if o != n {
			kept = append(kept, o)
		}
	}
	if len(kept) != len(order) {
		if err := s.SetBootOrder(kept); err != nil {
			return err
		}
	}
	return s.Delete(bootName(n), GlobalGUID)
}
