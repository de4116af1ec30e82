// Package kmod reads a kernel's module metadata (modules.dep, modules.builtin,
// modules.softdep, modules.alias) to compute the closure of a module set, and
// loads modules into the running kernel in dependency order.
//
// It is used twice: at initramfs build time (which files to copy, in which
// order to load them) and by berth-init as PID 1 (load them).
package kmod

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"
)

// Name returns the module name of a module path: base name without .ko and
// compression suffix, dashes folded to underscores (what the kernel uses).
func Name(p string) string {
	b := path.Base(p)
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		b = strings.TrimSuffix(b, ext)
	}
	b = strings.TrimSuffix(b, ".ko")
	return strings.ReplaceAll(b, "-", "_")
}

// normalize folds dashes the way the kernel does for module names.
func normalize(name string) string { return strings.ReplaceAll(name, "-", "_") }

// Index is the module metadata of one kernel version.
type Index struct {
	// Path maps a module name to its path relative to /usr/lib/modules/<kver>.
	Path map[string]string
	// Deps maps a module path to the paths it depends on (modules.dep).
	Deps map[string][]string
	// Builtin holds the names of modules built into the kernel.
	Builtin map[string]bool
	// SoftPre maps a module name to the names modules.softdep loads first.
	SoftPre map[string][]string
	// Alias maps an exact alias (no wildcards) to module names.
	Alias map[string][]string
	// Patterns are the wildcard aliases (device modaliases such as
	// "pci:v*d*sv*sd*bc01sc08i02*"), in file order.
	Patterns []AliasPattern
}

// AliasPattern is one wildcard line of modules.alias.
type AliasPattern struct {
	Pattern string // fnmatch(3) pattern: * ? [...]
	Module  string // module name
}

// ReadIndex reads the metadata below dir (…/lib/modules/<kver>) of fsys.
// modules.dep is required; the other files are optional.
func ReadIndex(fsys fs.FS, dir string) (*Index, error) {
	ix := &Index{Path: map[string]string{}, Deps: map[string][]string{}, Builtin: map[string]bool{},
		SoftPre: map[string][]string{}, Alias: map[string][]string{}}
	f, err := fsys.Open(path.Join(dir, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("read modules.dep of %s: %w", dir, err)
	}
	err = ix.parseDep(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("parse %s/modules.dep: %w", dir, err)
	}
	if err := eachLine(fsys, path.Join(dir, "modules.builtin"), func(l string) {
		ix.Builtin[Name(l)] = true
	}); err != nil {
		return nil, err
	}
	if err := eachLine(fsys, path.Join(dir, "modules.softdep"), func(l string) {
		// softdep <module> pre: a b post: c
		f := strings.Fields(l)
		if len(f) < 3 || f[0] != "softdep" {
			return
		}
		mod, pre := normalize(f[1]), false
		for _, w := range f[2:] {
			switch w {
			case "pre:":
				pre = true
			case "post:":
				pre = false
			default:
				if pre {
					ix.SoftPre[mod] = append(ix.SoftPre[mod], w)
				}
			}
		}
	}); err != nil {
		return nil, err
	}
	if err := eachLine(fsys, path.Join(dir, "modules.alias"), func(l string) {
		f := strings.Fields(l)
		if len(f) != 3 || f[0] != "alias" {
			return
		}
		if strings.ContainsAny(f[1], "*?[") {
			ix.Patterns = append(ix.Patterns, AliasPattern{Pattern: f[1], Module: normalize(f[2])})
		} else {
			ix.Alias[f[1]] = append(ix.Alias[f[1]], normalize(f[2]))
		}
	}); err != nil {
		return nil, err
	}
	return ix, nil
}

func eachLine(fsys fs.FS, name string, fn func(string)) error {
	f, err := fsys.Open(name)
	if err != nil {
		if isNotExist(err) {
			return nil
		}
		return fmt.Errorf("read %s: %w", name, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		fn(l)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", name, err)
	}
	return nil
}

func isNotExist(err error) bool { return err != nil && (errors.Is(err, fs.ErrNotExist)) }

// parseDep parses modules.dep ("path: dep1 dep2").
func (ix *Index) parseDep(r io.Reader) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		mod, deps, ok := strings.Cut(l, ":")
		if !ok || mod == "" {
			return fmt.Errorf("line %d: no \"module:\" prefix", n)
		}
		if err := checkRel(mod); err != nil {
			return fmt.Errorf("line %d: %w", n, err)
		}
		ds := strings.Fields(deps)
		for _, d := range ds {
			if err := checkRel(d); err != nil {
				return fmt.Errorf("line %d: %w", n, err)
			}
		}
		ix.Deps[mod] = ds
		ix.Path[Name(mod)] = mod
	}
	return sc.Err()
}

// checkRel refuses module paths that could leave the modules directory
// (modules.dep comes from the image and is treated as hostile).
func checkRel(p string) error {
	if !fs.ValidPath(p) || strings.HasPrefix(p, "/") {
		return fmt.Errorf("module path %q is not a clean relative path", p)
	}
	return nil
}

// Match returns the names of the modules whose aliases match a device's
// modalias (what udev's kmod builtin does for "add" events), each once.
func (ix *Index) Match(modalias string) []string {
	var out []string
	seen := map[string]bool{}
	add := func(m string) {
		if !seen[m] {
			seen[m] = true
			out = append(out, m)
		}
	}
	for _, m := range ix.Alias[modalias] {
		add(m)
	}
	for _, p := range ix.Patterns {
		if fnmatch(p.Pattern, modalias) {
			add(p.Module)
		}
	}
	return out
}

// fnmatch matches like fnmatch(3) without flags: '*' and '?' match any
// character including '/', "[...]" is a set ("[!...]" or "[^...]" negated,
// ranges allowed). An unterminated '[' matches itself. Iterative with
// backtracking on the last '*', so hostile patterns cost O(len(p)*len(s)).
func fnmatch(p, s string) bool {
	pi, si := 0, 0
	starP, starS := -1, 0
	for si < len(s) {
		if pi < len(p) {
			switch p[pi] {
			case '*':
				starP, starS = pi, si
				pi++
				continue
			case '?':
				pi++
				si++
				continue
			case '[':
				if ok, n := matchSet(p[pi:], s[si]); n > 0 {
					if ok {
						pi += n
						si++
						continue
					}
				} else if s[si] == '[' {
					pi++
					si++
					continue
				}
			default:
				if p[pi] == s[si] {
					pi++
					si++
					continue
				}
			}
		}
		if starP < 0 {
			return false
		}
		starS++
		pi, si = starP+1, starS
	}
	for pi < len(p) && p[pi] == '*' {
		pi++
	}
	return pi == len(p)
}

// matchSet matches c against the bracket expression at the start of p and
// returns its length, or 0 when the expression is not terminated.
func matchSet(p string, c byte) (bool, int) {
	i := 1
	neg := i < len(p) && (p[i] == '!' || p[i] == '^')
	if neg {
		i++
	}
	match := false
	first := true
	for ; i < len(p); i++ {
		if p[i] == ']' && !first {
			return match != neg, i + 1
		}
		first = false
		lo := p[i]
		if i+2 < len(p) && p[i+1] == '-' && p[i+2] != ']' {
			if lo <= c && c <= p[i+2] {
				match = true
			}
			i += 2
			continue
		}
		if lo == c {
			match = true
		}
	}
	return false, 0
}

// DirectDeps returns the module paths p needs loaded first: its modules.dep
// entries and its resolvable "pre:" soft dependencies.
func (ix *Index) DirectDeps(p string) []string {
	var out []string
	for _, pre := range ix.SoftPre[Name(p)] {
		n := normalize(pre)
		if dp, ok := ix.Path[n]; ok {
			out = append(out, dp)
			continue
		}
		for _, m := range ix.Alias[pre] {
			if dp, ok := ix.Path[m]; ok {
				out = append(out, dp)
			}
		}
	}
	return append(out, ix.Deps[p]...)
}

// Closure is the result of resolving a set of wanted modules.
type Closure struct {
	// Order lists module paths so that every module comes after its
	// dependencies (the load order).
	Order []string
	// Builtin lists wanted names that are built into the kernel.
	Builtin []string
	// Missing lists wanted names that are neither modules nor built in.
	Missing []string
}

// Resolve computes the closure of the wanted module names (hard deps from
// modules.dep and "pre:" soft deps, resolved by name or exact alias).
// Unresolvable soft deps are ignored, as modprobe does.
func (ix *Index) Resolve(wanted []string) *Closure {
	c := &Closure{}
	state := map[string]int{} // 1 visiting, 2 done
	var visitPath func(p string)
	var visitName func(name string, soft bool)
	visitPath = func(p string) {
		if state[p] != 0 {
			return // done, or a cycle (broken metadata): load order stays best effort
		}
		state[p] = 1
		for _, pre := range ix.SoftPre[Name(p)] {
			visitName(pre, true)
		}
		for _, d := range ix.Deps[p] {
			visitPath(d)
		}
		state[p] = 2
		c.Order = append(c.Order, p)
	}
	visitName = func(name string, soft bool) {
		n := normalize(name)
		if p, ok := ix.Path[n]; ok {
			visitPath(p)
			return
		}
		if ix.Builtin[n] {
			if !soft {
				c.Builtin = append(c.Builtin, name)
			}
			return
		}
		if mods, ok := ix.Alias[name]; ok {
			for _, m := range mods {
				if p, ok := ix.Path[m]; ok {
					visitPath(p)
				}
			}
			return
		}
		if !soft {
			c.Missing = append(c.Missing, name)
		}
	}
	for _, w := range wanted {
		visitName(w, false)
	}
	sort.Strings(c.Builtin)
	sort.Strings(c.Missing)
	return c
}
