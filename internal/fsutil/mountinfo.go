package fsutil

import (
	"fmt"
	"os"
	"strings"
)

// UnescapeMountinfo undoes the octal escapes (\040 for a space, \134 for
// a backslash, ...) of paths in /proc/self/mountinfo.
func UnescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }

// Mount is one line of /proc/self/mountinfo (proc(5)), paths unescaped.
type Mount struct {
	Dev          string // "major:minor"
	Root         string // the mounted subtree of the filesystem
	Point        string // mount point
	FSType       string
	Source       string
	SuperOptions string // per-superblock options (upperdir=… for overlays)
}

// Mounts reads /proc/self/mountinfo.
func Mounts() ([]Mount, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	return ParseMountinfo(string(b)), nil
}

// ParseMountinfo parses mountinfo text; malformed lines are skipped.
func ParseMountinfo(text string) []Mount {
	var out []Mount
	for _, line := range strings.Split(text, "\n") {
		// id parent maj:min root mountpoint opts [optional…] - fstype source superopts
		left, right, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		lf, rf := strings.Fields(left), strings.Fields(right)
		if len(lf) < 5 || len(rf) < 2 {
			continue
		}
		m := Mount{Dev: lf[2], Root: UnescapeMountinfo(lf[3]), Point: UnescapeMountinfo(lf[4]), FSType: rf[0], Source: UnescapeMountinfo(rf[1])}
		if len(rf) > 2 {
			m.SuperOptions = rf[2]
		}
		out = append(out, m)
	}
	return out
}
