package uki

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// PE/COFF layout constants (Microsoft PE format specification).
const (
	coffHeaderSize    = 20
	sectionHeaderSize = 40
	symbolSize        = 18

	magicPE32     = 0x10b
	magicPE32Plus = 0x20b

	scnCntCode        = 0x00000020
	scnCntInitialized = 0x00000040
	scnMemRead        = 0x40000000

	fileLocalSymsStripped = 0x0008

	dirSecurity  = 4
	dirBaseReloc = 5
)

// peSection is one section header plus where its bytes are.
type peSection struct {
	Name            string
	VirtualSize     uint32
	VirtualAddress  uint32
	SizeOfRawData   uint32
	PointerToRaw    uint32
	Characteristics uint32
	// hdr is the original 40-byte header for sections taken from the stub,
	// so fields this package does not model are kept as they were.
	hdr [sectionHeaderSize]byte
}

// peImage is a parsed PE image held in memory. Only the fields berth edits
// are modelled; everything else stays in data untouched.
type peImage struct {
	data      []byte
	peOff     int // offset of "PE\0\0"
	optOff    int // offset of the optional header
	optSize   int
	plus      bool // PE32+
	secOff    int  // offset of the section table
	sections  []peSection
	numDirs   int
	dirOff    int // offset of the data directory array
	fileAlign uint32
	sectAlign uint32
	// vaFloor keeps appended sections above addresses of sections that
	// were detached, so no address the stub once used is reused.
	vaFloor uint32
}

func (p *peImage) u16(off int) uint16      { return binary.LittleEndian.Uint16(p.data[off:]) }
func (p *peImage) u32(off int) uint32      { return binary.LittleEndian.Uint32(p.data[off:]) }
func (p *peImage) put16(off int, v uint16) { binary.LittleEndian.PutUint16(p.data[off:], v) }
func (p *peImage) put32(off int, v uint32) { binary.LittleEndian.PutUint32(p.data[off:], v) }

// Optional-header field offsets that are the same in PE32 and PE32+.
const (
	optSizeOfCode        = 4
	optSizeOfInitData    = 8
	optSectionAlignment  = 32
	optFileAlignment     = 36
	optSizeOfImage       = 56
	optSizeOfHeaders     = 60
	optCheckSum          = 64
	optNumRvaPE32        = 92
	optNumRvaPE32Plus    = 108
	optDataDirsPE32      = 96
	optDataDirsPE32Plus  = 112
	maxReasonableSection = 96
	maxZeroFill          = 64 << 20
)

// parsePE parses a PE image, checking every offset against the data so a
// hostile file yields an error rather than a panic.
func parsePE(data []byte) (*peImage, error) { return parsePEHeaders(data, int64(len(data))) }

// parsePEHeaders parses the headers in data, the start of a file of
// fileSize bytes; section data need not be in data.
func parsePEHeaders(data []byte, fileSize int64) (*peImage, error) {
	if len(data) < 0x40 || data[0] != 'M' || data[1] != 'Z' {
		return nil, errors.New("not a PE file (no MZ header)")
	}
	p := &peImage{data: data}
	p.peOff = int(binary.LittleEndian.Uint32(data[0x3c:]))
	if p.peOff < 0x40 || p.peOff > len(data)-4-coffHeaderSize || !bytes.Equal(data[p.peOff:p.peOff+4], []byte("PE\x00\x00")) {
		return nil, errors.New("not a PE file (bad PE signature offset)")
	}
	coff := p.peOff + 4
	nsec := int(p.u16(coff + 2))
	p.optSize = int(p.u16(coff + 16))
	p.optOff = coff + coffHeaderSize
	p.secOff = p.optOff + p.optSize
	if p.optSize < 2 || p.secOff > len(data) {
		return nil, errors.New("truncated PE optional header")
	}
	switch p.u16(p.optOff) {
	case magicPE32:
		if p.optSize < optDataDirsPE32 {
			return nil, errors.New("PE32 optional header too small")
		}
		p.numDirs = int(p.u32(p.optOff + optNumRvaPE32))
		p.dirOff = p.optOff + optDataDirsPE32
	case magicPE32Plus:
		p.plus = true
		if p.optSize < optDataDirsPE32Plus {
			return nil, errors.New("PE32+ optional header too small")
		}
		p.numDirs = int(p.u32(p.optOff + optNumRvaPE32Plus))
		p.dirOff = p.optOff + optDataDirsPE32Plus
	default:
		return nil, fmt.Errorf("unknown PE optional header magic %#x", p.u16(p.optOff))
	}
	if p.numDirs > 16 || p.dirOff+8*p.numDirs > p.secOff {
		return nil, fmt.Errorf("bad PE data directory count %d", p.numDirs)
	}
	if nsec > maxReasonableSection {
		return nil, fmt.Errorf("PE file claims %d sections", nsec)
	}
	if p.secOff+nsec*sectionHeaderSize > len(data) {
		return nil, errors.New("truncated PE section table")
	}
	p.sectAlign = p.u32(p.optOff + optSectionAlignment)
	p.fileAlign = p.u32(p.optOff + optFileAlignment)
	if !pow2(p.fileAlign) || p.fileAlign < 512 || p.fileAlign > 65536 || !pow2(p.sectAlign) || p.sectAlign < p.fileAlign {
		return nil, fmt.Errorf("unsupported PE alignment (section %#x, file %#x)", p.sectAlign, p.fileAlign)
	}
	for i := 0; i < nsec; i++ {
		off := p.secOff + i*sectionHeaderSize
		var s peSection
		copy(s.hdr[:], data[off:off+sectionHeaderSize])
		s.Name = strings.TrimRight(string(data[off:off+8]), "\x00")
		s.VirtualSize = p.u32(off + 8)
		s.VirtualAddress = p.u32(off + 12)
		s.SizeOfRawData = p.u32(off + 16)
		s.PointerToRaw = p.u32(off + 20)
		s.Characteristics = p.u32(off + 36)
		if uint64(s.PointerToRaw)+uint64(s.SizeOfRawData) > uint64(fileSize) {
			return nil, fmt.Errorf("PE section %q data lies beyond the end of the file", s.Name)
		}
		// Zero-filled memory beyond the file data is what .bss is; more than
		// maxZeroFill of it is not a stub, a UKI or systemd-boot, and
		// reading sections must not allocate gigabytes for a hostile file.
		if uint64(s.VirtualSize) > uint64(s.SizeOfRawData)+maxZeroFill {
			return nil, fmt.Errorf("PE section %q claims %d bytes in memory for %d in the file", s.Name, s.VirtualSize, s.SizeOfRawData)
		}
		p.sections = append(p.sections, s)
	}
	return p, nil
}

func pow2(v uint32) bool { return v != 0 && v&(v-1) == 0 }

func alignUp(v, a uint32) uint32 { return (v + a - 1) / a * a }

// sectionData returns the bytes a loader maps for section s: VirtualSize
// bytes, of which those beyond SizeOfRawData are zero.
func (p *peImage) sectionData(s *peSection) []byte {
	n := s.VirtualSize
	if n == 0 {
		n = s.SizeOfRawData
	}
	out := make([]byte, n)
	raw := min(n, s.SizeOfRawData)
	copy(out, p.data[s.PointerToRaw:s.PointerToRaw+raw])
	return out
}

func (p *peImage) find(name string) int {
	for i := range p.sections {
		if p.sections[i].Name == name {
			return i
		}
	}
	return -1
}

func (p *peImage) dataDir(i int) (rva, size uint32) {
	if i >= p.numDirs {
		return 0, 0
	}
	return p.u32(p.dirOff + 8*i), p.u32(p.dirOff + 8*i + 4)
}

// stripSymbols drops a COFF symbol table (plus its string table) that old
// stubs carry at the end of the file. Image files should not have one, and
// anything appended after it would be misread as part of it.
func (p *peImage) stripSymbols() error {
	coff := p.peOff + 4
	ptr := p.u32(coff + 8)
	nsym := p.u32(coff + 12)
	if ptr == 0 {
		p.put32(coff+12, 0)
		return nil
	}
	end := uint64(ptr) + uint64(nsym)*symbolSize
	if end > uint64(len(p.data)) {
		return fmt.Errorf("COFF symbol table (offset %#x, %d symbols) runs past the end of the file", ptr, nsym)
	}
	if end+4 <= uint64(len(p.data)) {
		end += uint64(binary.LittleEndian.Uint32(p.data[end:]))
	}
	if end > uint64(len(p.data)) {
		return fmt.Errorf("COFF string table at %#x runs past the end of the file", ptr)
	}
	for _, s := range p.sections {
		if s.SizeOfRawData > 0 && uint64(s.PointerToRaw)+uint64(s.SizeOfRawData) > uint64(ptr) {
			return fmt.Errorf("COFF symbol table at %#x overlaps section %q", ptr, s.Name)
		}
	}
	if end != uint64(len(p.data)) && !allZero(p.data[end:]) {
		return fmt.Errorf("unexpected data after the COFF symbol table (offset %#x)", end)
	}
	p.data = p.data[:ptr]
	p.put32(coff+8, 0)
	p.put32(coff+12, 0)
	p.put16(coff+18, p.u16(coff+18)|fileLocalSymsStripped)
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// rawEnd is the end of the last section's file data.
func (p *peImage) rawEnd() uint32 {
	var end uint32
	for _, s := range p.sections {
		if s.SizeOfRawData > 0 {
			end = max(end, s.PointerToRaw+s.SizeOfRawData)
		}
	}
	return end
}

// virtEnd is the end of the highest section in memory.
func (p *peImage) virtEnd() uint32 {
	end := p.vaFloor
	for _, s := range p.sections {
		end = max(end, s.VirtualAddress+max(s.VirtualSize, s.SizeOfRawData))
	}
	return end
}

// headerRoom is the offset up to which section headers may be written: the
// first section's file data, and never past SizeOfHeaders rounded up to the
// file alignment (the bytes in between are padding by construction).
func (p *peImage) headerRoom() uint32 {
	room := alignUp(p.u32(p.optOff+optSizeOfHeaders), p.fileAlign)
	for _, s := range p.sections {
		if s.SizeOfRawData > 0 && s.PointerToRaw < room {
			room = s.PointerToRaw
		}
	}
	return room
}

// writeSectionTable writes all section headers and the section count, and
// checks they fit before the first section's data.
func (p *peImage) writeSectionTable() error {
	end := p.secOff + len(p.sections)*sectionHeaderSize
	room := int(p.headerRoom())
	if end > room {
		return fmt.Errorf("the stub's PE header has no room for %d section headers (%d bytes needed, %d available before the first section); use a stub built with more header space", len(p.sections), end-p.secOff, room-p.secOff)
	}
	for i := range p.sections {
		s := &p.sections[i]
		h := s.hdr
		var name [8]byte
		copy(name[:], s.Name)
		copy(h[0:8], name[:])
		binary.LittleEndian.PutUint32(h[8:], s.VirtualSize)
		binary.LittleEndian.PutUint32(h[12:], s.VirtualAddress)
		binary.LittleEndian.PutUint32(h[16:], s.SizeOfRawData)
		binary.LittleEndian.PutUint32(h[20:], s.PointerToRaw)
		binary.LittleEndian.PutUint32(h[36:], s.Characteristics)
		copy(p.data[p.secOff+i*sectionHeaderSize:], h[:])
	}
	// Clear headers of sections that were dropped.
	for i := end; i < room && i < end+sectionHeaderSize*4; i++ {
		p.data[i] = 0
	}
	p.put16(p.peOff+4+2, uint16(len(p.sections)))
	p.put32(p.optOff+optSizeOfHeaders, alignUp(p.u32(p.optOff+optSizeOfHeaders), p.fileAlign))
	return nil
}

// peChecksum computes the PE image checksum (the algorithm of imagehlp's
// CheckSumMappedFile): a 16-bit ones'-complement-style sum over the file
// with the checksum field taken as zero, plus the file length.
func peChecksum(data []byte, checksumOff int) uint32 {
	var sum uint64
	n := len(data)
	for i := 0; i < n; i += 2 {
		if i == checksumOff || i == checksumOff+2 {
			continue
		}
		var w uint64
		if i+1 < n {
			w = uint64(data[i]) | uint64(data[i+1])<<8
		} else {
			w = uint64(data[i])
		}
		sum += w
		sum = (sum & 0xffff) + (sum >> 16)
	}
	sum = (sum & 0xffff) + (sum >> 16)
	return uint32(sum) + uint32(n)
}

// CheckPE reports whether data parses as a PE image (headers and section
// table consistent with the data).
func CheckPE(data []byte) error {
	_, err := parsePE(data)
	return err
}
