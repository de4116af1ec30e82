package initrd

import (
	"bytes"
	"io/fs"
	"strings"
	"testing/fstest"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/berth-dev/berth/internal/kmod"
)

// zstdModulesFS presents an image root whose modules are .ko.zst instead of
// .ko.xz (recompressed on the fly), to exercise berth-init's own
// decompression on a kernel that decompresses only xz itself.
type zstdModulesFS struct {
	base   fs.FS
	osRoot string // host path of base, for kmod.Decompress
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
		raw, err := kmod.Decompress(z.osRoot + "/" + strings.TrimSuffix(name, ".zst") + ".xz")
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
