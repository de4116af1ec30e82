package boot

import (
	"bufio"
	"bytes"
	"path"
	"strings"
)

// This file mirrors how systemd-boot orders entries and picks the default,
// so berth can predict what the next boot selects without booting.

func isVersionChar(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '~' || c == '-' || c == '^' || c == '.'
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }
func isAlpha(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case !a:
		return -1
	}
	return 1
}

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// versionCompare orders version strings like systemd's
// strverscmp_improved (UAPI Version Format Specification): segments of
// digits compare numerically, '~' sorts before everything, '-' and '^' and
// '.' separate, and the string with more segments is newer.
func versionCompare(a, b string) int {
	if a == "" || b == "" {
		return strings.Compare(a, b)
	}
	for {
		for a != "" && !isVersionChar(a[0]) {
			a = a[1:]
		}
		for b != "" && !isVersionChar(b[0]) {
			b = b[1:]
		}
		if (a != "" && a[0] == '~') || (b != "" && b[0] == '~') {
			if r := cmpBool(a == "" || a[0] != '~', b == "" || b[0] != '~'); r != 0 {
				return r
			}
			a, b = a[1:], b[1:]
		}
		if a == "" || b == "" {
			return strings.Compare(a, b)
		}
		for _, sep := range []byte{'-', '^', '.'} {
			if a[0] == sep || b[0] == sep {
				if r := cmpBool(a[0] != sep, b[0] != sep); r != 0 {
					return r
				}
				a, b = a[1:], b[1:]
				if a == "" || b == "" {
					return strings.Compare(a, b)
				}
			}
		}
		var aa, bb int
		if isDigit(a[0]) || isDigit(b[0]) {
			for aa < len(a) && isDigit(a[aa]) {
				aa++
			}
			for bb < len(b) && isDigit(b[bb]) {
				bb++
			}
			if r := cmpBool(aa > 0, bb > 0); r != 0 {
				return r
			}
			an, bn := strings.TrimLeft(a[:aa], "0"), strings.TrimLeft(b[:bb], "0")
			if r := cmpInt(len(an), len(bn)); r != 0 {
				return r
			}
			if r := strings.Compare(an, bn); r != 0 {
				return r
			}
		} else {
			for aa < len(a) && isAlpha(a[aa]) {
				aa++
			}
			for bb < len(b) && isAlpha(b[bb]) {
				bb++
			}
			m := min(aa, bb)
			if r := strings.Compare(a[:m], b[:m]); r != 0 {
				return r
			}
			if r := cmpInt(aa, bb); r != 0 {
				return r
			}
		}
		a, b = a[aa:], b[bb:]
	}
}

// entryCompare is systemd-boot's boot_entry_compare: bad entries last;
// entries with a sort key before those without; by sort key, machine id,
// then version (newest first); then by id (newest first); then more tries
// left first.
func entryCompare(a, b *Entry) int {
	if r := cmpBool(a.Name.Bad(), b.Name.Bad()); r != 0 {
		return r
	}
	if r := cmpBool(a.SortKey == "", b.SortKey == ""); r != 0 {
		return r
	}
	if a.SortKey != "" {
		if r := strings.Compare(a.SortKey, b.SortKey); r != 0 {
			return r
		}
		if r := strings.Compare(a.MachineID, b.MachineID); r != 0 {
			return r
		}
		if r := -versionCompare(a.Version, b.Version); r != 0 {
			return r
		}
	}
	if r := -versionCompare(a.bootID(), b.bootID()); r != 0 {
		return r
	}
	if !a.Name.Counting || !b.Name.Counting {
		return 0
	}
	if r := -cmpInt(a.Name.Left, b.Name.Left); r != 0 {
		return r
	}
	return cmpInt(a.Name.Done, b.Name.Done)
}

// bootID is the entry id systemd-boot matches patterns against: the file
// name, case-folded, without the boot counter.
func (e *Entry) bootID() string {
	return strings.ToLower(EntryPrefix + e.ID + e.Name.Ext)
}

// matchPattern matches a loader.conf "default" glob like systemd-boot's
// efi_fnmatch (*, ?, [...]), case-insensitively.
func matchPattern(pattern, id string) bool {
	ok, err := path.Match(strings.ToLower(pattern), strings.ToLower(id))
	return ok && err == nil
}

// parseOSRelease extracts the fields systemd-boot uses from an os-release
// file: the sort key (IMAGE_ID, else ID), the version (IMAGE_VERSION, else
// VERSION_ID, else VERSION, else BUILD_ID) and a title (PRETTY_NAME, else NAME).
func parseOSRelease(b []byte) (sortKey, version, title string) {
	kv := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		kv[strings.TrimSpace(k)] = v
	}
	first := func(keys ...string) string {
		for _, k := range keys {
			if kv[k] != "" {
				return kv[k]
			}
		}
		return ""
	}
	return first("IMAGE_ID", "ID"), first("IMAGE_VERSION", "VERSION_ID", "VERSION", "BUILD_ID"), first("PRETTY_NAME", "NAME")
}
