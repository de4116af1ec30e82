package fsutil

import (
	"fmt"
	"io"
	"io/fs"
)

// ReadFileFS reads the regular file name from fsys, refusing anything else
// (a device, a directory, a link the fs.FS does not follow) and anything
// larger than limit bytes, also when it grows while being read. Image trees
// are hostile input: this is how berth reads a kernel, a stub or
// os-release out of one.
func ReadFileFS(fsys fs.FS, name string, limit int64) ([]byte, error) {
	fi, err := fs.Stat(fsys, name)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%s is not a regular file (%s)", name, fi.Mode().Type())
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("%s is %d bytes, more than the %d-byte limit", name, fi.Size(), limit)
	}
	f, err := fsys.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s grew beyond the %d-byte limit", name, limit)
	}
	return b, nil
}
