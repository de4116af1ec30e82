// Package fsverity computes fs-verity file digests in user space (the same
// value the kernel reports with FS_IOC_MEASURE_VERITY and `fsverity digest`
// prints) and wraps the kernel ioctls that enable and measure fs-verity.
//
// Only the parameters composefs uses are supported: 4096-byte Merkle tree
// blocks and no salt, with SHA-256 or SHA-512.
package fsverity

import (
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"fmt"
	"io"
	"strings"
)

// BlockSize is the Merkle tree block size (and data block size).
const BlockSize = 4096

// Algorithm is an fs-verity hash algorithm; values are the kernel's
// FS_VERITY_HASH_ALG_* numbers.
type Algorithm uint8

// Supported algorithms.
const (
	SHA256 Algorithm = 1
	SHA512 Algorithm = 2
)

// Size returns the digest size in bytes (0 for an unknown algorithm).
func (a Algorithm) Size() int {
	switch a {
	case SHA256:
		return sha256.Size
	case SHA512:
		return sha512.Size
	}
	return 0
}

// String returns "sha256" or "sha512".
func (a Algorithm) String() string {
	switch a {
	case SHA256:
		return "sha256"
	case SHA512:
		return "sha512"
	}
	return fmt.Sprintf("fsverity-alg-%d", uint8(a))
}

// ParseAlgorithm parses "sha256" or "sha512" (case-insensitive).
func ParseAlgorithm(s string) (Algorithm, error) {
	switch strings.ToLower(s) {
	case "sha256":
		return SHA256, nil
	case "sha512":
		return SHA512, nil
	}
	return 0, fmt.Errorf("unknown fs-verity hash algorithm %q (want sha256 or sha512)", s)
}

func (a Algorithm) valid() bool { return a == SHA256 || a == SHA512 }

// hashBlock writes the hash of one 4096-byte block to dst. Using the
// Sum functions keeps hashing free of allocations.
func (a Algorithm) hashBlock(dst, block []byte) {
	if a == SHA512 {
		s := sha512.Sum512(block)
		copy(dst, s[:])
		return
	}
	s := sha256.Sum256(block)
	copy(dst, s[:])
}

// level is one level of the Merkle tree under construction: a block being
// filled with the hashes of the blocks of the level below.
type level struct {
	buf   [BlockSize]byte
	fill  int    // bytes of buf in use
	count uint64 // hashes ever added to this level
}

// Hasher computes the fs-verity digest of a byte stream. It implements
// io.Writer; Sum returns the digest of everything written so far.
type Hasher struct {
	alg    Algorithm
	size   uint64
	data   [BlockSize]byte // the current partial data block
	fill   int
	levels []*level // levels[0] holds hashes of data blocks
	// zero[i] is the hash of a block at tree height i that covers only
	// zero data: zero[0] = hash of a zero data block, zero[1] = hash of a
	// full hash block of zero[0]s, and so on. Holes in sparse files are
	// hashed with these instead of reading and hashing zeros.
	zero [][]byte
	rbuf []byte // read buffer of ReadFile, kept across files
	// scratch is where Sum pads partial blocks, so Sum neither allocates
	// nor disturbs the state.
	scratch [BlockSize]byte
}

// New returns a Hasher for alg. It panics on an unknown algorithm, which
// is a programming error (parse user input with ParseAlgorithm).
func New(alg Algorithm) *Hasher {
	if !alg.valid() {
		panic(fmt.Sprintf("fsverity: unsupported algorithm %d", alg))
	}
	return &Hasher{alg: alg}
}

// Algorithm returns the hash algorithm of h.
func (h *Hasher) Algorithm() Algorithm { return h.alg }

// Size returns the number of bytes written so far.
func (h *Hasher) Size() uint64 { return h.size }

// Reset clears h so it can hash another stream, keeping its buffers.
func (h *Hasher) Reset() {
	h.size = 0
	h.fill = 0
	for _, l := range h.levels {
		l.fill = 0
		l.count = 0
	}
}

func (h *Hasher) level(i int) *level {
	for len(h.levels) <= i {
		h.levels = append(h.levels, &level{})
	}
	return h.levels[i]
}

// zeroHash returns the hash of an all-zero subtree at height i.
func (h *Hasher) zeroHash(i int) []byte {
	for len(h.zero) <= i {
		var block [BlockSize]byte
		if n := len(h.zero); n > 0 {
			hs := h.alg.Size()
			for off := 0; off+hs <= BlockSize; off += hs {
				copy(block[off:], h.zero[n-1])
			}
		}
		z := make([]byte, h.alg.Size())
		h.alg.hashBlock(z, block[:])
		h.zero = append(h.zero, z)
	}
	return h.zero[i]
}

// addHash appends one hash to tree level i, hashing the level's block into
// level i+1 as soon as it is full.
func (h *Hasher) addHash(i int, hash []byte) {
	l := h.level(i)
	copy(l.buf[l.fill:], hash)
	l.fill += len(hash)
	l.count++
	if l.fill+len(hash) > BlockSize {
		h.flushLevel(i)
	}
}

// flushLevel zero-pads level i's block, hashes it into level i+1 and
// empties it.
func (h *Hasher) flushLevel(i int) {
	l := h.levels[i]
	clear(l.buf[l.fill:])
	var sum [sha512.Size]byte
	hs := h.alg.Size()
	h.alg.hashBlock(sum[:hs], l.buf[:])
	l.fill = 0
	h.addHash(i+1, sum[:hs])
}

// addZeroRun adds n copies of the height-i zero hash to level i. Whole
// aligned blocks of them are replaced by one height-(i+1) zero hash, so a
// huge hole costs O(tree height) work rather than O(size).
func (h *Hasher) addZeroRun(i int, n uint64) {
	hs := h.alg.Size()
	perBlock := uint64(BlockSize / hs)
	z := h.zeroHash(i)
	for n > 0 {
		l := h.level(i)
		if l.fill == 0 && n >= perBlock {
			full := n / perBlock
			l.count += full * perBlock
			n -= full * perBlock
			h.addZeroRun(i+1, full)
			continue
		}
		h.addHash(i, z)
		n--
	}
}

// Write adds p to the stream. It never fails.
func (h *Hasher) Write(p []byte) (int, error) {
	n := len(p)
	h.size += uint64(n)
	var sum [sha512.Size]byte
	hs := h.alg.Size()
	if h.fill > 0 {
		c := copy(h.data[h.fill:], p)
		h.fill += c
		p = p[c:]
		if h.fill < BlockSize {
			return n, nil
		}
		h.alg.hashBlock(sum[:hs], h.data[:])
		h.addHash(0, sum[:hs])
		h.fill = 0
	}
	// Hash whole blocks straight from p, without copying.
	for len(p) >= BlockSize {
		h.alg.hashBlock(sum[:hs], p[:BlockSize])
		h.addHash(0, sum[:hs])
		p = p[BlockSize:]
	}
	h.fill = copy(h.data[:], p)
	return n, nil
}

// WriteZeros adds n zero bytes to the stream without hashing them block
// by block: whole zero blocks use precomputed subtree hashes.
func (h *Hasher) WriteZeros(n uint64) {
	var zeros [BlockSize]byte
	if h.fill > 0 {
		c := min(uint64(BlockSize-h.fill), n)
		h.Write(zeros[:c])
		n -= c
	}
	if blocks := n / BlockSize; blocks > 0 {
		h.size += blocks * BlockSize
		h.addZeroRun(0, blocks)
		n -= blocks * BlockSize
	}
	if n > 0 {
		h.Write(zeros[:n])
	}
}

// Sum returns the fs-verity file digest of the data written so far. It
// does not change h; writing may continue afterwards. It allocates only
// the returned digest.
func (h *Hasher) Sum() []byte {
	hs := h.alg.Size()
	var root [sha512.Size]byte // an empty file has an all-zero root hash
	if h.size > 0 {
		// Walk up the tree with one pending hash ("carry") that would be
		// appended to each level: the partial data block first, then each
		// partial hash block in turn. The first level that would hold
		// exactly one hash holds the root hash.
		var carry [sha512.Size]byte
		hasCarry := false
		if h.fill > 0 {
			copy(h.scratch[:], h.data[:h.fill])
			clear(h.scratch[h.fill:])
			h.alg.hashBlock(carry[:hs], h.scratch[:])
			hasCarry = true
		}
		for i := 0; ; i++ {
			if i > 64 {
				panic("fsverity: Merkle tree walk did not reach a root")
			}
			var l *level
			if i < len(h.levels) {
				l = h.levels[i]
			} else {
				l = &level{}
			}
			count := l.count
			if hasCarry {
				count++
			}
			if count == 1 {
				if hasCarry {
					copy(root[:], carry[:hs])
				} else {
					copy(root[:], l.buf[:hs])
				}
				break
			}
			if l.fill == 0 && !hasCarry {
				continue // everything at this level was already pushed up
			}
			copy(h.scratch[:], l.buf[:l.fill])
			n := l.fill
			if hasCarry {
				copy(h.scratch[n:], carry[:hs])
				n += hs
			}
			clear(h.scratch[n:])
			h.alg.hashBlock(carry[:hs], h.scratch[:])
			hasCarry = true
		}
	}
	return descriptorDigest(h.alg, h.size, root[:hs])
}

// descriptorDigest hashes the 256-byte fs_verity_descriptor.
func descriptorDigest(alg Algorithm, size uint64, root []byte) []byte {
	var d [256]byte
	d[0] = 1 // version
	d[1] = byte(alg)
	d[2] = 12 // log2(block size)
	d[3] = 0  // salt size
	// d[4:8] reserved
	binary.LittleEndian.PutUint64(d[8:16], size)
	copy(d[16:80], root) // root_hash[64]
	// salt[32] and reserved[144] stay zero
	if alg == SHA512 {
		s := sha512.Sum512(d[:])
		return s[:]
	}
	s := sha256.Sum256(d[:])
	return s[:]
}

// Digest returns the fs-verity digest of everything read from r.
func Digest(r io.Reader, alg Algorithm) ([]byte, error) {
	if !alg.valid() {
		return nil, fmt.Errorf("fs-verity digest: unsupported algorithm %d", alg)
	}
	h := New(alg)
	buf := make([]byte, 64*BlockSize)
	if _, err := io.CopyBuffer(h, r, buf); err != nil {
		return nil, fmt.Errorf("fs-verity digest: %w", err)
	}
	return h.Sum(), nil
}
