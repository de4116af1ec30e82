package composefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path"
	"sort"
	"strings"
)

// The reader parses the EROFS subset that composefs images use (and plain
// uncompressed EROFS images): flat and chunk-based inodes, compact and
// extended inodes, inline and shared xattrs. Every offset read from the
// image is bounds-checked; hostile bytes give an error, never a panic.

const (
	cfsMagic       = 0xd078629a
	erofsMagic     = 0xe0f5e1e2
	erofsSBOffset  = 1024
	erofsSBSize    = 128
	maxSymlinkSize = 4096
	// maxInlineContent is the most file content composefs keeps in the
	// image (LCFS_INLINE_CONTENT_MAX; directory scans inline ≤ 64 bytes).
	maxInlineContent = 5000

	layoutFlatPlain  = 0
	layoutFlatInline = 2
	layoutChunkBased = 4

	chunkFormatIndexes  = 0x20
	chunkFormatBlkbits  = 0x1f
	erofsNullAddr       = 0xffffffff
	incompatSupported   = 0x1 | 0x4 // LZ4_0PADDING (harmless uncompressed), CHUNKED_FILE
	erofsXattrLongIndex = 0x80
)

// ErrCorrupt is wrapped by every error about malformed image bytes.
var ErrCorrupt = errors.New("corrupt composefs/EROFS image")

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
}

// Image is a composefs (EROFS) image held in memory.
type Image struct {
	data []byte

	// version is the composefs header's format version, -1 without header.
	version int
	flags   uint32

	blkszbits   uint8
	rootNid     uint64
	inos        uint64
	buildTime   uint64
	buildNsec   uint32
	blocks      uint32
	metaBlkaddr uint32
	xattrBlk    uint32
	incompat    uint32
}

// OpenImage reads the image file at path and parses its superblock.
func OpenImage(path string) (*Image, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("open composefs image: %w", err)
	}
	im, err := ParseImage(data)
	if err != nil {
		return nil, fmt.Errorf("open composefs image %s: %w", path, err)
	}
	return im, nil
}

// ParseImage parses an image held in data (which it keeps; do not modify).
func ParseImage(data []byte) (*Image, error) {
	if len(data) < erofsSBOffset+erofsSBSize {
		return nil, corrupt("%d bytes is too short for an EROFS superblock", len(data))
	}
	le := binary.LittleEndian
	im := &Image{data: data, version: -1}
	if le.Uint32(data[0:]) == cfsMagic {
		if v := le.Uint32(data[4:]); v != 1 {
			return nil, corrupt("composefs header version %d, want 1", v)
		}
		im.flags = le.Uint32(data[8:])
		cv := le.Uint32(data[12:])
		if cv > 1 {
			return nil, corrupt("unsupported composefs format version %d", cv)
		}
		im.version = int(cv)
	}
	sb := data[erofsSBOffset:]
	if m := le.Uint32(sb[0:]); m != erofsMagic {
		return nil, corrupt("bad EROFS magic %#x", m)
	}
	im.blkszbits = sb[12]
	if im.blkszbits < 9 || im.blkszbits > 16 {
		return nil, corrupt("unsupported EROFS block size 2^%d", im.blkszbits)
	}
	im.rootNid = uint64(le.Uint16(sb[14:]))
	im.inos = le.Uint64(sb[16:])
	im.buildTime = le.Uint64(sb[24:])
	im.buildNsec = le.Uint32(sb[32:])
	im.blocks = le.Uint32(sb[36:])
	im.metaBlkaddr = le.Uint32(sb[40:])
	im.xattrBlk = le.Uint32(sb[44:])
	im.incompat = le.Uint32(sb[80:])
	if im.incompat&^incompatSupported != 0 {
		return nil, corrupt("unsupported EROFS incompatible features %#x", im.incompat&^incompatSupported)
	}
	if im.buildNsec >= 1e9 {
		return nil, corrupt("superblock build time nanoseconds %d out of range", im.buildNsec)
	}
	return im, nil
}

// Version returns the composefs format version from the image header
// (0 or 1), or -1 for a plain EROFS image without one.
func (im *Image) Version() int { return im.version }

// WriteOptions returns the options that make Write produce this image's
// format version again (used with Tree to reproduce the image).
func (im *Image) WriteOptions() WriteOptions {
	v := max(im.version, 0)
	return VersionOptions(v, v, true, true)
}

// Size returns the image size in bytes.
func (im *Image) Size() int { return len(im.data) }

func (im *Image) blksz() uint64 { return 1 << im.blkszbits }

// slice returns data[off:off+n] or an error when it is out of bounds;
// what and nid describe the range (formatted only on error).
func (im *Image) slice(off, n uint64, what string, nid uint64) ([]byte, error) {
	l := uint64(len(im.data))
	if off > l || n > l-off {
		return nil, corrupt("inode %d: %s at %d+%d is beyond the end of the image (%d bytes)", nid, what, off, n, l)
	}
	return im.data[off : off+n], nil
}

// rawInode is one on-disk inode, decoded.
type rawInode struct {
	nid      uint64
	off      uint64 // byte offset of the inode core
	layout   uint8
	extended bool
	icount   uint16
	mode     uint32
	nlink    uint32
	size     uint64
	iu       uint32
	ino      uint32
	uid, gid uint32
	mtime    Timespec
}

func (ri *rawInode) coreSize() uint64 {
	if ri.extended {
		return 64
	}
	return 32
}

func (ri *rawInode) xattrSize() uint64 {
	if ri.icount == 0 {
		return 0
	}
	return 12 + 4*(uint64(ri.icount)-1)
}

// tailOff is where inline data (dirent tail, symlink, file tail, chunk
// array) starts: after the core and the xattr body.
func (ri *rawInode) tailOff() uint64 { return ri.off + ri.coreSize() + ri.xattrSize() }

func (im *Image) inode(nid uint64) (*rawInode, error) {
	if nid > uint64(len(im.data))/32 {
		return nil, corrupt("inode nid %d out of range", nid)
	}
	off := uint64(im.metaBlkaddr)<<im.blkszbits + nid*32
	b, err := im.slice(off, 32, "inode", nid)
	if err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	format := le.Uint16(b[0:])
	ri := &rawInode{nid: nid, off: off, extended: format&1 != 0, layout: uint8(format>>1) & 7, icount: le.Uint16(b[2:])}
	if format>>4 != 0 {
		return nil, corrupt("inode %d: unknown format bits %#x", nid, format)
	}
	if ri.extended {
		if b, err = im.slice(off, 64, "extended inode", nid); err != nil {
			return nil, err
		}
		ri.mode = uint32(le.Uint16(b[4:]))
		ri.size = le.Uint64(b[8:])
		ri.iu = le.Uint32(b[16:])
		ri.ino = le.Uint32(b[20:])
		ri.uid = le.Uint32(b[24:])
		ri.gid = le.Uint32(b[28:])
		ri.mtime = Timespec{Sec: int64(le.Uint64(b[32:])), Nsec: le.Uint32(b[40:])}
		ri.nlink = le.Uint32(b[44:])
		if ri.mtime.Nsec >= 1e9 {
			return nil, corrupt("inode %d: mtime nanoseconds %d out of range", nid, ri.mtime.Nsec)
		}
	} else {
		ri.mode = uint32(le.Uint16(b[4:]))
		ri.nlink = uint32(le.Uint16(b[6:]))
		ri.size = uint64(le.Uint32(b[8:]))
		ri.iu = le.Uint32(b[16:])
		ri.ino = le.Uint32(b[20:])
		ri.uid = uint32(le.Uint16(b[24:]))
		ri.gid = uint32(le.Uint16(b[26:]))
		// Compact inodes store mtime relative to the superblock's build
		// time (0 in images from mkcomposefs).
		ri.mtime = Timespec{Sec: int64(im.buildTime) + int64(le.Uint32(b[28:])), Nsec: im.buildNsec}
	}
	switch ri.layout {
	case layoutFlatPlain, layoutFlatInline, layoutChunkBased:
	default:
		return nil, corrupt("inode %d: unsupported data layout %d (compressed?)", nid, ri.layout)
	}
	switch ri.mode & SIFMT {
	case SIFREG, SIFDIR, SIFLNK, SIFCHR, SIFBLK, SIFIFO, SIFSOCK:
	default:
		return nil, corrupt("inode %d: invalid file type in mode %#o", nid, ri.mode)
	}
	if _, err := im.slice(ri.off, ri.coreSize()+ri.xattrSize(), "xattrs", nid); err != nil {
		return nil, err
	}
	return ri, nil
}

// data returns the first size bytes of an inode's content, at most
// limit bytes (limit bounds allocations for hostile sizes).
func (im *Image) inodeData(ri *rawInode, limit uint64) ([]byte, error) {
	size := ri.size
	if size > limit {
		return nil, corrupt("inode %d: size %d exceeds %d", ri.nid, size, limit)
	}
	if size == 0 {
		return nil, nil
	}
	bs := im.blksz()
	switch ri.layout {
	case layoutFlatPlain:
		return im.slice(uint64(ri.iu)<<im.blkszbits, size, "data", ri.nid)
	case layoutFlatInline:
		full := (size+bs-1)/bs - 1 // blocks before the inline tail
		tail := size - full*bs
		t := ri.tailOff()
		if t%bs+tail > bs {
			return nil, corrupt("inode %d: inline data crosses a block boundary", ri.nid)
		}
		tb, err := im.slice(t, tail, "inline data", ri.nid)
		if err != nil {
			return nil, err
		}
		if full == 0 {
			return tb, nil
		}
		hb, err := im.slice(uint64(ri.iu)<<im.blkszbits, full*bs, "data", ri.nid)
		if err != nil {
			return nil, err
		}
		out := make([]byte, 0, size)
		return append(append(out, hb...), tb...), nil
	case layoutChunkBased:
		chunks, chunkbits, err := im.chunks(ri)
		if err != nil {
			return nil, err
		}
		out := make([]byte, size)
		csize := uint64(1) << chunkbits
		for i, addr := range chunks {
			start := uint64(i) * csize
			if start >= size {
				break
			}
			n := min(csize, size-start)
			if addr == erofsNullAddr {
				continue // hole: zeros
			}
			b, err := im.slice(uint64(addr)<<im.blkszbits, n, "chunk", ri.nid)
			if err != nil {
				return nil, err
			}
			copy(out[start:], b)
		}
		return out, nil
	}
	return nil, corrupt("inode %d: unsupported data layout %d", ri.nid, ri.layout)
}

// chunks returns the block addresses of a chunk-based inode.
func (im *Image) chunks(ri *rawInode) ([]uint32, uint, error) {
	chunkbits := uint(im.blkszbits) + uint(ri.iu&chunkFormatBlkbits)
	if chunkbits > 63 {
		return nil, 0, corrupt("inode %d: chunk size 2^%d", ri.nid, chunkbits)
	}
	n := (ri.size + (1 << chunkbits) - 1) >> chunkbits
	if ri.size == 0 {
		n = 0
	}
	esize := uint64(4)
	if ri.iu&chunkFormatIndexes != 0 {
		esize = 8
	}
	if n > uint64(len(im.data))/esize {
		return nil, 0, corrupt("inode %d: %d chunks do not fit in the image", ri.nid, n)
	}
	start := ri.tailOff()
	if esize == 8 {
		start = (start + 7) &^ 7 // the index array is 8-byte aligned
	}
	b, err := im.slice(start, n*esize, "chunk table", ri.nid)
	if err != nil {
		return nil, 0, err
	}
	out := make([]uint32, n)
	for i := range out {
		if esize == 8 {
			out[i] = binary.LittleEndian.Uint32(b[uint64(i)*8+4:])
		} else {
			out[i] = binary.LittleEndian.Uint32(b[uint64(i)*4:])
		}
	}
	return out, chunkbits, nil
}

var xattrPrefixes = map[uint8]string{
	1: "user.",
	2: "system.posix_acl_access",
	3: "system.posix_acl_default",
	4: "trusted.",
	5: "lustre.",
	6: "security.",
}

// xattrs decodes an inode's shared and inline xattrs, sorted by key.
func (im *Image) xattrs(ri *rawInode) ([]Xattr, error) {
	if ri.icount == 0 {
		return nil, nil
	}
	body, err := im.slice(ri.off+ri.coreSize(), ri.xattrSize(), "xattrs", ri.nid)
	if err != nil {
		return nil, err
	}
	nshared := uint64(body[4])
	if 12+4*nshared > uint64(len(body)) {
		return nil, corrupt("inode %d: %d shared xattrs do not fit in its xattr body", ri.nid, nshared)
	}
	var out []Xattr
	for i := range nshared {
		id := binary.LittleEndian.Uint32(body[12+4*i:])
		off := uint64(im.xattrBlk)<<im.blkszbits + uint64(id)*4
		x, _, err := im.xattrEntry(off, uint64(len(im.data)), ri.nid)
		if err != nil {
			return nil, fmt.Errorf("shared xattr %d: %w", id, err)
		}
		out = append(out, x)
	}
	pos := ri.off + ri.coreSize() + 12 + 4*nshared
	end := ri.off + ri.coreSize() + ri.xattrSize()
	for pos < end {
		x, n, err := im.xattrEntry(pos, end, ri.nid)
		if err != nil {
			return nil, err
		}
		out = append(out, x)
		pos += n
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	for i := 1; i < len(out); i++ {
		if out[i].Key == out[i-1].Key {
			return nil, corrupt("inode %d: duplicate xattr %q", ri.nid, out[i].Key)
		}
	}
	return out, nil
}

// xattrEntry decodes the entry at off, which must end by end; it returns
// the entry and its padded length.
func (im *Image) xattrEntry(off, end uint64, nid uint64) (Xattr, uint64, error) {
	if off > end || end-off < 4 || end > uint64(len(im.data)) {
		return Xattr{}, 0, corrupt("inode %d: xattr entry at %d out of bounds", nid, off)
	}
	h := im.data[off:]
	nameLen, index, valLen := uint64(h[0]), h[1], uint64(binary.LittleEndian.Uint16(h[2:]))
	total := (4 + nameLen + valLen + 3) &^ 3
	if total > end-off {
		return Xattr{}, 0, corrupt("inode %d: xattr entry at %d (%d bytes) out of bounds", nid, off, total)
	}
	name := string(h[4 : 4+nameLen])
	value := append([]byte{}, h[4+nameLen:4+nameLen+valLen]...)
	if index&erofsXattrLongIndex != 0 {
		return Xattr{}, 0, corrupt("inode %d: long xattr name prefixes are not supported", nid)
	}
	prefix, ok := xattrPrefixes[index]
	if index != 0 && !ok {
		return Xattr{}, 0, corrupt("inode %d: unknown xattr name index %d", nid, index)
	}
	key := prefix + name
	if key == "" || strings.IndexByte(key, 0) >= 0 {
		return Xattr{}, 0, corrupt("inode %d: invalid xattr name %q", nid, key)
	}
	return Xattr{Key: key, Value: value}, total, nil
}

// dirent is one directory entry.
type dirent struct {
	name  string
	nid   uint64
	ftype uint8
}

// dirents decodes a directory's entries, including "." and "..".
func (im *Image) dirents(ri *rawInode) ([]dirent, error) {
	data, err := im.inodeData(ri, uint64(len(im.data)))
	if err != nil {
		return nil, err
	}
	bs := im.blksz()
	var out []dirent
	for blk := uint64(0); blk*bs < uint64(len(data)); blk++ {
		b := data[blk*bs : min(uint64(len(data)), (blk+1)*bs)]
		if len(b) < 12 {
			return nil, corrupt("directory inode %d: block %d too short for a dirent", ri.nid, blk)
		}
		first := uint64(binary.LittleEndian.Uint16(b[8:]))
		if first < 12 || first%12 != 0 || first > uint64(len(b)) {
			return nil, corrupt("directory inode %d: block %d: bad first name offset %d", ri.nid, blk, first)
		}
		n := first / 12
		for i := range n {
			e := b[i*12:]
			nameoff := uint64(binary.LittleEndian.Uint16(e[8:]))
			var nameEnd uint64
			if i+1 < n {
				nameEnd = uint64(binary.LittleEndian.Uint16(e[20:]))
			} else {
				nameEnd = uint64(len(b))
			}
			if nameoff < first || nameEnd > uint64(len(b)) || nameEnd <= nameoff {
				return nil, corrupt("directory inode %d: block %d entry %d: bad name offsets %d..%d", ri.nid, blk, i, nameoff, nameEnd)
			}
			name := b[nameoff:nameEnd]
			if i+1 == n {
				// The last name runs to the end of the block's data, minus padding.
				for len(name) > 0 && name[len(name)-1] == 0 {
					name = name[:len(name)-1]
				}
			}
			if len(name) == 0 || len(name) > 255 || strings.ContainsAny(string(name), "/\x00") {
				return nil, corrupt("directory inode %d: invalid name %q", ri.nid, name)
			}
			out = append(out, dirent{name: string(name), nid: binary.LittleEndian.Uint64(e[0:]), ftype: e[10]})
		}
	}
	return out, nil
}

// Root decodes the whole image into a tree as written: composefs's
// rewrites stay visible (trusted.overlay.* xattrs, the 256 root whiteouts,
// whiteouts as xattr-marked files). Files with the same inode are the same
// *Inode. External files get Payload/Digest from their redirect/metacopy
// xattrs, which stay in Xattrs too.
func (im *Image) Root() (*Inode, error) {
	r := newTreeReader(im, false)
	root, err := r.read(im.rootNid, im.rootNid, "/", 0)
	if err != nil {
		return nil, fmt.Errorf("read composefs image: %w", err)
	}
	if !root.IsDir() {
		return nil, fmt.Errorf("read composefs image: %w", corrupt("root inode %d is not a directory", im.rootNid))
	}
	return root, nil
}

// maxDepth bounds directory nesting so that hostile images cannot exhaust
// the stack.
const maxDepth = 1024

type treeReader struct {
	im     *Image
	strict bool              // Check: also verify ".", "..", order, types, link counts
	nodes  map[uint64]*Inode // non-directories by nid: hardlinks share one Inode
	dirs   map[uint64]bool   // directories seen: a second link is a cycle or corruption
	raw    map[uint64]*rawInode
	links  map[uint64]uint32 // strict: links found per non-directory nid
	order  []uint64          // strict: nids in discovery order (deterministic checks)
}

func newTreeReader(im *Image, strict bool) *treeReader {
	return &treeReader{im: im, strict: strict, nodes: map[uint64]*Inode{}, dirs: map[uint64]bool{},
		raw: map[uint64]*rawInode{}, links: map[uint64]uint32{}}
}

func (r *treeReader) read(nid, parent uint64, p string, depth int) (*Inode, error) {
	if n, ok := r.nodes[nid]; ok {
		r.links[nid]++
		return n, nil
	}
	if depth > maxDepth {
		return nil, corrupt("%s: directories nested deeper than %d", p, maxDepth)
	}
	ri, err := r.im.inode(nid)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	if r.strict {
		r.raw[nid] = ri
		r.order = append(r.order, nid)
	}
	n := &Inode{Mode: ri.mode, UID: ri.uid, GID: ri.gid, Mtime: ri.mtime}
	if n.Xattrs, err = r.im.xattrs(ri); err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	switch ri.mode & SIFMT {
	case SIFDIR:
		if r.dirs[nid] {
			return nil, corrupt("%s: directory inode %d is linked more than once", p, nid)
		}
		r.dirs[nid] = true
		ents, err := r.im.dirents(ri)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		if r.strict {
			if err := checkDirents(ents, nid, parent); err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
		}
		n.Children = make(map[string]*Inode, len(ents))
		subdirs := uint32(0)
		for _, e := range ents {
			if e.name == "." || e.name == ".." {
				continue
			}
			if _, dup := n.Children[e.name]; dup {
				return nil, corrupt("%s: duplicate entry %q", p, e.name)
			}
			child, err := r.read(e.nid, nid, path.Join(p, e.name), depth+1)
			if err != nil {
				return nil, err
			}
			if r.strict {
				if want := erofsFileType(child.Mode); e.ftype != want {
					return nil, corrupt("%s: entry %q has file type %d, its inode %d", p, e.name, e.ftype, want)
				}
			}
			if child.IsDir() {
				subdirs++
			}
			n.Children[e.name] = child
		}
		if r.strict && ri.nlink != 2+subdirs {
			return nil, corrupt("%s: directory nlink %d, want %d (2 + %d subdirectories)", p, ri.nlink, 2+subdirs, subdirs)
		}
	case SIFLNK:
		data, err := r.im.inodeData(ri, maxSymlinkSize)
		if err != nil {
			return nil, fmt.Errorf("%s: symlink: %w", p, err)
		}
		if len(data) == 0 || strings.IndexByte(string(data), 0) >= 0 {
			return nil, corrupt("%s: invalid symlink target %q", p, data)
		}
		n.Target = string(data)
		n.Size = ri.size
		r.nodes[nid] = n
		r.links[nid] = 1
	case SIFREG:
		n.Size = ri.size
		redirect, hasRedirect := n.Xattr("trusted.overlay.redirect")
		metacopy, hasMetacopy := n.Xattr("trusted.overlay.metacopy")
		if hasRedirect {
			payload := strings.TrimPrefix(string(redirect), "/")
			if payload == "" {
				return nil, corrupt("%s: empty overlay redirect", p)
			}
			n.Payload = payload
		}
		if hasMetacopy && len(metacopy) > 0 {
			d, err := parseMetacopy(metacopy)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
			n.Digest = d
		}
		if !hasRedirect && !hasMetacopy && ri.size > 0 {
			// Content lives in the image (inline files of composefs
			// images, or a plain EROFS image's small files). A metacopy
			// xattr without a redirect is an external file whose object
			// is unknown (dump input without a payload).
			if ri.size > maxInlineContent {
				return nil, corrupt("%s: %d-byte file without an overlay redirect (at most %d bytes can be inline in a composefs image)", p, ri.size, maxInlineContent)
			}
			data, err := r.im.inodeData(ri, maxInlineContent)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", p, err)
			}
			n.Inline = append([]byte(nil), data...)
		}
		r.nodes[nid] = n
		r.links[nid] = 1
	case SIFCHR, SIFBLK:
		n.Rdev = ri.iu
		r.nodes[nid] = n
		r.links[nid] = 1
	default:
		r.nodes[nid] = n
		r.links[nid] = 1
	}
	return n, nil
}

// parseMetacopy returns the digest from an overlayfs metacopy xattr:
// u8 version 0, u8 len, u8 flags, u8 algorithm, digest.
func parseMetacopy(v []byte) ([]byte, error) {
	if len(v) < 4 || v[0] != 0 || int(v[1]) != len(v) {
		return nil, corrupt("malformed overlay metacopy xattr %x", v)
	}
	d := v[4:]
	switch {
	case v[3] == 1 && len(d) == 32, v[3] == 2 && len(d) == 64:
		return append([]byte(nil), d...), nil
	case v[3] == 0 && len(d) == 0:
		return nil, nil
	}
	return nil, corrupt("overlay metacopy xattr: digest algorithm %d with %d bytes", v[3], len(d))
}

// Walk calls fn for every entry of the tree as written (see Root), parents
// before children, children in bytewise name order. Paths are absolute
// ("/", "/etc", ...). A hardlinked inode is visited once per link.
func (im *Image) Walk(fn func(path string, n *Inode) error) error {
	root, err := im.Root()
	if err != nil {
		return err
	}
	return WalkTree(root, fn)
}

// WalkTree calls fn for root and everything below it, as Walk does.
func WalkTree(root *Inode, fn func(path string, n *Inode) error) error {
	var walk func(p string, n *Inode) error
	walk = func(p string, n *Inode) error {
		if err := fn(p, n); err != nil {
			return err
		}
		if !n.IsDir() {
			return nil
		}
		for _, name := range n.SortedNames() {
			if err := walk(path.Join(p, name), n.Children[name]); err != nil {
				return err
			}
		}
		return nil
	}
	return walk("/", root)
}

// Tree decodes the image into the writer's input model, undoing
// composefs's rewrites: metacopy/redirect become Digest/Payload, escaped
// trusted.overlay.overlay.* xattrs become trusted.overlay.*, xattr-marked
// whiteout files become chardev 0/0 (and their parents lose the markers),
// and the root loses its opaque xattr and generated whiteouts. Writing the
// result with the image's version (MinVersion = MaxVersion = Version())
// reproduces the image bytes.
func (im *Image) Tree() (*Inode, error) {
	root, err := im.Root()
	if err != nil {
		return nil, err
	}
	seen := map[*Inode]bool{}
	var undo func(n *Inode)
	undo = func(n *Inode) {
		if seen[n] {
			return
		}
		seen[n] = true
		if n.Type() == SIFREG {
			n.Xattrs = dropXattrs(n.Xattrs, "trusted.overlay.metacopy", "trusted.overlay.redirect")
			if isXattrWhiteout(n) {
				n.Mode = SIFCHR | n.Mode&07777
				n.Rdev = 0
				n.Size = 0
				n.Xattrs = dropXattrs(n.Xattrs, "trusted.overlay.overlay.whiteout", "user.overlay.whiteout")
			}
		}
		if n.IsDir() {
			hasWhiteout := false
			for _, name := range n.SortedNames() {
				c := n.Children[name]
				undo(c)
				if c.Type() == SIFCHR && c.Rdev == 0 {
					hasWhiteout = true
				}
			}
			if hasWhiteout {
				n.Xattrs = dropXattrs(n.Xattrs, "trusted.overlay.overlay.whiteouts", "user.overlay.whiteouts")
				if im.version >= 1 {
					n.Xattrs = dropXattrs(n.Xattrs, "trusted.overlay.overlay.opaque", "user.overlay.opaque")
				}
			}
		}
		for i, x := range n.Xattrs {
			if rest, ok := strings.CutPrefix(x.Key, "trusted.overlay.overlay."); ok {
				n.Xattrs[i].Key = "trusted.overlay." + rest
			}
		}
		if len(n.Xattrs) == 0 {
			n.Xattrs = nil
		}
	}
	// The root's generated whiteouts are real chardev 0/0 inodes (input
	// whiteouts were turned into regular files), so drop them first.
	for _, name := range root.SortedNames() {
		c := root.Children[name]
		if len(name) == 2 && isLowerHex(name) && c.Type() == SIFCHR && c.Rdev == 0 {
			delete(root.Children, name)
		}
	}
	root.Xattrs = dropXattrs(root.Xattrs, "trusted.overlay.opaque")
	undo(root)
	return root, nil
}

func isXattrWhiteout(n *Inode) bool {
	if n.Size != 0 || len(n.Inline) != 0 || n.Payload != "" {
		return false
	}
	_, a := n.Xattr("trusted.overlay.overlay.whiteout")
	_, b := n.Xattr("user.overlay.whiteout")
	return a && b
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func dropXattrs(xs []Xattr, keys ...string) []Xattr {
	out := xs[:0]
	for _, x := range xs {
		drop := false
		for _, k := range keys {
			if x.Key == k {
				drop = true
				break
			}
		}
		if !drop {
			out = append(out, x)
		}
	}
	return out
}
