// Package uki assembles Unified Kernel Images (UAPI.5) from systemd-stub,
// optionally signs them for Secure Boot (Authenticode, RSA db key) and
// predicts the PCR 11 values systemd-stub and systemd-pcrphase will produce.
//
// API for callers (install, deploy, seal):
//
//	stub, name, err := uki.FindStub(imageRootFS)           // or os.DirFS("/") for the host
//	res, err := uki.Build(out, uki.Options{
//		Stub: stub, Linux: vmlinuz, Initrds: [][]byte{initrd},
//		Cmdline: "root=... berth.composefs=...", OSRelease: osrel, Uname: "6.12.0-1-amd64",
//		SignKey: key, SignCert: cert, // optional Secure Boot signing; see LoadSigner
//		PCRSignKey: pcrKey,           // optional .pcrsig/.pcrpkey; see LoadPrivateKey
//	})
//	// out is written crash-safely; out+".pcr11.json" holds res.PCR11.
//
// No PE library writes sections, so this package carries its own appender
// (pe.go): it strips the stub's COFF symbol table, appends sections after
// the stub's last one in the order systemd's ukify uses, and fixes the
// header sizes and the PE checksum.
package uki

import (
	"bytes"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"

	"github.com/foxboron/go-uefi/authenticode"

	"github.com/berth-dev/berth/internal/fsutil"
)

// Options are the inputs of one UKI.
type Options struct {
	Stub      []byte   // systemd-stub PE image (linuxx64.efi.stub), see FindStub
	Linux     []byte   // kernel image (.linux), an EFI-stub bzImage
	Initrds   [][]byte // concatenated into .initrd, each padded to 4 bytes (as ukify does)
	Cmdline   string   // .cmdline; empty = no section
	OSRelease []byte   // .osrel (the image's os-release); empty = no section
	Uname     string   // .uname (kernel release); empty = no section
	// SBAT holds extra SBAT CSV lines (with or without the leading "sbat,1,..."
	// header line). Empty means the UKI default "uki,1,UKI,...". The result is
	// merged with the stub's and the kernel's .sbat like ukify does.
	SBAT    string
	PCRPKey []byte // .pcrpkey (PEM public key for signed PCR policies); empty = none
	Splash  []byte // .splash (BMP); empty = none

	// PCRSignKey (RSA), when set, signs the expected PCR 11 values of the
	// phase paths PCRPhases (nil = DefaultPhasePaths) for the sha256 bank
	// into a .pcrsig section, as `systemd-measure sign` does, for TPM
	// policies bound to a signing key instead of literal PCR values. Its
	// public key becomes .pcrpkey unless PCRPKey is given.
	PCRSignKey crypto.Signer
	PCRPhases  []string

	// SignKey and SignCert sign the UKI (Authenticode, SHA-256). Both or neither.
	SignKey  crypto.Signer
	SignCert *x509.Certificate
}

// SectionInfo describes one section of the written UKI.
type SectionInfo struct {
	Name           string `json:"name"`
	VirtualAddress uint32 `json:"virtualAddress"`
	VirtualSize    uint32 `json:"virtualSize"`
	FileOffset     uint32 `json:"fileOffset"`
	FileSize       uint32 `json:"fileSize"`
	SHA256         string `json:"sha256"` // of the VirtualSize bytes
}

// Result describes a written UKI.
type Result struct {
	Path               string        `json:"path"`
	Size               int64         `json:"size"`
	StubVersion        string        `json:"stubVersion,omitempty"` // from the stub's .sdmagic, e.g. "257.13-1~deb13u1"
	Sections           []SectionInfo `json:"sections"`
	Signed             bool          `json:"signed"`
	AuthenticodeSHA256 string        `json:"authenticodeSha256"` // the image digest a Secure Boot db/dbx entry would name
	PCR11              PCR11         `json:"pcr11"`
	PCR11Path          string        `json:"pcr11Path"`
}

// defaultSBAT is the generic UKI SBAT entry ukify adds when none is given.
const defaultSBAT = "uki,1,UKI,uki,1,https://uapi-group.org/specifications/specs/unified_kernel_image/"

const sbatHeader = "sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md"

// Size limits for inputs, generous for real kernels and initrds but small
// enough that a hostile input cannot make the 32-bit PE fields overflow.
const (
	maxSectionSize = 1 << 30
	maxTotalSize   = 3 << 30
)

var sdmagicRe = regexp.MustCompile(`systemd-stub ([0-9][^ ]*)`)

// Build assembles a UKI and writes it to out (crash-safe), plus the PCR 11
// prediction to out+".pcr11.json".
func Build(out string, opts Options) (*Result, error) {
	img, res, err := Assemble(opts)
	if err != nil {
		return nil, fmt.Errorf("build UKI %s: %w", out, err)
	}
	if err := fsutil.WriteFileAtomic(out, img, 0o644); err != nil {
		return nil, fmt.Errorf("build UKI: %w", err)
	}
	res.Path = out
	res.PCR11Path = out + ".pcr11.json"
	js, err := json.MarshalIndent(res.PCR11, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := fsutil.WriteFileAtomic(res.PCR11Path, append(js, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("build UKI: %w", err)
	}
	return res, nil
}

// Assemble builds the UKI in memory and returns its bytes.
func Assemble(opts Options) ([]byte, *Result, error) {
	if len(opts.Stub) == 0 {
		return nil, nil, errors.New("no systemd-stub given")
	}
	if len(opts.Linux) == 0 {
		return nil, nil, errors.New("no kernel image given")
	}
	if (opts.SignKey == nil) != (opts.SignCert == nil) {
		return nil, nil, errors.New("signing needs both a key and a certificate")
	}
	if strings.ContainsRune(opts.Cmdline, 0) || strings.ContainsRune(opts.Uname, 0) {
		return nil, nil, errors.New("cmdline and uname must not contain NUL bytes")
	}
	initrd := joinInitrds(opts.Initrds)
	total := len(opts.Stub) + len(opts.Linux) + len(initrd) + len(opts.OSRelease) + len(opts.Cmdline) + len(opts.PCRPKey) + len(opts.Splash)
	for _, n := range []int{len(opts.Linux), len(initrd), len(opts.OSRelease), len(opts.Splash), len(opts.PCRPKey), len(opts.Cmdline)} {
		if n > maxSectionSize {
			return nil, nil, fmt.Errorf("a section of %d bytes is larger than the %d-byte limit", n, maxSectionSize)
		}
	}
	if total > maxTotalSize {
		return nil, nil, fmt.Errorf("UKI would be %d bytes, more than the %d-byte limit", total, maxTotalSize)
	}

	stub := append([]byte(nil), opts.Stub...)
	p, err := parsePE(stub)
	if err != nil {
		return nil, nil, fmt.Errorf("stub: %w", err)
	}
	if rva, size := p.dataDir(dirSecurity); rva != 0 || size != 0 {
		return nil, nil, errors.New("stub: the stub is already signed; use an unsigned systemd-stub")
	}
	for _, name := range []string{".linux", ".initrd", ".cmdline", ".osrel", ".uname", ".pcrpkey", ".splash"} {
		if p.find(name) >= 0 {
			return nil, nil, fmt.Errorf("stub: already has a %s section (is it a UKI already?)", name)
		}
	}
	if err := p.stripSymbols(); err != nil {
		return nil, nil, fmt.Errorf("stub: %w", err)
	}
	for _, s := range p.sections {
		if s.SizeOfRawData > 0 && (s.PointerToRaw%p.fileAlign != 0 || s.SizeOfRawData%p.fileAlign != 0) {
			return nil, nil, fmt.Errorf("stub: section %q is not aligned to the file alignment %#x", s.Name, p.fileAlign)
		}
	}
	end := p.rawEnd()
	if int(end) < len(p.data) {
		if !allZero(p.data[end:]) {
			return nil, nil, fmt.Errorf("stub: %d bytes of unknown data after the last section", len(p.data)-int(end))
		}
		p.data = p.data[:end]
	}
	stubVersion := ""
	if i := p.find(".sdmagic"); i >= 0 {
		if m := sdmagicRe.FindSubmatch(p.sectionData(&p.sections[i])); m != nil {
			stubVersion = string(m[1])
		}
	}

	sbat, err := mergeSBAT(p, opts.Linux, opts.SBAT)
	if err != nil {
		return nil, nil, err
	}

	// The stub's .sbat is replaced by the merged one: in place when it fits
	// (as ukify does), otherwise by moving the stub's trailing .sbat/.sdmagic
	// sections, which nothing references by address.
	var moved []newSection
	sbatInPlace := false
	if i := p.find(".sbat"); i >= 0 {
		s := &p.sections[i]
		room := s.SizeOfRawData
		for _, o := range p.sections {
			if o.VirtualAddress > s.VirtualAddress && o.VirtualAddress-s.VirtualAddress < room {
				room = o.VirtualAddress - s.VirtualAddress
			}
		}
		if uint32(len(sbat)) <= room {
			raw := p.data[s.PointerToRaw : s.PointerToRaw+s.SizeOfRawData]
			clear(raw)
			copy(raw, sbat)
			s.VirtualSize = uint32(len(sbat))
			sbatInPlace = true
		} else {
			moved, err = p.detachTail(i)
			if err != nil {
				return nil, nil, fmt.Errorf("stub: merged SBAT (%d bytes) does not fit the stub's .sbat (%d bytes) and the section cannot be moved: %w", len(sbat), room, err)
			}
		}
	}

	// Section order as systemd's ukify writes them; .pcrsig would go last.
	secs := append([]newSection(nil), moved...)
	add := func(name string, data []byte, flags uint32) {
		if len(data) > 0 {
			secs = append(secs, newSection{name, data, flags})
		}
	}
	if opts.PCRSignKey != nil && len(opts.PCRPKey) == 0 {
		opts.PCRPKey, err = publicKeyPEM(opts.PCRSignKey)
		if err != nil {
			return nil, nil, err
		}
	}
	data := uint32(scnCntInitialized | scnMemRead)
	add(".osrel", opts.OSRelease, data)
	add(".cmdline", []byte(opts.Cmdline), data)
	add(".uname", []byte(opts.Uname), data)
	add(".splash", opts.Splash, data)
	add(".pcrpkey", opts.PCRPKey, data)
	add(".initrd", initrd, data)
	// .linux is marked as code: kernels using the EFI handover protocol are
	// executed from where the stub found them.
	add(".linux", opts.Linux, scnCntCode|scnMemRead)
	if !sbatInPlace {
		add(".sbat", sbat, data)
	}
	if err := p.appendSections(secs); err != nil {
		return nil, nil, fmt.Errorf("stub: %w", err)
	}
	if opts.PCRSignKey != nil {
		// .pcrsig is not measured, so it can sign what the rest measures.
		sig, err := signPCR11(opts.PCRSignKey, p.measuredSections(stubVersion), opts.PCRPhases)
		if err != nil {
			return nil, nil, err
		}
		if err := p.appendSections([]newSection{{".pcrsig", sig, data}}); err != nil {
			return nil, nil, fmt.Errorf("stub: %w", err)
		}
	}

	out := p.data
	pe, err := authenticode.Parse(bytes.NewReader(out))
	if err != nil {
		return nil, nil, fmt.Errorf("authenticode parse of the assembled UKI: %w", err)
	}
	res := &Result{StubVersion: stubVersion, AuthenticodeSHA256: hex.EncodeToString(pe.Hash(crypto.SHA256))}
	if opts.SignKey != nil {
		if _, err := pe.Sign(opts.SignKey, opts.SignCert); err != nil {
			return nil, nil, fmt.Errorf("sign UKI: %w", err)
		}
		out = pe.Bytes()
		// The checksum field is outside the Authenticode hash, so fixing it
		// after signing keeps the signature valid.
		binary32(out, p.optOff+optCheckSum, peChecksum(out, p.optOff+optCheckSum))
		res.Signed = true
	}
	final, err := parsePE(out)
	if err != nil {
		return nil, nil, fmt.Errorf("re-parse assembled UKI: %w", err)
	}
	for i := range final.sections {
		s := &final.sections[i]
		sum := sha256.Sum256(final.sectionData(s))
		res.Sections = append(res.Sections, SectionInfo{
			Name: s.Name, VirtualAddress: s.VirtualAddress, VirtualSize: s.VirtualSize,
			FileOffset: s.PointerToRaw, FileSize: s.SizeOfRawData, SHA256: hex.EncodeToString(sum[:]),
		})
	}
	res.PCR11 = PredictPCR11(final.measuredSections(stubVersion), nil)
	res.Size = int64(len(out))
	return out, res, nil
}

type newSection struct {
	name  string
	data  []byte
	flags uint32
}

// detachTail removes section i and every section after it in memory and in
// the file, if they are only .sbat/.sdmagic (data found by name, never by
// address), and returns the ones other than .sbat for re-appending.
func (p *peImage) detachTail(i int) ([]newSection, error) {
	s := p.sections[i]
	var keep []peSection
	var moved []newSection
	for _, o := range p.sections {
		after := o.VirtualAddress >= s.VirtualAddress
		if o.SizeOfRawData > 0 && after != (o.PointerToRaw >= s.PointerToRaw) {
			return nil, fmt.Errorf("section %q is ordered differently in memory and in the file", o.Name)
		}
		if !after {
			keep = append(keep, o)
			continue
		}
		if o.Name != ".sbat" && o.Name != ".sdmagic" {
			return nil, fmt.Errorf("section %q follows .sbat", o.Name)
		}
		if o.Name == ".sdmagic" {
			moved = append(moved, newSection{o.Name, p.sectionData(&o), o.Characteristics})
		}
	}
	for d := 0; d < p.numDirs; d++ {
		rva, size := p.dataDir(d)
		if size != 0 && rva+size > s.VirtualAddress && d != dirSecurity {
			return nil, fmt.Errorf("data directory %d points into the moved sections", d)
		}
	}
	if err := p.checkNoRelocsFrom(s.VirtualAddress); err != nil {
		return nil, err
	}
	p.vaFloor = p.virtEnd()
	p.sections = keep
	p.data = p.data[:s.PointerToRaw]
	return moved, nil
}

// appendSections places new sections after the last one, in memory and in
// the file, and updates the header fields that depend on them.
func (p *peImage) appendSections(secs []newSection) error {
	// Lay out first so the image is allocated once (sections can be large).
	size := uint64(len(p.data))
	for _, ns := range secs {
		if len(ns.name) > 8 {
			return fmt.Errorf("section name %q longer than 8 bytes", ns.name)
		}
		va := alignUp(p.virtEnd(), p.sectAlign)
		ptr := alignUp(uint32(size), p.fileAlign)
		raw := alignUp(uint32(len(ns.data)), p.fileAlign)
		if uint64(va)+uint64(raw) > 1<<32-1 || uint64(ptr)+uint64(raw) > 1<<32-1 {
			return errors.New("UKI larger than 4 GiB")
		}
		size = uint64(ptr) + uint64(raw)
		p.sections = append(p.sections, peSection{
			Name: ns.name, VirtualSize: uint32(len(ns.data)), VirtualAddress: va,
			SizeOfRawData: raw, PointerToRaw: ptr, Characteristics: ns.flags,
		})
		field := optSizeOfInitData
		if ns.flags&scnCntCode != 0 {
			field = optSizeOfCode
		}
		p.put32(p.optOff+field, p.u32(p.optOff+field)+raw)
	}
	buf := make([]byte, size)
	copy(buf, p.data)
	for i, ns := range secs {
		s := p.sections[len(p.sections)-len(secs)+i]
		copy(buf[s.PointerToRaw:], ns.data)
	}
	p.data = buf
	if err := p.writeSectionTable(); err != nil {
		return err
	}
	p.put32(p.optOff+optSizeOfImage, alignUp(p.virtEnd(), p.sectAlign))
	p.put32(p.optOff+optCheckSum, 0)
	p.put32(p.optOff+optCheckSum, peChecksum(p.data, p.optOff+optCheckSum))
	return nil
}

func binary32(b []byte, off int, v uint32) {
	b[off], b[off+1], b[off+2], b[off+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

func joinInitrds(initrds [][]byte) []byte {
	if len(initrds) == 1 {
		return initrds[0]
	}
	var b bytes.Buffer
	for _, in := range initrds {
		b.Write(in)
		if pad := (4 - len(in)%4) % 4; pad > 0 {
			b.Write(make([]byte, pad))
		}
	}
	return b.Bytes()
}

// mergeSBAT builds the UKI's .sbat like ukify: one header line, then the
// stub's and the kernel's entries, then the given ones (or the UKI default),
// newline-terminated plus a NUL.
func mergeSBAT(stub *peImage, linux []byte, extra string) ([]byte, error) {
	var lines []string
	addFrom := func(text string) {
		text = strings.TrimRight(text, "\x00")
		ls := strings.Split(strings.TrimRight(text, "\n"), "\n")
		if len(ls) == 0 || !strings.HasPrefix(ls[0], "sbat,") {
			return
		}
		for _, l := range ls[1:] {
			if l = strings.TrimRight(l, "\r"); l != "" {
				lines = append(lines, l)
			}
		}
	}
	if i := stub.find(".sbat"); i >= 0 {
		addFrom(string(stub.sectionData(&stub.sections[i])))
	}
	if kp, err := parsePE(linux); err == nil {
		if i := kp.find(".sbat"); i >= 0 {
			addFrom(string(kp.sectionData(&kp.sections[i])))
		}
	}
	if extra == "" {
		extra = defaultSBAT
	}
	if strings.ContainsRune(extra, 0) {
		return nil, errors.New("SBAT text contains a NUL byte")
	}
	if !strings.HasPrefix(extra, "sbat,") {
		extra = sbatHeader + "\n" + extra
	}
	for _, l := range strings.Split(strings.TrimSpace(extra), "\n")[1:] {
		l = strings.TrimSpace(l)
		if l == "" {
			continue
		}
		if f := strings.Split(l, ","); len(f) < 2 {
			return nil, fmt.Errorf("bad SBAT line %q (want component,generation,...)", l)
		} else if _, err := strconv.Atoi(f[1]); err != nil {
			return nil, fmt.Errorf("bad SBAT line %q: generation %q is not a number", l, f[1])
		}
		lines = append(lines, l)
	}
	return []byte(sbatHeader + "\n" + strings.Join(lines, "\n") + "\n\x00"), nil
}

// ReadSections returns the sections of a PE file by name with the bytes a
// loader maps (VirtualSize). Used to inspect UKIs (e.g. their .osrel).
func ReadSections(data []byte) (map[string][]byte, error) {
	p, err := parsePE(data)
	if err != nil {
		return nil, err
	}
	m := map[string][]byte{}
	for i := range p.sections {
		if _, dup := m[p.sections[i].Name]; !dup {
			m[p.sections[i].Name] = p.sectionData(&p.sections[i])
		}
	}
	return m, nil
}

// ReadSectionsFile is ReadSections on a file.
func ReadSectionsFile(path string) (map[string][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m, err := ReadSections(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// ReadSectionFile reads one section (VirtualSize bytes) of a PE file without
// reading the rest, e.g. the .osrel of a UKI. It fails if the section is
// missing or larger than limit.
func ReadSectionFile(path, name string, limit int64) ([]byte, error) {
	f, p, err := openPEHeaders(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	i := p.find(name)
	if i < 0 {
		return nil, fmt.Errorf("%s: no %s section", path, name)
	}
	s := p.sections[i]
	n := int64(s.VirtualSize)
	if n == 0 {
		n = int64(s.SizeOfRawData)
	}
	if n > limit {
		return nil, fmt.Errorf("%s: section %s is %d bytes, more than %d", path, name, n, limit)
	}
	out := make([]byte, n)
	raw := min(n, int64(s.SizeOfRawData))
	if _, err := f.ReadAt(out[:raw], int64(s.PointerToRaw)); err != nil {
		return nil, fmt.Errorf("read %s section %s: %w", path, name, err)
	}
	return out, nil
}

// checkNoRelocsFrom fails if a base relocation patches an address at or
// above rva: such bytes cannot be moved.
func (p *peImage) checkNoRelocsFrom(rva uint32) error {
	rrva, size := p.dataDir(dirBaseReloc)
	if size == 0 {
		return nil
	}
	var sec *peSection
	for i := range p.sections {
		s := &p.sections[i]
		if rrva >= s.VirtualAddress && rrva+size <= s.VirtualAddress+max(s.VirtualSize, s.SizeOfRawData) {
			sec = s
		}
	}
	if sec == nil {
		return errors.New("base relocation table is not inside a section")
	}
	tab := p.sectionData(sec)
	off := int(rrva - sec.VirtualAddress)
	if off+int(size) > len(tab) {
		return errors.New("base relocation table runs past its section")
	}
	tab = tab[off : off+int(size)]
	for len(tab) >= 8 {
		page := binary.LittleEndian.Uint32(tab)
		n := int(binary.LittleEndian.Uint32(tab[4:]))
		if n < 8 || n > len(tab) {
			return errors.New("malformed base relocation block")
		}
		for i := 8; i+1 < n; i += 2 {
			e := binary.LittleEndian.Uint16(tab[i:])
			if e>>12 != 0 && page+uint32(e&0xfff) >= rva {
				return fmt.Errorf("a base relocation patches address %#x in a section that would move", page+uint32(e&0xfff))
			}
		}
		tab = tab[n:]
	}
	return nil
}

// openPEHeaders opens a PE file and parses its headers (the first 64 KiB),
// leaving the rest unread.
func openPEHeaders(path string) (*os.File, *peImage, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	head := make([]byte, min(fi.Size(), 64<<10))
	if _, err := f.ReadAt(head, 0); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("read %s: %w", path, err)
	}
	p, err := parsePEHeaders(head, fi.Size())
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, p, nil
}

// SectionNamesFile lists the section names of a PE file, reading only its
// headers.
func SectionNamesFile(path string) ([]string, error) {
	f, p, err := openPEHeaders(path)
	if err != nil {
		return nil, err
	}
	f.Close()
	var names []string
	for _, s := range p.sections {
		names = append(names, s.Name)
	}
	return names, nil
}
