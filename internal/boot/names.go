package boot

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// EntryPrefix starts the file name of every boot entry berth owns.
const EntryPrefix = "berth-"

// DefaultTries is the number of boot attempts a new entry gets before
// systemd-boot considers it bad (Automatic Boot Assessment).
const DefaultTries = 3

var idRe = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,99}$`)

// ValidID reports whether id can name a boot entry: lower case (systemd-boot
// case-folds entry ids), no '+' (it starts the boot counter), no path
// separators, and not ending in '.' (FAT drops trailing dots).
func ValidID(id string) error {
	if !idRe.MatchString(id) || strings.HasSuffix(id, ".") || strings.Contains(id, "..") {
		return fmt.Errorf("invalid deployment id %q for a boot entry (want [a-z0-9][a-z0-9._-]*)", id)
	}
	return nil
}

// EntryName is a boot entry file name split per the Boot Loader
// Specification's boot counting: PREFIX+LEFT[-DONE].EXT, where LEFT is the
// number of tries left and DONE the number of tries made. Without a counter
// the entry is "good" (blessed or never counted); LEFT == 0 means "bad".
type EntryName struct {
	ID       string // deployment id (without the "berth-" prefix)
	Counting bool   // the name carries a +LEFT[-DONE] counter
	Left     int
	Done     int
	Ext      string // ".efi" (UKI, Type #2) or ".conf" (Type #1)
}

// String formats the file name.
func (n EntryName) String() string {
	s := EntryPrefix + n.ID
	if n.Counting {
		s += "+" + strconv.Itoa(n.Left)
		if n.Done > 0 {
			s += "-" + strconv.Itoa(n.Done)
		}
	}
	return s + n.Ext
}

// Bad reports whether the entry has no tries left.
func (n EntryName) Bad() bool { return n.Counting && n.Left == 0 }

// Good reports whether the entry was blessed (or never counted).
func (n EntryName) Good() bool { return !n.Counting }

// State is "good", "bad" or "indeterminate" (still being tried), the
// vocabulary of systemd's Automatic Boot Assessment.
func (n EntryName) State() string {
	switch {
	case n.Good():
		return "good"
	case n.Bad():
		return "bad"
	}
	return "indeterminate"
}

// Tried returns the name after one more boot attempt, the rename
// systemd-boot performs before booting a counted entry.
func (n EntryName) Tried() EntryName {
	if n.Counting && n.Left > 0 {
		n.Left--
		n.Done++
	}
	return n
}

// Blessed returns the name without a counter, the rename
// systemd-bless-boot performs once boot-complete.target is reached.
func (n EntryName) Blessed() EntryName {
	n.Counting, n.Left, n.Done = false, 0, 0
	return n
}

// NewEntryName names a fresh entry with tries attempts (0 = no counting).
func NewEntryName(id string, tries int, ext string) (EntryName, error) {
	if err := ValidID(id); err != nil {
		return EntryName{}, err
	}
	if tries < 0 || tries > 1000 {
		return EntryName{}, fmt.Errorf("boot tries %d out of range", tries)
	}
	return EntryName{ID: id, Counting: tries > 0, Left: tries, Ext: ext}, nil
}

// ParseEntryName parses a file name of a berth boot entry. It fails for
// files that are not berth entries.
func ParseEntryName(file string) (EntryName, error) {
	var n EntryName
	lower := strings.ToLower(file)
	switch {
	case strings.HasSuffix(lower, ".efi"):
		n.Ext = ".efi"
	case strings.HasSuffix(lower, ".conf"):
		n.Ext = ".conf"
	default:
		return n, fmt.Errorf("%q is not a boot entry (.efi or .conf)", file)
	}
	if !strings.HasPrefix(lower, EntryPrefix) {
		return n, fmt.Errorf("%q is not a berth boot entry", file)
	}
	stem := lower[len(EntryPrefix) : len(lower)-len(n.Ext)]
	if i := strings.LastIndexByte(stem, '+'); i >= 0 {
		left, done, ok := parseCounter(stem[i+1:])
		if !ok {
			return n, fmt.Errorf("%q: malformed boot counter %q", file, stem[i:])
		}
		n.Counting, n.Left, n.Done = true, left, done
		stem = stem[:i]
	}
	if err := ValidID(stem); err != nil {
		return n, fmt.Errorf("%q: %w", file, err)
	}
	n.ID = stem
	return n, nil
}

// parseCounter parses "LEFT" or "LEFT-DONE" (decimal, no signs).
func parseCounter(s string) (left, done int, ok bool) {
	l, d, hasDone := strings.Cut(s, "-")
	num := func(x string) (int, bool) {
		if x == "" || len(x) > 4 {
			return 0, false
		}
		for _, c := range x {
			if c < '0' || c > '9' {
				return 0, false
			}
		}
		v, err := strconv.Atoi(x)
		return v, err == nil
	}
	var ok1, ok2 bool
	left, ok1 = num(l)
	ok2 = true
	if hasDone {
		done, ok2 = num(d)
	}
	return left, done, ok1 && ok2
}
