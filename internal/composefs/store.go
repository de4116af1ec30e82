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

// Batch adds objects to a store. Files are written under temporary names
// in a private staging directory (Dir()/.tmp-batch-*); Commit makes them
// durable with one syncfs, renames them into place and syncs again, so no
// per-object fsync is needed and a named object is always complete after
// any crash. A Batch is safe for concurrent use; it is spent after Commit
// or Abort.
type Batch struct {
	store *Store

	mu      sync.Mutex
	staging string             // created on first use
	pending map[string]pending // by hex digest
	seq     int
	done    bool
}

type pending struct {
	tmp    string // absolute path in staging
	digest []byte
	check  bool // digest came from the caller: measure after enabling verity
}

// NewBatch starts a batch of additions to s.
func (s *Store) NewBatch() *Batch {
	return &Batch{store: s, pending: map[string]pending{}}
}

// Len returns the number of new objects waiting for Commit.
func (b *Batch) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.pending)
}

// reserve returns a fresh temporary path, or "" when digest (if known) is
// already in the store or in the batch.
func (b *Batch) reserve(hexDigest string) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.done {
		return "", errors.New("object store batch already committed or aborted")
	}
	if hexDigest != "" {
		if _, ok := b.pending[hexDigest]; ok {
			return "", nil
		}
	}
	if b.staging == "" {
		var rnd [6]byte
		if _, err := rand.Read(rnd[:]); err != nil {
			return "", err
		}
		dir := filepath.Join(b.store.dir, tmpPrefix+"-batch-"+hex.EncodeToString(rnd[:]))
		if err := os.Mkdir(dir, 0o700); err != nil {
			return "", fmt.Errorf("create staging directory: %w", err)
		}
		b.staging = dir
	}
	b.seq++
	return filepath.Join(b.staging, fmt.Sprintf("%d", b.seq)), nil
}

// record adds a finished temporary file to the batch, or removes it when
// another goroutine added the same digest meanwhile.
func (b *Batch) record(tmp string, digest []byte, check bool) error {
	h := hex.EncodeToString(digest)
	b.mu.Lock()
	_, dup := b.pending[h]
	done := b.done
	if !dup && !done {
		b.pending[h] = pending{tmp: tmp, digest: digest, check: check}
	}
	b.mu.Unlock()
	if done {
		os.Remove(tmp)
		return errors.New("object store batch committed or aborted while adding")
	}
	if dup {
		os.Remove(tmp)
	}
	return nil
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
	b.mu.Lock()
	done := b.done
	b.mu.Unlock()
	if done {
		return fmt.Errorf("add %s to object store: batch already committed or aborted", src)
	}
	if b.store.Has(digest) {
		return nil
	}
	tmp, err := b.reserve(hex.EncodeToString(digest))
	if err != nil || tmp == "" {
		if err != nil {
			return fmt.Errorf("add %s to object store: %w", src, err)
		}
		return nil
	}
	if err := copyToTemp(src, tmp); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("add %s to object store: %w", src, err)
	}
	return b.record(tmp, digest, true)
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
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := copyData(out, in, st.Size); err != nil {
		out.Close()
		return err
	}
	// The umask may have narrowed the mode; objects are world-readable.
	if err := out.Chmod(0o644); err != nil {
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
var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// AddReader streams r into a new object, computing its fs-verity digest
// in the same pass, and returns the digest and size. If the object already
// exists, the copy is dropped.
func (b *Batch) AddReader(r io.Reader) ([]byte, int64, error) {
	tmp, err := b.reserve("")
	if err != nil {
		return nil, 0, fmt.Errorf("add to object store: %w", err)
	}
	digest, size, err := writeHashed(tmp, r, b.store.alg)
	if err != nil {
		os.Remove(tmp)
		return nil, 0, fmt.Errorf("add to object store: %w", err)
	}
	if b.store.Has(digest) {
		os.Remove(tmp)
		return digest, size, nil
	}
	if err := b.record(tmp, digest, false); err != nil {
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

func writeHashed(tmp string, r io.Reader, alg fsverity.Algorithm) ([]byte, int64, error) {
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, 0, err
	}
	defer out.Close()
	h := fsverity.New(alg)
	bp := copyBufPool.Get().(*[]byte)
	defer copyBufPool.Put(bp)
	buf := *bp
	var size int64
	for {
		n, rerr := fill(r, buf)
		if n > 0 {
			h.Write(buf[:n])
			if _, err := out.Write(buf[:n]); err != nil {
				return nil, 0, err
			}
			size += int64(n)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return nil, 0, rerr
		}
	}
	if err := out.Chmod(0o644); err != nil {
		return nil, 0, err
	}
	if err := out.Close(); err != nil {
		return nil, 0, err
	}
	return h.Sum(), size, nil
}

// Commit makes every object of the batch durable and visible:
//
//  1. fs-verity is enabled on each temporary file (when the filesystem
//     supports it), so an object never appears under its name without it;
//  2. one syncfs writes all their data, metadata and verity state;
//  3. each is renamed to XX/<rest> (without replacing an existing object);
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
	staging := b.staging
	b.mu.Unlock()
	if staging == "" {
		return nil
	}
	s := b.store
	tphase("commit")
	sort.Slice(items, func(i, j int) bool { return bytes.Compare(items[i].digest, items[j].digest) < 0 })

	if err := s.enableVerity(items); err != nil {
		os.RemoveAll(staging)
		return fmt.Errorf("commit object store batch: %w", err)
	}
	if err := syncfs(s.dir); err != nil {
		os.RemoveAll(staging)
		return fmt.Errorf("commit object store batch: %w", err)
	}
	tphase("syncfs1")
	madeDir := map[string]bool{}
	for _, p := range items {
		final := s.Path(p.digest)
		sub := filepath.Dir(final)
		if !madeDir[sub] {
			if err := os.Mkdir(sub, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
				os.RemoveAll(staging)
				return fmt.Errorf("commit object store batch: %w", err)
			}
			madeDir[sub] = true
		}
		if err := renameNoReplace(p.tmp, final); err != nil {
			if !errors.Is(err, os.ErrExist) {
				os.RemoveAll(staging)
				return fmt.Errorf("commit object store batch: %w", err)
			}
			os.Remove(p.tmp) // another batch committed the same object
		}
	}
	tphase("renames")
	if err := os.Remove(staging); err != nil {
		return fmt.Errorf("commit object store batch: remove staging directory: %w", err)
	}
	if err := syncfs(s.dir); err != nil {
		return fmt.Errorf("commit object store batch: %w", err)
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

// syncfs flushes the whole filesystem that holds dir.
func syncfs(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
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

var tphaseLast = time.Now()

func tphase(name string) {
	if os.Getenv("BERTH_TIMING") != "" {
		fmt.Fprintf(os.Stderr, "  store: %-10s %v\n", name, time.Since(tphaseLast))
		tphaseLast = time.Now()
	}
}
