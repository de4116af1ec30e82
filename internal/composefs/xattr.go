package composefs

import (
	"encoding/binary"
	"strings"
)

// Overlayfs xattr names composefs writes or escapes.
const (
	wrOverlayPrefix        = "trusted.overlay."
	wrOverlayEscapedPrefix = "trusted.overlay.overlay."
	wrXattrMetacopy        = "trusted.overlay.metacopy"
	wrXattrRedirect        = "trusted.overlay.redirect"
	wrXattrOpaque          = "trusted.overlay.opaque"
	wrXattrEscWhiteout     = "trusted.overlay.overlay.whiteout"
	wrXattrEscWhiteouts    = "trusted.overlay.overlay.whiteouts"
	wrXattrEscOpaque       = "trusted.overlay.overlay.opaque"
	wrXattrUserWhiteout    = "user.overlay.whiteout"
	wrXattrUserWhiteouts   = "user.overlay.whiteouts"
	wrXattrUserOpaque      = "user.overlay.opaque"
	wrXattrACLAccess       = "system.posix_acl_access"
	wrXattrACLDefault      = "system.posix_acl_default"
)

// Limits mkcomposefs enforces on xattrs.
const (
	wrMaxXattrNameLen  = 255       // XATTR_NAME_MAX
	wrMaxXattrValueLen = 65535     // stored in a u16
	wrMaxXattrAccount  = 65535 / 2 // LCFS_INODE_EXTERNAL_XATTR_MAX, per inode
)

// EROFS xattr name filter parameters.
const (
	wrXattrFilterSeed = 0x25BBE08F
	wrXattrFilterBits = 32
)

// wrXattrPrefixes maps EROFS name indexes to their prefixes, in the order
// mkcomposefs tries them (the first match wins).
var wrXattrPrefixes = []struct {
	prefix string
	index  uint8
}{
	{"user.", 1},
	{wrXattrACLAccess, 2},
	{wrXattrACLDefault, 3},
	{"trusted.", 4},
	{"security.", 6},
}

// wrXattrIndex splits key into its EROFS name index and the stored suffix.
func wrXattrIndex(key string) (uint8, string) {
	for _, p := range wrXattrPrefixes {
		if strings.HasPrefix(key, p.prefix) {
			return p.index, key[len(p.prefix):]
		}
	}
	return 0, key
}

// wrXattrEntrySize is the size of one on-disk xattr entry, padded to 4.
func wrXattrEntrySize(x *Xattr) int {
	_, suffix := wrXattrIndex(x.Key)
	return wrRoundUp(4+len(suffix)+len(x.Value), 4)
}

// wrAppendXattrEntry appends the on-disk entry for x, padded to 4 bytes.
func wrAppendXattrEntry(b []byte, x *Xattr) []byte {
	index, suffix := wrXattrIndex(x.Key)
	start := len(b)
	b = append(b, uint8(len(suffix)), index, 0, 0)
	binary.LittleEndian.PutUint16(b[start+2:], uint16(len(x.Value)))
	b = append(b, suffix...)
	b = append(b, x.Value...)
	for (len(b)-start)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// wrXattrNameFilter is the EROFS per-inode bloom filter of xattr names: a
// bit is cleared for each name present.
func wrXattrNameFilter(xattrs []Xattr) uint32 {
	var bitsSet uint32
	var buf []byte
	for i := range xattrs {
		index, suffix := wrXattrIndex(xattrs[i].Key)
		buf = append(buf[:0], suffix...)
		bit := xxh32(buf, wrXattrFilterSeed+uint32(index)) & (wrXattrFilterBits - 1)
		bitsSet |= 1 << bit
	}
	return ^bitsSet
}

func wrRoundUp[T ~int | ~int64 | ~uint64 | ~uint32](x, align T) T {
	return (x + align - 1) / align * align
}
