package fsverity

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// readBufSize is the read size for file hashing: large enough to keep
// syscall overhead small, small enough to stay in cache.
const readBufSize = 128 * 1024

// DigestFile returns the fs-verity digest of the file at path. Holes in
// sparse files are found with SEEK_DATA/SEEK_HOLE and hashed with
// precomputed zero-subtree hashes instead of being read.
func DigestFile(path string, alg Algorithm) ([]byte, error) {
	if !alg.valid() {
		return nil, fmt.Errorf("fs-verity digest %s: unsupported algorithm %d", path, alg)
	}
	// O_NONBLOCK: opening a FIFO must not wait for a writer.
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("fs-verity digest: %w", err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("fs-verity digest: stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("fs-verity digest %s: not a regular file", path)
	}
	h := New(alg)
	if err := h.ReadFile(f, st.Size, st.Blocks*512 < st.Size); err != nil {
		return nil, err
	}
	return h.Sum(), nil
}

// ReadFile resets h and hashes the first size bytes of f using positional
// reads (the file offset is not used). When sparse is true, holes are
// located with SEEK_DATA/SEEK_HOLE and not read; callers pass
// st_blocks*512 < st_size so dense files skip the extra syscalls. It fails
// if f is shorter than size. h keeps its read buffer, so reusing one
// Hasher for many files does not allocate per file.
func (h *Hasher) ReadFile(f *os.File, size int64, sparse bool) error {
	return h.ReadFd(int(f.Fd()), f.Name(), size, sparse)
}

// ReadFd is ReadFile on a raw file descriptor; name is used in errors.
func (h *Hasher) ReadFd(fd int, name string, size int64, sparse bool) error {
	h.Reset()
	if h.rbuf == nil {
		h.rbuf = make([]byte, readBufSize)
	}
	var off int64
	for off < size {
		dataEnd := size
		if sparse {
			data, err := unix.Seek(fd, off, unix.SEEK_DATA)
			switch {
			case errors.Is(err, unix.ENXIO):
				data = size // only a hole remains
			case errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP):
				sparse = false // no hole support: read everything
				data = off
			case err != nil:
				return fmt.Errorf("fs-verity digest %s: seek data: %w", name, err)
			}
			data = min(data, size)
			if data > off {
				h.WriteZeros(uint64(data - off))
				off = data
				if off >= size {
					break
				}
			}
			if sparse {
				hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
				if err != nil {
					return fmt.Errorf("fs-verity digest %s: seek hole: %w", name, err)
				}
				dataEnd = min(hole, size)
			}
		}
		for off < dataEnd {
			want := min(int64(len(h.rbuf)), dataEnd-off)
			n, err := unix.Pread(fd, h.rbuf[:want], off)
			if err != nil {
				if errors.Is(err, unix.EINTR) {
					continue
				}
				return fmt.Errorf("fs-verity digest %s: read: %w", name, err)
			}
			if n == 0 {
				return fmt.Errorf("fs-verity digest %s: file shrank while hashing (read %d of %d bytes)", name, off, size)
			}
			h.Write(h.rbuf[:n])
			off += int64(n)
		}
	}
	return nil
}
