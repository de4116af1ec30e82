package composefs

import (
	"encoding/binary"
	"math/bits"
)

// XXH32 constants (xxHash specification).
const (
	wrXxPrime1 uint32 = 2654435761
	wrXxPrime2 uint32 = 2246822519
	wrXxPrime3 uint32 = 3266489917
	wrXxPrime4 uint32 = 668265263
	wrXxPrime5 uint32 = 374761393
)

func wrXxRound(acc, input uint32) uint32 {
	acc += input * wrXxPrime2
	acc = bits.RotateLeft32(acc, 13)
	return acc * wrXxPrime1
}

// xxh32 is the standard 32-bit xxHash of b with the given seed. EROFS
// uses it for the per-inode xattr name bloom filter.
func xxh32(b []byte, seed uint32) uint32 {
	n := len(b)
	var h uint32
	if n >= 16 {
		v1 := seed + wrXxPrime1 + wrXxPrime2
		v2 := seed + wrXxPrime2
		v3 := seed
		v4 := seed - wrXxPrime1
		for len(b) >= 16 {
			v1 = wrXxRound(v1, binary.LittleEndian.Uint32(b[0:]))
			v2 = wrXxRound(v2, binary.LittleEndian.Uint32(b[4:]))
			v3 = wrXxRound(v3, binary.LittleEndian.Uint32(b[8:]))
			v4 = wrXxRound(v4, binary.LittleEndian.Uint32(b[12:]))
			b = b[16:]
		}
		h = bits.RotateLeft32(v1, 1) + bits.RotateLeft32(v2, 7) + bits.RotateLeft32(v3, 12) + bits.RotateLeft32(v4, 18)
	} else {
		h = seed + wrXxPrime5
	}
	h += uint32(n)
	for len(b) >= 4 {
		h += binary.LittleEndian.Uint32(b) * wrXxPrime3
		h = bits.RotateLeft32(h, 17) * wrXxPrime4
		b = b[4:]
	}
	for _, c := range b {
		h += uint32(c) * wrXxPrime5
		h = bits.RotateLeft32(h, 11) * wrXxPrime1
	}
	h ^= h >> 15
	h *= wrXxPrime2
	h ^= h >> 13
	h *= wrXxPrime3
	h ^= h >> 16
	return h
}
