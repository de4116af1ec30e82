package kmod

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"golang.org/x/sys/unix"
)

// moduleInitCompressedFile is MODULE_INIT_COMPRESSED_FILE (linux/module.h,
// 5.17+): the kernel decompresses the module itself, in the one format it
// was configured with (CONFIG_MODULE_COMPRESS_*).
const moduleInitCompressedFile = 4

// maxModuleSize bounds what we decompress into memory: the largest
// in-tree modules are a few tens of MB uncompressed.
const maxModuleSize = 256 << 20

// Result says how one module was loaded.
type Result struct {
	Path string
	How  string // "finit", "finit-compressed", "init-decompressed", "already-loaded"
	Err  error
}

// Load loads the module file at path. A module that is already loaded
// (EEXIST) is not an error.
func Load(path string) Result {
	r := Result{Path: path}
	f, err := os.Open(path)
	if err != nil {
		r.Err = fmt.Errorf("load module %s: %w", path, err)
		return r
	}
	defer f.Close()
	comp := compression(path)
	if comp == "" {
		r.How = "finit"
		r.Err = finit(f, 0)
	} else {
		// Let the kernel decompress when it can. Kernels without
		// CONFIG_MODULE_DECOMPRESS, or built for another format, refuse
		// with EOPNOTSUPP/EINVAL (before 5.17 the flag itself is EINVAL):
		// then decompress in Go. Other errors come from the module itself
		// (ENODEV: no such hardware) and are final.
		r.How = "finit-compressed"
		r.Err = finit(f, moduleInitCompressedFile)
		if errors.Is(r.Err, unix.EOPNOTSUPP) || errors.Is(r.Err, unix.EINVAL) || errors.Is(r.Err, unix.ENOSYS) {
			r.How = "init-decompressed"
			r.Err = initDecompressed(f, comp)
		}
	}
	if errors.Is(r.Err, unix.EEXIST) {
		r.How, r.Err = "already-loaded", nil
	}
	if r.Err != nil {
		r.Err = fmt.Errorf("load module %s: %w", path, r.Err)
	}
	return r
}

func compression(path string) string {
	for _, c := range []string{".xz", ".zst", ".gz"} {
		if strings.HasSuffix(path, c) {
			return c
		}
	}
	return ""
}

func finit(f *os.File, flags int) error {
	for {
		err := unix.FinitModule(int(f.Fd()), "", flags)
		if err != unix.EINTR {
			return err
		}
	}
}

func initDecompressed(f *os.File, comp string) error {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	img, err := readAllLimited(f, comp)
	if err != nil {
		return err
	}
	for {
		err := unix.InitModule(img, "")
		if err != unix.EINTR {
			return err
		}
	}
}

func readAllLimited(f io.Reader, comp string) ([]byte, error) {
	var buf bytes.Buffer
	err := withReader(f, comp, func(r io.Reader) error {
		n, err := io.Copy(&buf, io.LimitReader(r, maxModuleSize+1))
		if err != nil {
			return fmt.Errorf("decompress: %w", err)
		}
		if n > maxModuleSize {
			return fmt.Errorf("decompressed module is larger than %d bytes", maxModuleSize)
		}
		return nil
	})
	return buf.Bytes(), err
}

// Decompress returns the uncompressed content of a module file (for tests
// and for building initramfs images for kernels that cannot decompress).
func Decompress(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readAllLimited(f, compression(path))
}

func withReader(f io.Reader, comp string, fn func(io.Reader) error) error {
	switch comp {
	case ".xz":
		// ulikunitz/xz: pure Go (berth-init is static, no cgo) and already
		// in the module graph; Debian's .ko.xz use LZMA2 with a CRC32/CRC64
		// check, which it decodes (it lacks only the BCJ filters, unused here).
		xr, err := xz.NewReader(f)
		if err != nil {
			return fmt.Errorf("xz: %w", err)
		}
		return fn(xr)
	case ".zst":
		zr, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
		defer zr.Close()
		return fn(zr)
	case ".gz":
		gr, err := gzip.NewReader(f)
		if err != nil {
			return fmt.Errorf("gzip: %w", err)
		}
		return fn(gr)
	}
	return fn(f)
}
