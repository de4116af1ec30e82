package kmod

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// moduleInitCompressedFile is MODULE_INIT_COMPRESSED_FILE (linux/module.h,
// 5.17+): the kernel decompresses the module itself, in the one format it
// was configured with (CONFIG_MODULE_COMPRESS_*).
const moduleInitCompressedFile = 4

// Result says how one module was loaded.
type Result struct {
	Path string
	How  string // "finit", "finit-compressed", "already-loaded"
	Err  error
}

// Load loads the module file at path with finit_module. A compressed
// module (.ko.xz, .ko.zst, .ko.gz) is decompressed by the kernel: berth's
// initramfs builder keeps modules compressed only when the kernel's
// configuration says it can, and stores them uncompressed otherwise, so
// berth-init carries no decompressors. A module that is already loaded
// (EEXIST) is not an error.
func Load(path string) Result {
	r := Result{Path: path, How: "finit"}
	f, err := os.Open(path)
	if err != nil {
		r.Err = fmt.Errorf("load module %s: %w", path, err)
		return r
	}
	defer f.Close()
	flags := 0
	if Compressed(path) {
		r.How, flags = "finit-compressed", moduleInitCompressedFile
	}
	r.Err = finit(f, flags)
	switch {
	case errors.Is(r.Err, unix.EEXIST):
		r.How, r.Err = "already-loaded", nil
	case r.Err != nil && flags != 0 && (errors.Is(r.Err, unix.EOPNOTSUPP) || errors.Is(r.Err, unix.EINVAL) || errors.Is(r.Err, unix.ENOSYS)):
		r.Err = fmt.Errorf("load module %s: the running kernel cannot decompress it (%w); rebuild the initramfs for this kernel (berth initramfs build stores modules uncompressed when the kernel's config lacks CONFIG_MODULE_DECOMPRESS for their format)", path, r.Err)
	case r.Err != nil:
		r.Err = fmt.Errorf("load module %s: %w", path, r.Err)
	}
	return r
}

// Compressed reports whether a module path names a compressed module.
func Compressed(path string) bool { return CompressionOf(path) != "" }

// CompressionOf returns the compression suffix of a module path (".xz",
// ".zst", ".gz"), or "".
func CompressionOf(path string) string {
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
