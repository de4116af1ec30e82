package composefs

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/berth-dev/berth/internal/fsverity"
)

// CreateOptions is what `berth composefs create` does, mirroring
// mkcomposefs: build a tree from a directory (or a dump file), optionally
// fill an object store with its external files, write the image.
type CreateOptions struct {
	Source      string // directory, or with FromFile a dump file ("-" = Stdin)
	FromFile    bool
	Output      string // image path, "-" = Stdout, "" = no image (digest only)
	DigestStore string // object store directory to fill, "" = none
	Write       WriteOptions
	Scan        ScanOptions // Store is set by Create when DigestStore is given
	Stdin       io.Reader
	Stdout      io.Writer
}

// Create builds the image described by opts and returns its composefs
// (SHA-256 fs-verity) digest. Objects are committed to the digest store
// before the image is written, so an image never names missing objects.
func Create(opts CreateOptions) ([]byte, error) {
	root, err := createTree(&opts)
	if err != nil {
		return nil, err
	}
	switch opts.Output {
	case "":
		return ImageDigest(root, opts.Write, fsverity.SHA256)
	case "-":
		if opts.Stdout == nil {
			return nil, errors.New("composefs create: no standard output to write the image to")
		}
		h := fsverity.New(fsverity.SHA256)
		if err := Write(io.MultiWriter(opts.Stdout, h), root, opts.Write); err != nil {
			return nil, err
		}
		return h.Sum(), nil
	default:
		return WriteImageFile(opts.Output, root, opts.Write)
	}
}

func createTree(opts *CreateOptions) (*Inode, error) {
	if opts.Source == "" {
		return nil, errors.New("composefs create: empty source path")
	}
	if opts.FromFile {
		if opts.DigestStore != "" {
			return nil, errors.New("composefs create: a digest store can only be filled from a directory (a dump file has no file contents)")
		}
		var r io.Reader = opts.Stdin
		if opts.Source != "-" {
			f, err := os.Open(opts.Source)
			if err != nil {
				return nil, fmt.Errorf("composefs create: %w", err)
			}
			defer f.Close()
			r = f
		} else if r == nil {
			return nil, errors.New("composefs create: no standard input to read the dump from")
		}
		return ParseDump(r)
	}
	if opts.DigestStore == "" {
		return ScanDir(opts.Source, opts.Scan)
	}
	alg := opts.Scan.Alg
	if alg == 0 {
		alg = fsverity.SHA256
	}
	st, err := OpenStore(opts.DigestStore, alg)
	if err != nil {
		return nil, fmt.Errorf("composefs create: %w", err)
	}
	b := st.NewBatch()
	scan := opts.Scan
	scan.Store = b
	root, err := ScanDir(opts.Source, scan)
	if err != nil {
		b.Abort()
		return nil, err
	}
	if err := b.Commit(); err != nil {
		return nil, fmt.Errorf("composefs create: %w", err)
	}
	return root, nil
}

// PathDigest returns, for a directory, the composefs digest of the image
// Create would write from it; for a regular file (an image, or any
// object), its SHA-256 fs-verity digest.
func PathDigest(path string, scan ScanOptions, w WriteOptions) (digest []byte, isDir bool, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, false, fmt.Errorf("composefs digest: %w", err)
	}
	if fi.IsDir() {
		root, err := ScanDir(path, scan)
		if err != nil {
			return nil, true, err
		}
		d, err := ImageDigest(root, w, fsverity.SHA256)
		return d, true, err
	}
	if !fi.Mode().IsRegular() {
		return nil, false, fmt.Errorf("composefs digest: %s is neither a directory nor a regular file", path)
	}
	d, err := fsverity.DigestFile(path, fsverity.SHA256)
	return d, false, err
}
