// Package runtime collects berth's own runtime files (binaries, units,
// generator, D-Bus and polkit files, dracut module) and adds them to a
// deployment's tree at the paths a distribution package would use
// (DESIGN §3), so that a booted image that knows nothing of berth can
// update itself. The composefs digest of the deployment covers them.
package runtime

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/version"
)

// Version is berth's runtime version, written to /usr/lib/berth/version in
// a deployment: internal/version's (release builds set that one).
var Version = version.Version

// Paths in the image (relative to its root).
const (
	LibDir      = "usr/lib/berth"
	VersionFile = "usr/lib/berth/version"
	// ListFile names every path berth injected, one per line; a running
	// system reads it to find its own runtime files for the next deployment.
	ListFile      = "usr/lib/berth/runtime.list"
	BinLink       = "usr/bin/berth"
	UnitDir       = "usr/lib/systemd/system"
	GeneratorPath = "usr/lib/systemd/system-generators/berth-generator"
	DracutDir     = "usr/lib/dracut/modules.d/90berth"
	DBusConf      = "usr/share/dbus-1/system.d/org.berth1.conf"
	DBusService   = "usr/share/dbus-1/system-services/org.berth1.service"
	PolkitPolicy  = "usr/share/polkit-1/actions/org.berth1.policy"
)

// Binaries berth installs in LibDir. berth and berth-init are required:
// without them a deployment can neither update itself nor boot.
var (
	requiredBinaries = []string{"berth", "berth-init"}
	optionalBinaries = []string{"berthd"}
)

// File is one runtime file to add to a tree.
type File struct {
	Path   string // in the image, relative to its root ("usr/lib/berth/berth")
	Source string // file on this machine with the content (regular files)
	Data   []byte // content of a generated file (when Source is "")
	Target string // symlink target (symlinks)
	Mode   uint32 // permission bits
}

// IsSymlink reports whether f is a symlink.
func (f *File) IsSymlink() bool { return f.Target != "" }

// Set is berth's runtime: every file to inject, sorted by path.
type Set struct {
	Version string
	Files   []File
}

// Source returns the file on this machine that provides image path p
// ("usr/lib/berth/berth-init"), or "" when the set has none.
func (s *Set) Source(p string) string {
	for _, f := range s.Files {
		if f.Path == p {
			return f.Source
		}
	}
	return ""
}

// InitBinary returns the berth-init binary to put into initramfs images.
func (s *Set) InitBinary() string { return s.Source(path.Join(LibDir, "berth-init")) }

// Options say where to collect the runtime from. Zero value: Locate finds
// the running berth's own files.
type Options struct {
	// BinDir holds berth, berth-init, berthd, berth-generator (a build
	// tree's bin/, or /usr/lib/berth when installed).
	BinDir string
	// RepoDir is a berth source tree (units/, dracut/90berth/, data
	// files); "" when berth is installed on a system.
	RepoDir string
	// SysRoot is the root of an installed system whose runtime is copied
	// ("/" for the running one); used when RepoDir is "".
	SysRoot string
}

// Locate finds the runtime of the running berth: when the executable sits
// in a build tree's bin/ (next to go.mod), the build tree; otherwise the
// installed system (/usr/lib/berth and friends).
func Locate() (*Set, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("locate berth runtime: %w", err)
	}
	if resolved, err := filepath.EvalSymlinks(exe); err == nil {
		exe = resolved
	}
	dir := filepath.Dir(exe)
	if repo := filepath.Dir(dir); isBuildTree(repo) {
		return Collect(Options{BinDir: dir, RepoDir: repo})
	}
	return Collect(Options{BinDir: filepath.Join("/", LibDir), SysRoot: "/"})
}

func isBuildTree(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	return err == nil && bytes.Contains(b, []byte("module github.com/berth-dev/berth\n"))
}

// Collect gathers the runtime files described by o.
func Collect(o Options) (*Set, error) {
	if o.BinDir == "" {
		return nil, errors.New("collect berth runtime: no binary directory given")
	}
	s := &Set{Version: Version}
	add := func(p, src string, mode uint32) {
		s.Files = append(s.Files, File{Path: p, Source: src, Mode: mode})
	}
	for _, name := range requiredBinaries {
		src := filepath.Join(o.BinDir, name)
		if err := regular(src); err != nil {
			return nil, fmt.Errorf("collect berth runtime: %s is required: %w (build it with `make build`)", name, err)
		}
		add(path.Join(LibDir, name), src, 0o755)
	}
	for _, name := range optionalBinaries {
		if src := filepath.Join(o.BinDir, name); regular(src) == nil {
			add(path.Join(LibDir, name), src, 0o755)
		}
	}
	s.Files = append(s.Files, File{Path: BinLink, Target: "../lib/berth/berth", Mode: 0o777})
	gen := filepath.Join(o.BinDir, "berth-generator")
	if o.RepoDir == "" && o.SysRoot != "" {
		gen = filepath.Join(o.SysRoot, GeneratorPath)
	}
	if regular(gen) == nil {
		add(GeneratorPath, gen, 0o755)
	}

	if o.RepoDir != "" {
		if err := s.collectRepo(o.RepoDir); err != nil {
			return nil, err
		}
	} else if o.SysRoot != "" {
		if err := s.collectInstalled(o.SysRoot); err != nil {
			return nil, err
		}
	}
	if err := s.addUnitLinks(); err != nil {
		return nil, err
	}
	sort.Slice(s.Files, func(i, j int) bool { return s.Files[i].Path < s.Files[j].Path })
	for i := 1; i < len(s.Files); i++ {
		if s.Files[i].Path == s.Files[i-1].Path {
			return nil, fmt.Errorf("collect berth runtime: %s listed twice", s.Files[i].Path)
		}
	}
	return s, nil
}

// unitSuffixes are the systemd unit types berth may ship.
var unitSuffixes = []string{".service", ".socket", ".timer", ".target", ".path", ".mount"}

func isUnit(name string) bool {
	for _, suf := range unitSuffixes {
		if strings.HasSuffix(name, suf) {
			return true
		}
	}
	return false
}

// collectRepo takes units, the dracut module and the D-Bus/polkit files
// from a source tree.
func (s *Set) collectRepo(repo string) error {
	ents, err := os.ReadDir(filepath.Join(repo, "units"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("collect berth runtime: %w", err)
	}
	for _, e := range ents {
		if e.Type().IsRegular() && isUnit(e.Name()) {
			s.Files = append(s.Files, File{Path: path.Join(UnitDir, e.Name()), Source: filepath.Join(repo, "units", e.Name()), Mode: 0o644})
		}
	}
	ents, err = os.ReadDir(filepath.Join(repo, "dracut", "90berth"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("collect berth runtime: %w", err)
	}
	for _, e := range ents {
		if e.Type().IsRegular() {
			mode := uint32(0o644)
			if strings.HasSuffix(e.Name(), ".sh") {
				mode = 0o755
			}
			s.Files = append(s.Files, File{Path: path.Join(DracutDir, e.Name()), Source: filepath.Join(repo, "dracut", "90berth", e.Name()), Mode: mode})
		}
	}
	// The D-Bus and polkit files live wherever the API package keeps
	// them; look in the usual places of a source tree.
	for _, dataFile := range []string{DBusConf, DBusService, PolkitPolicy} {
		base := path.Base(dataFile)
		for _, dir := range []string{"data", "dbus", "data/dbus", "data/polkit", "polkit", "units", "internal/api"} {
			src := filepath.Join(repo, dir, base)
			if regular(src) == nil {
				s.Files = append(s.Files, File{Path: dataFile, Source: src, Mode: 0o644})
				break
			}
		}
	}
	return nil
}

// collectInstalled takes the runtime files of an installed system: the
// ones its runtime.list names, or (berth installed by `make install` or a
// package, without a list) berth's units and data files by name.
func (s *Set) collectInstalled(sysroot string) error {
	have := map[string]bool{}
	for _, f := range s.Files {
		have[f.Path] = true
	}
	var paths []string
	if b, err := os.ReadFile(filepath.Join(sysroot, ListFile)); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			p := strings.TrimSpace(sc.Text())
			if p == "" || !filepath.IsLocal(p) || have[p] || p == ListFile || p == VersionFile {
				continue
			}
			paths = append(paths, path.Clean(p))
		}
	} else {
		ents, _ := os.ReadDir(filepath.Join(sysroot, UnitDir))
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), "berth") && isUnit(e.Name()) {
				paths = append(paths, path.Join(UnitDir, e.Name()))
			}
		}
		ents, _ = os.ReadDir(filepath.Join(sysroot, DracutDir))
		for _, e := range ents {
			paths = append(paths, path.Join(DracutDir, e.Name()))
		}
		paths = append(paths, DBusConf, DBusService, PolkitPolicy)
	}
	for _, p := range paths {
		src := filepath.Join(sysroot, p)
		fi, err := os.Lstat(src)
		if err != nil {
			continue // listed but absent: nothing to carry over
		}
		// Enablement links are not carried over: addUnitLinks makes them
		// again from the units' [Install] sections.
		if fi.Mode().IsRegular() {
			s.Files = append(s.Files, File{Path: p, Source: src, Mode: uint32(fi.Mode().Perm())})
		}
	}
	return nil
}

// addUnitLinks enables the units that have an [Install] section the way
// `systemctl enable` would, with links in usr/lib/systemd/system/<target>.wants/.
func (s *Set) addUnitLinks() error {
	var links []File
	for _, f := range s.Files {
		if path.Dir(f.Path) != UnitDir || f.Source == "" {
			continue
		}
		unit := path.Base(f.Path)
		wanted, required, err := installSection(f.Source)
		if err != nil {
			return fmt.Errorf("collect berth runtime: unit %s: %w", unit, err)
		}
		for _, t := range wanted {
			links = append(links, File{Path: path.Join(UnitDir, t+".wants", unit), Target: "../" + unit, Mode: 0o777})
		}
		for _, t := range required {
			links = append(links, File{Path: path.Join(UnitDir, t+".requires", unit), Target: "../" + unit, Mode: 0o777})
		}
	}
	s.Files = append(s.Files, links...)
	return nil
}

// installSection reads WantedBy= and RequiredBy= of a unit file.
func installSection(file string) (wanted, required []string, err error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, nil, err
	}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if line[0] == '[' {
			section = line
			continue
		}
		if section != "[Install]" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		for _, t := range strings.Fields(v) {
			if !isUnit(t) || strings.Contains(t, "/") {
				return nil, nil, fmt.Errorf("invalid unit name %q in %s", t, strings.TrimSpace(k))
			}
			switch strings.TrimSpace(k) {
			case "WantedBy":
				wanted = append(wanted, t)
			case "RequiredBy":
				required = append(required, t)
			}
		}
	}
	return wanted, required, sc.Err()
}

func regular(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", p)
	}
	return nil
}

// ObjectAdder adds file content to the object store (*composefs.Batch).
type ObjectAdder interface {
	AddReader(r io.Reader) (digest []byte, size int64, err error)
}

// Result says what Inject did.
type Result struct {
	Injected bool
	// Reason explains a skipped injection ("the image ships berth 2.0 ...").
	Reason string
	Paths  []string
}

// Inject adds the runtime files to root, storing contents through b.
// An image that already ships berth (usr/lib/berth/berth) keeps its own
// copy unless its usr/lib/berth/version is older than s.Version.
// Injection replaces files of the same name; it never follows a symlink in
// the image, and a non-directory where a directory is needed is an error.
func (s *Set) Inject(root *composefs.Inode, b ObjectAdder, objects string) (*Result, error) {
	if root == nil || !root.IsDir() {
		return nil, errors.New("inject berth runtime: image root is not a directory")
	}
	if own := root.Lookup(path.Join(LibDir, "berth")); own != nil {
		b, err := readSmallFile(root, VersionFile, objects)
		imgVer := strings.TrimSpace(string(b))
		_, parsed := parseVersion(imgVer)
		switch {
		case err != nil || !parsed:
			return &Result{Reason: "the image ships its own berth (" + LibDir + "/berth, version unknown); keeping it"}, nil
		case compareVersions(imgVer, s.Version) >= 0:
			return &Result{Reason: fmt.Sprintf("the image ships berth %s (this berth is %s); keeping the image's", imgVer, s.Version)}, nil
		}
	}
	res := &Result{Injected: true}
	for _, f := range s.Files {
		n, err := s.inode(f, b)
		if err != nil {
			return nil, fmt.Errorf("inject berth runtime: %s: %w", f.Path, err)
		}
		if err := put(root, f.Path, n); err != nil {
			return nil, fmt.Errorf("inject berth runtime: %w", err)
		}
		res.Paths = append(res.Paths, f.Path)
	}
	list := strings.Join(append(append([]string{}, res.Paths...), VersionFile, ListFile), "\n") + "\n"
	for _, gen := range []File{
		{Path: VersionFile, Data: []byte(s.Version + "\n"), Mode: 0o644},
		{Path: ListFile, Data: []byte(list), Mode: 0o644},
	} {
		n, err := s.inode(gen, b)
		if err != nil {
			return nil, fmt.Errorf("inject berth runtime: %s: %w", gen.Path, err)
		}
		if err := put(root, gen.Path, n); err != nil {
			return nil, fmt.Errorf("inject berth runtime: %w", err)
		}
		res.Paths = append(res.Paths, gen.Path)
	}
	return res, nil
}

// inlineMax is the largest file composefs stores inline in the image.
const inlineMax = 64

func (s *Set) inode(f File, b ObjectAdder) (*composefs.Inode, error) {
	if f.IsSymlink() {
		return &composefs.Inode{Mode: composefs.SIFLNK | 0o777, Target: f.Target}, nil
	}
	n := &composefs.Inode{Mode: composefs.SIFREG | f.Mode&0o7777}
	var data io.Reader
	var size int64
	if f.Source != "" {
		src, err := os.Open(f.Source)
		if err != nil {
			return nil, err
		}
		defer src.Close()
		fi, err := src.Stat()
		if err != nil {
			return nil, err
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%s is not a regular file", f.Source)
		}
		// The source's mtime keeps the digest stable while the binaries are.
		n.Mtime = composefs.Timespec{Sec: fi.ModTime().Unix(), Nsec: uint32(fi.ModTime().Nanosecond())}
		data, size = src, fi.Size()
	} else {
		data, size = bytes.NewReader(f.Data), int64(len(f.Data))
	}
	if size <= inlineMax {
		buf, err := io.ReadAll(io.LimitReader(data, inlineMax+1))
		if err != nil {
			return nil, err
		}
		if len(buf) > inlineMax {
			return nil, fmt.Errorf("%s grew while reading", f.Source)
		}
		n.Size = uint64(len(buf))
		if len(buf) > 0 {
			n.Inline = buf
		}
		return n, nil
	}
	digest, got, err := b.AddReader(data)
	if err != nil {
		return nil, err
	}
	if got != size {
		return nil, fmt.Errorf("%s changed size while reading (%d, then %d bytes)", f.Source, size, got)
	}
	n.Size = uint64(got)
	n.Digest = digest
	h := hex.EncodeToString(digest)
	n.Payload = h[:2] + "/" + h[2:]
	return n, nil
}

// put places n at p in the tree, creating missing parent directories
// (root-owned, 0755).
func put(root *composefs.Inode, p string, n *composefs.Inode) error {
	dir := root
	parts := strings.Split(p, "/")
	for i, c := range parts[:len(parts)-1] {
		next := dir.Children[c]
		if next == nil {
			next = composefs.NewDir(0o755)
			dir.Children[c] = next
		}
		if !next.IsDir() {
			return fmt.Errorf("/%s in the image is not a directory", strings.Join(parts[:i+1], "/"))
		}
		dir = next
	}
	name := parts[len(parts)-1]
	if old := dir.Children[name]; old != nil && old.IsDir() {
		return fmt.Errorf("/%s in the image is a directory", p)
	}
	dir.Children[name] = n
	return nil
}

// readSmallFile returns the content of a regular file of the tree (at
// most 4 KiB), reading external content from the object store.
func readSmallFile(root *composefs.Inode, p, objects string) ([]byte, error) {
	n := root.Lookup(p)
	if n == nil || n.Type() != composefs.SIFREG {
		return nil, fmt.Errorf("/%s: not a regular file", p)
	}
	if n.Size > 4096 {
		return nil, fmt.Errorf("/%s: too large", p)
	}
	if n.Payload == "" {
		return n.Inline, nil
	}
	if !filepath.IsLocal(n.Payload) {
		return nil, fmt.Errorf("/%s: invalid object path %q", p, n.Payload)
	}
	f, err := os.Open(filepath.Join(objects, n.Payload))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 4096))
}

// compareVersions compares dotted numeric versions ("1.2.3", a leading
// "v" and a "-suffix" ignored); an unparsable a counts as older.
func compareVersions(a, b string) int {
	pa, okA := parseVersion(a)
	pb, okB := parseVersion(b)
	switch {
	case !okA && !okB:
		return 0
	case !okA:
		return -1
	case !okB:
		return 1
	}
	for i := 0; i < 3; i++ {
		if pa[i] != pb[i] {
			if pa[i] < pb[i] {
				return -1
			}
			return 1
		}
	}
	return 0
}

func parseVersion(v string) ([3]uint64, bool) {
	var out [3]uint64
	v = strings.TrimPrefix(v, "v")
	if i := strings.IndexAny(v, "-+~ "); i >= 0 {
		v = v[:i]
	}
	parts := strings.Split(v, ".")
	if len(parts) == 0 || len(parts) > 3 {
		return out, false
	}
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 10, 64)
		if err != nil {
			return out, false
		}
		out[i] = n
	}
	return out, true
}
