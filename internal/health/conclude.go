package health

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	sdbus "github.com/coreos/go-systemd/v22/dbus"

	"github.com/berth-dev/berth/internal/boot"
	"github.com/berth-dev/berth/internal/fsutil"
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

// Reboot asks systemd to reboot (what `systemctl reboot` does).
func Reboot(ctx context.Context) error {
	c, err := sdbus.NewWithContext(ctx)
	if err != nil {
		return fmt.Errorf("reboot: connect to systemd: %w", err)
	}
	defer c.Close()
	if _, err := c.StartUnitContext(ctx, "reboot.target", "replace-irreversibly", nil); err != nil {
		return fmt.Errorf("reboot: %w", err)
	}
	return nil
}
