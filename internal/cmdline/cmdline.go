// Package cmdline parses the kernel command line for what berth's early
// boot needs (DESIGN §4): the root device arguments the kernel itself would
// use, and the berth.* arguments that select and verify the composefs root.
//
// Malformed or contradictory berth.* arguments are an error, never a silent
// fallback: a typo in berth.composefs= must not boot an unverified root.
package cmdline

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
)

// LocalMode says where the writable layer of the root comes from.
type LocalMode string

const (
	LocalPersistent LocalMode = "persistent" // deploy/<id>/upper,work
	LocalTransient  LocalMode = "transient"  // tmpfs, gone at reboot
	LocalReadonly   LocalMode = "readonly"   // no upper layer
)

// Digest is the composefs image digest named by berth.composefs=.
type Digest struct {
	Hex string // lowercase hex, 64 (SHA-256) or 128 (SHA-512) digits
	// Optional is the leading '?': fs-verity may be absent (insecure).
	Optional bool
}

// Bytes returns the digest as bytes.
func (d Digest) Bytes() []byte {
	b, _ := hex.DecodeString(d.Hex)
	return b
}

// AlgorithmName returns "sha256" or "sha512" by digest length.
func (d Digest) AlgorithmName() string {
	if len(d.Hex) == 128 {
		return "sha512"
	}
	return "sha256"
}

// String renders the digest the way it appears on the command line.
func (d Digest) String() string {
	if d.Optional {
		return "?" + d.Hex
	}
	return d.Hex
}

// Args is what berth reads from the kernel command line.
type Args struct {
	Root       string // root=
	RootFSType string // rootfstype=
	RootFlags  string // rootflags=
	// ReadOnly is true for "ro", false for "rw"; the last one given wins,
	// as in the kernel. RootModeSet tells whether either was given.
	ReadOnly    bool
	RootModeSet bool
	Init        string // init=

	Composefs *Digest   // berth.composefs=; nil when absent
	Deploy    string    // berth.deploy=
	Local     LocalMode // berth.local=, defaults to persistent when Composefs is set
	// DebugShell is berth.debug=shell: on failure, open a shell instead of rebooting.
	DebugShell bool
}

// Berth reports whether the command line asks for a berth root.
func (a *Args) Berth() bool { return a.Composefs != nil }

// ErrMalformed is wrapped by every error about berth.* arguments.
var ErrMalformed = errors.New("malformed berth kernel arguments")

// deployIDRe is what a deployment directory name may look like; it keeps
// the id usable as a single path component.
var deployIDRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// canonicalIDRe is the id format berth itself writes: <serial>-<12 hex>.
var canonicalIDRe = regexp.MustCompile(`^[0-9]+-([0-9a-f]{12})$`)

// ReadProc parses /proc/cmdline, or path when not empty (tests, generators).
func ReadProc(path string) (*Args, error) {
	if path == "" {
		path = "/proc/cmdline"
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read kernel command line: %w", err)
	}
	return Parse(string(b))
}

// Parse parses a kernel command line.
func Parse(line string) (*Args, error) {
	a := &Args{}
	var errs []string
	seen := map[string]string{}
	bad := func(format string, v ...any) { errs = append(errs, fmt.Sprintf(format, v...)) }
	localSet := false
	for _, tok := range Split(line) {
		if tok == "--" {
			break // the rest belongs to init
		}
		key, val, hasVal := strings.Cut(tok, "=")
		switch key {
		case "root":
			a.Root = val
		case "rootfstype":
			a.RootFSType = val
		case "rootflags":
			a.RootFlags = val
		case "init":
			a.Init = val
		case "ro":
			if !hasVal {
				a.ReadOnly, a.RootModeSet = true, true
			}
		case "rw":
			if !hasVal {
				a.ReadOnly, a.RootModeSet = false, true
			}
		}
		if !strings.HasPrefix(key, "berth.") {
			continue
		}
		if !hasVal {
			bad("%s needs a value (%s=...)", key, key)
			continue
		}
		if prev, ok := seen[key]; ok && prev != val {
			bad("%s is given twice with different values (%q and %q)", key, prev, val)
			continue
		}
		seen[key] = val
		switch key {
		case "berth.composefs":
			d, err := parseDigest(val)
			if err != nil {
				bad("berth.composefs=%s: %v", clip(val), err)
				continue
			}
			a.Composefs = &d
		case "berth.deploy":
			if !deployIDRe.MatchString(val) || val == "." || val == ".." {
				bad("berth.deploy=%s: a deployment id is 1-128 characters of A-Z a-z 0-9 . _ - and starts with a letter or digit", clip(val))
				continue
			}
			a.Deploy = val
		case "berth.local":
			switch m := LocalMode(val); m {
			case LocalPersistent, LocalTransient, LocalReadonly:
				a.Local, localSet = m, true
			default:
				bad("berth.local=%s: must be persistent, transient or readonly", clip(val))
			}
		case "berth.debug":
			if val != "shell" {
				bad("berth.debug=%s: the only value is shell", clip(val))
				continue
			}
			a.DebugShell = true
		default:
			bad("unknown berth argument %s (known: berth.composefs, berth.deploy, berth.local, berth.debug)", clip(key))
		}
	}
	if len(errs) == 0 {
		switch {
		case a.Composefs == nil && a.Deploy != "":
			bad("berth.deploy=%s is given without berth.composefs=", a.Deploy)
		case a.Composefs == nil && localSet:
			bad("berth.local=%s is given without berth.composefs=", a.Local)
		case a.Composefs != nil && a.Deploy == "":
			bad("berth.composefs= is given without berth.deploy=<id>")
		}
		if a.Composefs != nil && a.Deploy != "" {
			if m := canonicalIDRe.FindStringSubmatch(a.Deploy); m != nil && !strings.HasPrefix(a.Composefs.Hex, m[1]) {
				bad("berth.deploy=%s names digest %s..., but berth.composefs= is %s...", a.Deploy, m[1], a.Composefs.Hex[:12])
			}
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w: %s", ErrMalformed, strings.Join(errs, "; "))
	}
	if a.Composefs != nil && a.Local == "" {
		a.Local = LocalPersistent
	}
	return a, nil
}

func parseDigest(v string) (Digest, error) {
	var d Digest
	if strings.HasPrefix(v, "?") {
		d.Optional = true
		v = v[1:]
	}
	if len(v) != 64 && len(v) != 128 {
		return d, fmt.Errorf("digest must be 64 (sha256) or 128 (sha512) hex digits, got %d characters", len(v))
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return d, fmt.Errorf("digest has a non-hex character at position %d", i+1)
		}
	}
	d.Hex = strings.ToLower(v)
	return d, nil
}

// clip keeps hostile values from flooding the one-screen error message.
func clip(s string) string {
	const max = 80
	if len(s) > max {
		s = s[:max] + "..."
	}
	return strconv.Quote(s)
}

// Split splits a command line into arguments the way the kernel does:
// whitespace separates, double quotes group (and are removed).
func Split(line string) []string {
	var out []string
	var cur strings.Builder
	inQuote, have := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case c == '"':
			inQuote = !inQuote
			have = true
		case !inQuote && (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'):
			if have {
				out = append(out, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteByte(c)
			have = true
		}
	}
	if have {
		out = append(out, cur.String())
	}
	return out
}

// Render returns the berth arguments of a as kernel command line words
// (for UKI builders and tests).
func (a *Args) Render() []string {
	var out []string
	if a.Composefs != nil {
		out = append(out, "berth.composefs="+a.Composefs.String())
	}
	if a.Deploy != "" {
		out = append(out, "berth.deploy="+a.Deploy)
	}
	if a.Local != "" && a.Composefs != nil {
		out = append(out, "berth.local="+string(a.Local))
	}
	if a.DebugShell {
		out = append(out, "berth.debug=shell")
	}
	return out
}
