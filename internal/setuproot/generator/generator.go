// Package generator is the logic of berth-generator, a systemd generator
// (systemd.generator(7)). In an initrd whose kernel command line carries
// berth.* arguments it pulls berth-setup-root.service into
// initrd-root-fs.target, between initrd-root-device.target (and
// sysroot.mount) and initrd-root-fs.target. Elsewhere it does nothing.
// It never blocks and touches nothing but its output directory.
package generator

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/berth-dev/berth/internal/cmdline"
)

// Unit is the name of the service that sets up the berth root.
const Unit = "berth-setup-root.service"

// UnitText is units/berth-setup-root.service (a test keeps them equal). The
// generator writes it itself when the initrd does not carry the file.
const UnitText = `# berth: verify the composefs root named by berth.composefs= and mount it at
# /sysroot, in a systemd (dracut) initrd. berth-generator pulls this unit
# into initrd-root-fs.target only when berth.* kernel arguments are present.
# The physical root is mounted at /sysroot by systemd's own sysroot.mount
# (root=); this service replaces it there with the deployment's root and
# keeps the physical root below it at /sysroot/sysroot (see docs/boot.md).
[Unit]
Description=berth: verify and mount the composefs root
Documentation=https://github.com/berth-dev/berth/blob/main/docs/boot.md
DefaultDependencies=no
ConditionPathExists=/etc/initrd-release
Requires=sysroot.mount
After=sysroot.mount initrd-root-device.target
Before=initrd-root-fs.target
OnFailure=emergency.target
OnFailureJobMode=replace-irreversibly

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/berth/berth-init setup-root /sysroot
StandardInput=null
StandardOutput=journal+console
StandardError=journal+console
`

// UnitDirs are where an installed copy of the unit is looked for.
var UnitDirs = []string{"/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"}

// Options for Run.
type Options struct {
	// Cmdline is the kernel command line text.
	Cmdline string
	// InInitrd tells whether this is the initrd (systemd: /etc/initrd-release).
	InInitrd bool
	// NormalDir is the generator's first output directory.
	NormalDir string
	// UnitDirs overrides UnitDirs (tests).
	UnitDirs []string
}

// Result says what Run did.
type Result struct {
	Wired   bool // the service was pulled into initrd-root-fs.target
	Wrote   []string
	Message string // for the journal (stderr of a generator goes to kmsg)
}

// Run generates the units. Malformed berth.* arguments still wire the
// service: it re-parses the command line and stops the boot with the
// explanation, instead of a silent boot of something unverified.
func Run(o Options) (*Result, error) {
	res := &Result{}
	hasBerth := false
	for _, w := range cmdline.Split(o.Cmdline) {
		if w == "--" {
			break
		}
		if strings.HasPrefix(w, "berth.") && !strings.HasPrefix(w, "berth.debug") {
			hasBerth = true
		}
	}
	_, perr := cmdline.Parse(o.Cmdline)
	switch {
	case !hasBerth:
		res.Message = "no berth arguments on the kernel command line; nothing to do"
		return res, nil
	case !o.InInitrd:
		// The running system needs nothing from the generator today; the
		// arguments are checked so that a typo shows up in the journal.
		res.Message = "running system booted by berth; nothing to generate"
		if perr != nil {
			res.Message = "running system: " + perr.Error()
		}
		return res, nil
	}
	if o.NormalDir == "" {
		return nil, errors.New("no output directory")
	}
	dirs := o.UnitDirs
	if dirs == nil {
		dirs = UnitDirs
	}
	target := ""
	for _, d := range dirs {
		if fi, err := os.Stat(filepath.Join(d, Unit)); err == nil && fi.Mode().IsRegular() {
			target = filepath.Join(d, Unit)
			break
		}
	}
	if target == "" {
		p := filepath.Join(o.NormalDir, Unit)
		if err := os.WriteFile(p, []byte(UnitText), 0o644); err != nil {
			return nil, fmt.Errorf("write %s: %w", p, err)
		}
		res.Wrote = append(res.Wrote, p)
		target = "../" + Unit
	}
	req := filepath.Join(o.NormalDir, "initrd-root-fs.target.requires")
	if err := os.MkdirAll(req, 0o755); err != nil {
		return nil, fmt.Errorf("create %s: %w", req, err)
	}
	link := filepath.Join(req, Unit)
	if err := os.Symlink(target, link); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("link %s: %w", link, err)
	}
	res.Wrote = append(res.Wrote, link)
	res.Wired = true
	res.Message = "berth root: " + Unit + " pulled into initrd-root-fs.target"
	if perr != nil {
		res.Message += " (it will stop the boot: " + perr.Error() + ")"
	}
	return res, nil
}
