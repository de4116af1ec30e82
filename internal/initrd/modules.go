package initrd

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/berth-dev/berth/internal/kmod"
)

// maxConfig bounds a kernel config or module metadata file read from the image.
const maxConfig = 16 << 20

// kernelModuleDecompression returns the module compression suffix the
// image's kernel decompresses itself (finit_module with
// MODULE_INIT_COMPRESSED_FILE: CONFIG_MODULE_DECOMPRESS=y, one format per
// kernel), read from its config (/boot/config-<kver> on Debian and
// Ubuntu, /usr/lib/modules/<kver>/config on Fedora and Arch). "" when the
// kernel cannot, or its config is not in the image: then every module is
// stored uncompressed, which every kernel loads.
func kernelModuleDecompression(fsys fs.FS, modDir, kver string) string {
	for _, p := range []string{"boot/config-" + kver, path.Join(modDir, "config")} {
		f, err := fsys.Open(p)
		if err != nil {
			continue
		}
		cfg := map[string]bool{}
		sc := bufio.NewScanner(io.LimitReader(f, maxConfig))
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), "="); ok && v == "y" {
				cfg[k] = true
			}
		}
		f.Close()
		if !cfg["CONFIG_MODULE_DECOMPRESS"] {
			return ""
		}
		switch {
		case cfg["CONFIG_MODULE_COMPRESS_XZ"]:
			return ".xz"
		case cfg["CONFIG_MODULE_COMPRESS_ZSTD"]:
			return ".zst"
		case cfg["CONFIG_MODULE_COMPRESS_GZIP"]:
			return ".gz"
		}
		return ""
	}
	return ""
}

// decompressModule decompresses a module file (.xz, .zst, .gz) at build
// time, bounded (the image is untrusted).
func decompressModule(data []byte, comp string) ([]byte, error) {
	var r io.Reader
	switch comp {
	case ".xz":
		// Pure Go; Debian's .ko.xz use LZMA2 with a CRC32/CRC64 check.
		xr, err := xz.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("xz: %w", err)
		}
		r = xr
	case ".zst":
		zr, err := zstd.NewReader(bytes.NewReader(data), zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("zstd: %w", err)
		}
		defer zr.Close()
		r = zr
	case ".gz":
		gr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("gzip: %w", err)
		}
		r = gr
	default:
		return data, nil
	}
	var buf bytes.Buffer
	n, err := io.Copy(&buf, io.LimitReader(r, maxModule*4+1))
	if err != nil {
		return nil, err
	}
	if n > maxModule*4 {
		return nil, fmt.Errorf("larger than %d bytes decompressed", maxModule*4)
	}
	return buf.Bytes(), nil
}

// filterModuleLines keeps the lines of modules.alias ("alias PATTERN
// MODULE") and modules.softdep ("softdep MODULE pre: … post: …") that
// concern a module in the archive, sorted.
func filterModuleLines(fsys fs.FS, name string, inside map[string]bool) []byte {
	f, err := fsys.Open(name)
	if err != nil {
		return nil
	}
	defer f.Close()
	var b bytes.Buffer
	sc := bufio.NewScanner(io.LimitReader(f, maxConfig))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		switch {
		case len(fl) == 3 && fl[0] == "alias" && inside[kmod.Name(fl[2])]:
		case len(fl) >= 3 && fl[0] == "softdep" && inside[kmod.Name(fl[1])]:
		default:
			continue
		}
		b.WriteString(strings.Join(fl, " ") + "\n")
	}
	return sortedLines(b.Bytes())
}
