package composefs

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/berth-dev/berth/internal/fsverity"
)

// inlineMax is the largest regular file mkcomposefs stores inside the
// image instead of referencing an object.
const inlineMax = 64

// ScanOptions controls ScanDir. The boolean options mirror mkcomposefs's
// --use-epoch, --skip-devices, --skip-xattrs and --user-xattrs.
type ScanOptions struct {
	Alg     fsverity.Algorithm // default SHA256
	Store   *Batch             // when set, every external file is added to the object store
	Workers int                // hashing parallelism, default GOMAXPROCS

	UseEpoch    bool // all mtimes 0
	SkipDevices bool // leave out character and block devices (whiteouts too)
	SkipXattrs  bool // store no xattrs
	UserXattrs  bool // store only user.* xattrs
}

// ScanDir builds the tree of dir the way mkcomposefs does from a
// directory: lstat fields (nlink ignored, so hardlinks become separate
// inodes), all xattrs, regular files of 1..64 bytes inline, larger ones
// referenced by their fs-verity digest. Directories are read and files
// hashed by opts.Workers goroutines; when opts.Store is set each external
// file is also added to it.
func ScanDir(dir string, opts ScanOptions) (*Inode, error) {
	if opts.Alg == 0 {
		opts.Alg = fsverity.SHA256
	}
	if opts.Alg.Size() == 0 {
		return nil, fmt.Errorf("scan %s: unsupported fs-verity algorithm %v", dir, opts.Alg)
	}
	if opts.SkipXattrs && opts.UserXattrs {
		return nil, fmt.Errorf("scan %s: skipping xattrs and keeping user xattrs conflict", dir)
	}
	if opts.Workers <= 0 {
		opts.Workers = runtime.GOMAXPROCS(0)
	}
	s := &scanner{opts: opts}
	s.cond = sync.NewCond(&s.mu)

	w := newScanWorker(s)
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return nil, fmt.Errorf("scan %s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil, fmt.Errorf("scan %s: not a directory", dir)
	}
	root := &Inode{}
	if err := w.fill(root, dir, &st); err != nil {
		return nil, err
	}
	s.push(scanJob{path: dir, node: root})
	var wg sync.WaitGroup
	for i := 0; i < opts.Workers; i++ {
		if i > 0 {
			w = newScanWorker(s)
		}
		wg.Add(1)
		go func(w *scanWorker) {
			defer wg.Done()
			w.run()
		}(w)
	}
	wg.Wait()
	if s.err != nil {
		return nil, s.err
	}
	return root, nil
}

// scanJob is a directory to read (node is a directory) or a regular
// file to read inline or hash.
type scanJob struct {
	path   string
	node   *Inode
	sparse bool
}

// scanner is a work queue shared by the workers. Jobs add jobs, so the
// queue is unbounded; it is a stack, which keeps it near the tree depth
// times the directory width rather than the whole tree.
type scanner struct {
	opts    ScanOptions
	mu      sync.Mutex
	cond    *sync.Cond
	queue   []scanJob
	pending int // queued + running
	err     error
}

func (s *scanner) push(j scanJob) {
	s.mu.Lock()
	s.queue = append(s.queue, j)
	s.pending++
	s.mu.Unlock()
	s.cond.Signal()
}

func (s *scanner) pushMany(js []scanJob) {
	if len(js) == 0 {
		return
	}
	s.mu.Lock()
	s.queue = append(s.queue, js...)
	s.pending += len(js)
	s.mu.Unlock()
	s.cond.Broadcast()
}

// pop returns the next job, or false when all work is done or failed.
func (s *scanner) pop() (scanJob, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.queue) == 0 && s.pending > 0 && s.err == nil {
		s.cond.Wait()
	}
	if s.err != nil || len(s.queue) == 0 {
		return scanJob{}, false
	}
	j := s.queue[len(s.queue)-1]
	s.queue[len(s.queue)-1] = scanJob{}
	s.queue = s.queue[:len(s.queue)-1]
	return j, true
}

func (s *scanner) done(err error) {
	s.mu.Lock()
	s.pending--
	if err != nil && s.err == nil {
		s.err = err
	}
	wake := s.pending == 0 || s.err != nil
	s.mu.Unlock()
	if wake {
		s.cond.Broadcast()
	}
}

// scanWorker holds one goroutine's reusable buffers, so scanning does not
// allocate big buffers per file.
type scanWorker struct {
	s       *scanner
	hasher  *fsverity.Hasher
	dirbuf  []byte
	names   []string
	listbuf []byte
	valbuf  []byte
	linkbuf []byte
	inbuf   [inlineMax]byte
	jobs    []scanJob
}

func newScanWorker(s *scanner) *scanWorker {
	return &scanWorker{
		s:       s,
		hasher:  fsverity.New(s.opts.Alg),
		dirbuf:  make([]byte, 32<<10),
		listbuf: make([]byte, 1024),
		valbuf:  make([]byte, 1024),
		linkbuf: make([]byte, 4097),
	}
}

func (w *scanWorker) run() {
	for {
		j, ok := w.s.pop()
		if !ok {
			return
		}
		var err error
		if j.node.IsDir() {
			err = w.readDir(j.path, j.node)
		} else {
			err = w.readFile(j)
		}
		w.s.done(err)
	}
}

// readDir lists one directory, lstats and fills each entry, and queues
// subdirectories and files whose content is needed.
func (w *scanWorker) readDir(dir string, node *Inode) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("scan %s: %w", dir, err)
	}
	defer unix.Close(fd)
	names := w.names[:0]
	for {
		n, err := unix.Getdents(fd, w.dirbuf)
		if err != nil {
			return fmt.Errorf("scan %s: read directory: %w", dir, err)
		}
		if n <= 0 {
			break
		}
		_, _, names = unix.ParseDirent(w.dirbuf[:n], -1, names)
	}
	w.names = names[:0]
	node.Children = make(map[string]*Inode, len(names))
	jobs := w.jobs[:0]
	var st unix.Stat_t
	for _, name := range names {
		if err := unix.Fstatat(fd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue // removed while scanning
			}
			return fmt.Errorf("scan %s/%s: %w", dir, name, err)
		}
		typ := st.Mode & unix.S_IFMT
		if w.s.opts.SkipDevices && (typ == unix.S_IFCHR || typ == unix.S_IFBLK) {
			continue
		}
		p := dir + "/" + name
		child := &Inode{}
		if typ == unix.S_IFLNK {
			if err := w.readlink(fd, name, p, child); err != nil {
				return err
			}
		}
		if err := w.fill(child, p, &st); err != nil {
			return err
		}
		node.Children[name] = child
		switch {
		case typ == unix.S_IFDIR:
			jobs = append(jobs, scanJob{path: p, node: child})
		case typ == unix.S_IFREG && st.Size > 0:
			jobs = append(jobs, scanJob{path: p, node: child, sparse: st.Blocks*512 < st.Size})
		}
	}
	w.s.pushMany(jobs)
	clear(jobs)
	w.jobs = jobs[:0]
	return nil
}

// fill sets the lstat fields and xattrs of n.
func (w *scanWorker) fill(n *Inode, path string, st *unix.Stat_t) error {
	n.Mode = st.Mode
	n.UID = st.Uid
	n.GID = st.Gid
	n.Rdev = uint32(st.Rdev) // new_encode_dev: the low 32 bits of dev_t
	if !w.s.opts.UseEpoch {
		n.Mtime = Timespec{Sec: st.Mtim.Sec, Nsec: uint32(st.Mtim.Nsec)}
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		n.Children = map[string]*Inode{}
	case unix.S_IFLNK:
		// Size is the target length, set by readlink.
	default:
		// mkcomposefs keeps st_size for every non-directory; it decides
		// between compact and extended inodes even for device nodes.
		n.Size = uint64(st.Size)
	}
	if w.s.opts.SkipXattrs {
		return nil
	}
	return w.readXattrs(n, path)
}

func (w *scanWorker) readlink(dirfd int, name, path string, n *Inode) error {
	for {
		k, err := unix.Readlinkat(dirfd, name, w.linkbuf)
		if err != nil {
			return fmt.Errorf("scan %s: readlink: %w", path, err)
		}
		if k < len(w.linkbuf) {
			n.Target = string(w.linkbuf[:k])
			n.Size = uint64(k)
			return nil
		}
		w.linkbuf = make([]byte, 2*len(w.linkbuf))
	}
}

// readXattrs reads all xattrs of path without following symlinks.
func (w *scanWorker) readXattrs(n *Inode, path string) error {
	var size int
	for {
		var err error
		size, err = unix.Llistxattr(path, w.listbuf)
		if err == nil {
			break
		}
		switch {
		case errors.Is(err, unix.ERANGE):
			need, err := unix.Llistxattr(path, nil)
			if err != nil {
				return fmt.Errorf("scan %s: list xattrs: %w", path, err)
			}
			w.listbuf = make([]byte, max(need, 2*len(w.listbuf)))
		case errors.Is(err, unix.ENOTSUP):
			return nil // the filesystem has no xattrs
		default:
			return fmt.Errorf("scan %s: list xattrs: %w", path, err)
		}
	}
	if size == 0 {
		return nil
	}
	list := w.listbuf[:size]
	for len(list) > 0 {
		i := 0
		for i < len(list) && list[i] != 0 {
			i++
		}
		key := string(list[:i])
		if i < len(list) {
			i++
		}
		list = list[i:]
		if key == "" || (w.s.opts.UserXattrs && !strings.HasPrefix(key, "user.")) {
			continue
		}
		val, err := w.getxattr(path, key)
		if err != nil {
			return err
		}
		n.SetXattr(key, val)
	}
	if wrXattrAccount(n.Xattrs) > wrMaxXattrAccount {
		return fmt.Errorf("scan %s: xattrs too large for composefs", path)
	}
	return nil
}

func (w *scanWorker) getxattr(path, key string) ([]byte, error) {
	for {
		k, err := unix.Lgetxattr(path, key, w.valbuf)
		if err == nil {
			return append([]byte{}, w.valbuf[:k]...), nil
		}
		if !errors.Is(err, unix.ERANGE) {
			return nil, fmt.Errorf("scan %s: get xattr %s: %w", path, key, err)
		}
		need, err := unix.Lgetxattr(path, key, nil)
		if err != nil {
			return nil, fmt.Errorf("scan %s: get xattr %s: %w", path, key, err)
		}
		w.valbuf = make([]byte, max(need, 2*len(w.valbuf)))
	}
}

// readFile reads a small file inline, or hashes a larger one (and adds
// it to the object store). Raw descriptors keep os.File's per-file
// bookkeeping out of this hot path.
func (w *scanWorker) readFile(j scanJob) error {
	n := j.node
	fd, err := openNoatime(j.path)
	if err != nil {
		return fmt.Errorf("scan %s: %w", j.path, err)
	}
	defer unix.Close(fd)
	if n.Size <= inlineMax {
		buf := w.inbuf[:n.Size]
		for off := 0; off < len(buf); {
			k, err := unix.Pread(fd, buf[off:], int64(off))
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return fmt.Errorf("scan %s: read: %w", j.path, err)
			}
			if k == 0 {
				return fmt.Errorf("scan %s: file shrank while scanning", j.path)
			}
			off += k
		}
		n.Inline = append([]byte(nil), buf...)
		return nil
	}
	if err := w.hasher.ReadFd(fd, j.path, int64(n.Size), j.sparse); err != nil {
		return fmt.Errorf("scan: %w", err)
	}
	n.Digest = w.hasher.Sum()
	n.Payload = PayloadPath(n.Digest)
	if w.s.opts.Store != nil {
		if err := w.s.opts.Store.AddFile(j.path, n.Digest); err != nil {
			return fmt.Errorf("scan: %w", err)
		}
	}
	return nil
}

// openNoatime opens a file for reading without updating its access time
// when allowed (owner or CAP_FOWNER), so scanning does not dirty inodes.
// O_NONBLOCK keeps a file swapped for a FIFO after lstat from hanging the
// scan.
func openNoatime(path string) (int, error) {
	const flags = unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC | unix.O_NONBLOCK
	fd, err := unix.Open(path, flags|unix.O_NOATIME, 0)
	if errors.Is(err, unix.EPERM) {
		fd, err = unix.Open(path, flags, 0)
	}
	return fd, err
}
