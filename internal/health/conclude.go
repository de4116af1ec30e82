package health

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/fsutil"
	"github.com/berth-dev/berth/internal/power"
	"github.com/berth-dev/berth/internal/store"
)

// ResultFile is the last health report of a deployment, in its directory
// (deploy/<id>/health.json); `berth status` quotes it for a deployment the
// boot loader abandoned.
const ResultFile = "health.json"

// Result is the content of ResultFile.
type Result struct {
	Time    time.Time `json:"time"`
	OK      bool      `json:"ok"`
	Summary string    `json:"summary,omitempty"`
	Report  *Report   `json:"report"`
}

// Outcome is what Conclude did with the booted deployment's boot entry.
type Outcome struct {
	Entry   string // the booted entry's file name, "" if it has none
	Blessed bool   // the entry was on trial and is now marked good
	// Reboot: the boot was unhealthy, the entry is still on trial and
	// another usable entry exists, so rebooting lets systemd-boot count
	// this try and, when the tries are used up, fall back.
	Reboot bool
	Bad    []string // deployments whose entries ran out of tries
}

// Conclude acts on a health report for the deployment booted below
// sysroot, with its boot entries on the ESP at espDir ("" if none is
// mounted): it records the report, marks the booted deployment booted
// when healthy and abandoned ones failed (Record), and does what
// systemd-bless-boot does: a healthy boot's counted entry is blessed.
// An unhealthy boot of an entry on trial asks for a reboot, so that a bad
// update falls back to the previous deployment by itself; a blessed
// entry is never rebooted away from (that could loop forever).
func Conclude(sysroot, espDir, booted string, rep *Report) (*Outcome, error) {
	out := &Outcome{}
	var errs []error
	var entries []boot.Entry
	if espDir != "" {
		var err error
		if entries, err = (boot.ESP{Dir: espDir}).Entries(); err != nil {
			errs = append(errs, err)
		}
	}
	var cur *boot.Entry
	usableOther := false
	for i, e := range entries {
		if e.Name.Bad() {
			out.Bad = append(out.Bad, e.ID)
		}
		if e.ID == booted {
			cur = &entries[i]
		} else if !e.Name.Bad() {
			usableOther = true
		}
	}
	if booted != "" {
		if err := writeResult(store.At(sysroot), booted, rep); err != nil {
			errs = append(errs, err)
		}
	}
	if err := Record(sysroot, booted, rep, out.Bad); err != nil {
		errs = append(errs, err)
	}
	if cur != nil {
		out.Entry = filepath.Base(cur.Path)
		switch {
		case rep.OK && cur.Name.Counting:
			if err := (boot.ESP{Dir: espDir}).Bless(booted); err != nil {
				errs = append(errs, fmt.Errorf("bless boot entry %s: %w", out.Entry, err))
			} else {
				out.Blessed = true
			}
		case !rep.OK && cur.Name.Counting && usableOther:
			out.Reboot = true
		}
	}
	return out, errors.Join(errs...)
}

func writeResult(l store.Layout, id string, rep *Report) error {
	dir := l.Deployment(id)
	if _, err := os.Stat(dir); err != nil {
		return nil // not a deployment of this store (or removed): nothing to note
	}
	b, err := json.MarshalIndent(Result{Time: time.Now().UTC(), OK: rep.OK, Summary: rep.Summary(), Report: rep}, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, ResultFile), append(b, '\n'), 0o644)
}

// ReadResult returns deployment id's last health result.
func ReadResult(l store.Layout, id string) (*Result, error) {
	b, err := os.ReadFile(filepath.Join(l.Deployment(id), ResultFile))
	if err != nil {
		return nil, err
	}
	var r Result
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(l.Deployment(id), ResultFile), err)
	}
	return &r, nil
}

// BootCheck is what berth-healthcheck.service does once per boot: run the
// checks, conclude (record, bless, mark abandoned deployments failed) and,
// when the booted entry is still on trial and unhealthy, reboot so that the
// boot loader counts the try and falls back when none are left.
type BootCheck struct {
	Options Options
	Sysroot string // "/" on the running system
	ESP     string // mounted ESP holding the boot entries ("" = none)
	Booted  string // booted deployment id ("" = not booted by berth)
	// RebootOnFailedTrial allows the reboot (off: report only).
	RebootOnFailedTrial bool
	// Say receives one line per action taken (default: discarded).
	Say func(format string, args ...any)
	// Reboot reboots the machine (default power.Reboot).
	Reboot func(context.Context) error
}

// Run runs the boot check. err is non-nil when the checks could not run or
// the boot is unhealthy; a result that could not be recorded is said (the
// boot's health does not depend on it).
func (b BootCheck) Run(ctx context.Context) (*Report, *Outcome, error) {
	say := b.Say
	if say == nil {
		say = func(string, ...any) {}
	}
	reboot := b.Reboot
	if reboot == nil {
		reboot = power.Reboot
	}
	rep, err := Run(ctx, b.Options)
	if err != nil {
		return nil, nil, err
	}
	out, cerr := Conclude(b.Sysroot, b.ESP, b.Booted, rep)
	if cerr != nil {
		say("warning: could not record the health result: %v", cerr)
	}
	if out.Blessed {
		say("boot entry %s of deployment %s marked good", out.Entry, b.Booted)
	}
	if rep.OK {
		return rep, out, nil
	}
	if out.Reboot && b.RebootOnFailedTrial {
		say("deployment %s is on trial and unhealthy: rebooting so the boot loader counts the try (and falls back when none are left)", b.Booted)
		if err := reboot(ctx); err != nil {
			return rep, out, fmt.Errorf("unhealthy: %s; %w", rep.Summary(), err)
		}
	}
	return rep, out, fmt.Errorf("unhealthy: %s", rep.Summary())
}
