// Package version says which berth this is: its version, the commit it
// was built from, the Go release that built it, and the versions of the
// on-disk formats it writes. berth (`berth version`, `berth --version`)
// and berthd (`berthd --version`) report it.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/berth-dev/berth/internal/composefs"
	"github.com/berth-dev/berth/internal/store"
)

// Version is berth's version. Release builds set it with
// -ldflags "-X github.com/berth-dev/berth/internal/version.Version=1.2.3";
// the runtime injected into deployments records it
// (/usr/lib/berth/version), so it must stay a dotted version.
var Version = "0.1.0-dev"

// Commit is the source revision; the Makefile sets it with -X from
// `git describe --always --dirty`. Empty: taken from the build
// information Go records when it builds in a git tree.
var Commit = ""

// Info is what `berth version --json` prints.
type Info struct {
	Version   string `json:"version"`
	Commit    string `json:"commit,omitempty"` // "" when unknown
	GoVersion string `json:"go_version"`
	Platform  string `json:"platform"` // GOOS/GOARCH
	Formats   `json:"formats"`
}

// Formats are the versions of what berth writes to disk.
type Formats struct {
	// ComposefsHeader is the composefs header version of its images
	// (LCFS_EROFS_VERSION).
	ComposefsHeader int `json:"composefs_header"`
	// ComposefsFormat is the highest composefs format version it writes
	// (images without whiteouts are written as format 0, as mkcomposefs does).
	ComposefsFormat int `json:"composefs_format"`
	// StoreLayout is the layout of /berth (docs/on-disk-format.md).
	StoreLayout int `json:"store_layout"`
}

// Get returns this build's Info.
func Get() Info {
	return Info{
		Version:   Version,
		Commit:    commit(),
		GoVersion: runtime.Version(),
		Platform:  runtime.GOOS + "/" + runtime.GOARCH,
		Formats: Formats{
			ComposefsHeader: composefs.HeaderVersion,
			ComposefsFormat: composefs.MaxFormatVersion,
			StoreLayout:     store.LayoutVersion,
		},
	}
}

func commit() string {
	if Commit != "" {
		return Commit
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	if rev == "" {
		return ""
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if modified == "true" {
		rev += "-dirty"
	}
	return rev
}

// String is the one-line form (`berth --version`).
func (i Info) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "berth %s", i.Version)
	if i.Commit != "" {
		fmt.Fprintf(&b, " (%s)", i.Commit)
	}
	fmt.Fprintf(&b, ", %s %s, composefs header %d format ≤%d, store layout %d",
		i.GoVersion, i.Platform, i.ComposefsHeader, i.ComposefsFormat, i.StoreLayout)
	return b.String()
}
