package oci

import (
	"archive/tar"
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"runtime"
	"strings"
	"sync"
)

// Limits applied to every layer. They are far above what real images use
// and exist so that a hostile layer fails early with a clear error instead
// of exhausting memory, disk or time.
const (
	pathMax           = 4096    // PATH_MAX including the NUL
	nameMax           = 255     // NAME_MAX
	maxXattrsPerEntry = 128     // more than any filesystem keeps per inode
	maxXattrValue     = 65536   // XATTR_SIZE_MAX
	maxEntriesDefault = 4 << 20 // entries per layer
	// DefaultMaxFileSize is the largest regular file a layer may carry
	// unless PullOptions.MaxFileSize says otherwise.
	DefaultMaxFileSize = 64 << 30
	inlineMax          = 64 // composefs stores files of 1..64 bytes inline
)

// Entry kinds in a layer index.
const (
	KindFile     = "file"
	KindDir      = "dir"
	KindSymlink  = "symlink"
	KindHardlink = "hardlink"
	KindChar     = "char"
	KindBlock    = "block"
	KindFifo     = "fifo"
	KindWhiteout = "whiteout" // .wh.NAME: Path is the removed entry
	KindOpaque   = "opaque"   // .wh..wh..opq: Path is the opaque directory
)

// EntryXattr is one extended attribute of an Entry.
type EntryXattr struct {
	Key   string `json:"k"`
	Value []byte `json:"v"`
}

// Entry is one tar entry of a layer after validation, with its content
// already in the object store (Digest) or inline. A layer index is the list
// of a layer's entries, so a known layer can be applied without its blob.
type Entry struct {
	Path   string       `json:"path"` // relative, clean, no "." or ".." components
	Kind   string       `json:"kind"`
	Mode   uint32       `json:"mode,omitempty"` // permission bits (07777)
	UID    uint32       `json:"uid,omitempty"`
	GID    uint32       `json:"gid,omitempty"`
	Mtime  int64        `json:"mtime,omitempty"`
	Nsec   uint32       `json:"nsec,omitempty"`
	Size   uint64       `json:"size,omitempty"`
	Rdev   uint32       `json:"rdev,omitempty"`
	Target string       `json:"target,omitempty"` // symlink target, or hardlink's link path
	Digest string       `json:"digest,omitempty"` // hex fs-verity digest of external content
	Inline []byte       `json:"inline,omitempty"`
	Xattrs []EntryXattr `json:"xattrs,omitempty"`
}

// objectSink receives the content of regular files larger than the inline
// limit; *composefs.Batch satisfies it.
type objectSink interface {
	AddReader(r io.Reader) (digest []byte, size int64, err error)
}

// LayerError reports a layer that berth refuses; Path is the offending tar
// entry when there is one.
type LayerError struct {
	Path   string
	Reason string
}

func (e *LayerError) Error() string {
	if e.Path == "" {
		return "invalid layer: " + e.Reason
	}
	return fmt.Sprintf("invalid layer entry %q: %s", e.Path, e.Reason)
}

func layerErr(path, format string, args ...any) error {
	return &LayerError{Path: path, Reason: fmt.Sprintf(format, args...)}
}

type readLimits struct {
	maxFileSize int64
	maxEntries  int
	workers     int // parallel object writers; default GOMAXPROCS
}

// Files up to bufferedMax bytes are read into memory and stored by a pool
// of workers while the tar stream is read on, so hashing and file creation
// run in parallel with decompression and tar parsing; bigger files are
// streamed straight into the store. inFlightMax bounds the buffered bytes.
const (
	bufferedShift = 20
	bufferedMax   = 1 << bufferedShift
	inFlightMax   = 64 << 20
)

// readLayer parses an uncompressed layer tar, validates every entry and
// streams file contents into sink. It reads tr to the end of the archive
// but not beyond; the caller drains the rest for digest verification.
func readLayer(r io.Reader, sink objectSink, lim readLimits, onBytes func(int64)) ([]Entry, error) {
	if lim.maxFileSize <= 0 {
		lim.maxFileSize = DefaultMaxFileSize
	}
	if lim.maxEntries <= 0 {
		lim.maxEntries = maxEntriesDefault
	}
	if lim.workers <= 0 {
		lim.workers = runtime.GOMAXPROCS(0)
	}
	st := newStorer(sink, lim.workers)
	entries, err := parseLayer(r, st, lim, onBytes)
	if werr := st.wait(); err == nil {
		err = werr
	}
	if err != nil {
		return nil, err
	}
	out := make([]Entry, len(entries))
	for i, e := range entries {
		out[i] = *e
	}
	return out, nil
}

func parseLayer(r io.Reader, st *storer, lim readLimits, onBytes func(int64)) ([]*Entry, error) {
	tr := tar.NewReader(r)
	seen := map[string]struct{}{}
	var entries []*Entry
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return nil, fmt.Errorf("read layer tar: truncated layer: %w", err)
			}
			return nil, fmt.Errorf("read layer tar (after %d entries): %w", len(entries), err)
		}
		if len(entries) >= lim.maxEntries {
			return nil, layerErr("", "more than %d entries", lim.maxEntries)
		}
		e, err := entryFromHeader(hdr, lim)
		if err != nil {
			return nil, err
		}
		if e == nil { // ignored AUFS metadata
			continue
		}
		key := e.Kind + ":" + e.Path
		if e.Kind != KindWhiteout && e.Kind != KindOpaque {
			key = e.Path
		}
		if _, dup := seen[key]; dup {
			return nil, layerErr(e.Path, "duplicate entry in one layer")
		}
		seen[key] = struct{}{}
		if e.Kind == KindFile && e.Size > 0 {
			if err := readContent(tr, e, st); err != nil {
				return nil, err
			}
			if onBytes != nil {
				onBytes(int64(e.Size))
			}
		}
		entries = append(entries, e)
		if err := st.failed(); err != nil {
			return nil, err
		}
	}
	return entries, nil
}

func readContent(tr io.Reader, e *Entry, st *storer) error {
	if e.Size <= inlineMax {
		buf := make([]byte, e.Size)
		if _, err := io.ReadFull(tr, buf); err != nil {
			return fmt.Errorf("read %s: truncated layer: %w", e.Path, err)
		}
		e.Inline = buf
		return nil
	}
	if e.Size <= bufferedMax {
		buf := getBuf(int(e.Size))
		if _, err := io.ReadFull(tr, buf); err != nil {
			putBuf(buf)
			return fmt.Errorf("read %s: truncated layer: %w", e.Path, err)
		}
		st.submit(e, buf)
		return nil
	}
	digest, n, err := st.sink.AddReader(tr)
	if err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("read %s: truncated layer: %w", e.Path, err)
		}
		return fmt.Errorf("store content of %s: %w", e.Path, err)
	}
	if uint64(n) != e.Size {
		return fmt.Errorf("read %s: truncated layer: got %d of %d bytes", e.Path, n, e.Size)
	}
	e.Digest = hex.EncodeToString(digest)
	return nil
}

// storer adds buffered file contents to the sink from a pool of workers.
type storer struct {
	sink     objectSink
	jobs     chan storeJob
	wg       sync.WaitGroup
	mu       sync.Mutex
	cond     *sync.Cond
	inFlight int
	err      error
	closed   bool
}

type storeJob struct {
	e   *Entry
	buf []byte
}

func newStorer(sink objectSink, workers int) *storer {
	st := &storer{sink: sink, jobs: make(chan storeJob, 256)}
	st.cond = sync.NewCond(&st.mu)
	for range workers {
		st.wg.Add(1)
		go func() {
			defer st.wg.Done()
			for j := range st.jobs {
				st.store(j)
			}
		}()
	}
	return st
}

// bytesSink is an objectSink that takes content already in memory
// (*composefs.Batch: it hashes first and writes new content with one
// write, skipping content it already has).
type bytesSink interface {
	AddBytes(data []byte) (digest []byte, err error)
}

func (st *storer) store(j storeJob) {
	var digest []byte
	var err error
	if bs, ok := st.sink.(bytesSink); ok {
		digest, err = bs.AddBytes(j.buf)
	} else {
		var n int64
		digest, n, err = st.sink.AddReader(bytes.NewReader(j.buf))
		if err == nil && n != int64(len(j.buf)) {
			err = fmt.Errorf("stored %d of %d bytes", n, len(j.buf))
		}
	}
	size := len(j.buf)
	putBuf(j.buf) // neither sink keeps it
	st.mu.Lock()
	if err != nil && st.err == nil {
		st.err = fmt.Errorf("store content of %s: %w", j.e.Path, err)
	}
	st.inFlight -= size
	st.cond.Broadcast()
	st.mu.Unlock()
	if err == nil {
		j.e.Digest = hex.EncodeToString(digest)
	}
}

// File contents of up to bufferedMax bytes are read into buffers from
// pools by power-of-two size, so that a layer of many small files does
// not allocate (and the garbage collector clear) its whole size again.
const minBufShift = 7 // files of 65..128 bytes share the smallest class

var bufPools [bufferedShift + 1]sync.Pool

func bufClass(n int) int { return max(bits.Len(uint(n-1)), minBufShift) }

func getBuf(n int) []byte {
	c := bufClass(n)
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<c)
}

func putBuf(b []byte) {
	c := bufClass(cap(b))
	if cap(b) != 1<<c || c >= len(bufPools) {
		return
	}
	b = b[:cap(b)]
	bufPools[c].Put(&b)
}

// submit queues buf for storing, waiting while too much is buffered.
func (st *storer) submit(e *Entry, buf []byte) {
	st.mu.Lock()
	for st.inFlight > 0 && st.inFlight+len(buf) > inFlightMax && st.err == nil {
		st.cond.Wait()
	}
	st.inFlight += len(buf)
	st.mu.Unlock()
	st.jobs <- storeJob{e: e, buf: buf}
}

func (st *storer) failed() error {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.err
}

// wait finishes all queued work and returns the first error.
func (st *storer) wait() error {
	if !st.closed {
		st.closed = true
		close(st.jobs)
	}
	st.wg.Wait()
	return st.failed()
}

// cleanPath validates a tar entry name and returns it relative to the
// image root. Anything that is not a plain relative path is refused rather
// than rewritten: a layer that needs rewriting was not made by a build tool.
func cleanPath(name string) (string, error) {
	orig := name
	if strings.IndexByte(name, 0) >= 0 {
		return "", layerErr(orig, "name contains a NUL byte")
	}
	if len(name) >= pathMax {
		return "", layerErr(orig[:64]+"...", "name is %d bytes, longer than PATH_MAX (%d)", len(name), pathMax-1)
	}
	if strings.HasPrefix(name, "/") {
		return "", layerErr(orig, "absolute path")
	}
	name = strings.TrimPrefix(name, "./")
	name = strings.TrimRight(name, "/")
	if name == "" || name == "." {
		return "", nil // the root directory itself
	}
	var out []string
	for _, c := range strings.Split(name, "/") {
		switch c {
		case "", ".":
			continue
		case "..":
			return "", layerErr(orig, "path contains a \"..\" component")
		}
		if len(c) > nameMax {
			return "", layerErr(orig, "path component is %d bytes, longer than NAME_MAX (%d)", len(c), nameMax)
		}
		out = append(out, c)
	}
	return strings.Join(out, "/"), nil
}

func entryFromHeader(hdr *tar.Header, lim readLimits) (*Entry, error) {
	p, err := cleanPath(hdr.Name)
	if err != nil {
		return nil, err
	}
	e := &Entry{Path: p}
	dir, base := splitPath(p)
	if strings.HasPrefix(base, ".wh.") {
		switch {
		case base == ".wh..wh..opq":
			e.Kind, e.Path = KindOpaque, dir
			return e, nil
		case strings.HasPrefix(base, ".wh..wh."):
			return nil, nil // AUFS bookkeeping (.wh..wh.plnk etc.); not content
		}
		name := strings.TrimPrefix(base, ".wh.")
		if name == "." || name == ".." {
			return nil, layerErr(hdr.Name, "whiteout of %q", name)
		}
		e.Kind, e.Path = KindWhiteout, joinPath(dir, name)
		return e, nil
	}
	if p == "" && hdr.Typeflag != tar.TypeDir {
		return nil, layerErr(hdr.Name, "the image root must be a directory")
	}
	if hdr.Uid < 0 || int64(hdr.Uid) > 1<<32-1 || hdr.Gid < 0 || int64(hdr.Gid) > 1<<32-1 {
		return nil, layerErr(hdr.Name, "uid/gid %d/%d out of range", hdr.Uid, hdr.Gid)
	}
	e.Mode = uint32(hdr.Mode) & 0o7777
	e.UID, e.GID = uint32(hdr.Uid), uint32(hdr.Gid)
	mt := hdr.ModTime
	e.Mtime, e.Nsec = mt.Unix(), uint32(mt.Nanosecond())
	if e.Xattrs, err = paxXattrs(hdr); err != nil {
		return nil, err
	}
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeGNUSparse: // the reader already maps old TypeRegA entries to TypeReg
		e.Kind = KindFile
		if hdr.Size < 0 {
			return nil, layerErr(hdr.Name, "negative size")
		}
		if hdr.Size > lim.maxFileSize {
			return nil, layerErr(hdr.Name, "header claims %s, more than the limit of %s per file", humanBytes(hdr.Size), humanBytes(lim.maxFileSize))
		}
		e.Size = uint64(hdr.Size)
	case tar.TypeDir:
		e.Kind = KindDir
	case tar.TypeSymlink:
		e.Kind = KindSymlink
		if hdr.Linkname == "" {
			return nil, layerErr(hdr.Name, "symlink with an empty target")
		}
		if len(hdr.Linkname) >= pathMax || strings.IndexByte(hdr.Linkname, 0) >= 0 {
			return nil, layerErr(hdr.Name, "symlink target is too long or contains NUL")
		}
		// A symlink may point anywhere: it is resolved in the booted system,
		// never by berth while importing.
		e.Target = hdr.Linkname
	case tar.TypeLink:
		e.Kind = KindHardlink
		t, err := cleanPath(hdr.Linkname)
		if err != nil {
			return nil, layerErr(hdr.Name, "hardlink target %q: %v", hdr.Linkname, errReason(err))
		}
		if t == "" {
			return nil, layerErr(hdr.Name, "hardlink to the image root")
		}
		e.Target = t
	case tar.TypeChar, tar.TypeBlock:
		e.Kind = KindChar
		if hdr.Typeflag == tar.TypeBlock {
			e.Kind = KindBlock
		}
		if hdr.Devmajor < 0 || hdr.Devmajor > 0xfff || hdr.Devminor < 0 || hdr.Devminor > 0xfffff {
			return nil, layerErr(hdr.Name, "device number %d:%d out of range", hdr.Devmajor, hdr.Devminor)
		}
		maj, mnr := uint32(hdr.Devmajor), uint32(hdr.Devminor)
		e.Rdev = (mnr & 0xff) | (maj << 8) | ((mnr &^ 0xff) << 12) // new_encode_dev
	case tar.TypeFifo:
		e.Kind = KindFifo
	default:
		return nil, layerErr(hdr.Name, "unsupported tar entry type %q", string(hdr.Typeflag))
	}
	return e, nil
}

// paxXattrs collects SCHILY.xattr.* records (what docker, buildah and GNU
// tar write), including security.capability.
func paxXattrs(hdr *tar.Header) ([]EntryXattr, error) {
	var xs []EntryXattr
	for k, v := range hdr.PAXRecords {
		key, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		switch {
		case key == "", len(key) > 255, strings.IndexByte(key, 0) >= 0:
			return nil, layerErr(hdr.Name, "invalid xattr name %q", key)
		case !strings.HasPrefix(key, "user.") && !strings.HasPrefix(key, "security.") &&
			!strings.HasPrefix(key, "trusted.") && !strings.HasPrefix(key, "system."):
			return nil, layerErr(hdr.Name, "xattr %q is not in a Linux namespace", key)
		case len(v) > maxXattrValue:
			return nil, layerErr(hdr.Name, "xattr %q value is %d bytes, more than %d", key, len(v), maxXattrValue)
		}
		xs = append(xs, EntryXattr{Key: key, Value: []byte(v)})
	}
	if len(xs) > maxXattrsPerEntry {
		return nil, layerErr(hdr.Name, "%d xattrs, more than %d", len(xs), maxXattrsPerEntry)
	}
	sortXattrs(xs)
	return xs, nil
}

func sortXattrs(xs []EntryXattr) {
	for i := 1; i < len(xs); i++ {
		for j := i; j > 0 && xs[j].Key < xs[j-1].Key; j-- {
			xs[j], xs[j-1] = xs[j-1], xs[j]
		}
	}
}

func errReason(err error) string {
	var le *LayerError
	if errors.As(err, &le) {
		return le.Reason
	}
	return err.Error()
}

func splitPath(p string) (dir, base string) {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i], p[i+1:]
	}
	return "", p
}

func joinPath(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
