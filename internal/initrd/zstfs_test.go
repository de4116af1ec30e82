package initrd

import (
	"bytes"
	"io/fs"
	"os"
	"strings"
	"testing/fstest"
	"time"

	"github.com/klauspost/compress/zstd"
)

// zstdModulesFS presents an image root whose modules are .ko.zst instead of
// .ko.xz (recompressed on the fly), to exercise the builder storing them
// uncompressed for a kernel that decompresses only xz itself.
type zstdModulesFS struct {
	base   fs.FS
	osRoot string // host path of base, to read the .ko.xz
}

func (z zstdModulesFS) Open(name string) (fs.File, error) {
	switch {
	case strings.HasSuffix(name, "/modules.dep"):
		b, err := fs.ReadFile(z.base, name)
		if err != nil {
			return nil, err
		}
		return single(name, bytes.ReplaceAll(b, []byte(".ko.xz"), []byte(".ko.zst")))
	case strings.HasSuffix(name, ".ko.zst"):
		xzData, err := os.ReadFile(z.osRoot + "/" + strings.TrimSuffix(name, ".zst") + ".xz")
		if err != nil {
			return nil, err
		}
		raw, err := decompressModule(xzData, ".xz")
		if err != nil {
			return nil, err
		}
		var buf bytes.Buffer
		zw, _ := zstd.NewWriter(&buf, zstd.WithEncoderConcurrency(1))
		zw.Write(raw)
		zw.Close()
		return single(name, buf.Bytes())
	}
	return z.base.Open(name)
}

func single(name string, data []byte) (fs.File, error) {
	return fstest.MapFS{name: {Data: data, Mode: 0o644, ModTime: time.Unix(0, 0)}}.Open(name)
}
