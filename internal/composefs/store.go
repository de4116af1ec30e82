package composefs

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/fsverity"
	"golang.org/x/sys/unix"
)

// Store is a content-addressed object store: every object is a regular
// file named by its fs-verity digest, at Dir()/XX/<rest of hex>. It is the
// data-only lower layer of composefs mounts. See docs/on-disk-format.md,
// "Object store", for the durability argument.
type Store struct {
	dir string
	alg fsverity.Algorithm

	// verity records what enabling fs-verity on new objects gave:
	// verityUnknown until a Commit tried, then enabled or unsupported.
	verity atomic.Int32
}

const (
	verityUnknown int32 = iota
	verityEnabled
	verityUnsupported
)

// tmpPrefix starts the name of every temporary entry in a store; nothing
// else in a store starts with a dot, so a cleanup can remove them all.
const tmpPrefix = ".tmp"

// OpenStore opens the object store at dir, creating it (and its parents)
// if needed. alg is the digest algorithm objects are named by.
func OpenStore(dir string, alg fsverity.Algorithm) (*Store, error) {
	if alg != fsverity.SHA256 && alg != fsverity.SHA512 {
		return nil, fmt.Errorf("open object store %s: unsupported digest algorithm %d", dir, alg)
	}
	if err := fsutil.MkdirAllSync(dir, 0o755); err != nil {
		return nil, fmt.Errorf("open object store: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("open object store: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("open object store %s: not a directory", dir)
	}
	return &Store{dir: dir, alg: alg}, nil
}

// Dir returns the store directory.
func (s *Store) Dir() string { return s.dir }

// Algorithm returns the digest algorithm objects are named by.
func (s *Store) Algorithm() fsverity.Algorithm { return s.alg }

// Path returns where the object with digest lives (whether or not it exists).
func (s *Store) Path(digest []byte) string {
	return filepath.Join(s.dir, PayloadPath(digest))
}

// Has reports whether the object with digest exists.
func (s *Store) Has(digest []byte) bool {
	if len(digest) != s.alg.Size() {
		return false
	}
	fi, err := os.Lstat(s.Path(digest))
	return err == nil && fi.Mode().IsRegular()
}

// VerityUnsupported reports whether enabling fs-verity on a committed
// object failed because the filesystem or kernel lacks fs-verity. Objects
// of such a store can only be mounted without verity=require.
func (s *Store) VerityUnsupported() bool { return s.verity.Load() == verityUnsupported }

// VerityEnabled reports whether fs-verity was enabled on objects this
// Store committed.
func (s *Store) VerityEnabled() bool { return s.verity.Load() == verityEnabled }

// ProbeVerity tries fs-verity on a scratch file in the store and returns
// nil when it works, an error wrapping fsverity.ErrNotSupported when the
// filesystem or kernel lacks it, or another error.
func (s *Store) ProbeVerity() error {
	f, err := os.CreateTemp(s.dir, tmpPrefix+"-probe-")
	if err != nil {
		return fmt.Errorf("probe fs-verity in %s: %w", s.dir, err)
	}
	name := f.Name()
	defer os.Remove(name)
	_, werr := f.Write([]byte("berth fs-verity probe\n"))
	if err := f.Close(); err != nil || werr != nil {
		return fmt.Errorf("probe fs-verity in %s: %w", s.dir, errors.Join(werr, err))
	}
	r, err := os.Open(name)
	if err != nil {
		return fmt.Errorf("probe fs-verity in %s: %w", s.dir, err)
	}
	defer r.Close()
	if err := fsverity.Enable(r, s.alg); err != nil {
		if errors.Is(err, fsverity.ErrNotSupported) {
			s.verity.Store(verityUnsupported)
		}
		return fmt.Errorf("probe fs-verity in %s: %w", s.dir, err)
	}
	s.verity.Store(verityEnabled)
	return nil
}

// CleanupTemps removes the temporary entries (".tmp*") that an
// interrupted batch left in the store and that were last modified before
// olderThan ago (0 removes all of them: only when no batch is running).
// It returns how many it removed.
func (s *Store) CleanupTemps(olderThan time.Duration) (int, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return 0, fmt.Errorf("clean object store %s: %w", s.dir, err)
	}
	cutoff := time.Now().Add(-olderThan)
	n := 0
	var errs []error
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), tmpPrefix) {
			continue
		}
		if olderThan > 0 {
			fi, err := e.Info()
			if err != nil || fi.ModTime().After(cutoff) {
				continue
			}
		}
		if err := os.RemoveAll(filepath.Join(s.dir, e.Name())); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	if len(errs) > 0 {
		return n, fmt.Errorf("clean object store %s: %w", s.dir, errors.Join(errs...))
	}
	return n, nil
}

// Batch adds objects to a store. Files are written in a private staging
// directory (Dir()/.tmp-batch-*), under XX/<rest of hex> as in the store
// itself once their digest is known; Commit makes them durable with one
// syncfs, moves them into place and syncs again, so no per-object fsync is
// needed and a named object is always complete after any crash. A Batch is
// safe for concurrent use; it is spent after Commit or Abort.
type Batch struct {
	store *Store

	mu      sync.Mutex
	staging string             // created on first use
	buckets map[string]bool    // staging/XX directories made
	pending map[string]pending // by hex digest
	seq     int
	done    bool
	broken  error // a failed addition left a file in staging: Commit refuses
}

type pending struct {
	tmp    string // absolute path in staging: staging/XX/<rest>
	digest []byte
	check  bool // digest came from the caller: measure after enabling verity
}

// NewBatch starts a batch of additions to s.
func (s *Store) NewBatch() *Batch {
	return &Batch{store: s, pending: map[string]pending{}, buckets: map[string]bool{}}
}

// Len returns the number of new objects waiting for Commit.
func (b *Batch) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.pending)
}

// stagingLocked creates the staging directory on first use; b.mu is held.
func (b *Batch) stagingLocked() error {
	if b.done {
		return errors.New("object store batch already committed or aborted")
	}
	if b.staging != "" {
		return nil
	}
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return err
	}
	dir := filepath.Join(b.store.dir, tmpPrefix+"-batch-"+hex.EncodeToString(rnd[:]))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fmt.Errorf("create staging directory: %w", err)
	}
	b.staging = dir
	return nil
}

// claim reserves digest for the caller, who must then create the staged
// file at the returned path (or call unclaim). It returns "" when the
// object is already in the store or in the batch: nothing to write.
func (b *Batch) claim(digest []byte, check bool) (string, error) {
	b.mu.Lock()
	done := b.done
	b.mu.Unlock()
	if done {
		return "", errors.New("object store batch already committed or aborted")
	}
	if b.store.Has(digest) {
		return "", nil
	}
	h := hex.EncodeToString(digest)
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.stagingLocked(); err != nil {
		return "", err
	}
	if _, ok := b.pending[h]; ok {
		return "", nil
	}
	bucket := filepath.Join(b.staging, h[:2])
	if !b.buckets[h[:2]] {
		if err := os.Mkdir(bucket, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("create staging directory: %w", err)
		}
		// It may become the store's XX directory: 0755 whatever the umask.
		if err := os.Chmod(bucket, 0o755); err != nil {
			return "", fmt.Errorf("create staging directory: %w", err)
		}
		b.buckets[h[:2]] = true
	}
	p := filepath.Join(bucket, h[2:])
	b.pending[h] = pending{tmp: p, digest: digest, check: check}
	return p, nil
}

// unclaim removes the staged file of a claim that could not be written
// and drops the claim. Should the partial file stay, Commit refuses: the
// whole staging bucket may be moved into the store.
func (b *Batch) unclaim(digest []byte, tmp string) {
	err := unix.Unlink(tmp)
	b.mu.Lock()
	delete(b.pending, hex.EncodeToString(digest))
	if err != nil && err != unix.ENOENT && b.broken == nil {
		b.broken = fmt.Errorf("remove partial object %s: %w", tmp, err)
	}
	b.mu.Unlock()
}

// scratch returns a fresh path in the staging directory for content whose
// digest is not known yet.
func (b *Batch) scratch() (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.stagingLocked(); err != nil {
		return "", err
	}
	b.seq++
	return filepath.Join(b.staging, tmpPrefix+strconv.Itoa(b.seq)), nil
}

// AddFile adds the regular file src as the object named digest, which the
// caller computed (it is checked against the kernel's measurement when
// fs-verity gets enabled). The copy is a reflink when the filesystem can
// share extents, else copy_file_range, else a plain copy. Objects already
// in the store or in the batch are skipped.
func (b *Batch) AddFile(src string, digest []byte) error {
	if len(digest) != b.store.alg.Size() {
		return fmt.Errorf("add %s to object store: digest has %d bytes, want %d for %s", src, len(digest), b.store.alg.Size(), b.store.alg)
	}
	tmp, err := b.claim(digest, true)
	if err != nil {
		return fmt.Errorf("add %s to object store: %w", src, err)
	}
	if tmp == "" {
		return nil
	}
	if err := copyToTemp(src, tmp); err != nil {
		b.unclaim(digest, tmp)
		return fmt.Errorf("add %s to object store: %w", src, err)
	}
	return nil
}

// objectMode is the mode of every object: world-readable, so that the
// composefs mount can serve it to any user.
const objectMode = 0o644

// createObjectFile creates path exclusively with objectMode and returns
// its descriptor. It uses the raw system calls: an os.File would register
// every regular file with the poller and cost several fcntl and epoll
// calls per object.
func createObjectFile(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_CLOEXEC, objectMode)
	if err != nil {
		return -1, &os.PathError{Op: "create", Path: path, Err: err}
	}
	// The umask may have narrowed the mode; objects are world-readable.
	if err := unix.Fchmod(fd, objectMode); err != nil {
		unix.Close(fd)
		return -1, &os.PathError{Op: "chmod", Path: path, Err: err}
	}
	return fd, nil
}

// writeAll writes data to fd, retrying short writes.
func writeAll(fd int, path string, data []byte) error {
	for len(data) > 0 {
		n, err := unix.Write(fd, data)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.PathError{Op: "write", Path: path, Err: err}
		}
		if n == 0 {
			return &os.PathError{Op: "write", Path: path, Err: io.ErrShortWrite}
		}
		data = data[n:]
	}
	return nil
}

func closeObjectFile(fd int, path string) error {
	if err := unix.Close(fd); err != nil {
		return &os.PathError{Op: "close", Path: path, Err: err}
	}
	return nil
}

func copyToTemp(src, tmp string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(in.Fd()), &st); err != nil {
		return fmt.Errorf("stat: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return errors.New("not a regular file")
	}
	fd, err := createObjectFile(tmp)
	if err != nil {
		return err
	}
	out := os.NewFile(uintptr(fd), tmp)
	if err := copyData(out, in, st.Size); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// copyData copies size bytes from in to out: FICLONE shares the extents
// (btrfs, XFS), copy_file_range copies inside the kernel (and may reflink
// on NFS etc.), and a user-space copy covers the rest.
func copyData(out, in *os.File, size int64) error {
	if size == 0 {
		return nil
	}
	if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err == nil {
		return nil
	}
	var off int64
	for off < size {
		n, err := unix.CopyFileRange(int(in.Fd()), nil, int(out.Fd()), nil, int(min(size-off, 1<<30)), 0)
		if err != nil {
			if off == 0 && (errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP)) {
				break // not supported here: copy in user space
			}
			return fmt.Errorf("copy_file_range: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("file shrank while copying (%d of %d bytes)", off, size)
		}
		off += int64(n)
	}
	if off >= size {
		return checkShorter(in, size)
	}
	if _, err := in.Seek(0, io.SeekStart); err != nil {
		return err
	}
	if _, err := out.Seek(0, io.SeekStart); err != nil {
		return err
	}
	n, err := io.Copy(out, io.LimitReader(in, size))
	if err != nil {
		return err
	}
	if n != size {
		return fmt.Errorf("file shrank while copying (%d of %d bytes)", n, size)
	}
	return checkShorter(in, size)
}

// checkShorter fails when the source grew past size while it was copied:
// the object would then not match the digest the caller computed.
func checkShorter(in *os.File, size int64) error {
	var st unix.Stat_t
	if err := unix.Fstat(int(in.Fd()), &st); err != nil {
		return err
	}
	if st.Size != size {
		return fmt.Errorf("file changed size while copying (%d -> %d bytes)", size, st.Size)
	}
	return nil
}

// copyBufPool holds the buffers AddReader streams through.
var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// hasherPool holds fs-verity hashers, which keep their tree levels.
var hasherPool sync.Pool

func getHasher(alg fsverity.Algorithm) *fsverity.Hasher {
	if h, ok := hasherPool.Get().(*fsverity.Hasher); ok && h.Algorithm() == alg {
		h.Reset()
		return h
	}
	return fsverity.New(alg)
}

// AddBytes adds data as an object and returns its fs-verity digest. The
// digest is computed first, so content already in the store or in the
// batch is never written, and a new object is written with one write.
// data is not retained.
func (b *Batch) AddBytes(data []byte) ([]byte, error) {
	h := getHasher(b.store.alg)
	h.Write(data)
	digest := h.Sum()
	hasherPool.Put(h)
	tmp, err := b.claim(digest, false)
	if err != nil {
		return nil, fmt.Errorf("add to object store: %w", err)
	}
	if tmp == "" {
		return digest, nil
	}
	if err := writeObjectFile(tmp, data); err != nil {
		b.unclaim(digest, tmp)
		return nil, fmt.Errorf("add to object store: %w", err)
	}
	return digest, nil
}

func writeObjectFile(path string, data []byte) error {
	fd, err := createObjectFile(path)
	if err != nil {
		return err
	}
	if err := writeAll(fd, path, data); err != nil {
		unix.Close(fd)
		return err
	}
	return closeObjectFile(fd, path)
}

// AddReader streams r into a new object, computing its fs-verity digest
// in the same pass, and returns the digest and size. Content that fits
// one buffer goes through AddBytes; bigger content is written to a scratch
// name and renamed into the staging tree once its digest is known. If the
// object already exists, the copy is dropped.
func (b *Batch) AddReader(r io.Reader) ([]byte, int64, error) {
	bp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bp)
	buf := *bp
	n, rerr := fill(r, buf)
	if rerr == io.EOF {
		d, err := b.AddBytes(buf[:n])
		return d, int64(n), err
	}
	if rerr != nil {
		return nil, 0, fmt.Errorf("add to object store: %w", rerr)
	}
	tmp, err := b.scratch()
	if err != nil {
		return nil, 0, fmt.Errorf("add to object store: %w", err)
	}
	digest, size, err := writeHashed(tmp, buf[:n], r, buf, b.store.alg)
	if err != nil {
		unix.Unlink(tmp)
		return nil, 0, fmt.Errorf("add to object store: %w", err)
	}
	final, err := b.claim(digest, false)
	if err == nil && final != "" {
		if err = os.Rename(tmp, final); err != nil {
			b.unclaim(digest, final)
		}
	}
	if err != nil || final == "" {
		unix.Unlink(tmp)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("add to object store: %w", err)
	}
	return digest, size, nil
}

// fill reads into buf until it is full or r fails. Unlike io.ReadFull it
// passes a source's own io.ErrUnexpectedEOF (a truncated tar entry) through
// as an error instead of confusing it with a short final read.
func fill(r io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// writeHashed writes first and then the rest of r (read through buf) to
// a new file tmp, hashing as it goes.
func writeHashed(tmp string, first []byte, r io.Reader, buf []byte, alg fsverity.Algorithm) ([]byte, int64, error) {
	fd, err := createObjectFile(tmp)
	if err != nil {
		return nil, 0, err
	}
	h := getHasher(alg)
	defer hasherPool.Put(h)
	chunk := first
	var size int64
	for eof := false; ; {
		if len(chunk) > 0 {
			h.Write(chunk)
			if err := writeAll(fd, tmp, chunk); err != nil {
				unix.Close(fd)
				return nil, 0, err
			}
			size += int64(len(chunk))
		}
		if eof {
			break
		}
		n, rerr := fill(r, buf)
		chunk = buf[:n]
		if rerr == io.EOF {
			eof = true
		} else if rerr != nil {
			unix.Close(fd)
			return nil, 0, rerr
		}
	}
	if err := closeObjectFile(fd, tmp); err != nil {
		return nil, 0, err
	}
	return h.Sum(), size, nil
}

// Commit makes every object of the batch durable and visible:
//
//  1. fs-verity is enabled on each staged file (when the filesystem
//     supports it), so an object never appears under its name without it;
//  2. one syncfs writes all their data, metadata and verity state;
//  3. each staging/XX directory becomes the store's XX directory with one
//     rename when the store has no XX yet (a fresh store), else each file
//     is renamed to XX/<rest> (without replacing an existing object);
//  4. a second syncfs makes the renames and new XX directories durable.
//
// A crash at any point leaves complete named objects plus the staging
// directory, which CleanupTemps removes.
func (b *Batch) Commit() error {
	b.mu.Lock()
	if b.done {
		b.mu.Unlock()
		return errors.New("commit object store batch: already committed or aborted")
	}
	b.done = true
	items := make([]pending, 0, len(b.pending))
	for _, p := range b.pending {
		items = append(items, p)
	}
	staging, broken := b.staging, b.broken
	b.mu.Unlock()
	if staging == "" {
		return nil
	}
	s := b.store
	sort.Slice(items, func(i, j int) bool { return bytes.Compare(items[i].digest, items[j].digest) < 0 })

	fail := func(err error) error {
		os.RemoveAll(staging)
		return fmt.Errorf("commit object store batch: %w", err)
	}
	if broken != nil {
		return fail(broken)
	}
	if err := s.enableVerity(items); err != nil {
		return fail(err)
	}
	if err := fsutil.SyncFS(s.dir); err != nil {
		return fail(err)
	}
	// items is sorted, so each bucket's objects are adjacent.
	for i := 0; i < len(items); {
		h := hex.EncodeToString(items[i].digest[:1])
		j := i + 1
		for j < len(items) && items[j].digest[0] == items[i].digest[0] {
			j++
		}
		if err := s.placeBucket(filepath.Join(staging, h), h, items[i:j]); err != nil {
			return fail(err)
		}
		i = j
	}
	if err := os.RemoveAll(staging); err != nil {
		return fmt.Errorf("commit object store batch: remove staging directory: %w", err)
	}
	if err := fsutil.SyncFS(s.dir); err != nil {
		return fmt.Errorf("commit object store batch: %w", err)
	}
	return nil
}

// placeBucket moves the staged objects of one XX bucket into the store.
func (s *Store) placeBucket(src, h string, items []pending) error {
	final := filepath.Join(s.dir, h)
	// The staging bucket holds exactly this batch's complete, synced
	// objects of the bucket, so it can become the store's bucket whole.
	err := renameNoReplace(src, final)
	if err == nil {
		return nil
	}
	if !errors.Is(err, os.ErrExist) {
		return err
	}
	for _, p := range items {
		if err := renameNoReplace(p.tmp, s.Path(p.digest)); err != nil {
			if !errors.Is(err, os.ErrExist) {
				return err
			}
			// another batch committed the same object; RemoveAll of the
			// staging directory drops this copy
		}
	}
	return nil
}

// enableVerity turns on fs-verity for the staged files in parallel (the
// kernel hashes each whole file) and checks caller-supplied digests
// against the kernel's measurement. It stops trying after the filesystem
// reports that it lacks fs-verity.
func (s *Store) enableVerity(items []pending) error {
	if s.verity.Load() == verityUnsupported || len(items) == 0 {
		return nil
	}
	var (
		next    atomic.Int64
		mu      sync.Mutex
		firstEr error
		unsupp  atomic.Bool
	)
	workers := min(runtime.GOMAXPROCS(0), len(items))
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !unsupp.Load() {
				i := int(next.Add(1) - 1)
				if i >= len(items) {
					return
				}
				err := enableOne(items[i], s.alg)
				if errors.Is(err, fsverity.ErrNotSupported) {
					unsupp.Store(true)
					return
				}
				if err != nil {
					mu.Lock()
					if firstEr == nil {
						firstEr = err
					}
					mu.Unlock()
					unsupp.Store(true) // stop the others too
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstEr != nil {
		return firstEr
	}
	if unsupp.Load() {
		s.verity.Store(verityUnsupported)
		return nil
	}
	s.verity.Store(verityEnabled)
	return nil
}

func enableOne(p pending, alg fsverity.Algorithm) error {
	f, err := os.Open(p.tmp)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := fsverity.Enable(f, alg); err != nil {
		return err
	}
	if !p.check {
		return nil
	}
	_, got, err := fsverity.Measure(f)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, p.digest) {
		return fmt.Errorf("object %x: content changed while it was added (kernel measured %x)", p.digest, got)
	}
	return nil
}

// renameNoReplace renames old to new unless new exists (os.ErrExist).
func renameNoReplace(oldPath, newPath string) error {
	err := unix.Renameat2(unix.AT_FDCWD, oldPath, unix.AT_FDCWD, newPath, unix.RENAME_NOREPLACE)
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("rename %s: %w", newPath, os.ErrExist)
	}
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// Filesystem without RENAME_NOREPLACE: check, then rename. A
		// concurrent writer of the same object writes the same bytes.
		if _, serr := os.Lstat(newPath); serr == nil {
			return fmt.Errorf("rename %s: %w", newPath, os.ErrExist)
		}
		if err := os.Rename(oldPath, newPath); err != nil {
			return err
		}
		return nil
	}
	return fmt.Errorf("rename %s to %s: %w", oldPath, newPath, err)
}

// Abort drops every object the batch staged.
func (b *Batch) Abort() error {
	b.mu.Lock()
	b.done = true
	staging := b.staging
	b.pending = map[string]pending{}
	b.mu.Unlock()
	if staging == "" {
		return nil
	}
	if err := os.RemoveAll(staging); err != nil {
		return fmt.Errorf("abort object store batch: %w", err)
	}
	return nil
}
