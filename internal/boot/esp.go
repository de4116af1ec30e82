// Package boot manages berth's boot entries on the EFI System Partition:
// systemd-boot itself, loader/loader.conf, berth's UKIs (Type #2 entries in
// EFI/Linux) and BLS Type #1 entries (loader/entries) for machines that
// cannot boot UKIs, with boot counting per the Boot Loader Specification
// and systemd's Automatic Boot Assessment.
//
// API for callers (install, deploy, rollback):
//
//	esp := boot.ESP{Dir: "/boot/efi"}                  // the mounted ESP
//	err := esp.InstallSystemdBoot(os.DirFS("/"))       // or the image tree
//	err = esp.AddUKI("7-3fa2c41b09de", ukiPath, boot.DefaultTries)
//	err = esp.AddBLS(id, boot.BLSEntry{...}, boot.DefaultTries)
//	entries, err := esp.Entries()                       // systemd-boot's order
//	def, err := esp.Default()                           // what the next boot picks
//	err = esp.SetDefault(id); target, err := esp.Rollback()
//	err = esp.Remove(id); err = esp.Prune(keepIDs)
//
// Ordering (docs/boot-entries.md): loader.conf says "default berth-*", so
// systemd-boot boots the first berth entry in its own sort order, in which
// a newer deployment id sorts first and entries that ran out of tries sort
// last — which is what makes automatic rollback work. Only when the wanted
// default is not first in that order (a rollback) is loader.conf pinned to
// it ("default berth-<id>[.+]*"); a pinned entry is a known-good one.
//
// FAT has no atomic rename-over, so every replacement writes the new file
// under a temporary name, fsyncs it, removes the old one, renames the new
// one into place and fsyncs the directory; readers take the old file when
// both exist and the new one when only it does, and never write.
package boot

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/uki"
)

// ESP is a mounted EFI System Partition (or XBOOTLDR partition).
type ESP struct {
	Dir string
}

// Directories and files inside the ESP.
const (
	LinuxDir    = "EFI/Linux"      // Type #2 entries (UKIs)
	EntriesDir  = "loader/entries" // Type #1 entries
	LoaderConf  = "loader/loader.conf"
	BerthDir    = "berth" // kernels and initrds of Type #1 entries: berth/<id>/
	newSuffix   = ".berth-new"
	maxConfSize = 64 << 10
)

// DefaultPattern is the loader.conf default that lets systemd-boot's own
// ordering (newest first, bad entries last) choose among berth's entries.
const DefaultPattern = EntryPrefix + "*"

// Entry is one berth boot entry found on the ESP.
type Entry struct {
	ID        string    `json:"id"`
	Type      string    `json:"type"` // "uki" or "bls"
	Path      string    `json:"path"` // relative to the ESP, e.g. EFI/Linux/berth-7-3fa2c41b09de+2-1.efi
	Name      EntryName `json:"-"`
	State     string    `json:"state"` // good, bad, indeterminate
	TriesLeft int       `json:"triesLeft,omitempty"`
	TriesDone int       `json:"triesDone,omitempty"`
	Title     string    `json:"title,omitempty"`
	SortKey   string    `json:"sortKey,omitempty"`
	Version   string    `json:"version,omitempty"`
	MachineID string    `json:"machineId,omitempty"`
}

// BLSEntry describes a Type #1 entry. Linux and Initrds are host paths of
// files copied to the ESP under berth/<id>/.
type BLSEntry struct {
	Title     string
	Version   string
	SortKey   string
	MachineID string
	Options   string // kernel command line
	Linux     string
	Initrds   []string
}

func (e ESP) path(rel string) string { return filepath.Join(e.Dir, filepath.FromSlash(rel)) }

// FindSystemdBoot reads systemd-boot from root (an image tree, or
// os.DirFS("/") for the host) and checks that it is a PE image; a Secure
// Boot–signed build (*.efi.signed) is preferred. It returns the binary and
// its path in root.
func FindSystemdBoot(root fs.FS) ([]byte, string, error) {
	arch := uki.EFIArch()
	for _, dir := range uki.StubDirs {
		for _, name := range []string{"systemd-boot" + arch + ".efi.signed", "systemd-boot" + arch + ".efi"} {
			b, err := fsutil.ReadFileFS(root, dir+"/"+name, 16<<20)
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, "", fmt.Errorf("%s/%s: %w", dir, name, err)
			}
			if err := uki.CheckPE(b); err != nil {
				return nil, "", fmt.Errorf("%s/%s: %w", dir, name, err)
			}
			return b, dir + "/" + name, nil
		}
	}
	return nil, "", fmt.Errorf("%w (systemd-boot%s.efi in %s; Debian/Ubuntu package systemd-boot-efi, Fedora systemd-boot-unsigned, Arch systemd)", ErrNoSystemdBoot, arch, strings.Join(uki.StubDirs, ", "))
}

// ErrNoSystemdBoot is wrapped when a tree has no systemd-boot binary.
var ErrNoSystemdBoot = errors.New("no systemd-boot found")

// InstallSystemdBoot copies systemd-boot from root (an image tree, or
// os.DirFS("/") for the host) to EFI/systemd/ and to the removable-media
// path EFI/BOOT/ (unless another boot loader is there), creates the entry
// directories, and writes loader.conf if there is none. A Secure
// Boot–signed build (*.efi.signed) is preferred.
func (e ESP) InstallSystemdBoot(root fs.FS) error {
	arch := uki.EFIArch()
	src, _, err := FindSystemdBoot(root)
	if err != nil {
		return fmt.Errorf("install systemd-boot: %w", err)
	}
	for _, d := range []string{"EFI/systemd", "EFI/BOOT", LinuxDir, EntriesDir} {
		if err := fsutil.MkdirAllSync(e.path(d), 0o755); err != nil {
			return fmt.Errorf("install systemd-boot: %w", err)
		}
	}
	// The main copy first, the fallback second: at no instant are both gone.
	// The removable-media path is only taken when it is free or already
	// systemd-boot: another OS's boot loader there (a stock system kept
	// next to berth) is left alone; firmware then boots systemd-boot
	// through a Boot#### entry (efivar.Store.EnsureBootEntry).
	for i, dst := range []string{"EFI/systemd/systemd-boot" + arch + ".efi", "EFI/BOOT/BOOT" + strings.ToUpper(arch) + ".EFI"} {
		if i == 1 && !isSystemdBootOrMissing(e.path(dst)) {
			continue
		}
		if err := replaceFile(e.path(dst), func(w io.Writer) error { _, err := w.Write(src); return err }); err != nil {
			return fmt.Errorf("install systemd-boot: %w", err)
		}
	}
	if _, err := os.Stat(e.path("loader/entries.srel")); errors.Is(err, fs.ErrNotExist) {
		if err := replaceFile(e.path("loader/entries.srel"), writeString("type1\n")); err != nil {
			return fmt.Errorf("install systemd-boot: %w", err)
		}
	}
	cfg, err := e.ReadLoaderConf()
	if err != nil {
		return fmt.Errorf("install systemd-boot: %w", err)
	}
	if !cfg.exists {
		cfg.Set("timeout", "3")
		cfg.Set("default", DefaultPattern)
		// The kernel command line of Type #1 entries must not be editable at
		// the boot menu: it carries the composefs digest.
		cfg.Set("editor", "no")
		if err := e.WriteLoaderConf(cfg); err != nil {
			return fmt.Errorf("install systemd-boot: %w", err)
		}
	}
	return nil
}

// isSystemdBootOrMissing reports whether path does not exist or is a
// systemd-boot binary (its .sdmagic names systemd-boot).
func isSystemdBootOrMissing(path string) bool {
	if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) {
		return true
	}
	magic, err := uki.ReadSectionFile(path, ".sdmagic", 4096)
	return err == nil && strings.Contains(string(magic), "systemd-boot")
}

func writeString(s string) func(io.Writer) error {
	return func(w io.Writer) error { _, err := io.WriteString(w, s); return err }
}

func copyFrom(src string) func(io.Writer) error {
	return func(w io.Writer) error {
		f, err := os.Open(src)
		if err != nil {
			return err
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return err
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%s is not a regular file", src)
		}
		_, err = io.Copy(w, f)
		return err
	}
}

// writeNew writes dst+newSuffix and fsyncs it. FAT cannot chmod, so unlike
// fsutil.WriteFileAtomic no permissions are set.
func writeNew(dst string, fill func(io.Writer) error) (string, error) {
	tmp := dst + newSuffix
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return "", fmt.Errorf("create %s: %w", tmp, err)
	}
	if err := fill(f); err != nil {
		f.Close()
		os.Remove(tmp)
		return "", fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return "", fmt.Errorf("fsync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("close %s: %w", tmp, err)
	}
	return tmp, nil
}

// replaceFile replaces dst on a filesystem without atomic rename-over:
// write dst.berth-new and fsync it, remove dst, rename, fsync the
// directory. After a crash either dst is complete, or only the complete
// dst.berth-new is left (readers use it; the next replaceFile overwrites
// it and finishes the job).
func replaceFile(dst string, fill func(io.Writer) error) error {
	tmp, err := writeNew(dst, fill)
	if err != nil {
		return err
	}
	dir := filepath.Dir(dst)
	if err := fsutil.SyncDir(dir); err != nil {
		return err
	}
	if err := os.Remove(dst); err != nil && !errors.Is(err, fs.ErrNotExist) {
		os.Remove(tmp)
		return fmt.Errorf("remove %s: %w", dst, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	return fsutil.SyncDir(dir)
}

// AddUKI installs a UKI as EFI/Linux/berth-<id>+<tries>.efi (no counter
// when tries is 0). An existing entry for id is replaced.
func (e ESP) AddUKI(id, ukiPath string, tries int) error {
	name, err := NewEntryName(id, tries, ".efi")
	if err != nil {
		return err
	}
	names, err := uki.SectionNamesFile(ukiPath)
	if err != nil {
		return fmt.Errorf("add UKI for %s: %w", id, err)
	}
	if !slices.Contains(names, ".linux") {
		return fmt.Errorf("add UKI for %s: %s has no .linux section, not a UKI", id, ukiPath)
	}
	if err := fsutil.MkdirAllSync(e.path(LinuxDir), 0o755); err != nil {
		return err
	}
	return e.install(id, LinuxDir, name, copyFrom(ukiPath))
}

// install writes a new entry file, then removes the entry's other variants
// (other boot counter states), so that an entry for id exists at every
// instant once one existed (two may exist for a moment; readers take the
// one with the most tries left).
func (e ESP) install(id, dir string, name EntryName, fill func(io.Writer) error) error {
	old, err := e.filesOf(dir, id)
	if err != nil {
		return err
	}
	dst := e.path(dir + "/" + name.String())
	for _, o := range old {
		if o == name.String() {
			// Same name: no way around a moment without it on FAT.
			if err := replaceFile(dst, fill); err != nil {
				return fmt.Errorf("add boot entry %s: %w", id, err)
			}
			return e.removeFiles(dir, old, name.String())
		}
	}
	tmp, err := writeNew(dst, fill)
	if err != nil {
		return fmt.Errorf("add boot entry %s: %w", id, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		return fmt.Errorf("add boot entry %s: %w", id, err)
	}
	if err := fsutil.SyncDir(filepath.Dir(dst)); err != nil {
		return err
	}
	return e.removeFiles(dir, old, name.String())
}

func (e ESP) removeFiles(dir string, names []string, keep string) error {
	changed := false
	for _, n := range names {
		if n == keep {
			continue
		}
		if err := os.Remove(e.path(dir + "/" + n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s/%s: %w", dir, n, err)
		}
		changed = true
	}
	if changed {
		return fsutil.SyncDir(e.path(dir))
	}
	return nil
}

// filesOf lists the entry files of id in dir (any boot counter state).
func (e ESP) filesOf(dir, id string) ([]string, error) {
	des, err := os.ReadDir(e.path(dir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", dir, err)
	}
	var out []string
	for _, de := range des {
		if n, err := ParseEntryName(de.Name()); err == nil && n.ID == id {
			out = append(out, de.Name())
		}
	}
	return out, nil
}

// leftoversOf lists unfinished writes (*.berth-new) of id's entries in dir.
func (e ESP) leftoversOf(dir, id string) []string {
	des, _ := os.ReadDir(e.path(dir))
	var out []string
	for _, de := range des {
		name, ok := strings.CutSuffix(de.Name(), newSuffix)
		if !ok {
			continue
		}
		if n, err := ParseEntryName(name); err == nil && n.ID == id {
			out = append(out, de.Name())
		}
	}
	return out
}

// AddBLS installs a Type #1 entry: the kernel and initrds to berth/<id>/,
// then loader/entries/berth-<id>+<tries>.conf pointing at them (the entry
// is written last, so it never points at missing files).
func (e ESP) AddBLS(id string, b BLSEntry, tries int) error {
	name, err := NewEntryName(id, tries, ".conf")
	if err != nil {
		return err
	}
	for _, f := range []string{b.Title, b.Version, b.SortKey, b.MachineID, b.Options} {
		if strings.ContainsAny(f, "\n\r\x00") {
			return fmt.Errorf("add BLS entry %s: field contains a line break or NUL", id)
		}
	}
	if b.Linux == "" {
		return fmt.Errorf("add BLS entry %s: no kernel", id)
	}
	dir := BerthDir + "/" + id
	if err := fsutil.MkdirAllSync(e.path(dir), 0o755); err != nil {
		return err
	}
	if err := fsutil.MkdirAllSync(e.path(EntriesDir), 0o755); err != nil {
		return err
	}
	var conf strings.Builder
	if b.Title != "" {
		fmt.Fprintf(&conf, "title %s\n", b.Title)
	}
	if b.Version != "" {
		fmt.Fprintf(&conf, "version %s\n", b.Version)
	}
	if b.SortKey != "" {
		fmt.Fprintf(&conf, "sort-key %s\n", b.SortKey)
	}
	if b.MachineID != "" {
		fmt.Fprintf(&conf, "machine-id %s\n", b.MachineID)
	}
	if err := replaceFile(e.path(dir+"/linux"), copyFrom(b.Linux)); err != nil {
		return fmt.Errorf("add BLS entry %s: %w", id, err)
	}
	fmt.Fprintf(&conf, "linux /%s/linux\n", dir)
	for i, in := range b.Initrds {
		rel := dir + "/initrd-" + strconv.Itoa(i)
		if err := replaceFile(e.path(rel), copyFrom(in)); err != nil {
			return fmt.Errorf("add BLS entry %s: %w", id, err)
		}
		fmt.Fprintf(&conf, "initrd /%s\n", rel)
	}
	if b.Options != "" {
		fmt.Fprintf(&conf, "options %s\n", b.Options)
	}
	return e.install(id, EntriesDir, name, writeString(conf.String()))
}

// Entries lists berth's entries in the order systemd-boot sorts them (bad
// entries last). Like every reader here it never modifies the ESP; writers
// (Add*, Remove, Prune, SetDefault, ...) must be serialized by the caller
// (berth's deployment lock).
func (e ESP) Entries() ([]Entry, error) {
	var out []Entry
	seen := map[string]int{}
	for _, dir := range []string{LinuxDir, EntriesDir} {
		des, err := os.ReadDir(e.path(dir))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", dir, err)
		}
		for _, de := range des {
			if strings.HasSuffix(de.Name(), newSuffix) {
				// Not renamed into place (yet): not an entry.
				continue
			}
			n, err := ParseEntryName(de.Name())
			if err != nil || !de.Type().IsRegular() {
				continue
			}
			en := Entry{ID: n.ID, Path: dir + "/" + de.Name(), Name: n, State: n.State(), TriesLeft: n.Left, TriesDone: n.Done}
			if n.Ext == ".efi" {
				en.Type = "uki"
				if osrel, err := uki.ReadSectionFile(e.path(en.Path), ".osrel", 1<<20); err == nil {
					en.SortKey, en.Version, en.Title = parseOSRelease(osrel)
				}
			} else {
				en.Type = "bls"
				if err := e.readBLS(&en); err != nil {
					return nil, err
				}
			}
			// Two files for one id: an install was interrupted after the
			// new file was in place; the one with more tries left wins.
			if i, dup := seen[en.ID+n.Ext]; dup {
				if entryCompare(&en, &out[i]) < 0 {
					out[i] = en
				}
				continue
			}
			seen[en.ID+n.Ext] = len(out)
			out = append(out, en)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return entryCompare(&out[i], &out[j]) < 0 })
	return out, nil
}

func (e ESP) readBLS(en *Entry) error {
	b, err := os.ReadFile(e.path(en.Path))
	if err != nil {
		return fmt.Errorf("read %s: %w", en.Path, err)
	}
	if len(b) > maxConfSize {
		return fmt.Errorf("%s: larger than %d bytes", en.Path, maxConfSize)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(strings.TrimSpace(line), " ")
		v = strings.TrimSpace(v)
		switch k {
		case "title":
			en.Title = v
		case "version":
			en.Version = v
		case "sort-key":
			en.SortKey = v
		case "machine-id":
			en.MachineID = v
		}
	}
	return nil
}

// Default returns the berth entry systemd-boot will boot next as far as the
// ESP decides it (the LoaderEntryOneShot/LoaderEntryDefault EFI variables
// override loader.conf; see internal/efivar), or nil if there is none.
func (e ESP) Default() (*Entry, error) {
	entries, err := e.Entries()
	if err != nil {
		return nil, err
	}
	if len(entries) == 0 {
		return nil, nil
	}
	cfg, err := e.ReadLoaderConf()
	if err != nil {
		return nil, err
	}
	if pat := cfg.Get("default"); pat != "" {
		for i := range entries {
			if matchPattern(pat, entries[i].bootID()) {
				return &entries[i], nil
			}
		}
	}
	return &entries[0], nil
}

// pinPattern is the loader.conf default that selects exactly id's entry,
// with or without a boot counter in its name.
func pinPattern(id string) string { return EntryPrefix + id + "[.+]*" }

// SetDefault makes id's entry the one systemd-boot boots. If id is already
// first in systemd-boot's order the unpinned DefaultPattern is kept, so boot
// counting can still fall back; otherwise loader.conf pins id.
func (e ESP) SetDefault(id string) error {
	if err := ValidID(id); err != nil {
		return err
	}
	entries, err := e.Entries()
	if err != nil {
		return err
	}
	idx := -1
	for i := range entries {
		if entries[i].ID == id {
			idx = i
			break
		}
	}
	if idx < 0 {
		return fmt.Errorf("set default boot entry: no entry for deployment %s", id)
	}
	if entries[idx].Name.Bad() {
		return fmt.Errorf("set default boot entry: %s has no boot tries left (marked bad)", entries[idx].Path)
	}
	pattern := DefaultPattern
	if idx != 0 {
		pattern = pinPattern(id)
	}
	cfg, err := e.ReadLoaderConf()
	if err != nil {
		return err
	}
	if cfg.Get("default") == pattern {
		return nil
	}
	cfg.Set("default", pattern)
	return e.WriteLoaderConf(cfg)
}

// Rollback makes the newest good-or-untried entry other than the current
// default the default, and returns its id. Calling it twice swaps back.
func (e ESP) Rollback() (string, error) {
	cur, err := e.Default()
	if err != nil {
		return "", err
	}
	if cur == nil {
		return "", errors.New("rollback: no berth boot entries")
	}
	entries, err := e.Entries()
	if err != nil {
		return "", err
	}
	for _, en := range entries {
		if en.ID != cur.ID && !en.Name.Bad() {
			if err := e.SetDefault(en.ID); err != nil {
				return "", fmt.Errorf("rollback: %w", err)
			}
			return en.ID, nil
		}
	}
	return "", fmt.Errorf("rollback: no other usable boot entry than %s", cur.ID)
}

// Remove deletes every entry file of id and, for Type #1 entries, its
// kernel and initrds. A loader.conf pin to id is dropped first.
func (e ESP) Remove(id string) error {
	if err := ValidID(id); err != nil {
		return err
	}
	cfg, err := e.ReadLoaderConf()
	if err != nil {
		return err
	}
	if cfg.Get("default") == pinPattern(id) {
		cfg.Set("default", DefaultPattern)
		if err := e.WriteLoaderConf(cfg); err != nil {
			return err
		}
	}
	for _, dir := range []string{LinuxDir, EntriesDir} {
		files, err := e.filesOf(dir, id)
		if err != nil {
			return err
		}
		if err := e.removeFiles(dir, append(files, e.leftoversOf(dir, id)...), ""); err != nil {
			return err
		}
	}
	if err := os.RemoveAll(e.path(BerthDir + "/" + id)); err != nil {
		return fmt.Errorf("remove %s/%s: %w", BerthDir, id, err)
	}
	if _, err := os.Stat(e.path(BerthDir)); err == nil {
		return fsutil.SyncDir(e.path(BerthDir))
	}
	return nil
}

// Prune removes the entries (and unfinished entry writes) of every
// deployment not in keep.
func (e ESP) Prune(keep []string) error {
	want := map[string]bool{}
	for _, k := range keep {
		want[k] = true
	}
	ids := map[string]bool{}
	for _, dir := range []string{LinuxDir, EntriesDir} {
		des, err := os.ReadDir(e.path(dir))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read %s: %w", dir, err)
		}
		for _, de := range des {
			if n, err := ParseEntryName(strings.TrimSuffix(de.Name(), newSuffix)); err == nil && !want[n.ID] {
				ids[n.ID] = true
			}
		}
	}
	for id := range ids {
		if err := e.Remove(id); err != nil {
			return err
		}
	}
	return nil
}

// Bless marks id's entries good (drops the boot counter), what
// systemd-bless-boot does on a running system.
func (e ESP) Bless(id string) error {
	return e.renameEntry(id, EntryName.Blessed)
}

// RecordTry renames id's entries as systemd-boot does before booting a
// counted entry (one try fewer left, one more done). For tests and tools.
func (e ESP) RecordTry(id string) error {
	return e.renameEntry(id, EntryName.Tried)
}

func (e ESP) renameEntry(id string, f func(EntryName) EntryName) error {
	if err := ValidID(id); err != nil {
		return err
	}
	found := false
	for _, dir := range []string{LinuxDir, EntriesDir} {
		files, err := e.filesOf(dir, id)
		if err != nil {
			return err
		}
		for _, file := range files {
			found = true
			n, _ := ParseEntryName(file)
			to := f(n).String()
			if to == file {
				continue
			}
			if err := os.Rename(e.path(dir+"/"+file), e.path(dir+"/"+to)); err != nil {
				return fmt.Errorf("rename boot entry %s: %w", file, err)
			}
			if err := fsutil.SyncDir(e.path(dir)); err != nil {
				return err
			}
		}
	}
	if !found {
		return fmt.Errorf("no boot entry for deployment %s", id)
	}
	return nil
}
