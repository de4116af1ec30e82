package fsverity

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

var (
	// ErrNotSupported is wrapped when the filesystem or the running kernel
	// lacks fs-verity (EOPNOTSUPP, ENOTTY).
	ErrNotSupported = errors.New("the filesystem or kernel lacks fs-verity support")
	// ErrNotEnabled is wrapped by Measure when the file has no fs-verity.
	ErrNotEnabled = errors.New("fs-verity is not enabled on the file")
)

// notSupported reports whether errno means "no fs-verity here": ENOTTY
// from filesystems without the ioctl, EOPNOTSUPP from ones built without
// CONFIG_FS_VERITY or mounted without the feature.
func notSupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY)
}

// Enable turns on fs-verity for f (FS_IOC_ENABLE_VERITY) with 4096-byte
// blocks and no salt. f must be open read-only with no writers. A file
// that already has fs-verity with the same algorithm is not an error.
func Enable(f *os.File, alg Algorithm) error {
	if !alg.valid() {
		return fmt.Errorf("enable fs-verity on %s: unsupported algorithm %d", f.Name(), alg)
	}
	arg := unix.FsverityEnableArg{
		Version:        1,
		Hash_algorithm: uint32(alg),
		Block_size:     BlockSize,
	}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.FS_IOC_ENABLE_VERITY, uintptr(unsafe.Pointer(&arg)))
	switch {
	case errno == 0:
		return nil
	case errno == unix.EEXIST:
		got, _, err := Measure(f)
		if err != nil {
			return fmt.Errorf("enable fs-verity on %s: already enabled, but: %w", f.Name(), err)
		}
		if got != alg {
			return fmt.Errorf("enable fs-verity on %s: already enabled with %s, want %s", f.Name(), got, alg)
		}
		return nil
	case notSupported(errno):
		return fmt.Errorf("enable fs-verity on %s: %w (%w)", f.Name(), ErrNotSupported, errno)
	case errno == unix.ETXTBSY:
		return fmt.Errorf("enable fs-verity on %s: file is open for writing (%v)", f.Name(), errno)
	}
	return fmt.Errorf("enable fs-verity on %s: %w", f.Name(), errno)
}

// Measure returns the algorithm and digest of f's fs-verity
// (FS_IOC_MEASURE_VERITY). It wraps ErrNotEnabled when f has no fs-verity
// and ErrNotSupported when the filesystem or kernel lacks it.
func Measure(f *os.File) (Algorithm, []byte, error) {
	// struct fsverity_digest { u16 alg; u16 size; u8 digest[]; }
	const maxDigest = 64
	var buf struct {
		hdr    unix.FsverityDigest
		digest [maxDigest]byte
	}
	buf.hdr.Size = maxDigest
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.FS_IOC_MEASURE_VERITY, uintptr(unsafe.Pointer(&buf)))
	switch {
	case errno == 0:
	case errno == unix.ENODATA:
		return 0, nil, fmt.Errorf("measure fs-verity of %s: %w", f.Name(), ErrNotEnabled)
	case notSupported(errno):
		return 0, nil, fmt.Errorf("measure fs-verity of %s: %w (%w)", f.Name(), ErrNotSupported, errno)
	default:
		return 0, nil, fmt.Errorf("measure fs-verity of %s: %w", f.Name(), errno)
	}
	alg := Algorithm(buf.hdr.Algorithm)
	n := int(buf.hdr.Size)
	if n > maxDigest || (alg.valid() && n != alg.Size()) {
		return 0, nil, fmt.Errorf("measure fs-verity of %s: kernel returned a %d-byte digest for algorithm %d", f.Name(), n, buf.hdr.Algorithm)
	}
	return alg, append([]byte(nil), buf.digest[:n]...), nil
}
